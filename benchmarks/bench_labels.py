"""all_labels_to_hdf.py on a large curved segment: pixels/s against an original-style box fill, identical output
to a plain per-pixel loop, peak memory.

    python benchmarks/bench_labels.py                          # 2560 x 2560 pixels on a cylinder of radius 1500
    python benchmarks/bench_labels.py --size 1000 --radius 400
    python benchmarks/bench_labels.py --inside 0.5                          # half of the rectangle outside the segment
    python benchmarks/bench_labels.py --size 640 --width 12000 --radius 3000   # a wide segment: voxelized in bands of columns

The segment is a cylinder patch (its rows along z), labeled with letter-like strokes 4-9 pixels
wide covering `--ink` of its pixels, at real label density (a Grand Prize label: ~7 %). A row strip of such a segment reaches chunks all
along the arc, which is what makes the chunk I/O matter.

1. Exactness: a plain per-pixel loop (the same voxels per pixel, each pixel's box of the HDF5
   datasets read, added to and written back) and all_labels_to_hdf on `--reference_rows` rows in
   the middle: identical label volumes.
2. Baseline: the original pipeline's method, a per-pixel box fill (every voxel of the
   axis-aligned box between the two ends of the pixel's band gets its label), into chunks held in
   memory and written once: on `--box_rows` rows in the middle (the loop is too slow for the whole
   segment), its time per segment pixel scaled to the whole segment, in pixels/s of the rectangle.
3. all_labels_to_hdf on the whole segment, `--runs` times, each in its own process for its peak RSS.
"""

import argparse
import os
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
from measure import measure  # noqa: E402

SEGMENT = "20240101000000"


def make_scene(root: Path, height: int, width: int, radius: float, band: float, ink: float, inside: float = 1.0) -> tuple[int, int, int]:
    """A `height` x `width` cylinder patch of `radius` (rows along z, the arc along the columns) with strokes on `ink` of it;
    with `inside` < 1 only an ellipse of that fraction of the rectangle is segment (the rest: no point, as outside a mask)."""
    if width > 6 * radius:
        raise SystemExit(f"--width {width} wraps around a cylinder of radius {radius:g}: raise --radius")
    extent = int(2 * radius + 4 * band + 8)
    shape = (height + 8, extent, extent)
    theta = np.arange(width) / radius + 0.1
    centre = extent / 2
    data = np.zeros((height, width, 6))
    data[..., 0] = centre + radius * np.cos(theta)[None]
    data[..., 1] = centre + radius * np.sin(theta)[None]
    data[..., 2] = 4 + np.arange(height, dtype=np.float64)[:, None]
    data[..., 3] = np.cos(theta)[None]
    data[..., 4] = np.sin(theta)[None]
    if inside < 1:
        rows, cols = np.ogrid[:height, :width]
        scale = np.sqrt(inside * 4 / np.pi)  # the ellipse's share of the rectangle: pi a b / (4 a b / scale^2)
        data[((rows - height / 2) / (scale * height / 2)) ** 2 + ((cols - width / 2) / (scale * width / 2)) ** 2 > 1] = 0
    (root / "paths" / SEGMENT).mkdir(parents=True)
    write_ppm(root / "paths" / SEGMENT / f"{SEGMENT}.ppm", data)
    label = np.zeros((height, width), np.uint8)
    rng = np.random.default_rng(0)
    while np.count_nonzero(label) < ink * label.size:  # pen strokes 4-9 pixels wide, as on a Grand Prize label
        for y, x, thickness in zip(*rng.integers(0, (height, width), (max(height, width), 2)).T, rng.integers(4, 10, max(height, width))):
            cv2.line(label, (int(x), int(y)), (int(x) + 12, int(y) + 18), 255, int(thickness))
    (root / "labels").mkdir()
    cv2.imwrite(str(root / "labels" / f"{SEGMENT}_inklabels.png"), label)
    with h5py.File(root / "scan.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, shape, np.uint8)
    return shape


def _segment(root: Path):
    ppm = read_ppm(root / "paths" / SEGMENT / f"{SEGMENT}.ppm")
    label = cv2.imread(str(root / "labels" / f"{SEGMENT}_inklabels.png"), cv2.IMREAD_GRAYSCALE) / np.float32(255)
    with h5py.File(root / "scan.h5") as scan_file:
        shape = scan_file[volume.SCAN].shape
    return ppm, label, shape


def per_pixel_reference(root: Path, rows, band: float, out: Path) -> None:
    """Each pixel's band voxels added into the HDF5 datasets with a read-modify-write of their bounding box."""
    ppm, label, shape = _segment(root)
    with h5py.File(out, "w") as file:
        ink_sum = volume.create_volume(file, volume.INK_SUM, shape, np.float32)
        ink_count = volume.create_volume(file, volume.INK_COUNT, shape, np.uint16)
        for row in rows:
            for col in range(ppm.width):
                pixel = np.asarray(ppm.data[row, col])
                if not valid_mask(pixel):
                    continue
                z, y, x, _, _, _ = band_voxels(pixel[None, 2::-1], pixel[None, 5:2:-1], band, shape)
                zyx = np.stack([z, y, x], axis=1)
                low, high = zyx.min(axis=0), zyx.max(axis=0) + 1
                box = tuple(slice(a, b) for a, b in zip(low, high))
                sums, counts = ink_sum[box], ink_count[box]
                local = tuple((zyx - low).T)
                sums[local] += label[row, col]
                counts[local] += 1
                ink_sum[box], ink_count[box] = sums, counts


def box_fill(root: Path, rows, band: float, out: Path) -> float:
    """The original pipeline's per-pixel box fill into chunks held in memory, each written once; seconds taken."""
    ppm, label, shape = _segment(root)
    chunk = volume.DEFAULT_CHUNK
    started = time.perf_counter()
    held = {}
    for row in rows:
        data = np.asarray(ppm.data[row])
        ends = np.rint(np.stack([data[:, 2::-1] - band * data[:, 5:2:-1], data[:, 2::-1] + band * data[:, 5:2:-1]])).astype(np.int64)
        lows = np.clip(ends.min(axis=0), 0, shape)
        highs = np.clip(ends.max(axis=0) + 1, 0, shape)
        for col in np.flatnonzero(valid_mask(data)):
            low, high = lows[col], highs[col]
            for origin in np.stack(np.meshgrid(*[range(a // chunk * chunk, b, chunk) for a, b in zip(low, high)], indexing="ij"), -1).reshape(-1, 3):
                key = tuple(origin)
                if key not in held:
                    held[key] = (np.zeros((chunk,) * 3, np.float32), np.zeros((chunk,) * 3, np.uint16))
                box = tuple(slice(max(a, o) - o, min(b, o + chunk) - o) for a, b, o in zip(low, high, origin))
                held[key][0][box] += label[row, col]
                held[key][1][box] += 1
    with h5py.File(out, "w") as file:
        ink_sum = volume.create_volume(file, volume.INK_SUM, shape, np.float32)
        ink_count = volume.create_volume(file, volume.INK_COUNT, shape, np.uint16)
        for origin, (sums, counts) in held.items():
            box = tuple(slice(o, min(o + chunk, s)) for o, s in zip(origin, shape))
            ink_sum[box] = sums[tuple(slice(0, b.stop - b.start) for b in box)]
            ink_count[box] = counts[tuple(slice(0, b.stop - b.start) for b in box)]
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2560, help="rows of the segment (and columns unless --width)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--radius", type=float, default=1500.0)
    parser.add_argument("--band", type=float, default=4.0)
    parser.add_argument("--ink", type=float, default=0.07, help="fraction of the segment's pixels labeled ink")
    parser.add_argument("--inside", type=float, default=1.0, help="fraction of the rectangle that is segment (an ellipse)")
    parser.add_argument("--reference_rows", type=int, default=4)
    parser.add_argument("--box_rows", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2, help="runs of all_labels_to_hdf on the whole segment")
    args = parser.parse_args()
    width = args.width or args.size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shape = make_scene(root, args.size, width, args.radius, args.band, args.ink, args.inside)
        print(f"segment {args.size} x {width} pixels (rows x columns) on a cylinder of radius {args.radius:g}, volume {shape}, "
              f"band {args.band}, {args.ink:.0%} ink, {args.inside:.0%} of it segment")
        common = ["--ppm_dir", str(root / "paths"), "--labels_dir", str(root / "labels"), "--volume", str(root / "scan.h5"),
                  "--out_valid", str(root / "valid.h5"), "--valid_segments", "", "--band", str(args.band),
                  "--ink_back", str(args.band), "--ink_front", str(args.band), "--overwrite", "true"]

        # 1. rows in the middle, per-pixel loop and pipeline: identical output
        ppm_path = root / "paths" / SEGMENT / f"{SEGMENT}.ppm"
        full_ppm = ppm_path.read_bytes()
        first = (args.size - args.reference_rows) // 2
        per_pixel_reference(root, range(first, first + args.reference_rows), args.band, root / "reference.h5")
        partial = np.zeros_like(np.asarray(read_ppm(ppm_path).data))
        partial[first:first + args.reference_rows] = read_ppm(ppm_path).data[first:first + args.reference_rows]
        write_ppm(ppm_path, partial)
        all_labels_to_hdf.main(common + ["--out_train", str(root / "fast.h5")])
        touched = slice(int(4 + first - args.band - 2), int(4 + first + args.reference_rows + args.band + 2))  # the rows' bands
        with h5py.File(root / "reference.h5") as a, h5py.File(root / "fast.h5") as b:
            for name in (volume.INK_SUM, volume.INK_COUNT):
                assert np.array_equal(a[name][touched], b[name][touched]), f"{name} differs"
                assert not b[name][touched.stop:touched.stop + 16].any() and not b[name][touched.start - 16:touched.start].any()
        print(f"{args.reference_rows} rows: identical to the per-pixel loop")
        ppm_path.write_bytes(full_ppm)

        # 2. the original-style box fill on rows in the middle, its time per segment pixel scaled to the whole segment
        # (it skips the points outside the segment)
        first = (args.size - args.box_rows) // 2
        seconds = box_fill(root, range(first, first + args.box_rows), args.band, root / "box.h5")
        segment = valid_mask(np.asarray(read_ppm(ppm_path).data))
        per_pixel = seconds / max(int(segment[first:first + args.box_rows].sum()), 1)
        box_rate = args.size * width / (per_pixel * int(segment.sum()))
        print(f"box fill (the original's method), {args.box_rows} rows in the middle: {box_rate:,.0f} px/s of the whole rectangle")

        # 3. the whole segment, each run in its own process for its peak RSS; the scene written to disk first, so that
        # the system does not write it back during the measurement
        os.sync()
        for run in range(1, args.runs + 1):
            argv = common + ["--out_train", str(root / "full.h5")]
            figures = measure(f"all_labels_to_hdf.main({argv!r})", setup="import all_labels_to_hdf")
            rate = args.size * width / figures["seconds"]
            print(f"all_labels_to_hdf, whole segment, run {run}: {args.size * width:,} pixels in {figures['seconds']:.1f} s = "
                  f"{rate:,.0f} px/s, peak RSS {figures['peak_rss'] / 2**20:.0f} MB, CPU {figures['user']:.1f} s user + "
                  f"{figures['system']:.1f} s system; / box fill: {rate / box_rate:.1f}x")

if __name__ == "__main__":
    main()
