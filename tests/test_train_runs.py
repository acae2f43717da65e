"""train.py runs on a small scene: its samples and loaders, checkpoints and metrics, the inputs it refuses, two ranks."""

import csv
import json
import platform
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

import train
from ink3d import InputError, train_inputs, volume
from ink3d.columns import COLUMNS
from ink3d.dataset import ScrollSamples
from models import load_model
from stage_process import run_code
from train_scene import COLUMN_BAND, metrics_rows, train_briefly, training_scene


def test_edge_padding_and_retry_bound(tmp_path):
    root = training_scene(tmp_path)
    samples = ScrollSamples(root / "scan.h5", root / "train.h5", [[-8, 24, 0]], 16, 1, train=False, block=16)
    image, labels, redraws = samples[0]
    assert torch.all(image[0, :8] == 0) and torch.all(labels[0, :8] == -1)  # z < 0: outside the volume
    assert torch.all(labels[0, 8:, 8:] == -1) and torch.all(image[0, 8:, 8:] == 0)  # y >= 32: outside
    hungry = ScrollSamples(root / "scan.h5", root / "train.h5", [[0, 0, 0]], 16, 4, train=True, block=16, min_labeled=10**6, max_tries=5)
    assert all(hungry[i][2] == 4 for i in range(4))  # gave up after 5 draws, and said so


def test_samples_are_a_function_of_their_index(tmp_path):
    root = training_scene(tmp_path)
    samples = ScrollSamples(root / "scan.h5", root / "train.h5", np.load(root / "train.npy"), 16, 8, train=True, block=16)
    a, b = samples[3], samples[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(samples[4][0], a[0])


class _CountingFile:
    def __init__(self, log_path, original):
        self.log_path, self.original = log_path, original

    def __call__(self, *args, **kwargs):
        import os

        with open(self.log_path, "a") as log:
            log.write(f"{os.getpid()}\n")
        return self.original(*args, **kwargs)


def test_device_samples_are_raw_crops_with_their_transform_and_a_function_of_their_index(tmp_path):
    root = training_scene(tmp_path)
    samples = ScrollSamples(root / "scan.h5", root / "train.h5", [[0, 0, 0], [16, 16, 0]], 16, 8, train=True, block=16,
                            seed=3, on_device=True)
    first, again = samples[5], ScrollSamples(root / "scan.h5", root / "train.h5", [[0, 0, 0], [16, 16, 0]], 16, 8, train=True,
                                             block=16, seed=3, on_device=True)[5]
    image, labels, _, matrix, offset, scale = first
    assert image.dtype == torch.uint8 and image.shape == (1, 24, 24, 24) and labels.shape == (1, 24, 24, 24)
    assert matrix.shape == (3, 3) and offset.shape == (3,) and 0.4 <= float(scale) <= 2.0
    assert all(torch.equal(a, b) for a, b in zip(first[:2] + first[3:], again[:2] + again[3:]))
    with pytest.raises(ValueError, match="resamples nothing"):
        ScrollSamples(root / "scan.h5", root / "train.h5", [[0, 0, 0]], 16, 8, train=True, block=16, augment="exact", on_device=True)


def test_hdf5_files_open_once_per_worker(tmp_path, monkeypatch):
    import ink3d.dataset

    root = training_scene(tmp_path)
    monkeypatch.setattr(ink3d.dataset.h5py, "File", _CountingFile(tmp_path / "opens.txt", h5py.File))
    samples = ScrollSamples(root / "scan.h5", root / "train.h5", np.load(root / "train.npy"), 16, 12, train=True, block=16)
    loader = torch.utils.data.DataLoader(samples, batch_size=2, num_workers=2, multiprocessing_context="fork")
    assert sum(len(batch[0]) for batch in loader) == 12
    pids = (tmp_path / "opens.txt").read_text().split()
    assert len(pids) == 4 and len(set(pids)) == 2  # scan + labels, once in each of the 2 workers


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator")
def test_loader_workers_keep_the_memory_their_samples_free():
    """A worker's minor page faults while it allocates and frees arrays of a crop's size, as it does sample after
    sample, without and with train.py's worker_init_fn (in a fresh process: a worker inherits its parent's heap)."""
    churn = textwrap.dedent("""
        import resource
        import numpy as np
        import torch
        from ink3d.dataset import loader_worker_init

        class Churn(torch.utils.data.Dataset):
            def __len__(self):
                return 1

            def __getitem__(self, index):
                np.ones(1 << 22)  # 32 MB: the first one costs its pages either way
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(5):
                    np.ones(1 << 22)
                return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        for init in (None, loader_worker_init):
            loader = torch.utils.data.DataLoader(Churn(), num_workers=1, worker_init_fn=init, multiprocessing_context="fork")
            print(int(next(iter(loader))))
    """)
    default, kept = (int(line) for line in run_code(churn).stdout.split())
    assert default >= 20  # every fresh array faults its pages in (4 kB or 2 MB ones)
    assert kept < default / 10


def test_training_run_writes_checkpoints_and_metrics(tmp_path):
    root = training_scene(tmp_path)
    train_briefly(root, tmp_path / "run")
    model = load_model(tmp_path / "run" / "last.pth")
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert state["step"] == 4 and {"optimizer", "redraws", "torch_rng", "python_rng"} <= set(state)
    assert model.args.f_maps == 4 and (tmp_path / "run" / "best.pth").exists()
    with open(tmp_path / "run" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [r["step"] for r in rows] == ["2", "4"] and 0 <= float(rows[-1]["valid_f05"]) <= 1
    assert (tmp_path / "run" / "valid_000004.png").exists()
    with pytest.raises(InputError, match="--resume true"):
        train_briefly(root, tmp_path / "run")


def test_origins_outside_the_volume_or_their_labels_are_refused_or_warned_of(tmp_path, capsys):
    root = training_scene(tmp_path)
    np.save(root / "outside.npy", np.array([[100, 100, 100], [-64, 0, 0]], np.int32))
    with pytest.raises(InputError, match="outside.npy: none of its 2 block origins holds a labeled voxel"):
        train_briefly(root, tmp_path / "run", "--train_coords", str(root / "outside.npy"))
    np.save(root / "corner.npy", np.array([[0, 24, 0], [100, 0, 0]], np.int32))  # labels lie at y 8..24: none in these patches
    train_briefly(root, tmp_path / "run", "--valid_coords", str(root / "corner.npy"), "--max_steps", "2")
    assert ("warning: " + str(root / "corner.npy") + ": 2 of its 2 validation origins hold no labeled voxel of "
            + str(root / "valid.h5") + " within the 16-voxel patch at them: validation scores nothing") in capsys.readouterr().out


def test_coords_made_for_other_blocks_are_refused_by_name(tmp_path, monkeypatch):
    """pred_find_coords records the block beside its coords: training samples within it, and a mismatch is named."""
    root = training_scene(tmp_path)
    (root / "valid.npy.config.json").write_text(json.dumps({"block": 64}))
    with pytest.raises(InputError, match=r"valid.npy was made with --block 64, and validation reads a --patch 16 .*--block 16, "
                                         r"or train with --patch 64"):
        train_briefly(root, tmp_path / "run")
    (root / "valid.npy.config.json").write_text(json.dumps({"block": 16}))
    (root / "train.npy.config.json").write_text(json.dumps({"block": 32}))
    with pytest.raises(InputError, match=r"train.npy was made with --block 32, this run samples blocks of --block 16"):
        train_briefly(root, tmp_path / "run", "--block", "16")
    blocks, samples = [], train.ScrollSamples
    monkeypatch.setattr(train, "ScrollSamples", lambda *args, **kwargs: blocks.append(kwargs["block"]) or samples(*args, **kwargs))
    train_briefly(root, tmp_path / "run", "--max_steps", "2")
    assert blocks[0] == 32  # training samples within the coords' blocks


def test_exclusion_radius_drops_training_blocks(tmp_path):
    root = training_scene(tmp_path)
    train_briefly(root, tmp_path / "run", "--exclusion_radius", "20", "--max_steps", "2")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dropped_train_blocks"] == 2  # (0,16,16) and (16,16,0) lie 16 from (16,16,16); (16,0,0) lies 22.6
    with pytest.raises(InputError, match=r"all 4 lie within 40 voxels .*--exclusion_radius, by default 4 x --patch: lower it"):
        train_briefly(root, tmp_path / "run2", "--exclusion_radius", "40", "--max_steps", "2")
    with pytest.raises(InputError, match=r"all 4 lie within 64 voxels"):  # auto: 4 patches of 16
        train_briefly(root, tmp_path / "run3", "--exclusion_radius", "auto", "--max_steps", "2")
    train_briefly(root, tmp_path / "run4", "--exclusion_radius", "auto", "--patch", "6", "--max_steps", "2")  # 24: (0,0,0) lies 27.7 away
    assert json.loads((tmp_path / "run4" / "summary.json").read_text())["dropped_train_blocks"] == 3
    with pytest.raises(InputError, match=r"--exclusion_radius -3: auto, or a number of voxels >= 0"):
        train_briefly(root, tmp_path / "run5", "--exclusion_radius", "-3")


def test_all_unlabeled_batches_are_skipped(tmp_path, monkeypatch):
    """Batches without a labeled voxel change nothing (here every batch: the check that refuses such a run is off)."""
    root = training_scene(tmp_path, unlabeled=True)
    with pytest.raises(InputError, match="train.npy: none of its 4 block origins holds a labeled voxel .*training would learn nothing"):
        train_briefly(root, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    monkeypatch.setattr(train_inputs, "check_origins_hold_labels", lambda *args: None)
    torch.manual_seed(0)
    train_briefly(root, tmp_path / "run", "--max_steps", "3", "--valid_every", "3", "--checkpoint_every", "3")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_batches"] == 3
    torch.manual_seed(0)
    initial = train.UNet3D(f_maps=4, num_levels=2).state_dict()
    trained = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(initial[k], trained[k]) for k in initial)


def test_init_checkpoint_in_published_form(tmp_path):
    root = training_scene(tmp_path)
    train_briefly(root, tmp_path / "first", "--max_steps", "2")
    state = torch.load(tmp_path / "first" / "last.pth", weights_only=True)["model"]
    torch.save({"model." + k: v for k, v in state.items()}, tmp_path / "published.pth")
    train_briefly(root, tmp_path / "second", "--max_steps", "1", "--init_checkpoint", str(tmp_path / "published.pth"), "--lr", "0")
    assert all(torch.equal(state[k], v) for k, v in torch.load(tmp_path / "second" / "last.pth", weights_only=True)["model"].items())
    with pytest.raises(InputError, match="wrong shape"):
        train_briefly(root, tmp_path / "third", "--f_maps", "8", "--init_checkpoint", str(tmp_path / "published.pth"))


def _ddp_rank(rank, world, port, argv, out):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    wrapped = []

    class Recording(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, **kwargs):
            super().__init__(module, **kwargs)
            wrapped.append(module)

    train.DistributedDataParallel = Recording
    train.main(argv)
    torch.save(wrapped[0].state_dict(), f"{out}/rank{rank}.pt")


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    import socket

    root = training_scene(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["--volume", str(root / "scan.h5"), "--train_labels", str(root / "train.h5"), "--valid_labels", str(root / "valid.h5"),
            "--train_coords", str(root / "train.npy"), "--valid_coords", str(root / "valid.npy"), "--out_dir", str(tmp_path / "ddp"),
            "--patch", "16", "--f_maps", "4", "--num_levels", "2", "--batch_size", "1", "--max_steps", "3", "--valid_every", "3",
            "--workers", "0", "--min_labeled", "1", "--exclusion_radius", "0", "--device", "cpu"]
    torch.multiprocessing.start_processes(_ddp_rank, args=(2, port, argv, str(tmp_path)), nprocs=2, start_method="forkserver")
    first, second = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(first[k], second[k]) for k in first)
    initial = train.UNet3D(f_maps=4, num_levels=2).state_dict()
    assert not all(torch.equal(initial[k], first[k]) for k in first)


def test_the_validation_picture_says_what_its_numbers_are(tmp_path, monkeypatch):
    titles = []
    original = train.validation_picture
    monkeypatch.setattr(train, "validation_picture", lambda *parts, title: titles.append(title) or original(*parts, title=title))
    train_briefly(training_scene(tmp_path), tmp_path / "run")
    rows = metrics_rows(tmp_path / "run" / "metrics.csv")
    assert titles == [f"step {row['step']}: model F0.5 {float(row['valid_f05']):.3f}, best intensity threshold F0.5 "
                      f"{float(row['valid_threshold_baseline_f05']):.3f}" for row in rows]


def _misnamed_labels(root):
    with h5py.File(root / "valid.h5", "a") as file:
        file.move(volume.INK_COUNT, "counts")


def _wrong_coords(root):
    np.save(root / "train.npy", np.zeros((4, 2), np.int32))


def _small_truth(root):
    with h5py.File(root / "truth.h5", "w") as file:
        volume.create_volume(file, volume.GROUND_TRUTH, (8, 8, 8), np.uint8)
    return ["--ground_truth", str(root / "truth.h5")]


@pytest.mark.parametrize("breaks, message", [
    (lambda root: (root / "valid.h5").unlink(), "valid.h5: file not found"),
    (_misnamed_labels, "valid.h5: no dataset 'ink_count' \\(datasets: columns, counts, ink_sum\\)"),
    (lambda root: (root / "valid.npy").unlink(), "valid.npy: cannot read block origins"),
    (_wrong_coords, "train.npy: expected a non-empty \\(N, 3\\) integer array"),
    (_small_truth, "truth.h5: dataset 'ink' has shape \\(8, 8, 8\\), the scan"),
    (lambda root: ["--batch_size", "0"], "--batch_size 0: must be > 0"),
    (lambda root: ["--ema_decay", "1.0"], "--ema_decay 1.0: must be in \\[0, 1\\)"),
])
def test_bad_inputs_are_named_before_anything_is_written(tmp_path, breaks, message):
    root = training_scene(tmp_path)
    extra = breaks(root) or []
    with pytest.raises(InputError, match=message):
        train_briefly(root, tmp_path / "run", *extra)
    assert not (tmp_path / "run").exists()


def _narrow_ink_range(root):
    with h5py.File(root / "train.h5", "a") as file:
        file.attrs["band"], file.attrs["ink_range"] = COLUMN_BAND, json.dumps([-1.5, 1.5])


def _no_columns(root):
    with h5py.File(root / "valid.h5", "a") as file:
        del file[COLUMNS]


@pytest.mark.parametrize("breaks, message", [
    (_narrow_ink_range, "train.h5: made with ink range -1.5..1.5 of band 4.0; --ink_depth learned needs the whole band"),
    (_no_columns, "valid.h5: no label columns"),
    (lambda root: ["--augment", "cpu"], "--ink_depth learned moves the columns with each crop's transform"),
    (lambda root: ["--ink_depth", "deep"], "--ink_depth 'deep': choose one of learned, fixed"),
])
def test_learning_the_depth_refuses_labels_that_cannot_teach_it(tmp_path, breaks, message):
    root = training_scene(tmp_path)
    extra = breaks(root) or []
    with pytest.raises(InputError, match=message):
        train_briefly(root, tmp_path / "run", *extra)
    assert not (tmp_path / "run").exists()
    if not extra:  # the same files train with the fixed ink range
        train_briefly(root, tmp_path / "run", "--ink_depth", "fixed", "--max_steps", "2")


def test_learned_validation_scores_the_columns(tmp_path):
    """With columns, validation scores each counted column of the validation blocks once, by its maximum probability."""
    root = training_scene(tmp_path)
    np.save(root / "valid.npy", np.array([[16, 8, 16]], np.int32))
    train_briefly(root, tmp_path / "run", "--max_steps", "2", "--valid_every", "2")
    row = metrics_rows(tmp_path / "run" / "metrics.csv")[-1]
    # the validation block (16..31, 8..23, 16..31) holds the bands (y 12..20) of the columns with z, x in 16..31
    assert int(row["valid_voxels"]) == 16 * 16 and 0 <= float(row["valid_f05"]) <= 1
    np.save(root / "valid.npy", np.array([[16, 16, 16]], np.int32))
    train_briefly(root, tmp_path / "run2", "--max_steps", "2", "--valid_every", "2")
    assert int(metrics_rows(tmp_path / "run2" / "metrics.csv")[-1]["valid_voxels"]) == 0  # y 16..31 cuts every band
