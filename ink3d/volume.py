"""HDF5 volumes, stored (z, y, x): the one place that knows dataset names and storage options."""

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from ink3d import InputError

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
DEFAULT_CHUNK = 128
COMPRESSIONS = ("blosc-zstd", "blosc-lz4", "blosc-lz4-byteshuffle", "gzip", "lzf", "none")
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


def open_dataset(path: str | Path, name: str, mode: str = "r") -> tuple[h5py.File, h5py.Dataset]:
    """Open `path` and return the file and its dataset `name`, with errors naming both."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        file = h5py.File(path, mode)
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
    return file, dataset


def read_crop(dataset, origin, shape, fill=0) -> np.ndarray:
    """The box of `shape` at zyx `origin`, clipped to the volume and padded with `fill` outside."""
    origin = np.asarray(origin, dtype=np.int64)
    shape = tuple(int(size) for size in shape)
    out = np.full(shape, fill, dtype=dataset.dtype)
    low = np.maximum(origin, 0)
    high = np.minimum(origin + shape, dataset.shape)
    if np.any(high <= low):
        return out
    source = tuple(slice(a, b) for a, b in zip(low, high))
    target = tuple(slice(a, b) for a, b in zip(low - origin, high - origin))
    out[target] = dataset[source]
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


def overlaps(a, b) -> bool:
    """Whether two boxes of zyx slices share a voxel."""
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b))
