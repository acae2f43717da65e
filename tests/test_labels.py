import json

import cv2
import h5py
import numpy as np
import pytest

import all_labels_to_hdf
from ink3d import InputError, volume
from ink3d.labels import band_offsets
from labels_scene import SHAPE, add_segment, cylinder_segment, flat_segment, read, run


def test_band_offsets_step_at_most_half_a_voxel():
    offsets = band_offsets(4)
    assert offsets[0] == -4 and offsets[-1] == 4 and np.diff(offsets).max() <= 0.5
    assert np.diff(band_offsets(1.3)).max() <= 0.5


def test_flat_surface_gives_the_exact_band(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    run(scene)
    ink_sum, ink_count, attrs = read(scene / "train.h5")
    expected_count = np.zeros(SHAPE, np.uint16)
    expected_count[8:13, 7:17, 5:17] = 1
    expected_sum = np.zeros(SHAPE, np.float32)
    expected_sum[8:13, 7:17, 5:11] = 1.0
    assert np.array_equal(ink_count, expected_count)
    assert np.array_equal(ink_sum, expected_sum)
    assert json.loads(attrs["segments"]) == ["20230101000000"] and attrs["band"] == 2.0
    assert read(scene / "valid.h5")[1].sum() == 0


@pytest.mark.parametrize("ink_back, ink_front, ink_z", [("0", "1", slice(10, 12)), ("1.5", "0.5", slice(8, 11)),
                                                     ("0", "0", slice(10, 11)), ("9", "9", slice(8, 13))])
def test_ink_range_gives_the_pixel_label_only_on_its_side_of_the_surface(scene, ink_back, ink_front, ink_z):
    data, label = flat_segment()  # surface at z = 10, normal +z: in front of it means larger z
    add_segment(scene, "20230101000000", data, label)
    run(scene, "--ink_back", ink_back, "--ink_front", ink_front)
    ink_sum, ink_count, attrs = read(scene / "train.h5")
    expected_count = np.zeros(SHAPE, np.uint16)
    expected_count[8:13, 7:17, 5:17] = 1  # the whole band is labeled ...
    expected_sum = np.zeros(SHAPE, np.float32)
    expected_sum[ink_z, 7:17, 5:11] = 1.0  # ... ink only within the ink range (clipped to the band), the rest 0
    assert np.array_equal(ink_count, expected_count)
    assert np.array_equal(ink_sum, expected_sum)
    assert json.loads(attrs["ink_range"]) == [-min(float(ink_back), 2.0), min(float(ink_front), 2.0)]


def test_update_refuses_another_ink_range(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    run(scene, "--ink_back", "0")
    add_segment(scene, "20230202000000", data, label)
    with pytest.raises(InputError, match="ink range"):
        run(scene, "--update", "true", "--ink_back", "1")


def test_overlapping_pixels_average(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    add_segment(scene, "20230202000000", data, 255 - label)
    run(scene)
    ink_sum, ink_count, _ = read(scene / "train.h5")
    band = ink_count > 0
    assert np.all(ink_count[band] == 2) and np.allclose(ink_sum[band] / ink_count[band], 0.5)


def _plane(normal_xyz, origin_xyz, size=9):
    normal = np.asarray(normal_xyz, float) / np.linalg.norm(normal_xyz)
    e1 = np.cross(normal, [0, 0, 1.0]) if abs(normal[2]) < 0.9 else np.cross(normal, [1.0, 0, 0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    rows, cols = np.mgrid[0:size, 0:size] - size // 2
    points = np.asarray(origin_xyz) + rows[..., None] * e1 + cols[..., None] * e2
    return np.concatenate([points, np.broadcast_to(normal, points.shape)], axis=-1)


@pytest.mark.parametrize("surface", ["tilted", "curved"])
def test_oblique_surfaces_are_labeled_within_the_band_without_gaps(scene, surface):
    band = 3.0
    data = _plane([1.0, 0.5, 0.3], [20.3, 14.6, 9.7]) if surface == "tilted" else cylinder_segment()
    add_segment(scene, "20230101000000", data, np.full(data.shape[:2], 255, np.uint8))
    run(scene, band=str(band))
    _, ink_count, _ = read(scene / "train.h5")
    labeled = np.argwhere(ink_count > 0)[:, ::-1].astype(float)  # xyz
    points, normals = data[..., :3].reshape(-1, 3), data[..., 3:].reshape(-1, 3)
    # each labeled voxel lies within band (+ rounding: at most half a voxel per axis) of some pixel's normal line
    offsets = labeled[:, None, :] - points[None]
    along = np.einsum("vpk,pk->vp", offsets, normals)
    across = np.linalg.norm(offsets - along[..., None] * normals[None], axis=-1)
    rounding = 0.5 * np.abs(normals).sum(axis=1)
    near = (np.abs(along) <= band + rounding[None]) & (across <= np.sqrt(3) / 2)
    assert near.any(axis=1).all()
    # no gaps: along every normal the labeled voxels form a 26-connected chain from -band to +band
    samples = np.rint(points[:, None] + band_offsets(band)[None, :, None] * normals[:, None]).astype(int)
    assert np.all(ink_count[samples[..., 2], samples[..., 1], samples[..., 0]] > 0)
    assert np.abs(np.diff(samples, axis=1)).max() <= 1


def test_each_voxel_counts_once_per_pixel(scene):
    data = _plane([1.0, 1.0, 1.0], [20.0, 15.0, 10.0], size=1)
    add_segment(scene, "20230101000000", data, np.full((1, 1), 255, np.uint8))
    run(scene, band="4")
    _, ink_count, _ = read(scene / "train.h5")
    assert ink_count.max() == 1


def test_versions_validation_split_and_report(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    add_segment(scene, "20230101000001", data, 255 - label)  # newer version of the same segment
    add_segment(scene, "20230303000000", data, label)  # validation
    add_segment(scene, "20230303000002", data, label)  # its newer version: validation too, never training
    report = run(scene, valid="20230303000000")
    _, _, train_attrs = read(scene / "train.h5")
    _, _, valid_attrs = read(scene / "valid.h5")
    assert json.loads(train_attrs["segments"]) == ["20230101000001"]
    assert json.loads(valid_attrs["segments"]) == ["20230303000002"]
    lines = "\n".join(report)
    assert "20230101000000: superseded by newer version 20230101000001 (" in lines
    assert "kept 20230303000002, superseded 20230303000000; --keep_all_versions true uses every version" in lines
    ink_sum, ink_count, _ = read(scene / "train.h5")
    assert ink_sum[10, 7, 5] == 0 and ink_sum[10, 7, 16] == 1  # the newer (inverted) label was used
    run(scene, "--overwrite", "true", "--keep_all_versions", "true")
    assert json.loads(read(scene / "train.h5")[2]["segments"]) == ["20230101000000", "20230101000001", "20230303000000", "20230303000002"]


def test_a_mistyped_validation_segment_is_an_error(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    add_segment(scene, "20230303000000", data, label)
    with pytest.raises(InputError, match="--valid_segments 20230330000000: no such segment .*20230101000000, 20230303000000"):
        run(scene, valid="20230330000000")  # two digits swapped
    assert sorted(path.name for path in scene.glob("*.h5*")) == ["scan.h5"]  # nothing written
    run(scene, valid="20230303000001")  # another version of an existing segment names its family
    assert json.loads(read(scene / "valid.h5")[2]["segments"]) == ["20230303000000"]


@pytest.mark.parametrize("band", ["-2", "0"])
def test_a_band_that_is_not_positive_is_refused(scene, band):
    with pytest.raises(InputError, match=f"--band {float(band)}: must be > 0"):
        run(scene, band=band)


def test_mask_and_invalid_pixels_are_not_labeled(scene, recwarn):
    data, label = flat_segment()
    data[0, 0] = 0  # off the surface
    data[0, 1, 0] = np.nan  # points and normals that are not finite are invalid too
    data[0, 2, 4] = np.inf
    mask = np.full(label.shape, 255, np.uint8)
    mask[:, 9:] = 0
    add_segment(scene, "20230101000000", data, label, mask)
    run(scene)
    _, ink_count, _ = read(scene / "train.h5")
    assert ink_count[:, 7:17, 14:17].sum() == 0  # masked columns 9..11
    assert ink_count[:, 7, 5:8].sum() == 0  # the off-surface and the non-finite pixels
    assert ink_count[:, 7, 8].sum() == 5
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_points_outside_the_volume_are_dropped_and_counted(scene):
    data, label = flat_segment(z=1.0)  # band 2 reaches z = -1
    add_segment(scene, "20230101000000", data, label)
    report = run(scene)
    _, ink_count, _ = read(scene / "train.h5")
    assert np.array_equal(np.unique(np.nonzero(ink_count)[0]), [0, 1, 2, 3])
    assert any("120 band samples beyond the volume's edge dropped (pixels near the edge)" in line for line in report)  # 120 pixels x z=-1
    data, label = flat_segment(z=-3.0)  # the surface itself outside: a segment of another scan or level
    add_segment(scene, "20230303000000", data, label)
    report = run(scene, "--overwrite", "true")
    assert any("20230303000000: 120 pixels labeled, 0 voxel contributions" in line and "120 of its pixels lie outside the volume (600 band samples dropped): "
               "segments of another scan, or of another resolution than --level 0 reads" in line for line in report), report


def test_update_is_idempotent_and_adds_new_segments(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    run(scene)
    first = read(scene / "train.h5")
    with pytest.raises(InputError, match="exists"):
        run(scene)
    report = run(scene, "--update", "true")
    again = read(scene / "train.h5")
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert any("already in train.h5, not counted again" in line for line in report)
    add_segment(scene, "20230202000000", data, label)
    run(scene, "--update", "true")
    _, ink_count, attrs = read(scene / "train.h5")
    assert ink_count.max() == 2 and json.loads(attrs["segments"]) == ["20230101000000", "20230202000000"]


def test_label_size_mismatch_names_the_segment(scene):
    data, _ = flat_segment()
    add_segment(scene, "20230101000000", data, np.zeros((10, 11), np.uint8))
    with pytest.raises(InputError, match=r"20230101000000: ink label .* is 11 x 10 .* the ppm is 12 x 10"):
        run(scene)
    assert not (scene / "train.h5").exists() and not (scene / "train.h5.partial").exists()


def test_malformed_ppm_errors_or_is_skipped(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    add_segment(scene, "20230202000000", data, label)
    ppm = scene / "paths" / "20230202000000" / "20230202000000.ppm"
    ppm.write_bytes(ppm.read_bytes()[:-8])
    with pytest.raises(InputError, match="20230202000000.ppm.*truncated"):
        run(scene)
    report = run(scene, "--skip_bad", "true")
    assert any(line.startswith("/") and "20230202000000.ppm" in line and line.endswith("skipped") for line in report)
    assert json.loads(read(scene / "train.h5")[2]["segments"]) == ["20230101000000"]


def test_missing_ppm_errors_or_is_skipped(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    cv2.imwrite(str(scene / "labels" / "20239999000000_inklabels.png"), label)
    with pytest.raises(InputError, match="20239999000000: no ppm"):
        run(scene)
    assert any("20239999000000: no ppm" in line for line in run(scene, "--skip_bad", "true"))


def test_a_crash_leaves_no_half_file(scene, monkeypatch):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)

    def crash(*args):
        raise MemoryError

    monkeypatch.setattr(all_labels_to_hdf, "voxelize_tile", crash)
    with pytest.raises(MemoryError):
        run(scene)
    assert sorted(path.name for path in scene.glob("*.h5*")) == ["scan.h5"]


def test_synthetic_scroll_labels_match_ground_truth(synthetic_scroll, tmp_path, capsys):
    """With the band of the ink layer's half thickness, labels > 0.5 reproduce the true 3D ink."""
    import volume_to_hdf

    volume_to_hdf.main(["--tiff_dir", str(synthetic_scroll / "volume"), "--out", str(tmp_path / "scan.h5")])
    all_labels_to_hdf.main(["--ppm_dir", str(synthetic_scroll / "paths"), "--labels_dir", str(synthetic_scroll / "labels"),
                            "--volume", str(tmp_path / "scan.h5"), "--out_train", str(tmp_path / "train.h5"),
                            "--out_valid", str(tmp_path / "valid.h5"), "--valid_segments", "20231022170901", "--band", "1"])
    with h5py.File(synthetic_scroll / "ground_truth.h5") as file:
        truth = file[volume.GROUND_TRUTH][:] > 0
    for name in ("train.h5", "valid.h5"):
        ink_sum, ink_count, _ = read(tmp_path / name)
        labeled = ink_count > 0
        predicted = labeled & (ink_sum > 0.5 * ink_count)
        actual = labeled & truth
        iou = (predicted & actual).sum() / (predicted | actual).sum()
        print(f"{name}: IoU of label > 0.5 with ground-truth ink inside the labeled region = {iou:.3f}")
        assert iou >= 0.7


