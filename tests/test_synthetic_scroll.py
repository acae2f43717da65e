import filecmp

import cv2
import h5py
import numpy as np
import pytest
import tifffile

import make_synthetic_scroll
from ink3d import volume
from ink3d.ppm import positions_along_normals, read_ppm, valid_mask


@pytest.fixture(scope="module")
def truth(synthetic_scroll) -> np.ndarray:
    with h5py.File(synthetic_scroll / "ground_truth.h5") as file:
        return file[volume.GROUND_TRUTH][:]


def _segment(scroll_dir, segment_id):
    ppm = read_ppm(scroll_dir / "paths" / segment_id / f"{segment_id}.ppm")
    label = cv2.imread(str(scroll_dir / "labels" / f"{segment_id}_inklabels.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(scroll_dir / "paths" / segment_id / f"{segment_id}_mask.png"), cv2.IMREAD_UNCHANGED)
    return ppm, label, mask


def test_layout_and_description(synthetic_scroll, scroll_info):
    assert scroll_info["shape"] == [160, 256, 256]
    assert len(sorted((synthetic_scroll / "volume").glob("*.tif"))) == 160
    assert tifffile.imread(synthetic_scroll / "volume" / "00000.tif").dtype == np.uint16
    ids = scroll_info["segments"]
    assert len(ids) >= 5 and all(len(i) == 14 and i.isdigit() for i in ids)
    assert set(scroll_info["valid_segments"]) < set(ids)
    assert any(a[:-1] == b[:-1] and a != b for a in ids for b in ids), "one segment comes in two versions"
    for segment_id in ids:
        ppm, label, mask = _segment(synthetic_scroll, segment_id)
        assert label.shape == mask.shape == (ppm.height, ppm.width)
        assert set(np.unique(label)) <= {0, 255}
        assert 0.1 < (label > 0).mean() < 0.6


def test_same_seed_gives_identical_files(synthetic_scroll, tmp_path):
    make_synthetic_scroll.main(["--out_dir", str(tmp_path), "--seed", "0"])
    for relative in ["volume/00000.tif", "volume/00093.tif", "scroll.json", "labels/20231012184421_inklabels.png",
                     "paths/20231012184421/20231012184421.ppm", "paths/20231012184421/20231012184421_mask.png"]:
        assert filecmp.cmp(synthetic_scroll / relative, tmp_path / relative, shallow=False), relative
    with h5py.File(synthetic_scroll / "ground_truth.h5") as a, h5py.File(tmp_path / "ground_truth.h5") as b:
        assert np.array_equal(a["ink"][:], b["ink"][:])


def test_other_seed_differs(synthetic_scroll, tmp_path):
    make_synthetic_scroll.main(["--out_dir", str(tmp_path), "--seed", "1"])
    assert not filecmp.cmp(synthetic_scroll / "volume/00080.tif", tmp_path / "volume/00080.tif", shallow=False)


def test_ppm_points_lie_in_the_volume_on_papyrus_with_unit_normals(synthetic_scroll, scroll_info, truth):
    shape = np.array(scroll_info["shape"])
    scan = np.stack([tifffile.imread(synthetic_scroll / "volume" / f"{z:05d}.tif") for z in range(shape[0])])
    for segment_id in scroll_info["segments"]:
        ppm, _, _ = _segment(synthetic_scroll, segment_id)
        data = np.asarray(ppm.data)
        valid = valid_mask(data)
        assert 0 < valid.mean() < 1, "segments have off-surface pixels"
        points = np.round(positions_along_normals(data[valid], [0.0])[:, 0]).astype(int)
        assert np.all(points >= 0) and np.all(points < shape)
        assert np.allclose(np.linalg.norm(data[valid][:, 3:], axis=1), 1.0)
        # the surface is the middle of the ink layer: papyrus lies 2-4 voxels inward along the normal
        inward = np.round(positions_along_normals(data[valid], [-4.0])[:, 0]).astype(int)
        papyrus = scan[tuple(inward.T)] / 65535
        assert np.median(papyrus) > 0.3  # papyrus, not air (air is ~0.08)
        assert not truth[tuple(inward.T)].any()


def test_flattening_ground_truth_reproduces_the_labels(synthetic_scroll, scroll_info, truth):
    for segment_id in scroll_info["segments"]:
        ppm, label, _ = _segment(synthetic_scroll, segment_id)
        data = np.asarray(ppm.data)
        valid = valid_mask(data)
        positions = np.round(positions_along_normals(data, np.arange(-3.0, 4.0))).astype(int)
        flat = truth[tuple(np.moveaxis(positions, -1, 0))].max(axis=-1)
        ink, labelled = (flat > 0) & valid, (label > 0) & valid
        assert (ink & labelled).sum() / (ink | labelled).sum() > 0.95


def test_ink_is_not_separable_by_a_global_threshold(synthetic_scroll, truth):
    """Ink voxels overlap papyrus voxels in intensity: the best threshold's F0.5 stays low."""
    truth = truth[40:120] > 0
    scan = np.stack([tifffile.imread(synthetic_scroll / "volume" / f"{z:05d}.tif") for z in range(40, 120)])
    thresholds = np.quantile(scan, np.linspace(0.5, 0.999, 60))
    best = 0.0
    for threshold in thresholds:
        predicted = scan > threshold
        tp = (predicted & truth).sum()
        precision, recall = tp / max(predicted.sum(), 1), tp / truth.sum()
        if tp:
            best = max(best, 1.25 * precision * recall / (0.25 * precision + recall))
    assert best < 0.5
