"""Forward speed of models.UNet3D vs pytorch3dunet's UNet3D, same weights, same process.

    python benchmarks/bench_unet.py                       # CPU: 64^3 and 128^3, default 32-map model
    python benchmarks/bench_unet.py --sizes 64 --repeats 3

With CUDA present it also measures fp32 / bf16 / bf16 + channels_last_3d / bf16 + compile, and
the achieved TFLOP/s from 0.482 MFLOP per voxel (the default config, torch's FLOP counter).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import UNet3D  # noqa: E402
from ink3d.device import autocast, prepare_model  # noqa: E402

MFLOP_PER_VOXEL = 0.482


def voxels_per_second(model, x, repeats, device, dtype=None) -> float:
    with torch.no_grad(), autocast(device, dtype):
        model(x)  # warm-up (and compilation)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return repeats * x[:, 0].numel() / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--f_maps", type=int, default=32)
    parser.add_argument("--num_levels", type=int, default=5)
    args = parser.parse_args()
    from pytorch3dunet.unet3d.model import UNet3D as ReferenceUNet3D

    torch.manual_seed(0)
    ours = UNet3D(f_maps=args.f_maps, num_levels=args.num_levels).eval()
    reference = ReferenceUNet3D(1, 1, f_maps=args.f_maps, num_levels=args.num_levels, num_groups=4, is_segmentation=False).eval()
    reference.load_state_dict(ours.state_dict())
    cpu = torch.device("cpu")
    print(f"CPU ({torch.get_num_threads()} threads), f_maps={args.f_maps}, num_levels={args.num_levels}")
    for size in map(int, args.sizes.split(",")):
        x = torch.rand(1, 1, size, size, size)
        theirs = voxels_per_second(reference, x, args.repeats, cpu)
        mine = voxels_per_second(ours, x, args.repeats, cpu)
        print(f"  {size}^3: ours {mine / 1e3:.0f} kvoxel/s, pytorch3dunet {theirs / 1e3:.0f} kvoxel/s, ratio {mine / theirs:.2f}")

    if not torch.cuda.is_available():
        print("no CUDA device: GPU figures skipped")
        return
    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name()}")
    x = torch.rand(4, 1, 128, 128, 128, device=device)
    variants = [
        ("fp32", dict(), None),
        ("bf16", dict(), torch.bfloat16),
        ("bf16 channels_last_3d", dict(channels_last=True), torch.bfloat16),
        ("bf16 channels_last_3d compiled", dict(channels_last=True, compile=True), torch.bfloat16),
    ]
    for name, options, dtype in variants:
        model = prepare_model(UNet3D(f_maps=args.f_maps, num_levels=args.num_levels).eval(), device, **options)
        batch = x.contiguous(memory_format=torch.channels_last_3d) if options.get("channels_last") else x
        rate = voxels_per_second(model, batch, max(args.repeats, 5), device, dtype)
        print(f"  batch 4 x 128^3 {name:<32} {rate / 1e6:8.2f} Mvoxel/s  {rate * MFLOP_PER_VOXEL / 1e6:7.1f} TFLOP/s")


if __name__ == "__main__":
    main()
