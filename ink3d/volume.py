"""Volumes, stored (z, y, x): the one place that knows dataset names and storage options.

Outputs are HDF5; inputs may also be zarr arrays or OME-Zarr multiscale groups (see `open_dataset`).
"""

import atexit
import collections
import contextlib
import functools
import itertools
import json
import os
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import h5py
import hdf5plugin
import numcodecs
import numcodecs.zstd
import numpy as np
import zarr

from tqdm import tqdm

from ink3d import InputError
from ink3d.config import CHOICES
from ink3d.files import checksum

SCAN = "scan_volume"
INK_SUM = "ink_sum"
INK_COUNT = "ink_count"
PREDICTIONS = "predictions"
GROUND_TRUTH = "ink"
BLOB_LABELS = "labels"  # connected_components_explore.py: blob id per voxel
FINISHED_BLOCKS = "finished_blocks"  # prediction file: 1 per finished macro-block (resuming)
BLOCK_CHECKSUMS = "block_checksums"  # prediction file: CRC-32 of each finished macro-block's bytes

# c-blosc reads this at every call: (de)compress each chunk's blocks on all cores unless the user says otherwise
os.environ.setdefault("BLOSC_NTHREADS", str(os.cpu_count() or 1))

AXES = "zyx"
MANIFEST = "manifest.json"  # a finished prediction store's chunk files and their CRC-32s (ink3d.prediction_store)
PIPELINE_ATTRS = "ink3d"  # zarr group attribute of a prediction store this pipeline writes: its plan, complete
SCALE = "scale"  # attribute: the zyx voxel size in voxels of full resolution of a volume made from an OME-Zarr level
UINT16_TO_UINT8 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535)
DEFAULT_CHUNK = 128
COMPRESSIONS = CHOICES["compression"]
DEFAULT_COMPRESSION = "blosc-lz4"
LABEL_COMPRESSION = "blosc-lz4-byteshuffle"  # sparse label volumes: bitshuffle halves the write speed for little size


def compression_options(name: str) -> dict:
    """h5py `create_dataset` keywords for a codec name of `COMPRESSIONS`."""
    if name == "blosc-zstd":
        return dict(hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    if name == "blosc-lz4":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    if name == "blosc-lz4-byteshuffle":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if name == "lzf":
        return {"compression": "lzf"}
    if name == "none":
        return {}
    raise InputError(f"unknown compression {name!r}; choose one of {', '.join(COMPRESSIONS)}")


def create_volume(
    file: h5py.File,
    name: str,
    shape: tuple[int, int, int],
    dtype,
    chunk: int = DEFAULT_CHUNK,
    compression: str = DEFAULT_COMPRESSION,
    fillvalue=0,
) -> h5py.Dataset:
    """A chunked, compressed zyx dataset; chunks are `chunk`^3, clipped to the shape."""
    chunks = tuple(max(1, min(chunk, size)) for size in shape)
    dataset = file.create_dataset(
        name, shape=shape, dtype=dtype, chunks=chunks, fillvalue=fillvalue, **compression_options(compression)
    )
    dataset.attrs["axes"] = AXES
    return dataset


def open_dataset(path: str | Path, name: str, mode: str = "r", level: int = 0, cache_bytes: int | None = None):
    """Open a volume: dataset `name` of an HDF5 file, or a zarr array, or level `level` of an OME-Zarr
    multiscale group (a folder). Returns (a handle to close, the volume), with errors naming both.

    A scan (dataset `scan_volume`, or any zarr volume) must hold uint8 or uint16 and have axes z, y, x; uint16
    reads as uint8 by `round(v * 255 / 65535)`, as volume_to_hdf converts it, other dtypes are refused.
    `level` picks an OME-Zarr level; HDF5 files hold one resolution (a scan refuses a level above 0, other
    volumes were made at the level they were made from). With `cache_bytes`, a volume opened to read is read
    through a cache of that many bytes of decompressed chunks held here (`ChunkCache`: `Hdf5Volume`, `ZarrVolume`),
    so that overlapping reads decompress a chunk once, and threads decompress different chunks side by side.
    """
    path = Path(path)
    if path.is_dir():
        if mode != "r":
            raise InputError(f"{path}: zarr volumes are read only here; outputs are HDF5")
        if not any((path / marker).exists() for marker in (".zarray", ".zgroup", "zarr.json")) and \
                any(entry.suffix.lower() in (".tif", ".tiff") for entry in path.iterdir()):
            raise InputError(f"{path}: a folder of slice TIFFs; the stages read a scan as HDF5 or zarr: convert it once with "
                             f"python volume_to_hdf.py --tiff_dir {path} --out {path.with_suffix('.h5')}")
        return _NothingToClose(), open_zarr(path, level, cache_bytes or 0)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    cached = bool(cache_bytes) and mode == "r"
    try:
        file = h5py.File(path, mode, **({"rdcc_nbytes": 0} if cached else {}))  # chunks are cached here instead
    except OSError as error:
        raise InputError(f"{path}: cannot open as HDF5 ({error})") from None
    if name not in file:
        names = ", ".join(file.keys()) or "none"
        file.close()
        raise InputError(f"{path}: no dataset '{name}' (datasets: {names})")
    dataset = file[name]
    if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 3:
        found = f"shape {dataset.shape}" if isinstance(dataset, h5py.Dataset) else "a group"
        file.close()
        raise InputError(f"{path}: '{name}' is {found}, expected a dataset with 3 axes (z, y, x)")
    if not dataset.attrs.get("complete", True):
        file.close()
        raise InputError(f"{path}: dataset '{name}' is not complete (its run was interrupted); "
                         "finish it with --resume true before using it")
    if name == SCAN and level:
        file.close()
        raise InputError(f"{path}: --level {level} reads a level of an OME-Zarr scan; an HDF5 scan holds one resolution "
                         "(volume_to_hdf --zarr --level converts one level, and records its voxel size)")
    if name == SCAN and dataset.dtype not in (np.uint8, np.uint16):
        file.close()
        raise InputError(f"{path}: '{name}' holds {dataset.dtype}; scans must be uint8 or uint16 "
                         "(volume_to_hdf converts a stack with a chosen intensity window)")
    lut = UINT16_TO_UINT8 if name == SCAN and dataset.dtype == np.uint16 else None
    if cached and dataset.chunks is not None:
        return file, Hdf5Volume(dataset, f"{path}[{name}]", cache_bytes, lut)
    return file, dataset if lut is None else Uint8View(dataset, f"{path}[{name}]")


class _NothingToClose(contextlib.nullcontext):
    """The handle of a zarr volume: zarr keeps no file open."""

    def close(self) -> None:
        pass


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


class ChunkCache:
    """Decompressed chunks of a volume, by chunk index, read through by boxes: the least recently used dropped beyond
    `cache_bytes`, shared by threads. `read_chunks(indices)` reads and decompresses chunks (index -> array of the
    chunk, clipped to the volume). A thread takes the missing chunks that no other thread is reading (`together`:
    all of them at once, for a reader that reads them faster in one call; else one at a time, so that threads
    decompress a box's chunks side by side) and waits for those that one is: no chunk is decompressed twice."""

    def __init__(self, shape, chunks, dtype, cache_bytes: int, read_chunks, together: bool = False):
        self.shape, self.chunks, self.dtype = tuple(shape), tuple(chunks), np.dtype(dtype)
        self.cache_bytes, self.cached_bytes, self._read_chunks, self._together = cache_bytes, 0, read_chunks, together
        self._cache, self._lock, self._reading = collections.OrderedDict(), threading.Lock(), {}  # _reading: index -> set once read

    def read(self, box: list[tuple[int, int]]) -> np.ndarray:
        """The (start, stop) per axis box of the volume (a new array)."""
        out = np.empty([max(stop - start, 0) for start, stop in box], self.dtype)
        if not out.size:
            return out
        indices = list(itertools.product(*(range(start // chunk, -(-stop // chunk)) for (start, stop), chunk in zip(box, self.chunks))))
        chunks = self._chunks(indices)
        for index in indices:
            source, target = [], []
            for (start, stop), i, chunk in zip(box, index, self.chunks):
                low, high = max(start, i * chunk), min(stop, (i + 1) * chunk)
                source.append(slice(low - i * chunk, high - i * chunk))
                target.append(slice(low - start, high - start))
            out[tuple(target)] = chunks[index][tuple(source)]
        return out

    def values(self) -> list[np.ndarray]:
        """The chunks held."""
        with self._lock:
            return list(self._cache.values())

    def _chunks(self, indices: list[tuple[int, ...]]) -> dict:
        found = {}
        while len(found) < len(indices):
            with self._lock:
                for index in indices:
                    if index not in found and index in self._cache:
                        found[index] = self._cache[index]
                        self._cache.move_to_end(index)
                mine = [index for index in indices if index not in found and index not in self._reading]
                mine = mine if self._together else mine[:1]
                theirs = {self._reading[index] for index in indices if index not in found and index in self._reading}
                done = threading.Event()
                self._reading.update(dict.fromkeys(mine, done))
            if mine:
                try:
                    found.update(self._keep(self._read_chunks(mine)))
                finally:
                    with self._lock:
                        for index in mine:
                            del self._reading[index]
                    done.set()
            else:  # then taken from the cache, or read here if it was dropped or its read failed
                for reading in theirs:
                    reading.wait()
        return found

    def _keep(self, read: dict) -> dict:
        with self._lock:
            for index, values in read.items():
                self._cache[index] = values
                self.cached_bytes += values.nbytes
            while self.cached_bytes > self.cache_bytes and len(self._cache) > 1:  # the least recently used go first
                self.cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return read


def _inside_of_chunk(index: tuple[int, ...], chunks, shape) -> tuple[slice, ...]:
    """The part of the chunk at `index` inside the volume: edge chunks are stored whole."""
    return tuple(slice(0, min(chunk, size - i * chunk)) for i, chunk, size in zip(index, chunks, shape))


def _box(key, shape) -> list[tuple[int, int]] | None:
    """(start, stop) per axis of a key of slices with step 1; None for any other key."""
    key = key if isinstance(key, tuple) else (key,)
    if len(key) > 3 or not all(isinstance(part, slice) and part.step in (None, 1) for part in key):
        return None
    key += (slice(None),) * (3 - len(key))
    return [part.indices(size)[:2] for part, size in zip(key, shape)]


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
        box = None if self.cache is None else _box(key, self.shape)
        whole = _box(key, self.shape) if box is None and self._manifest is not None else None
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
        inside = _inside_of_chunk(index, self.chunks, self.shape)
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
        box = _box(key, self.shape)
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
        inside = _inside_of_chunk(index, self.chunks, self.shape)
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


def read_raw_chunk(dataset: h5py.Dataset, origin: tuple[int, ...], decoders):
    """The bytes of the stored chunk at `origin`, read as stored and decoded here by `decoders` (one per filter of the
    dataset, see chunk_decoders), last to first, but for the filters HDF5 skipped on this chunk."""
    skipped, data = dataset.id.read_direct_chunk(origin)
    for position in range(len(decoders) - 1, -1, -1):
        if not skipped & (1 << position):  # a set bit: HDF5 skipped that filter on this chunk
            data = decoders[position](data)
    return data


def chunk_decoders(dataset: h5py.Dataset) -> list | None:
    """Per filter of an HDF5 dataset, in the order HDF5 applies them, a function that undoes it on a chunk's bytes;
    None when some filter is not one undone here (blosc with a compressor numcodecs has, deflate, shuffle)."""
    plist = dataset.id.get_create_plist()
    decoders = []
    for position in range(plist.get_nfilters()):
        code, _, options, _ = plist.get_filter(position)
        if code == hdf5plugin.BLOSC_ID and blosc_codec(options) is not None:
            decoders.append(numcodecs.blosc.decompress)  # without the GIL off the main thread
        elif code == h5py.h5z.FILTER_DEFLATE:
            decoders.append(zlib.decompress)
        elif code == h5py.h5z.FILTER_SHUFFLE:
            decoders.append(functools.partial(unshuffle, itemsize=dataset.dtype.itemsize))
        else:
            return None
    return decoders


def blosc_codec(options) -> numcodecs.Blosc | None:
    """The numcodecs Blosc of an HDF5 blosc filter's options; None where numcodecs lacks its compressor."""
    blosc = hdf5plugin.from_filter_options(hdf5plugin.BLOSC_ID, options)
    if blosc.cname not in numcodecs.blosc.list_compressors():
        return None
    return numcodecs.Blosc(cname=blosc.cname, clevel=blosc.clevel, shuffle=blosc.shuffle)


def unshuffle(data, itemsize: int):
    """Undo HDF5's shuffle filter: it stores the first bytes of all elements, then the second bytes, ...; the
    bytes after the last whole element stay as they are."""
    if itemsize == 1:
        return data
    shuffled = np.frombuffer(data, np.uint8)
    whole = len(shuffled) // itemsize * itemsize
    out = np.empty_like(shuffled)
    out[:whole].reshape(-1, itemsize)[:] = shuffled[:whole].reshape(itemsize, -1).T
    out[whole:] = shuffled[whole:]
    return out


ZARR_V3_DECODERS = {zarr.codecs.BloscCodec: numcodecs.blosc.decompress, zarr.codecs.ZstdCodec: numcodecs.zstd.decompress,
                    zarr.codecs.GzipCodec: numcodecs.GZip().decode}


def stored_chunk_decoder(array: zarr.Array) -> tuple | None:
    """How a chunk file of a zarr array is read without zarr: (decode its bytes, the dtype they hold, the fill
    value); None unless the chunks are stored whole through one compressor numcodecs decodes (zarr v2: no filters,
    C order; v3: bytes, then blosc, zstd or gzip: not sharded)."""
    metadata = array.metadata
    fill = 0 if metadata.fill_value is None else metadata.fill_value
    if metadata.zarr_format == 2:
        if metadata.filters or metadata.order != "C":
            return None
        return (_as_stored if metadata.compressor is None else metadata.compressor.decode), metadata.dtype.to_native_dtype(), fill
    serializer, *compressors = metadata.codecs
    if not isinstance(serializer, zarr.codecs.BytesCodec) or len(compressors) > 1:
        return None
    dtype = metadata.data_type.to_native_dtype()
    if serializer.endian is not None:
        dtype = dtype.newbyteorder("<" if serializer.endian.value == "little" else ">")
    decode = ZARR_V3_DECODERS.get(type(compressors[0])) if compressors else _as_stored
    return None if decode is None else (decode, dtype, fill)


def _as_stored(data: bytes) -> bytes:
    return data


def open_zarr(path: Path, level: int = 0, cache_bytes: int = 0) -> ZarrVolume:
    """A zarr array, or level `level` of an OME-Zarr multiscale group (axes from its metadata), read through a cache
    of `cache_bytes` of decompressed chunks if given."""
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as error:  # zarr reports a missing or malformed store in several ways
        raise InputError(f"{path}: cannot open as zarr ({type(error).__name__}: {error})") from None
    where = str(path)
    axes, scale, sparse, voxel_size = None, (1.0, 1.0, 1.0), False, None
    if isinstance(node, zarr.Group):
        attrs = node.attrs.asdict()
        multiscales = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")  # OME-Zarr 0.5 / 0.4
        if not multiscales:
            raise InputError(f"{path}: a zarr group without OME-Zarr multiscales metadata; give the array inside it "
                             f"(arrays: {', '.join(name for name, _ in node.arrays()) or 'none'})")
        datasets = multiscales[0].get("datasets", [])
        if not 0 <= level < len(datasets):
            raise InputError(f"{path}: --level {level}: the multiscale has levels 0..{len(datasets) - 1}")
        sparse = PIPELINE_ATTRS in attrs  # a prediction store leaves its all-zero chunks unwritten
        if not attrs.get(PIPELINE_ATTRS, {}).get("complete", True):
            raise InputError(f"{path}: its predictions are not complete (workers still running, interrupted, or not "
                             "finalized); finish them with --resume true, or --finalize true once every part is done")
        axes = [axis["name"] if isinstance(axis, dict) else axis for axis in multiscales[0].get("axes", [])]
        scale = np.asarray(_scale_of(datasets[level], level)) / np.asarray(_scale_of(datasets[0], 0))
        units = {axis.get("unit", "") for axis in multiscales[0].get("axes", []) if isinstance(axis, dict)}
        voxel_size = (_scale_of(datasets[level], level), units.pop() if len(units) == 1 else "")
        where = f"{path} level {level} ({datasets[level]['path']})"
        try:
            node = node[datasets[level]["path"]]
        except KeyError:
            raise InputError(f"{path}: level {level}'s array '{datasets[level]['path']}' is missing") from None
    elif level:
        raise InputError(f"{path}: --level {level} needs an OME-Zarr multiscale group; this is a single array")
    if axes is not None and axes != list(AXES):
        raise InputError(f"{where}: axes {axes}; the pipeline reads volumes with axes z, y, x")
    if node.ndim != 3:
        raise InputError(f"{where}: shape {node.shape}, expected 3 axes (z, y, x)")
    if np.dtype(node.dtype).newbyteorder("=") not in (np.uint8, np.uint16):  # either byte order
        raise InputError(f"{where}: dtype {node.dtype}; volumes must be uint8 or uint16")
    manifest = None
    if sparse and (Path(path) / MANIFEST).exists():
        try:
            manifest = json.loads((Path(path) / MANIFEST).read_text())[datasets[level]["path"]]
        except (ValueError, KeyError) as error:
            raise InputError(f"{path / MANIFEST}: damaged ({type(error).__name__}: {error}); the store cannot be checked") from None
    opened = ZarrVolume(node, where, scale, count_absent=not sparse, cache_bytes=cache_bytes, manifest=manifest)
    opened.voxel_size = voxel_size
    return opened


def _scale_of(dataset: dict, level: int) -> list[float]:
    """The zyx voxel size an OME-Zarr multiscale dataset declares (its "scale" transformation), or 2^level."""
    for transform in dataset.get("coordinateTransformations", []):
        if transform.get("type") == "scale" and len(transform.get("scale", [])) == 3:
            return [float(value) for value in transform["scale"]]
    return [2.0**level] * 3


def level_scale(dataset) -> np.ndarray:
    """The zyx size of a volume's voxel in voxels of full resolution, what segment coordinates are divided by:
    an OME-Zarr level's, or the `scale` attribute an HDF5 volume made from one records (1 when it has none)."""
    scale = getattr(dataset, "scale", None)
    return np.asarray(dataset.attrs.get(SCALE, np.ones(3)) if scale is None else scale, dtype=np.float64)


def read_crop(dataset, origin, shape, fill=0) -> np.ndarray:
    """The box of `shape` at zyx `origin` of an HDF5 dataset or a zarr volume (a new array), clipped to the volume and
    padded with `fill` outside."""
    origin = np.asarray(origin, dtype=np.int64)
    shape = tuple(int(size) for size in shape)
    low = np.maximum(origin, 0)
    high = np.minimum(origin + shape, dataset.shape)
    if np.any(high <= low):
        return np.full(shape, fill, dtype=dataset.dtype)
    source = tuple(slice(a, b) for a, b in zip(low, high))
    try:
        inside = dataset[source]
    except (OSError, RuntimeError) as error:  # a damaged chunk of an input: not a failure of any output
        where = getattr(dataset, "where", None) or f"{dataset.file.filename}[{dataset.name.lstrip('/')}]"
        raise InputError(f"reading {where} at {low.tolist()}..{high.tolist()} failed ({str(error).splitlines()[0]}): "
                         "the file is damaged or unreadable") from None
    if inside.shape == shape:  # wholly inside the volume: nothing to pad
        return inside
    out = np.full(shape, fill, dtype=dataset.dtype)
    out[tuple(slice(a, b) for a, b in zip(low - origin, high - origin))] = inside
    return out


def iter_blocks(shape, block) -> Iterator[tuple[slice, slice, slice]]:
    """zyx slices of the blocks tiling `shape` on a grid of `block` (int or 3 ints), last ones clipped."""
    block = (block,) * 3 if np.isscalar(block) else tuple(block)
    starts = [range(0, size, step) for size, step in zip(shape, block)]
    for origin in itertools.product(*starts):
        yield tuple(slice(o, min(o + b, size)) for o, b, size in zip(origin, block, shape))


def parse_roi(text: str, shape) -> tuple[slice, slice, slice]:
    """`z0:z1,y0:y1,x0:x1` (empty bounds = volume edge; empty text = whole volume) -> zyx slices."""
    if not text:
        return tuple(slice(0, size) for size in shape)
    parts = text.split(",")
    if len(parts) != 3:
        raise InputError(f"roi {text!r}: expected z0:z1,y0:y1,x0:x1")
    slices = []
    for axis, (part, size) in enumerate(zip(parts, shape)):
        bounds = part.split(":")
        if len(bounds) != 2:
            raise InputError(f"roi {text!r}: axis {AXES[axis]} is {part!r}, expected start:stop")
        try:
            start = int(bounds[0]) if bounds[0] else 0
            stop = int(bounds[1]) if bounds[1] else size
        except ValueError:
            raise InputError(f"roi {text!r}: bounds must be integers") from None
        if not 0 <= start < stop <= size:
            raise InputError(f"roi {text!r}: axis {AXES[axis]} range {start}:{stop} is empty or outside 0:{size}")
        slices.append(slice(start, stop))
    return tuple(slices)


def chunks_of(dataset, box) -> list[tuple[slice, slice, slice]]:
    """The dataset's chunks (zyx slices, clipped to the shape) that a box of zyx slices touches."""
    ranges = [range(b.start // c * c, b.stop, c) for b, c in zip(box, dataset.chunks)]
    return [tuple(slice(o, min(o + c, size)) for o, c, size in zip(origin, dataset.chunks, dataset.shape))
            for origin in itertools.product(*ranges)]


def reset_unreadable_chunks(dataset, boxes) -> list[tuple[slice, slice, slice]]:
    """Overwrite with the fill value every chunk touched by `boxes` that cannot be read (its bytes were lost
    when a write failed), so that blocks sharing it can be written again; returns those chunks.

    A write that covers a whole chunk does not read it, so the reset itself never fails on the damage.
    """
    seen, reset = set(), []
    for box in boxes:
        for chunk in chunks_of(dataset, box):
            key = tuple(s.start for s in chunk)
            if key in seen:
                continue
            seen.add(key)
            try:
                dataset[chunk]
            except (OSError, RuntimeError):
                dataset[chunk] = np.full([s.stop - s.start for s in chunk], dataset.fillvalue, dataset.dtype)
                reset.append(chunk)
    return reset


def verify_finished(dataset, boxes, checksums, unit: str) -> list[bool]:
    """Which `boxes` (zyx slices) of an interrupted output still hold the bytes their recorded CRC-32 says
    (`checksums`, None where a box was not finished). Finished boxes are read back; chunks that the other
    boxes cannot read are reset so they can be written again, and a finished box sharing one counts as lost."""
    intact = []
    for box, recorded in tqdm(list(zip(boxes, checksums)), unit=unit, desc=f"verifying finished {unit}s", leave=False):
        try:
            intact.append(recorded is not None and checksum(dataset[box]) == recorded)
        except (OSError, RuntimeError):  # an unreadable chunk
            intact.append(False)
    reset = reset_unreadable_chunks(dataset, [box for box, ok in zip(boxes, intact) if not ok])
    return [ok and not any(overlaps(box, chunk) for chunk in reset) for box, ok in zip(boxes, intact)]


def overlaps(a, b) -> bool:
    """Whether two boxes of zyx slices share a voxel."""
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b))


def downsample_into(source, target) -> None:
    """`target` = the 2 x 2 x 2 mean of `source`, rounded (edges repeated where `source` has an odd size), a chunk of
    `target` at a time: a level of a multiscale pyramid."""
    for box in iter_blocks(target.shape, target.chunks):
        data = np.asarray(source[tuple(slice(2 * b.start, 2 * b.stop) for b in box)], dtype=np.float64)
        sizes = [b.stop - b.start for b in box]
        data = np.pad(data, [(0, 2 * n - s) for n, s in zip(sizes, data.shape)], mode="edge")
        target[box] = np.rint(data.reshape(sizes[0], 2, sizes[1], 2, sizes[2], 2).mean(axis=(1, 3, 5)))


def write_ome_zarr(path: str | Path, source, levels: int = 2, chunk: int = DEFAULT_CHUNK) -> None:
    """Write a (z, y, x) uint8 or uint16 volume as an OME-Zarr 0.5 multiscale group (zarr v3): level 0 is
    `source`, copied in slabs of `chunk` slices, each further level the 2 x 2 x 2 mean of the one before."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    shape, datasets = tuple(source.shape), []
    previous = source
    for level in range(levels):
        array = group.create_array(str(level), shape=shape, chunks=tuple(min(chunk, s) for s in shape), dtype=source.dtype,
                                   compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
                                   dimension_names=tuple(AXES))  # OME-Zarr 0.5 asks each level's array to name the axes
        if level == 0:
            for start in range(0, shape[0], chunk):
                array[start:start + chunk] = previous[start:start + chunk]
        else:
            downsample_into(previous, array)
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [2.0**level] * 3}]})
        previous, shape = array, tuple(-(-s // 2) for s in shape)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "name": Path(path).stem, "axes": [{"name": axis, "type": "space", "unit": "micrometer"} for axis in AXES], "datasets": datasets}]}
