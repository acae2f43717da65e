"""inference stopped and resumed: kills, full disks, failed writes and reads, Ctrl-C, damaged blocks, ranks."""

import json
import signal
import time

import h5py
import numpy as np
import pytest
import torch

import inference
from stage_process import StageProcess, run_stage
from ink3d import InputError, volume
from ink3d.files import NEWLY_CREATED_BYTES, WriteError, partial_path
from ink3d.prediction_file import PLAN_KEYS, open_output
from models import UNet3D, save_checkpoint
from inference_fixtures import PATCH, infer, write_scan


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
        infer(scan_path, model_path, tmp_path / "pred.h5")
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
        infer(scan_path, model_path, tmp_path / "pred.h5")
    with pytest.raises(InputError, match="different patch"):
        infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true", "--patch", "8")
    with pytest.raises(InputError, match="different tta"):  # 8 flips must not continue a run without them ...
        infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true", "--tta", "true")
    with h5py.File(tmp_path / "pred.h5.partial", "a") as file:  # ... nor one whose test-time flips were 4 (it recorded true)
        plan = file[volume.PREDICTIONS].attrs["plan"]
        file[volume.PREDICTIONS].attrs["plan"] = json.dumps({**json.loads(plan), "tta": True})
    with pytest.raises(InputError, match=r"different tta \(tta=True in the file\)"):
        infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true", "--tta", "true")
    with h5py.File(tmp_path / "pred.h5.partial", "a") as file:
        file[volume.PREDICTIONS].attrs["plan"] = plan
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    save_checkpoint(other, UNet3D(f_maps=4, num_levels=2), UNet3D(f_maps=4, num_levels=2).args, {}, step=0)
    with pytest.raises(InputError, match="different weights_sha256"):  # two models' blocks must not mix
        infer(scan_path, other, tmp_path / "pred.h5", "--resume", "true")
    moved = tmp_path / "moved.pth"  # the same weights under another name may continue the run
    moved.write_bytes(model_path.read_bytes())
    resumed, attrs = infer(scan_path, moved, tmp_path / "pred.h5", "--resume", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]
    # complete now: a resume with the same plan has nothing to do, one with another plan is refused as before
    infer(scan_path, moved, tmp_path / "pred.h5", "--resume", "true")
    with pytest.raises(InputError, match="pred.h5: cannot resume with different weights_sha256"):
        infer(scan_path, other, tmp_path / "pred.h5", "--resume", "true")
    assert np.array_equal(infer(scan_path, moved, tmp_path / "pred.h5", "--resume", "true")[0], reference)
    assert not (tmp_path / "pred.h5.partial").exists()


def test_a_damaged_finished_block_is_found_and_redone(scan, model_path, full_runs, tmp_path, monkeypatch, capsys):
    scan_path, _ = scan
    reference = _interrupted(scan_path, model_path, tmp_path, monkeypatch, full_runs)
    with h5py.File(tmp_path / "pred.h5.partial", "a") as file:  # finished: the first 4 blocks; one voxel of block 1 lost
        file[volume.PREDICTIONS][0, 0, 20] ^= 0xFF
    resumed, _ = infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true")
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
        infer(scan_path, model_path, tmp_path / "pred.h5")
    monkeypatch.setattr(inference, "hdf5_writer", original)
    with h5py.File(tmp_path / "pred.h5.partial") as file:  # what was finished before is readable and recorded
        finished = file[volume.FINISHED_BLOCKS][:]
        assert finished.sum() == 5 and np.array_equal(file[volume.PREDICTIONS][0:16, 0:16, 0:16], reference[0:16, 0:16, 0:16])
    resumed, attrs = infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]


@pytest.mark.filterwarnings("ignore:--batch_size .* batches run")  # small blocks on purpose: their batches run part empty
def test_a_full_disk_stops_cleanly_and_resume_completes_the_run(model_path, tmp_path):
    values = np.random.default_rng(4).integers(0, 256, (32, 96, 96)).astype(np.uint8)  # a 364 kB prediction file
    scan_path = write_scan(tmp_path / "scan.h5", values)
    reference, _ = infer(scan_path, model_path, tmp_path / "reference.h5", "--macro_block", "32")
    argv = ["--volume", str(scan_path), "--checkpoint", str(model_path), "--out", str(tmp_path / "pred.h5"), "--patch", str(PATCH),
            "--macro_block", "32", "--air_level", "none", "--channels_last", "false"]
    for file_bytes in (100_000, 200_000):  # the disk fills, space is freed, it fills again
        run = run_stage("inference.py", argv + (["--resume", "true"] if file_bytes > 100_000 else []), file_bytes=file_bytes)
        assert run.returncode == 2 and "pred.h5.partial: writing failed (File too large)" in run.stderr, run.stderr[-2000:]
    resumed, attrs = infer(scan_path, model_path, tmp_path / "pred.h5", "--macro_block", "32", "--resume", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]


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
        resumed, attrs = infer(scan_path, model_path, tmp_path / "pred.h5", "--macro_block", "8", "--resume", "true")
    except InputError as error:  # a kill inside HDF5's metadata flush can tear the file: named, never silently wrong
        assert "cannot be opened to resume" in str(error) or "cannot be repaired" in str(error)
        resumed, attrs = infer(scan_path, model_path, tmp_path / "pred.h5", "--macro_block", "8", "--overwrite", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]


def test_a_damaged_scan_chunk_is_named_as_a_read_error(model_path, tmp_path):
    values = (np.arange(32**3).reshape(32, 32, 32) // 97).astype(np.uint8)  # compressible: chunks go through blosc
    scan_path = write_scan(tmp_path / "scan.h5", values)
    with h5py.File(scan_path) as file:
        info = file[volume.SCAN].id.get_chunk_info_by_coord((16, 0, 0))
    with open(scan_path, "r+b") as raw:
        raw.seek(info.byte_offset)
        raw.write(bytes(info.size))
    with pytest.raises(InputError, match=r"reading .*scan.h5\[scan_volume\] at \[16, 0, 0\]\.\.\[24, 24, 24\] failed .*damaged"):
        infer(scan_path, model_path, tmp_path / "pred.h5")


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(scan, model_path, tmp_path):
    scan_path, _ = scan
    out = tmp_path / "pred.h5"
    old, _ = infer(scan_path, model_path, out, "--roi", "0:16,0:16,0:16")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(InputError, match="garbage.pth"):
        infer(scan_path, garbage, out, "--overwrite", "true")
    with h5py.File(out) as file:
        assert np.array_equal(file[volume.PREDICTIONS][:], old)
    assert not partial_path(out).exists()


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
        infer(scan_path, model_path, tmp_path / "pred.h5")
    assert not isinstance(error.value, WriteError) and "disk" not in str(error.value)
    monkeypatch.setattr(inference.WindowPredictor, "_probabilities", original)
    resumed, attrs = infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true")
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
    resumed, attrs = infer(scan_path, model_path, tmp_path / "pred.h5", "--resume", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]
    assert "no block was finished before the interruption; starting it anew" in capsys.readouterr().out


def test_ctrl_c_stops_with_one_line_and_the_run_resumes(scan, model_path, tmp_path):
    scan_path, _ = scan
    reference, _ = infer(scan_path, model_path, tmp_path / "reference.h5", "--macro_block", "16")
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
    resumed, attrs = infer(scan_path, model_path, tmp_path / "pred.h5", "--macro_block", "16", "--resume", "true")
    assert np.array_equal(resumed, reference) and attrs["complete"]


@pytest.mark.parametrize("padding", [0, NEWLY_CREATED_BYTES])
def test_a_file_whose_dataset_is_torn_starts_anew_when_tiny_and_is_named_otherwise(tmp_path, padding):
    """A kill while HDF5 writes its metadata can leave the datasets listed but one of them unreadable."""
    path = tmp_path / "pred.h5.partial"
    with h5py.File(path, "w") as file:
        predictions = file.create_dataset(volume.PREDICTIONS, data=np.zeros((8, 8, 8), np.uint8))
        predictions.attrs["plan"] = "{}"
        for name in (volume.FINISHED_BLOCKS, volume.BLOCK_CHECKSUMS, "padding"):
            file.create_dataset(name, data=np.zeros(4 if name != "padding" else padding, np.uint8))
        header = h5py.h5o.get_info(predictions.id).addr
    with open(path, "r+b") as raw:  # the dataset's object header lost
        raw.seek(header)
        raw.write(bytes(64))
    attrs = {key: 0 for key in PLAN_KEYS}
    if padding:
        with pytest.raises(InputError, match="pred.h5.partial: cannot be opened to resume .* start over with --overwrite true"):
            open_output(path, (8, 8, 8), attrs, 4, resume=True)
        return
    with open_output(path, (8, 8, 8), attrs, 4, resume=True) as file:  # killed as it was made: nothing to keep
        assert json.loads(file[volume.PREDICTIONS].attrs["plan"]) == attrs and not file[volume.FINISHED_BLOCKS][:].any()
