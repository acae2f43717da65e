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

Pooling over the whole band leaves the model free to put a column's ink anywhere its receptive field
sees the letter, and it does: inside the sheet, under the ink. But carbon ink lies on the papyrus'
face. So each column also carries its face window, read off the scan along the column: from the
written face (ink3d.faces: a dip of the scan relative to the sheet's own level, whether into air or
into the contact with a sheet pressed against it) `face_depth` voxels into the sheet. The pooled
prediction is taken over the window; the rest of an ink column is no ink, but for the samples from
the window down to `ink_reach` voxels behind the face, left untaught (ink may be that thick). A column
without a face (no dip within the band) pools over the whole band.
"""

import math

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from ink3d import volume
from ink3d.faces import STEP, find_faces, profiles_along

COLUMNS = "columns"
ROWS = 1 << 16  # HDF5 chunk of the column datasets, in columns
PAD = np.float32(np.nan)  # padding rows of a sample's column array (fixed size, so batches stack)
STORED = 7  # z, y, x, nz, ny, nx (the crop's voxel coordinates), label in [0, 1]
FIELDS = 10  # ... and the face window: its first and last offset along the normal (NaN: the whole band), and how deep
# behind the face ink may still reach: the samples from there to the window are left untaught


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
        self.shape = np.asarray(shape)
        self.chunk, self.band = int(group.attrs["chunk"]), float(group.attrs["band"])
        # held open: each opening of a dataset starts with an empty chunk cache, so runs in one HDF5 chunk would
        # decompress it again and again
        self.points, self.normals, self.labels = group["points"], group["normals"], group["labels"]
        runs = group["runs"][:]
        self.runs = runs[np.argsort(runs[:, 0], kind="stable")]

    def in_box(self, corner, size: int) -> np.ndarray:
        """(n, STORED) float32: point relative to `corner`, normal, label in [0, 1], of the columns whose point's voxel
        lies in the cube of edge `size` at `corner`."""
        corner = np.asarray(corner, np.int64)
        grid = -(-self.shape // self.chunk)
        low = np.clip(corner // self.chunk, 0, grid - 1)
        high = np.clip((corner + size - 1) // self.chunk, 0, grid - 1)
        cz, cy, cx = np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(low, high)), indexing="ij")
        keys = ((cz * grid[1] + cy) * grid[2] + cx).ravel()
        chosen = self.runs[np.isin(self.runs[:, 0], keys)]
        if not len(chosen):
            return np.zeros((0, STORED), np.float32)
        points = np.concatenate([self.points[a:b] for _, a, b in chosen])
        normals = np.concatenate([self.normals[a:b] for _, a, b in chosen])
        labels = np.concatenate([self.labels[a:b] for _, a, b in chosen])
        voxel = np.rint(points) - corner
        inside = np.all((voxel >= 0) & (voxel < size), axis=1)
        return np.concatenate([points[inside] - corner, normals[inside], labels[inside, None] / np.float32(255)],
                              axis=1).astype(np.float32)


def fixed_size(columns: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows: a random choice of the columns if there are more, padded with PAD rows if fewer."""
    if len(columns) > count:
        columns = columns[np.sort(rng.choice(len(columns), count, replace=False))]
    out = np.full((count, columns.shape[1]), PAD, np.float32)
    out[:len(columns)] = columns
    return out


def offsets(band: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Sample offsets along a column: -band .. band, STEP apart (made on `device`: no copy to wait for)."""
    steps = int(round(2 * band / STEP))
    return torch.linspace(-band, band, steps + 1, device=device)


def face_offsets(columns: np.ndarray, scan: np.ndarray, band: float, air_level: float) -> np.ndarray:
    """(n,) where each column's written face lies along its normal, in voxels from its surface (NaN: none found);
    see ink3d.faces."""
    if not len(columns):
        return np.zeros(0)
    return find_faces(profiles_along(columns, scan, band), air_level) * STEP - band


def with_face_windows(columns: np.ndarray, scan: np.ndarray, band: float, air_level: int | None, face_depth: float,
                      ink_reach: float = 0.0) -> np.ndarray:
    """Columns (n, STORED) in `scan`'s voxel coordinates with their face windows appended (n, FIELDS): from
    `face_depth` voxels behind the written face (ink3d.faces) to one step in front of it, and the depth
    `ink_reach` (at least the window's) behind the face down to which an ink column's samples are left untaught."""
    windows = np.full((len(columns), 3), PAD, np.float32)
    if air_level is not None and len(columns) and face_depth > 0:
        face = face_offsets(columns, scan, band, air_level)
        found = np.isfinite(face)
        windows[found, 0] = face[found] - face_depth
        windows[found, 1] = face[found] + STEP
        windows[found, 2] = face[found] - max(ink_reach, face_depth)
    return np.concatenate([columns, windows], axis=1)


def face_bags(columns: torch.Tensor, band: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., T) bool each: the samples of each column (..., FIELDS) inside its face window (all of them without one),
    and those left untaught: behind the window, no deeper than the ink may reach."""
    t = offsets(band, columns.device)
    low, high, reach = columns[..., 7:8], columns[..., 8:9], columns[..., 9:10]
    windowless = torch.isnan(low)
    bag = torch.where(windowless, torch.ones_like(t, dtype=torch.bool), (t >= low) & (t <= high))
    return bag, ~windowless & (t >= reach) & (t < low)


def sample_columns(volume_: torch.Tensor, columns: torch.Tensor, band: float, matrices: torch.Tensor | None = None,
                   shifts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear samples (B, M, T) of `volume_` (B, 1, P, P, P) along the columns (B, M, FIELDS) (crop coordinates),
    and which columns count (B, M): not padding, labeled, and every sample inside the patch.

    `matrices` (B, 3, 3) and `shifts` (B, 3) are the samples' maps from patch voxels to crop voxels
    (`crop = A @ patch + b`, ink3d.augment), so the columns move with each crop's augmentation; without them
    crop and patch coincide."""
    t = offsets(band, columns.device)
    points, normals, labels = columns[..., :3], columns[..., 3:6], columns[..., 6]
    positions = points[:, :, None, :] + t[None, None, :, None] * normals[:, :, None, :]  # (B, M, T, 3) in the crop
    if matrices is not None:
        inverse = torch.linalg.inv_ex(matrices.double()).inverse.float()  # inv_ex: no host check of the result
        positions = torch.einsum("bij,bmtj->bmti", inverse, positions - shifts[:, None, None, :].float())
    size = volume_.shape[-1]
    inside = ((positions >= 0) & (positions <= size - 1)).all(-1).all(-1)
    counted = inside & (labels >= 0)  # NaN rows (padding) compare false
    grid = (positions * (2 / (size - 1)) - 1).flip(-1)  # grid_sample wants xyz in [-1, 1]
    grid = torch.nan_to_num(grid, nan=-2.0)[:, :, :, None, :]  # (B, M, T, 1, 3); padding rows sample nothing
    samples = F.grid_sample(volume_.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return samples[:, 0, :, :, 0], counted


def pool(logits: torch.Tensor, sharpness: float, bag: torch.Tensor | None = None) -> torch.Tensor:
    """One logit per column from its samples' logits (..., T): the smooth maximum (1/r) log mean exp(r x) over the
    samples of its `bag` (all by default). r -> infinity is the maximum, r -> 0 the mean."""
    if bag is None:
        return (torch.logsumexp(sharpness * logits, dim=-1) - math.log(logits.shape[-1])) / sharpness
    masked = torch.where(bag, sharpness * logits, torch.full_like(logits, -torch.inf))
    return (torch.logsumexp(masked, dim=-1) - torch.log(bag.sum(dim=-1).clamp(min=1).float())) / sharpness


def column_loss(samples: torch.Tensor, targets: torch.Tensor, sharpness: float, dice_weight: float = 0.0,
                windows: tuple[torch.Tensor, torch.Tensor] | None = None, counted: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of columns' sampled logits (..., T) against their labels (...): the BCE of the logits pooled over each
    column's bag (`windows`: the bags and the untaught samples, as face_bags gives them; all samples by default),
    plus `dice_weight` x a soft Dice over the columns, plus the BCE (target 0) of the samples neither in the bags nor
    untaught, weighed by the columns' labels (a column without ink is all negative in the voxel labels already).
    Only the `counted` columns (all by default) take part; the others are masked rather than dropped, so that the
    loss is computed without the host reading how many count (0 when none)."""
    length = samples.shape[-1]
    samples, targets = samples.reshape(-1, length), targets.reshape(-1)
    counted = torch.ones_like(targets, dtype=torch.bool) if counted is None else counted.reshape(-1)
    weight = counted.float()
    targets = torch.where(counted, targets, torch.zeros_like(targets))  # padding rows hold NaN
    bag = None
    if windows is not None:  # a column that does not count pools over every sample: finite, and weighed 0
        bag = windows[0].reshape(-1, length) | ~counted[:, None]
        untaught = windows[1].reshape(-1, length)
    pooled = pool(samples, sharpness, bag)
    loss = (F.binary_cross_entropy_with_logits(pooled, targets, reduction="none") * weight).sum() / weight.sum().clamp(min=1)
    if dice_weight:
        probabilities = torch.sigmoid(pooled) * weight
        loss = loss + dice_weight * (1 - (2 * (probabilities * targets).sum() + 1) / (probabilities.sum() + targets.sum() + 1))
    if bag is not None:
        outside = (~bag & ~untaught).float() * targets[:, None]
        negatives = F.binary_cross_entropy_with_logits(samples, torch.zeros_like(samples), reduction="none")
        total = outside.sum()
        loss = loss + (negatives * outside).sum() / torch.where(total > 0, total, torch.ones_like(total))
    return loss
