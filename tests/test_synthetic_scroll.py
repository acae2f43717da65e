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


def test_same_seed_gives_identical_files(tmp_path):
    for run in ("a", "b"):  # a thin scroll twice: every file the generator writes, made again
        make_synthetic_scroll.main(["--out_dir", str(tmp_path / run), "--seed", "0", "--depth", "32"])
    for relative in ["volume/00000.tif", "volume/00029.tif", "scroll.json", "labels/20231012184421_inklabels.png",
                     "paths/20231012184421/20231012184421.ppm", "paths/20231012184421/20231012184421_mask.png"]:
        assert filecmp.cmp(tmp_path / "a" / relative, tmp_path / "b" / relative, shallow=False), relative
    with h5py.File(tmp_path / "a" / "ground_truth.h5") as a, h5py.File(tmp_path / "b" / "ground_truth.h5") as b:
        assert np.array_equal(a["ink"][:], b["ink"][:]) and a["ink"][:].any()


def test_other_seed_differs(tmp_path):
    for seed in ("0", "1"):  # a thin scroll of each: same depth, same slices
        make_synthetic_scroll.main(["--out_dir", str(tmp_path / seed), "--seed", seed, "--depth", "16"])
    assert not filecmp.cmp(tmp_path / "0" / "volume/00010.tif", tmp_path / "1" / "volume/00010.tif", shallow=False)


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


@pytest.mark.parametrize("flags, flipped", [
    (["--ink_thickness", "5", "--surface_offset", "0.5"], False),
    (["--ink_thickness", "3", "--surface_offset", "3.5", "--flip_normals", "20231012184421"], True),
])
def test_variants_place_the_ink_where_scroll_json_says(tmp_path, flags, flipped):
    """Along every inked pixel's normal, the recorded ink depth lands in the true ink; 4 voxels deeper into the
    sheet does not (the papyrus), whichever way the normals point."""
    import json

    make_synthetic_scroll.main(["--out_dir", str(tmp_path), "--depth", "32", *flags])
    info = json.loads((tmp_path / "scroll.json").read_text())
    segment_id = "20231012184421"
    depth = info["ink_depth"][segment_id]
    thickness, offset = float(flags[1]), float(flags[3])
    assert depth == pytest.approx((-1 if flipped else 1) * (thickness / 2 - offset))
    with h5py.File(tmp_path / "ground_truth.h5") as file:
        truth = file[volume.GROUND_TRUTH][:]
    ppm, label, mask = _segment(tmp_path, segment_id)
    inked = valid_mask(ppm.data) & (label > 0) & (mask > 0)
    into_sheet = 1 if flipped else -1  # along the .ppm normal
    for offset_along, expected_share in ((depth, 0.8), (depth + 4 * into_sheet, 0.02)):
        positions = positions_along_normals(ppm.data[inked], np.array([offset_along]))[:, 0]
        voxels = np.rint(positions).astype(int)
        share = (truth[tuple(voxels.T)] > 0).mean()
        assert share >= expected_share if expected_share > 0.5 else share <= expected_share


def test_surface_jitter_drifts_the_segment_along_its_normal(tmp_path):
    import json

    make_synthetic_scroll.main(["--out_dir", str(tmp_path / "still"), "--depth", "32"])
    make_synthetic_scroll.main(["--out_dir", str(tmp_path / "drift"), "--depth", "32", "--surface_jitter", "2"])
    still, _, _ = _segment(tmp_path / "still", "20231012184421")
    drift, _, _ = _segment(tmp_path / "drift", "20231012184421")
    valid = valid_mask(still.data)
    moved = np.einsum("...i,...i->...", drift.data[..., :3] - still.data[..., :3], still.data[..., 3:])[valid]
    assert 1.0 < np.abs(moved).max() <= 2.05 and np.abs(moved).mean() > 0.2
    assert np.array_equal(tifffile.imread(tmp_path / "still" / "volume" / "00010.tif"),
                          tifffile.imread(tmp_path / "drift" / "volume" / "00010.tif"))  # the scroll itself is the same
    assert json.loads((tmp_path / "drift" / "scroll.json").read_text())["variant"]["surface_jitter"] == 2
