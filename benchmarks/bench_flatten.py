"""flatten_3d.py vs a per-pixel loop: pixels/s with identical output asserted, same run.

    python benchmarks/bench_flatten.py                    # a 1000 x 1000 curved segment, band 8
    python benchmarks/bench_flatten.py --size 400
    python benchmarks/bench_flatten.py --size 2560 --radius 1500   # a Grand Prize segment's size and curvature

The per-pixel loop reads each pixel's band (its bounding box) from the HDF5 dataset, opened with
the default chunk cache as such a loop typically is, and samples it with the same trilinear
interpolation. It runs twice: with HDF5 2.x's default cache (8 MB: four 128^3 uint8 chunks stay
decompressed, which suits a pixel-by-pixel walk) and with HDF5 1.x's (1 MB: smaller than one
chunk, so every pixel decompresses its chunk again). It runs on the first `--reference_rows`
rows; flatten_3d.py runs on those rows (identity) and on the whole segment: first as flatten_3d.py runs it, each
in a process of its own (each chunk decompressed as it is first read, the chunk cache's memory touched for the first time),
alternating with the same through HDF5's own 512 MB chunk cache (HDF5 decompressing, one chunk at a time under
h5py's lock); then through its 512 MB chunk cache once filled (sampling alone). The volume's OME-Zarr copy (as
write_ome_zarr writes it: 128^3 chunks, blosc zstd) is flattened too, each from a fresh open: through the chunk cache
as flatten_3d reads it (the chunk files read and decompressed here), through the cache reading them through zarr, and
without the cache. Last, the surface as a tifxyz segment with a vertex every 20 pixels (VC3D's scale 0.05),
against its .ppm, both with the chunk cache filled.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatten_3d import flatten_segment, sample_tile  # noqa: E402
from ink3d import chunk_cache, pyramid, volume  # noqa: E402
from ink3d.ppm import positions_along_normals, valid_mask, write_ppm  # noqa: E402
from ink3d.tifxyz import write_tifxyz  # noqa: E402
from measure import measure  # noqa: E402


FRESH_OPEN = """
from pathlib import Path
from tqdm import tqdm
from flatten_3d import flatten_segment
from ink3d import volume
from ink3d.memory import reuse_freed_memory
reuse_freed_memory()  # as flatten_3d.py does
handle, opened = volume.open_dataset({path!r}, volume.PREDICTIONS, cache_bytes=512 << 20)  # flatten_3d's default
"""
HDF5_CACHE_OPEN = """
import h5py
from pathlib import Path
from tqdm import tqdm
from flatten_3d import flatten_segment
from ink3d.memory import reuse_freed_memory
reuse_freed_memory()
opened = h5py.File({path!r}, "r", rdcc_nbytes=512 << 20, rdcc_nslots=80000)["predictions"]  # HDF5 decompresses, under h5py's lock
"""
FLATTEN = """
flatten_segment(opened, Path({ppm!r}), {band}, "mean", {tile}, tqdm(disable=True), None, 127.5)
"""


def make_scene(root: Path, size: int, radius: float | None = None) -> tuple[Path, np.ndarray]:
    """A `size` x `size` segment on a cylinder (rows along z, the arc along the columns; unless `radius` is given,
    the arc is 5/6 of a half turn) in a volume that holds the arc with 20 voxels to spare."""
    radius = radius or 1.2 * size / np.pi
    theta = np.arange(size) / radius + 0.1
    arc = radius * np.stack([np.cos(theta), np.sin(theta)])
    low = np.floor(arc.min(axis=1)) - 20
    x_extent, y_extent = np.ceil(arc.max(axis=1) - low).astype(int) + 20
    shape = (size + 20, y_extent, x_extent)
    rng = np.random.default_rng(0)
    with h5py.File(root / "pred.h5", "w") as file:
        dataset = volume.create_volume(file, volume.PREDICTIONS, shape, np.uint8)
        y, x = np.mgrid[0:shape[1], 0:shape[2]]
        plane = ((y * 3 + x * 11) % 200).astype(np.int16)
        for z0 in range(0, shape[0], 128):  # (7 z + 3 y + 11 x) % 200 plus CT-like noise, so chunks compress realistically
            shift = (np.arange(z0, min(z0 + 128, shape[0])) * 7 % 200).astype(np.int16)[:, None, None]
            pattern = ((plane + shift) % 200).astype(np.uint8)
            dataset[z0:z0 + len(shift)] = pattern + rng.integers(0, 40, pattern.shape, dtype=np.uint8)
    data = np.zeros((size, size, 6))
    data[..., 0] = (arc[0] - low[0])[None]
    data[..., 1] = (arc[1] - low[1])[None]
    data[..., 2] = 10.5 + np.arange(size)[:, None]
    data[..., 3], data[..., 4] = np.cos(theta)[None], np.sin(theta)[None]
    return root / "pred.h5", data


def per_pixel(dataset, data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    out = np.zeros(data.shape[:2] + (len(offsets),), np.float32)
    for row in range(data.shape[0]):
        for col in range(data.shape[1]):
            pixel = data[row, col]
            if not valid_mask(pixel):
                continue
            positions = positions_along_normals(pixel, offsets)
            low = np.floor(positions.min(axis=0)).astype(int)
            high = np.floor(positions.max(axis=0)).astype(int) + 2
            box = volume.read_crop(dataset, low, high - low).astype(np.float32)
            out[row, col] = ndimage.map_coordinates(box, (positions - low).T, order=1, mode="constant", cval=0.0, prefilter=False)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--radius", type=float, help="the cylinder's radius (default: the arc 5/6 of a half turn); 1500 as a Grand Prize segment's")
    parser.add_argument("--band", type=int, default=8)
    parser.add_argument("--reference_rows", type=int, default=4)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--first_runs", type=int, default=5, help="fresh processes of each kind for the first pass, alternating")
    args = parser.parse_args()
    offsets = np.arange(-args.band, args.band + 1, dtype=np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        path, data = make_scene(Path(tmp), args.size, args.radius)
        rows = data[:args.reference_rows]
        reference_rates = {}
        for cache_mb in (8, 1):
            with h5py.File(path, "r", rdcc_nbytes=cache_mb << 20) as file:
                started = time.perf_counter()
                reference = per_pixel(file[volume.PREDICTIONS], rows, offsets)
                reference_rates[cache_mb] = rows.shape[0] * rows.shape[1] / (time.perf_counter() - started)
        write_ppm(Path(tmp) / "segment.ppm", data)
        first_rates = {"here": [], "hdf5": []}
        body = FLATTEN.format(ppm=str(Path(tmp) / "segment.ppm"), band=args.band, tile=args.tile)
        for _ in range(args.first_runs):  # in a process of its own, as flatten_3d.py runs: every chunk decompressed, its memory touched first
            for name, setup in (("here", FRESH_OPEN), ("hdf5", HDF5_CACHE_OPEN)):
                first_rates[name].append(args.size**2 / measure(body, setup.format(path=str(path)))["seconds"])
        file, dataset = volume.open_dataset(path, volume.PREDICTIONS, cache_bytes=512 << 20)  # a cache that holds the whole segment
        with file:
            tiled = np.concatenate([sample_tile(dataset, rows[:, c:c + args.tile], offsets)[0] for c in range(0, args.size, args.tile)], axis=2)
            assert np.array_equal(np.moveaxis(reference, -1, 0), tiled), "tiled sampling differs from the per-pixel loop"
            rates = []
            for workers in (0, 1, 0):  # a first run fills the chunk cache; then one thread, and one per core (the default)
                started = time.perf_counter()
                with tqdm(total=args.size**2, desc=f"flatten_segment, workers {workers}", unit="px") as bar:
                    image = flatten_segment(dataset, Path(tmp) / "segment.ppm", args.band, "mean", args.tile, bar, None, 127.5, workers)[0]
                rates.append(args.size**2 / (time.perf_counter() - started))
            step = 20
            write_tifxyz(Path(tmp) / "segment", data[::step, ::step, :3], (1 / step, 1 / step))
            surface_rates = {}
            for name in ("segment", "segment.ppm"):  # the chunk cache still filled by the runs above
                started = time.perf_counter()
                with tqdm(total=args.size**2, desc=f"flatten_segment, {name}", unit="px") as bar:
                    flatten_segment(dataset, Path(tmp) / name, args.band, "mean", args.tile, bar, None, 127.5)
                surface_rates[name] = bar.n / (time.perf_counter() - started)
            pyramid.write_ome_zarr(Path(tmp) / "pred.zarr", dataset.dataset, levels=1)
        zarr_rates = {}
        for name, cache_mb in (("files", 512), ("zarr", 512), ("none", 0)):  # flatten_3d's default; zarr keeps no decompressed chunk
            _, opened = volume.open_dataset(Path(tmp) / "pred.zarr", volume.PREDICTIONS, cache_bytes=cache_mb << 20)
            if name == "zarr":  # the cache reading the chunks through zarr, as it does arrays whose chunk files it cannot read
                opened.cache = chunk_cache.ChunkCache(opened.shape, opened.chunks, opened.dtype, cache_mb << 20, opened._read, together=True)
            started = time.perf_counter()
            with tqdm(total=args.size**2, desc=f"flatten_segment, OME-Zarr, {name}", unit="px") as bar:
                zarr_image = flatten_segment(opened, Path(tmp) / "segment.ppm", args.band, "mean", args.tile, bar, None, 127.5)[0]
            zarr_rates[name] = args.size**2 / (time.perf_counter() - started)
            assert np.array_equal(zarr_image, image), "the OME-Zarr copy flattens differently"
        _, one_thread, rate = rates
        print(f"segment {args.size} x {args.size}, band {args.band} ({len(offsets)} samples per pixel)")
        print(f"flatten_3d (image, mask and depth map) in tiles of {args.tile}, the chunk cache filled: {rate:,.0f} px/s on "
              f"{args.size**2:,} pixels with a thread per core; {one_thread:,.0f} px/s with one ({rate / one_thread:.2f}x)")
        here, hdf5 = (np.median(rates) for rates in first_rates.values())
        print(f"flatten_3d as it runs, in a process of its own, decompressing each chunk it reads once: median {here:,.0f} px/s "
              f"({', '.join(f'{rate:,.0f}' for rate in first_rates['here'])}); with HDF5 decompressing them into its own chunk "
              f"cache instead, median {hdf5:,.0f} px/s ({', '.join(f'{rate:,.0f}' for rate in first_rates['hdf5'])}): {here / hdf5:.2f}x")
        for cache_mb, reference_rate in reference_rates.items():
            print(f"per-pixel loop, {cache_mb} MB chunk cache: {reference_rate:,.0f} px/s on {rows.shape[0] * rows.shape[1]} pixels "
                  f"(identical output); flatten_3d is {rate / reference_rate:.0f}x faster")
    print(f"OME-Zarr copy, each run from a fresh open: {zarr_rates['files']:,.0f} px/s through the chunk cache, its chunk files read "
          f"here; {zarr_rates['zarr']:,.0f} px/s with the cache reading them through zarr ({zarr_rates['files'] / zarr_rates['zarr']:.2f}x); "
          f"{zarr_rates['none']:,.0f} px/s decompressing each tile's chunks anew ({zarr_rates['files'] / zarr_rates['none']:.2f}x; identical image)")
    print(f"tifxyz, a vertex every {step} pixels: {surface_rates['segment']:,.0f} px/s against {surface_rates['segment.ppm']:,.0f} px/s "
          f"for the .ppm ({surface_rates['segment'] / surface_rates['segment.ppm']:.2f}x)")


if __name__ == "__main__":
    main()
