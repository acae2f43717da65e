"""Block-wise connected components (ink3d.components) vs cc3d on the whole array: time and peak memory.

    python benchmarks/bench_components.py                 # 512^3 volume, blocks of 128
    python benchmarks/bench_components.py --size 256 --block 64

Each method runs in its own process on the same HDF5 volume and reports its own peak RSS;
the blob counts and sizes must agree.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ink3d import volume  # noqa: E402

BLOCKWISE = """
import resource, sys, h5py, numpy as np
sys.path.insert(0, {root!r})
from ink3d import volume
from ink3d.components import label_blocks
with h5py.File({path!r}) as f, h5py.File({scratch!r}, "w") as scratch:
    blobs = label_blocks(f[volume.PREDICTIONS], 127.5, {block}, scratch)
print(len(blobs), int(blobs.voxels.sum()), int(blobs.voxels.max()))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
WHOLE = """
import resource, sys, h5py, numpy as np, cc3d
sys.path.insert(0, {root!r})
from ink3d import volume
with h5py.File({path!r}) as f:
    labels, n = cc3d.connected_components(f[volume.PREDICTIONS][:] >= 127.5, connectivity=26, return_N=True)
sizes = np.bincount(labels.ravel())[1:]
print(n, int(sizes.sum()), int(sizes.max()))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run(code: str) -> tuple[float, str, float]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split("\n")
    return time.perf_counter() - started, out[0], int(out[1]) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pred.h5"
        rng = np.random.default_rng(0)
        with h5py.File(path, "w") as file:
            dataset = volume.create_volume(file, volume.PREDICTIONS, (args.size,) * 3, np.uint8)
            for z in range(0, args.size, 128):
                slab = ndimage.gaussian_filter(rng.standard_normal((min(128, args.size - z), args.size, args.size)).astype(np.float32), 2)
                dataset[z:z + 128] = np.clip(128 + slab * 900, 0, 255).astype(np.uint8)
        code = dict(root=str(ROOT), path=str(path), scratch=str(Path(tmp) / "scratch.h5"), block=args.block)
        whole_seconds, whole_result, whole_rss = run(WHOLE.format(**code))
        block_seconds, block_result, block_rss = run(BLOCKWISE.format(**code))
        print(f"volume {args.size}^3 uint8, threshold 0.5; blobs, voxels, largest: whole {whole_result} | blockwise {block_result}")
        assert whole_result == block_result, "block-wise labeling disagrees with cc3d on the whole array"
        print(f"cc3d on the whole array: {whole_seconds:.1f} s, peak RSS {whole_rss:.0f} MB")
        print(f"block-wise ({args.block}^3 blocks): {block_seconds:.1f} s, peak RSS {block_rss:.0f} MB")


if __name__ == "__main__":
    main()
