"""Volumes, stored (z, y, x): the one place that knows dataset names and storage options, and opens the forms a
volume comes in.

Outputs are HDF5; inputs may also be zarr arrays or OME-Zarr multiscale groups (see `open_dataset`). How they are
read lives beside this: ink3d.volume_readers (the volumes and their chunk cache, ink3d.chunk_cache and
ink3d.chunk_decoders), ink3d.blocks (block grids, regions of interest, checks of finished blocks) and
ink3d.pyramid (OME-Zarr pyramids).
"""

import contextlib
import json
import os
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import zarr

from ink3d import InputError
from ink3d.config import CHOICES
from ink3d.volume_readers import AXES, UINT16_TO_UINT8, Hdf5Volume, Uint8View, ZarrVolume

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

MANIFEST = "manifest.json"  # a finished prediction store's chunk files and their CRC-32s (ink3d.prediction_store)
PIPELINE_ATTRS = "ink3d"  # zarr group attribute of a prediction store this pipeline writes: its plan, complete
SCALE = "scale"  # attribute: the zyx voxel size in voxels of full resolution of a volume made from an OME-Zarr level
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
