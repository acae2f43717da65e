"""Convert a CT scan — a TIFF slice stack, a zarr array or an OME-Zarr group — into the pipeline's scan
volume: HDF5 dataset `scan_volume`.

    python volume_to_hdf.py --tiff_dir runs/demo/scroll/volume --out runs/demo/scan.h5
    python volume_to_hdf.py --tiff_dir /data/scroll1/volumes/20230205180739 --out /data/scroll1.h5 --resume true
    python volume_to_hdf.py --zarr /data/scroll1/volumes/20230205180739.zarr --out /data/scroll1.h5

Every stage reads zarr volumes directly; the HDF5 copy is for those who want one. TIFF slices are ordered by the number in their names (`2.tif` before `10.tif`) and must be
numbered without gaps. uint8 slices are copied; uint16 slices are mapped by
`round(v * 255 / 65535)`, or linearly between two percentiles of a sample of slices
with `--window 0.5,99.5`. The volume is written one slab of `chunk` slices at a time
(slices of a slab are read in parallel); memory holds one slab, whatever the number of
slices. The file is written as `<out>.partial` and renamed to `<out>` when complete. A run
that stops (killed, disk full) is continued with `--resume true`: each finished slab is
recorded with a checksum of its bytes, verified on resume, and redone if damaged.
"""

import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import tifffile
from tqdm import tqdm

from ink3d import InputError, blocks, volume
from ink3d.config import RESUMABLE, config_path_for, parse_config, run_main, save_config
from ink3d.files import (checksum, finish_output, open_interrupted, output_file, output_lock, refuse_inputs_as_outputs,
                         resumable_output, warn_if_short_of_space, writing)

# --- config ---
TIFF_DIR = "runs/demo/scroll/volume"  # folder of numbered TIFF slices (z order = number in the name)
ZARR = ""  # a local zarr array or OME-Zarr group (axes z, y, x; uint8 or uint16) to convert instead of the TIFF folder
LEVEL = 0  # OME-Zarr: the multiscale level to convert (0 = full resolution)
OUT = "runs/demo/scan.h5"  # output HDF5 file, dataset scan_volume (uint8, z, y, x)
CHUNK = 128  # HDF5 chunk edge; also the slab depth written at once
COMPRESSION = "blosc-lz4"  # blosc-zstd, blosc-lz4, blosc-lz4-byteshuffle, gzip, lzf or none (see docs/REFERENCE.md: Codec)
WINDOW = ""  # uint16 only: 'low,high' percentiles mapped to 0..255 (e.g. 0.5,99.5); empty = fixed v*255/65535
WINDOW_SAMPLE_SLICES = 32  # slices sampled (evenly spaced) to estimate the window percentiles
WORKERS = 0  # threads reading slices in parallel; 0 = one per CPU core
OVERWRITE = False  # replace an existing output
RESUME = False  # continue an interrupted conversion of the same stack


TIFF_SUFFIXES = {".tif", ".tiff"}
_NUMBER = re.compile(r"(\d+)")


def natural_key(path: Path):
    """Sort key that orders digit runs by value: 2.tif before 10.tif."""
    return [int(part) if part.isdigit() else part.lower() for part in _NUMBER.split(path.name)]


def list_slices(tiff_dir: Path) -> list[Path]:
    """TIFF files of the stack in z order; a gap in the numbering is an error naming it."""
    if not tiff_dir.is_dir():
        raise InputError(f"{tiff_dir}: TIFF folder not found")
    files = sorted((p for p in tiff_dir.iterdir() if p.suffix.lower() in TIFF_SUFFIXES), key=natural_key)
    if not files:
        raise InputError(f"{tiff_dir}: no .tif/.tiff slices")
    numbers = []
    for path in files:
        digits = _NUMBER.findall(path.stem)
        if not digits:
            raise InputError(f"{path}: slice name has no number to order it by")
        numbers.append(int(digits[-1]))
    for previous, current, path in zip(numbers, numbers[1:], files[1:]):
        if current != previous + 1:
            raise InputError(f"{tiff_dir}: slice numbering jumps from {previous} to {current} at {path.name}; a slice is missing")
    return files


def read_slice(path: Path) -> np.ndarray:
    try:
        with tifffile.TiffFile(path) as tiff:
            if len(tiff.pages) > 1:
                raise InputError(f"{path}: a slice holds {len(tiff.pages)} pages; a slice is one image: split the stack into "
                                 "one file per slice")
            image = tiff.pages[0].asarray()
    except InputError:
        raise
    except Exception as error:  # any decoder failure is reported with the file's name
        raise InputError(f"{path}: cannot read TIFF slice ({type(error).__name__}: {error})") from None
    if image.size == 0:
        raise InputError(f"{path}: cannot read TIFF slice (no image data; the file is corrupt or truncated)")
    return image


def intensity_lut(dtype: np.dtype, window: tuple[float, float] | None) -> np.ndarray | None:
    """Lookup table from the input dtype to uint8 (None for uint8 input, which is copied)."""
    if dtype == np.uint8:
        return None
    values = np.arange(65536, dtype=np.uint32)
    if window is None:
        return volume.UINT16_TO_UINT8
    low, high = window
    return np.clip(np.round((values - low) * 255 / max(high - low, 1)), 0, 255).astype(np.uint8)


class TiffStack:
    """The numbered TIFF slices of a folder, read as raw (uint8 or uint16) slabs."""

    def __init__(self, folder: Path):
        self.files = list_slices(folder)
        first = read_slice(self.files[0])
        if first.ndim != 2 or first.dtype not in (np.uint8, np.uint16):
            raise InputError(f"{self.files[0]}: slices must be 2D uint8 or uint16, got {first.dtype} {first.shape}")
        self.shape, self.dtype = (len(self.files),) + first.shape, first.dtype
        self.source = {"tiff_dir": str(folder.resolve()), "slices": len(self.files), "first": self.files[0].name,
                       "last": self.files[-1].name, "input_dtype": str(first.dtype)}

    def slice(self, index: int) -> np.ndarray:
        image = read_slice(self.files[index])
        if image.shape != self.shape[1:] or image.dtype != self.dtype:
            raise InputError(f"{self.files[index]}: slice is {image.dtype} {image.shape}, the stack is {self.dtype} {self.shape[1:]}")
        return image

    def read(self, start: int, stop: int, pool: ThreadPoolExecutor) -> np.ndarray:
        return np.stack(list(pool.map(self.slice, range(start, stop))))


class ZarrStack:
    """A zarr array or an OME-Zarr level, read as raw (uint8 or uint16) slabs."""

    def __init__(self, path: Path, level: int):
        opened = volume.open_zarr(path, level)
        self.array, self.scale = opened.array, opened.scale
        self.shape, self.dtype = tuple(self.array.shape), np.dtype(self.array.dtype)
        self.source = {"zarr": str(path.resolve()), "level": level, "shape": list(self.shape), "input_dtype": str(self.dtype)}

    def slice(self, index: int) -> np.ndarray:
        return np.asarray(self.array[index])

    def read(self, start: int, stop: int, pool: ThreadPoolExecutor) -> np.ndarray:
        return np.asarray(self.array[start:stop])


def estimate_window(stack, percentiles: tuple[float, float], sample_slices: int) -> tuple[float, float]:
    count = stack.shape[0]
    picks = np.unique(np.linspace(0, count - 1, min(sample_slices, count)).round().astype(int))
    sample = np.concatenate([stack.slice(i).ravel()[::7] for i in picks])
    low, high = np.percentile(sample, percentiles)
    return float(low), float(high)


def parse_window(text: str) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"window {text!r}: expected two percentiles 'low,high', e.g. 0.5,99.5") from None
    if not 0 <= low < high <= 100:
        raise InputError(f"window {text!r}: need 0 <= low < high <= 100")
    return low, high


def convert(config) -> list[str]:
    """Write the scan volume; returns report lines."""
    out = Path(config.out)
    target = resumable_output(out, config.overwrite, config.resume)
    stack = ZarrStack(Path(config.zarr), config.level) if config.zarr else TiffStack(Path(config.tiff_dir))
    shape, source = stack.shape, stack.source
    if target is None:  # a complete output is what was asked for only if it was made as asked
        with h5py.File(out, "r") as file:
            _reopen(out, file, shape, source, config)
        return [f"{out} is complete; nothing to resume (--overwrite true redoes it)"]
    partial, resuming = target
    percentiles = parse_window(config.window)
    volume.compression_options(config.compression)
    warn_if_short_of_space(partial, int(np.prod(shape)))
    report = []
    file = open_interrupted(partial, lambda f: volume.SCAN in f and "slab_checksums" in f[volume.SCAN].attrs) if resuming else None
    if file is not None:
        dataset, window = _reopen(partial, file, shape, source, config)
    else:
        if resuming:
            report.append(f"{partial}: no slab was finished before the interruption; started it anew")
        window = None
        if percentiles and stack.dtype == np.uint16:
            window = estimate_window(stack, percentiles, config.window_sample_slices)
        with writing(partial):
            file = h5py.File(partial, "w")
            dataset = volume.create_volume(file, volume.SCAN, shape, np.uint8, config.chunk, config.compression)
            dataset.attrs["source"] = json.dumps(source)
            dataset.attrs[volume.SCALE] = getattr(stack, "scale", np.ones(3))
            dataset.attrs["window"] = json.dumps(window)
            dataset.attrs["slab_checksums"] = json.dumps([None] * len(_slabs(dataset)))
            dataset.attrs["slabs_done"] = 0
            dataset.attrs["complete"] = False
            dataset.attrs["config"] = json.dumps(vars(config))
            file.flush()  # from here on the file can be reopened to resume
        resuming = False
    with output_file(file, partial):
        if resuming:
            with writing(partial):
                report.append(_verify_slabs(dataset))
        _write_slabs(stack, dataset, intensity_lut(stack.dtype, window), config.workers)
        with writing(partial):
            dataset.attrs["complete"] = True
            file.flush()
    finish_output(partial, out)
    save_config(config, config_path_for(out))
    return report + [f"{config.zarr or config.tiff_dir} -> {out} [{volume.SCAN}]"]


def _reopen(path: Path, file: h5py.File, shape, source: dict, config):
    """The dataset of an interrupted run, checked to belong to the same stack and settings."""
    dataset = file[volume.SCAN]
    stored = json.loads(dataset.attrs["source"])
    if stored != source or dataset.shape != shape:
        file.close()
        raise InputError(f"{path}: cannot resume, it was made from another stack ({stored}); use --overwrite true")
    stored_config = json.loads(dataset.attrs["config"])
    changed = [key for key in ("chunk", "compression", "window") if stored_config[key] != getattr(config, key)]
    if changed:
        file.close()
        raise InputError(f"{path}: cannot resume with different {', '.join(changed)} "
                         f"({', '.join(f'{k}={stored_config[k]!r}' for k in changed)} in the file)")
    window = json.loads(dataset.attrs["window"])
    return dataset, (tuple(window) if window else None)


def _slabs(dataset) -> list[tuple[slice, slice, slice]]:
    """zyx boxes of the slabs: `chunk` slices each, the whole y, x extent."""
    depth, (_, height, width) = dataset.chunks[0], dataset.shape
    return [(slice(start, min(start + depth, dataset.shape[0])), slice(0, height), slice(0, width))
            for start in range(0, dataset.shape[0], depth)]


def _verify_slabs(dataset) -> str:
    """Re-read the slabs recorded as finished; forget those whose bytes differ from their checksum."""
    checksums = json.loads(dataset.attrs["slab_checksums"])
    intact = blocks.verify_finished(dataset, _slabs(dataset), checksums, "slab")
    damaged = sum(value is not None for value in checksums) - sum(intact)
    dataset.attrs["slab_checksums"] = json.dumps([value if ok else None for value, ok in zip(checksums, intact)])
    return f"resuming: {sum(intact)} finished slabs verified" + (f", {damaged} damaged ones redone" if damaged else "")


def _write_slabs(stack, dataset, lut, workers: int) -> None:
    """Write every slab not yet recorded, each recorded with its checksum once its data is flushed."""
    checksums = json.loads(dataset.attrs["slab_checksums"])
    slice_bytes = int(np.prod(stack.shape[1:])) * stack.dtype.itemsize
    slabs = _slabs(dataset)
    started = time.perf_counter()
    done_slices = sum(s[0].stop - s[0].start for s, value in zip(slabs, checksums) if value is not None)
    written = 0  # slices of this run (a disabled bar, TQDM_DISABLE=1, keeps no count of its own)
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool, \
            tqdm(total=stack.shape[0], initial=done_slices, unit="slice", desc="volume_to_hdf") as bar:
        for index, slab in enumerate(slabs):
            if checksums[index] is not None:
                continue
            data = stack.read(slab[0].start, slab[0].stop, pool)
            data = data if lut is None else lut[data]
            with writing(dataset.file.filename):
                dataset[slab] = data
                dataset.file.flush()
                checksums[index] = checksum(data)
                dataset.attrs["slab_checksums"] = json.dumps(checksums)
                dataset.attrs["slabs_done"] = sum(value is not None for value in checksums)
                dataset.file.flush()
            bar.update(slab[0].stop - slab[0].start)
            written += slab[0].stop - slab[0].start
            bar.set_postfix_str(f"{written * slice_bytes / 1e6 / (time.perf_counter() - started):.0f} MB/s read")


def main(argv=None):
    config = parse_config(globals(), argv)
    refuse_inputs_as_outputs({"tiff_dir": config.tiff_dir if not config.zarr else "", "zarr": config.zarr}, {"out": config.out})
    with output_lock(config.out):
        print("\n".join(convert(config)))


if __name__ == "__main__":
    run_main(main, interrupted=RESUMABLE)
