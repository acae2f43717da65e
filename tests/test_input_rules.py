"""Inputs checked for what they are: segments in the volume's voxels, labels of any image kind, absent zarr chunks,
settings that are numbers, choices and devices, and scores without a class."""

import json
import signal
import warnings

import cv2
import h5py
import numpy as np
import pytest
import torch
import zarr

import all_labels_to_hdf
import flatten_3d
import inference
import score_3d
from ink3d import InputError, volume
from ink3d.config import run_main
from ink3d.ppm import in_volume_voxels, write_ppm

SEGMENT = "20230101000000"


def _plane(height=6, width=8, normal=(0.6, 0.0, 0.8)):
    """A tilted plane of pixels inside a 30 x 24 x 20 volume (xyz data, normal of the given length)."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    data = np.zeros((height, width, 6))
    data[..., 0], data[..., 1], data[..., 2] = 4.37 + 0.8 * cols, 6.71 + rows, 12.43 - 0.6 * cols
    data[..., 3:] = normal
    return data


def _field(tmp_path):
    z, y, x = np.mgrid[0:30, 0:24, 0:20]
    values = (3 * z + 2 * y + x).astype(np.uint8)
    with h5py.File(tmp_path / "field.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, values.shape, np.uint8, chunk=8)[:] = values
    return tmp_path / "field.h5"


def _flatten(tmp_path, data, name, *extra):
    write_ppm(tmp_path / name / SEGMENT / f"{SEGMENT}.ppm", data)
    flatten_3d.main(["--volume", str(_field(tmp_path)), "--dataset", volume.SCAN, "--ppm_dir", str(tmp_path / name),
                     "--out_dir", str(tmp_path / f"flat_{name}"), "--band", "3", *extra])
    return cv2.imread(str(tmp_path / f"flat_{name}" / f"{SEGMENT}_prediction.png"), cv2.IMREAD_UNCHANGED)


def test_segment_pixels_are_taken_to_the_volumes_level_with_unit_normals():
    pixels = np.array([[10.0, 20.0, 30.0, 0.0, 0.0, 3.0],  # x y z nx ny nz: a normal of length 3
                       [10.0, 20.0, 30.0, 0.6, 0.0, 0.8],
                       [10.0, 20.0, 30.0, 0.0, 0.0, 0.0],  # no normal: off the surface
                       [np.nan, 1.0, 1.0, 0.0, 0.0, 1.0]])
    out = in_volume_voxels(pixels, (2.0, 4.0, 4.0))  # zyx voxel size of the level
    assert np.allclose(out[0], [2.5, 5.0, 15.0, 0.0, 0.0, 1.0])
    turned = np.array([0.6 / 4, 0.0, 0.8 / 2])
    assert np.allclose(out[1], [2.5, 5.0, 15.0, *(turned / np.linalg.norm(turned))])
    assert not out[2:].any()
    unit = _plane()[0, :2]
    assert np.array_equal(in_volume_voxels(unit), unit)  # unit normals at full resolution are used bit for bit


def test_long_normals_flatten_as_unit_ones_and_a_stray_point_bounds_nothing(tmp_path, monkeypatch):
    unit = _flatten(tmp_path, _plane(), "unit")
    long = _flatten(tmp_path, _plane(normal=(60.0, 0.0, 80.0)), "long")
    assert np.array_equal(long, unit)
    stray = _plane()
    stray[2, 3, 0] = 1e7  # one finite point far outside the volume
    reads = []
    original = volume.read_crop
    monkeypatch.setattr(volume, "read_crop", lambda dataset, origin, shape, fill=0: reads.append(tuple(shape)) or original(dataset, origin, shape, fill))
    image = _flatten(tmp_path, stray, "stray")
    assert max(max(shape) for shape in reads) <= 32  # the read box spans the samples inside the volume only
    expected = unit.copy()
    expected[2, 3] = 0
    assert np.array_equal(image, expected)


@pytest.fixture(scope="module")
def two_levels(tmp_path_factory):
    """The default synthetic scroll's scan as a two-level OME-Zarr, beside the scroll."""
    import make_synthetic_scroll

    root = tmp_path_factory.mktemp("levels")
    make_synthetic_scroll.main(["--out_dir", str(root / "scroll"), "--depth", "48", "--ome_zarr", "true"])
    return root


def test_level_1_takes_segment_coordinates_to_its_voxels(two_levels, tmp_path):
    scroll = two_levels / "scroll"
    labeled = {}
    for level in (0, 1):
        report = all_labels_to_hdf.main([
            "--ppm_dir", str(scroll / "paths"), "--labels_dir", str(scroll / "labels"), "--volume", str(scroll / "volume.zarr"),
            "--level", str(level), "--out_train", str(tmp_path / f"train{level}.h5"), "--out_valid", str(tmp_path / f"valid{level}.h5"),
            "--band", str(4 / 2**level), "--chunk", "16"])  # the same band in full-resolution voxels
        assert not any("outside the volume" in line or "dropped" in line for line in report)
        with h5py.File(tmp_path / f"train{level}.h5") as file, h5py.File(tmp_path / f"valid{level}.h5") as valid:
            labeled[level] = file[volume.INK_COUNT][:] > 0
            assert valid[volume.INK_COUNT][:].any()
            assert list(file[volume.INK_COUNT].attrs[volume.SCALE]) == [2.0**level] * 3
    full = labeled[0]
    pooled = full[:full.shape[0] // 2 * 2, :full.shape[1] // 2 * 2, :full.shape[2] // 2 * 2]
    pooled = pooled.reshape(pooled.shape[0] // 2, 2, pooled.shape[1] // 2, 2, pooled.shape[2] // 2, 2).any(axis=(1, 3, 5))
    half = labeled[1][:pooled.shape[0], :pooled.shape[1], :pooled.shape[2]]
    assert (half & pooled).sum() / half.sum() > 0.9  # where the full-resolution labels lie, at half the size
    images = {}
    for level in (0, 1):
        flatten_3d.main(["--volume", str(scroll / "volume.zarr"), "--dataset", volume.SCAN, "--level", str(level),
                         "--ppm_dir", str(scroll / "paths"), "--out_dir", str(tmp_path / f"flat{level}"), "--band", "0"])
        images[level] = [cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(float) for path in sorted((tmp_path / f"flat{level}").glob("*_prediction.png"))]
    for full_image, half_image in zip(images[0], images[1]):
        assert np.corrcoef(full_image.ravel(), half_image.ravel())[0, 1] > 0.5  # the same surface at half the resolution (unscaled: < 0.1)
    _, half = volume.open_dataset(scroll / "volume.zarr", volume.SCAN, level=1)
    with h5py.File(tmp_path / "half.h5", "w") as file:  # as inference writes a prediction of a level: with its voxel size
        dataset = volume.create_volume(file, volume.PREDICTIONS, half.shape, np.uint8)
        dataset[:] = half[:]
        dataset.attrs[volume.SCALE] = half.scale
    flatten_3d.main(["--volume", str(tmp_path / "half.h5"), "--ppm_dir", str(scroll / "paths"), "--out_dir", str(tmp_path / "flat_h5"),
                     "--band", "0", "--depth_map", "false"])
    recorded = [cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(float) for path in sorted((tmp_path / "flat_h5").glob("*_prediction.png"))]
    assert all(np.array_equal(a, b) for a, b in zip(recorded, images[1], strict=True))


def test_an_hdf5_scan_refuses_a_level(tmp_path):
    with pytest.raises(InputError, match="field.h5: --level 1 reads a level of an OME-Zarr scan; an HDF5 scan holds one resolution"):
        volume.open_dataset(_field(tmp_path), volume.SCAN, level=1)


def test_a_colour_label_is_reduced_to_its_brightest_channel(tmp_path):
    grey = np.zeros((10, 12), np.uint8)
    grey[2:6, 3:9] = 255
    colour = np.zeros((10, 12, 3), np.uint8)
    colour[..., 2] = grey  # red ink on black (OpenCV stores BGR)
    cv2.imwrite(str(tmp_path / "red.png"), colour)
    cv2.imwrite(str(tmp_path / "wide.png"), grey.astype(np.uint16) * 257)
    for name in ("red.png", "wide.png"):
        assert np.array_equal(all_labels_to_hdf._read_png(tmp_path / name, (10, 12), "ink label", "s"), grey)


def test_absent_zarr_chunks_are_counted_and_warned_of(tmp_path):
    values = np.arange(16 * 16 * 16, dtype=np.uint32).reshape(16, 16, 16).astype(np.uint8) | 1
    array = zarr.open_array(str(tmp_path / "scan.zarr"), mode="w", shape=values.shape, chunks=(8, 8, 8), dtype=np.uint8, zarr_format=3)
    array[:] = values
    (tmp_path / "scan.zarr" / "c" / "1" / "0" / "1").unlink()  # a chunk that never arrived
    _, scan = volume.open_dataset(tmp_path / "scan.zarr", volume.SCAN)
    with pytest.warns(UserWarning, match="chunk 1/0/1 is absent from the store and reads as 0"):
        crop = volume.read_crop(scan, (0, 0, 0), (16, 16, 16))
    assert scan.absent == 1 and not crop[8:, :8, 8:].any() and crop[:8].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later reads only count
        volume.read_crop(scan, (8, 0, 8), (8, 8, 8))
    assert scan.absent == 1


def test_absent_shards_of_a_sharded_zarr_are_counted_as_files_not_inner_chunks(tmp_path):
    array = zarr.create_array(str(tmp_path / "scan.zarr"), shape=(16, 16, 16), chunks=(4, 4, 4), shards=(8, 8, 8), dtype=np.uint8)
    array[:] = 7
    (tmp_path / "scan.zarr" / "c" / "0" / "1" / "1").unlink()  # a shard (8 inner chunks) that never arrived
    _, scan = volume.open_dataset(tmp_path / "scan.zarr", volume.SCAN)
    with pytest.warns(UserWarning, match="chunk 0/1/1 is absent"):
        crop = volume.read_crop(scan, (0, 0, 0), (16, 16, 16))
    assert scan.absent == 1 and not crop[:8, 8:, 8:].any() and (crop[8:] == 7).all()


@pytest.mark.parametrize("flags, message", [
    (["--overlap", "nan"], "--overlap nan: must be a finite number"),
    (["--batch_size", "2", "--blend", "cosine"], "--blend 'cosine': choose one of gaussian, constant"),
    (["--device", "gpu"], "--device 'gpu': choose auto, cpu, cuda or cuda:N"),
    (["--compile", "maybe"], "--compile 'maybe': choose one of auto, true, false"),
])
def test_settings_are_checked_before_any_work(tmp_path, flags, message):
    with pytest.raises(InputError, match=message):
        inference.main(["--volume", "missing.h5", "--checkpoint", "missing.pth", "--out", str(tmp_path / "p.h5"), *flags])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_that_is_not_there_is_named(tmp_path):
    with pytest.raises(InputError, match="--device cuda:1: no CUDA device is available here; use --device cpu"):
        inference.main(["--volume", str(_field(tmp_path)), "--checkpoint", "missing.pth", "--out", str(tmp_path / "p.h5"),
                        "--device", "cuda:1"])


def _interrupt():
    raise KeyboardInterrupt


def _converted_interrupt():  # as h5py's Cython code does when Ctrl-C lands inside HDF5
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise TypeError("Operation not defined for data type class") from None


def _unrelated_failure():
    try:
        raise ValueError("handled")
    except ValueError:
        raise TypeError("a real bug") from None


def _interrupt_in_a_finalizer():  # as when Ctrl-C lands while an HDF5 object is let go: Python reports it and goes on
    class Finalized:
        def __del__(self):
            raise KeyboardInterrupt

    Finalized()
    for _ in range(10**8):  # the stage's own work (seconds), which the Ctrl-C must stop
        pass


@pytest.fixture
def ctrl_c_handled():
    """SIGINT raising KeyboardInterrupt, as in a stage started from a terminal, even where this test suite runs with
    it ignored (started with `&` by a script): run_main raises a Ctrl-C again with `_thread.interrupt_main`, which
    does nothing while SIGINT is ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("stage", [_interrupt, _converted_interrupt, _interrupt_in_a_finalizer])
def test_ctrl_c_exits_130_with_one_line(capsys, ctrl_c_handled, stage):
    with pytest.raises(SystemExit) as stop:
        run_main(stage, interrupted="what is kept, and how to go on")
    assert stop.value.code == 130
    assert capsys.readouterr().err == "\ninterrupted: what is kept, and how to go on\n"


def test_other_errors_pass_through_run_main():
    with pytest.raises(TypeError, match="a real bug"):
        run_main(_unrelated_failure)


def test_a_score_without_ink_is_valid_json_with_nulls(tmp_path, capsys):
    shape = (16, 16, 16)
    scan = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    for name, dataset, values in (("p.h5", volume.PREDICTIONS, scan // 2), ("t.h5", volume.GROUND_TRUTH, np.zeros(shape, np.uint8)),
                                  ("s.h5", volume.SCAN, scan)):
        with h5py.File(tmp_path / name, "w") as file:
            volume.create_volume(file, dataset, shape, np.uint8)[:] = values
    score_3d.main(["--predictions", str(tmp_path / "p.h5"), "--ground_truth", str(tmp_path / "t.h5"), "--volume", str(tmp_path / "s.h5"),
                   "--air_level", "60", "--out", str(tmp_path / "score.json")])
    assert "air: the scan at or below 60 (--air_level 60)" in capsys.readouterr().out
    score = json.loads((tmp_path / "score.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert score["auc"] is None and score["ink_median"] is None and score["ink_p95"] is None and score["threshold"] is None
    assert score["f05"] == 0.0 and score["air_median"] == pytest.approx(np.median(scan[scan <= 60] // 2) / 255, abs=1 / 255)


@pytest.mark.parametrize("script", ["inference.py", "connected_components_explore.py", "train.py", "all_labels_to_hdf.py"])
def test_help_texts_name_only_flags_the_script_has(script):
    """Every `--flag` a script's --help text names (its docstring and settings) is one of its flags."""
    import importlib
    import re

    from ink3d.config import build_parser
    parser = build_parser(vars(importlib.import_module(script[:-3])))
    flags = {action.option_strings[0] for action in parser._actions if action.option_strings}
    named = set(re.findall(r"(--[a-z][a-z_0-9]*)", parser.format_help()))
    assert named <= flags | {"--help", "--nproc_per_node"}, named - flags  # torchrun's own flag


@pytest.mark.parametrize("module, old, new", [
    ("inference", "--skip_max", "--air_level \\(auto: the level the checkpoint was trained with; none: run every window; or a number\\)"),
    ("inference", "--block", "--macro_block"),
    ("connected_components_explore", "--min_scan", "--air_level \\(auto: estimated from the scan; none: no air filter"),
    ("connected_components_explore", "--block", "--macro_block"),
    ("flatten_3d", "--predictions", "--volume"),
])
def test_a_renamed_flag_is_refused_with_its_new_name(module, old, new, tmp_path):
    stage = __import__(module)
    with pytest.raises(InputError, match=f"^{old} is now {new}"):
        stage.main([f"{old}=1", "--out_dir", str(tmp_path)] if module != "inference" else [old, "1", "--out", str(tmp_path / "p.h5")])
    assert list(tmp_path.iterdir()) == []

