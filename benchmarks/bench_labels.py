"""all_labels_to_hdf.py vs a plain per-pixel loop: pixels/s, identical output, peak memory.

    python benchmarks/bench_labels.py                   # a 2000 x 2000 curved segment
    python benchmarks/bench_labels.py --size 1000 --reference_rows 40

The per-pixel loop applies the same voxelization (ink3d.labels.band_voxels on one pixel) and
adds each pixel's band into the HDF5 datasets with a read-modify-write of its bounding box.
It is too slow for the whole segment, so both run on the first `--reference_rows` rows of the
segment (outputs asserted identical); the pipeline then runs on the whole segment in its own
process, which reports its peak RSS.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import all_labels_to_hdf  # noqa: E402
from ink3d import volume  # noqa: E402
from ink3d.labels import band_voxels  # noqa: E402
from ink3d.ppm import read_ppm, valid_mask, write_ppm  # noqa: E402

SEGMENT = "20240101000000"
RUN = """
import resource, sys
sys.path.insert(0, {root!r})
import all_labels_to_hdf
all_labels_to_hdf.main({argv!r})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_scene(root: Path, size: int, band: float) -> tuple[int, int, int]:
    """A cylinder patch (radius 1.2 * size / pi, so the arc spans ~0.8 pi) with letter-like labels."""
    radius = 1.2 * size / np.pi
    extent = int(2 * radius + 4 * band + 8)
    shape = (size + 8, extent, extent)
    theta = np.arange(size) / radius + 0.1
    rows = np.arange(size, dtype=np.float64)
    data = np.zeros((size, size, 6))
    centre = extent / 2
    data[..., 0] = centre + radius * np.cos(theta)[None]
    data[..., 1] = centre + radius * np.sin(theta)[None]
    data[..., 2] = 4 + rows[:, None]
    data[..., 3] = np.cos(theta)[None]
    data[..., 4] = np.sin(theta)[None]
    (root / "paths" / SEGMENT).mkdir(parents=True)
    write_ppm(root / "paths" / SEGMENT / f"{SEGMENT}.ppm", data)
    label = np.zeros((size, size), np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(size * size // 2000):
        y, x = rng.integers(0, size, 2)
        cv2.line(label, (int(x), int(y)), (int(x) + 12, int(y) + 18), 255, 3)
    (root / "labels").mkdir()
    cv2.imwrite(str(root / "labels" / f"{SEGMENT}_inklabels.png"), label)
    with h5py.File(root / "scan.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, shape, np.uint8)
    return shape


def per_pixel_reference(root: Path, rows: int, band: float, out: Path) -> float:
    ppm = read_ppm(root / "paths" / SEGMENT / f"{SEGMENT}.ppm")
    label = cv2.imread(str(root / "labels" / f"{SEGMENT}_inklabels.png"), cv2.IMREAD_GRAYSCALE) / np.float32(255)
    with h5py.File(root / "scan.h5") as scan_file:
        shape = scan_file[volume.SCAN].shape
    started = time.perf_counter()
    with h5py.File(out, "w") as file:
        ink_sum = volume.create_volume(file, volume.INK_SUM, shape, np.float32)
        ink_count = volume.create_volume(file, volume.INK_COUNT, shape, np.uint16)
        for row in range(rows):
            for col in range(ppm.width):
                pixel = np.asarray(ppm.data[row, col])
                if not valid_mask(pixel):
                    continue
                flat, _, _, _ = band_voxels(pixel[None, 2::-1], pixel[None, 5:2:-1], band, shape)
                zyx = np.stack(np.unravel_index(flat, shape), axis=1)
                low, high = zyx.min(axis=0), zyx.max(axis=0) + 1
                box = tuple(slice(a, b) for a, b in zip(low, high))
                sums, counts = ink_sum[box], ink_count[box]
                local = tuple((zyx - low).T)
                sums[local] += label[row, col]
                counts[local] += 1
                ink_sum[box], ink_count[box] = sums, counts
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--reference_rows", type=int, default=10)
    parser.add_argument("--band", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shape = make_scene(root, args.size, args.band)
        print(f"segment {args.size} x {args.size} pixels on a cylinder, volume {shape}, band {args.band}")
        common = ["--ppm_dir", str(root / "paths"), "--labels_dir", str(root / "labels"), "--volume", str(root / "scan.h5"),
                  "--out_valid", str(root / "valid.h5"), "--valid_segments", "", "--band", str(args.band), "--overwrite", "true"]

        # 1. same rows, both methods: identical output
        rows = args.reference_rows
        reference_seconds = per_pixel_reference(root, rows, args.band, root / "reference.h5")
        ppm_path = root / "paths" / SEGMENT / f"{SEGMENT}.ppm"
        full_ppm = ppm_path.read_bytes()
        partial = np.asarray(read_ppm(ppm_path).data).copy()
        partial[rows:] = 0
        write_ppm(ppm_path, partial)
        started = time.perf_counter()
        all_labels_to_hdf.main(common + ["--out_train", str(root / "fast.h5")])
        fast_seconds = time.perf_counter() - started
        touched = slice(0, int(4 + rows + args.band + 2))  # the rows' bands lie in these slices; the rest is empty
        with h5py.File(root / "reference.h5") as a, h5py.File(root / "fast.h5") as b:
            for name in (volume.INK_SUM, volume.INK_COUNT):
                assert np.array_equal(a[name][touched], b[name][touched]), f"{name} differs"
                assert not b[name][touched.stop:touched.stop + 16].any()
        pixels = rows * args.size
        print(f"first {rows} rows ({pixels} pixels), identical output: per-pixel loop {pixels / reference_seconds:,.0f} px/s, "
              f"all_labels_to_hdf {pixels / fast_seconds:,.0f} px/s (whole run, including file setup)")

        # 2. the whole segment, in its own process for its peak RSS
        ppm_path.write_bytes(full_ppm)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", RUN.format(root=str(ROOT), argv=common + ["--out_train", str(root / "full.h5")])],
                                check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        rss = int(result.stdout.strip().splitlines()[-1]) / 1024
        rate = args.size**2 / seconds
        print(f"whole segment: {args.size**2:,} pixels in {seconds:.1f} s = {rate:,.0f} px/s, peak RSS {rss:.0f} MB")
        print(f"speed-up over the per-pixel loop: {rate / (pixels / reference_seconds):.0f}x")


if __name__ == "__main__":
    main()
