import json
import math

import cv2
import h5py
import numpy as np
import pytest
import torch
from scipy import ndimage

import all_labels_to_hdf
import ink3d.faces
from ink3d.augment import draw_affine, warp
from ink3d.columns import (COLUMNS, FIELDS, PAD, ColumnReader, column_loss, face_bags, fixed_size, offsets, pool,
                           sample_columns, with_face_windows)
from ink3d.ppm import write_ppm


def _column(point, normal, label):
    normal = np.asarray(normal, np.float64)
    return [*point, *(normal / np.linalg.norm(normal)), label]


def _brute_force_loss(volume, columns, band, sharpness, to_patch=lambda p: p):
    """Per column, a plain loop: trilinear samples (scipy) along it, its smooth maximum over its window (columns with
    FIELDS fields) or all samples, the BCE with its label; and the label-weighted BCE (target 0) of the samples outside
    the windows and below the depth the ink may reach."""
    t = np.linspace(-band, band, int(round(4 * band)) + 1)
    losses, outside, outside_weight = [], 0.0, 0.0
    for row in columns:
        if not row[6] >= 0:
            continue
        positions = np.array([to_patch(row[:3] + s * row[3:6]) for s in t])
        if np.any(positions < 0) or np.any(positions > volume.shape[0] - 1):
            continue
        values = ndimage.map_coordinates(volume.astype(np.float64), positions.T, order=1)
        bag = np.ones(len(t), bool) if len(row) == 7 or np.isnan(row[7]) else (t >= row[7]) & (t <= row[8])
        pooled = math.log(np.mean(np.exp(sharpness * values[bag]))) / sharpness
        label = row[6]
        losses.append(math.log(1 + math.exp(pooled)) - label * pooled)
        untaught = np.zeros(len(t), bool) if len(row) == 7 or np.isnan(row[7]) else (t >= row[9]) & (t < row[7])
        for value in values[~bag & ~untaught]:
            outside += label * math.log(1 + math.exp(value))
            outside_weight += label
    return np.mean(losses) + (outside / outside_weight if outside_weight else 0), len(losses)


@pytest.mark.parametrize("sharpness", [0.5, 1.0, 4.0])
def test_pooled_loss_equals_a_per_column_loop(sharpness):
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 2, (12, 12, 12)).astype(np.float32)
    columns = np.array([
        _column((5.0, 5.5, 6.0), (0, 0, 1), 1.0),
        _column((6.2, 4.7, 5.1), (1, 2, 2), 0.0),
        _column((4.0, 6.0, 7.3), (-0.3, 0.5, 0.8), 0.5),
        _column((1.0, 6.0, 6.0), (1, 0, 0), 1.0),  # its band leaves the volume: not counted
        [PAD] * 7,  # padding
    ], np.float32)
    band = 2.5
    expected, counted_columns = _brute_force_loss(volume, columns, band, sharpness)
    samples, counted = sample_columns(torch.from_numpy(volume)[None, None], torch.from_numpy(columns)[None], band)
    assert counted.tolist() == [[True, True, True, False, False]] and counted_columns == 3
    loss = column_loss(samples[counted], torch.from_numpy(columns)[None][..., 6][counted], sharpness)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_pooled_loss_over_face_windows_equals_a_per_column_loop():
    rng = np.random.default_rng(2)
    volume = rng.normal(0, 2, (12, 12, 12)).astype(np.float32)
    columns = np.array([
        _column((5.0, 5.5, 6.0), (0, 0, 1), 1.0) + [-1.5, 0.5, -2.5],  # ink may reach a voxel below its window
        _column((6.2, 4.7, 5.1), (1, 2, 2), 0.0) + [0.0, 2.5, 0.0],
        _column((4.0, 6.0, 7.3), (-0.3, 0.5, 0.8), 0.6) + [-2.5, -1.0, -2.5],
        _column((5.5, 5.0, 5.0), (0, 1, 0), 1.0) + [PAD, PAD, PAD],  # no face found: the whole band
    ], np.float32)
    band = 2.5
    expected, count = _brute_force_loss(volume, columns, band, 2.0)
    samples, counted = sample_columns(torch.from_numpy(volume)[None, None], torch.from_numpy(columns)[None], band)
    assert count == 4 and counted.all()
    chosen = torch.from_numpy(columns)[None][counted]
    loss = column_loss(samples[counted], chosen[:, 6], 2.0, windows=face_bags(chosen, band))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_face_windows_sample_the_scan_as_map_coordinates_does(monkeypatch):
    """The face windows of columns anywhere in a crop, some of whose samples leave it, are those found from scipy's
    trilinear samples (0 beyond the crop's edge voxels)."""
    rng = np.random.default_rng(7)
    scan = rng.integers(0, 256, (24, 20, 28)).astype(np.uint8)
    normals = rng.normal(size=(300, 3))
    columns = np.concatenate([rng.uniform(-1, np.array(scan.shape) - 1 + 1, (300, 3)), normals / np.linalg.norm(normals, axis=1, keepdims=True),
                              rng.integers(0, 2, (300, 1))], axis=1).astype(np.float32)
    windows = with_face_windows(columns, scan, 4.0, 100, 3.0)

    def scipy_trilinear(box, coordinates, origin):
        return ndimage.map_coordinates(box, coordinates - origin[:, None], output=np.float32, order=1, mode="constant", cval=0.0)

    monkeypatch.setattr(ink3d.faces, "trilinear", scipy_trilinear)
    expected = with_face_windows(columns, scan, 4.0, 100, 3.0)
    assert np.array_equal(windows, expected, equal_nan=True) and np.isfinite(expected[:, 7]).sum() > 100


def test_pooled_loss_follows_the_samples_transform():
    """With a crop's map patch -> crop, a column given in crop coordinates is sampled where it lands in the patch."""
    rng = np.random.default_rng(1)
    crop, patch, band = 24, 16, 2.0
    matrix, shift = draw_affine(rng, crop, patch)
    volume = rng.normal(0, 2, (patch,) * 3).astype(np.float32)
    inverse = np.linalg.inv(matrix)
    centre = matrix @ np.full(3, (patch - 1) / 2) + shift  # the patch's centre in crop coordinates
    columns = np.array([_column(centre + rng.uniform(-2, 2, 3), rng.normal(size=3), float(rng.integers(2))) for _ in range(6)],
                       np.float32)
    expected, count = _brute_force_loss(volume, columns, band, 1.0, to_patch=lambda p: inverse @ (p - shift))
    assert count == 6
    samples, counted = sample_columns(torch.from_numpy(volume)[None, None], torch.from_numpy(columns)[None], band,
                                      torch.from_numpy(matrix)[None], torch.from_numpy(shift)[None])
    loss = column_loss(samples[counted], torch.from_numpy(columns)[None][..., 6][counted], 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_pooling_lies_between_the_mean_and_the_maximum():
    logits = torch.tensor([[-3.0, 0.0, 2.0, 5.0]])
    assert pool(logits, 1e-4).item() == pytest.approx(logits.mean().item(), abs=1e-3)
    assert pool(logits, 1e3).item() == pytest.approx(5.0 - math.log(4) / 1e3, abs=1e-3)
    assert logits.mean() < pool(logits, 1.0) < logits.max()


@pytest.mark.parametrize("kind", ["full", "exact"])
def test_a_column_labeled_ink_stays_on_its_bright_voxels_under_augmentation(kind):
    """A bright rod lies along an ink column; after each of 20 random augmentations the column, moved with the
    sample's transform, still samples the rod, and a parallel column beside it samples the dark around it."""
    crop, patch, band = 40, 32, 4.0
    normal = np.array([0.3, -0.5, 0.8])
    normal /= np.linalg.norm(normal)
    point = np.array([19.5, 20.0, 19.0])
    grid = np.stack(np.mgrid[0:crop, 0:crop, 0:crop], axis=-1).reshape(-1, 3) - point
    along = grid @ normal
    across = np.linalg.norm(grid - along[:, None] * normal, axis=1)
    rod = ((across <= 2.5) & (np.abs(along) <= band + 1)).reshape((crop,) * 3).astype(np.float32)
    beside = point + 6 * np.cross(normal, [1.0, 0, 0]) / np.linalg.norm(np.cross(normal, [1.0, 0, 0]))
    columns = torch.tensor(np.array([[*point, *normal, 1.0], [*beside, *normal, 0.0]], np.float32))[None]
    rng, moved = np.random.default_rng(0), 0
    for _ in range(20):
        matrix, shift = (torch.from_numpy(a)[None] for a in draw_affine(rng, crop, patch, kind))
        image, _ = warp(torch.from_numpy(rod)[None, None], torch.zeros((1, 1) + (crop,) * 3), matrix, shift, patch,
                        "bilinear" if kind == "full" else "nearest")
        samples, counted = sample_columns(image, columns, band, matrix, shift)
        if counted[0, 0]:
            moved += 1
            assert samples[0, 0].min() >= 0.5, samples[0, 0]
        if counted[0, 1]:
            assert samples[0, 1].max() <= 0.5
    assert moved >= 15


def test_fixed_size_chooses_or_pads():
    columns = np.arange(5 * FIELDS, dtype=np.float32).reshape(5, FIELDS)  # any width
    padded = fixed_size(columns, 8, np.random.default_rng(0))
    assert np.array_equal(padded[:5], columns) and np.isnan(padded[5:]).all()
    chosen = fixed_size(columns, 3, np.random.default_rng(0))
    assert len(chosen) == 3 and all(any(np.array_equal(row, c) for c in columns) for row in chosen)
    assert np.all(np.diff(chosen[:, 0]) > 0)  # in the store's order
    assert len(offsets(10.0)) == 41 and offsets(10.0)[0] == -10 and offsets(10.0)[-1] == 10


def test_label_files_keep_every_labeled_pixel_as_a_column_by_chunk(tmp_path):
    """Every pixel that all_labels_to_hdf labels is a column (point, normal, label) exactly once, each run of the
    store lies in its chunk, and a box's columns are those whose voxel lies in it."""
    shape = (24, 30, 36)
    with h5py.File(tmp_path / "scan.h5", "w") as file:
        file.create_dataset("scan_volume", shape=shape, dtype=np.uint8, chunks=(8, 8, 8))
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:14, 0:20]
    data = np.zeros((14, 20, 6))
    angle = 0.4
    data[..., 0] = 4 + cols * np.cos(angle)
    data[..., 1] = 3 + rows * 1.5
    data[..., 2] = 9 + cols * np.sin(angle)
    data[..., 3], data[..., 5] = -np.sin(angle), np.cos(angle)
    data[0, :3] = 0  # off the surface
    data[13, 19, :3] = [500.0, 3.0, 9.0]  # outside the volume: no column
    label = rng.integers(0, 256, (14, 20)).astype(np.uint8)
    (tmp_path / "paths" / "a").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    write_ppm(tmp_path / "paths" / "a" / "a.ppm", data)
    cv2.imwrite(str(tmp_path / "labels" / "a_inklabels.png"), label)
    all_labels_to_hdf.main(["--ppm_dir", str(tmp_path / "paths"), "--labels_dir", str(tmp_path / "labels"), "--volume",
                            str(tmp_path / "scan.h5"), "--out_train", str(tmp_path / "train.h5"), "--out_valid",
                            str(tmp_path / "valid.h5"), "--valid_segments", "", "--band", "3", "--chunk", "8",
                            "--tile_pixels", "50"])
    used = np.ones((14, 20), bool)
    used[0, :3] = used[13, 19] = False
    expected = {tuple(np.float32(v) for v in (*data[r, c, 2::-1], *data[r, c, 5:2:-1], label[r, c])) for r, c in zip(*np.nonzero(used))}
    with h5py.File(tmp_path / "train.h5") as file:
        group = file[COLUMNS]
        points, normals, labels, runs = (group[name][:] for name in ("points", "normals", "labels", "runs"))
        assert group.attrs["band"] == 3 and json.loads(file.attrs["ink_range"]) == [-3, 3]
        stored = [tuple(row) for row in np.concatenate([points, normals, labels[:, None].astype(np.float32)], axis=1)]
        assert len(stored) == len(expected) == used.sum() and set(stored) == expected
        grid = -(-np.array(shape) // 8)
        assert runs[:, 1].min() == 0 and np.array_equal(np.sort(runs[:, 1]), runs[:, 1]) and runs[:, 2].max() == len(points)
        for key, first, end in runs:
            chunk = np.rint(points[first:end]).astype(int) // 8
            assert np.all((chunk[:, 0] * grid[1] + chunk[:, 1]) * grid[2] + chunk[:, 2] == key)
        reader = ColumnReader(group, shape)
        for corner, size in (((0, 0, 0), 12), ((5, 9, 3), 10), ((-4, 20, 20), 16)):
            box = reader.in_box(corner, size)
            voxel = np.rint(points) - corner
            inside = np.all((voxel >= 0) & (voxel < size), axis=1)
            want = np.concatenate([points[inside] - corner, normals[inside], labels[inside, None] / np.float32(255)], axis=1)
            assert sorted(map(tuple, box)) == sorted(map(tuple, want.astype(np.float32)))

