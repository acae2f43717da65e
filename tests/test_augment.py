import numpy as np
import pytest
import torch
from scipy import ndimage

from ink3d.augment import draw_affine, rotation, voxel_view, warp


def _warp(volume, labels, matrix, offset, patch):
    image, label = warp(torch.from_numpy(volume)[None, None], torch.from_numpy(labels)[None, None],
                        torch.from_numpy(matrix)[None], torch.from_numpy(offset)[None], patch)
    return image[0, 0].numpy(), label[0, 0].numpy()


@pytest.mark.parametrize("seed", range(6))
def test_warp_equals_scipy_affine_transform(seed):
    rng = np.random.default_rng(seed)
    crop, patch = 24, 16
    volume = rng.random((crop,) * 3).astype(np.float32)
    labels = rng.choice(np.array([-2, -1, 0, 0.5, 1], np.float32), (crop,) * 3)
    matrix, offset = draw_affine(rng, crop, patch)
    image, label = _warp(volume, labels, matrix, offset, patch)
    expected = ndimage.affine_transform(volume, matrix, offset, output_shape=(patch,) * 3, order=1, mode="grid-constant", cval=0.0)
    assert np.abs(image - expected).max() < 1e-4
    nearest = ndimage.affine_transform(labels, matrix, offset, output_shape=(patch,) * 3, order=0, mode="grid-constant", cval=-1.0)
    assert np.mean(label == nearest) > 0.99  # nearest neighbours differ only at rounding ties of float32 positions
    assert set(np.unique(label)) <= {-2.0, -1.0, 0.0, 0.5, 1.0}


@pytest.mark.parametrize("kind", ["exact", "none"])
def test_maps_onto_voxels_are_read_as_views_voxel_for_voxel(kind):
    """Turns, flips and crops read by views give scipy's nearest affine_transform exactly, for every draw."""
    rng = np.random.default_rng(7)
    crop, patch = 20, 13
    volume = rng.random((2, crop, crop, crop)).astype(np.float32)
    labels = rng.choice(np.array([-2, -1, 0, 0.5, 1], np.float32), (2, crop, crop, crop))
    for _ in range(12):
        maps = [draw_affine(rng, crop, patch, kind) for _ in range(2)]
        matrices, offsets = (torch.from_numpy(np.stack(part)) for part in zip(*maps))
        image, label = warp(torch.from_numpy(volume)[:, None], torch.from_numpy(labels)[:, None], matrices, offsets,
                            patch, "nearest")
        for sample, (matrix, offset) in enumerate(maps):
            assert voxel_view(torch.from_numpy(volume[sample]), matrix, offset, patch) is not None
            for source, result in ((volume, image), (labels, label)):
                expected = ndimage.affine_transform(source[sample], matrix, offset, output_shape=(patch,) * 3, order=0)
                assert np.array_equal(result[sample, 0].numpy(), expected)


def test_maps_that_resample_or_leave_the_crop_are_not_views():
    volume = torch.zeros((8, 8, 8))
    half_turn = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])
    assert voxel_view(volume, half_turn, np.array([0.0, 7, 0]), 6) is not None
    assert voxel_view(volume, half_turn, np.array([0.0, 4, 0]), 6) is None  # reads y = 4 - 5 < 0
    assert voxel_view(volume, np.eye(3) * 0.9, np.zeros(3), 6) is None  # a resized crop
    assert voxel_view(volume, np.eye(3), np.full(3, 0.5), 6) is None  # between voxels
    assert voxel_view(volume, rotation([10, 0, 0]), np.zeros(3), 6) is None


def test_the_draws_follow_the_augmentations_distributions():
    rng = np.random.default_rng(0)
    determinants, swapped = [], 0
    for _ in range(400):
        matrix, offset = draw_affine(rng, 96, 64)
        determinants.append(np.linalg.det(matrix))
        swapped += np.any(np.abs(matrix).argmax(axis=1) != [0, 1, 2])  # a turn by 90 or 270 degrees: 1/2 x 1/2 of the samples
    scales = np.cbrt(np.abs(determinants))  # the resized crop's scale: voxels of the crop per voxel of the patch
    assert scales.min() >= 0.74 and scales.max() <= 1.33 and 0.95 < np.median(scales) < 1.1
    assert 0.42 < np.mean(np.array(determinants) < 0) < 0.58  # an odd number of the three flips: half the samples (sd 0.025)
    assert np.allclose(rotation([90, 0, 0]) @ [0, 1, 0], [0, 0, 1], atol=1e-12) and 0.19 < swapped / 400 < 0.31


def test_a_labeled_cube_moves_with_the_bright_cube_it_labels():
    crop, patch = 32, 24
    volume = np.zeros((crop,) * 3, np.float32)
    labels = np.full((crop,) * 3, -1, np.float32)
    volume[10:20, 12:22, 8:18] = 1.0
    labels[10:20, 12:22, 8:18] = 1.0
    rng = np.random.default_rng(3)
    for _ in range(20):
        matrix, offset = draw_affine(rng, crop, patch)
        image, label = _warp(volume, labels, matrix, offset, patch)
        # labels are nearest, the image trilinear: they agree away from the cube's faces (up to 1.33 voxels of the crop per voxel)
        cube = np.ones((3, 3, 3), bool)
        inside, outside = (ndimage.binary_erosion(label == value, cube, iterations=2) for value in (1, -1))
        assert inside.any() and np.all(image[inside] > 0.99) and np.all(image[outside] < 0.01)
        assert np.abs(np.argwhere(label == 1).mean(axis=0) - np.argwhere(image > 0.5).mean(axis=0)).max() < 0.5

