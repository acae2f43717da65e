import h5py
import numpy as np
import pytest

from ink3d import InputError
from ink3d.volume import create_volume, iter_blocks, open_dataset, parse_roi, read_crop


@pytest.fixture
def dataset(tmp_path):
    data = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7)
    with h5py.File(tmp_path / "v.h5", "w") as file:
        create_volume(file, "scan_volume", data.shape, data.dtype, chunk=4)[:] = data
    file = h5py.File(tmp_path / "v.h5", "r")
    yield data, file["scan_volume"]
    file.close()


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
    assert np.array_equal(read_crop(stored, origin, shape, fill=9999), expected)


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
