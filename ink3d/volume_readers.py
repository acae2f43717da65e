"""The volumes the stages read: zarr arrays and HDF5 datasets as uint8 (z, y, x) volumes, read through a cache of
decompressed chunks where asked (ink3d.volume.open_dataset opens them)."""

import atexit
import itertools
import sys
import warnings
import zlib
from pathlib import Path

import h5py
import numpy as np

from ink3d.chunk_cache import ChunkCache, box_of, inside_of_chunk
from ink3d.chunk_decoders import chunk_decoders, read_raw_chunk, stored_chunk_decoder

AXES = "zyx"
UINT16_TO_UINT8 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535)


class Uint8View:
    """A uint8 or uint16 (z, y, x) array read as the pipeline's uint8 volume (uint16 by `round(v * 255 / 65535)`,
    as volume_to_hdf converts it): shape, dtype, chunks, attrs, slicing, and `scale`, the size of its voxel in
    voxels of full resolution (zyx; an OME-Zarr level's)."""

    def __init__(self, array, where: str, scale=(1.0, 1.0, 1.0)):
        self.array, self.where = array, where
        self.shape, self.chunks, self.ndim = tuple(array.shape), tuple(array.chunks), 3
        self.dtype = np.dtype(np.uint8)
        self.attrs = {"axes": AXES}
        self.scale = np.asarray(scale, dtype=np.float64)
        self.voxel_size = None  # (zyx size, unit) where OME-Zarr metadata gives it
        self._lut = None if array.dtype == np.uint8 else UINT16_TO_UINT8

    def __getitem__(self, key) -> np.ndarray:
        values = np.asarray(self.array[key])
        return values if self._lut is None else self._lut[values]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where}, shape={self.shape})"


class ZarrVolume(Uint8View):
    """A zarr array as a uint8 volume that counts the chunks (the shards of a sharded array: its files) its reads
    found absent from a local store (they read as 0: written empty, or never downloaded); the first is warned of,
    the count reported when the process ends. A prediction store of this pipeline leaves all-zero chunks unwritten:
    its absent chunks are not counted.

    With `cache_bytes`, a box (slices of step 1) is read through a `ChunkCache`: zarr decompresses every chunk that
    a read touches, each time, so neighbouring reads (a segment's tiles, overlapping windows) would decompress the
    chunks they share again and again. The cache reads an array in a local folder whose chunks are stored through one
    compressor (`stored_chunk_decoder`) a chunk at a time from its file, decompressed by numcodecs (flatten_3d 1.3-1.5x
    faster than through zarr, whose machinery costs ~3 ms a chunk and lets threads decompress little side by side);
    any other array through zarr, a box's missing chunks in one call where they fill the box they span."""

    def __init__(self, array, where: str, scale=(1.0, 1.0, 1.0), count_absent: bool = True, cache_bytes: int = 0,
                 manifest: dict | None = None):
        super().__init__(array, where, scale)
        self._manifest = manifest  # chunk key -> CRC-32 of the file: every chunk read is checked against it, once
        self._checked = set()
        root = getattr(array.store, "root", None)
        self._stored_in = None if root is None else Path(root) / array.path  # a local store: the array's folder
        self._folder = self._stored_in if count_absent else None
        self._stored = tuple(getattr(array, "shards", None) or self.chunks)  # a sharded array stores a file per shard
        self._grid = tuple(-(-size // chunk) for size, chunk in zip(self.shape, self._stored))
        self._seen, self.absent = set(), 0
        self.cache, self.decoder = None, None
        if cache_bytes:
            self.decoder = None if self._stored_in is None else stored_chunk_decoder(array)
            read, together = (self._read, True) if self.decoder is None else (self._read_stored, False)
            self.cache = ChunkCache(self.shape, self.chunks, self.dtype, cache_bytes, read, together)

    def __getitem__(self, key) -> np.ndarray:
        if self._folder is not None:
            self._count_absent(key)
        box = None if self.cache is None else box_of(key, self.shape)
        whole = box_of(key, self.shape) if box is None and self._manifest is not None else None
        if whole is not None:  # read by zarr: its chunks checked first
            for index in itertools.product(*(range(start // size, -(-stop // size)) for (start, stop), size in zip(whole, self.chunks))):
                if index not in self._checked:
                    self._checked_bytes(index)
                    self._checked.add(index)
        return super().__getitem__(key) if box is None else self.cache.read(box)

    def _checked_bytes(self, index: tuple[int, ...]) -> bytes | None:
        """A chunk's file's bytes (None: never written), checked against the store's manifest where it has one."""
        path = self._stored_in / self.array.metadata.encode_chunk_key(index)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if self._manifest is not None and path.relative_to(self._stored_in).as_posix() in self._manifest:
                raise OSError(f"the chunk {path} was written when the store was finished and is missing now") from None
            return None
        if self._manifest is not None and zlib.crc32(data) != self._manifest.get(path.relative_to(self._stored_in).as_posix()):
            raise OSError(f"the chunk {path} differs from the one written when the store was finished")
        return data

    def _read(self, missing: list[tuple[int, ...]]) -> dict:
        """Chunks read in one read where they fill the box they span (~1.5x faster than one by one for zarr), else one
        by one, so that no chunk already kept is read again."""
        low, high = np.min(missing, axis=0), np.max(missing, axis=0) + 1
        groups = [(low, high)] if int(np.prod(high - low)) == len(missing) else [(np.array(i), np.array(i) + 1) for i in missing]
        chunk = np.array(self.chunks)
        read = {}
        for first, last in groups:
            span = Uint8View.__getitem__(self, tuple(slice(a, min(b, size)) for a, b, size in zip(first * chunk, last * chunk, self.shape)))
            for index in itertools.product(*(range(a, b) for a, b in zip(first, last))):
                offset = (np.array(index) - first) * chunk
                values = span[tuple(slice(o, o + c) for o, c in zip(offset, chunk))]
                read[index] = values if int(np.prod(last - first)) == 1 else values.copy()  # a view would keep the whole read alive
        return read

    def _read_stored(self, missing: list[tuple[int, ...]]) -> dict:
        return {index: self._stored_chunk(index) for index in missing}

    def _stored_chunk(self, index: tuple[int, ...]) -> np.ndarray:
        """A chunk read from its file (one never written: the fill value), clipped to the volume."""
        decode, dtype, fill = self.decoder
        inside = inside_of_chunk(index, self.chunks, self.shape)
        path = self._stored_in / self.array.metadata.encode_chunk_key(index)
        data = self._checked_bytes(index)
        if data is None:
            values = np.broadcast_to(np.asarray(fill, dtype), [part.stop for part in inside])
        else:
            try:
                values = np.frombuffer(decode(data), dtype).reshape(self.chunks)[inside]
            except (RuntimeError, ValueError, EOFError, zlib.error) as error:
                raise OSError(f"the chunk {path} does not decompress ({error})") from None
        return values if self._lut is None else self._lut[values]

    def _count_absent(self, key) -> None:
        key = key if isinstance(key, tuple) else (key,)
        ranges = []
        for axis, size in enumerate(self.shape):
            part = key[axis] if axis < len(key) else slice(None)
            start, stop = (part, part + 1) if isinstance(part, (int, np.integer)) else part.indices(size)[:2]
            ranges.append(range(start // self._stored[axis], -(-stop // self._stored[axis])) if stop > start else range(0))
        for index in itertools.product(*ranges):
            flat = int(np.ravel_multi_index(index, self._grid))
            if flat in self._seen:
                continue
            self._seen.add(flat)
            if not (self._folder / self.array.metadata.encode_chunk_key(index)).exists():
                if not self.absent:
                    warnings.warn(f"{self.where}: chunk {'/'.join(map(str, index))} is absent from the store and reads as 0 "
                                  "(written empty, or not downloaded); absent chunks are counted", stacklevel=3)
                    atexit.register(self._report)
                self.absent += 1

    def _report(self) -> None:
        print(f"{self.where}: {self.absent} of the {len(self._seen)} chunks read were absent from the store and read as 0",
              file=sys.stderr)


class Hdf5Volume:
    """An HDF5 dataset read through a `ChunkCache`, its chunks read raw and decompressed here: HDF5 runs its filters
    inside h5py's lock, one call at a time in a process, so threads would decompress one chunk at a time, while
    numcodecs' blosc and zlib decompress outside it, side by side (and blosc at about half the CPU time it takes
    through HDF5). Chunks never written read as the fill value; chunks whose filters are not decoded here (`chunk_decoders`)
    are read whole through HDF5. A uint16 scan reads as uint8 (`lut`: `UINT16_TO_UINT8`). Keys other than boxes of
    slices with step 1 read through HDF5."""

    def __init__(self, dataset: h5py.Dataset, where: str, cache_bytes: int, lut: np.ndarray | None = None):
        self.dataset, self.where, self._lut = dataset, where, lut
        self.shape, self.chunks, self.ndim, self.attrs = dataset.shape, dataset.chunks, 3, dataset.attrs
        self.dtype = dataset.dtype if lut is None else lut.dtype
        self.decoders = chunk_decoders(dataset)
        self.cache = ChunkCache(self.shape, self.chunks, self.dtype, cache_bytes, self._read)

    def __getitem__(self, key) -> np.ndarray:
        box = box_of(key, self.shape)
        if box is not None:
            return self.cache.read(box)
        values = self.dataset[key]
        return values if self._lut is None else self._lut[values]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where}, shape={self.shape})"

    def _read(self, missing: list[tuple[int, ...]]) -> dict:
        return {index: self._chunk(index) for index in missing}

    def _chunk(self, index: tuple[int, ...]) -> np.ndarray:
        origin = tuple(i * c for i, c in zip(index, self.chunks))
        inside = inside_of_chunk(index, self.chunks, self.shape)
        if self.decoders is None:
            values = self.dataset[tuple(slice(o, o + part.stop) for o, part in zip(origin, inside))]
        elif self.dataset.id.get_chunk_info_by_coord(origin).byte_offset is None:  # never written
            values = np.broadcast_to(np.asarray(self.dataset.fillvalue, self.dataset.dtype), [part.stop for part in inside])
        else:
            values = self._decode(origin)[inside]
        return values if self._lut is None else self._lut[values]

    def _decode(self, origin: tuple[int, ...]) -> np.ndarray:
        try:
            return np.frombuffer(read_raw_chunk(self.dataset, origin, self.decoders), self.dataset.dtype).reshape(self.chunks)
        except (RuntimeError, ValueError, zlib.error) as error:
            raise OSError(f"the chunk at {list(origin)} does not decompress ({error})") from None
