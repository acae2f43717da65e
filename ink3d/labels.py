"""Sparse 2D ink labels into 3D: voxelize a segment's labeled pixels along their normals.

For each labeled pixel, the voxels `round(p + t * n)` for t over [-band, band] in steps of at
most half a voxel are labeled, each voxel once per pixel: those with t in the ink range
[-ink_back, ink_front] get the pixel's label added to `ink_sum`, the rest of the band 0 (ink is a
thin layer on the written face: the papyrus under it and beside it is not ink), and every one 1
added to `ink_count`. A voxel reached from both parts keeps the pixel's label. Contributions are
gathered per HDF5 chunk in memory (bounded) and each chunk is read and written once per segment.
"""

import functools
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass

import h5py
import hdf5plugin
import numpy as np

from ink3d import chunk_decoders

COUNT_MAX = np.iinfo(np.uint16).max


@dataclass
class VoxelizeStats:
    pixels: int = 0  # labeled pixels (valid ppm point, inside the mask)
    ink_pixels: float = 0.0  # sum of their labels
    contributions: int = 0  # (pixel, voxel) pairs added
    dropped_outside: int = 0  # (pixel, voxel) pairs outside the volume
    pixels_outside: int = 0  # labeled pixels whose surface point lies outside the volume

    def add(self, other: "VoxelizeStats") -> None:
        self.pixels += other.pixels
        self.ink_pixels += other.ink_pixels
        self.contributions += other.contributions
        self.dropped_outside += other.dropped_outside
        self.pixels_outside += other.pixels_outside


def band_offsets(band: float, ink_range: tuple[float, float] | None = None) -> np.ndarray:
    """Offsets along the normal from -band to +band, at most 0.5 voxel apart, with the ends of the ink range."""
    steps = max(1, int(np.ceil(2 * band / 0.5)))
    offsets = np.linspace(-band, band, steps + 1)
    return offsets if ink_range is None else np.union1d(offsets, ink_range)


def ink_range_within(band: float, ink_back: float, ink_front: float) -> tuple[float, float]:
    """The ink range [-ink_back, ink_front] along the normal, clipped to the band [-band, band]; a negative end
    reaches the band's."""
    if band < 0:
        raise ValueError(f"band {band} must be >= 0")
    return -(band if ink_back < 0 else min(ink_back, band)), (band if ink_front < 0 else min(ink_front, band))


def band_voxels(points_zyx: np.ndarray, normals_zyx: np.ndarray, band: float, shape,
                ink_range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Voxels of every pixel's band, each voxel once per pixel, pixel by pixel.

    Returns (z, y, x (int32) of the voxels inside the volume, index of the pixel each came from,
    whether it lies in the ink range (all true without one), distinct (pixel, voxel) pairs dropped
    because the voxel lies outside the volume). Along a straight line each coordinate of
    `rint(p + t n)` is monotone in t, so the samples of one voxel are consecutive: runs of equal
    voxels are found by comparing neighbours, and a run is ink when any of its offsets lies in the
    ink range.
    """
    offsets, ink_first, ink_last = _band_samples(float(band), None if ink_range is None else tuple(map(float, ink_range)))
    samples = len(offsets)
    if len(points_zyx) == 0:
        nothing = np.zeros(0, np.int32)
        return nothing, nothing, nothing, nothing, np.zeros(0, bool), 0
    pixels = len(points_zyx)
    # samples along the first axis, pixels along the second: numpy's loops run fast along the long axis
    position = np.empty((samples, pixels))
    voxels = np.empty((3, samples, pixels), np.int32)
    for axis in range(3):
        np.multiply(offsets[:, None], np.ascontiguousarray(normals_zyx[:, axis]), out=position)
        position += np.ascontiguousarray(points_zyx[:, axis])
        np.rint(position, out=voxels[axis], casting="unsafe")
    changed = voxels[0, 1:] != voxels[0, :-1]
    changed |= voxels[1, 1:] != voxels[1, :-1]
    changed |= voxels[2, 1:] != voxels[2, :-1]
    first = np.empty((pixels, samples), bool)  # pixel by pixel, the order in which contributions are added
    first[:, 0] = True  # every pixel's first sample starts a run
    first[:, 1:] = changed.T
    starts = np.flatnonzero(first).astype(np.int32 if first.size < 2**31 else np.int64)
    pixel = starts // samples
    sample = starts - pixel * samples
    at = sample * pixels + pixel
    z, y, x = voxels[0].ravel()[at], voxels[1].ravel()[at], voxels[2].ravel()[at]
    # as unsigned, a negative coordinate is huge: one comparison per axis checks both ends
    inside = (z.view(np.uint32) < shape[0]) & (y.view(np.uint32) < shape[1]) & (x.view(np.uint32) < shape[2])
    if ink_first == 0 and ink_last == samples - 1:
        in_ink = np.ones(len(starts), bool)
    else:
        following = np.append(sample[1:], 0)  # the next run's first sample, 0 where the next pixel begins
        last = np.where(following == 0, samples, following) - 1
        in_ink = (sample <= ink_last) & (last >= ink_first)
    outside = len(inside) - int(np.count_nonzero(inside))
    if outside:
        z, y, x, pixel, in_ink = z[inside], y[inside], x[inside], pixel[inside], in_ink[inside]
    return z, y, x, pixel, in_ink, outside


@functools.lru_cache(maxsize=16)
def _band_samples(band: float, ink_range: tuple[float, float] | None) -> tuple[np.ndarray, int, int]:
    """band_offsets, and the first and last of them in the ink range (samples, -1 when none is)."""
    offsets = band_offsets(band, ink_range)
    ink = np.ones(len(offsets), bool) if ink_range is None else (offsets >= ink_range[0]) & (offsets <= ink_range[1])
    ink_first, ink_last = (int(index) for index in np.flatnonzero(ink)[[0, -1]]) if ink.any() else (len(offsets), -1)
    offsets.flags.writeable = False
    return offsets, ink_first, ink_last


class ChunkAccumulator:
    """Label sums and counts gathered per HDF5 chunk in memory, each chunk read and written once when it leaves.

    Pixels of a segment reach the same chunks from many tiles; adding each tile straight into the file
    would read, decompress, recompress and write those chunks again for every tile. Here the chunks a
    segment reaches are held in slots of one pool, sums (float32) and counts (uint16), so that a tile's
    contributions are added with one scatter whatever chunks they reach. Chunks that the last `LINGER`
    tiles did not reach leave (the rows have moved past them), and when the pool (`max_bytes`) is full
    the least recently reached one leaves early; a chunk reached again after it left is added to the
    stored one. A background thread adds the stored chunk, compresses and writes the chunks that leave, in
    order, while the next pixels are voxelized: for blosc or uncompressed datasets it compresses and
    writes chunks itself (HDF5 holds the GIL while its filters run). Use as a context manager: leaving
    it normally writes every held chunk; leaving it with an error writes nothing more. An error of the
    writer is raised in the voxelizing thread, at the next chunk it hands over or at the end.
    """

    LINGER = 2  # tiles that a chunk stays held without being reached

    def __init__(self, ink_sum: h5py.Dataset, ink_count: h5py.Dataset, max_bytes: int):
        self.ink_sum, self.ink_count = ink_sum, ink_count
        self.shape, self.chunks = np.array(ink_sum.shape), np.array(ink_sum.chunks)
        self.chunk_voxels = int(np.prod(self.chunks))
        # no more slots than the volume has chunks: where freed memory is kept (ink3d.memory), a pool is zeroed in full
        self.slots = max(1, min(max_bytes // (self.chunk_voxels * (4 + 2)), int(np.prod(-(-self.shape // self.chunks)))))
        # untouched pages of a fresh pool take no memory: a small segment costs only the chunks it reaches
        self.sums = np.zeros(self.slots * self.chunk_voxels, np.float32)
        self.counts = np.zeros(self.slots * self.chunk_voxels, np.uint16)
        self.index_type = np.int32 if self.slots * self.chunk_voxels < 2**31 else np.int64
        self.held: OrderedDict[tuple[int, int, int], int] = OrderedDict()  # chunk -> slot, least recently reached first
        self.last_reached: dict[tuple[int, int, int], int] = {}  # chunk -> the last tile that reached it
        self.pixels_held: dict[tuple[int, int, int], int] = {}  # chunk -> pixels that reached it since it is held
        self.tiles = 0
        self.free: queue.LifoQueue = queue.LifoQueue()  # zeroed slots, the most recently used (in memory already) first
        for slot in range(self.slots):
            self.free.put(slot)
        self.leaving: queue.SimpleQueue = queue.SimpleQueue()
        self.codecs = _chunk_codecs(ink_sum, ink_count)
        self.failure: BaseException | None = None
        self.ones = np.ones(0, np.uint16)
        self.writer = threading.Thread(target=self._write_leaving, daemon=True)
        self.writer.start()

    def __enter__(self) -> "ChunkAccumulator":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            while self.held:
                self._leave()
        elif self.failure is None:
            self.failure = error  # the writer skips what is still on its way
        self.held.clear()
        self.leaving.put(None)
        self.writer.join()
        if kind is None and self.failure is not None:
            raise self.failure

    def chunks_reached(self, points_zyx: np.ndarray, normals_zyx: np.ndarray, band: float) -> int:
        """How many chunks hold one of the points or an end of its band: about what a strip of these points reaches."""
        grid = -(-self.shape // self.chunks)
        ends = np.concatenate([points_zyx + offset * normals_zyx for offset in (-band, 0.0, band)])
        chunk = np.clip(np.rint(ends) // self.chunks, 0, grid - 1).astype(np.int64)
        return len(np.unique((chunk[:, 0] * grid[1] + chunk[:, 1]) * grid[2] + chunk[:, 2]))

    def add(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, values: np.ndarray, pixel: np.ndarray) -> None:
        """Add one tile's `values` (float32) to the sums and 1 to the counts at voxels (z, y, x) (int32, inside the
        volume), reached by the tile's `pixel` (ascending, each voxel once per pixel, at most COUNT_MAX pixels)."""
        self.tiles += 1
        if len(z):
            if pixel[-1] >= COUNT_MAX:
                raise ValueError(f"a tile of more than {COUNT_MAX} pixels could overflow the counts it holds")
            self._scatter(z, y, x, values, pixel)
        # a strip of rows moves on through the volume: chunks that the last tiles did not reach are most
        # likely finished, and leave now, so that the writer works alongside and new chunks find free slots
        while self.held and self.last_reached[next(iter(self.held))] <= self.tiles - self.LINGER:
            self._leave()

    def _scatter(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, values: np.ndarray, pixel: np.ndarray) -> None:
        (c0, c1, c2), (cz, cy, cx) = self.chunks, (z // self.chunks[0], y // self.chunks[1], x // self.chunks[2])
        local = ((z - cz * c0) * c1 + (y - cy * c1)) * c2 + (x - cx * c2)  # index in a whole (unclipped) chunk
        low = np.array([cz.min(), cy.min(), cx.min()])
        extent = np.array([cz.max(), cy.max(), cx.max()]) - low + 1
        key = ((cz - low[0]) * extent[1] + (cy - low[1])) * extent[2] + (cx - low[2])
        # a pixel's voxels run along a line, so it reaches each chunk in one run: runs of (pixel, chunk) count the
        # pixels reaching each chunk, which bound how much any of its counts grows
        pair_starts = np.empty(len(key), bool)
        pair_starts[0] = True
        np.not_equal(key[1:], key[:-1], out=pair_starts[1:])
        pair_starts[1:] |= pixel[1:] != pixel[:-1]
        pixels_reaching = np.bincount(key[pair_starts], minlength=int(extent.prod()))
        reached = np.flatnonzero(pixels_reaching)
        # one batch unless a tile reaches more chunks than the pool holds
        for start in range(0, len(reached), self.slots):
            batch = reached[start:start + self.slots]
            origin = np.zeros(int(extent.prod()), self.index_type)  # where each reached chunk's slot starts in the pool
            for kept, chunk_key in enumerate(batch):
                chunk = tuple(int(c) for c in low + np.unravel_index(int(chunk_key), tuple(extent)))
                origin[chunk_key] = self._slot(chunk, kept, int(pixels_reaching[chunk_key])) * self.chunk_voxels
            index, batch_values = origin[key] + local, values
            if len(batch) < len(reached):
                in_batch = np.isin(key, batch)
                index, batch_values = index[in_batch], values[in_batch]
            if len(self.ones) < len(index):
                self.ones = np.ones(len(index), np.uint16)
            np.add.at(self.counts, index, self.ones[:len(index)])
            labeled = batch_values != 0  # adding 0 to a sum changes nothing: ink is sparse
            np.add.at(self.sums, index[labeled], batch_values[labeled])

    def _slot(self, chunk: tuple[int, int, int], kept: int, pixels: int) -> int:
        """The slot holding `chunk`, made the most recently reached by `pixels` more pixels; the `kept` most recent
        chunks stay held. A chunk whose counts could pass COUNT_MAX leaves first and starts again from 0."""
        if chunk in self.held and self.pixels_held[chunk] + pixels > COUNT_MAX:
            self._leave(chunk)
        self.last_reached[chunk] = self.tiles
        self.pixels_held[chunk] = self.pixels_held.get(chunk, 0) + pixels
        if chunk in self.held:
            self.held.move_to_end(chunk)
            return self.held[chunk]
        while True:
            try:
                slot = self.free.get_nowait()
                break
            except queue.Empty:
                pass
            if len(self.held) > kept:
                self._leave()
            else:  # every other slot is on its way to the file
                slot = self.free.get()
                break
        if self.failure is not None:
            raise self.failure
        self.held[chunk] = slot
        return slot

    def _leave(self, chunk: tuple[int, int, int] | None = None) -> None:
        """Hand `chunk` (the least recently reached one by default) to the writer."""
        if self.failure is not None:
            raise self.failure
        chunk = next(iter(self.held)) if chunk is None else chunk
        slot = self.held.pop(chunk)
        del self.last_reached[chunk], self.pixels_held[chunk]
        self.leaving.put((chunk, slot))

    def _write_leaving(self) -> None:
        while (item := self.leaving.get()) is not None:
            chunk, slot = item
            voxels = slice(slot * self.chunk_voxels, (slot + 1) * self.chunk_voxels)
            if self.failure is None:
                try:
                    self._write(chunk, self.sums[voxels], self.counts[voxels])
                except BaseException as error:  # handed to the voxelizing thread, which raises it
                    self.failure = error
            self.sums[voxels] = 0
            self.counts[voxels] = 0
            self.free.put(slot)

    def _write(self, chunk: tuple[int, int, int], sums: np.ndarray, counts: np.ndarray) -> None:
        """Add the stored chunk (if any) to `sums` and `counts` (a whole chunk each) and store them."""
        origin = tuple(int(c) for c in np.array(chunk) * self.chunks)
        stored = self.ink_count.id.get_chunk_info_by_coord(origin).byte_offset is not None
        if self.codecs is None:  # other codecs: through HDF5's own filters, the edge chunks clipped
            stop = np.minimum(np.array(origin) + self.chunks, self.shape)
            box = tuple(slice(a, int(b)) for a, b in zip(origin, stop))
            inside = tuple(slice(0, int(b) - a) for a, b in zip(origin, stop))
            sums, counts = (array.reshape(tuple(self.chunks))[inside] for array in (sums, counts))
            if stored:
                sums += self.ink_sum[box]
                counts = _saturating_sum(counts, self.ink_count[box])
            self.ink_sum[box] = sums
            self.ink_count[box] = counts
            return
        if stored:  # earlier segments' labels, or this one's from an earlier stay
            sums += _read_chunk(self.ink_sum, origin, self.codecs[0], np.float32)
            counts = _saturating_sum(counts, _read_chunk(self.ink_count, origin, self.codecs[1], np.uint16))
        _write_chunk(self.ink_sum, origin, self.codecs[0], sums)
        _write_chunk(self.ink_count, origin, self.codecs[1], counts)


def _saturating_sum(counts: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """uint16 counts plus stored ones, held at COUNT_MAX."""
    return np.minimum(counts.astype(np.uint32) + stored, COUNT_MAX).astype(np.uint16)


def _chunk_codecs(*datasets: h5py.Dataset) -> tuple | None:
    """Per dataset, the codec of its stored chunks: a numcodecs Blosc with the dataset's settings, or None
    for uncompressed chunks; None when some dataset has other filters (HDF5 must run them)."""
    codecs = []
    for dataset in datasets:
        plist = dataset.id.get_create_plist()
        filters = [plist.get_filter(index) for index in range(plist.get_nfilters())]
        if not filters:
            codecs.append(None)
            continue
        codec = chunk_decoders.blosc_codec(filters[0][2]) if len(filters) == 1 and filters[0][0] == hdf5plugin.BLOSC_ID else None
        if codec is None:
            return None
        codecs.append(codec)
    return tuple(codecs)


def _read_chunk(dataset: h5py.Dataset, origin: tuple[int, ...], codec, dtype) -> np.ndarray:
    """A stored whole chunk, flat. Blosc (de)compresses without the GIL, HDF5's filters do not."""
    return np.frombuffer(chunk_decoders.read_raw_chunk(dataset, origin, [] if codec is None else [codec.decode]), dtype)


def _write_chunk(dataset: h5py.Dataset, origin: tuple[int, ...], codec, chunk: np.ndarray) -> None:
    dataset.id.write_direct_chunk(origin, chunk.tobytes() if codec is None else codec.encode(chunk))


def voxelize_tile(data: np.ndarray, labels: np.ndarray, use: np.ndarray, band: float, accumulator: ChunkAccumulator,
                  ink_range: tuple[float, float] | None = None) -> VoxelizeStats:
    """Add one tile of a segment to `accumulator`: ppm `data` (rows, cols, 6), `labels` in [0, 1] (float32),
    pixels to `use`; the pixel's label goes to the voxels of `ink_range` (the whole band when None), 0 to the rest."""
    pixels = data[use]
    values = labels[use]
    points_zyx, normals_zyx = pixels[:, 2::-1], pixels[:, 5:2:-1]
    z, y, x, pixel_index, ink, dropped = band_voxels(points_zyx, normals_zyx, band, accumulator.shape, ink_range)
    accumulator.add(z, y, x, np.where(ink, values[pixel_index], np.float32(0)), pixel_index)
    return VoxelizeStats(pixels=len(values), ink_pixels=float(values.sum(dtype=np.float64)), contributions=len(z),
                         dropped_outside=dropped)


def boxes_with_labels(dataset: h5py.Dataset, low: np.ndarray, high: np.ndarray, enough: int | None = None) -> np.ndarray:
    """(N,) bool: which boxes [low, high) (N, 3 zyx each, clipped to the volume) hold a labeled voxel of a label
    volume's `ink_count`. Boxes that reach no stored chunk hold none (a chunk without labels is never written); the
    others are read, in order, until `enough` are found to hold one (the rest then count as not checked: False)."""
    chunk, shape = np.array(dataset.chunks), np.array(dataset.shape)
    stored = []
    dataset.id.chunk_iter(lambda info: stored.append(info.chunk_offset))
    found = np.zeros(len(low), bool)
    if not stored:
        return found
    grid = -(-shape // chunk)
    labeled = np.zeros(grid, bool)
    labeled[tuple((np.array(stored) // chunk).T)] = True
    low, high = np.clip(low, 0, shape), np.clip(high, 0, shape)
    for index in range(len(low)):
        if np.any(high[index] <= low[index]):
            continue
        first, last = low[index] // chunk, -(-high[index] // chunk)
        if labeled[first[0]:last[0], first[1]:last[1], first[2]:last[2]].any():
            box = tuple(slice(a, b) for a, b in zip(low[index], high[index]))
            found[index] = bool(np.any(dataset[box]))
            if enough is not None and found.sum() >= enough:
                break
    return found
