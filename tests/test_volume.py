import shutil

import h5py
import numpy as np
import pytest
import zarr

from ink3d import InputError
from ink3d.files import check_output, warn_if_short_of_space
from ink3d.blocks import chunks_of, iter_blocks, parse_roi, reset_unreadable_chunks
from ink3d.pyramid import write_ome_zarr
from ink3d.volume import create_volume, open_dataset, read_crop
from volume_files import ome_v04


def test_create_volume_is_chunked_compressed_zyx(dataset):
    _, stored = dataset
    assert stored.chunks == (4, 4, 4)
    assert stored.attrs["axes"] == "zyx"
    assert stored.compression is not None or stored._filters


@pytest.mark.parametrize("origin", [(0, 0, 0), (-2, 3, 5), (4, -1, -3), (10, 10, 10)])
def test_read_crop_clips_and_pads(dataset, origin):
    data, stored = dataset
    shape = (3, 4, 5)
    padded = np.full((25, 26, 27), 9999, data.dtype)
    padded[10:15, 10:16, 10:17] = data
    z, y, x = (o + 10 for o in origin)
    expected = padded[z:z + 3, y:y + 4, x:x + 5]
    crop = read_crop(stored, origin, shape, fill=9999)
    assert np.array_equal(crop, expected) and crop.dtype == data.dtype and crop.flags.writeable


def test_iter_blocks_tiles_exactly_once():
    shape = (5, 9, 4)
    hits = np.zeros(shape, int)
    for block in iter_blocks(shape, 4):
        hits[block] += 1
    assert np.all(hits == 1)
    assert len(list(iter_blocks(shape, (2, 3, 4)))) == 3 * 3 * 1


def test_parse_roi():
    assert parse_roi("", (4, 5, 6)) == (slice(0, 4), slice(0, 5), slice(0, 6))
    assert parse_roi("1:3,:,2:", (4, 5, 6)) == (slice(1, 3), slice(0, 5), slice(2, 6))
    for bad in ("1:3,:", "3:1,:,:", "0:9,:,:", "a:b,:,:"):
        with pytest.raises(InputError):
            parse_roi(bad, (4, 5, 6))


def test_open_dataset_names_the_missing_dataset(dataset, tmp_path):
    with pytest.raises(InputError, match="no dataset 'predictions'.*scan_volume"):
        open_dataset(tmp_path / "v.h5", "predictions")
    with pytest.raises(InputError, match="not found"):
        open_dataset(tmp_path / "none.h5", "scan_volume")


def test_open_dataset_refuses_an_incomplete_or_flat_volume(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w") as file:
        create_volume(file, "scan_volume", (4, 4, 4), np.uint8).attrs["complete"] = False
        file.create_dataset("flat", data=np.zeros((4, 4), np.uint8))
        file.create_group("group")
    with pytest.raises(InputError, match="v.h5: dataset 'scan_volume' is not complete .*--resume true"):
        open_dataset(tmp_path / "v.h5", "scan_volume")
    with pytest.raises(InputError, match="v.h5: 'flat' is shape \\(4, 4\\), expected a dataset with 3 axes"):
        open_dataset(tmp_path / "v.h5", "flat")
    with pytest.raises(InputError, match="'group' is a group"):
        open_dataset(tmp_path / "v.h5", "group")


def test_chunks_of_a_box():
    class Dataset:
        shape, chunks = (10, 9, 8), (4, 4, 4)

    chunks = chunks_of(Dataset, (slice(3, 5), slice(0, 4), slice(7, 8)))
    assert chunks == [(slice(0, 4), slice(0, 4), slice(4, 8)), (slice(4, 8), slice(0, 4), slice(4, 8))]


def test_unreadable_chunks_are_reset_and_the_rest_kept(tmp_path):
    data = (np.arange(32**3).reshape(32, 32, 32) // 97).astype(np.uint8)  # compressible: chunks go through blosc
    with h5py.File(tmp_path / "v.h5", "w") as file:
        create_volume(file, "scan_volume", data.shape, np.uint8, chunk=16)[:] = data
        info = file["scan_volume"].id.get_chunk_info_by_coord((16, 0, 0))
    with open(tmp_path / "v.h5", "r+b") as raw:  # the bytes of chunk (16, 0, 0) are lost
        raw.seek(info.byte_offset)
        raw.write(bytes(info.size))
    with h5py.File(tmp_path / "v.h5", "r+") as file:
        dataset = file["scan_volume"]
        with pytest.raises(OSError):
            dataset[16:32, 0:16, 0:16]
        reset = reset_unreadable_chunks(dataset, [(slice(0, 32), slice(0, 32), slice(0, 20))])
        assert reset == [(slice(16, 32), slice(0, 16), slice(0, 16))]
        expected = data.copy()
        expected[16:32, 0:16, 0:16] = 0
        assert np.array_equal(dataset[:], expected)


def test_an_output_whose_folder_cannot_be_made_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="file/out.h5: cannot create its folder"):
        check_output(tmp_path / "file" / "out.h5", overwrite=False)


def test_a_short_disk_is_warned_about(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 90, 10**9))
    with pytest.warns(UserWarning, match="1.0 GB free, the output holds up to 2.0 GB before compression"):
        warn_if_short_of_space(tmp_path / "out.h5", 2 * 10**9)


def test_ome_zarr_levels_and_a_plain_zarr_array_read_like_hdf5(tmp_path):
    values = np.random.default_rng(0).integers(0, 256, (9, 10, 11)).astype(np.uint8)
    write_ome_zarr(tmp_path / "v.zarr", values, levels=2, chunk=4)
    _, level0 = open_dataset(tmp_path / "v.zarr", "scan_volume")
    assert level0.shape == values.shape and level0.dtype == np.uint8 and np.array_equal(level0[2:7, :, 3], values[2:7, :, 3])
    assert np.array_equal(read_crop(level0, (-1, 8, 9), (4, 4, 4)), np.pad(values, 4)[3:7, 12:16, 13:17])
    _, level1 = open_dataset(tmp_path / "v.zarr", "scan_volume", level=1)
    padded = np.pad(values.astype(float), ((0, 1), (0, 0), (0, 1)), mode="edge")
    assert level1.shape == (5, 5, 6) and np.array_equal(level1[:], np.rint(padded.reshape(5, 2, 5, 2, 6, 2).mean(axis=(1, 3, 5))))
    _, array = open_dataset(tmp_path / "v.zarr" / "0", "ignored for zarr")
    assert np.array_equal(array[:], values)
    _, published = open_dataset(ome_v04(tmp_path / "v04.zarr", values), "scan_volume")
    assert np.array_equal(published[:], values)


def test_write_ome_zarr_is_valid_ome_zarr_0_5(tmp_path):
    image = pytest.importorskip("ome_zarr_models.v05.image", reason="ome-zarr-models validates OME-Zarr metadata against the spec")
    write_ome_zarr(tmp_path / "v.zarr", np.zeros((9, 10, 11), np.uint8), levels=3, chunk=4)
    multiscale = image.Image.from_zarr(zarr.open_group(str(tmp_path / "v.zarr"), mode="r")).attributes.ome.multiscales[0]
    assert [axis.name for axis in multiscale.axes] == ["z", "y", "x"]
    assert [dataset.coordinateTransformations[0].scale for dataset in multiscale.datasets] == [[1.0] * 3, [2.0] * 3, [4.0] * 3]


def test_uint16_zarr_reads_as_uint8_like_volume_to_hdf(tmp_path):
    values = np.array([0, 128, 129, 257, 32767, 65535], np.uint16).reshape(1, 2, 3)
    _, volume16 = open_dataset(ome_v04(tmp_path / "v.zarr", values), "scan_volume")
    assert volume16.dtype == np.uint8 and volume16[:].tolist() == [[[0, 0, 1], [1, 127, 255]]]  # round(v * 255 / 65535)


@pytest.mark.parametrize("make, message", [
    (lambda p: zarr.open_group(str(p), mode="w").create_array("0", shape=(2, 2, 2), dtype="uint8"), "without OME-Zarr multiscales metadata; give the array inside it \\(arrays: 0\\)"),
    (lambda p: zarr.open_array(str(p), mode="w", shape=(2, 2, 2), dtype="float64"), "dtype float64; volumes must be uint8 or uint16"),
    (lambda p: ome_v04(p, np.zeros((2, 2, 2), np.uint8), axes=("x", "y", "z")), "axes \\['x', 'y', 'z'\\]; the pipeline reads volumes with axes z, y, x"),
    (lambda p: zarr.open_array(str(p), mode="w", shape=(2, 2), dtype="uint8"), "shape \\(2, 2\\), expected 3 axes"),
])
def test_bad_zarr_volumes_are_named(tmp_path, make, message):
    make(tmp_path / "bad.zarr")
    with pytest.raises(InputError, match=message):
        open_dataset(tmp_path / "bad.zarr", "scan_volume")


def test_a_level_the_multiscale_lacks_is_named(tmp_path):
    write_ome_zarr(tmp_path / "v.zarr", np.zeros((4, 4, 4), np.uint8), levels=2, chunk=4)
    with pytest.raises(InputError, match="--level 2: the multiscale has levels 0..1"):
        open_dataset(tmp_path / "v.zarr", "scan_volume", level=2)


def test_a_folder_of_slice_tiffs_given_as_a_scan_names_the_conversion(tmp_path):
    import tifffile

    (tmp_path / "volume").mkdir()
    tifffile.imwrite(tmp_path / "volume" / "00000.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match=r"volume: a folder of slice TIFFs; .*python volume_to_hdf.py --tiff_dir .*volume --out .*volume\.h5"):
        open_dataset(tmp_path / "volume", "scan_volume")
