"""Sparse 2D ink labels into 3D: voxelize a segment's labeled pixels along their normals.

For each labeled pixel, the voxels `round(p + t * n)` for t over [-band, band] in steps of at
most half a voxel are labeled, each voxel once per pixel: those with t in the ink range
[-ink_back, ink_front] get the pixel's label added to `ink_sum`, the rest of the band 0 (ink is a
thin layer on the written face: the papyrus under it and beside it is not ink), and every one 1
added to `ink_count`. A voxel reached from both parts keeps the pixel's label. Contributions of a tile of pixels are grouped by HDF5 chunk and added with one
read-modify-write per touched chunk, so memory is bounded by the tile.
"""

from dataclasses import dataclass

import h5py
import numpy as np

COUNT_MAX = np.iinfo(np.uint16).max


@dataclass
class VoxelizeStats:
    pixels: int = 0  # labeled pixels (valid ppm point, inside the mask)
    ink_pixels: float = 0.0  # sum of their labels
    contributions: int = 0  # (pixel, voxel) pairs added
    dropped_outside: int = 0  # (pixel, voxel) pairs outside the volume

    def add(self, other: "VoxelizeStats") -> None:
        self.pixels += other.pixels
        self.ink_pixels += other.ink_pixels
        self.contributions += other.contributions
        self.dropped_outside += other.dropped_outside


def band_offsets(band: float, ink_range: tuple[float, float] | None = None) -> np.ndarray:
    """Offsets along the normal from -band to +band, at most 0.5 voxel apart, with the ends of the ink range."""
    steps = max(1, int(np.ceil(2 * band / 0.5)))
    offsets = np.linspace(-band, band, steps + 1)
    return offsets if ink_range is None else np.union1d(offsets, ink_range)


def ink_range_within(band: float, ink_back: float, ink_front: float) -> tuple[float, float]:
    """The ink range [-ink_back, ink_front] along the normal, clipped to the band [-band, band]."""
    if min(band, ink_back, ink_front) < 0:
        raise ValueError(f"band {band}, ink_back {ink_back} and ink_front {ink_front} must be >= 0")
    return -min(ink_back, band), min(ink_front, band)


def band_voxels(points_zyx: np.ndarray, normals_zyx: np.ndarray, band: float, shape,
                ink_range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Voxels of every pixel's band, each voxel once per pixel.

    Returns (flat voxel indices, index of the pixel each came from, whether it lies in the ink
    range (all true without one), distinct (pixel, voxel) pairs dropped because the voxel lies
    outside the volume).
    """
    offsets = band_offsets(band, ink_range)
    in_ink = np.ones(len(offsets), bool) if ink_range is None else (offsets >= ink_range[0]) & (offsets <= ink_range[1])
    first_ink = np.argsort(~in_ink, kind="stable")  # ink offsets first: of equal voxels the first one is kept
    offsets, in_ink = offsets[first_ink], in_ink[first_ink]
    voxels = np.rint(points_zyx[:, None, :] + offsets[None, :, None] * normals_zyx[:, None, :]).astype(np.int64)
    inside = np.all((voxels >= 0) & (voxels < np.asarray(shape)), axis=-1)
    flat = np.ravel_multi_index(tuple(np.moveaxis(np.where(inside[..., None], voxels, 0), -1, 0)), shape)
    # outside voxels get distinct negative keys, so duplicates among them are found the same way
    wide = np.clip(voxels, -(1 << 20), (1 << 20) - 1) + (1 << 20)
    outside_key = -1 - ((wide[..., 0] << 42) | (wide[..., 1] << 21) | wide[..., 2])
    keys = np.where(inside, flat, outside_key)
    if in_ink.all():
        keys.sort(axis=1)
        ink = np.ones(keys.shape, bool)
    else:
        order = np.argsort(keys, axis=1, kind="stable")
        keys, ink = np.take_along_axis(keys, order, axis=1), in_ink[order]
    first = np.ones(keys.shape, bool)
    first[:, 1:] = keys[:, 1:] != keys[:, :-1]
    keep = first & (keys >= 0)
    pixel_index = np.broadcast_to(np.arange(len(keys))[:, None], keys.shape)
    return keys[keep], pixel_index[keep], ink[keep], int((first & (keys < 0)).sum())


def add_contributions(ink_sum: h5py.Dataset, ink_count: h5py.Dataset, flat: np.ndarray, values: np.ndarray) -> int:
    """Add `values` at flat voxel indices `flat`: one read-modify-write per touched chunk.

    Returns the number of chunks touched.
    """
    if len(flat) == 0:
        return 0
    shape, chunks = np.array(ink_sum.shape), np.array(ink_sum.chunks)
    zyx = np.stack(np.unravel_index(flat, ink_sum.shape), axis=1)
    chunk_zyx = zyx // chunks
    chunk_key = np.ravel_multi_index(tuple(chunk_zyx.T), tuple(-(-shape // chunks)))
    order = np.argsort(chunk_key, kind="stable")
    keys, starts = np.unique(chunk_key[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    for start, end in zip(starts, ends):
        members = order[start:end]
        origin = chunk_zyx[members[0]] * chunks
        stop = np.minimum(origin + chunks, shape)
        box = tuple(slice(a, b) for a, b in zip(origin, stop))
        box_shape = tuple(stop - origin)
        local = np.ravel_multi_index(tuple((zyx[members] - origin).T), box_shape)
        size = int(np.prod(box_shape))
        sums = np.bincount(local, weights=values[members], minlength=size).reshape(box_shape)
        counts = np.bincount(local, minlength=size).reshape(box_shape)
        ink_sum[box] = ink_sum[box] + sums.astype(np.float32)
        ink_count[box] = np.minimum(ink_count[box].astype(np.int64) + counts, COUNT_MAX).astype(np.uint16)
    return len(keys)


def voxelize_tile(data: np.ndarray, labels: np.ndarray, use: np.ndarray, band: float, ink_sum, ink_count,
                  ink_range: tuple[float, float] | None = None) -> VoxelizeStats:
    """Add one tile of a segment: ppm `data` (rows, cols, 6), `labels` in [0, 1], pixels to `use`; the
    pixel's label goes to the voxels of `ink_range` (the whole band when None), 0 to the rest."""
    pixels = data[use]
    values = labels[use].astype(np.float64)
    points_zyx, normals_zyx = pixels[:, 2::-1], pixels[:, 5:2:-1]
    flat, pixel_index, ink, dropped = band_voxels(points_zyx, normals_zyx, band, ink_sum.shape, ink_range)
    add_contributions(ink_sum, ink_count, flat, values[pixel_index] * ink)
    return VoxelizeStats(pixels=len(values), ink_pixels=float(values.sum()), contributions=len(flat), dropped_outside=dropped)
