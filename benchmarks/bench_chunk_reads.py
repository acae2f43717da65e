"""Who should decompress an OME-Zarr scan's chunks: the decoders held here, zarr, or tensorstore? On a cold flatten
and on inference's reads, same run.

    python benchmarks/bench_chunk_reads.py                 # a 600 x 600 segment's volume, three runs of each
    python benchmarks/bench_chunk_reads.py --size 1000 --runs 5

The volume is bench_flatten.py's (a curved segment's predictions, chunks that compress as real ones do), written as
write_ome_zarr writes a scan (zarr v3, 128^3 chunks, blosc zstd with bitshuffle). Every read starts from a fresh open
(no decompressed chunk held; the files in the page cache for all alike), the readers taking turns; medians of
`--runs`.

- flatten: flatten_3d's first pass over the segment (`flatten_segment`), through the chunk cache (512 MB) filled by
  1. the chunk files read and decoded here (`ink3d.chunk_decoders`: numcodecs, what flatten_3d does);
  2. zarr (a box's missing chunks in one read, as the cache reads arrays whose files it cannot decode);
  3. tensorstore (a box's missing chunks read concurrently by its own threads).
- inference: inference.py's reads of the scan (slabs of 128 planes of each 512^3 macro-block's input, with a halo of
  32), each chunk read about twice: straight through zarr (what inference does), through the cache with the decoders
  held here, and straight through tensorstore (its own cache of decoded chunks, 512 MB).

tensorstore is not one of the pipeline's requirements: `pip install tensorstore` to include it (skipped otherwise).
"""

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_flatten import make_scene  # noqa: E402
from flatten_3d import flatten_segment  # noqa: E402
from ink3d import volume  # noqa: E402
from ink3d.chunk_cache import ChunkCache, box_of  # noqa: E402
from ink3d.ppm import write_ppm  # noqa: E402
from ink3d.pyramid import write_ome_zarr  # noqa: E402

try:
    import tensorstore
except ImportError:
    tensorstore = None

CACHE_BYTES = 512 << 20  # flatten_3d's default --cache_mb
MACRO_BLOCK, HALO, SLAB = 512, 32, 128  # inference.py's defaults at patch 128


class TensorstoreVolume:
    """A zarr array read by tensorstore, as the stages read a volume: shape, dtype, chunks and boxes; with `cached`,
    through a ChunkCache whose missing chunks tensorstore reads side by side, else through tensorstore's own cache."""

    def __init__(self, path: Path, cached: bool):
        context = tensorstore.Context({"cache_pool": {"total_bytes_limit": 0 if cached else CACHE_BYTES},
                                       "data_copy_concurrency": {"limit": os.cpu_count() or 1}})
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
        self.array = tensorstore.open(spec, read=True, context=context).result()
        self.shape, self.dtype = tuple(self.array.shape), np.dtype(self.array.dtype.numpy_dtype)
        self.chunks = tuple(self.array.chunk_layout.read_chunk.shape)
        self.scale = np.ones(3)  # level 0
        self.cache = ChunkCache(self.shape, self.chunks, self.dtype, CACHE_BYTES, self._read, together=True) if cached else None

    def __getitem__(self, key) -> np.ndarray:
        return self.cache.read(box_of(key, self.shape)) if self.cache is not None else self.array[key].read().result()

    def _read(self, indices: list[tuple[int, ...]]) -> dict:
        boxes = {index: tuple(slice(i * c, min((i + 1) * c, size)) for i, c, size in zip(index, self.chunks, self.shape))
                 for index in indices}
        reads = {index: self.array[box].read() for index, box in boxes.items()}  # issued together, read side by side
        return {index: read.result() for index, read in reads.items()}


def zarr_cached(path: Path):
    _, opened = volume.open_dataset(path, volume.PREDICTIONS, cache_bytes=CACHE_BYTES)
    opened.cache = ChunkCache(opened.shape, opened.chunks, opened.dtype, CACHE_BYTES, opened._read, together=True)
    return opened


def inference_boxes(shape) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """(origin, shape) of each slab inference reads: per macro-block, its input (the block and a halo) 128 planes at a time."""
    boxes = []
    for origin in itertools.product(*(range(0, size, MACRO_BLOCK) for size in shape)):
        low = np.array(origin) - HALO
        high = np.minimum(np.array(origin) + MACRO_BLOCK, shape) + HALO
        for start in range(low[0], high[0], SLAB):
            boxes.append((np.array([start, low[1], low[2]]), (min(SLAB, high[0] - start), high[1] - low[1], high[2] - low[2])))
    return boxes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=600, help="the segment's edge (pixels); the volume holds it")
    parser.add_argument("--band", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        h5_path, data = make_scene(Path(tmp), args.size)
        write_ppm(Path(tmp) / "segment.ppm", data)
        file, dataset = volume.open_dataset(h5_path, volume.PREDICTIONS)
        with file:
            write_ome_zarr(Path(tmp) / "pred.zarr", dataset, levels=1)
        path = Path(tmp) / "pred.zarr" / "0"
        flatten_readers = {"decoded here": lambda: volume.open_dataset(path, volume.PREDICTIONS, cache_bytes=CACHE_BYTES)[1],
                           "zarr": lambda: zarr_cached(path)}
        inference_readers = {"zarr (no cache)": lambda: volume.open_dataset(path, volume.PREDICTIONS)[1],
                             "decoded here": lambda: volume.open_dataset(path, volume.PREDICTIONS, cache_bytes=CACHE_BYTES)[1]}
        if tensorstore is not None:
            flatten_readers["tensorstore"] = lambda: TensorstoreVolume(path, cached=True)
            inference_readers["tensorstore (its cache)"] = lambda: TensorstoreVolume(path, cached=False)
        shape = dataset.shape
        boxes = inference_boxes(shape)
        voxels = sum(int(np.prod(box_shape)) for _, box_shape in boxes)
        flatten_rates = {name: [] for name in flatten_readers}
        read_rates = {name: [] for name in inference_readers}
        images, sums = {}, {}
        for _ in tqdm(range(args.runs), desc="runs"):
            for name, open_reader in flatten_readers.items():
                opened = open_reader()
                started = time.perf_counter()
                images[name] = flatten_segment(opened, Path(tmp) / "segment.ppm", args.band, "mean", 128, tqdm(disable=True),
                                               None, 127.5)[0]
                flatten_rates[name].append(args.size**2 / (time.perf_counter() - started))
            for name, open_reader in inference_readers.items():
                opened = open_reader()
                started = time.perf_counter()
                sums[name] = sum(int(volume.read_crop(opened, origin, box_shape).sum(dtype=np.int64)) for origin, box_shape in boxes)
                read_rates[name].append(voxels / (time.perf_counter() - started))
    assert all(np.array_equal(image, images["decoded here"]) for image in images.values()), "the readers flatten differently"
    assert len(set(sums.values())) == 1, "the readers read different values"
    print(f"OME-Zarr volume {shape} (128^3 chunks, blosc zstd bitshuffle), {os.cpu_count()} cores; medians of {args.runs} "
          "fresh opens each")
    if tensorstore is None:
        print("tensorstore: skipped (not installed: pip install tensorstore)")
    base = np.median(flatten_rates["decoded here"])
    print(f"flatten_3d's first pass, {args.size} x {args.size} px, band {args.band}:")
    for name, rates in flatten_rates.items():
        print(f"  {name:24s} {np.median(rates):>12,.0f} px/s   decoded here / this: {base / np.median(rates):.2f}x")
    base = np.median(read_rates["decoded here"])
    print(f"inference's reads, {len(boxes)} slabs, {voxels / 1e6:,.0f} M voxels:")
    for name, rates in read_rates.items():
        print(f"  {name:24s} {np.median(rates) / 1e6:>12,.1f} M voxels/s   decoded here / this: {base / np.median(rates):.2f}x")


if __name__ == "__main__":
    main()
