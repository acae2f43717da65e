"""Sparse 2D ink labels into 3D: voxelize a segment's labeled pixels along their normals.

For each labeled pixel, the voxels `round(p + t * n)` for t over [-band, band] in steps of at
most half a voxel are labeled, each voxel once per pixel: those with t in the ink range
[-ink_back, ink_front] get the pixel's label added to `ink_sum`, the rest of the band 0 (ink is a
thin layer on the written face: the papyrus under it and beside it is not ink), and every one 1
added to `ink_count`. A voxel reached from both parts keeps the pixel's label. Contributions are
gathered per HDF5 chunk in memory (bounded) and each chunk is read and written once per segment.
"""

import queue
import threading
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


def _rounded(position: np.ndarray, points: np.ndarray, normals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """rint(point + offset * normal) along one axis for every pixel and offset, flattened pixel-major (int32)."""
    np.multiply(normals[:, None], offsets, out=position)
    position += points[:, None]
    return np.rint(position, out=position).astype(np.int32).ravel()


def band_voxels(points_zyx: np.ndarray, normals_zyx: np.ndarray, band: float, shape,
                ink_range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Voxels of every pixel's band, each voxel once per pixel.

    Returns (z, y, x (int32) of the voxels inside the volume, index of the pixel each came from,
    whether it lies in the ink range (all true without one), distinct (pixel, voxel) pairs dropped
    because the voxel lies outside the volume). Along a straight line each coordinate of
    `rint(p + t n)` is monotone in t, so the samples of one voxel are consecutive: runs of equal
    voxels are found by comparing neighbours, and a run is ink when any of its offsets lies in the
    ink range.
    """
    offsets = band_offsets(band, ink_range)  # ascending
    samples = len(offsets)
    ink = np.ones(samples, bool) if ink_range is None else (offsets >= ink_range[0]) & (offsets <= ink_range[1])
    ink_first, ink_last = (np.flatnonzero(ink)[[0, -1]] if ink.any() else (samples, -1))
    if len(points_zyx) == 0:
        nothing = np.zeros(0, np.int32)
        return nothing, nothing, nothing, nothing, np.zeros(0, bool), 0
    position = np.empty((len(points_zyx), samples))
    z, y, x = (_rounded(position, points_zyx[:, axis], normals_zyx[:, axis], offsets) for axis in range(3))
    first = np.empty(len(z), bool)
    first[0] = True
    np.not_equal(z[1:], z[:-1], out=first[1:])
    first[1:] |= y[1:] != y[:-1]
    first[1:] |= x[1:] != x[:-1]
    first[::samples] = True  # every pixel's first sample starts a run
    starts = np.flatnonzero(first)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:] - 1
    ends[-1:] = len(z) - 1
    z, y, x = z[starts], y[starts], x[starts]
    # as unsigned, a negative coordinate is huge: one comparison per axis checks both ends
    inside = (z.view(np.uint32) < shape[0]) & (y.view(np.uint32) < shape[1]) & (x.view(np.uint32) < shape[2])
    starts, ends = starts[inside], ends[inside]
    in_ink = (starts % samples <= ink_last) & (ends % samples >= ink_first)
    return z[inside], y[inside], x[inside], starts // samples, in_ink, int(len(inside) - np.count_nonzero(inside))


class ChunkAccumulator:
    """Label sums and counts gathered per HDF5 chunk in memory, each chunk read and written once when it leaves.

    Pixels of a segment reach the same chunks from many tiles; adding each tile straight into the file
    would read, decompress, recompress and write those chunks again for every tile. Here a chunk's
    sums (float32) and counts (uint32) stay in memory until the accumulator closes; when more than
    `max_bytes` of chunks are held, the least recently reached ones leave early (and are read back,
    added to, if reached again). A background thread writes the chunks that leave, in order, while
    the next pixels are voxelized. Use as a context manager: leaving it normally writes every held
    chunk; leaving it with an error writes nothing more.
    """

    WRITE_QUEUE = 4  # chunks on their way to the file, beyond the held ones

    def __init__(self, ink_sum: h5py.Dataset, ink_count: h5py.Dataset, max_bytes: int):
        self.ink_sum, self.ink_count = ink_sum, ink_count
        self.shape, self.chunks = np.array(ink_sum.shape), np.array(ink_sum.chunks)
        self.chunk_voxels = int(np.prod(self.chunks))
        self.capacity = max(1, max_bytes // (self.chunk_voxels * (4 + 4)))
        self.held: OrderedDict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.leaving: queue.Queue = queue.Queue(maxsize=self.WRITE_QUEUE)
        self.spare: queue.SimpleQueue = queue.SimpleQueue()  # zeroed arrays of written chunks: new pages cost more than zeroing
        self.failure: BaseException | None = None
        self.ones = np.ones(0, np.uint32)
        self.writer = threading.Thread(target=self._write_leaving, daemon=True)
        self.writer.start()

    def __enter__(self) -> "ChunkAccumulator":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            while self.held:
                self._leave()
        self.held.clear()
        self.leaving.put(None)
        self.writer.join()
        if kind is None and self.failure is not None:
            raise self.failure

    def group(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, values: np.ndarray) -> list[tuple[tuple[int, int, int], np.ndarray, np.ndarray]]:
        """Contributions `values` (float32) at voxels (z, y, x) inside the volume, as (chunk, index in the chunk,
        values) per chunk. Touches no state: may run in another thread while `add` runs."""
        if len(z) == 0:
            return []
        (c0, c1, c2), (cz, cy, cx) = self.chunks, (z // self.chunks[0], y // self.chunks[1], x // self.chunks[2])
        local = ((z - cz * c0) * c1 + (y - cy * c1)) * c2 + (x - cx * c2)  # index in a whole (unclipped) chunk
        low = np.array([cz.min(), cy.min(), cx.min()])
        extent = np.array([cz.max(), cy.max(), cx.max()]) - low + 1
        key = ((cz - low[0]) * extent[1] + (cy - low[1])) * extent[2] + (cx - low[2])
        if extent.prod() <= 1 << 16:
            key = key.astype(np.uint16)  # numpy sorts 16-bit keys by radix: linear time
        order = np.argsort(key, kind="stable")
        key, local, values = key[order], local[order], values[order]
        bounds = np.flatnonzero(key[1:] != key[:-1]) + 1
        return [(tuple(int(c) for c in low + np.unravel_index(int(key[start]), tuple(extent))), local[start:stop], values[start:stop])
                for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(key)])]

    def add(self, groups: list[tuple[tuple[int, int, int], np.ndarray, np.ndarray]]) -> None:
        """Add the contributions of `group()` to the held chunks."""
        for chunk, local, values in groups:
            if len(self.ones) < len(local):
                self.ones = np.ones(len(local), np.uint32)
            sums, counts = self._held(chunk)
            np.add.at(sums, local, values)
            np.add.at(counts, local, self.ones[:len(local)])

    def _held(self, chunk: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        if chunk in self.held:
            self.held.move_to_end(chunk)
            return self.held[chunk]
        while len(self.held) >= self.capacity:
            self._leave()
        try:
            self.held[chunk] = self.spare.get_nowait()
        except queue.Empty:
            self.held[chunk] = (np.zeros(self.chunk_voxels, np.float32), np.zeros(self.chunk_voxels, np.uint32))
        return self.held[chunk]

    def _leave(self) -> None:
        """Hand the least recently reached chunk to the writer."""
        if self.failure is not None:
            raise self.failure
        self.leaving.put(self.held.popitem(last=False))

    def _write_leaving(self) -> None:
        while (item := self.leaving.get()) is not None:
            if self.failure is None:
                try:
                    for array in self._write(*item):
                        array.fill(0)
                    self.spare.put(item[1])
                except BaseException as error:  # handed to the voxelizing thread, which raises it
                    self.failure = error

    def _write(self, chunk: tuple[int, int, int], sums_and_counts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        origin = np.array(chunk) * self.chunks
        stop = np.minimum(origin + self.chunks, self.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(origin, stop))
        inside = tuple(slice(0, int(b - a)) for a, b in zip(origin, stop))
        sums, counts = (array.reshape(tuple(self.chunks))[inside] for array in sums_and_counts)
        if self.ink_count.id.get_chunk_info_by_coord(tuple(int(o) for o in origin)).byte_offset is not None:
            sums = self.ink_sum[box] + sums  # the chunk holds earlier segments' labels, or this one's from an earlier stay
            counts = self.ink_count[box] + counts
        self.ink_sum[box] = sums
        self.ink_count[box] = (counts if counts.max() <= COUNT_MAX else np.minimum(counts, COUNT_MAX)).astype(np.uint16)
        return sums_and_counts


def voxelize_tile(data: np.ndarray, labels: np.ndarray, use: np.ndarray, band: float, accumulator: ChunkAccumulator,
                  ink_range: tuple[float, float] | None = None) -> tuple[VoxelizeStats, list]:
    """The contributions of one tile of a segment, grouped by chunk for `accumulator.add`: ppm `data`
    (rows, cols, 6), `labels` in [0, 1] (float32), pixels to `use`; the pixel's label goes to the voxels
    of `ink_range` (the whole band when None), 0 to the rest. Touches no state (see `ChunkAccumulator.group`)."""
    pixels = data[use]
    values = labels[use]
    points_zyx, normals_zyx = pixels[:, 2::-1], pixels[:, 5:2:-1]
    z, y, x, pixel_index, ink, dropped = band_voxels(points_zyx, normals_zyx, band, accumulator.shape, ink_range)
    groups = accumulator.group(z, y, x, np.where(ink, values[pixel_index], np.float32(0)))
    return VoxelizeStats(pixels=len(values), ink_pixels=float(values.sum(dtype=np.float64)), contributions=len(z),
                         dropped_outside=dropped), groups
