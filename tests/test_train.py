import csv
import json
import math
import platform
import shutil
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

import train
from ink3d import InputError, train_inputs, volume
from ink3d.columns import COLUMNS, ColumnWriter
from ink3d.dataset import BACKGROUND, ScrollSamples, augmentation, label_air
from ink3d.intensity import Normalization, scan_histogram
from ink3d.loss import masked_loss
from ink3d.validation import PICTURE_COLUMN, UNLABELED_GREY, validation_picture
from models import load_model
from models.ema import EMA
from stage_process import run_code


def test_masked_loss_hand_computed():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0], requires_grad=True)
    labels = torch.tensor([1.0, -1.0, 0.0, 0.5])
    loss, count = masked_loss(logits, labels)
    expected = (math.log(2) + math.log(1 + math.exp(-1)) + 0.5 * (math.log(1 + math.exp(-3)) + math.log(1 + math.exp(3)))) / 3
    assert count == 3 and loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[1] == 0 and torch.all(logits.grad[[0, 2, 3]] != 0)


def test_all_unlabeled_batch_gives_zero_not_nan():
    logits = torch.randn(5, requires_grad=True)
    loss, count = masked_loss(logits, torch.full((5,), -1.0), dice_weight=1.0)
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_dice_term_adds_to_bce():
    logits, labels = torch.tensor([2.0, -2.0, 0.5]), torch.tensor([1.0, 0.0, -1.0])
    bce, _ = masked_loss(logits, labels)
    both, _ = masked_loss(logits, labels, dice_weight=0.5)
    p = torch.sigmoid(torch.tensor([2.0, -2.0]))
    dice = 1 - (2 * p[0] + 1) / (p.sum() + 1 + 1)
    assert both.item() == pytest.approx(bce.item() + 0.5 * dice.item(), rel=1e-6)


def test_background_term_and_label_smoothing_hand_computed():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0, 1.0])
    labels = torch.tensor([1.0, BACKGROUND, 0.0, BACKGROUND, -1.0])

    def bce(x, t):
        return math.log(1 + math.exp(x)) - t * x

    loss, count = masked_loss(logits, labels, background_weight=0.5, label_smoothing=0.1)
    expected = (bce(0.0, 0.95) + bce(-1.0, 0.05)) / 2 + 0.5 * (bce(2.0, 0.05) + bce(3.0, 0.05)) / 2
    assert count == 2 and loss.item() == pytest.approx(expected, rel=1e-6)
    only_air, count = masked_loss(logits, torch.tensor([-1.0, BACKGROUND, -1.0, -1.0, -1.0]), background_weight=2.0)
    assert count == 0 and only_air.item() == pytest.approx(2 * bce(2.0, 0.0), rel=1e-6)
    assert masked_loss(logits, labels)[0].item() == pytest.approx((bce(0.0, 1) + bce(-1.0, 0)) / 2, rel=1e-6)


def test_label_air_never_labels_air_as_ink():
    scan = np.array([10, 10, 10, 200, 200, 200, 60, 61], np.uint8)
    labels = np.array([1.0, 0.25, -1.0, 1.0, 0.0, -1.0, 0.5, 0.5], np.float32)
    assert label_air(labels.copy(), scan, 60, background=True).tolist() == [0, 0, BACKGROUND, 1, 0, -1, 0, 0.5]
    assert label_air(labels.copy(), scan, 60, background=False).tolist() == [0, 0, -1, 1, 0, -1, 0, 0.5]
    assert label_air(labels.copy(), scan, None, background=True).tolist() == labels.tolist()


def test_training_crops_mark_air_as_background_and_never_as_ink(tmp_path):
    root = _scene(tmp_path)
    samples = ScrollSamples(root / "scan.h5", root / "train.h5", np.load(root / "train.npy"), 16, 6, train=True, block=16,
                            augment="none", intensity_scale=(1, 1), air_level=100)
    plain = ScrollSamples(root / "scan.h5", root / "train.h5", np.load(root / "train.npy"), 16, 6, train=True, block=16,
                          augment="none", intensity_scale=(1, 1))
    for index in range(6):
        image, labels, _ = samples[index]
        original = plain[index][1]
        scan = torch.round(image * 255)
        air = scan <= 100
        assert torch.equal(labels[air & (original >= 0)], torch.zeros(int((air & (original >= 0)).sum())))
        assert torch.all(labels[air & (original < 0)] == BACKGROUND)
        assert torch.equal(labels[~air], original[~air])
        assert air.any() and (~air & (original > 0)).any()


def test_ema_equals_its_definition():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.8)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(1, 13):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
            model.train()(torch.randn(4, 3))  # moves the BatchNorm statistics and counts a batch
        ema.update(model)
        decay = min(0.8, (1 + n) / (10 + n))
        for name, value in model.state_dict().items():
            expected[name] = decay * expected[name] + (1 - decay) * value if value.is_floating_point() else value.clone()
    assert ema.updates == 12
    for name, value in ema.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert ema.state_dict()["1.num_batches_tracked"] == 12


def test_checkpoints_hold_ema_and_normalization_that_loaders_use(tmp_path):
    root = _scene(tmp_path)
    _train(root, tmp_path / "run", "--ema_decay", "0.5", "--input_normalization", "percentile", "--percentiles", "2,98")
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    with h5py.File(root / "scan.h5") as file:
        expected = Normalization.of_volume(scan_histogram(file[volume.SCAN]), "percentile", 2, 98)
    assert state["config"]["normalization"] == expected.to_config() and expected != Normalization()
    assert state["ema_updates"] == 4 and not all(torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    ema, raw = load_model(tmp_path / "run" / "last.pth").state_dict(), load_model(tmp_path / "run" / "last.pth", weights="raw").state_dict()
    assert all(torch.equal(ema[k], state["ema"][k]) and torch.equal(raw[k], state["model"][k]) for k in ema)
    with pytest.raises(InputError, match="different input_normalization"):
        _train(root, tmp_path / "run", "--resume", "true", "--ema_decay", "0.5", "--percentiles", "2,98")


def test_validation_scores_the_blocks_against_the_ground_truth(tmp_path):
    root = _scene(tmp_path)
    with h5py.File(root / "scan.h5") as file:
        scan = file[volume.SCAN][:]
    with h5py.File(root / "truth.h5", "w") as file:
        volume.create_volume(file, volume.GROUND_TRUTH, scan.shape, np.uint8, chunk=16)[:] = (scan > 200) * 255
    _train(root, tmp_path / "run", "--ground_truth", str(root / "truth.h5"))
    with open(tmp_path / "run" / "metrics.csv") as file:
        row = list(csv.DictReader(file))[-1]
    block = scan[16:32, 16:32, 16:32]  # the validation block: ink is exactly its brightest voxels
    assert float(row["valid_3d_scan_f05"]) == pytest.approx(1.0) and 0 < float(row["valid_3d_f05"]) <= 1
    assert (block > 200).any()


def test_validation_picture_columns_and_captions():
    image = np.zeros((1, 1, 3, 4, 4), np.float32)
    image[0, 0, 1] = np.arange(16).reshape(4, 4) / 15
    label = np.full((1, 1, 3, 4, 4), -1, np.float32)
    label[0, 0, 1, 0] = [0, 1, 0.5, -2]
    probability = np.full((1, 1, 3, 4, 4), 0.25, np.float32)
    picture = validation_picture(image, label, probability, title="step 7: F0.5 0.500")
    scale = -(-PICTURE_COLUMN // 4)
    column = 4 * scale + 2
    assert picture.shape == (18 + 18 + column, 3 * column) and picture.dtype == np.uint8
    body = picture[36:]
    assert np.array_equal(body[:4 * scale:scale, :4 * scale:scale], np.rint(np.arange(16).reshape(4, 4) * 17))
    assert body[0, column:column + 4 * scale:scale].tolist() == [0, 255, 128, UNLABELED_GREY]  # 0.5 rounds to 128
    assert body[scale, column] == UNLABELED_GREY and UNLABELED_GREY not in (0, 255)
    assert np.all(body[:4 * scale, 2 * column:2 * column + 4 * scale] == 64)
    assert picture[:18, :40].any() and not picture[:18, column:].any()  # the title, short, at the left
    assert all(picture[18:36, c * column:c * column + 40].any() for c in range(3))  # a caption over each column


def test_lr_schedule():
    assert train.lr_factor(0, 10, 110) == pytest.approx(0.1)
    assert train.lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert train.lr_factor(60, 10, 110) == pytest.approx(0.5)
    assert train.lr_factor(110, 10, 110) == pytest.approx(0.0)


@pytest.mark.parametrize("kind", ["full", "exact"])
def test_augmentation_keeps_unlabeled_exact_and_alignment(kind):
    rng = np.random.default_rng(0)
    cells = rng.random((6, 6, 6)) > 0.5
    image = np.kron(cells, np.ones((8, 8, 8))).astype(np.float32) * 0.6 + 0.2  # 48^3, blocks of 0.2 / 0.8
    labels = (image > 0.5).astype(np.float32)
    labels[:, :20] = -1
    transform = augmentation(32, kind)
    agreements = []
    for seed in range(6):
        import random

        random.seed(seed)
        out = transform(image=image.copy(), mask=labels.copy())
        image_out, labels_out = out["image"], out["mask"]
        assert image_out.shape == labels_out.shape == (32, 32, 32)
        assert set(np.unique(labels_out)) <= {-1.0, 0.0, 1.0}
        labeled = labels_out >= 0
        agreements.append(((image_out > 0.5) == (labels_out > 0.5))[labeled].mean())
        if kind == "exact":  # voxels are moved, never resampled
            assert set(np.unique(image_out)) <= {np.float32(0.2), np.float32(0.8)}
    assert min(agreements) == 1.0 if kind == "exact" else min(agreements) > 0.9  # full: border voxels are interpolated
    assert augmentation(32, "none") is None


COLUMN_BAND = 4.0


def _scene(tmp_path, unlabeled=False):
    """A random scan with a labeled slab y 8..24 (ink where the scan is bright), and the columns of pixels at y 16
    along y that label it (ink where their band holds ink; none when `unlabeled`)."""
    rng = np.random.default_rng(0)
    scan = rng.integers(0, 256, (32, 32, 32)).astype(np.uint8)
    count = np.zeros(scan.shape, np.uint16)
    count[:, 8:24] = 1
    ink = ((scan > 128) & (count > 0)).astype(np.float32)
    if unlabeled:
        count[:] = 0
        ink[:] = 0
    with h5py.File(tmp_path / "scan.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, scan.shape, np.uint8, chunk=16)[:] = scan
    for name in ("train", "valid"):
        with h5py.File(tmp_path / f"{name}.h5", "w") as file:
            volume.create_volume(file, volume.INK_SUM, scan.shape, np.float32, chunk=16)[:] = ink
            volume.create_volume(file, volume.INK_COUNT, scan.shape, np.uint16, chunk=16)[:] = count
            columns = ColumnWriter(file, scan.shape, 16, COLUMN_BAND)
            if not unlabeled:
                z, x = np.mgrid[0:32, 0:32].reshape(2, -1)
                points = np.stack([z, np.full_like(z, 16), x], axis=1).astype(np.float32)
                normals = np.tile(np.float32([0, 1, 0]), (len(z), 1))
                columns.add(points, normals, np.where(ink[z, 12:21, x].any(axis=1), 255, 0).astype(np.uint8))
    np.save(tmp_path / "train.npy", np.array([[0, 0, 0], [16, 0, 0], [0, 16, 16], [16, 16, 0]], np.int32))
    np.save(tmp_path / "valid.npy", np.array([[16, 16, 16]], np.int32))
    return tmp_path


def _train(root, out, *extra):
    return train.main(["--volume", str(root / "scan.h5"), "--train_labels", str(root / "train.h5"),
                       "--valid_labels", str(root / "valid.h5"), "--train_coords", str(root / "train.npy"),
                       "--valid_coords", str(root / "valid.npy"), "--out_dir", str(out), "--patch", "16",
                       "--f_maps", "4", "--num_levels", "2", "--batch_size", "2", "--max_steps", "4", "--warmup_steps", "1",
                       "--valid_every", "2", "--checkpoint_every", "2", "--workers", "0", "--min_labeled", "1",
                       "--exclusion_radius", "0", "--lr", "0.01", *extra])


def test_edge_padding_and_retry_bound(tmp_path):
    root = _scene(tmp_path)
    samples = ScrollSamples(root / "scan.h5", root / "train.h5", [[-8, 24, 0]], 16, 1, train=False, block=16)
    image, labels, redraws = samples[0]
    assert torch.all(image[0, :8] == 0) and torch.all(labels[0, :8] == -1)  # z < 0: outside the volume
    assert torch.all(labels[0, 8:, 8:] == -1) and torch.all(image[0, 8:, 8:] == 0)  # y >= 32: outside
    hungry = ScrollSamples(root / "scan.h5", root / "train.h5", [[0, 0, 0]], 16, 4, train=True, block=16, min_labeled=10**6, max_tries=5)
    assert all(hungry[i][2] == 4 for i in range(4))  # gave up after 5 draws, and said so


def test_samples_are_a_function_of_their_index(tmp_path):
    root = _scene(tmp_path)
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
    root = _scene(tmp_path)
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

    root = _scene(tmp_path)
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
    root = _scene(tmp_path)
    _train(root, tmp_path / "run")
    model = load_model(tmp_path / "run" / "last.pth")
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert state["step"] == 4 and {"optimizer", "redraws", "torch_rng", "python_rng"} <= set(state)
    assert model.args.f_maps == 4 and (tmp_path / "run" / "best.pth").exists()
    with open(tmp_path / "run" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [r["step"] for r in rows] == ["2", "4"] and 0 <= float(rows[-1]["valid_f05"]) <= 1
    assert (tmp_path / "run" / "valid_000004.png").exists()
    with pytest.raises(InputError, match="--resume true"):
        _train(root, tmp_path / "run")


def test_origins_outside_the_volume_or_their_labels_are_refused_or_warned_of(tmp_path, capsys):
    root = _scene(tmp_path)
    np.save(root / "outside.npy", np.array([[100, 100, 100], [-64, 0, 0]], np.int32))
    with pytest.raises(InputError, match="outside.npy: none of its 2 block origins holds a labeled voxel"):
        _train(root, tmp_path / "run", "--train_coords", str(root / "outside.npy"))
    np.save(root / "corner.npy", np.array([[0, 24, 0], [100, 0, 0]], np.int32))  # labels lie at y 8..24: none in these patches
    _train(root, tmp_path / "run", "--valid_coords", str(root / "corner.npy"), "--max_steps", "2")
    assert ("warning: " + str(root / "corner.npy") + ": 2 of its 2 validation origins hold no labeled voxel of "
            + str(root / "valid.h5") + " within the 16-voxel patch at them: validation scores nothing") in capsys.readouterr().out


def test_coords_made_for_other_blocks_are_refused_by_name(tmp_path, monkeypatch):
    """pred_find_coords records the block beside its coords: training samples within it, and a mismatch is named."""
    root = _scene(tmp_path)
    (root / "valid.npy.config.json").write_text(json.dumps({"block": 64}))
    with pytest.raises(InputError, match=r"valid.npy was made with --block 64, and validation reads a --patch 16 .*--block 16, "
                                         r"or train with --patch 64"):
        _train(root, tmp_path / "run")
    (root / "valid.npy.config.json").write_text(json.dumps({"block": 16}))
    (root / "train.npy.config.json").write_text(json.dumps({"block": 32}))
    with pytest.raises(InputError, match=r"train.npy was made with --block 32, this run samples blocks of --block 16"):
        _train(root, tmp_path / "run", "--block", "16")
    blocks, samples = [], train.ScrollSamples
    monkeypatch.setattr(train, "ScrollSamples", lambda *args, **kwargs: blocks.append(kwargs["block"]) or samples(*args, **kwargs))
    _train(root, tmp_path / "run", "--max_steps", "2")
    assert blocks[0] == 32  # training samples within the coords' blocks


def test_exclusion_radius_drops_training_blocks(tmp_path):
    root = _scene(tmp_path)
    _train(root, tmp_path / "run", "--exclusion_radius", "20", "--max_steps", "2")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dropped_train_blocks"] == 2  # (0,16,16) and (16,16,0) lie 16 from (16,16,16); (16,0,0) lies 22.6
    with pytest.raises(InputError, match=r"all 4 lie within 40 voxels .*--exclusion_radius, by default 4 x --patch: lower it"):
        _train(root, tmp_path / "run2", "--exclusion_radius", "40", "--max_steps", "2")
    with pytest.raises(InputError, match=r"all 4 lie within 64 voxels"):  # auto: 4 patches of 16
        _train(root, tmp_path / "run3", "--exclusion_radius", "auto", "--max_steps", "2")
    _train(root, tmp_path / "run4", "--exclusion_radius", "auto", "--patch", "6", "--max_steps", "2")  # 24: (0,0,0) lies 27.7 away
    assert json.loads((tmp_path / "run4" / "summary.json").read_text())["dropped_train_blocks"] == 3
    with pytest.raises(InputError, match=r"--exclusion_radius -3: auto, or a number of voxels >= 0"):
        _train(root, tmp_path / "run5", "--exclusion_radius", "-3")


def test_all_unlabeled_batches_are_skipped(tmp_path, monkeypatch):
    """Batches without a labeled voxel change nothing (here every batch: the check that refuses such a run is off)."""
    root = _scene(tmp_path, unlabeled=True)
    with pytest.raises(InputError, match="train.npy: none of its 4 block origins holds a labeled voxel .*training would learn nothing"):
        _train(root, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    monkeypatch.setattr(train_inputs, "check_origins_hold_labels", lambda *args: None)
    torch.manual_seed(0)
    _train(root, tmp_path / "run", "--max_steps", "3", "--valid_every", "3", "--checkpoint_every", "3")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_batches"] == 3
    torch.manual_seed(0)
    initial = train.UNet3D(f_maps=4, num_levels=2).state_dict()
    trained = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(initial[k], trained[k]) for k in initial)


@pytest.mark.parametrize("augment, ink_depth", [("cpu", "fixed"), ("device", "fixed"), ("device", "learned")])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, augment, ink_depth):
    root = _scene(tmp_path)
    augment = (augment, "--ink_depth", ink_depth)
    _train(root, tmp_path / "whole", "--augment", *augment)
    original, calls = train.masked_loss, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third training step, after last.pth at step 2 (validation calls go elsewhere)
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "masked_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(root, tmp_path / "halves", "--valid_every", "100", "--augment", *augment)
    monkeypatch.setattr(train, "masked_loss", original)
    assert torch.load(tmp_path / "halves" / "last.pth", weights_only=True)["step"] == 2
    with pytest.raises(InputError, match="different max_steps"):
        _train(root, tmp_path / "halves", "--resume", "true", "--max_steps", "8", "--augment", *augment)
    _train(root, tmp_path / "halves", "--resume", "true", "--augment", *augment)
    whole = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)["model"]
    halves = torch.load(tmp_path / "halves" / "last.pth", weights_only=True)["model"]
    assert all(torch.allclose(whole[k], halves[k], atol=1e-6) for k in whole)


def test_init_checkpoint_in_published_form(tmp_path):
    root = _scene(tmp_path)
    _train(root, tmp_path / "first", "--max_steps", "2")
    state = torch.load(tmp_path / "first" / "last.pth", weights_only=True)["model"]
    torch.save({"model." + k: v for k, v in state.items()}, tmp_path / "published.pth")
    _train(root, tmp_path / "second", "--max_steps", "1", "--init_checkpoint", str(tmp_path / "published.pth"), "--lr", "0")
    assert all(torch.equal(state[k], v) for k, v in torch.load(tmp_path / "second" / "last.pth", weights_only=True)["model"].items())
    with pytest.raises(InputError, match="wrong shape"):
        _train(root, tmp_path / "third", "--f_maps", "8", "--init_checkpoint", str(tmp_path / "published.pth"))


def test_overfitting_a_fixed_batch():
    torch.manual_seed(0)
    model = train.UNet3D(f_maps=4, num_levels=2)
    images = torch.rand(2, 1, 16, 16, 16)
    labels = (images > 0.5).float()
    labels[:, :, :8] = -1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = masked_loss(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


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

    root = _scene(tmp_path)
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


def _rows(path):
    with open(path, newline="") as file:
        return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(file)]


def test_resume_rewrites_the_metrics_the_checkpoint_does_not_hold(tmp_path, monkeypatch):
    root = _scene(tmp_path)
    flags = ("--valid_every", "1", "--checkpoint_every", "2")
    _train(root, tmp_path / "whole", *flags)
    original, calls = train.masked_loss, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # training step 4: last.pth is at step 2
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "masked_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(root, tmp_path / "halves", *flags)
    monkeypatch.setattr(train, "masked_loss", original)
    assert [row["step"] for row in _rows(tmp_path / "halves" / "metrics.csv")] == ["1", "2", "3"]
    _train(root, tmp_path / "halves", *flags, "--resume", "true")
    whole, halves = _rows(tmp_path / "whole" / "metrics.csv"), _rows(tmp_path / "halves" / "metrics.csv")
    assert [row["step"] for row in halves] == ["1", "2", "3", "4"]
    assert halves == whole  # the redraws counter and the losses continue, no row twice


def test_checkpoint_precedes_validation_and_resume_redoes_an_interrupted_one(tmp_path, monkeypatch):
    root = _scene(tmp_path)
    _train(root, tmp_path / "whole")
    original = train.validate
    monkeypatch.setattr(train, "validate", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _train(root, tmp_path / "halves")
    monkeypatch.setattr(train, "validate", original)
    assert torch.load(tmp_path / "halves" / "last.pth", weights_only=True)["step"] == 2
    _train(root, tmp_path / "halves", "--resume", "true")
    whole, halves = _rows(tmp_path / "whole" / "metrics.csv"), _rows(tmp_path / "halves" / "metrics.csv")
    assert [row["step"] for row in halves] == ["2", "4"] and halves[0]["train_loss"] == "nan"
    assert [{**row, "train_loss": ""} for row in halves] == [{**row, "train_loss": ""} for row in whole]


@pytest.mark.parametrize("flags", [(), ("--resume", "true")])
def test_an_earlier_runs_outputs_without_last_checkpoint_are_kept_unless_overwritten(tmp_path, flags):
    root = _scene(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("step,lr\n99,0.1\n")
    (tmp_path / "run" / "best.pth").write_bytes(b"an earlier run's")
    with pytest.raises(InputError, match="holds an earlier run's best.pth, metrics.csv without its last.pth; pass --overwrite true"):
        _train(root, tmp_path / "run", *flags)
    assert (tmp_path / "run" / "best.pth").read_bytes() == b"an earlier run's"
    _train(root, tmp_path / "run", *flags, "--overwrite", "true")
    assert [row["step"] for row in _rows(tmp_path / "run" / "metrics.csv")] == ["2", "4"]


def test_resume_refuses_other_data_unless_allowed(tmp_path):
    root = _scene(tmp_path)
    _train(root, tmp_path / "run", "--max_steps", "2")
    shutil.copy(root / "train.npy", root / "other.npy")
    moved = ("--resume", "true", "--max_steps", "2", "--train_coords", str(root / "other.npy"))
    with pytest.raises(InputError, match="trained on other data \\(train_coords=.*train.npy\\).*--allow_new_data true"):
        _train(root, tmp_path / "run", *moved)
    _train(root, tmp_path / "run", *moved, "--allow_new_data", "true")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_coords"] == str(root / "other.npy")


def test_the_validation_picture_says_what_its_numbers_are(tmp_path, monkeypatch):
    titles = []
    original = train.validation_picture
    monkeypatch.setattr(train, "validation_picture", lambda *parts, title: titles.append(title) or original(*parts, title=title))
    _train(_scene(tmp_path), tmp_path / "run")
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert titles == [f"step {row['step']}: model F0.5 {float(row['valid_f05']):.3f}, best intensity threshold F0.5 "
                      f"{float(row['valid_threshold_baseline_f05']):.3f}" for row in rows]


def test_resume_refuses_data_files_made_again_under_the_same_name(tmp_path):
    root = _scene(tmp_path)
    _train(root, tmp_path / "run", "--max_steps", "2")
    np.save(root / "train.npy", np.array([[0, 0, 0], [16, 16, 0]], np.int32))  # the coords made again, fewer blocks
    with pytest.raises(InputError, match="train.npy changed since the run began \\(other size or checksum: made again\\?\\); "
                                         "pass --allow_new_data true"):
        _train(root, tmp_path / "run", "--max_steps", "2", "--resume", "true")
    _train(root, tmp_path / "run", "--max_steps", "2", "--resume", "true", "--allow_new_data", "true")


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01garbage", "cannot be read as a checkpoint"),
    ("truncated", "cannot be read as a checkpoint"),
    ("bare", "not a train.py checkpoint to resume from \\(no model, config"),
])
def test_a_bad_last_checkpoint_gets_a_named_error(tmp_path, content, message):
    root = _scene(tmp_path)
    _train(root, tmp_path / "run", "--max_steps", "2")
    last = tmp_path / "run" / "last.pth"
    if content == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif content == "bare":
        torch.save(torch.load(last, weights_only=True)["model"], last)
    else:
        last.write_bytes(content)
    with pytest.raises(InputError, match=message):
        _train(root, tmp_path / "run", "--resume", "true", "--max_steps", "2")


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
    root = _scene(tmp_path)
    extra = breaks(root) or []
    with pytest.raises(InputError, match=message):
        _train(root, tmp_path / "run", *extra)
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
    root = _scene(tmp_path)
    extra = breaks(root) or []
    with pytest.raises(InputError, match=message):
        _train(root, tmp_path / "run", *extra)
    assert not (tmp_path / "run").exists()
    if not extra:  # the same files train with the fixed ink range
        _train(root, tmp_path / "run", "--ink_depth", "fixed", "--max_steps", "2")


def test_learned_validation_scores_the_columns(tmp_path):
    """With columns, validation scores each counted column of the validation blocks once, by its maximum probability."""
    root = _scene(tmp_path)
    np.save(root / "valid.npy", np.array([[16, 8, 16]], np.int32))
    _train(root, tmp_path / "run", "--max_steps", "2", "--valid_every", "2")
    row = _rows(tmp_path / "run" / "metrics.csv")[-1]
    # the validation block (16..31, 8..23, 16..31) holds the bands (y 12..20) of the columns with z, x in 16..31
    assert int(row["valid_voxels"]) == 16 * 16 and 0 <= float(row["valid_f05"]) <= 1
    np.save(root / "valid.npy", np.array([[16, 16, 16]], np.int32))
    _train(root, tmp_path / "run2", "--max_steps", "2", "--valid_every", "2")
    assert int(_rows(tmp_path / "run2" / "metrics.csv")[-1]["valid_voxels"]) == 0  # y 16..31 cuts every band


HOST_READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu", "nonzero", "masked_select",
              "unique", "linalg_inv", "repeat_interleave"}


class HostReads(torch.overrides.TorchFunctionMode):
    """Refuses what makes the host wait for a device's result: reading a value, or an op whose output size or
    error check depends on values (boolean indexing, nonzero, ...)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        indices = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else ()
        boolean = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices if isinstance(indices, tuple) else (indices,)))
        if name in HOST_READS or boolean:
            raise AssertionError(f"{name}{' with a boolean index' if boolean else ''} reads a device value on the host")
        return func(*args, **(kwargs or {}))


def _step_setup(device: str, ema_decay: float = 0.5):
    from types import SimpleNamespace
    from ink3d.columns import FIELDS, PAD
    torch.manual_seed(0)
    model = train.UNet3D(in_channels=1, out_channels=1, f_maps=4, num_levels=2, num_groups=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2, fused=True)
    scaler = torch.amp.GradScaler(device, enabled=False)
    config = SimpleNamespace(dice_weight=0.5, background_weight=0.3, label_smoothing=0.1, column_weight=1.0, pool_sharpness=2.0,
                             grad_clip=1.0)
    images = torch.rand(2, 1, 16, 16, 16, device=device)
    labels = torch.full((2, 1, 16, 16, 16), -1.0, device=device)
    labels[:, :, 6:10, 6:10, 6:10] = (torch.rand(2, 1, 4, 4, 4, device=device) > 0.5).float()
    labels[:, :, :2] = BACKGROUND
    columns = torch.full((2, 5, FIELDS), float(PAD), device=device)
    columns[:, :3, :3] = torch.tensor([8.0, 7.5, 8.2], device=device)
    columns[:, :3, 3:6] = torch.tensor([1.0, 0.0, 0.0], device=device)
    columns[:, :3, 6] = torch.tensor([1.0, 0.0, 1.0], device=device)
    columns[:, 1, 7:9] = torch.tensor([-1.0, 0.5], device=device)  # a face window
    matrices, shifts = torch.eye(3, device=device).repeat(2, 1, 1), torch.zeros(2, 3, device=device)
    return model, optimizer, scaler, EMA(model, ema_decay), config, images, labels, columns, matrices, shifts


def _state(model, optimizer, ema):
    return ([p.detach().clone() for p in model.parameters()], [v.clone() for s in optimizer.state.values() for v in s.values()],
            [v.clone() for v in ema.state_dict().values()])


def test_train_step_reads_nothing_on_the_host_and_skips_on_the_device():
    model, optimizer, scaler, ema, config, images, labels, columns, matrices, shifts = _step_setup("cpu")
    with HostReads():
        learned = train.train_step(model, optimizer, scaler, ema, images, labels, columns, matrices, shifts, config, 1.0, None, 1)
    loss, skipped = learned.tolist()
    assert skipped == 0 and math.isfinite(loss) and loss > 0
    before = _state(model, optimizer, ema)
    nothing = torch.full_like(labels, -1.0)
    nothing[:, :, :2] = BACKGROUND  # background voxels alone are nothing to learn from
    padding = torch.full_like(columns, float("nan"))
    with HostReads():
        result = train.train_step(model, optimizer, scaler, ema, images, nothing, padding, matrices, shifts, config, 1.0, None, 1)
    assert result[1].item() == 1
    after = _state(model, optimizer, ema)
    assert all(torch.equal(a, b) for part_a, part_b in zip(before, after) for a, b in zip(part_a, part_b))
    # the next labeled batch learns again
    train.train_step(model, optimizer, scaler, ema, images, labels, columns, matrices, shifts, config, 1.0, None, 1)
    assert not torch.equal(next(model.parameters()), before[0][0])


def test_masked_losses_equal_the_selected_voxels_and_columns():
    from ink3d.columns import column_loss, face_bags, sample_columns
    _, _, _, _, config, images, labels, columns, matrices, shifts = _step_setup("cpu")
    logits = torch.randn_like(images) * 3
    loss, count = masked_loss(logits, labels, dice_weight=0.5)
    labeled = labels >= 0
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[labeled], labels[labeled])
    probabilities = torch.sigmoid(logits[labeled])
    dice = 1 - (2 * (probabilities * labels[labeled]).sum() + 1) / (probabilities.sum() + labels[labeled].sum() + 1)
    assert count.item() == int(labeled.sum()) and loss.item() == pytest.approx((bce + 0.5 * dice).item(), rel=1e-5)
    samples, counted = sample_columns(logits, columns, 1.0, matrices, shifts)
    masked = column_loss(samples, columns[..., 6], 2.0, 0.5, face_bags(columns, 1.0), counted)
    selected = column_loss(samples[counted], columns[..., 6][counted], 2.0, 0.5, face_bags(columns[counted], 1.0))
    assert counted.sum() == 6 and masked.item() == pytest.approx(selected.item(), rel=1e-6)
    assert column_loss(samples, columns[..., 6], 2.0, 0.5, face_bags(columns, 1.0), torch.zeros_like(counted)).item() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the check is CUDA's synchronisation debug mode")
def test_train_step_never_synchronises_on_cuda():
    model, optimizer, scaler, ema, config, images, labels, columns, matrices, shifts = _step_setup("cuda")
    train.train_step(model, optimizer, scaler, ema, images, labels, columns, matrices, shifts, config, 1.0, torch.bfloat16, 1)
    torch.cuda.synchronize()  # the first step's lazy initialisations may synchronise
    nothing = torch.full_like(labels, -1.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch_labels in (labels, nothing, labels):
            images_, labels_ = train.warp(images, batch_labels, matrices, shifts, 16)
            train.train_step(model, optimizer, scaler, ema, images_, labels_, columns, matrices, shifts, config, 1.0,
                             torch.bfloat16, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
