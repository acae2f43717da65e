"""Sparse 2D ink labels into 3D: voxelize a segment's labeled pixels along their normals.

For each labeled pixel, the voxels `round(p + t * n)` for t over [-band, band] in steps of at
most half a voxel are labeled, each voxel once per pixel: those with t in the ink range
[-ink_back, ink_front] get the pixel's label added to `ink_sum`, the rest of the band 0 (ink is a
thin layer on the written face: the papyrus under it and beside it is not ink), and every one 1
added to `ink_count`. A voxel reached from both parts keeps the pixel's label. Contributions are
gathered per HDF5 chunk in memory (bounded) and each chunk is read and written once per segment.
"""

from collections import OrderedDict
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
                ink_range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Voxels of every pixel's band, each voxel once per pixel.

    Returns (z, y, x of the voxels inside the volume, index of the pixel each came from, whether it
    lies in the ink range (all true without one), distinct (pixel, voxel) pairs dropped because the
    voxel lies outside the volume). Along a straight line each coordinate of `rint(p + t n)` is
    monotone in t, so the samples of one voxel are consecutive: runs of equal voxels are found by
    comparing neighbours, and a run is ink when any of its offsets lies in the ink range.
    """
    offsets = band_offsets(band, ink_range)  # ascending
    ink_offsets = np.arange(len(offsets)) if ink_range is None else np.flatnonzero((offsets >= ink_range[0]) & (offsets <= ink_range[1]))
    samples = len(offsets)
    voxels = np.rint(points_zyx[:, None, :] + offsets[None, :, None] * normals_zyx[:, None, :]).astype(np.int64).reshape(-1, 3)
    first = np.ones(len(voxels), bool)
    first[1:] = np.any(voxels[1:] != voxels[:-1], axis=1)
    first[::samples] = True  # every pixel's first sample starts a run
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(voxels)) - 1
    voxels = voxels[starts]
    inside = np.all((voxels >= 0) & (voxels < np.asarray(shape)), axis=1)
    start_column, end_column = starts % samples, ends % samples
    ink = (start_column <= ink_offsets[-1]) & (end_column >= ink_offsets[0]) if len(ink_offsets) else np.zeros(len(starts), bool)
    z, y, x = voxels[inside].T
    return z, y, x, starts[inside] // samples, ink[inside], int((~inside).sum())


class ChunkAccumulator:
    """Label sums and counts gathered per HDF5 chunk in memory, each chunk read and written once when flushed.

    Pixels of a segment reach the same chunks from many tiles; adding each tile straight into the file
    would read, decompress, recompress and write those chunks again for every tile. Here a chunk's
    sums (float32) and counts (uint32) stay in memory until `flush()`; when more than `max_bytes` of
    chunks are held, the least recently reached ones are written early (and read back if reached again).
    """

    def __init__(self, ink_sum: h5py.Dataset, ink_count: h5py.Dataset, max_bytes: int):
        self.ink_sum, self.ink_count = ink_sum, ink_count
        self.shape, self.chunks = np.array(ink_sum.shape), np.array(ink_sum.chunks)
        self.capacity = max(1, max_bytes // (int(np.prod(self.chunks)) * (4 + 4)))
        self.held: OrderedDict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.chunk_writes = 0

    def add(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, values: np.ndarray) -> None:
        """Add `values` (float32) at voxels (z, y, x) inside the volume."""
        if len(z) == 0:
            return
        cz, cy, cx = z // self.chunks[0], y // self.chunks[1], x // self.chunks[2]
        low = np.array([cz.min(), cy.min(), cx.min()])
        extent = np.array([cz.max(), cy.max(), cx.max()]) - low + 1
        key = ((cz - low[0]) * extent[1] + (cy - low[1])) * extent[2] + (cx - low[2])
        if extent.prod() <= 1 << 16:
            key = key.astype(np.uint16)  # numpy sorts 16-bit keys by radix: linear time
        order = np.argsort(key, kind="stable")
        bounds = np.flatnonzero(np.diff(key[order])) + 1
        z, y, x, values, key = z[order], y[order], x[order], values[order], key[order]
        for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
            chunk = tuple(int(c) for c in low + np.unravel_index(int(key[start]), tuple(extent)))
            sums, counts = self._held(chunk)
            origin = np.array(chunk) * self.chunks
            box = np.minimum(origin + self.chunks, self.shape) - origin
            local = ((z[start:stop] - origin[0]) * box[1] + (y[start:stop] - origin[1])) * box[2] + (x[start:stop] - origin[2])
            np.add.at(sums, local, values[start:stop])
            np.add.at(counts, local, np.ones(stop - start, np.uint32))

    def _held(self, chunk: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        if chunk in self.held:
            self.held.move_to_end(chunk)
            return self.held[chunk]
        while len(self.held) >= self.capacity:
            self._write(*self.held.popitem(last=False))
        origin = np.array(chunk) * self.chunks
        size = int(np.prod(np.minimum(origin + self.chunks, self.shape) - origin))
        self.held[chunk] = (np.zeros(size, np.float32), np.zeros(size, np.uint32))
        return self.held[chunk]

    def _write(self, chunk: tuple[int, int, int], sums_and_counts: tuple[np.ndarray, np.ndarray]) -> None:
        origin = np.array(chunk) * self.chunks
        stop = np.minimum(origin + self.chunks, self.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(origin, stop))
        sums, counts = (array.reshape(tuple(stop - origin)) for array in sums_and_counts)
        if self.ink_count.id.get_chunk_info_by_coord(tuple(int(o) for o in origin)).byte_offset is not None:
            sums = self.ink_sum[box] + sums  # the chunk holds earlier segments' labels
            counts = self.ink_count[box] + counts
        self.ink_sum[box] = sums
        self.ink_count[box] = np.minimum(counts, COUNT_MAX).astype(np.uint16)
        self.chunk_writes += 1

    def flush(self) -> None:
        """Write every held chunk (added to what the file holds)."""
        while self.held:
            self._write(*self.held.popitem(last=False))


def voxelize_tile(data: np.ndarray, labels: np.ndarray, use: np.ndarray, band: float, accumulator: ChunkAccumulator,
                  ink_range: tuple[float, float] | None = None) -> VoxelizeStats:
    """Add one tile of a segment: ppm `data` (rows, cols, 6), `labels` in [0, 1] (float32), pixels to `use`;
    the pixel's label goes to the voxels of `ink_range` (the whole band when None), 0 to the rest."""
    pixels = data[use]
    values = labels[use]
    points_zyx, normals_zyx = pixels[:, 2::-1], pixels[:, 5:2:-1]
    z, y, x, pixel_index, ink, dropped = band_voxels(points_zyx, normals_zyx, band, accumulator.shape, ink_range)
    accumulator.add(z, y, x, np.where(ink, values[pixel_index], np.float32(0)))
    return VoxelizeStats(pixels=len(values), ink_pixels=float(values.sum(dtype=np.float64)), contributions=len(z), dropped_outside=dropped)
