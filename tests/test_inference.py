import itertools
import json
import platform
import re
import signal
import sys
import textwrap
import time
import warnings
import weakref

import h5py
import numpy as np
import pytest
import torch
from tqdm import tqdm

import inference
from stage_process import StageProcess, run_code, run_stage
from ink3d import InputError, blocks, volume
from ink3d.files import WriteError, checksum, partial_path
from ink3d.intensity import air_level, scan_histogram
from ink3d.pyramid import write_ome_zarr
from ink3d import sliding_window
from ink3d.sliding_window import importance_map, plan_blocks, window_starts
from models import UNet3D, save_checkpoint

monai_inferers = pytest.importorskip("monai.inferers", reason="MONAI is the reference sliding-window implementation")
from monai.data.utils import compute_importance_map  # noqa: E402

PATCH = 16


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    model = UNet3D(f_maps=4, num_levels=2)
    with torch.no_grad():  # a livelier model than the initial one, so blending differences would show
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("model") / "model.pth"
    save_checkpoint(path, model, model.args, {}, step=0)
    return path


def _scan(path, values):
    with h5py.File(path, "w") as file:
        volume.create_volume(file, volume.SCAN, values.shape, np.uint8, chunk=16)[:] = values
    return path


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    values = np.random.default_rng(0).integers(0, 256, (40, 35, 52)).astype(np.uint8)
    return _scan(tmp_path_factory.mktemp("scan") / "scan.h5", values), values


def _infer(scan_path, model_path, out, *extra):
    inference.main(["--volume", str(scan_path), "--checkpoint", str(model_path), "--out", str(out), "--patch", str(PATCH),
                    "--batch_size", "3", "--macro_block", "16", "--air_level", "none", "--channels_last", "false", *extra])
    with h5py.File(out) as file:
        return file[volume.PREDICTIONS][:], dict(file[volume.PREDICTIONS].attrs)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_importance_map_equals_monai(blend):
    ours = importance_map(24, blend)
    theirs = compute_importance_map((24, 24, 24), mode=blend, sigma_scale=0.125).numpy()
    assert np.allclose(ours, theirs, rtol=1e-6, atol=0) and ours.min() >= 1e-3


@pytest.mark.parametrize("size, expected", [(100, [0, 16, 32, 48, 64, 68]), (96, [0, 16, 32, 48, 64]), (32, [0]), (20, [0])])
def test_window_grid(size, expected):
    assert window_starts(0, size, 32, 16) == expected


def test_blocks_cover_the_region_once_and_read_every_window_they_need():
    region = (slice(3, 40), slice(0, 35), slice(10, 52))
    blocks = plan_blocks(region, region, 16, 8, 16)
    hits = np.zeros((40, 35, 52), int)
    for block in blocks:
        hits[block.output] += 1
        for window in block.windows:  # every window lies inside the block's input box
            assert np.all(np.array(window) >= block.input_origin)
            assert np.all(np.array(window) + 16 <= block.input_origin + block.input_shape)
    assert np.all(hits[region] == 1) and hits.sum() == np.prod([37, 35, 42])


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_parity_with_monai_sliding_window_inference(scan, model_path, tmp_path, blend):
    scan_path, values = scan
    ours, attrs = _infer(scan_path, model_path, tmp_path / "pred.h5", "--blend", blend)
    model = torch.load(model_path, weights_only=True)
    net = UNet3D(**model["model_args"]).eval()
    net.load_state_dict(model["model"])
    x = torch.from_numpy(values)[None, None].float() / 255
    with torch.no_grad():
        theirs = monai_inferers.sliding_window_inference(x, (PATCH,) * 3, 3, lambda w: torch.sigmoid(net(w)), overlap=0.5,
                                                         mode=blend, sigma_scale=0.125)
    theirs = np.rint(theirs[0, 0].numpy() * 255)
    assert np.abs(ours.astype(int) - theirs).max() <= 2
    assert attrs["blend"] == blend and attrs["patch"] == PATCH and attrs["complete"]


def test_the_checkpoints_input_normalization_and_ema_weights_are_applied(scan, model_path, tmp_path):
    scan_path, values = scan
    state = torch.load(model_path, weights_only=True)
    net = UNet3D(**state["model_args"]).eval()
    net.load_state_dict(state["model"])
    raw = {k: v.clone() for k, v in state["model"].items()}
    ema = {k: v * 0.9 for k, v in state["model"].items()}  # other weights, stored as the moving average
    save_checkpoint(tmp_path / "windowed.pth", net, state["model_args"], {"normalization": [50.0, 150.0]}, step=1, ema=ema)
    ours, attrs = _infer(scan_path, tmp_path / "windowed.pth", tmp_path / "pred.h5")
    raw_ours, _ = _infer(scan_path, tmp_path / "windowed.pth", tmp_path / "raw.h5", "--weights", "raw")
    x = torch.from_numpy(values)[None, None].float()
    for weights, result in ((ema, ours), (raw, raw_ours)):
        net.load_state_dict(weights)
        with torch.no_grad():
            theirs = monai_inferers.sliding_window_inference(((x - 50) / 100).clamp(0, 1), (PATCH,) * 3, 3,
                                                             lambda w: torch.sigmoid(net(w)), overlap=0.5, mode="gaussian", sigma_scale=0.125)
        assert np.abs(result.astype(int) - np.rint(theirs[0, 0].numpy() * 255)).max() <= 2
    assert np.abs(ours.astype(int) - raw_ours).max() > 10
    assert json.loads(attrs["plan"])["normalization"] == [50.0, 150.0]


@pytest.mark.filterwarnings("ignore:--batch_size .* batches run")  # small blocks on purpose: their batches run part empty
@pytest.mark.parametrize("channels_last", ["false", "true"])  # true: the CPU default, whose kernels depend on the batch size
def test_macro_blocks_equal_a_single_pass(scan, model_path, full_runs, tmp_path, channels_last):
    scan_path, _ = scan
    blocks, _ = _infer(scan_path, model_path, tmp_path / "blocks.h5", "--macro_block", "8", "--channels_last", channels_last)
    assert np.array_equal(blocks, full_runs(channels_last))


def test_weights_summed_a_few_planes_at_a_time_equal_one_sum(scan, model_path, full_runs, tmp_path, monkeypatch):
    scan_path, _ = scan
    whole = full_runs("false")
    monkeypatch.setattr(sliding_window, "SLAB_VOXELS", 35 * 52 * 3)  # 3 planes of the one 40 x 35 x 52 block
    slabs, _ = _infer(scan_path, model_path, tmp_path / "slabs.h5", "--macro_block", "64")
    assert np.array_equal(whole, slabs)


@pytest.fixture(scope="module")
def full_runs(scan, model_path, tmp_path_factory):
    """The whole scan's prediction in a single pass (one macro-block), per --channels_last, made once for the tests
    that compare against it (blocks of any size give the same: test_macro_blocks_equal_a_single_pass)."""
    made = {}

    def full(channels_last: str) -> np.ndarray:
        if channels_last not in made:
            out = tmp_path_factory.mktemp("full") / "full.h5"
            made[channels_last] = _infer(scan[0], model_path, out, "--channels_last", channels_last, "--macro_block", "64")[0]
        return made[channels_last]
    return full


@pytest.mark.parametrize("roi, channels_last", [("8:32,16:35,8:40", "false"), ("5:29,3:30,7:45", "false"),
                                                ("13:14,0:35,51:52", "false"), ("5:29,3:30,7:45", "true"), ("13:14,0:35,51:52", "true")])
def test_an_roi_is_a_crop_of_the_full_run(scan, model_path, full_runs, tmp_path, roi, channels_last):
    scan_path, _ = scan
    full = full_runs(channels_last)
    result, attrs = _infer(scan_path, model_path, tmp_path / "roi.h5", "--roi", roi, "--channels_last", channels_last)
    region = blocks.parse_roi(roi, full.shape)
    assert np.array_equal(result[region], full[region])  # the window grid is the volume's, wherever the region lies
    outside = np.ones(result.shape, bool)
    outside[region] = False
    assert not result[outside].any()
    assert json.loads(attrs["roi"]) == [[s.start, s.stop] for s in region]


def _kill_at_block(monkeypatch, number):
    original = inference.WindowPredictor.predict
    calls = []

    def killed(self, *args):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(inference.WindowPredictor, "predict", killed)
    return lambda: monkeypatch.setattr(inference.WindowPredictor, "predict", original)


def _interrupted(scan_path, model_path, tmp_path, monkeypatch, full_runs) -> np.ndarray:
    """A run stopped after its 4th block into tmp_path/pred.h5.partial; returns the uninterrupted run's prediction."""
    reference = full_runs("false")
    restore = _kill_at_block(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        _infer(scan_path, model_path, tmp_path / "pred.h5")
    restore()
    return reference


@pytest.mark.filterwarnings("ignore:--batch_size .* batches run")  # small blocks on purpose: their batches run part empty
def test_resume_after_a_kill_equals_an_uninterrupted_run(scan, model_path, full_runs, tmp_path, monkeypatch):
    scan_path, _ = scan
    reference = _interrupted(scan_path, model_path, tmp_path, monkeypatch, full_runs)
    assert not (tmp_path / "pred.h5").exists()  # the output name only ever holds a complete prediction
    with h5py.File(tmp_path / "pred.h5.partial") as file:
        assert file[volume.FINISHED_BLOCKS][:].sum() == 4 and not file[volume.PREDICTIONS].attrs["complete"]
    with pytest.raises(InputError, match="interrupted run; pass --resume true"):
        _infer(scan_path, model_path, tmp_path / "pred.h5")
    with pytest.raises(InputError, match="different patch"):
        _infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true", "--patch", "8")
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    save_checkpoint(other, UNet3D(f_maps=4, num_levels=2), UNet3D(f_maps=4, num_levels=2).args, {}, step=0)
    with pytest.raises(InputError, match="different weights_sha256"):  # two models' blocks must not mix
        _infer(scan_path, other, tmp_path / "pred.h5", "--resume", "true")
    moved = tmp_path / "moved.pth"  # the same weights under another name may continue the run
    moved.write_bytes(model_path.read_bytes())
    resumed, attrs = _infer(scan_path, moved, tmp_path / "pred.h5", "--resume", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]
    # complete now: a resume with the same plan has nothing to do, one with another plan is refused as before
    _infer(scan_path, moved, tmp_path / "pred.h5", "--resume", "true")
    with pytest.raises(InputError, match="pred.h5: cannot resume with different weights_sha256"):
        _infer(scan_path, other, tmp_path / "pred.h5", "--resume", "true")
    assert np.array_equal(_infer(scan_path, moved, tmp_path / "pred.h5", "--resume", "true")[0], reference)
    assert not (tmp_path / "pred.h5.partial").exists()


def test_a_damaged_finished_block_is_found_and_redone(scan, model_path, full_runs, tmp_path, monkeypatch, capsys):
    scan_path, _ = scan
    reference = _interrupted(scan_path, model_path, tmp_path, monkeypatch, full_runs)
    with h5py.File(tmp_path / "pred.h5.partial", "a") as file:  # finished: the first 4 blocks; one voxel of block 1 lost
        file[volume.PREDICTIONS][0, 0, 20] ^= 0xFF
    resumed, _ = _infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true")
    assert "resuming: 3 finished blocks verified, 1 damaged ones redone" in capsys.readouterr().out
    assert np.array_equal(resumed, reference)


def test_a_failed_write_stops_cleanly_and_resume_completes_the_run(scan, model_path, full_runs, tmp_path, monkeypatch):
    scan_path, _ = scan
    reference = full_runs("false")
    original, writes = inference.hdf5_writer, []

    def disk_full(file):  # the sixth slab written finds the disk full
        writer = original(file)

        def slab(block, planes, values):
            writes.append(1)
            with inference.writing(file.filename):
                if len(writes) == 6:
                    raise OSError(28, "No space left on device")
            writer.slab(block, planes, values)
        return inference.BlockWriter(slab, writer.finish, writer.align)

    monkeypatch.setattr(inference, "hdf5_writer", disk_full)
    with pytest.raises(WriteError, match=r"pred\.h5\.partial: writing failed .*No space left on device.*--resume true"):
        _infer(scan_path, model_path, tmp_path / "pred.h5")
    monkeypatch.setattr(inference, "hdf5_writer", original)
    with h5py.File(tmp_path / "pred.h5.partial") as file:  # what was finished before is readable and recorded
        finished = file[volume.FINISHED_BLOCKS][:]
        assert finished.sum() == 5 and np.array_equal(file[volume.PREDICTIONS][0:16, 0:16, 0:16], reference[0:16, 0:16, 0:16])
    resumed, attrs = _infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]


@pytest.mark.filterwarnings("ignore:--batch_size .* batches run")  # small blocks on purpose: their batches run part empty
def test_a_full_disk_stops_cleanly_and_resume_completes_the_run(model_path, tmp_path):
    values = np.random.default_rng(4).integers(0, 256, (32, 96, 96)).astype(np.uint8)  # a 364 kB prediction file
    scan_path = _scan(tmp_path / "scan.h5", values)
    reference, _ = _infer(scan_path, model_path, tmp_path / "reference.h5", "--macro_block", "32")
    argv = ["--volume", str(scan_path), "--checkpoint", str(model_path), "--out", str(tmp_path / "pred.h5"), "--patch", str(PATCH),
            "--macro_block", "32", "--air_level", "none", "--channels_last", "false"]
    for file_bytes in (100_000, 200_000):  # the disk fills, space is freed, it fills again
        run = run_stage("inference.py", argv + (["--resume", "true"] if file_bytes > 100_000 else []), file_bytes=file_bytes)
        assert run.returncode == 2 and "pred.h5.partial: writing failed (File too large)" in run.stderr, run.stderr[-2000:]
    resumed, attrs = _infer(scan_path, model_path, tmp_path / "pred.h5", "--macro_block", "32", "--resume", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "-1"], "--batch_size -1: must be > 0"),
    (["--batch_size", "0"], "--batch_size 0: must be > 0"),
    (["--macro_block", "0"], "--macro_block 0: must be > 0"),
    (["--overlap", "1"], "--overlap 1.0: must be in \\[0, 1\\)"),
    (["--air_level", "-5"], "--air_level '-5': choose auto, otsu, none or a number in 0..255"),
    (["--air_level", "otsu"], "--air_level 'otsu': expected a number in 0..255, auto, none"),
])
def test_bad_settings_are_refused_before_any_output(scan, model_path, tmp_path, flags, message):
    scan_path, _ = scan
    with pytest.raises(InputError, match=message):
        _infer(scan_path, model_path, tmp_path / "pred.h5", *flags)
    assert list(tmp_path.iterdir()) == []


def test_an_unfinished_scan_volume_is_refused(model_path, tmp_path):
    scan_path = _scan(tmp_path / "scan.h5", np.ones((16, 16, 16), np.uint8))
    with h5py.File(scan_path, "a") as file:
        file[volume.SCAN].attrs["complete"] = False  # as volume_to_hdf leaves it until its last slab
    with pytest.raises(InputError, match="scan.h5: dataset 'scan_volume' is not complete"):
        _infer(scan_path, model_path, tmp_path / "pred.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.h5"]


@pytest.mark.filterwarnings("ignore:--batch_size .* batches run")  # small blocks on purpose: many moments to stop at
def test_kill_9_at_any_moment_then_resume_equals_the_uninterrupted_run(scan, model_path, full_runs, tmp_path):
    scan_path, _ = scan
    reference = full_runs("false")
    argv = ["--volume", str(scan_path), "--checkpoint", str(model_path), "--out", str(tmp_path / "pred.h5"),
            "--patch", str(PATCH), "--batch_size", "3", "--macro_block", "8", "--air_level", "none", "--channels_last", "false"]
    partial = tmp_path / "pred.h5.partial"
    for delay in (0.0, 0.3, 0.6):  # seconds after the run starts writing: at its start, then further into the blocks
        written = partial.stat().st_mtime_ns if partial.exists() else None
        process = StageProcess("inference.py", [*argv, "--resume", "true"])
        while (partial.stat().st_mtime_ns if partial.exists() else None) == written and process.poll() is None:
            time.sleep(0.005)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "pred.h5").exists()
    try:
        resumed, attrs = _infer(scan_path, model_path, tmp_path / "pred.h5", "--macro_block", "8", "--resume", "true")
    except InputError as error:  # a kill inside HDF5's metadata flush can tear the file: named, never silently wrong
        assert "cannot be opened to resume" in str(error) or "cannot be repaired" in str(error)
        resumed, attrs = _infer(scan_path, model_path, tmp_path / "pred.h5", "--macro_block", "8", "--overwrite", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]


def test_a_damaged_scan_chunk_is_named_as_a_read_error(model_path, tmp_path):
    values = (np.arange(32**3).reshape(32, 32, 32) // 97).astype(np.uint8)  # compressible: chunks go through blosc
    scan_path = _scan(tmp_path / "scan.h5", values)
    with h5py.File(scan_path) as file:
        info = file[volume.SCAN].id.get_chunk_info_by_coord((16, 0, 0))
    with open(scan_path, "r+b") as raw:
        raw.seek(info.byte_offset)
        raw.write(bytes(info.size))
    with pytest.raises(InputError, match=r"reading .*scan.h5\[scan_volume\] at \[16, 0, 0\]\.\.\[24, 24, 24\] failed .*damaged"):
        _infer(scan_path, model_path, tmp_path / "pred.h5")


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(scan, model_path, tmp_path):
    scan_path, _ = scan
    out = tmp_path / "pred.h5"
    old, _ = _infer(scan_path, model_path, out, "--roi", "0:16,0:16,0:16")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(InputError, match="garbage.pth"):
        _infer(scan_path, garbage, out, "--overwrite", "true")
    with h5py.File(out) as file:
        assert np.array_equal(file[volume.PREDICTIONS][:], old)
    assert not partial_path(out).exists()


def test_an_ome_zarr_scan_predicts_what_its_hdf5_copy_does(scan, model_path, full_runs, tmp_path):
    scan_path, values = scan
    write_ome_zarr(tmp_path / "scan.zarr", values, levels=2, chunk=16)
    from_hdf5 = full_runs("false")
    from_zarr, _ = _infer(tmp_path / "scan.zarr", model_path, tmp_path / "b.h5")
    assert np.array_equal(from_zarr, from_hdf5)
    coarse, attrs = _infer(tmp_path / "scan.zarr", model_path, tmp_path / "c.h5", "--level", "1")
    assert coarse.shape == (20, 18, 26) and json.loads(attrs["volume_shape"]) == [20, 18, 26]


@pytest.mark.parametrize("value, device, expected", [("auto", "cuda", True), ("auto", "cpu", False), ("true", "cpu", True),
                                                     ("False", "cuda", False)])
def test_compile_switch_takes_the_measured_best_per_device(value, device, expected):
    assert inference.switch(value, "--compile", on_cuda=True, on_cpu=False, device=torch.device(device)) is expected


def test_a_bad_switch_is_named():
    with pytest.raises(InputError, match="--channels_last 'sometimes': choose auto, true or false"):
        inference.switch("sometimes", "--channels_last", on_cuda=False, on_cpu=True, device=torch.device("cpu"))


def test_a_run_reports_where_its_time_went(scan, model_path, tmp_path, capsys):
    scan_path, _ = scan
    _infer(scan_path, model_path, tmp_path / "pred.h5")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    busy, total, read_wait, write_wait = (float(v) for v in re.fullmatch(
        r"model busy (\d+)% of ([\d.]+) s; waited ([\d.]+) s for reading, ([\d.]+) s for writing", line).groups())
    assert 0 < busy <= 100 and read_wait + write_wait <= total * (1 - busy / 100) + 0.1


@pytest.mark.parametrize("ahead", [0, 1])
def test_slabs_are_read_as_asked_and_every_block_written_slab_by_slab(ahead, monkeypatch):
    """The reader reads each block's input in the slabs its rows of windows need (input_slabs), in turn as the model
    asks for them: exactly `ahead` slabs are read beyond those the model took (one on a GPU, none on the CPU). Every
    slab the model hands on reaches the writer, in order, once the one before it is written, and each block is then
    recorded finished with the CRC-32 of its slabs' bytes."""
    blocks = plan_blocks((slice(0, 40),) * 3, (slice(0, 40),) * 3, PATCH, PATCH // 2, 16)
    reads, written, read_ahead, handed, unwritten = [], [], [], [], []
    read_crop = volume.read_crop

    def counted(dataset, origin, shape, fill=0):
        reads.append((tuple(origin), tuple(shape)))
        time.sleep(0.002)  # a reader left unchecked would run ahead meanwhile
        return read_crop(dataset, origin, shape, fill)

    class Predictor:
        patch = PATCH

        def predict(self, slabs, origin, windows, output, emit, align):
            for slab in slabs:
                taken = len(read_ahead) + 1
                deadline = time.monotonic() + 30  # left as soon as the read begins
                while len(reads) < min(taken + ahead, len(expected)) and time.monotonic() < deadline:
                    time.sleep(0.001)  # the slabs ahead are being read, however busy the machine
                time.sleep(0.005)
                read_ahead.append(len(reads) - taken)
                assert slab.dtype == torch.uint8 and slab.shape[1:] == tuple(int(n) for n in block_of[tuple(origin)].input_shape[1:])
            values = values_of(output)
            middle = (output[0].start + output[0].stop) // 2
            for planes in (slice(output[0].start, middle), slice(middle, output[0].stop)):
                emit(planes, values[planes.start - output[0].start:planes.stop - output[0].start])
                handed.append(1)
                unwritten.append(len(handed) - sum(1 for item in written if item[1] != "finished"))
            return 1

    def write_slowly(block, planes, values):
        time.sleep(0.003)  # an unchecked model would hand on slab after slab meanwhile
        written.append((block.index, planes, values.copy()))

    def values_of(output):
        return np.random.default_rng(output[0].start * 100 + output[2].start).integers(0, 256, [s.stop - s.start for s in output], np.uint8)

    block_of = {tuple(block.input_origin): block for block in blocks}
    expected = [(tuple(block.input_origin + np.array([start, 0, 0])), (stop - start, *block.input_shape[1:]))
                for block in blocks for start, stop in sliding_window.input_slabs(block, PATCH)]
    monkeypatch.setattr(inference.volume, "read_crop", counted)
    writer = inference.BlockWriter(write_slowly, lambda block, crc: written.append((block.index, "finished", crc)), align=1)
    skipped = inference.predict_blocks(np.zeros((40, 40, 40), np.uint8), writer, blocks, Predictor(), torch.device("cpu"),
                                       tqdm(disable=True), inference.Timing(), read_ahead=ahead)
    assert skipped == len(blocks) == 27 and reads == expected and len(expected) > len(blocks)
    assert max(read_ahead) == ahead and max(unwritten) == 1  # the slab just handed on: the one before it is written
    for n, block in enumerate(blocks):
        first, second, record = written[3 * n:3 * n + 3]
        assert first[0] == second[0] == record[0] == block.index and record[1] == "finished"
        assert first[1].start == block.output[0].start and first[1].stop == second[1].start and second[1].stop == block.output[0].stop
        values = np.concatenate([first[2], second[2]])
        assert np.array_equal(values, values_of(block.output)) and record[2] == checksum(values)


def test_cpu_inference_keeps_freed_memory_from_its_second_batch_on(scan, model_path, tmp_path, monkeypatch):
    """The first batch runs under the system's memory policy (what the model's first run keeps for good settles before
    any activation); then the process keeps freed memory, once, before the second batch's forward."""
    scan_path, _ = scan
    events = []
    monkeypatch.setattr(sliding_window, "reuse_freed_memory", lambda: events.append("keep"))
    forward = UNet3D.forward
    monkeypatch.setattr(UNet3D, "forward", lambda self, x: events.append("forward") or forward(self, x))
    _infer(scan_path, model_path, tmp_path / "pred.h5", "--device", "cpu")
    assert events[:3] == ["forward", "keep", "forward"] and events.count("keep") == 1 and events.count("forward") > 3


def _stream_one_block(box, predictor, align, monkeypatch):
    """Run `predictor` over the whole of `box` as one block streamed in its input slabs: (windows, slabs, windows
    skipped, the emitted (planes, values), the input planes held after each read)."""
    windows = list(itertools.product(*(window_starts(0, size, PATCH, PATCH // 2) for size in box.shape)))
    output = tuple(slice(0, size) for size in box.shape)
    slabs = sliding_window.input_slabs(sliding_window.Block(0, output, np.zeros(3, np.int64), box.shape, windows), PATCH)
    held, need = [], sliding_window._Planes.need
    monkeypatch.setattr(sliding_window._Planes, "need", lambda self, stop: need(self, stop) or held.append(self.stop - self.start))
    emitted = []
    skipped = predictor.predict((box[start:stop] for start, stop in slabs), np.zeros(3, np.int64), windows, output,
                                lambda planes, values: emitted.append((planes, values)), align)
    return windows, slabs, skipped, emitted, held


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_a_block_streamed_in_slabs_of_planes_equals_a_plain_sum_over_the_whole_block(batch_size, monkeypatch):
    """A block deeper than a window and a stride takes its input in slabs of planes, keeps its sums in a ring of planes
    and hands on its finished planes in runs that end on whole chunks: the values equal a plain loop that sums every
    window over the whole block, and it holds no more than a window's depth of input planes."""
    box = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (48, 20, 20)).astype(np.uint8))
    predictor = inference.WindowPredictor(torch.nn.Identity(), PATCH, "gaussian", batch_size, "cpu", stride=PATCH // 2)
    windows, slabs, skipped, emitted, held = _stream_one_block(box, predictor, 10, monkeypatch)
    weights = torch.from_numpy(importance_map(PATCH, "gaussian"))
    numerator, denominator = torch.zeros(box.shape), torch.zeros(box.shape)
    for window in windows:
        cell = tuple(slice(start, start + PATCH) for start in window)
        probabilities = torch.sigmoid(predictor.normalization.normalize_(box[cell].float()[None, None]))[0, 0]
        numerator[cell] += weights * probabilities
    for window in windows:
        denominator[tuple(slice(start, start + PATCH) for start in window)] += weights
    expected = (numerator / denominator).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    assert skipped == 0 and np.array_equal(np.concatenate([values for _, values in emitted]), expected)
    # planes are finished at each row of windows (0, 8, ..., 32) and at the end, and handed on in runs of whole chunks
    assert [(planes.start, planes.stop) for planes, _ in emitted] == [(0, 10), (10, 20), (20, 30), (30, 40), (40, 48)]
    assert slabs == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 48)] and max(held) == PATCH
    assert predictor.buffers["numerator"].numel() == PATCH * 20 * 20  # a ring of 16 planes, not the 48


def test_rows_of_air_let_their_planes_go(monkeypatch):
    """Windows skipped as air never reach the model, and their planes are let go as the next rows are read: a block
    that is air down to its last rows holds no more of its input than one that is not."""
    box = torch.zeros((48, 20, 20), dtype=torch.uint8)
    box[40:] = 7
    predictor = inference.WindowPredictor(torch.nn.Identity(), PATCH, "gaussian", 3, "cpu", skip_max=0, stride=PATCH // 2)
    windows, _, skipped, emitted, held = _stream_one_block(box, predictor, 1, monkeypatch)
    values = np.concatenate([values for _, values in emitted])
    assert skipped == 16 and len(windows) == 20  # rows starting at 0, 8, 16 and 24 end before plane 40
    assert not values[:32].any() and values[40:].all() and max(held) == PATCH  # 32..39: partly air


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator")
def test_own_memory_is_handed_back_when_freed():
    """On the CPU, the output's finished planes and the blending's buffers get memory of their own, handed back to the
    system when freed, even where the process keeps freed memory for the model's activations (which would keep them,
    and leave their holes). One process measures each dtype's own memory, then the heap's (which keeps what it freed)."""
    script = textwrap.dedent("""
        import re
        from pathlib import Path
        import torch
        from ink3d import sliding_window
        from ink3d.memory import reuse_freed_memory
        reuse_freed_memory()
        rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) >> 10
        for how in ("own", "heap"):
            for dtype in (torch.uint8, torch.float32):
                shape = (64 // dtype.itemsize, 1024, 1024)
                values = sliding_window._own_memory(shape, dtype, torch.device("cpu")) if how == "own" else torch.empty(shape, dtype=dtype)
                values.fill_(7)
                assert values.dtype == dtype and values.shape == shape and int(values[-1, -1, -1]) == 7
                before = rss()
                del values
                print(how, before - rss())
    """)
    lines = run_code(script).stdout.split("\n")
    freed = [line.split() for line in lines if line]
    assert [how for how, _ in freed] == ["own", "own", "heap", "heap"]
    assert all(int(mb) >= 60 for how, mb in freed if how == "own") and all(int(mb) < 4 for how, mb in freed if how == "heap")  # of 64
    for dtype in (torch.uint8, torch.float32):
        assert sliding_window._own_memory((0, 64, 64), dtype, torch.device("cpu")).shape == (0, 64, 64)


@pytest.mark.parametrize("shape, batch_size", [((3, 4, 9), 4), ((2, 5, 5), 3), ((1, 1, 7), 2)])
def test_windows_take_their_grid_slot_once_each_in_grid_order(shape, batch_size):
    predictor = inference.WindowPredictor(torch.nn.Identity(), 4, "constant", batch_size, "cpu", stride=2)
    origin = np.array([6, 0, 10])
    grid = list(itertools.product(*(range(n) for n in shape)))
    keep = [i for i in range(len(grid)) if i % 5 != 3]  # windows skipped as air leave gaps
    cells = [tuple(slice(2 * g, 2 * g + 4) for g in grid[i]) for i in keep]
    events = []  # ("drawn", index), ("placed", slot, index) and ("batch", its windows) as they happen

    def drawn():
        for index, cell in enumerate(cells):
            events.append(("drawn", index))
            yield index, cell

    batches = []
    for batch in predictor._batches(drawn(), origin, lambda slot, index: events.append(("placed", slot, index))):
        events.append(("batch", tuple(batch)))
        batches.append(batch)
    run = [sorted(index for index in batch if index is not None) for batch in batches]
    assert sum(run, []) == list(range(len(cells)))  # every window once, batch after batch in grid order
    # each window takes its slot before the next is drawn, and after the batch before its own was yielded
    expected, batch_of = [], {index: n for n, batch in enumerate(batches) for index in batch if index is not None}
    for index in range(len(cells)):
        expected.append(("drawn", index))
        if index and batch_of[index] != batch_of[index - 1]:
            expected.append(("batch", tuple(batches[batch_of[index - 1]])))
        expected.append(("placed", batches[batch_of[index]].index(index), index))
    assert events == expected + [("batch", tuple(batches[-1]))]
    for batch in batches:
        assert len(batch) == batch_size
        for slot, index in enumerate(batch):
            assert index is None or slot == sum(piece.start // 2 + int(o) // 2 for piece, o in zip(cells[index], origin)) % batch_size


@pytest.mark.parametrize("patch, stride, block, batch_size, tolerance", [
    (128, 64, 512, 8, 0), (128, 64, 512, 16, 0), (128, 64, 384, 8, 0), (128, 96, 576, 8, 0), (16, 8, 32, 3, 0), (16, 12, 36, 4, 0),
    (8, 4, 64, 5, 0.03), (16, 8, 96, 4, 0.03)])  # rows and planes beyond 2 x batch_size: counted on a part of the block
def test_batch_fill_is_the_share_of_slots_an_inner_block_fills(patch, stride, block, batch_size, tolerance):
    region = tuple(slice(0, 3 * block) for _ in range(3))
    inner = next(b for b in inference.plan_blocks(region, region, patch, stride, block) if all(s.start == block for s in b.output))
    predictor = inference.WindowPredictor(torch.nn.Identity(), patch, "constant", batch_size, "cpu", stride=stride)
    cells = [tuple(slice(int(w - o), int(w - o) + patch) for w, o in zip(window, inner.input_origin)) for window in inner.windows]
    batches = list(predictor._batches(enumerate(cells), inner.input_origin))
    assert inference.batch_fill(patch, stride, block, batch_size) == pytest.approx(len(cells) / (len(batches) * batch_size),
                                                                                   abs=tolerance, rel=0)


def test_batches_left_part_empty_are_warned_of_with_settings_that_fill_them(scan, model_path, tmp_path):
    scan_path, _ = scan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _infer(scan_path, model_path, tmp_path / "full.h5")  # rows of 3 windows, batches of 3
    with pytest.warns(UserWarning, match=r"--batch_size 4 with --macro_block 16: a block's batches run 75% full") as caught:
        _infer(scan_path, model_path, tmp_path / "part.h5", "--batch_size", "4")
    block, batch_size = (int(v) for v in re.search(r"--macro_block (\d+) or --batch_size (\d+) fills them", str(caught[0].message)).groups())
    assert block % 128 == 0 and inference.batch_fill(PATCH, PATCH // 2, block, 4) >= 0.97
    assert batch_size < 4 and inference.batch_fill(PATCH, PATCH // 2, 16, batch_size) >= 0.97


def test_no_earlier_output_is_held_while_the_model_runs_again(model_path, tmp_path, monkeypatch):
    """Without flips the model's output is the batch's probabilities: it is let go before the next batch's forward
    allocates its activations."""
    outputs, held = [], []
    forward = UNet3D.forward

    def recorded(self, x):
        held.append(sum(output() is not None for output in outputs))
        result = forward(self, x)
        outputs.append(weakref.ref(result))
        return result

    monkeypatch.setattr(UNet3D, "forward", recorded)
    values = np.random.default_rng(4).integers(1, 256, (32, 32, 48)).astype(np.uint8)
    _infer(_scan(tmp_path / "scan.h5", values), model_path, tmp_path / "pred.h5", "--device", "cpu")
    assert len(held) > 3 and not any(held)


def test_flipped_probabilities_are_summed_in_one_buffer(model_path, tmp_path, monkeypatch):
    """With flips, the probabilities are summed in the same memory flip after flip and batch after batch: no earlier
    result is held in the heap while the next forward's activations are allocated."""
    addresses = []
    original = inference.WindowPredictor._probabilities

    def recorded(self, batch):
        result = original(self, batch)
        addresses.append(result.data_ptr())
        return result

    monkeypatch.setattr(inference.WindowPredictor, "_probabilities", recorded)
    values = np.random.default_rng(4).integers(1, 256, (32, 32, 48)).astype(np.uint8)
    _infer(_scan(tmp_path / "scan.h5", values), model_path, tmp_path / "pred.h5", "--tta", "true")
    assert len(addresses) > 1 and len(set(addresses)) == 1


def test_air_is_not_run_through_the_model(model_path, tmp_path, monkeypatch):
    values = np.zeros((32, 32, 48), np.uint8)
    values[:, :, 32:] = np.random.default_rng(1).integers(1, 256, (32, 32, 16))
    scan_path = _scan(tmp_path / "scan.h5", values)
    batches = []
    original = inference.WindowPredictor._batches

    def recorded(self, cells, origin, placed=None):
        for batch in original(self, cells, origin, placed):
            batches.append(batch)
            yield batch

    monkeypatch.setattr(inference.WindowPredictor, "_batches", recorded)
    pred, _ = _infer(scan_path, model_path, tmp_path / "pred.h5", "--air_level", "0", "--macro_block", "64")
    run = [index for batch in batches for index in batch if index is not None]
    assert len(run) == len(set(run)) == 3 * 3 * 2  # windows with x start 24 or 32 touch the non-air part; x start 0..16 are skipped
    assert not pred[:, :, :8].any()  # covered only by skipped windows


def test_tta_equals_the_mean_of_flipped_passes(model_path, tmp_path):
    values = np.random.default_rng(2).integers(0, 256, (32, 24, 40)).astype(np.uint8)  # (size - 16) % 8 == 0: flips keep the grid
    passes = []
    for axis in (None, 0, 1, 2):
        flipped = values if axis is None else np.flip(values, axis)
        pred, _ = _infer(_scan(tmp_path / f"s{axis}.h5", np.ascontiguousarray(flipped)), model_path, tmp_path / f"p{axis}.h5",
                         "--channels_last", "false")
        passes.append(pred.astype(float) if axis is None else np.flip(pred, axis).astype(float))
    tta, _ = _infer(_scan(tmp_path / "s.h5", values), model_path, tmp_path / "tta.h5", "--tta", "true")
    assert np.abs(tta - np.mean(passes, axis=0)).max() <= 1  # each pass is rounded to uint8 once more
    assert np.abs(tta - passes[0]).max() > 1  # and TTA is not just the plain pass


def test_published_checkpoint_form(scan, model_path, tmp_path):
    scan_path, _ = scan
    state = torch.load(model_path, weights_only=True)["model"]
    torch.save({"model." + key: value for key, value in state.items()}, tmp_path / "published.pth")
    ours, _ = _infer(scan_path, model_path, tmp_path / "a.h5", "--roi", "0:16,0:16,0:16")
    published, _ = _infer(scan_path, tmp_path / "published.pth", tmp_path / "b.h5", "--roi", "0:16,0:16,0:16")
    assert np.array_equal(ours, published)


def _rank_main(rank, world, port, argv):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    inference.main(argv)


def test_two_ranks_write_parts_and_merge_into_the_single_run(scan, model_path, full_runs, tmp_path):
    import socket

    scan_path, _ = scan
    single = full_runs("false")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["--volume", str(scan_path), "--checkpoint", str(model_path), "--out", str(tmp_path / "ranks.h5"), "--patch", str(PATCH),
            "--batch_size", "3", "--macro_block", "16", "--air_level", "none", "--channels_last", "false", "--device", "cpu"]
    torch.multiprocessing.start_processes(_rank_main, args=(2, port, argv), nprocs=2, start_method="forkserver")
    with h5py.File(tmp_path / "ranks.h5") as file:
        assert np.array_equal(file[volume.PREDICTIONS][:], single) and file[volume.PREDICTIONS].attrs["complete"]
    assert sorted(p.name for p in tmp_path.glob("ranks.h5*")) == ["ranks.h5", "ranks.h5.config.json"]


def test_a_model_failure_is_named_as_such_and_the_output_resumes(scan, model_path, full_runs, tmp_path, monkeypatch):
    scan_path, _ = scan
    reference = full_runs("false")
    original, calls = inference.WindowPredictor._probabilities, []

    def out_of_memory(self, batch):
        calls.append(1)
        if len(calls) == 20:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, batch)

    monkeypatch.setattr(inference.WindowPredictor, "_probabilities", out_of_memory)
    with pytest.raises(InputError, match=r"the model failed on block \d+ at .*\(OutOfMemoryError: CUDA out of memory.*\); finished "
                                         r"blocks are kept: lower --batch_size or --patch, then rerun with --resume true") as error:
        _infer(scan_path, model_path, tmp_path / "pred.h5")
    assert not isinstance(error.value, WriteError) and "disk" not in str(error.value)
    monkeypatch.setattr(inference.WindowPredictor, "_probabilities", original)
    resumed, attrs = _infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]


def _created_without_record(path):
    with h5py.File(path, "w") as file:  # killed after creating the predictions, before recording finished blocks
        volume.create_volume(file, volume.PREDICTIONS, (40, 35, 52), np.uint8)


@pytest.mark.parametrize("make_partial", [lambda path: path.write_bytes(b""), lambda path: path.write_bytes(b"\x89HDF\r\n\x1a\n"),
                                          _created_without_record])
def test_a_run_killed_as_it_created_its_file_resumes_from_the_start(scan, model_path, full_runs, tmp_path, make_partial, capsys):
    scan_path, _ = scan
    reference = full_runs("false")
    make_partial(tmp_path / "pred.h5.partial")
    resumed, attrs = _infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]
    assert "no block was finished before the interruption; starting it anew" in capsys.readouterr().out


def test_a_uint16_hdf5_scan_reads_as_volume_to_hdf_converts_it_and_a_float_scan_is_refused(scan, model_path, tmp_path):
    scan_path, values = scan
    wide = (values.astype(np.uint16) * 257 + np.random.default_rng(3).integers(-128, 128, values.shape)).clip(0, 65535).astype(np.uint16)
    with h5py.File(tmp_path / "wide.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, wide.shape, np.uint16, chunk=16)[:] = wide
    file, dataset = volume.open_dataset(tmp_path / "wide.h5", volume.SCAN)
    with file:
        assert dataset.dtype == np.uint8 and np.array_equal(dataset[3:9, :, 7:30], volume.UINT16_TO_UINT8[wide[3:9, :, 7:30]])
    converted, _ = _infer(_scan(tmp_path / "narrow.h5", volume.UINT16_TO_UINT8[wide]), model_path, tmp_path / "a.h5")
    direct, _ = _infer(tmp_path / "wide.h5", model_path, tmp_path / "b.h5")
    assert np.array_equal(direct, converted)
    with h5py.File(tmp_path / "float.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, values.shape, np.float32, chunk=16)[:] = values / 255
    with pytest.raises(InputError, match="float.h5: 'scan_volume' holds float32; scans must be uint8 or uint16"):
        _infer(tmp_path / "float.h5", model_path, tmp_path / "c.h5")
    assert not (tmp_path / "c.h5").exists()


def test_ctrl_c_stops_with_one_line_and_the_run_resumes(scan, model_path, tmp_path):
    scan_path, _ = scan
    reference, _ = _infer(scan_path, model_path, tmp_path / "reference.h5", "--macro_block", "16")
    argv = ["--volume", str(scan_path), "--checkpoint", str(model_path), "--out", str(tmp_path / "pred.h5"),
            "--patch", str(PATCH), "--batch_size", "3", "--macro_block", "16", "--air_level", "none", "--channels_last", "false"]
    for _ in range(10):  # on a loaded machine the run may end before this process sees its partial file: try again
        (tmp_path / "pred.h5").unlink(missing_ok=True)
        process = StageProcess("inference.py", argv)  # Ctrl-C handled as in a terminal's foreground command
        while not (tmp_path / "pred.h5.partial").exists() and process.poll() is None:
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate()
        if process.returncode != 0:
            break
    else:
        pytest.skip("ten runs finished before the interrupt reached them")
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.rstrip().splitlines()[-1] == "interrupted: finished work is kept in the .partial output: rerun the same command with --resume true"
    resumed, attrs = _infer(scan_path, model_path, tmp_path / "pred.h5", "--macro_block", "16", "--resume", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]


def test_the_window_defaults_to_the_checkpoints_training_patch(scan, model_path, tmp_path, capsys):
    """Without --patch, inference windows are the patch the model was trained with, as a run with --patch gives."""
    scan_path, _ = scan
    trained = tmp_path / "trained.pth"
    state = torch.load(model_path, weights_only=True)
    state["config"] = {"patch": PATCH}
    torch.save(state, trained)
    argv = ["--volume", str(scan_path), "--checkpoint", str(trained), "--batch_size", "3", "--macro_block", "16",
            "--air_level", "none", "--channels_last", "false"]
    inference.main([*argv, "--out", str(tmp_path / "default.h5")])
    output = capsys.readouterr().out
    assert f"windows of {PATCH} voxels: the checkpoint's training patch (--patch)" in output
    assert "--air_level none: every window is predicted" in output
    inference.main([*argv, "--out", str(tmp_path / "given.h5"), "--patch", str(PATCH)])
    with h5py.File(tmp_path / "default.h5") as default, h5py.File(tmp_path / "given.h5") as given:
        assert default[volume.PREDICTIONS].attrs["patch"] == PATCH
        assert np.array_equal(default[volume.PREDICTIONS][:], given[volume.PREDICTIONS][:])


def test_a_checkpoint_trained_on_another_scans_air_level_is_warned_of(scan, model_path, tmp_path):
    """By default windows are skipped by the air level the model was trained with; where the scan's own differs, the
    run says so and names the flag that skips by the scan's."""
    scan_path, _ = scan
    file, dataset = volume.open_dataset(scan_path, volume.SCAN)
    with file:
        own = air_level(scan_histogram(dataset))
    state = torch.load(model_path, weights_only=True)
    argv = ["--volume", str(scan_path), "--patch", str(PATCH), "--batch_size", "3", "--macro_block", "16", "--roi", "0:8,0:8,0:8"]
    for trained, flags, warned in ((own + 30, [], True), (own + 8, [], False), (own + 30, ["--air_level", str(own + 30)], False)):
        state["config"] = {"air_level_value": trained}
        torch.save(state, tmp_path / "trained.pth")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inference.main([*argv, *flags, "--checkpoint", str(tmp_path / "trained.pth"), "--out", str(tmp_path / f"{trained}{flags}.h5")])
        messages = [str(warning.message) for warning in caught if "air level" in str(warning.message)]
        expected = [f"the checkpoint was trained on a scan whose air level was {trained}; this scan's own is {own}: windows at or "
                    f"below {trained} are skipped as air (--air_level {own} skips by this scan's)"]
        assert messages == (expected if warned else []), (trained, flags)
