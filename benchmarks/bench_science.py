"""The pipeline over a family of synthetic scrolls: does the 3D result hold where the ink is not where the labels say?

    python benchmarks/bench_science.py                                   # every variant, learned depth
    python benchmarks/bench_science.py --variants default,thick --ink_depth learned,fixed --jobs 2

Each variant is one `demo.py` run (default settings, the variant's make_synthetic_scroll flags) into
`<out_root>/<variant>_<ink_depth>/`; a finished run is reused, so the table can be printed again for
free. One row per run: the 3D voxel F0.5 and AUC of the prediction against the scroll's true ink
beside the scan's own, the prediction's median in air, papyrus and ink, the held-out segment's
flattened F0.5, the depth along the normal where the predicted ink peaks on the held-out segment
against where the scroll's ink lies, and the run's minutes. `--jobs 2` runs two demos at once, one
torch thread each.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "default": [],
    "thick": ["--ink_thickness", "5", "--surface_offset", "0.5"],  # ink 5 voxels thick, segments 0.5 above the face
    "jitter": ["--surface_jitter", "2"],  # segments drift up to 2 voxels along their normals
    "ct_like": ["--ct_like", "true"],  # a real scan's histogram: air 0.16, papyrus 0.47, overlapping tails
    "pitch14": ["--pitch", "14"],  # sheets 2-4 voxels apart
    "flipped": ["--flip_normals", "20231012184421"],  # one training segment of three: its normals point into the sheet
    "touching": ["--ct_like", "true", "--touching", "true"],  # turns pressed together, as on a real scroll block
}


def run(out_dir: Path, flags: list[str], ink_depth: str, seed: int, threads: int | None) -> tuple[dict, float]:
    """One demo run (reused where finished); its results.json and wall minutes."""
    environment = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    started = time.perf_counter()
    with open(out_dir.parent / f"{out_dir.name}.log", "w") as log:
        subprocess.run([sys.executable, "demo.py", "--out_dir", str(out_dir), "--seed", str(seed), "--ink_depth", ink_depth, *flags],
                       cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads((out_dir / "results.json").read_text()), (time.perf_counter() - started) / 60


def row(name: str, ink_depth: str, results: dict, minutes: float) -> str:
    score, depth = results["score_3d"], results["depth"]
    recovered = f"{depth['median']:+.2f}" if depth["pixels"] else "none"
    ran = sum(results["stage_seconds"].values()) / 60
    return (f"| {name} | {ink_depth} | {score['f05']:.3f} | {score['scan_f05']:.3f} | {score['auc']:.3f} | {score['scan_auc']:.3f} | "
            f"{score['air_median']:.2f} / {score['papyrus_median']:.2f} / {score['ink_median']:.2f} | {results['held_out_f05']:.3f} | "
            f"{recovered} / {results['true_depth']:+.2f} | {ran:.1f} ({minutes:.1f}) |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--ink_depth", default="learned", help="comma-separated: learned, fixed")
    parser.add_argument("--out_root", default="runs/science")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="demo runs at once (each with one torch thread when > 1)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    depths = [depth.strip() for depth in args.ink_depth.split(",") if depth.strip()]
    out_root = (ROOT / args.out_root) if not Path(args.out_root).is_absolute() else Path(args.out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    plan = [(name, depth) for name in names for depth in depths]
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        outcomes = list(pool.map(lambda item: run(out_root / f"{item[0]}_{item[1]}", VARIANTS[item[0]], item[1], args.seed, threads), plan))
    print(f"seed {args.seed}; runs in {out_root}")
    print("| variant | ink depth | 3D F0.5 | scan F0.5 | 3D AUC | scan AUC | median p air / papyrus / ink | held-out flattened F0.5 | "
          "ink depth found / true (held-out) | minutes (this call) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (name, depth), (results, minutes) in zip(plan, outcomes):
        print(row(name, depth, results, minutes))


if __name__ == "__main__":
    main()
