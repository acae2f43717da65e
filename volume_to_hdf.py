"""Convert a TIFF slice stack (a CT scan) into the pipeline's scan volume: HDF5 dataset `scan_volume`.

    python volume_to_hdf.py --tiff_dir runs/demo/scroll/volume --out runs/demo/scan.h5
    python volume_to_hdf.py --tiff_dir /data/scroll1/volumes/20230205180739 --out /data/scroll1.h5 --resume true

Slices are ordered by the number in their names (`2.tif` before `10.tif`) and must be
numbered without gaps. uint8 slices are copied; uint16 slices are mapped by
`round(v * 255 / 65535)`, or linearly between two percentiles of a sample of slices
with `--window 0.5,99.5`. The volume is written one slab of `chunk` slices at a time
(slices of a slab are read in parallel); memory holds one slab, whatever the number of
slices. A run that stops can be continued with `--resume true`: finished slabs are kept.
"""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import tifffile
from tqdm import tqdm

from ink3d import InputError, volume
from ink3d.config import config_path_for, parse_config, run_main, save_config
from ink3d.files import check_output

# --- config ---
TIFF_DIR = "runs/demo/scroll/volume"  # folder of numbered TIFF slices (z order = number in the name)
OUT = "runs/demo/scan.h5"  # output HDF5 file, dataset scan_volume (uint8, z, y, x)
CHUNK = 128  # HDF5 chunk edge; also the slab depth written at once
COMPRESSION = "blosc-lz4"  # blosc-zstd, blosc-lz4, gzip, lzf or none (see README: codec choice)
WINDOW = ""  # uint16 only: 'low,high' percentiles mapped to 0..255 (e.g. 0.5,99.5); empty = fixed v*255/65535
WINDOW_SAMPLE_SLICES = 32  # slices sampled (evenly spaced) to estimate the window percentiles
WORKERS = 8  # threads reading slices in parallel
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
        image = tifffile.imread(path)
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
        return ((values + 128) // 257).astype(np.uint8)  # = round(v * 255 / 65535)
    low, high = window
    return np.clip(np.round((values - low) * 255 / max(high - low, 1)), 0, 255).astype(np.uint8)


def estimate_window(files: list[Path], percentiles: tuple[float, float], sample_slices: int) -> tuple[float, float]:
    picks = np.unique(np.linspace(0, len(files) - 1, min(sample_slices, len(files))).round().astype(int))
    sample = np.concatenate([read_slice(files[i]).ravel()[::7] for i in picks])
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


def convert(config) -> None:
    files = list_slices(Path(config.tiff_dir))
    first = read_slice(files[0])
    if first.ndim != 2 or first.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{files[0]}: slices must be 2D uint8 or uint16, got {first.dtype} {first.shape}")
    shape = (len(files),) + first.shape
    percentiles = parse_window(config.window)
    source = {
        "tiff_dir": str(Path(config.tiff_dir).resolve()),
        "slices": len(files),
        "first": files[0].name,
        "last": files[-1].name,
        "input_dtype": str(first.dtype),
    }
    out = Path(config.out)
    check_output(out, config.overwrite, config.resume, resumable=True)
    resuming = config.resume and out.exists() and not config.overwrite
    with h5py.File(out, "a" if resuming else "w") as file:
        if resuming:
            dataset, window, done = _reopen(out, file, shape, source, config)
        else:
            window = None
            if percentiles and first.dtype == np.uint16:
                window = estimate_window(files, percentiles, config.window_sample_slices)
            dataset = volume.create_volume(file, volume.SCAN, shape, np.uint8, config.chunk, config.compression)
            dataset.attrs["source"] = json.dumps(source)
            dataset.attrs["window"] = json.dumps(window)
            dataset.attrs["slabs_done"] = 0
            dataset.attrs["complete"] = False
            dataset.attrs["config"] = json.dumps(vars(config))
            done = 0
        _write_slabs(files, dataset, first.shape, first.dtype, intensity_lut(first.dtype, window), done, config.workers)
        dataset.attrs["complete"] = True
    save_config(config, config_path_for(out))


def _reopen(out: Path, file: h5py.File, shape, source: dict, config):
    """The dataset of an interrupted run, checked to belong to the same stack and settings."""
    if volume.SCAN not in file:
        raise InputError(f"{out}: cannot resume, it holds no '{volume.SCAN}' dataset; use --overwrite true")
    dataset = file[volume.SCAN]
    stored = json.loads(dataset.attrs["source"])
    if stored != source or dataset.shape != shape:
        raise InputError(f"{out}: cannot resume, it was made from another stack ({stored}); use --overwrite true")
    stored_config = json.loads(dataset.attrs["config"])
    changed = [key for key in ("chunk", "compression", "window") if stored_config[key] != getattr(config, key)]
    if changed:
        raise InputError(f"{out}: cannot resume with different {', '.join(changed)} "
                         f"({', '.join(f'{k}={stored_config[k]!r}' for k in changed)} in the file)")
    window = json.loads(dataset.attrs["window"])
    return dataset, (tuple(window) if window else None), int(dataset.attrs["slabs_done"])


def _write_slabs(files, dataset, slice_shape, dtype, lut, slabs_done: int, workers: int) -> None:
    depth = dataset.chunks[0]
    slab_starts = range(0, len(files), depth)
    slice_bytes = int(np.prod(slice_shape)) * np.dtype(dtype).itemsize

    def load(index: int) -> np.ndarray:
        image = read_slice(files[index])
        if image.shape != slice_shape or image.dtype != dtype:
            raise InputError(f"{files[index]}: slice is {image.dtype} {image.shape}, the stack is {dtype} {slice_shape}")
        return image if lut is None else lut[image]

    started = time.perf_counter()
    bar = tqdm(total=len(files), initial=min(slabs_done * depth, len(files)), unit="slice", desc="volume_to_hdf")
    with ThreadPoolExecutor(workers) as pool:
        for slab_index, start in enumerate(slab_starts):
            if slab_index < slabs_done:
                continue
            stop = min(start + depth, len(files))
            dataset[start:stop] = np.stack(list(pool.map(load, range(start, stop))))
            dataset.attrs["slabs_done"] = slab_index + 1
            dataset.file.flush()
            bar.update(stop - start)
            elapsed = time.perf_counter() - started
            bar.set_postfix_str(f"{(bar.n - bar.initial) * slice_bytes / 1e6 / elapsed:.0f} MB/s read")
    bar.close()


def main(argv=None):
    config = parse_config(globals(), argv)
    convert(config)
    print(f"{config.tiff_dir} -> {config.out} [{volume.SCAN}]")


if __name__ == "__main__":
    run_main(main)
