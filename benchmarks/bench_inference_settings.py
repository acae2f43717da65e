"""Speed against accuracy of inference.py's window settings: overlap, blending, test-time augmentation.

    python demo.py                                        # first: a trained model and the demo scroll
    python benchmarks/bench_inference_settings.py         # then: the table, on this machine's device

For each setting the demo's model predicts the whole demo scan; the table gives window passes per
voxel, output Mvoxel/s (the whole run: read, windows, blending, write) and two accuracies of the
result: the held-out segment's flattened F0.5 (the demo's last line) and the 3D voxel F0.5 against
the scroll's true ink. Macro-blocks are the demo's (2 patches), rounded up to whole strides.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flatten_3d  # noqa: E402
import inference  # noqa: E402
from ink3d import volume  # noqa: E402
from ink3d.metrics import best_fbeta, score_volume  # noqa: E402
from ink3d.sliding_window import FLIPS  # noqa: E402

AIR_LEVEL = 60  # the synthetic scroll's air, as demo.py scores it
SETTINGS = [  # (overlap, blend, tta); the first is the default
    (0.5, "gaussian", False), (0.5, "constant", False), (0.25, "gaussian", False), (0.25, "constant", False),
    (0.0, "constant", False), (0.0, "gaussian", False), (0.5, "gaussian", True),
]


def passes_per_voxel(overlap: float, patch: int, tta: bool) -> float:
    return (1 / (1 - overlap)) ** 3 * (len(FLIPS) if tta else 1)


def held_out_f05(demo: Path, flat: Path, segment_id: str) -> float:
    label = cv2.imread(str(demo / "scroll" / "labels" / f"{segment_id}_inklabels.png"), cv2.IMREAD_GRAYSCALE) > 127
    mask = cv2.imread(str(demo / "scroll" / "paths" / segment_id / f"{segment_id}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    prediction = cv2.imread(str(flat / f"{segment_id}_prediction.png"), cv2.IMREAD_GRAYSCALE)
    return best_fbeta(prediction[mask], label[mask])[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="the demo's output folder")
    parser.add_argument("--patch", type=int, default=64, help="the demo model's patch")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    demo = Path(args.demo)
    scan, checkpoint = demo / "scan.h5", demo / "train" / "best.pth"
    for path in (scan, checkpoint):
        if not path.exists():
            raise SystemExit(f"{path} not found: run python demo.py first")
    segment_id = json.loads((demo / "scroll" / "scroll.json").read_text())["valid_segments"][0]
    print(f"{'overlap':>7} {'blend':>9} {'TTA':>4} {'passes/voxel':>12} {'Mvoxel/s':>9} {'held-out F0.5':>13} {'3D F0.5':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for overlap, blend, tta in SETTINGS:
            out = tmp / "pred.h5"
            stride = int(args.patch * (1 - overlap))
            started = time.perf_counter()
            inference.main(["--volume", str(scan), "--checkpoint", str(checkpoint), "--out", str(out), "--patch", str(args.patch),
                            "--overlap", str(overlap), "--blend", blend, "--tta", str(tta), "--macro_block", str(stride * -(-2 * args.patch // stride)),
                            "--device", args.device, "--overwrite", "true"])
            seconds = time.perf_counter() - started
            flatten_3d.main(["--volume", str(out), "--ppm_dir", str(demo / "scroll" / "paths"), "--out_dir", str(tmp / "flat"),
                             "--segments", segment_id, "--overwrite", "true"])
            prediction_file, predictions = volume.open_dataset(out, volume.PREDICTIONS)
            truth_file, truth = volume.open_dataset(demo / "scroll" / "ground_truth.h5", volume.GROUND_TRUTH)
            scan_file, scan_values = volume.open_dataset(scan, volume.SCAN)
            with prediction_file, truth_file, scan_file:
                voxels = int(np.prod(predictions.shape))
                score = score_volume(predictions, truth, scan_values, AIR_LEVEL)
            print(f"{overlap:>7} {blend:>9} {'on' if tta else 'off':>4} {passes_per_voxel(overlap, args.patch, tta):>12.2f} "
                  f"{voxels / seconds / 1e6:>9.3f} {held_out_f05(demo, tmp / 'flat', segment_id):>13.3f} {score['f05']:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
