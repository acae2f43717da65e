"""pred_find_coords: block origins against brute force, and the distance filter against a dense reference."""

import h5py
import numpy as np
import pytest

import pred_find_coords
from ink3d import volume
from ink3d.coords import drop_near


def _labels_file(path, ink_count, ink_sum, chunk):
    with h5py.File(path, "w") as file:
        volume.create_volume(file, volume.INK_SUM, ink_sum.shape, np.float32, chunk)[:] = ink_sum
        volume.create_volume(file, volume.INK_COUNT, ink_count.shape, np.uint16, chunk)[:] = ink_count


@pytest.mark.parametrize("block, chunk", [(8, 8), (8, 5), (5, 16)])
def test_find_coords_equals_brute_force(tmp_path, block, chunk):
    rng = np.random.default_rng(block * chunk)
    shape = (19, 23, 30)
    ink_count = (rng.random(shape) < 0.002).astype(np.uint16) * rng.integers(1, 4, shape).astype(np.uint16)
    ink_sum = (ink_count * rng.random(shape)).astype(np.float32)
    _labels_file(tmp_path / "labels.h5", ink_count, ink_sum, chunk)
    pred_find_coords.main(["--labels", str(tmp_path / "labels.h5"), "--out", str(tmp_path / "c.npy"),
                           "--out_ink", str(tmp_path / "ink.npy"), "--block", str(block), "--min_labeled", "2"])
    expected, expected_ink = [], []
    for z in range(0, shape[0], block):
        for y in range(0, shape[1], block):
            for x in range(0, shape[2], block):
                count = ink_count[z:z + block, y:y + block, x:x + block]
                total = ink_sum[z:z + block, y:y + block, x:x + block]
                if (count > 0).sum() >= 2:
                    expected.append([z, y, x])
                if (total[count > 0] / count[count > 0] > 0.5).any():
                    expected_ink.append([z, y, x])
    coords = np.load(tmp_path / "c.npy")
    assert coords.dtype == np.int32 and coords.shape[1] == 3
    assert coords.tolist() == expected and len(expected) > 0
    assert np.load(tmp_path / "ink.npy").tolist() == expected_ink


def test_distance_filter_equals_dense_reference():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 2000, (500, 3))
    valid = rng.integers(0, 2000, (40, 3))
    kept, dropped = drop_near(train, valid, 512)
    dense = np.linalg.norm(train[:, None] - valid[None], axis=-1).min(axis=1)
    assert np.array_equal(kept, train[dense >= 512]) and dropped == (dense < 512).sum() > 0
    assert drop_near(train, valid[:0], 512)[1] == 0
