"""Predictions as an OME-Zarr store written by independent workers: equal to the HDF5 run, resumable per part,
refused while incomplete, read by every stage."""

import json
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

import export_slices
import inference
import volume_to_hdf
from ink3d import InputError, volume
from models import UNet3D, save_checkpoint
from stage_process import StageProcess, another_run_writing

SHAPE = (40, 35, 52)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    values = np.random.default_rng(0).integers(0, 256, SHAPE).astype(np.uint8)
    values[:, :, :40] = 0  # air: windows there are skipped, the chunks only they reach stay unwritten
    with h5py.File(root / "scan.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, SHAPE, np.uint8, chunk=16)[:] = values
    torch.manual_seed(0)
    model = UNet3D(f_maps=4, num_levels=2)
    save_checkpoint(root / "model.pth", model, model.args, {}, step=0)
    argv = ["--volume", str(root / "scan.h5"), "--checkpoint", str(root / "model.pth"), "--patch", "16", "--batch_size", "3",
            "--macro_block", "16", "--air_level", "0"]
    inference.main([*argv, "--out", str(root / "reference.h5")])
    with h5py.File(root / "reference.h5") as file:
        reference = file[volume.PREDICTIONS][:]
    return root, argv, reference


def _worker(setup, out, part, parts=3, *extra):
    root, argv, _ = setup
    return inference.main([*argv, "--out", str(out), "--parts", str(parts), "--part", str(part), *extra])


def test_independent_workers_write_the_whole_run_in_place(setup, tmp_path):
    _, _, reference = setup
    out = tmp_path / "pred.zarr"
    for part in (2, 0):
        _worker(setup, out, part)
        with pytest.raises(InputError, match="pred.zarr: its predictions are not complete"):
            volume.open_dataset(out, volume.PREDICTIONS)
    _worker(setup, out, 1)  # the last part to finish finalizes
    _, predictions = volume.open_dataset(out, volume.PREDICTIONS)
    assert np.array_equal(predictions[:], reference)
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].metadata.zarr_format == 2 and group.attrs["multiscales"][0]["version"] == "0.4"
    assert [d["path"] for d in group.attrs["multiscales"][0]["datasets"]] == ["0", "1", "2"]  # down to one chunk (16)
    level1 = group["1"][:]
    padded = np.pad(reference.astype(np.float32), [(0, 2 * n - s) for n, s in zip(level1.shape, SHAPE)], mode="edge")
    assert np.array_equal(level1, np.rint(padded.reshape(20, 2, 18, 2, 26, 2).mean(axis=(1, 3, 5))))
    chunks = {path.relative_to(out / "0").as_posix() for path in (out / "0").rglob("*") if path.is_file() and not path.name.startswith(".")}
    assert "0/0/0" not in chunks and "0/0/1" not in chunks and "0/0/2" in chunks  # all-zero (air) chunks are not written
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["slices"], meta["height"], meta["width"], meta["format"]) == (*SHAPE, "zarr")


def test_a_killed_worker_resumes_its_part_and_damaged_chunks_are_redone(setup, tmp_path, monkeypatch):
    _, _, reference = setup
    out = tmp_path / "pred.zarr"
    original, calls = inference.WindowPredictor.predict, []

    def killed(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(inference.WindowPredictor, "predict", killed)
    with pytest.raises(KeyboardInterrupt):
        _worker(setup, out, 0, 2)
    monkeypatch.setattr(inference.WindowPredictor, "predict", original)
    with pytest.raises(InputError, match="part 0 of 2 has finished blocks already; --resume true continues it"):
        _worker(setup, out, 0, 2)
    _worker(setup, out, 1, 2)
    chunk = out / "0" / "0" / "0" / "2"
    chunk.write_bytes(chunk.read_bytes()[:-7] + bytes(7))  # a finished block's chunk damaged
    _worker(setup, out, 0, 2, "--resume", "true")
    _worker(setup, out, 1, 2, "--resume", "true")
    _, predictions = volume.open_dataset(out, volume.PREDICTIONS)
    assert np.array_equal(predictions[:], reference)


def test_a_damaged_progress_record_is_named_on_resume(setup, tmp_path):
    out = tmp_path / "pred.zarr"
    _worker(setup, out, 0, 2)
    record = next((out / "progress").glob("*.json"))
    record.write_text('{"crc32": 12')  # cut short
    with pytest.raises(InputError, match=f"{record.name}: a damaged progress record .*start over with --overwrite true"):
        _worker(setup, out, 0, 2, "--resume", "true")


def test_two_processes_on_one_part_are_refused(setup, tmp_path):
    out = tmp_path / "pred.zarr"
    with another_run_writing(tmp_path / "pred.zarr.part1-of-3"):
        with pytest.raises(InputError, match="pred.zarr.part1-of-3 is being written by another run"):
            _worker(setup, out, 1)
    assert not out.exists()


def test_finalize_waits_for_every_part_and_the_store_converts_back(setup, tmp_path):
    _, _, reference = setup
    out = tmp_path / "pred.zarr"
    _worker(setup, out, 0, 2)
    with pytest.raises(InputError, match="blocks are not finished yet; run the parts that hold them"):
        _worker(setup, out, 1, 2, "--finalize", "true")
    _worker(setup, out, 1, 2)
    volume_to_hdf.main(["--zarr", str(out), "--out", str(tmp_path / "back.h5")])
    with h5py.File(tmp_path / "back.h5") as file:
        assert np.array_equal(file[volume.SCAN][:], reference)
    export_slices.main(["--volume", str(out), "--out_dir", str(tmp_path / "slices"), "--roi", "3:5,:,:"])
    assert sorted(path.name for path in (tmp_path / "slices").glob("*.tif")) == ["00003.tif", "00004.tif"]


@pytest.mark.parametrize("flags, message", [
    (["--out", "p.h5", "--parts", "2"], "p.h5: --parts and --finalize write an OME-Zarr store; give --out a name ending in .zarr"),
    (["--out", "p.zarr", "--parts", "2", "--part", "2"], "--part 2: must be below --parts 2"),
    (["--out", "p.zarr", "--parts", "2", "--overwrite", "true"], "--overwrite true with --parts: one worker would delete the others' work"),
])
def test_part_settings_are_checked(setup, tmp_path, monkeypatch, flags, message):
    root, argv, _ = setup
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=message):
        inference.main([*argv, *flags])


def _chunks(store):
    """Every chunk file of every level: relative path -> bytes (a chunk's temporary file, left by a worker killed as it
    wrote it, is no chunk: zarr never reads it)."""
    return {path.relative_to(store).as_posix(): path.read_bytes() for level in ("0", "1", "2")
            for path in (store / level).rglob("*") if path.is_file() and not path.name.startswith(".") and not path.name.endswith(".partial")}


@pytest.fixture(scope="module")
def one_store(setup, tmp_path_factory) -> Path:
    """The store one process writes alone, what several workers must write together."""
    _, argv, _ = setup
    one = tmp_path_factory.mktemp("one") / "one.zarr"
    inference.main([*argv, "--out", str(one)])
    assert sorted(path.name for path in one.parent.iterdir()) == ["one.zarr", "one.zarr.part0-of-1.config.json"]  # no lock
    return one


def test_three_worker_processes_write_every_chunk_as_one_process_does(setup, one_store, tmp_path):
    root, argv, _ = setup
    one = one_store
    three = tmp_path / "three.zarr"
    workers = [StageProcess("inference.py", [*argv, "--out", str(three), "--parts", "3", "--part", str(part)]) for part in range(3)]
    for worker in workers:
        _, stderr = worker.communicate()
        assert worker.returncode == 0, stderr[-2000:]
    assert _chunks(three) == _chunks(one) and len(_chunks(one)) > 10
    assert zarr.open_group(str(three), mode="r").attrs["ink3d"]["complete"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["three.zarr", "three.zarr.part0-of-3.config.json", "three.zarr.part1-of-3.config.json",
                                                               "three.zarr.part2-of-3.config.json"]  # no lock left behind


def test_kill_9_of_a_worker_then_resume_is_identical(setup, one_store, tmp_path):
    root, argv, _ = setup
    one = one_store
    out = tmp_path / "pred.zarr"
    for delay in (0.0, 0.4):  # as the store is created, then among the blocks
        process = StageProcess("inference.py", [*argv, "--out", str(out), "--parts", "2", "--part", "0", "--resume", "true"])
        while not (out / "progress").exists() and process.poll() is None:
            time.sleep(0.005)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    for part in (0, 1):
        inference.main([*argv, "--out", str(out), "--parts", "2", "--part", str(part), "--resume", "true"])
    assert _chunks(out) == _chunks(one)


def test_the_store_is_valid_ome_zarr_0_4(setup, tmp_path):
    image = pytest.importorskip("ome_zarr_models.v04.image", reason="ome-zarr-models validates OME-Zarr metadata against the spec")
    _, argv, _ = setup
    inference.main([*argv, "--out", str(tmp_path / "pred.zarr"), "--voxel_size", "7.91"])
    multiscale = image.Image.from_zarr(zarr.open_group(str(tmp_path / "pred.zarr"), mode="r")).attributes.multiscales[0]
    assert [(axis.name, axis.unit) for axis in multiscale.axes] == [("z", "micrometer"), ("y", "micrometer"), ("x", "micrometer")]
    assert [dataset.coordinateTransformations[0].scale for dataset in multiscale.datasets] == [[7.91] * 3, [15.82] * 3, [31.64] * 3]


def test_the_metadata_opens_with_ome_zarr_py(setup, tmp_path):
    reader = pytest.importorskip("ome_zarr.reader", reason="ome-zarr-py is the reference OME-Zarr reader (pip install ome-zarr)")
    from ome_zarr.io import parse_url

    root, argv, _ = setup
    inference.main([*argv, "--out", str(tmp_path / "pred.zarr"), "--voxel_size", "7.91"])
    image = next(iter(reader.Reader(parse_url(str(tmp_path / "pred.zarr")))()))
    assert [axis["name"] for axis in image.metadata["axes"]] == ["z", "y", "x"]
    assert {axis["unit"] for axis in image.metadata["axes"]} == {"micrometer"}
    assert [t[0]["scale"] for t in image.metadata["coordinateTransformations"]] == [[7.91] * 3, [15.82] * 3, [31.64] * 3]
    assert [level.shape for level in image.data] == [SHAPE, (20, 18, 26), (10, 9, 13)]


@pytest.mark.parametrize("cache_mb", [0, 16])
def test_a_chunk_lost_or_changed_after_the_store_was_finished_is_named_by_readers(setup, tmp_path, cache_mb):
    """The finished store records its chunk files; a reader (cached or not) finds a lost one or a changed one by name
    instead of reading zeros or other values, and reads an intact store as written."""
    _, _, reference = setup
    out = tmp_path / "pred.zarr"
    _worker(setup, out, 0, 1)
    _, predictions = volume.open_dataset(out, volume.PREDICTIONS, cache_bytes=cache_mb << 20)
    assert np.array_equal(volume.read_crop(predictions, (0, 0, 0), SHAPE), reference)
    chunks = sorted(path for path in (out / "0").rglob("*") if path.is_file() and not path.name.startswith("."))
    lost, changed = chunks[0], chunks[-1]
    lost.unlink()
    changed.write_bytes(changed.read_bytes()[:-1] + bytes([changed.read_bytes()[-1] ^ 1]))
    _, predictions = volume.open_dataset(out, volume.PREDICTIONS, cache_bytes=cache_mb << 20)
    with pytest.raises(InputError, match=f"the chunk .*{lost.name} was written when the store was finished and is missing now"):
        volume.read_crop(predictions, (0, 0, 0), SHAPE)
    lost_index = tuple(int(part) for part in lost.relative_to(out / "0").parts)
    changed_index = np.array([int(part) for part in changed.relative_to(out / "0").parts])
    box = changed_index * 16
    with pytest.raises(InputError, match=f"the chunk .*{changed.name} differs from the one written"):
        volume.read_crop(predictions, box, (1, 1, 1))
    assert lost_index != tuple(changed_index)
