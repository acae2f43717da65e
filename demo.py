"""Run the whole pipeline on the synthetic scroll, each stage through its own `main`.

    python demo.py                 # 9-25 minutes on 2 CPU cores (the model's training dominates); uses CUDA when present
    python demo.py --fresh true    # redo every stage
    python demo.py --volume_form ome-zarr --segment_form tifxyz --out_dir runs/demo_zarr   # today's published forms
    python demo.py --ink_thickness 5 --surface_offset 0.5 --out_dir runs/demo_thick      # a harder scroll of the family

make_synthetic_scroll -> volume_to_hdf -> all_labels_to_hdf (validation segment held out) ->
pred_find_coords -> train (a small UNet) -> inference -> score_3d (every voxel, and the held-out
segment's region, against the scroll's true ink) -> flatten_3d (held-out segment) ->
connected_components_explore, all into `runs/demo/`. Finished stages are reused on a re-run
(an interrupted training or inference is resumed). The run ends with a table of stage times, the
3D score and the share of true ink in the largest blobs, and, as its last line, the F0.5 of the
flattened prediction on the held-out segment against its ink labels, beside the best global
threshold on the flattened scan. `runs/demo/summary.png` shows flattened scan | ink label |
flattened prediction, and the largest 3D ink blob. With `--volume_form ome-zarr` every stage reads
the scroll's OME-Zarr volume directly (no HDF5 copy); with `--segment_form tifxyz` the segments
are tifxyz grids instead of `.ppm` files. The synthetic scroll's variant flags (`--ink_thickness`,
`--surface_offset`, `--surface_jitter`, `--pitch`, `--flip_normals`, `--ct_like`, `--touching`) pass through to
make_synthetic_scroll; `--ink_depth fixed` trains on a fixed ink range around the segment surface
(`--ink_back`, `--ink_front`) instead of learning the ink's depth. Every figure of the run is also
written to `runs/demo/results.json`.
"""

import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

import csv
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np

import all_labels_to_hdf
import connected_components_explore
import flatten_3d
import inference
import make_synthetic_scroll
import pred_find_coords
import score_3d
import train
import volume_to_hdf
from ink3d import InputError, volume
from ink3d.config import parse_config, run_main
from ink3d.files import output_lock, partial_path, write_image
from ink3d.prediction_store import is_complete, is_store
from ink3d.metrics import best_fbeta

# --- config ---
OUT_DIR = "runs/demo"  # where every output of the demo goes
FRESH = False  # redo every stage even where its output exists
SEED = 0  # seed of the synthetic scroll and of training
DEPTH = 160  # slices of the synthetic scroll
PATCH = 64  # training patch; inference runs windows twice its edge (more context per voxel, fewer window edges;
# on the demo's scroll half the model passes of windows of the training patch)
F_MAPS = 8  # UNet feature maps (a model sized for the CPU)
NUM_LEVELS = 4  # UNet levels
MAX_STEPS = 750  # training steps
AUGMENTATION = "exact"  # training augmentation (train.py --augmentation): exact keeps the texture that tells ink from loose fibres
BATCH_SIZE = 2  # training batch
TTA = True  # inference averages the 8 flips of each window (inference.py --tta: 8x its compute; sharper letter edges)
DEVICE = "auto"  # auto (cuda if present) or cpu
SUMMARY_COPY = ""  # also copy summary.png here (e.g. docs/summary.png)
VOLUME_FORM = "tiff"  # tiff: the TIFF slices converted by volume_to_hdf; ome-zarr: the scroll's OME-Zarr read by every stage
PREDICTION_FORM = "hdf5"  # hdf5: predictions.h5; ome-zarr: predictions.zarr, an OME-Zarr store (as viewers open it) read by every later stage
SEGMENT_FORM = "ppm"  # ppm, or tifxyz: segments as tifxyz grids of one vertex per 4 pixels, interpolated
INK_THICKNESS = 3.0  # synthetic scroll: voxels of the ink layer
SURFACE_OFFSET = 1.5  # synthetic scroll: the segments' height above the papyrus face
SURFACE_JITTER = 0.0  # synthetic scroll: amplitude (voxels) of each segment's smooth drift along its normal
PITCH = 20.0  # synthetic scroll: radial distance between turns of the sheet
FLIP_NORMALS = ""  # synthetic scroll: segment ids whose normals point into the sheet
CT_LIKE = False  # synthetic scroll: an intensity model like a real scan's
TOUCHING = False  # synthetic scroll: turns pressed together, as on a real scroll (a thin contact layer, mostly not air, between them)
INK_DEPTH = "learned"  # learned (pooled along each labeled pixel's normal) or fixed (the ink range below)
INK_BACK = 1.5  # ink_depth fixed: voxels behind the surface labeled with the pixel's label
INK_FRONT = 1.5  # ink_depth fixed: ... and in front of it


VARIANT_FLAGS = ("ink_thickness", "surface_offset", "surface_jitter", "pitch", "flip_normals", "ct_like", "touching")
LARGEST_BLOBS = 10  # the blob gallery's largest blobs whose true-ink share the demo reports
BLOB_THRESHOLD, BLOB_MIN_SIZE, BLOB_MAX_SIZE = 0.8, 100, 20000  # the blob gallery: probability, voxels


class Stages:
    """Runs stages in order, timing them; a stage whose output is complete is reused."""

    def __init__(self, fresh: bool):
        self.fresh, self.rows = fresh, []

    def run(self, name: str, output: Path, stage, argv: list[str], done=None):
        finished = (done or Path.exists)(output)
        started = time.perf_counter()
        if self.fresh or not finished:
            stage(argv)
        self.rows.append((name, time.perf_counter() - started, output, not (self.fresh or not finished)))

    def table(self) -> str:
        lines = [f"{'stage':<32} {'seconds':>8}  main output"]
        for name, seconds, output, reused in self.rows:
            lines.append(f"{name:<32} {seconds:>8.1f}  {output}" + ("  (reused)" if reused else ""))
        return "\n".join(lines)


def _complete(path: Path, dataset: str) -> bool:
    if not path.exists():
        return False
    if is_store(path):
        return is_complete(path)
    with h5py.File(path, "r") as file:
        return dataset in file and bool(file[dataset].attrs.get("complete", False))


def _trained(out_dir: Path, max_steps: int) -> bool:
    summary = out_dir / "summary.json"
    return summary.exists() and json.loads(summary.read_text())["step"] >= max_steps


def _read_gray(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(path)
    return image


def held_out_scores(scroll: Path, flat: Path, segment_id: str) -> tuple[float, float]:
    """F0.5 (best threshold) of the flattened prediction and of the best global threshold on the flattened
    scan (either direction), over the segment's labeled pixels."""
    label = _read_gray(scroll / "labels" / f"{segment_id}_inklabels.png") > 127
    mask = _read_gray(scroll / "paths" / segment_id / f"{segment_id}_mask.png") > 0
    prediction = _read_gray(flat / f"{segment_id}_prediction.png")
    surface = _read_gray(flat / f"{segment_id}_scan.png").astype(np.float64)
    rows, cols = label.shape  # a tifxyz grid may cover a few pixels more than the label
    mask &= _read_gray(flat / f"{segment_id}_prediction_mask.png")[:rows, :cols] > 0
    prediction, surface = prediction[:rows, :cols], surface[:rows, :cols]
    model = best_fbeta(prediction[mask], label[mask])[0]
    baseline = max(best_fbeta(surface[mask], label[mask])[0], best_fbeta(-surface[mask], label[mask])[0])
    return model, baseline


def held_out_region(coords: Path, patch: int, shape) -> str:
    """The ROI (z0:z1,y0:y1,x0:x1) spanned by the validation blocks: the held-out segment's part of the scroll."""
    origins = np.load(coords)
    low, high = origins.min(axis=0), np.minimum(origins.max(axis=0) + patch, shape)
    return ",".join(f"{a}:{b}" for a, b in zip(low, high))


def largest_blobs_true_ink(blobs_csv: Path, count: int, min_size: int, max_size: int) -> tuple[float, int]:
    """Share of true ink among the voxels of the gallery's `count` largest blobs, and how many there are."""
    with open(blobs_csv) as file:
        rows = [row for row in csv.DictReader(file) if min_size <= int(row["voxels"]) <= max_size][:count]
    voxels = sum(int(row["voxels"]) for row in rows)
    return (sum(int(row["true_ink_voxels"]) for row in rows) / voxels if voxels else float("nan")), len(rows)


def summary_picture(scroll: Path, flat: Path, blobs: Path, segment_id: str, caption: str) -> np.ndarray:
    """The scores, then flattened scan | ink label | flattened prediction, then the largest blob's views, with titles."""
    panels = [cv2.cvtColor(_read_gray(flat / f"{segment_id}_scan.png"), cv2.COLOR_GRAY2BGR),
              cv2.cvtColor(_read_gray(scroll / "labels" / f"{segment_id}_inklabels.png"), cv2.COLOR_GRAY2BGR),
              cv2.applyColorMap(_read_gray(flat / f"{segment_id}_prediction.png"), PROBABILITY_COLOURS)]
    titles = ["flattened scan", "ink label (held out)", "flattened prediction: mean p"]
    scale = max(1, round(300 / panels[0].shape[0]))
    tiles = []
    for panel, title in zip(panels, titles):
        panel = cv2.resize(panel, (panel.shape[1] * scale, panel.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
        tiles.append(_titled(panel, title))
    tiles.append(_titled(colour_bar(tiles[-1].shape[0] - 28), ""))
    row = _titled(_hstack(tiles), caption)
    blob_pictures = sorted(blobs.glob("blob_*.png"))
    if blob_pictures:
        blob = cv2.imread(str(blob_pictures[0]))
        blob = cv2.resize(blob, (blob.shape[1] * 2, blob.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
        return _vstack([row, _titled(blob, f"largest 3D blob of p >= {BLOB_THRESHOLD} in the scroll: max projections along z, y, x; "
                                           "scan slices below, the blob outlined")])
    return _vstack([row, _titled(np.zeros((8, row.shape[1], 3), np.uint8), f"no 3D blob of p >= {BLOB_THRESHOLD} in the gallery's size range")])


PROBABILITY_COLOURS = cv2.COLORMAP_VIRIDIS  # the flattened prediction's colours, uint8 255 = probability 1


def colour_bar(height: int) -> np.ndarray:
    """The probability scale of the flattened prediction: its colours from 1 (top) to 0, with the values written beside."""
    values = np.linspace(255, 0, height).round().astype(np.uint8)[:, None].repeat(16, axis=1)
    bar = np.zeros((height, 52, 3), np.uint8)
    bar[:, :16] = cv2.applyColorMap(values, PROBABILITY_COLOURS)
    for text, row in (("1", 10), ("0.5", height // 2 + 4), ("0", height - 2)):
        cv2.putText(bar, text, (20, row), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return bar


def _titled(image: np.ndarray, title: str) -> np.ndarray:
    band = np.zeros((28,) + image.shape[1:], np.uint8)
    cv2.putText(band, title, (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([band, image], axis=0)


def _hstack(images):
    height = max(i.shape[0] for i in images)
    return np.concatenate([np.pad(i, ((0, height - i.shape[0]), (0, 8), (0, 0))) for i in images], axis=1)


def _vstack(images):
    width = max(i.shape[1] for i in images)
    return np.concatenate([np.pad(i, ((0, 8), (0, width - i.shape[1]), (0, 0))) for i in images], axis=0)


def main(argv=None):
    config = parse_config(globals(), argv)
    with output_lock(config.out_dir):
        return run_demo(config)


def run_demo(config):
    out = Path(config.out_dir)
    forms = claim_out_dir(config, out)
    stages = Stages(config.fresh)
    data = make_data(config, out, stages)
    predictions = train_and_predict(config, out, stages, data)
    scores = evaluate(config, out, stages, data, predictions)
    return report(config, out, stages, data, scores, forms)


def claim_out_dir(config, out: Path) -> dict:
    """The run's forms and variant, recorded in out_dir: with --fresh, what an earlier demo made there is removed first;
    without it, an earlier demo of other forms is refused."""
    scroll, scan = out / "scroll", out / "scan.h5"
    if config.fresh:  # only what the demo itself makes, in case out_dir holds anything else
        for path in (scroll, scan, out / "flat", out / "blobs", out / "train", out / "predictions.h5", out / "predictions.zarr",
                     partial_path(scan), partial_path(out / "predictions.h5"), out / "summary.png", out / "forms.json",
                     out / "results.json", *out.glob("labels_*.h5"), *out.glob("coords_*.npy"), *out.glob("score_3d*.json")):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    forms = {"volume_form": config.volume_form, "segment_form": config.segment_form, "prediction_form": config.prediction_form,
             "ink_depth": config.ink_depth,
             **{flag: getattr(config, flag) for flag in VARIANT_FLAGS}}
    if (out / "forms.json").exists() and json.loads((out / "forms.json").read_text()) != forms and not config.fresh:
        raise InputError(f"{out} holds a run from {json.loads((out / 'forms.json').read_text())}; "
                         "pass --fresh true or another --out_dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "forms.json").write_text(json.dumps(forms) + "\n")
    return forms


@dataclass
class DemoData:
    """What the first stages make: the scroll, the scan the stages read, its segments, labels and coords."""

    scroll: Path
    description: dict  # the scroll's scroll.json
    scan: Path
    segments: Path
    held_out: str  # the validation segment
    labels: dict  # split -> label volume
    coords: dict  # split -> block origins


def make_data(config, out: Path, stages: Stages) -> DemoData:
    scroll, scan = out / "scroll", out / "scan.h5"
    stages.run("make_synthetic_scroll", scroll / "scroll.json", make_synthetic_scroll.main,
               ["--out_dir", str(scroll), "--seed", str(config.seed), "--depth", str(config.depth), "--overwrite", "true",
                "--ome_zarr", str(config.volume_form == "ome-zarr"), "--tifxyz_step", "4" if config.segment_form == "tifxyz" else "0",
                *(argument for flag in VARIANT_FLAGS for argument in (f"--{flag}", str(getattr(config, flag))))])
    description = json.loads((scroll / "scroll.json").read_text())
    held_out = description["valid_segments"][0]
    segments = scroll / ("tifxyz" if config.segment_form == "tifxyz" else "paths")
    if config.volume_form == "ome-zarr":
        scan = scroll / "volume.zarr"  # every stage reads it as it is
    else:
        stages.run("volume_to_hdf", scan, volume_to_hdf.main,
                   ["--tiff_dir", str(scroll / "volume"), "--out", str(scan), "--resume", "true"],
                   done=lambda path: _complete(path, volume.SCAN))
    labels = {"train": out / "labels_train.h5", "valid": out / "labels_valid.h5"}
    stages.run("all_labels_to_hdf", labels["valid"], all_labels_to_hdf.main,
               ["--ppm_dir", str(segments), "--labels_dir", str(scroll / "labels"), "--volume", str(scan),
                "--out_train", str(labels["train"]), "--out_valid", str(labels["valid"]), "--valid_segments", held_out,
                "--overwrite", "true", *(["--ink_back", str(config.ink_back), "--ink_front", str(config.ink_front)]
                                         if config.ink_depth == "fixed" else [])])
    coords = {split: out / f"coords_{split}.npy" for split in labels}
    for split in labels:
        stages.run(f"pred_find_coords ({split})", coords[split], pred_find_coords.main,
                   ["--labels", str(labels[split]), "--out", str(coords[split]), "--block", str(config.patch), "--overwrite", "true"])
    return DemoData(scroll, description, scan, segments, held_out, labels, coords)


def train_and_predict(config, out: Path, stages: Stages, data: DemoData) -> Path:
    """Train on the data and predict the whole scan; returns the predictions."""
    train_dir = out / "train"
    predictions = out / ("predictions.zarr" if config.prediction_form == "ome-zarr" else "predictions.h5")
    stages.run("train", train_dir / "best.pth", train.main,
               ["--volume", str(data.scan), "--train_labels", str(data.labels["train"]), "--valid_labels", str(data.labels["valid"]),
                "--train_coords", str(data.coords["train"]), "--valid_coords", str(data.coords["valid"]), "--out_dir", str(train_dir),
                "--patch", str(config.patch), "--f_maps", str(config.f_maps), "--num_levels", str(config.num_levels),
                "--batch_size", str(config.batch_size), "--max_steps", str(config.max_steps),
                "--valid_every", str(-(-config.max_steps // 3)), "--checkpoint_every", str(-(-config.max_steps // 3)),  # the last at max_steps
                "--exclusion_radius", str(config.patch), "--seed", str(config.seed), "--device", config.device,
                "--augmentation", config.augmentation, "--ground_truth", str(data.scroll / "ground_truth.h5"), "--resume", "true",
                "--ink_depth", config.ink_depth],
               done=lambda path: _trained(train_dir, config.max_steps))
    stages.run("inference", predictions, inference.main,
               ["--volume", str(data.scan), "--checkpoint", str(train_dir / "best.pth"), "--out", str(predictions),
                "--patch", str(2 * config.patch), "--macro_block", str(4 * config.patch), "--tta", str(config.tta).lower(),
                "--device", config.device, "--resume", "true"],
               done=lambda path: _complete(path, volume.PREDICTIONS))
    return predictions


def evaluate(config, out: Path, stages: Stages, data: DemoData, predictions: Path) -> dict:
    """The 3D scores (whole scroll, held-out region), the held-out segment flattened, the blob gallery; returns the
    score files."""
    truth, flat, blobs = data.scroll / "ground_truth.h5", out / "flat", out / "blobs"
    scores = {"every voxel": out / "score_3d.json", "held-out region": out / "score_3d_held_out.json"}
    for (name, path), roi in zip(scores.items(), ("", held_out_region(data.coords["valid"], config.patch, data.description["shape"]))):
        stages.run(f"score_3d ({name})", path, score_3d.main,
                   ["--predictions", str(predictions), "--ground_truth", str(truth), "--volume", str(data.scan),
                    "--roi", roi, "--out", str(path), "--overwrite", "true"])
    stages.run("flatten_3d (prediction)", flat / f"{data.held_out}_prediction.png", flatten_3d.main,
               ["--volume", str(predictions), "--ppm_dir", str(data.segments), "--out_dir", str(flat),
                "--segments", data.held_out, "--overwrite", "true"])
    stages.run("flatten_3d (scan)", flat / f"{data.held_out}_scan.png", flatten_3d.main,
               ["--volume", str(data.scan), "--dataset", volume.SCAN, "--name", "scan", "--ppm_dir", str(data.segments),
                "--out_dir", str(flat), "--segments", data.held_out, "--overwrite", "true"])
    stages.run("connected_components_explore", blobs / "index.html", connected_components_explore.main,
               ["--predictions", str(predictions), "--volume", str(data.scan), "--out_dir", str(blobs), "--threshold",
                str(BLOB_THRESHOLD), "--min_size", str(BLOB_MIN_SIZE), "--max_size", str(BLOB_MAX_SIZE),
                "--ground_truth", str(truth), "--overwrite", "true"])
    return {name: json.loads(path.read_text()) for name, path in scores.items()}


def report(config, out: Path, stages: Stages, data: DemoData, scores: dict, forms: dict) -> tuple[float, float]:
    """The summary picture, results.json and the lines that say how the run did; returns the held-out segment's F0.5
    and the flattened scan's threshold F0.5."""
    flat, blobs, held_out = out / "flat", out / "blobs", data.held_out
    model_f05, baseline_f05 = held_out_scores(data.scroll, flat, held_out)
    whole, region = scores["every voxel"], scores["held-out region"]
    blob_ink, blob_count = largest_blobs_true_ink(blobs / "blobs.csv", LARGEST_BLOBS, BLOB_MIN_SIZE, BLOB_MAX_SIZE)
    caption = (f"held-out segment F0.5: model {model_f05:.3f}, flattened-scan threshold {baseline_f05:.3f}   |   "
               f"3D voxel F0.5: model {whole['f05']:.3f}, scan threshold {whole['scan_f05']:.3f}")
    write_image(out / "summary.png", summary_picture(data.scroll, flat, blobs, held_out, caption))
    if config.summary_copy:
        Path(config.summary_copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "summary.png", config.summary_copy)
    depth = json.loads((flat / f"{held_out}_prediction_depth.json").read_text())
    true_depth = data.description["ink_depth"][held_out]
    results = {"forms": forms, "score_3d": whole, "score_3d_held_out": region, "held_out_f05": model_f05,
               "held_out_baseline_f05": baseline_f05, "blob_true_ink": blob_ink, "blobs": blob_count,
               "depth": depth, "true_depth": true_depth, "air_boundary": data.description["air_boundary"],
               "stage_seconds": {name: seconds for name, seconds, _, _ in stages.rows}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + stages.table())
    print(f"summary picture: {out / 'summary.png'}")
    print(f"held-out segment: predicted ink peaks at a median depth of {depth['median']:+.2f} voxels along the normal "
          f"(the scroll's ink lies at {true_depth:+.2f})" if depth["pixels"] else "held-out segment: no predicted ink peak for a depth")
    print(f"3D voxel F0.5 (true ink of the whole scroll): model={whole['f05']:.3f} scan-threshold={whole['scan_f05']:.3f}; "
          f"held-out region: model={region['f05']:.3f} scan-threshold={region['scan_f05']:.3f}; median prediction "
          f"air {whole['air_median']:.2f}, papyrus {whole['papyrus_median']:.2f}, ink {whole['ink_median']:.2f}")
    print(f"largest {blob_count} blobs of the gallery: {blob_ink:.0%} of their voxels are true ink" if blob_count
          else "no blob of the gallery's size range: no true-ink share")
    print(f"held-out segment {held_out}: F0.5 model={model_f05:.3f} threshold-baseline={baseline_f05:.3f}")
    return model_f05, baseline_f05


if __name__ == "__main__":
    run_main(main)
