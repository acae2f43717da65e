"""volume_to_hdf.py: write speed and size per codec, random 128^3 crop reads, peak memory vs stack size.

    python benchmarks/bench_volume_to_hdf.py            # 512 slices of 1024 x 1024 uint8 = 512 MB
    python benchmarks/bench_volume_to_hdf.py --slices 128 --size 512   # a quick look

The stack is CT-like (rings of "papyrus", smooth density, noise) so the codecs see realistic
entropy. Each conversion runs in its own process, which reports its own peak RSS.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ink3d import volume  # noqa: E402
from ink3d.volume import open_dataset  # noqa: E402

CONVERT = """
import resource, sys
sys.path.insert(0, {root!r})
import volume_to_hdf
volume_to_hdf.main({argv!r})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_stack(folder: Path, slices: int, size: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] - size / 2
    radius = np.hypot(y, x)
    folder.mkdir(parents=True)
    for z in range(slices):
        rings = (np.sin(radius / 6 + z / 40) > 0.3) * (120 + 60 * np.sin(x / 97 + z / 31))
        image = np.clip(rings + 20 + rng.normal(0, 12, rings.shape), 0, 255).astype(np.uint8)
        tifffile.imwrite(folder / f"{z:05d}.tif", image)
    return slices * size * size


def convert(tiff_dir: Path, out: Path, compression: str) -> tuple[float, int]:
    argv = ["--tiff_dir", str(tiff_dir), "--out", str(out), "--compression", compression, "--overwrite", "true"]
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CONVERT.format(root=str(ROOT), argv=argv)],
        check=True, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - started
    return seconds, int(result.stdout.strip().splitlines()[-1])


def crop_reads_per_second(path: Path, crops: int = 40, seed: int = 0) -> float:
    file, dataset = open_dataset(path, volume.SCAN)
    rng = np.random.default_rng(seed)
    high = np.maximum(np.array(dataset.shape) - 128, 1)
    origins = rng.integers(0, high, size=(crops, 3))
    started = time.perf_counter()
    for origin in origins:
        volume.read_crop(dataset, origin, (128, 128, 128))
    file.close()
    return crops / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=512)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nbytes = make_stack(tmp / "stack", args.slices, args.size)
        print(f"stack: {args.slices} slices of {args.size} x {args.size} uint8 = {nbytes / 1e6:.0f} MB")
        print(f"{'codec':<11} {'write MB/s':>10} {'size MB':>8} {'ratio':>6} {'128^3 crops/s':>14} {'peak RSS MB':>12}")
        for codec in volume.COMPRESSIONS:
            out = tmp / f"{codec}.h5"
            seconds, rss_kb = convert(tmp / "stack", out, codec)
            size = out.stat().st_size
            rate = crop_reads_per_second(out)
            print(f"{codec:<11} {nbytes / 1e6 / seconds:>10.0f} {size / 1e6:>8.0f} {nbytes / size:>6.2f} {rate:>14.1f} {rss_kb / 1024:>12.0f}")
            out.unlink()
        half = tmp / "half"
        half.mkdir()
        for z in range(args.slices // 2):
            (half / f"{z:05d}.tif").symlink_to(tmp / "stack" / f"{z:05d}.tif")
        _, rss_half = convert(half, tmp / "half.h5", volume.DEFAULT_COMPRESSION)
        _, rss_full = convert(tmp / "stack", tmp / "full.h5", volume.DEFAULT_COMPRESSION)
        print(f"peak RSS, {volume.DEFAULT_COMPRESSION}: {args.slices // 2} slices {rss_half / 1024:.0f} MB, "
              f"{args.slices} slices {rss_full / 1024:.0f} MB (ratio {rss_full / rss_half:.2f}; memory is one slab)")


if __name__ == "__main__":
    main()
