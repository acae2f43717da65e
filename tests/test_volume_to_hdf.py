import h5py
import numpy as np
import pytest
import tifffile

import volume_to_hdf
from ink3d import InputError

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
    with h5py.File(tmp_path / "scan.h5") as file:
        assert file["scan_volume"].attrs["slabs_done"] == 1 and not file["scan_volume"].attrs["complete"]
    with pytest.raises(InputError, match="exists"):
        _convert(folder, tmp_path / "scan.h5")
    with pytest.raises(InputError, match="different window"):
        _convert(folder, tmp_path / "scan.h5", "--resume", "true", "--window", "1,99")
    calls.clear()
    monkeypatch.setattr(volume_to_hdf, "read_slice", lambda path: calls.append(path.name) or original(path))
    resumed, attrs = _convert(folder, tmp_path / "scan.h5", "--resume", "true")
    finished_slab = {f"{z}.tif" for z in range(2, 17)}  # 1.tif is read again only for the stack's shape
    assert not finished_slab & set(calls)
    assert np.array_equal(resumed, reference) and attrs["complete"]


def test_existing_output_is_not_overwritten(tmp_path):
    folder, _ = _stack(tmp_path, np.uint8)
    out = tmp_path / "scan.h5"
    out.write_bytes(b"precious")
    with pytest.raises(InputError, match="exists"):
        _convert(folder, out)
    assert out.read_bytes() == b"precious"
    converted, _ = _convert(folder, out, "--overwrite", "true")
    assert converted.shape == SHAPE


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


def test_corrupt_slice_is_named(tmp_path):
    folder, _ = _stack(tmp_path, np.uint8)
    (folder / "7.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match=r"7\.tif: cannot read"):
        _convert(folder, tmp_path / "scan.h5")
