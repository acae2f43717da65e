import json

import h5py
import numpy as np
import pytest
import tifffile

import volume_to_hdf
from stage_process import run_stage
from ink3d import InputError, files
from ink3d.pyramid import write_ome_zarr

SHAPE = (37, 53, 61)


def _stack(tmp_path, dtype, name="{}.tif", first=1):
    rng = np.random.default_rng(1)
    high = 256 if dtype == np.uint8 else 65536
    data = rng.integers(0, high, SHAPE, dtype=np.int64).astype(dtype)
    data.flat[:4] = [0, 128, 129, high - 1]  # rounding edges of the uint16 mapping
    folder = tmp_path / "tiffs"
    folder.mkdir()
    for z, image in enumerate(data):
        tifffile.imwrite(folder / name.format(z + first), image)
    return folder, data


def _convert(folder, out, *extra):
    volume_to_hdf.main(["--tiff_dir", str(folder), "--out", str(out), "--chunk", "16", *extra])
    with h5py.File(out) as file:
        return file["scan_volume"][:], dict(file["scan_volume"].attrs)


def test_uint8_stack_is_copied_voxel_exact(tmp_path):
    folder, data = _stack(tmp_path, np.uint8)
    converted, attrs = _convert(folder, tmp_path / "scan.h5")
    assert converted.dtype == np.uint8 and np.array_equal(converted, data)
    assert attrs["axes"] == "zyx" and attrs["complete"]


def test_uint16_stack_is_mapped_by_rounding(tmp_path):
    folder, data = _stack(tmp_path, np.uint16)
    converted, _ = _convert(folder, tmp_path / "scan.h5")
    expected = np.round(data.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(converted, expected)


def test_natural_order_of_names(tmp_path):
    folder, data = _stack(tmp_path, np.uint8)  # 1.tif ... 37.tif: lexical order would put 10 before 2
    converted, _ = _convert(folder, tmp_path / "scan.h5")
    assert np.array_equal(converted[1], data[1]) and np.array_equal(converted[9], data[9])


def test_percentile_window(tmp_path):
    folder, data = _stack(tmp_path, np.uint16)
    converted, attrs = _convert(folder, tmp_path / "scan.h5", "--window", "10,90", "--window_sample_slices", "100")
    low, high = np.percentile(np.concatenate([s.ravel()[::7] for s in data]), [10, 90])
    expected = np.clip(np.round((data - low) * 255 / (high - low)), 0, 255)
    assert np.array_equal(converted, expected)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
    folder, _ = _stack(tmp_path, np.uint16)
    reference, _ = _convert(folder, tmp_path / "reference.h5")
    original = volume_to_hdf.read_slice
    calls = []

    def failing_read(path):
        if path.name == "20.tif":
            raise KeyboardInterrupt  # the user stops the run in the second slab
        calls.append(path.name)
        return original(path)

    monkeypatch.setattr(volume_to_hdf, "read_slice", failing_read)
    with pytest.raises(KeyboardInterrupt):
        _convert(folder, tmp_path / "scan.h5")
    monkeypatch.setattr(volume_to_hdf, "read_slice", original)
    assert not (tmp_path / "scan.h5").exists()  # the output name only ever holds a complete volume
    with h5py.File(tmp_path / "scan.h5.partial") as file:
        assert file["scan_volume"].attrs["slabs_done"] == 1 and not file["scan_volume"].attrs["complete"]
    with pytest.raises(InputError, match="interrupted run; pass --resume true"):
        _convert(folder, tmp_path / "scan.h5")
    with pytest.raises(InputError, match="different window"):
        _convert(folder, tmp_path / "scan.h5", "--resume", "true", "--window", "1,99")
    calls.clear()
    monkeypatch.setattr(volume_to_hdf, "read_slice", lambda path: calls.append(path.name) or original(path))
    resumed, attrs = _convert(folder, tmp_path / "scan.h5", "--resume", "true")
    finished_slab = {f"{z}.tif" for z in range(2, 17)}  # 1.tif is read again only for the stack's shape
    assert not finished_slab & set(calls)
    assert np.array_equal(resumed, reference) and attrs["complete"]
    assert not (tmp_path / "scan.h5.partial").exists()
    assert volume_to_hdf.convert(volume_to_hdf.parse_config(vars(volume_to_hdf), [
        "--tiff_dir", str(folder), "--out", str(tmp_path / "scan.h5"), "--chunk", "16", "--resume", "true"]))[0].endswith(
        "nothing to resume (--overwrite true redoes it)")


def test_a_damaged_finished_slab_is_found_and_redone(tmp_path, monkeypatch):
    folder, _ = _stack(tmp_path, np.uint8)
    reference, _ = _convert(folder, tmp_path / "reference.h5")
    original = volume_to_hdf.read_slice
    monkeypatch.setattr(volume_to_hdf, "read_slice", lambda path: original(path) if path.name != "36.tif" else (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _convert(folder, tmp_path / "scan.h5")
    monkeypatch.setattr(volume_to_hdf, "read_slice", original)
    with h5py.File(tmp_path / "scan.h5.partial", "a") as file:  # finished slabs 0 and 1; one voxel of slab 1 lost
        assert file["scan_volume"].attrs["slabs_done"] == 2
        file["scan_volume"][20, 5, 5] ^= 1
    report = volume_to_hdf.convert(volume_to_hdf.parse_config(vars(volume_to_hdf), [
        "--tiff_dir", str(folder), "--out", str(tmp_path / "scan.h5"), "--chunk", "16", "--resume", "true"]))
    assert report[0] == "resuming: 1 finished slabs verified, 1 damaged ones redone"
    with h5py.File(tmp_path / "scan.h5") as file:
        assert np.array_equal(file["scan_volume"][:], reference)


@pytest.mark.parametrize("content", [
    b"\x89HDF\r\n\x1a\n" + bytes(40),  # killed mid-superblock
    b"",  # killed as the file was created
])
def test_a_run_killed_as_it_created_its_file_resumes_from_the_start(tmp_path, content):
    folder, data = _stack(tmp_path, np.uint8)
    (tmp_path / "scan.h5.partial").write_bytes(content)
    converted, _ = _convert(folder, tmp_path / "scan.h5", "--resume", "true")
    assert np.array_equal(converted, data) and not (tmp_path / "scan.h5.partial").exists()


def test_a_large_partial_file_that_cannot_be_opened_says_start_over(tmp_path):
    folder, _ = _stack(tmp_path, np.uint8)
    (tmp_path / "scan.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(files.NEWLY_CREATED_BYTES))
    with pytest.raises(InputError, match="cannot be opened to resume.*start over with --overwrite true"):
        _convert(folder, tmp_path / "scan.h5", "--resume", "true")
    converted, _ = _convert(folder, tmp_path / "scan.h5", "--overwrite", "true")
    assert converted.shape == SHAPE and not (tmp_path / "scan.h5.partial").exists()


def test_a_full_disk_stops_cleanly_and_resume_completes_the_volume(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (64, 96, 96), dtype=np.uint8)  # noise: 147 KB per 16-slice slab, whatever the codec
    folder = tmp_path / "tiffs"
    folder.mkdir()
    for z, image in enumerate(data):
        tifffile.imwrite(folder / f"{z}.tif", image)
    argv = ["--tiff_dir", str(folder), "--out", str(tmp_path / "scan.h5"), "--chunk", "16"]
    run = run_stage("volume_to_hdf.py", argv, file_bytes=400_000)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "scan.h5.partial: writing failed (File too large); what was finished is kept" in run.stderr
    assert not (tmp_path / "scan.h5").exists()
    resumed, attrs = _convert(folder, tmp_path / "scan.h5", "--resume", "true")
    assert np.array_equal(resumed, data) and attrs["complete"]


def test_existing_output_is_not_overwritten(tmp_path):
    folder, _ = _stack(tmp_path, np.uint8)
    out = tmp_path / "scan.h5"
    out.write_bytes(b"precious")
    with pytest.raises(InputError, match="exists"):
        _convert(folder, out)
    assert out.read_bytes() == b"precious"
    tifffile.imwrite(folder / "30.tif", np.zeros((53, 60), np.uint8))
    with pytest.raises(InputError, match=r"30\.tif"):
        _convert(folder, out, "--overwrite", "true")
    assert out.read_bytes() == b"precious"  # a failed overwrite leaves the previous output as it was
    tifffile.imwrite(folder / "30.tif", np.zeros(SHAPE[1:], np.uint8))
    converted, _ = _convert(folder, out, "--overwrite", "true")
    assert converted.shape == SHAPE


@pytest.mark.parametrize("flag, value", [("--chunk", "0"), ("--workers", "-1"), ("--window_sample_slices", "0")])
def test_settings_out_of_range_are_refused_before_any_output(tmp_path, flag, value):
    folder, _ = _stack(tmp_path, np.uint8)
    with pytest.raises(InputError, match=f"{flag} {value}: must be"):
        _convert(folder, tmp_path / "scan.h5", flag, value)
    assert list(tmp_path.iterdir()) == [folder]


def test_wrong_shaped_slice_is_named(tmp_path):
    folder, _ = _stack(tmp_path, np.uint8)
    tifffile.imwrite(folder / "30.tif", np.zeros((53, 60), np.uint8))
    with pytest.raises(InputError, match=r"30\.tif.*\(53, 60\)"):
        _convert(folder, tmp_path / "scan.h5")


def test_wrong_dtype_slice_is_named(tmp_path):
    folder, _ = _stack(tmp_path, np.uint8)
    tifffile.imwrite(folder / "5.tif", np.zeros(SHAPE[1:], np.uint16))
    with pytest.raises(InputError, match=r"5\.tif.*uint16"):
        _convert(folder, tmp_path / "scan.h5")


def test_gap_in_numbering_is_named(tmp_path):
    folder, _ = _stack(tmp_path, np.uint8)
    (folder / "12.tif").unlink()
    with pytest.raises(InputError, match=r"jumps from 11 to 13 at 13\.tif"):
        _convert(folder, tmp_path / "scan.h5")


def test_a_slice_of_two_pages_is_refused_by_name(tmp_path):
    folder, data = _stack(tmp_path, np.uint8)
    tifffile.imwrite(folder / "5.tif", data[0], append=True)  # a second page appended to slice 5
    with pytest.raises(InputError, match=r"5\.tif: a slice holds 2 pages; a slice is one image"):
        _convert(folder, tmp_path / "scan.h5")
    assert not (tmp_path / "scan.h5").exists()


def test_a_disabled_progress_bar_converts_as_a_shown_one(tmp_path, monkeypatch):
    """TQDM_DISABLE=1 makes every bar a disabled one, which keeps no count of its own."""
    import functools

    from tqdm import tqdm
    folder, data = _stack(tmp_path, np.uint8)
    monkeypatch.setattr(volume_to_hdf, "tqdm", functools.partial(tqdm, disable=True))
    converted, attrs = _convert(folder, tmp_path / "scan.h5")
    assert np.array_equal(converted, data) and attrs["complete"]


def test_corrupt_slice_is_named(tmp_path):
    folder, _ = _stack(tmp_path, np.uint8)
    (folder / "7.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match=r"7\.tif: cannot read"):
        _convert(folder, tmp_path / "scan.h5")


def test_a_zarr_volume_converts_like_its_tiff_stack_and_resumes(tmp_path, monkeypatch):
    folder, data = _stack(tmp_path, np.uint16)
    write_ome_zarr(tmp_path / "scan.zarr", data, levels=1, chunk=16)
    from_tiff, _ = _convert(folder, tmp_path / "tiff.h5", "--window", "5,95")
    original = volume_to_hdf.ZarrStack.read
    monkeypatch.setattr(volume_to_hdf.ZarrStack, "read", lambda self, start, stop, pool: (
        (_ for _ in ()).throw(KeyboardInterrupt) if start == 32 else original(self, start, stop, pool)))
    with pytest.raises(KeyboardInterrupt):
        _convert("unused", tmp_path / "zarr.h5", "--zarr", str(tmp_path / "scan.zarr"), "--window", "5,95")
    monkeypatch.setattr(volume_to_hdf.ZarrStack, "read", original)
    from_zarr, attrs = _convert("unused", tmp_path / "zarr.h5", "--zarr", str(tmp_path / "scan.zarr"), "--window", "5,95", "--resume", "true")
    assert np.array_equal(from_zarr, from_tiff) and json.loads(attrs["source"])["zarr"] == str((tmp_path / "scan.zarr").resolve())
    # complete: a resume of the same conversion has nothing to do; of another source, or other settings, is refused
    _convert("unused", tmp_path / "zarr.h5", "--zarr", str(tmp_path / "scan.zarr"), "--window", "5,95", "--resume", "true")
    with pytest.raises(InputError, match="tiff.h5: cannot resume, it was made from another stack"):
        _convert("unused", tmp_path / "tiff.h5", "--zarr", str(tmp_path / "scan.zarr"), "--window", "5,95", "--resume", "true")
    with pytest.raises(InputError, match="zarr.h5: cannot resume with different window"):
        _convert("unused", tmp_path / "zarr.h5", "--zarr", str(tmp_path / "scan.zarr"), "--resume", "true")
