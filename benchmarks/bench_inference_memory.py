"""inference.py's memory on the CPU against the model's own: peak RSS, page faults, time in the kernel.

    python benchmarks/bench_inference_memory.py                       # f_maps 8, 3 levels, patch 128, batch 4, 256^3
    python benchmarks/bench_inference_memory.py --size 512            # one default macro-block of 512
    python benchmarks/bench_inference_memory.py --size 640            # eight blocks, the first with halos on three faces

Each measurement runs in a process of its own (its peak RSS is its own, VmHWM); imports, the model and the batch
are set up before the measured part, so its times are the work's own:
1. the reference: the model loaded as inference.py loads it (channels-last, its CPU default) and one forward
   pass of a batch under `torch.inference_mode`, nothing else;
2. the same forward with freed memory kept in the heap, as inference.py sets glibc (`ink3d.memory`) from its second batch on;
3. inference.py over a `--size`^3 random scan (every window run: --air_level none), HDF5 in and out.
The ratio of the peak RSS of 3 to that of 1 is what inference adds to the model's own needs (its input and
output buffers, the blending, the reader and writer, and the heap's holes); against 2 it leaves out what the
heap's layout of one forward costs. Minor page faults and the kernel's share of CPU time show memory handed back
to the system and taken again; a process that keeps freed memory pays at least the first touch of its heap (the
second measurement's kernel time).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ink3d import volume  # noqa: E402
from measure import measure  # noqa: E402
from models import UNet3D, save_checkpoint  # noqa: E402

MODEL = """
import torch
from models import load_model
from ink3d.device import prepare_model
model = prepare_model(load_model({checkpoint!r}), torch.device("cpu"), channels_last=True)  # inference.py's CPU default
batch = torch.rand({batch}, 1, {patch}, {patch}, {patch}).contiguous(memory_format=torch.channels_last_3d)
"""
KEEP_FREED_MEMORY = """
from ink3d.memory import reuse_freed_memory
reuse_freed_memory()
"""
FORWARD = """
with torch.inference_mode():
    model(batch)
"""
INFERENCE = """
inference.main({argv!r})
"""


def describe(name: str, figures: dict) -> str:
    cpu = figures["user"] + figures["system"]
    return (f"  {name}: peak RSS {figures['peak_rss'] / 2**20:,.0f} MB, {figures['seconds']:.1f} s, {figures['minor_faults']:,} minor "
            f"page faults, kernel {figures['system']:.1f} s of {cpu:.1f} s CPU ({figures['system'] / max(cpu, 1e-9):.1%})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--f_maps", type=int, default=8)
    parser.add_argument("--num_levels", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--macro_block", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = UNet3D(f_maps=args.f_maps, num_levels=args.num_levels)
        save_checkpoint(tmp / "model.pth", model, model.args, {}, 0)
        values = np.random.default_rng(0).integers(1, 256, (args.size,) * 3).astype(np.uint8)
        with h5py.File(tmp / "scan.h5", "w") as file:
            volume.create_volume(file, volume.SCAN, values.shape, np.uint8)[:] = values
        model_setup = MODEL.format(checkpoint=str(tmp / "model.pth"), batch=args.batch_size, patch=args.patch)
        forward = measure(FORWARD, setup=model_setup)
        forward_kept = measure(FORWARD, setup=model_setup + KEEP_FREED_MEMORY)
        argv = ["--volume", str(tmp / "scan.h5"), "--checkpoint", str(tmp / "model.pth"), "--out", str(tmp / "pred.h5"),
                "--patch", str(args.patch), "--batch_size", str(args.batch_size), "--macro_block", str(args.macro_block),
                "--device", "cpu", "--air_level", "none"]
        run = measure(INFERENCE.format(argv=argv), setup="import inference")
        print(f"CPU ({torch.get_num_threads()} threads), UNet f_maps={args.f_maps} num_levels={args.num_levels}, patch {args.patch}, "
              f"batch {args.batch_size}, scan {args.size}^3, macro-block {args.macro_block}")
        print(describe("one forward pass alone (the reference)  ", forward))
        print(describe("the same, freed memory kept in the heap ", forward_kept))
        print(describe("inference.py, whole scan                ", run))
        print(f"  peak RSS of inference / the forward's own: {run['peak_rss'] / forward['peak_rss']:.2f}x; "
              f"/ the forward's on the heap as inference keeps it: {run['peak_rss'] / forward_kept['peak_rss']:.2f}x")
        cpu = run["user"] + run["system"]
        print(f"  kernel time of inference: {run['system'] / cpu:.1%} of its CPU time; the first touch of the heap of one forward "
              f"(the second measurement's kernel time) would be {forward_kept['system'] / cpu:.1%} of it")

if __name__ == "__main__":
    main()
