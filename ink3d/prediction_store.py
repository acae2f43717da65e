"""Predictions as an OME-Zarr store, written in place by independent workers and opened by the field's viewers.

The store is zarr format 2 with OME-NGFF 0.4 metadata: the version that napari (through ome-zarr-py),
neuroglancer, VC3D (whose z5 reader knows only zarr v2) and vesuvius-gui all read, as the scroll data
server's own volumes are. Level `0` holds uint8 predictions, the scan's shape and axes, in chunks of
`chunk`^3 (with `/` in chunk keys); chunks that are all 0 are not written (they read as the fill
value 0). Every chunk lies inside one macro-block (block edges are multiples of the chunk), so each
chunk has exactly one writer; zarr writes each chunk under a temporary name and renames it.

Workers share the store: worker K of N runs every N-th block and records each finished block as
`progress/<block>.json` (its CRC-32) after the block's chunks are written. A resumed worker reads its
recorded blocks back and redoes those whose bytes differ. When every block is recorded, the worker that
notices first (or `finalize`) writes the lower levels (each the 2 x 2 x 2 mean of the one before, down to one
chunk's size) and
marks the store complete; until then `attrs["ink3d"]["complete"]` is false and readers refuse it.
`meta.json` beside the levels gives VC3D the volume's width, height, slices and voxel size.
"""

import contextlib
import fcntl
import json
import math
import os
import shutil
import uuid
import zlib
from pathlib import Path

import numcodecs
import numpy as np
import zarr

from ink3d import InputError, volume
from ink3d.blocks import chunks_of
from ink3d.pyramid import downsample_into
from ink3d.files import checksum, lock_path, writing

KEY = volume.PIPELINE_ATTRS
PROGRESS = "progress"
CHUNK = 128


def is_store(path: str | Path) -> bool:
    """Whether an output path names an OME-Zarr prediction store (by its suffix)."""
    return Path(path).suffix == ".zarr"


def is_complete(path: str | Path) -> bool:
    """Whether a prediction store is marked complete, as its metadata on disk says now (another worker may have
    finalized it since this one opened it)."""
    return bool(json.loads((Path(path) / ".zattrs").read_text())[KEY]["complete"])


def chunk_for(block: int) -> int:
    """The chunk edge for macro-blocks of `block`: 128, or the largest divisor of it that divides 128."""
    return math.gcd(block, CHUNK)


@contextlib.contextmanager
def _creating(path: Path):
    """Workers starting together create the store once: the first holds `<store>.lock` while it does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(path), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:  # a worker still waiting on the unlinked file finds the store made, and joins it
            lock_path(path).unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


class PredictionStore:
    """An OME-Zarr prediction store being written (see the module's docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.group = zarr.open_group(str(self.path), mode="r+", zarr_format=2)
        self.level0 = self.group["0"]

    @classmethod
    def open(cls, path: str | Path, shape, plan: dict, chunk: int, voxel_size: list[float], unit: str,
             overwrite: bool) -> "PredictionStore":
        """The store at `path`: created, or joined when it holds the same plan (another worker's, or an
        interrupted run's); `overwrite` replaces a store that holds another plan."""
        path = Path(path)
        with _creating(path), writing(path, advice="free disk space and start the worker again with --resume true"):
            if path.exists():
                stored = stored_plan(path)
                if stored == plan and not overwrite:
                    return cls(path)
                if not overwrite:
                    changed = [key for key in plan if stored.get(key) != plan[key]] if stored else ["(not a prediction store)"]
                    raise InputError(f"{path} holds predictions of another plan (different {', '.join(changed)}); "
                                     "pass --overwrite true to replace it, or write elsewhere")
                shutil.rmtree(path)
            _create(path, shape, plan, chunk, voxel_size, unit)
        return cls(path)

    def finished(self) -> dict[int, int]:
        """Recorded blocks: index -> CRC-32 of its bytes."""
        folder = self.path / PROGRESS
        records = {}
        for entry in os.scandir(folder):
            if entry.name.endswith(".json"):
                try:
                    records[int(entry.name[:-5])] = int(json.loads(Path(entry.path).read_text())["crc32"])
                except (ValueError, KeyError, TypeError) as error:
                    raise InputError(f"{entry.path}: a damaged progress record ({type(error).__name__}: {error}); the store's "
                                     "record of which blocks finished cannot be trusted: start over with --overwrite true") from None
        return records

    def write_slab(self, block, planes: slice, values: np.ndarray) -> None:
        """Write a block's uint8 values of the volume's planes `planes` (whole chunks of them but at the block's end)."""
        self.level0[(planes, *block.output[1:])] = values

    def record_finished(self, block, crc: int) -> None:
        """Record a block finished, with the CRC-32 of its bytes (once its chunks are on disk)."""
        record = self.path / PROGRESS / f"{block.index}.json"
        temporary = record.with_name(f"{record.name}.{uuid.uuid4().hex}.partial")
        temporary.write_text(json.dumps({"crc32": crc}))
        os.replace(temporary, record)

    def verify(self, blocks) -> tuple[list[int], int]:
        """Indices of `blocks` whose recorded bytes read back intact, and how many recorded ones did not (their
        records and chunks are removed, so the blocks are done again from nothing)."""
        records, intact, damaged = self.finished(), [], 0
        for block in blocks:
            if block.index not in records:
                continue
            try:
                if checksum(np.asarray(self.level0[block.output])) == records[block.index]:
                    intact.append(block.index)
                    continue
            except Exception:  # a chunk that does not decode: zarr's codecs fail in several ways
                pass
            (self.path / PROGRESS / f"{block.index}.json").unlink(missing_ok=True)
            for chunk in chunks_of(self.level0, block.output):
                index = tuple(piece.start // size for piece, size in zip(chunk, self.level0.chunks))
                (self.path / "0" / self.level0.metadata.encode_chunk_key(index)).unlink(missing_ok=True)
            damaged += 1
        return intact, damaged

    def complete(self) -> bool:
        return is_complete(self.path)

    def finalize(self) -> int:
        """Write the lower levels from level 0 and mark the store complete; returns the number of levels."""
        levels = [self.level0]
        shape = self.level0.shape
        while max(shape) > self.level0.chunks[0]:  # down to a level of one chunk's size
            shape = tuple(-(-size // 2) for size in shape)
            target = self.group.create_array(str(len(levels)), shape=shape, chunks=self.level0.chunks, dtype=np.uint8,
                                             fill_value=0, compressor=_compressor(), chunk_key_encoding={"name": "v2", "separator": "/"},
                                             overwrite=True)
            downsample_into(levels[-1], target)
            levels.append(target)
        attrs = self.group.attrs.asdict()
        multiscale = attrs["multiscales"][0]
        base = multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]
        multiscale["datasets"] = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [s * 2**k for s in base]}]}
                                  for k in range(len(levels))]
        write_manifest(self.path, len(levels))
        attrs[KEY] = {**attrs[KEY], "complete": True}
        self.group.attrs.update(attrs)
        return len(levels)


def write_manifest(path: Path, levels: int) -> None:
    """`<store>/manifest.json`: per level, every chunk file written and the CRC-32 of its bytes, which readers check
    (ink3d.volume_readers.ZarrVolume): a chunk lost or changed after the store was finished is a named error, not zeros."""
    manifest = {}
    for level in range(levels):
        folder = path / str(level)
        manifest[str(level)] = {file.relative_to(folder).as_posix(): zlib.crc32(file.read_bytes())
                                for file in sorted(folder.rglob("*")) if file.is_file() and not file.name.startswith(".")}
    temporary = path / f"{volume.MANIFEST}.{uuid.uuid4().hex}.partial"
    temporary.write_text(json.dumps(manifest))
    os.replace(temporary, path / volume.MANIFEST)


def _compressor():
    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)


def stored_plan(path: Path) -> dict | None:
    """The plan a prediction store records (None: not a store of this pipeline)."""
    try:
        return json.loads((path / ".zattrs").read_text())[KEY]["plan"]
    except (OSError, ValueError, KeyError):
        return None


def _create(path: Path, shape, plan: dict, chunk: int, voxel_size: list[float], unit: str) -> None:
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=tuple(shape), chunks=(chunk,) * 3, dtype=np.uint8, fill_value=0, compressor=_compressor(),
                       chunk_key_encoding={"name": "v2", "separator": "/"})
    group.attrs.update({
        "multiscales": [{"version": "0.4", "name": path.stem,
                         "axes": [{"name": axis, "type": "space", **({"unit": unit} if unit else {})} for axis in "zyx"],
                         "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(voxel_size)}]}]}],
        KEY: {"plan": plan, "complete": False, "empty_chunks": "not written: they read as 0"},
    })
    (path / PROGRESS).mkdir()
    (path / "meta.json").write_text(json.dumps({  # VC3D's volume metadata
        "type": "vol", "uuid": path.stem, "name": path.stem, "format": "zarr", "width": int(shape[2]), "height": int(shape[1]),
        "slices": int(shape[0]), "voxelsize": float(voxel_size[-1]), "min": 0.0, "max": 255.0}, indent=2) + "\n")

