"""Flatten a 3D volume onto segments: sample along each pixel's normal and reduce to an image.

    python flatten_3d.py --volume runs/demo/predictions.h5 --ppm_dir runs/demo/scroll/paths \\
        --out_dir runs/demo/flat --segments 20231022170901
    # the usual 65-layer surface volume of the scan:
    python flatten_3d.py --volume runs/demo/scan.h5 --dataset scan_volume --band 32 --layers true \\
        --name surface --ppm_dir runs/demo/scroll/paths --out_dir runs/demo/flat

For every pixel with a valid ppm point, the volume is sampled at `p + t * n` for t = -band, -band + 1,
... up to band, with trilinear interpolation and reduced along t (mean or max) into
`<out_dir>/<id>_<name>.png` (uint8, values as they are: no contrast stretch, so images of
different runs compare). Only samples inside the volume count; `<id>_<name>_mask.png` is 255
where a pixel has at least one, 0 where it has none or lies off the surface (such pixels are 0
in the image), and, for a prediction of a region only (inference's `--roi`, recorded in its plan),
0 where the pixel's surface point lies outside that region: not predicted, not "no ink". `--layers true` also writes the stack of one page per sample
`<id>_<name>_layers.tif` (0 for samples outside the volume).

For a prediction (`--depth_map auto`), `<id>_<name>_depth.tif` (float32) holds where along the
normal the prediction peaks: the offset t of the highest sample, refined between its neighbours by
a parabola, where that peak reaches `--depth_threshold` (NaN elsewhere); `<id>_<name>_depth.json`
and the printed summary give its median and quartiles. Predicted ink that peaks behind the surface
(median below -1 voxel, over at least 1,000 pixels and 1 % of the segment's) is warned about: the
segment is drawn in front of the papyrus, or its normals point into the sheet.

Work goes in square tiles of pixels, sampled by `--workers` threads a few at a time; each tile reads
only the bounding box of its samples inside the volume, in an order that keeps neighbouring tiles'
chunks in a cache of decompressed chunks (`ink3d.chunk_cache.ChunkCache`; row by row, in bands of columns as wide as
`--cache_mb` holds), so that each chunk is decompressed about once per segment, by whichever thread first
needs it, the threads decompressing side by side.
"""

import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

import collections
import contextlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from ink3d import InputError, volume
from ink3d.config import config_path_for, parse_config, run_main, save_config
from ink3d.files import atomic_output, check_output, output_lock, refuse_inputs_as_outputs, writing
from ink3d.memory import reuse_freed_memory
from ink3d.ppm import find_segment, open_segment, segment_size, valid_mask
from ink3d.prediction_store import stored_plan
from ink3d.sampling import trilinear

# --- config ---
VOLUME = "runs/demo/predictions.h5"  # volume to flatten: a prediction volume, or the scan (with --dataset scan_volume)
DATASET = "predictions"  # dataset in that file: predictions, scan_volume, ink, ...
LEVEL = 0  # OME-Zarr inputs: the multiscale level to read (0 = full resolution)
PPM_DIR = "runs/demo/scroll/paths"  # segments: <ppm_dir>/<id>/<id>.ppm, or tifxyz folders <ppm_dir>/<id>/
OUT_DIR = "runs/demo/flat"  # images go here
SEGMENTS = ""  # comma-separated segment ids; empty = every segment in ppm_dir
BAND = 8.0  # half-width of the band along the normal, in voxels (as all_labels_to_hdf's): samples every voxel from -band to +band
REDUCE = "mean"  # mean or max along the normal
NAME = "prediction"  # images are <id>_<name>.png
LAYERS = False  # also write the stack of layers (one per sample along the normal) as <id>_<name>_layers.tif
DEPTH_MAP = "auto"  # also write <id>_<name>_depth.tif, where along the normal the volume peaks: true, false, auto (for --dataset predictions)
DEPTH_THRESHOLD = 0.5  # the depth map covers pixels whose peak reaches this fraction of full scale (ink probability)
TILE = 128  # tile edge in pixels: bounds memory
CACHE_MB = 512  # decompressed chunks held for neighbouring tiles to reuse
WORKERS = 0  # threads sampling tiles (0 = one per core)
OVERWRITE = False  # replace existing images


BEHIND = -1.0  # a median depth of the peaks below this (voxels) warns that the ink lies behind the surface ...
WARN_PIXELS, WARN_SHARE = 1000, 0.01  # ... when it rests on at least this many pixels and this share of the segment's


def sample_tile(dataset, data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Samples (len(offsets), rows, cols) float32 of `dataset` along the normals of a ppm tile, one layer per offset,
    and where they lie inside the volume (bool, same shape; an interpolated sample needs all its 8 voxels inside).
    Samples off the surface or outside the volume are 0."""
    valid = valid_mask(data)
    shape = (len(offsets),) + data.shape[:2]
    if not valid.any():
        return np.zeros(shape, np.float32), np.zeros(shape, bool)
    points = data.reshape(-1, 6) if valid.all() else data[valid]
    surface, normals = np.ascontiguousarray(points[:, 2::-1].T), np.ascontiguousarray(points[:, 5:2:-1].T)

    def layer(t: float, out: np.ndarray) -> np.ndarray:
        """zyx (3, pixels) of p + t * n, as positions_along_normals gives them."""
        np.multiply(normals, t, out=out)
        out += surface
        return out

    coordinates = np.empty((3, len(points)))
    top = np.array(dataset.shape, np.float64)[:, None] - 1
    # p + t * n, rounded, never decreases or never increases with t: each pixel's first and last samples are its extremes
    ends = np.concatenate([layer(offsets[0], coordinates), layer(offsets[-1], np.empty_like(coordinates))], axis=1)
    if (ends >= 0).all() and (ends <= top).all():  # every sample inside: the usual case away from the volume's faces
        within = None
        low, high = ends.min(axis=1), ends.max(axis=1)
    else:  # the read spans the samples inside the volume only (whatever lies outside, however far)
        within = np.empty((len(offsets), len(points)), bool)
        low, high = np.full(3, np.inf), np.full(3, -np.inf)
        for k, t in enumerate(offsets):
            np.logical_and.reduce((layer(t, coordinates) >= 0) & (coordinates <= top), axis=0, out=within[k])
            np.minimum(low, np.min(coordinates, axis=1, where=within[k], initial=np.inf), out=low)
            np.maximum(high, np.max(coordinates, axis=1, where=within[k], initial=-np.inf), out=high)
        if not within.any():
            return np.zeros(shape, np.float32), np.zeros(shape, bool)
    low = np.floor(low).astype(np.int64)
    box = volume.read_crop(dataset, low, np.floor(high).astype(np.int64) + 2 - low, fill=0)
    if box.dtype not in (np.uint8, np.float32):
        box = box.astype(np.float32)
    values = np.empty((len(offsets), len(points)), np.float32)
    for k, t in enumerate(offsets):
        trilinear(box, layer(t, coordinates), low, out=values[k])
    if within is None:
        within = np.ones(values.shape, bool)
    else:
        np.copyto(values, 0, where=~within)
    if valid.all():  # no pixel off the surface: the arrays as they are
        return values.reshape(shape), within.reshape(shape)
    samples, inside = np.zeros(shape, np.float32), np.zeros(shape, bool)
    samples[:, valid], inside[:, valid] = values, within
    return samples, inside


def reduce_samples(samples: np.ndarray, inside: np.ndarray, reduce: str, count: np.ndarray) -> np.ndarray:
    """Mean or max over the layers (the first axis) of the samples inside the volume (`count` of them per pixel,
    inside_count); 0 where there is none."""
    if reduce == "mean":
        return np.divide(samples.sum(axis=0), count, out=np.zeros(count.shape, np.float32), where=count > 0)
    return np.where(count > 0, np.where(inside, samples, -np.inf).max(axis=0), 0)


def inside_count(inside: np.ndarray) -> np.ndarray:
    """How many of each pixel's samples (T, ...) lie inside the volume (summed as bytes: faster than as booleans)."""
    return inside.view(np.uint8).sum(axis=0, dtype=np.uint8 if len(inside) < 256 else np.int64)


def peak_depth(samples: np.ndarray, inside: np.ndarray, offsets: np.ndarray, threshold: float) -> np.ndarray:
    """Per pixel, the offset where the samples (T, ...) inside the volume peak, refined by the parabola through the
    peak and its two neighbours; NaN where the peak is below `threshold` or no sample is inside."""
    values = samples if inside.all() else np.where(inside, samples, -np.inf)
    layers = len(values)
    flat = values.reshape(layers, -1)
    top = flat.max(axis=0)
    # the first layer reaching the top, as argmax finds it (~2x faster): the highest rank, layers - k, of those at the top
    rank = np.arange(layers, 0, -1, dtype=np.uint8 if layers < 256 else np.int64)[:, None]
    peak = layers - np.max((flat == top) * rank, axis=0).astype(np.intp)
    pixels = flat.shape[1]
    column = np.arange(pixels)
    at = peak * pixels + column  # where each pixel's peak lies in `flat`, read as one array
    before = np.take(flat, np.maximum(at - pixels, column))
    after = np.take(flat, np.minimum(at + pixels, column + (layers - 1) * pixels))
    with np.errstate(invalid="ignore", divide="ignore"):  # -inf marks samples outside the volume
        curvature = before - 2 * top + after
        interior = (peak > 0) & (peak < layers - 1) & np.isfinite(before) & np.isfinite(after) & (curvature < 0)
        shift = np.where(interior, 0.5 * (before - after) / np.where(interior, curvature, 1), 0.0)
    depth = (offsets[peak] + shift * (offsets[1] - offsets[0] if layers > 1 else 0)).astype(np.float32)
    return np.where(top >= threshold, depth, np.float32(np.nan)).reshape(values.shape[1:])


def depth_summary(depth: np.ndarray, surface_pixels: int) -> dict:
    """Median and quartiles of a depth map's finite pixels, and whether they warn that the ink lies behind the
    surface: only with enough support (WARN_PIXELS and WARN_SHARE of the segment's `surface_pixels`)."""
    finite = depth[np.isfinite(depth)]
    if not len(finite):
        return {"pixels": 0, "median": None, "q25": None, "q75": None, "behind_surface": False}
    q25, median, q75 = (float(v) for v in np.percentile(finite, [25, 50, 75]))
    supported = len(finite) >= max(WARN_PIXELS, WARN_SHARE * surface_pixels)
    return {"pixels": int(len(finite)), "median": median, "q25": q25, "q75": q75, "behind_surface": supported and median < BEHIND}


def flatten_segment(dataset, ppm_path: Path, band: float, reduce: str, tile: int, bar, layers_path: Path | None,
                    depth_threshold: float | None = None, workers: int = 0,
                    region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The reduced uint8 image of one segment, its mask (255: sampled inside the volume, and with a `region` (2, 3:
    the zyx low and high corners of what a prediction covers), its surface point inside it) and, with a
    `depth_threshold` (in the volume's units), its depth map; the layer stack goes straight into `layers_path` if given.
    Tiles are sampled by `workers` threads (0: one per core), a few at a time, and written in order."""
    ppm = open_segment(ppm_path, scale_zyx=volume.level_scale(dataset))
    offsets = np.arange(-band, band + 1, dtype=np.float64)
    image = np.zeros((ppm.height, ppm.width), np.uint8)
    mask = np.zeros((ppm.height, ppm.width), np.uint8)
    depth = None if depth_threshold is None else np.full((ppm.height, ppm.width), np.nan, np.float32)
    layers = None
    if layers_path is not None:
        with writing(layers_path, resumable=False):
            layers = tifffile.memmap(layers_path, shape=(len(offsets), ppm.height, ppm.width), dtype=np.uint8)
            with open(layers_path, "r+b") as stream:  # a full disk fails here, not as a bus error in a page of the map
                os.posix_fallocate(stream.fileno(), 0, os.fstat(stream.fileno()).st_size)

    def flatten_tile(origin: tuple[int, int]):
        tile_box = (slice(origin[0], origin[0] + tile), slice(origin[1], origin[1] + tile))
        data = np.asarray(ppm.data[tile_box])
        samples, inside = sample_tile(dataset, data, offsets)
        count = inside_count(inside)
        sampled = count > 0
        if region is not None:  # outside the predicted region a 0 is "not predicted", not "no ink"
            point = np.rint(data[..., 2::-1])
            sampled &= np.all((point >= region[0]) & (point < region[1]), axis=-1)
        return (tile_box, _to_uint8(reduce_samples(samples, inside, reduce, count)), np.where(sampled, np.uint8(255), np.uint8(0)),
                None if depth is None else peak_depth(samples, inside, offsets, depth_threshold),
                None if layers is None else _to_uint8(samples))

    origins = tile_origins(ppm.height, ppm.width, tile, getattr(dataset, "cache", None))
    threads = workers or os.cpu_count() or 1

    def store(tile_box, image_tile, mask_tile, depth_tile, layers_tile):
        image[tile_box], mask[tile_box] = image_tile, mask_tile
        if depth is not None:
            depth[tile_box] = depth_tile
        if layers is not None:
            layers[(slice(None), *tile_box)] = layers_tile
        bar.update(image_tile.size)

    in_flight = collections.deque()
    with ThreadPoolExecutor(threads) as pool:  # numpy and the chunks' decompression release the GIL
        for origin in origins:  # a few tiles in flight at a time (bounded memory), stored in order as they finish
            in_flight.append(pool.submit(flatten_tile, origin))
            if len(in_flight) >= 4 * threads:
                store(*in_flight.popleft().result())
        while in_flight:
            store(*in_flight.popleft().result())
    if layers is not None:
        layers.flush()
        del layers
    return image, mask, depth


def tile_origins(height: int, width: int, tile: int, cache=None) -> list[tuple[int, int]]:
    """The (row, col) origins of a segment's tiles in bands of columns, each band row by row. A row of tiles and the
    next read mostly the same chunks, so a band is as wide as lets two rows' chunks stay in the volume's `cache` (a
    `ink3d.chunk_cache.ChunkCache`): (tile / c + 1) x (2 tile / c + 1) chunks of smallest edge c per column of tiles, what a
    flat surface at any angle may read (a curved segment reads about half). Without a cache: one band, row by row."""
    band = width
    if cache is not None:
        edge = min(cache.chunks)
        column_bytes = (tile / edge + 1) * (2 * tile / edge + 1) * math.prod(cache.chunks) * cache.dtype.itemsize
        band = max(1, int(cache.cache_bytes // column_bytes)) * tile
    return [(row, col) for start in range(0, width, band) for row in range(0, height, tile)
            for col in range(start, min(start + band, width), tile)]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _layers_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.stem + "_layers.tif")


def _mask_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.stem + "_mask.png")


def _depth_path(image_path: Path, suffix: str = ".tif") -> Path:
    return image_path.with_name(image_path.stem + "_depth" + suffix)


def segment_ppms(ppm_dir: Path, segments: str) -> dict[str, Path]:
    """Each segment's `.ppm` or tifxyz folder: the ids asked for, or every segment in `ppm_dir`."""
    if segments:
        ids = [s.strip() for s in segments.split(",") if s.strip()]
    else:
        ids = sorted(path.name for path in ppm_dir.iterdir() if find_segment(ppm_dir, path.name)) if ppm_dir.is_dir() else []
    if not ids:
        raise InputError(f"{ppm_dir}: no segments (<id>/<id>.ppm or tifxyz folders <id>/) found")
    paths = {segment_id: find_segment(ppm_dir, segment_id) for segment_id in ids}
    for segment_id, path in paths.items():
        if path is None:
            raise InputError(f"segment {segment_id}: no ppm at {ppm_dir / segment_id / f'{segment_id}.ppm'} nor a tifxyz folder")
    return paths


def main(argv=None):
    config = parse_config(globals(), argv)
    ppms = segment_ppms(Path(config.ppm_dir), config.segments)
    outputs = {segment_id: Path(config.out_dir) / f"{segment_id}_{config.name}.png" for segment_id in ppms}
    refuse_inputs_as_outputs({"volume": config.volume, "ppm_dir": config.ppm_dir}, {"out_dir": config.out_dir},
                             folders=("out_dir",), collections=("ppm_dir",))
    with output_lock(*outputs.values()):
        return flatten(config, ppms, outputs)


def flatten(config, ppms: dict[str, Path], outputs: dict[str, Path]) -> dict[str, Path]:
    """Flatten the volume onto each segment (id -> ppm or tifxyz) into `outputs` (id -> image path)."""
    depth_map = config.depth_map == "true" or (config.depth_map == "auto" and config.dataset == volume.PREDICTIONS)
    for path in outputs.values():
        check_output(path, config.overwrite)
        check_output(_mask_path(path), config.overwrite)
        if config.layers:
            check_output(_layers_path(path), config.overwrite)
        if depth_map:
            check_output(_depth_path(path), config.overwrite)
            check_output(_depth_path(path, ".json"), config.overwrite)
    reuse_freed_memory()  # each tile's arrays and each decompressed chunk would otherwise touch fresh pages: half the page faults
    file, dataset = volume.open_dataset(config.volume, config.dataset, level=config.level, cache_bytes=config.cache_mb << 20)
    total = sum(int(np.prod(segment_size(path))) for path in ppms.values())
    full_scale = 255 if dataset.dtype == np.uint8 else 1
    region = predicted_region(config.volume, dataset)
    if region is not None:
        print(f"{config.volume} predicts the region {region[0].tolist()}..{region[1].tolist()} (voxels of this level) only: "
              "pixels outside it are left out of the masks (0: not predicted)")
    with file, tqdm(total=total, unit="px", unit_scale=True, desc="flatten_3d") as bar:
        for segment_id, ppm_path in ppms.items():
            layers = atomic_output(_layers_path(outputs[segment_id])) if config.layers else contextlib.nullcontext()
            with atomic_output(outputs[segment_id]) as temporary, atomic_output(_mask_path(outputs[segment_id])) as temporary_mask, \
                    layers as temporary_layers:
                image, mask, depth = flatten_segment(dataset, ppm_path, config.band, config.reduce, config.tile, bar,
                                                     temporary_layers, config.depth_threshold * full_scale if depth_map else None,
                                                     config.workers, region)
                with writing(temporary, resumable=False):
                    temporary.write_bytes(cv2.imencode(".png", image)[1].tobytes())
                    temporary_mask.write_bytes(cv2.imencode(".png", mask)[1].tobytes())
            if depth is not None:
                write_depth(outputs[segment_id], depth, int(np.count_nonzero(mask)), bar)
            save_config(config, config_path_for(outputs[segment_id]))
    print(f"flattened {len(ppms)} segment(s) of {config.volume}[{config.dataset}] -> {config.out_dir}")
    return outputs


def predicted_region(path, dataset) -> np.ndarray | None:
    """The zyx low and high corners (2, 3) of what a prediction volume covers, in the voxels read, where its plan
    records a region (--roi) smaller than the volume; None otherwise."""
    try:
        roi = (stored_plan(Path(path)) or {})["roi"] if Path(path).is_dir() else json.loads(dataset.attrs["roi"])
    except (ValueError, KeyError, TypeError, AttributeError):  # a volume that records no region
        return None
    scale = volume.level_scale(dataset)
    region = np.array(roi, np.float64).T  # level-0 voxels
    region = np.stack([np.floor(region[0] / scale), np.ceil(region[1] / scale)]).astype(np.int64)
    return None if np.array_equal(region, [[0, 0, 0], list(dataset.shape)]) else region


def write_depth(image_path: Path, depth: np.ndarray, surface_pixels: int, bar) -> dict:
    """The depth map and its summary beside the flattened image; prints the summary, warns of ink behind the surface."""
    summary = depth_summary(depth, surface_pixels)
    with writing(_depth_path(image_path), resumable=False), atomic_output(_depth_path(image_path)) as temporary:
        tifffile.imwrite(temporary, depth)
    with writing(_depth_path(image_path, ".json"), resumable=False), atomic_output(_depth_path(image_path, ".json")) as temporary:
        temporary.write_text(json.dumps(summary, indent=2) + "\n")
    name = image_path.stem
    if summary["pixels"]:
        bar.write(f"{name}: the prediction peaks at a median depth of {summary['median']:+.2f} voxels along the normal "
                  f"(quartiles {summary['q25']:+.2f} .. {summary['q75']:+.2f}) over {summary['pixels']} pixels")
    else:
        bar.write(f"{name}: no pixel's peak reaches the depth threshold: no depth map")
    if summary["behind_surface"]:
        bar.write(f"warning: {name}: the predicted ink lies behind the surface (median {summary['median']:+.2f} voxels over "
                  f"{summary['pixels']} of its {surface_pixels} pixels): the segment is drawn in front of the papyrus, or its "
                  "normals point into the sheet (all_labels_to_hdf.py reads each segment's orientation off the scan)")
    return summary


if __name__ == "__main__":
    run_main(main)
