"""Training loader speed, and seconds per optimisation step on the CPU.

    python benchmarks/bench_loader.py --volume runs/demo/scan.h5 --labels runs/demo/labels_train.h5 \\
        --coords runs/demo/coords_train.npy

Samples/s of ink3d.dataset.ScrollSamples with 1 and 2 DataLoader workers (HDF5 files opened once
per worker) against the naive pattern of opening both HDF5 files for every sample, same
samples, same run, and one worker keeping the memory its samples free (train.py's
`worker_init_fn`) against one with the allocator's defaults. Then the full augmentation two ways, samples/s with one loader worker: in the
loader (volumentations-3D) against raw crops resampled a batch at a time with torch
(ink3d.augment, `train.py --augment device`), here on the CPU; with CUDA present, on the GPU too.
Then the `exact` augmentation's warp of a batch on the CPU: views of the crops (ink3d.augment.warp, train.py's)
against grid sampling (ink3d.augment.grid_warp), same maps. Then train.py's own step (train.train_step, learned depth) on the CPU for the demo's model (f_maps 8,
4 levels, patch 64) and the default model (f_maps 32, 5 levels, patch 128), contiguous against
channels_last_3d, same run. With CUDA present, train.py's own
step (train.train_step: bf16, channels_last_3d, fused AdamW, EMA) for the default model at patch 128
and batch 4 on random data, eager and compiled, with the fixed ink range and with the learned depth
(8192 columns per sample): ms per step, samples/s, the hours of a 20,000-step run and the GPU's peak
memory.
"""

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from ink3d.augment import draw_affine, grid_warp, warp  # noqa: E402
from ink3d.columns import FIELDS  # noqa: E402
from ink3d.dataset import BACKGROUND, ScrollSamples, loader_worker_init  # noqa: E402
from models import UNet3D  # noqa: E402
from models.ema import EMA  # noqa: E402
from ink3d.device import prepare_model  # noqa: E402


class OpenPerSample(ScrollSamples):
    """The naive pattern: both HDF5 files opened (and closed) for every sample."""

    def __getitem__(self, index):
        self._pid = None
        try:
            return super().__getitem__(index)
        finally:
            for file in self._files:
                file.close()


def samples_per_second(dataset, workers: int, batch: int = 2, device: torch.device | None = None, worker_init_fn=None) -> float:
    """Samples/s through a DataLoader; with `device`, raw crops are resampled there a batch at a time."""
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=False, worker_init_fn=worker_init_fn)
    started = time.perf_counter()
    count = 0
    for images, labels, _, *transforms in loader:
        if device is not None:
            matrices, offsets, scales = (t.to(device) for t in transforms)
            images, _ = warp(dataset.normalization(images.to(device)), labels.to(device), matrices, offsets, dataset.patch)
            images = (images * scales.view(-1, 1, 1, 1, 1)).cpu()
        count += len(images)
    return count / (time.perf_counter() - started)


def random_batch(batch: int, patch: int, band: float, columns: int, device: torch.device):
    """Images, voxel labels (a labeled slab, air as background, the rest unlabeled) and columns (points inside the
    patch, unit normals, half ink, half with a face window) as train.py's loader hands them over."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, patch, patch, patch, generator=generator)
    labels = torch.full_like(images, -1.0)
    middle = slice(patch // 2 - 8, patch // 2 + 8)
    labels[:, :, middle] = (torch.rand(labels[:, :, middle].shape, generator=generator) > 0.9).float()
    labels[:, :, : patch // 8] = BACKGROUND
    rows = torch.full((batch, columns, FIELDS), float("nan"))
    rows[..., :3] = band + torch.rand(batch, columns, 3, generator=generator) * (patch - 1 - 2 * band)
    normals = torch.randn(batch, columns, 3, generator=generator)
    rows[..., 3:6] = normals / normals.norm(dim=-1, keepdim=True)
    rows[..., 6] = (torch.rand(batch, columns, generator=generator) > 0.5).float()
    rows[:, ::2, 7:9] = torch.tensor([-1.0, 2.0])
    matrices, shifts = torch.eye(3).repeat(batch, 1, 1), torch.zeros(batch, 3)
    return [t.to(device) for t in (images, labels, rows, matrices, shifts)]


def step_of(device: torch.device, f_maps: int, num_levels: int, batch: int, patch: int, band: float, channels_last: bool,
            learned: bool, dtype: torch.dtype | None = None, compiled: bool = False):
    """train.py's own step (train.train_step: fused AdamW, EMA) on random data, as a call without arguments."""
    config = SimpleNamespace(dice_weight=train.DICE_WEIGHT, background_weight=train.BACKGROUND_WEIGHT,
                             label_smoothing=train.LABEL_SMOOTHING, column_weight=train.COLUMN_WEIGHT,
                             pool_sharpness=train.POOL_SHARPNESS, grad_clip=train.GRAD_CLIP)
    images, labels, columns, matrices, shifts = random_batch(batch, patch, band, train.MAX_COLUMNS, device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last_3d)
    torch.manual_seed(0)
    model = prepare_model(UNet3D(f_maps=f_maps, num_levels=num_levels), device, channels_last=channels_last)
    ema = EMA(model, train.EMA_DECAY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.LR, weight_decay=train.WEIGHT_DECAY, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    if compiled:
        model = torch.compile(model)
    return partial(train.train_step, model, optimizer, scaler, ema, images, labels, columns if learned else None, matrices,
                   shifts, config, band, dtype, 1)


def exact_warps(batch: int = 2, patch: int = 64, repeats: int = 20) -> None:
    """ms per batch of the exact augmentation's warp on the CPU: views against grid sampling, the same maps."""
    rng = np.random.default_rng(0)
    crop = patch * 3 // 2
    images, labels = torch.rand(batch, 1, crop, crop, crop), torch.rand(batch, 1, crop, crop, crop)
    maps = [[torch.from_numpy(np.stack(part)) for part in zip(*(draw_affine(rng, crop, patch, "exact") for _ in range(batch)))]
            for _ in range(repeats)]
    seconds = {}
    for name, method in (("views", warp), ("grid sampling", grid_warp)):
        started = time.perf_counter()
        for matrices, offsets in maps:
            method(images, labels, matrices, offsets, patch, "nearest")
        seconds[name] = (time.perf_counter() - started) / repeats
    print(f"exact augmentation's warp, batch {batch}, crop {crop} -> patch {patch}, CPU: views {seconds['views'] * 1e3:.1f} ms, "
          f"grid sampling {seconds['grid sampling'] * 1e3:.1f} ms ({seconds['grid sampling'] / seconds['views']:.1f}x)")


def cpu_steps(band: float = 10.0) -> None:
    """train.train_step's seconds on the CPU (learned depth), contiguous against channels_last_3d (train.py's default)."""
    for name, f_maps, levels, patch, batch, steps in (("demo", 8, 4, 64, 2, 8), ("default", 32, 5, 128, 1, 2)):
        seconds = {}
        for channels_last in (False, True):
            step = step_of(torch.device("cpu"), f_maps, levels, batch, patch, band, channels_last, learned=True)
            step()  # warm-up
            started = time.perf_counter()
            for _ in range(steps):
                step()
            seconds[channels_last] = (time.perf_counter() - started) / steps
        print(f"CPU train.train_step, {name} model (f_maps {f_maps}, {levels} levels, patch {patch}, batch {batch}, learned "
              f"depth): contiguous {seconds[False]:.2f} s/step, channels_last_3d {seconds[True]:.2f} s/step "
              f"({seconds[False] / seconds[True]:.2f}x)")


def gpu_steps(batch: int = 4, patch: int = 128, band: float = 10.0, steps: int = 10, channels_last: bool = True,
              eager: bool = True) -> None:
    """train.train_step's time on the GPU for the default model, eager and compiled, fixed range and learned depth."""
    device = torch.device("cuda")
    print(f"GPU {torch.cuda.get_device_name()}: train.train_step, default model (f_maps 32, 5 levels), patch {patch}, "
          f"batch {batch}, bf16, {'channels_last_3d' if channels_last else 'contiguous'}, fused AdamW, EMA")
    for compiled in (False, True) if eager else (True,):
        for name, learned in (("fixed range", False), ("learned depth", True)):
            step = step_of(device, 32, 5, batch, patch, band, channels_last, learned, torch.bfloat16, compiled)
            started = time.perf_counter()
            for _ in range(3):  # warm-up (and compilation)
                step()
            torch.cuda.synchronize()
            warm_up = time.perf_counter() - started
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            for _ in range(steps):
                result = step()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / steps
            loss = result[0].item()
            print(f"  {'compiled' if compiled else 'eager':<8} {name:<13} {seconds * 1e3:7.1f} ms/step, "
                  f"{batch / seconds:6.1f} samples/s, 20,000 steps in {20000 * seconds / 3600:.2f} h; "
                  f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; warm-up {warm_up:.0f} s; loss {loss:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", default="runs/demo/scan.h5")
    parser.add_argument("--labels", default="runs/demo/labels_train.h5")
    parser.add_argument("--coords", default="runs/demo/coords_train.npy")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=48)
    args = parser.parse_args()
    origins = np.load(args.coords)
    common = dict(patch=args.patch, length=args.samples, train=True, block=args.patch, seed=0, min_labeled=64)
    naive = samples_per_second(OpenPerSample(args.volume, args.labels, origins, **common), workers=0)
    print(f"loader, patch {args.patch} (1.5x crop, augmented), {args.samples} samples:")
    print(f"  open HDF5 per sample, in process: {naive:.2f} samples/s")
    for workers in (0, 1, 2):
        rate = samples_per_second(ScrollSamples(args.volume, args.labels, origins, **common), workers)
        print(f"  ScrollSamples, {workers} worker(s):     {rate:.2f} samples/s ({rate / naive:.2f}x)")
    kept = {}
    for init in (None, loader_worker_init, None, loader_worker_init):
        rate = samples_per_second(ScrollSamples(args.volume, args.labels, origins, **common), 1, worker_init_fn=init)
        kept.setdefault(init, []).append(rate)
    default, keeping = (max(kept[init]) for init in (None, loader_worker_init))
    print(f"  1 worker keeping the memory its samples free (train.py's): {keeping:.2f} samples/s against {default:.2f} "
          f"({keeping / default:.2f}x; best of two each)")
    print(f"full augmentation, patch {args.patch}, 1 loader worker, batch 4:")
    in_loader = samples_per_second(ScrollSamples(args.volume, args.labels, origins, **common), 1, batch=4)
    print(f"  volumentations-3D in the loader: {in_loader:.2f} samples/s")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        rate = samples_per_second(ScrollSamples(args.volume, args.labels, origins, **common, on_device=True), 1, batch=4,
                                  device=torch.device(device))
        print(f"  torch on the {device}, a batch at a time: {rate:.2f} samples/s ({rate / in_loader:.2f}x)")
    exact_warps()
    cpu_steps()
    if torch.cuda.is_available():
        gpu_steps()
    else:
        print("no CUDA device: GPU steps skipped")


if __name__ == "__main__":
    main()
