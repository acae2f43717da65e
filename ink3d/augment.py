"""The spatial augmentation of training as one affine map per sample, applied to a whole batch on the
training device with torch's grid sampling.

`draw_affine` draws the transforms of the `full` augmentation (ink3d.dataset.augmentation) with the
same distributions — a rotation of up to +-15 degrees about each axis (half the samples), a
90-degree turn about a random pair of axes (half the samples), a flip of each axis (each half the
samples), and a random resized crop (scale 0.75-1.33 of the patch, anywhere in the crop) resized to
the patch — and composes them into one map from output voxel indices to input voxel indices,
`input = A @ output + b`, the convention of `scipy.ndimage.affine_transform`. `warp` samples a batch
through such maps: trilinear for the image (0 outside the crop), nearest for the labels (-1,
unlabeled, outside the crop). Maps of the `exact` and `none` kinds send voxels onto voxels inside
the crop: held on the host, they are applied as what they are, a crop turned and flipped by array
views, the same voxels as grid sampling's nearest at a fraction of its time on the CPU.
"""

import numpy as np
import torch
import torch.nn.functional as F

ROTATION_DEGREES = 15.0
SCALE_RANGE = (0.75, 1.33)
TURN_AXES = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]  # ordered pairs: the turn's direction depends on the order


def _homogeneous(matrix: np.ndarray, offset) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = matrix, offset
    return out


def rotation(angles_degrees) -> np.ndarray:
    """Rotation about array axes 0, 1, 2 (z, y, x) by the given angles, applied in that order."""
    result = np.eye(3)
    for axis, angle in enumerate(np.radians(angles_degrees)):
        a, b = [i for i in range(3) if i != axis]
        turn = np.eye(3)
        turn[a, a] = turn[b, b] = np.cos(angle)
        turn[a, b], turn[b, a] = -np.sin(angle), np.sin(angle)
        result = turn @ result
    return result


def draw_affine(rng: np.random.Generator, crop: int, patch: int, kind: str = "full") -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of one sample: output voxel o of the patch reads input voxel A @ o + b of the crop.

    `kind` full: the full augmentation; exact: 90-degree turns, flips and a crop of the patch's size, which
    map voxels onto voxels (no resampling); none: the crop's centre."""
    centre = (crop - 1) / 2
    if kind == "none":
        return np.eye(3), np.full(3, float((crop - patch) // 2))
    # output -> input, the transforms undone in reverse order of application: resized crop, flips, turn, rotation
    scale = rng.uniform(*SCALE_RANGE) if kind == "full" else 1.0
    size = int(scale * patch)
    start = np.floor((crop - size) * rng.random(3))
    steps = size / patch
    to_input = _homogeneous(np.eye(3) * steps, start + steps / 2 - 0.5)  # voxel centres of the resized crop
    flips = np.eye(4)
    for axis in range(3):
        if rng.random() < 0.5:
            flip = np.eye(4)
            flip[axis, axis], flip[axis, 3] = -1, crop - 1
            flips = flips @ flip
    to_input = flips @ to_input
    if rng.random() < 0.5:
        a, b = TURN_AXES[rng.integers(len(TURN_AXES))]
        for _ in range(int(rng.integers(4))):  # np.rot90 on axes (a, b): output [i along a, j along b] = input [j, crop - 1 - i]
            undo = np.eye(4)
            undo[a, a] = undo[b, b] = 0
            undo[a, b] = 1
            undo[b, a], undo[b, 3] = -1, crop - 1
            to_input = undo @ to_input
    if kind == "full" and rng.random() < 0.5:  # a rotation about the crop's centre; its inverse reads the input
        inverse = rotation(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES, 3)).T
        to_input = _homogeneous(inverse, centre - inverse @ np.full(3, centre)) @ to_input
    return to_input[:3, :3], to_input[:3, 3]


def voxel_view(volume: torch.Tensor, matrix: np.ndarray, offset: np.ndarray, patch: int) -> torch.Tensor | None:
    """(..., P, P, P) of `volume` (..., C, C, C) through a map that sends voxels onto voxels inside it (a signed
    permutation and an integer offset: turns, flips and a crop), as views; None for any other map."""
    crop = volume.shape[-1]
    if not (np.isin(matrix, (-1, 0, 1)).all() and (np.abs(matrix).sum(axis=0) == 1).all()
            and (np.abs(matrix).sum(axis=1) == 1).all() and np.array_equal(offset, np.round(offset))):
        return None
    lead = volume.dim() - 3
    order = [0, 0, 0]
    for in_axis in range(3):  # input index along in_axis = sign x output index along out_axis + offset
        out_axis = int(np.flatnonzero(matrix[in_axis])[0])
        first = int(offset[in_axis]) - (patch - 1 if matrix[in_axis, out_axis] < 0 else 0)
        if first < 0 or first + patch > crop:
            return None
        volume = volume.narrow(lead + in_axis, first, patch)
        if matrix[in_axis, out_axis] < 0:
            volume = volume.flip(lead + in_axis)
        order[out_axis] = lead + in_axis
    return volume.permute(*range(lead), *order)


def warp(images: torch.Tensor, labels: torch.Tensor, matrices: torch.Tensor, offsets: torch.Tensor,
         patch: int, image_mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (B, 1, C, C, C) images and labels through per-sample maps (B, 3, 3), (B, 3) to (B, 1, P, P, P).
    `image_mode` nearest copies voxels exactly where the maps send voxels onto voxels (exact, none): with the maps
    on the host, by views of the crops (voxel_view), else by grid sampling."""
    if image_mode == "nearest" and matrices.device.type == "cpu":
        maps = list(zip(matrices.double().numpy(), offsets.double().numpy()))
        views = [(voxel_view(image, *map_, patch), voxel_view(label, *map_, patch))
                 for image, label, map_ in zip(images, labels, maps)]
        if all(image is not None for image, _ in views):
            return (torch.stack([image for image, _ in views]).float(),
                    torch.stack([label for _, label in views]).float())
    return grid_warp(images, labels, matrices.to(images.device), offsets.to(images.device), patch, image_mode)


def grid_warp(images: torch.Tensor, labels: torch.Tensor, matrices: torch.Tensor, offsets: torch.Tensor,
              patch: int, image_mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """warp by grid sampling, for any maps, on the images' device."""
    crop = images.shape[-1]
    axis = torch.arange(patch, device=images.device, dtype=torch.float32)
    output = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)  # zyx
    positions = output @ matrices.float().transpose(1, 2) + offsets.float()[:, None, :]
    grid = (positions * (2 / (crop - 1)) - 1).flip(-1).reshape(len(images), patch, patch, patch, 3)  # grid_sample wants xyz
    image = F.grid_sample(images.float(), grid, mode=image_mode, padding_mode="zeros", align_corners=True)
    # labels are -2 (background air), -1 (unlabeled) or in [0, 1]: shifted so that 0 means outside the crop
    shifted = F.grid_sample(labels.float() + 3, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return image, torch.where(shifted == 0, torch.full_like(shifted, -1.0), shifted - 3)
