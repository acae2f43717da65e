"""Run every stage of the pipeline on the synthetic scroll, through each stage's own `main`.

    python demo.py                 # reuses finished stages
    python demo.py --fresh true    # starts over

Writes everything under `runs/demo/`.
"""

import time
from pathlib import Path

import make_synthetic_scroll
import volume_to_hdf
from ink3d.config import parse_config, run_main

# --- config ---
OUT_DIR = "runs/demo"  # where every output of the demo goes
FRESH = False  # redo every stage even where its output exists
SEED = 0  # seed of the synthetic scroll


def run_stage(name: str, output: Path, fresh: bool, stage, argv: list[str], timings: list):
    """Run one stage unless its output already exists (and `fresh` is off)."""
    started = time.perf_counter()
    if fresh or not output.exists():
        stage(argv)
        timings.append((name, time.perf_counter() - started, output))
    else:
        timings.append((name, 0.0, output))


def main(argv=None):
    config = parse_config(globals(), argv)
    out = Path(config.out_dir)
    scroll = out / "scroll"
    scan = out / "scan.h5"
    fresh = ["--overwrite", "true"] if config.fresh else []
    timings = []
    run_stage("make_synthetic_scroll", scroll / "scroll.json", config.fresh, make_synthetic_scroll.main,
              ["--out_dir", str(scroll), "--seed", str(config.seed), *fresh], timings)
    run_stage("volume_to_hdf", scan, config.fresh, volume_to_hdf.main,
              ["--tiff_dir", str(scroll / "volume"), "--out", str(scan), *fresh], timings)
    print(f"\n{'stage':<24} {'seconds':>8}  output")
    for name, seconds, output in timings:
        print(f"{name:<24} {seconds:>8.1f}  {output}" + ("" if seconds else "  (reused)"))
    return timings


if __name__ == "__main__":
    run_main(main)
