import json

import cv2
import h5py
import numpy as np
import pytest
import tifffile
import zarr

import all_labels_to_hdf
import flatten_3d
import inference
import make_synthetic_scroll
import volume_to_hdf
from ink3d import InputError, volume
from ink3d.ppm import open_segment, read_ppm, valid_mask
from ink3d.tifxyz import SurfaceMap, grid_normals, read_tifxyz, write_tifxyz

POINT_ERROR = 0.1  # voxels: a 4-pixel grid cell bulges step^2 / (8 R) = 0.053 off the innermost segment (R ~ 38)
NORMAL_ANGLE = 5.0  # degrees, at most: one-sided differences at the grid's edges; 0.5 degrees on average


@pytest.fixture(scope="module")
def scroll(tmp_path_factory):
    """The synthetic scroll (seed 0) also written as OME-Zarr and as tifxyz segments of one vertex per 4 pixels."""
    out = tmp_path_factory.mktemp("forms")
    make_synthetic_scroll.main(["--out_dir", str(out), "--ome_zarr", "true", "--tifxyz_step", "4"])
    return out


def _plane_grid(rows, cols, step):
    """Grid vertices of the plane y = 5 with columns along +x and rows along +z, every `step` pixels."""
    r, c = np.mgrid[0:rows, 0:cols].astype(float) * step
    return np.stack([10 + c, np.full_like(c, 5.0), 3 + r], axis=-1)


def test_a_plane_is_interpolated_exactly_with_the_ppm_normal_convention(tmp_path):
    write_tifxyz(tmp_path / "seg", _plane_grid(5, 6, 4), (0.25, 0.25))
    surface = SurfaceMap(tmp_path / "seg")
    assert (surface.height, surface.width) == (17, 21)
    data = surface.data[2:9, 3:20]
    r, c = np.mgrid[2:9, 3:20].astype(float)
    assert np.allclose(data[..., 0], 10 + c) and np.allclose(data[..., 1], 5) and np.allclose(data[..., 2], 3 + r)
    assert np.allclose(data[..., 3:], [0, -1, 0])  # d/dcolumn x d/drow = +x cross +z
    assert np.array_equal(surface.data[4:6], surface.data[4:6, :])


def test_invalid_vertices_and_the_mask_take_their_cells_off_the_surface(tmp_path):
    points = _plane_grid(4, 4, 2)
    points[1, 1] = -1  # the writers' invalid vertex
    mask = np.ones((4, 4), bool)
    mask[3, 3] = False
    write_tifxyz(tmp_path / "seg", points, (0.5, 0.5), mask)
    valid = valid_mask(SurfaceMap(tmp_path / "seg").data[:, :])  # 7 x 7 pixels, vertex (i, j) at pixel (2i, 2j)
    vertex = np.ones((4, 4), bool)
    vertex[1, 1] = vertex[3, 3] = False
    cell = vertex[:-1, :-1] & vertex[1:, :-1] & vertex[:-1, 1:] & vertex[1:, 1:]  # a pixel needs its cell's four vertices
    rows = np.minimum(np.arange(7) // 2, 2)
    assert np.array_equal(valid, cell[rows[:, None], rows[None, :]])
    assert valid.sum() == 7 * 7 - 16 - 9
    assert np.isnan(read_tifxyz(tmp_path / "seg")[0][1, 1]).all()


def test_pixels_equal_a_per_pixel_loop_of_the_bilinear_formula(tmp_path):
    rng = np.random.default_rng(4)
    points = np.cumsum(rng.normal(1, 0.3, (9, 7, 3)), axis=0) + np.cumsum(rng.normal(1, 0.3, (9, 7, 3)), axis=1) + 50
    points[2, 3] = points[6, 0] = np.nan  # invalid vertices
    write_tifxyz(tmp_path / "seg", points, (1 / 3, 1 / 3))
    surface = SurfaceMap(tmp_path / "seg", shape=(27, 20))  # one row past the last vertex: off the surface
    grids, last_row, last_col = (surface.points, surface.normals), points.shape[0] - 1, points.shape[1] - 1
    expected = np.zeros((27, 20, 6))
    for i, j in np.ndindex(27, 20):
        row, col = i * surface.sy, j * surface.sx
        r0, c0 = min(int(np.floor(row)), last_row - 1), min(int(np.floor(col)), last_col - 1)
        r1, c1, fr, fc = min(r0 + 1, last_row), min(c0 + 1, last_col), row - r0, col - c0
        point, normal = ((1 - fr) * ((1 - fc) * g[r0, c0] + fc * g[r0, c1]) + fr * ((1 - fc) * g[r1, c0] + fc * g[r1, c1]) for g in grids)
        length = np.sqrt(normal[0] ** 2 + normal[1] ** 2 + normal[2] ** 2)
        if row <= last_row and col <= last_col and np.isfinite(point).all() and np.isfinite(normal).all() and length > 0:
            expected[i, j] = np.concatenate([point, normal / length])
    assert 0 < (expected != 0).any(axis=-1).sum() < 27 * 20
    assert np.array_equal(surface.data[:, :], expected)
    assert all(np.array_equal(surface.data[r:r + 5, c:c + 6], expected[r:r + 5, c:c + 6]) for r in range(0, 27, 5) for c in range(0, 20, 6))


def test_grid_normals_of_a_cylinder_point_outwards():
    theta, z = np.meshgrid(np.linspace(0, 1, 9), np.arange(5.0), indexing="xy")
    points = np.stack([50 + 30 * np.cos(theta), 40 + 30 * np.sin(theta), z], axis=-1)  # rows along z, columns along the arc
    normals = grid_normals(points)
    radial = np.stack([np.cos(theta), np.sin(theta), 0 * theta], axis=-1)
    assert np.all(np.sum(normals * radial, axis=-1) > 0.99)


@pytest.mark.parametrize("breaks, message", [
    (lambda folder: (folder / "z.tif").unlink(), "tifxyz segment without z.tif"),
    (lambda folder: tifffile.imwrite(folder / "y.tif", np.zeros((3, 3), np.float32)), "x, y and z must be 2D images of one size"),
    (lambda folder: (folder / "meta.json").write_text("{}"), "needs \"scale\": \\[sx, sy\\]"),
    (lambda folder: (folder / "meta.json").write_text(json.dumps({"scale": [0, 1]})), "scale \\[0.0, 1.0\\] must lie in \\[0.01, 1\\]"),
    (lambda folder: (folder / "meta.json").write_text(json.dumps({"scale": [1e-4, 1e-4]})), "scale \\[0.0001, 0.0001\\] must lie in"),
])
def test_bad_tifxyz_folders_are_named(tmp_path, breaks, message):
    write_tifxyz(tmp_path / "seg", _plane_grid(4, 5, 1), (1.0, 1.0))
    breaks(tmp_path / "seg")
    with pytest.raises(InputError, match=message):
        read_tifxyz(tmp_path / "seg")


def test_tifxyz_agrees_with_the_ppm_of_the_same_surface(scroll):
    info = json.loads((scroll / "scroll.json").read_text())
    for segment_id in info["segments"]:
        ppm = np.asarray(read_ppm(scroll / "paths" / segment_id / f"{segment_id}.ppm").data[:])
        label = cv2.imread(str(scroll / "labels" / f"{segment_id}_inklabels.png"), cv2.IMREAD_GRAYSCALE)
        surface = open_segment(scroll / "tifxyz" / segment_id, label.shape).data[:, :]
        both = valid_mask(ppm) & valid_mask(surface)
        assert both.sum() > 0.85 * valid_mask(ppm).sum()  # the grid loses a cell's width at the masked edges
        assert np.linalg.norm(ppm[both, :3] - surface[both, :3], axis=-1).max() < POINT_ERROR
        angle = np.degrees(np.arccos(np.clip(np.sum(ppm[both, 3:] * surface[both, 3:], axis=-1), -1, 1)))
        assert angle.max() < NORMAL_ANGLE and angle.mean() < 0.5


def _labels(scroll, segments_dir, out, labels_dir=None):
    all_labels_to_hdf.main(["--ppm_dir", str(segments_dir), "--labels_dir", str(labels_dir or scroll / "labels"),
                            "--volume", str(scroll / "volume.zarr"),
                            "--out_train", str(out / "train.h5"), "--out_valid", str(out / "valid.h5"), "--valid_segments", "20231022170901"])
    with h5py.File(out / "valid.h5") as file:
        count = file[volume.INK_COUNT][:]
        return np.divide(file[volume.INK_SUM][:], count, out=np.full(count.shape, -1.0, np.float32), where=count > 0)


def test_labels_from_tifxyz_match_those_from_ppm(scroll, tmp_path):
    for form, folder in (("ppm", "paths"), ("tifxyz", "tifxyz")):  # the held-out segment and one to train on, each form
        for segment_id in ("20231022170901", "20231012184421"):
            (tmp_path / form / "segments" / segment_id).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / form / "segments" / segment_id).symlink_to(scroll / folder / segment_id)
    (tmp_path / "labels").mkdir()
    for segment_id in ("20231022170901", "20231012184421"):
        (tmp_path / "labels" / f"{segment_id}_inklabels.png").symlink_to(scroll / "labels" / f"{segment_id}_inklabels.png")
    from_ppm = _labels(scroll, tmp_path / "ppm" / "segments", tmp_path / "ppm", tmp_path / "labels")
    from_tifxyz = _labels(scroll, tmp_path / "tifxyz" / "segments", tmp_path / "tifxyz", tmp_path / "labels")
    both = (from_ppm >= 0) & (from_tifxyz >= 0)
    assert both.sum() > 0.85 * (from_ppm >= 0).sum()
    assert np.mean((from_ppm[both] > 0.5) == (from_tifxyz[both] > 0.5)) > 0.98  # ink / no ink agree voxel by voxel


def test_flattening_onto_tifxyz_matches_the_ppm(scroll, tmp_path):
    for name, segments in (("ppm", scroll / "paths"), ("tifxyz", scroll / "tifxyz")):
        flatten_3d.main(["--volume", str(scroll / "volume.zarr"), "--dataset", "scan_volume", "--ppm_dir", str(segments),
                         "--out_dir", str(tmp_path / name), "--segments", "20231022170901", "--name", "scan"])
    ppm, tifxyz = (cv2.imread(str(tmp_path / name / "20231022170901_scan.png"), cv2.IMREAD_GRAYSCALE) for name in ("ppm", "tifxyz"))
    masks = [cv2.imread(str(tmp_path / name / "20231022170901_scan_mask.png"), cv2.IMREAD_GRAYSCALE) > 0 for name in ("ppm", "tifxyz")]
    rows, cols = ppm.shape
    both = masks[0] & masks[1][:rows, :cols]
    difference = np.abs(ppm.astype(int) - tifxyz[:rows, :cols])[both]
    assert both.sum() > 0.85 * masks[0].sum() and difference.mean() < 1.0 and difference.max() <= 8


def test_a_tifxyz_folder_missing_z_stops_before_any_output(scroll, tmp_path):
    bad = tmp_path / "segments"
    for segment_id in json.loads((scroll / "scroll.json").read_text())["segments"]:
        (bad / segment_id).mkdir(parents=True)
        for name in ("x.tif", "y.tif", "meta.json") + (("z.tif",) if segment_id != "20231012184421" else ()):
            (bad / segment_id / name).write_bytes((scroll / "tifxyz" / segment_id / name).read_bytes())
    with pytest.raises(InputError, match="20231012184421: tifxyz segment without z.tif"):
        _labels(scroll, bad, tmp_path)
    assert not list(tmp_path.glob("*.h5*"))


def test_the_ome_zarr_volume_flattens_and_scores_like_its_hdf5_copy(scroll, tmp_path):
    volume_to_hdf.main(["--tiff_dir", str(scroll / "volume"), "--out", str(tmp_path / "scan.h5")])
    for name, source in (("hdf5", tmp_path / "scan.h5"), ("zarr", scroll / "volume.zarr")):
        flatten_3d.main(["--volume", str(source), "--dataset", "scan_volume", "--ppm_dir", str(scroll / "paths"),
                         "--out_dir", str(tmp_path / name), "--name", "scan"])
    for segment_id in json.loads((scroll / "scroll.json").read_text())["segments"]:
        images = [cv2.imread(str(tmp_path / name / f"{segment_id}_scan.png"), cv2.IMREAD_UNCHANGED) for name in ("hdf5", "zarr")]
        assert np.array_equal(*images)


def test_a_float_zarr_volume_stops_a_stage_before_any_output(tmp_path):
    array = zarr.open_array(str(tmp_path / "scan.zarr"), mode="w", shape=(8, 8, 8), dtype="float64")
    array[:] = 0.5
    with pytest.raises(InputError, match="dtype float64; volumes must be uint8 or uint16"):
        inference.main(["--volume", str(tmp_path / "scan.zarr"), "--checkpoint", "unused.pth", "--out", str(tmp_path / "pred.h5")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.zarr"]
