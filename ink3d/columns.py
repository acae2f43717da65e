"""Labeled pixels as columns along their normals: what a 2D ink label says, kept for training.

A 2D label says whether the written face carries ink at a pixel, not at which depth along the
pixel's normal: segments sit on the papyrus face, above it, or drift by a few voxels, and nobody
knows the ink's thickness. So the label files keep, beside the voxel labels, every labeled pixel
as a column: its surface point and unit normal (zyx, float32) and its label (uint8, 0 no ink ..
255 ink), in the group `columns`, ordered by the label chunk that holds the point (`runs`: int64
rows of chunk key, first column, end). Training samples the model's output along each column
whose band lies in the (augmented) patch, pools it into one prediction for the pixel and compares
that with the label (multiple-instance learning): the model must put ink at some depth of an ink
column and nowhere along a column without ink, so it learns where the ink lies.
"""

import math

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from ink3d import volume

COLUMNS = "columns"
ROWS = 1 << 16  # HDF5 chunk of the column datasets, in columns
STEP = 0.5  # voxels between samples along a column
PAD = np.float32(np.nan)  # padding rows of a sample's column array (fixed size, so batches stack)
FIELDS = 7  # z, y, x, nz, ny, nx (the patch's or crop's voxel coordinates), label in [0, 1]


def _chunk_keys(points_zyx: np.ndarray, chunk: int, shape) -> np.ndarray:
    grid = -(-np.asarray(shape) // chunk)
    index = np.rint(points_zyx).astype(np.int64) // chunk
    return (index[:, 0] * grid[1] + index[:, 1]) * grid[2] + index[:, 2]


class ColumnWriter:
    """Appends columns to a label file's `columns` group, a segment tile at a time, grouped by chunk."""

    def __init__(self, file: h5py.File, shape, chunk: int, band: float):
        self.shape, self.chunk = tuple(int(s) for s in shape), int(chunk)
        group = file.require_group(COLUMNS)
        if "points" not in group:
            options = volume.compression_options(volume.LABEL_COMPRESSION)
            for name, width, dtype in (("points", 3, np.float32), ("normals", 3, np.float32), ("runs", 3, np.int64)):
                group.create_dataset(name, shape=(0, width), maxshape=(None, width), chunks=(ROWS, width), dtype=dtype, **options)
            group.create_dataset("labels", shape=(0,), maxshape=(None,), chunks=(ROWS,), dtype=np.uint8, **options)
            group.attrs["band"], group.attrs["chunk"] = float(band), self.chunk
        elif (float(group.attrs["band"]), int(group.attrs["chunk"])) != (float(band), self.chunk):
            raise ValueError(f"columns made with band {group.attrs['band']} and chunk {group.attrs['chunk']}, not {band} and {chunk}")
        self.group = group

    def add(self, points_zyx: np.ndarray, normals_zyx: np.ndarray, labels: np.ndarray) -> int:
        """Append the columns whose point lies in the volume (labels uint8); returns how many."""
        voxel = np.rint(points_zyx)
        inside = np.all((voxel >= 0) & (voxel < np.array(self.shape)), axis=1)
        points_zyx, normals_zyx, labels = points_zyx[inside], normals_zyx[inside], labels[inside]
        if not len(points_zyx):
            return 0
        keys = _chunk_keys(points_zyx, self.chunk, self.shape)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        start = self.group["labels"].shape[0]
        for name, values in (("points", points_zyx), ("normals", normals_zyx), ("labels", labels)):
            dataset = self.group[name]
            dataset.resize(start + len(order), axis=0)
            dataset[start:] = values[order]
        firsts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        ends = np.r_[firsts[1:], len(keys)]
        runs = np.stack([keys[firsts], start + firsts, start + ends], axis=1)
        dataset = self.group["runs"]
        dataset.resize(dataset.shape[0] + len(runs), axis=0)
        dataset[-len(runs):] = runs
        return len(order)


class ColumnReader:
    """The columns of a label file whose point lies in a box."""

    def __init__(self, group: h5py.Group, shape):
        self.group, self.shape = group, np.asarray(shape)
        self.chunk, self.band = int(group.attrs["chunk"]), float(group.attrs["band"])
        runs = group["runs"][:]
        self.runs = runs[np.argsort(runs[:, 0], kind="stable")]

    def in_box(self, corner, size: int) -> np.ndarray:
        """(n, FIELDS) float32: point relative to `corner`, normal, label in [0, 1], of the columns whose point's voxel
        lies in the cube of edge `size` at `corner`."""
        corner = np.asarray(corner, np.int64)
        grid = -(-self.shape // self.chunk)
        low = np.clip(corner // self.chunk, 0, grid - 1)
        high = np.clip((corner + size - 1) // self.chunk, 0, grid - 1)
        cz, cy, cx = np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(low, high)), indexing="ij")
        keys = ((cz * grid[1] + cy) * grid[2] + cx).ravel()
        chosen = self.runs[np.isin(self.runs[:, 0], keys)]
        if not len(chosen):
            return np.zeros((0, FIELDS), np.float32)
        points = np.concatenate([self.group["points"][a:b] for _, a, b in chosen])
        normals = np.concatenate([self.group["normals"][a:b] for _, a, b in chosen])
        labels = np.concatenate([self.group["labels"][a:b] for _, a, b in chosen])
        voxel = np.rint(points) - corner
        inside = np.all((voxel >= 0) & (voxel < size), axis=1)
        return np.concatenate([points[inside] - corner, normals[inside], labels[inside, None] / np.float32(255)],
                              axis=1).astype(np.float32)


def fixed_size(columns: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows: a random choice of the columns if there are more, padded with PAD rows if fewer."""
    if len(columns) > count:
        columns = columns[np.sort(rng.choice(len(columns), count, replace=False))]
    out = np.full((count, FIELDS), PAD, np.float32)
    out[:len(columns)] = columns
    return out


def offsets(band: float) -> torch.Tensor:
    """Sample offsets along a column: -band .. band, STEP apart."""
    steps = int(round(2 * band / STEP))
    return torch.linspace(-band, band, steps + 1)


def sample_columns(volume_: torch.Tensor, columns: torch.Tensor, band: float, matrices: torch.Tensor | None = None,
                   shifts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear samples (B, M, T) of `volume_` (B, 1, P, P, P) along the columns (B, M, FIELDS) (crop coordinates),
    and which columns count (B, M): not padding, labeled, and every sample inside the patch.

    `matrices` (B, 3, 3) and `shifts` (B, 3) are the samples' maps from patch voxels to crop voxels
    (`crop = A @ patch + b`, ink3d.augment), so the columns move with each crop's augmentation; without them
    crop and patch coincide."""
    t = offsets(band).to(columns.device)
    points, normals, labels = columns[..., :3], columns[..., 3:6], columns[..., 6]
    positions = points[:, :, None, :] + t[None, None, :, None] * normals[:, :, None, :]  # (B, M, T, 3) in the crop
    if matrices is not None:
        inverse = torch.linalg.inv(matrices.double()).float()
        positions = torch.einsum("bij,bmtj->bmti", inverse, positions - shifts[:, None, None, :].float())
    size = volume_.shape[-1]
    inside = ((positions >= 0) & (positions <= size - 1)).all(-1).all(-1)
    counted = inside & (labels >= 0)  # NaN rows (padding) compare false
    grid = (positions * (2 / (size - 1)) - 1).flip(-1)  # grid_sample wants xyz in [-1, 1]
    grid = torch.nan_to_num(grid, nan=-2.0)[:, :, :, None, :]  # (B, M, T, 1, 3); padding rows sample nothing
    samples = F.grid_sample(volume_.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return samples[:, 0, :, :, 0], counted


def pool(logits: torch.Tensor, sharpness: float) -> torch.Tensor:
    """One logit per column from its samples' logits (..., T): the smooth maximum (1/r) log mean exp(r x).
    r -> infinity is the maximum, r -> 0 the mean."""
    return (torch.logsumexp(sharpness * logits, dim=-1) - math.log(logits.shape[-1])) / sharpness


def column_loss(pooled: torch.Tensor, targets: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """BCE of the pooled logits against the pixels' labels, plus `dice_weight` x a soft Dice over the columns."""
    loss = F.binary_cross_entropy_with_logits(pooled, targets)
    if dice_weight:
        probabilities = torch.sigmoid(pooled)
        loss = loss + dice_weight * (1 - (2 * (probabilities * targets).sum() + 1) / (probabilities.sum() + targets.sum() + 1))
    return loss
