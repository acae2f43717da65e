"""inference.py vs MONAI's sliding_window_inference: voxels/s, same model, volume, overlap and blend.

    python benchmarks/bench_inference.py                        # CPU: small model, 128^3 volume, patch 64
    python benchmarks/bench_inference.py --scroll runs/demo/scan.h5 --pad 64   # also: speed-up from skipping air

MONAI gets the volume already in memory; inference.py reads it from HDF5 and writes its output,
so the comparison is end to end for inference.py. It also times the OME-Zarr output against the HDF5 one
(same settings, same process) and one worker process against two (`--parts 2`). With CUDA present it also runs the default
32-map model in bf16 (compiled) over 512^3 and 1024^3 volumes (patch 128, the default macro-block)
and prints voxels/s, TFLOP/s (0.482 MFLOP per window voxel run), the rate without fixed
costs (the difference of the two runs), and the GPU hours for Scroll 1 (8096 x 7888 x 14376 voxels)
at that rate.

    python -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_inference; bench_inference.gpu_only()"   # GPU part alone
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import inference  # noqa: E402
from ink3d import volume  # noqa: E402
from ink3d.sliding_window import plan_blocks  # noqa: E402
from models import UNet3D, save_checkpoint  # noqa: E402

MFLOP_PER_VOXEL = 0.482
SCROLL_1 = (14376, 7888, 8096)


def run_ours(scan: Path, checkpoint: Path, out: Path, *extra) -> float:
    started = time.perf_counter()
    inference.main(["--volume", str(scan), "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite", "true", *extra])
    return time.perf_counter() - started


def run_monai(values: np.ndarray, model, patch: int, overlap: float, batch: int, device) -> float:
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(values)[None, None].float().div(255).to(device)
    started = time.perf_counter()
    with torch.no_grad():
        sliding_window_inference(x, (patch,) * 3, batch, lambda w: torch.sigmoid(model(w)), overlap=overlap,
                                 mode="gaussian", sigma_scale=0.125)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def padded_scroll(path: Path, pad: int, out: Path) -> Path:
    """The scan with `pad` voxels of noisy air (like the synthetic scroll's: ~20 +- 13) around it in y and x."""
    if pad == 0:
        return path
    with h5py.File(path) as source:
        scan = source[volume.SCAN][:]
    air = np.random.default_rng(0).normal(20, 13, (scan.shape[0], scan.shape[1] + 2 * pad, scan.shape[2] + 2 * pad))
    padded = np.clip(air, 0, 255).astype(np.uint8)
    padded[:, pad:pad + scan.shape[1], pad:pad + scan.shape[2]] = scan
    with h5py.File(out, "w") as file:
        volume.create_volume(file, volume.SCAN, padded.shape, np.uint8)[:] = padded
    return out


def worker_processes(scan: Path, checkpoint: Path, tmp: Path, common: list[str]) -> tuple[float, float]:
    """Wall seconds to write an OME-Zarr store with one process (all threads), and with two worker processes at once."""
    argv = [sys.executable, str(ROOT / "inference.py"), "--volume", str(scan), "--checkpoint", str(checkpoint), *common]
    started = time.perf_counter()
    subprocess.run([*argv, "--out", str(tmp / "one.zarr")], check=True, capture_output=True)
    one = time.perf_counter() - started
    started = time.perf_counter()
    workers = [subprocess.Popen([*argv, "--out", str(tmp / "two.zarr"), "--parts", "2", "--part", str(part)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}) for part in (0, 1)]
    if any(worker.wait() for worker in workers):
        raise SystemExit("a worker process failed")
    return one, time.perf_counter() - started


def windows_run(shape, patch: int, stride: int, block: int) -> int:
    """How many windows inference.py runs over a whole volume of `shape`: a window that reaches into several macro-blocks
    is run once for each (the plan's windows per block are the product of those along each axis)."""
    total = 1
    for size in shape:
        axis = (slice(0, size),)
        total *= sum(len(b.windows) for b in plan_blocks(axis, axis, patch, stride, block))
    return total


def gpu_report(tmp: Path, sizes=(512, 1024), patch: int = 128, batch: int = 8, block: int = inference.MACRO_BLOCK) -> None:
    """The default model in bf16 (compiled, as inference.py runs it on CUDA) over random scans of two sizes. The
    difference between the two runs is the rate without the fixed costs (start-up, compilation), in window voxels
    per second, which gives the GPU hours of Scroll 1 from the windows its plan runs."""
    model = UNet3D().eval()
    checkpoint = tmp / "default.pth"
    save_checkpoint(checkpoint, model, model.args, {}, 0)
    common = ["--patch", str(patch), "--batch_size", str(batch), "--macro_block", str(block), "--device", "cuda",
              "--amp", "bf16", "--air_level", "none"]
    stride = patch // 2
    print(f"GPU {torch.cuda.get_device_name()}: default UNet (f_maps 32), bf16, compiled, patch {patch}, overlap 0.5, "
          f"batch {batch}, macro-block {block}, HDF5 in and out")
    runs = []
    for size in sizes:
        scan = tmp / f"gpu_scan_{size}.h5"
        if not scan.exists():
            values = np.random.default_rng(0).integers(1, 256, (size,) * 3, dtype=np.uint8)
            with h5py.File(scan, "w") as file:
                volume.create_volume(file, volume.SCAN, values.shape, np.uint8)[:] = values
            del values
        if not runs:  # the first compilation, out of every measurement
            run_ours(scan, checkpoint, tmp / "warm.h5", *common, "--roi", f"0:{patch},0:{patch},0:{patch}")
        seconds = run_ours(scan, checkpoint, tmp / "gpu_pred.h5", *common)
        window_voxels = windows_run((size,) * 3, patch, stride, block) * patch**3
        runs.append((window_voxels, seconds))
        print(f"  {size}^3: {seconds:.1f} s, {size**3 / seconds / 1e6:.2f} Mvoxel/s of output "
              f"({window_voxels / size**3:.2f} window voxels per voxel), "
              f"{window_voxels * MFLOP_PER_VOXEL * 1e6 / seconds / 1e12:.1f} TFLOP/s")
    (small_voxels, small_seconds), (large_voxels, large_seconds) = runs[0], runs[-1]
    rate = (large_voxels - small_voxels) / (large_seconds - small_seconds)
    scroll = windows_run(SCROLL_1, patch, stride, block) * patch**3
    print(f"  without the fixed costs ({sizes[-1]}^3 minus {sizes[0]}^3): {rate / 1e6:.1f} M window voxels/s, "
          f"{rate * MFLOP_PER_VOXEL * 1e6 / 1e12:.1f} TFLOP/s")
    print(f"  Scroll 1 ({SCROLL_1[0]} x {SCROLL_1[1]} x {SCROLL_1[2]}, {scroll / np.prod(SCROLL_1, dtype=np.float64):.2f} window "
          f"voxels per voxel): {scroll / rate / 3600:.1f} GPU hours at this rate, without skipping air")


def gpu_only() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        gpu_report(Path(tmp))
    print(subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv"], capture_output=True, text=True).stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--f_maps", type=int, default=8)
    parser.add_argument("--num_levels", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--scroll", default="", help="a scan volume (e.g. runs/demo/scan.h5) to measure skipping air on")
    parser.add_argument("--pad", type=int, default=0, help="surround the scroll with this much air in y and x, as in a real scan's bounding box")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UNet3D(f_maps=args.f_maps, num_levels=args.num_levels).eval()
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "model.pth"
        save_checkpoint(checkpoint, model, model.args, {}, 0)
        values = np.random.default_rng(0).integers(1, 256, (args.size,) * 3).astype(np.uint8)
        with h5py.File(tmp / "scan.h5", "w") as file:
            volume.create_volume(file, volume.SCAN, values.shape, np.uint8)[:] = values
        common = ["--patch", str(args.patch), "--batch_size", str(args.batch_size), "--device", "cpu", "--air_level", "none"]
        monai_seconds = run_monai(values, model, args.patch, 0.5, args.batch_size, cpu)
        ours_seconds = run_ours(tmp / "scan.h5", checkpoint, tmp / "pred.h5", *common)
        plain_seconds = run_ours(tmp / "scan.h5", checkpoint, tmp / "pred.h5", *common, "--channels_last", "false")
        store_seconds = run_ours(tmp / "scan.h5", checkpoint, tmp / "pred.zarr", *common)
        one_worker, two_workers = worker_processes(tmp / "scan.h5", checkpoint, tmp, common)
        voxels = args.size**3
        print(f"CPU ({torch.get_num_threads()} threads), UNet f_maps={args.f_maps} num_levels={args.num_levels}, "
              f"volume {args.size}^3, patch {args.patch}, overlap 0.5, gaussian, batch {args.batch_size}")
        print(f"  MONAI sliding_window_inference (in memory): {voxels / monai_seconds / 1e3:.0f} kvoxel/s")
        print(f"  inference.py (HDF5 in and out):             {voxels / ours_seconds / 1e3:.0f} kvoxel/s, "
              f"ratio {monai_seconds / ours_seconds:.2f}")
        print(f"  inference.py --channels_last false:         {voxels / plain_seconds / 1e3:.0f} kvoxel/s, "
              f"ratio {monai_seconds / plain_seconds:.2f}")
        print(f"  inference.py --out X.zarr (OME-Zarr store): {voxels / store_seconds / 1e3:.0f} kvoxel/s, "
              f"{store_seconds / ours_seconds:.3f}x the HDF5 output's time")
        print(f"  OME-Zarr store by worker processes (wall, with start-up): 1 process {one_worker:.1f} s, "
              f"2 processes (--parts 2, one thread each) {two_workers:.1f} s: {one_worker / two_workers:.2f}x")
        if args.scroll:
            scroll = padded_scroll(Path(args.scroll), args.pad, tmp / "padded.h5")
            common = ["--patch", str(args.patch), "--batch_size", str(args.batch_size), "--device", "cpu"]
            every = run_ours(scroll, checkpoint, tmp / "scroll.h5", *common, "--air_level", "none")
            skipping = run_ours(scroll, checkpoint, tmp / "scroll.h5", *common, "--air_level", "100")
            print(f"  {args.scroll} with {args.pad} voxels of air around it in y and x: all windows {every:.1f} s, "
                  f"skipping air (--air_level 100) {skipping:.1f} s, speed-up {every / skipping:.2f}x")
        if torch.cuda.is_available():
            gpu_report(tmp)
        else:
            print("no CUDA device: GPU figures skipped")


if __name__ == "__main__":
    main()
