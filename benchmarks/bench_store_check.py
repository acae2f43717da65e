"""What checking a finished prediction store's chunks against its manifest costs a reader.

    python benchmarks/bench_store_check.py [--size 384] [--repeats 3]

A prediction store (OME-Zarr, 128^3 chunks, blosc-zstd bitshuffle as inference writes it) of smooth random
predictions, half of them 0 (chunks not written), is finished (its manifest written), then read whole in
64^3 boxes through the chunk cache, as flatten_3d reads, and through zarr without a cache, as export_slices reads:
with the manifest checked and with the check off, in the same process, fresh cache each time; the best of
`--repeats`. Prints the seconds and the ratio.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ink3d import blocks, volume  # noqa: E402
from ink3d.prediction_store import PredictionStore  # noqa: E402


def read_whole(path: Path, cache_mb: int, checked: bool) -> float:
    _, predictions = volume.open_dataset(path, volume.PREDICTIONS, cache_bytes=cache_mb << 20)
    if not checked:
        predictions._manifest = None
    started = time.perf_counter()
    for box in blocks.iter_blocks(predictions.shape, 64):
        volume.read_crop(predictions, [b.start for b in box], [b.stop - b.start for b in box])
    return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    shape = (args.size,) * 3
    rng = np.random.default_rng(0)
    values = ndimage.gaussian_filter(rng.random(shape, np.float32), 2)
    values = np.clip((values - values.mean()) / values.std() * 80, 0, 255).astype(np.uint8)  # ink-like blobs, 0 between
    values[:, :, : args.size // 2] = 0  # air: chunks never written
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pred.zarr"
        store = PredictionStore.open(path, shape, {"benchmark": True}, 128, [1.0, 1.0, 1.0], "", overwrite=False)
        store.level0[...] = values
        store.finalize()
        print(f"store {shape}, {sum(1 for p in (path / '0').rglob('*') if p.is_file() and not p.name.startswith('.'))} chunk files")
        for name, cache_mb in (("chunk cache (flatten_3d)", 512), ("zarr, no cache (export_slices)", 0)):
            plain = min(read_whole(path, cache_mb, checked=False) for _ in range(args.repeats))
            checked = min(read_whole(path, cache_mb, checked=True) for _ in range(args.repeats))
            print(f"{name}: unchecked {plain:.3f} s, checked {checked:.3f} s, ratio {checked / plain:.3f}")


if __name__ == "__main__":
    main()
