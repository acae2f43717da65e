"""Train the 3D UNet on sparse 3D ink labels.

    python train.py --volume runs/demo/scan.h5 --train_labels runs/demo/labels_train.h5 \\
        --valid_labels runs/demo/labels_valid.h5 --train_coords runs/demo/coords_train.npy \\
        --valid_coords runs/demo/coords_valid.npy --out_dir runs/demo/train \\
        --patch 64 --f_maps 8 --num_levels 4 --max_steps 300
    python train.py ... --resume true                                   # continue from out_dir/last.pth
    python train.py ... --init_checkpoint checkpoints/published_3d_ink.pth   # start from pretrained weights
    torchrun --nproc_per_node=4 train.py ...                            # DistributedDataParallel

A 2D label says that the face carries ink somewhere along a pixel's normal, not at which depth. By
default (`--ink_depth learned`) the model's output is sampled along every labeled pixel's column
that lies in a crop (kept in the label files, ink3d/columns.py), pooled over the column's face window
(from the written face, read off the scan, `--face_depth` voxels into the sheet) into one prediction
for the pixel (a smooth maximum, `--pool_sharpness`) and compared with the pixel's label; the rest of
an ink column (but for `--ink_reach` voxels behind the face, left untaught) and every voxel of the
columns without ink are known negatives: the model learns where along the normal the ink lies.
`--ink_depth fixed` instead takes the label volume's voxel labels as they are (its ink range).

Unlabeled voxels (-1) are excluded from the loss. Air (scan at or below `--air_level`, by default
the valley between the air and papyrus modes of the scan's histogram) holds no ink: labeled air
voxels count as 0, and the other air voxels of a crop are a background term of the loss weighed by
`--background_weight`.
Training block origins closer than `--exclusion_radius` (by default 4 patches) to any validation origin are dropped, so
validation measures unseen regions. An exponential moving average of the weights (`--ema_decay`)
is what validation runs, what `best.pth` is chosen by and what loaders return by default. The
input normalisation (`--input_normalization`) is recorded in every checkpoint and applied by
inference. With `--ground_truth` (the synthetic scroll's), validation also scores every voxel of
its blocks against the true ink. Writes `last.pth`, `best.pth` (by validation F0.5),
`metrics.csv`, validation pictures `valid_<step>.png` and the resolved config into `--out_dir`.

Every input is opened and checked before anything is written. `last.pth` is saved every
`--checkpoint_every` steps, before that step's validation; `--resume true` continues from it
exactly (weights, optimizer, sample stream, counters, metrics.csv cut back to its step) and
refuses other data files unless `--allow_new_data true`.
"""

import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

import csv
import json
import math
import os
import random
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ink3d import InputError, volume
from ink3d.config import config_path_for, parse_config, run_main, save_config
from ink3d.coords import drop_near
from ink3d.augment import warp
from ink3d.columns import COLUMNS, column_loss, face_bags, sample_columns
from ink3d.dataset import BACKGROUND, ScrollSamples, loader_worker_init
from ink3d.device import autocast, autocast_dtype, prepare_model, resolve_device, switch
from ink3d.intensity import Normalization, resolve_air_level, scan_histogram
from ink3d.labels import boxes_with_labels
from ink3d.metrics import VoxelCounts, best_fbeta, roc_auc
from ink3d.sliding_window import to_uint8
from ink3d.files import (atomic_output, check_output, file_checksum, output_lock, refuse_inputs_as_outputs, write_image,
                         writing)
from models import UNet3D, load_weights, read_state_dict, save_checkpoint, unwrap
from models.ema import EMA

# --- config ---
VOLUME = "runs/demo/scan.h5"  # scan volume
LEVEL = 0  # OME-Zarr inputs: the multiscale level to read (0 = full resolution)
TRAIN_LABELS = "runs/demo/labels_train.h5"  # label volume of the training segments
VALID_LABELS = "runs/demo/labels_valid.h5"  # label volume of the validation segments
TRAIN_COORDS = "runs/demo/coords_train.npy"  # block origins holding training labels (pred_find_coords.py)
VALID_COORDS = "runs/demo/coords_valid.npy"  # block origins holding validation labels
OUT_DIR = "runs/demo/train"  # checkpoints, metrics, pictures
INIT_CHECKPOINT = ""  # start from these weights (a train.py checkpoint, or the published / LSM state_dict)
RESUME = False  # continue from out_dir/last.pth at its step, with its optimizer and schedule
OVERWRITE = False  # start a new run in an out_dir holding an earlier run's checkpoints and metrics (they are removed first)
ALLOW_NEW_DATA = False  # let a resumed run read other scan / label / coords files than the checkpoint's
PATCH = 128  # training patch edge (model input)
BLOCK = 0  # block edge of the coords grid (0: the block the training coords were made with, else the patch): samples are jittered within it
BATCH_SIZE = 2  # samples per step (per GPU under torchrun)
LR = 1e-3  # peak learning rate (AdamW)
WEIGHT_DECAY = 1e-4  # AdamW weight decay
WARMUP_STEPS = 20  # linear warmup, then cosine decay to 0 at max_steps
MAX_STEPS = 1000  # optimisation steps
GRAD_CLIP = 1.0  # max gradient norm (0 = off)
DICE_WEIGHT = 3.0  # weight of a soft Dice term over labeled voxels (learned depth: over the pooled columns), added to the BCE
INK_DEPTH = "learned"  # where the ink lies along a labeled pixel's normal: learned (pooled along its column) or fixed (the label volume's ink range)
POOL_SHARPNESS = 1.0  # r of the pooling along a column, (1/r) log mean exp(r logit): large = the maximum, small = the mean
COLUMN_WEIGHT = 1.0  # weight of the pooled columns' loss beside the voxels' (learned depth)
FACE_DEPTH = 3.0  # learned depth: an ink column pools over its face window, from the written face this deep into the sheet; the rest is no ink (0: the whole band)
INK_REACH = 6.0  # learned depth: ... except down to this deep behind the face, where ink may still lie (thick ink): left untaught
MAX_COLUMNS = 8192  # labeled pixels' columns per training sample (a random choice when its crop holds more)
LABEL_SMOOTHING = 0.0  # BCE targets t * (1 - s) + s / 2
AIR_LEVEL = "auto"  # scan values (uint8) at or below this are air, never ink: auto (the histogram's air/papyrus valley), otsu, a number, or none
BACKGROUND_WEIGHT = 1.0  # weight of the BCE over a crop's unlabeled air voxels (target 0) beside the labeled voxels' BCE
EMA_DECAY = 0.999  # decay of the moving average of the weights (0 = none); lower early in a run (models/ema.py)
INPUT_NORMALIZATION = "scale"  # model input: scale (scan / 255) or percentile (window of the material's percentiles)
PERCENTILES = "0.5,99.5"  # low,high percentiles of the material above the air level (input_normalization percentile)
AUGMENTATION = "full"  # full (rotations, flips, 90-degree turns, resized crop), exact (turns, flips, crop: no resampling), none
AUGMENT = "device"  # where --augmentation full resamples: device (torch, a batch at a time where the model runs; 3-4x faster even on the CPU) or cpu (volumentations-3D in the loader)
GROUND_TRUTH = ""  # optional ground-truth ink volume (the synthetic scroll's): 3D score of the validation blocks
F_MAPS = 32  # UNet feature maps of the first level
NUM_LEVELS = 5  # UNet levels
NUM_GROUPS = 4  # GroupNorm groups
MIN_LABELED = 64  # a training crop needs this many labeled voxels in its patch, else it is re-drawn
MAX_TRIES = 10  # re-draws before a crop is taken anyway
EXCLUSION_RADIUS = "auto"  # drop training origins closer than this (voxels) to any validation origin; auto: 4 x --patch (0: keep all)
LOG_EVERY = 20  # print a line with the mean training loss every this many steps
VALID_EVERY = 100  # validate every this many steps (and at the end)
VALID_BLOCKS = 64  # validation patches (the first ones of valid_coords)
CHECKPOINT_EVERY = 100  # write last.pth every this many steps
WORKERS = 1  # data loader worker processes
DEVICE = "auto"  # auto (cuda if present), cuda, cpu
AMP = "auto"  # auto: bf16 on CUDA where supported, else fp16 with a GradScaler; fp32 on CPU
CHANNELS_LAST = "auto"  # channels_last_3d memory format: auto (on CUDA, not on the CPU), true, false
COMPILE = "auto"  # torch.compile the model: auto (on CUDA), true, false
SEED = 0  # seed of the weights and of the sample stream
TRUST_CHECKPOINT = False  # allow checkpoints with pickled Python objects (only files you trust)
WANDB = False  # log to Weights & Biases (mode from WANDB_MODE; offline unless WANDB_API_KEY is set)
WANDB_PROJECT = "3d-ink-detection"  # W&B project


# a resumed run reads the same data (unless --allow_new_data) and keeps the settings that define the model,
# the sample stream and the schedule; the label and coords files are compared by size and checksum too
DATA_KEYS = ("volume", "train_labels", "valid_labels", "train_coords", "valid_coords")
FINGERPRINTED = ("train_labels", "valid_labels", "train_coords", "valid_coords")
RESUME_KEYS = ("patch", "block", "batch_size", "lr", "weight_decay", "warmup_steps", "max_steps", "f_maps", "num_levels",
               "num_groups", "seed", "dice_weight", "min_labeled", "max_tries", "exclusion_radius", "label_smoothing",
               "air_level", "background_weight", "ema_decay", "input_normalization", "percentiles", "augmentation", "ink_depth",
               "pool_sharpness", "column_weight", "face_depth", "ink_reach", "max_columns")


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, dice_weight: float = 0.0, background_weight: float = 0.0,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE with logits averaged over labeled voxels (labels >= 0), plus an optional soft Dice term over
    them, plus `background_weight` x the BCE (target 0) averaged over BACKGROUND voxels. Each mean
    is over its own voxels, so the many air voxels of a crop do not drown the few labeled ones.

    Returns (loss, number of labeled voxels), both tensors on the logits' device: the voxels are masked, not
    selected, so nothing waits for the host. With nothing to learn from the loss is an exact 0 that still
    depends on `logits` (so every DistributedDataParallel rank runs backward).
    """
    logits = logits.float()
    labeled = labels >= 0
    count = labeled.sum()
    weight = labeled.float()
    targets = torch.where(labeled, labels, torch.zeros_like(labels)).float()
    smoothed = targets * (1 - label_smoothing) + label_smoothing / 2
    bce = F.binary_cross_entropy_with_logits(logits, smoothed, reduction="none")
    loss = (bce * weight).sum() / count.clamp(min=1)
    if dice_weight:
        probabilities = torch.sigmoid(logits) * weight
        loss = loss + dice_weight * (1 - (2 * (probabilities * targets).sum() + 1) / (probabilities.sum() + targets.sum() + 1))
    if background_weight:
        background = (labels == BACKGROUND).float()
        air = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label_smoothing / 2), reduction="none")
        loss = loss + background_weight * (air * background).sum() / background.sum().clamp(min=1)
    return loss, count


def resolve_intensity(config) -> tuple[int | None, Normalization, int]:
    """The air level and the input normalisation the flags ask for, and the scan's estimated air level (the air
    level of the 3D score), read off the scan's histogram."""
    try:
        low, high = (float(p) for p in config.percentiles.split(","))
    except ValueError:
        raise InputError(f"--percentiles {config.percentiles!r}: expected two numbers, low,high") from None
    file, scan = volume.open_dataset(config.volume, volume.SCAN, level=config.level)
    with file:
        counts = scan_histogram(scan)
    try:
        air_level, estimate = resolve_air_level(config.air_level, counts), resolve_air_level("auto", counts)
    except ValueError as error:
        raise InputError(f"--air_level {error}") from None
    try:
        normalization = Normalization.of_volume(counts, config.input_normalization, low, high)
    except ValueError as error:
        raise InputError(f"--input_normalization: {error}") from None
    return air_level, normalization, estimate


def load_origins(path: str) -> np.ndarray:
    """Block origins (N, 3) of a coords file, with a named error for anything else."""
    try:
        origins = np.load(path)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read block origins ({str(error).splitlines()[0]})") from None
    if origins.ndim != 2 or origins.shape[1] != 3 or len(origins) == 0 or not np.issubdtype(origins.dtype, np.integer):
        raise InputError(f"{path}: expected a non-empty (N, 3) integer array of zyx block origins, got {origins.dtype} {origins.shape}")
    return origins


def column_band(path: str, need: bool) -> float:
    """The band of a label file's columns (0 when not `need`ed), checked to be what learning the depth needs: columns,
    and voxel labels over the whole band (a voxel labeled 0 then lies on no ink column)."""
    if not need:
        return 0.0
    with h5py.File(path, "r") as file:
        if COLUMNS not in file:
            raise InputError(f"{path}: no label columns (made by an earlier all_labels_to_hdf); make it anew, "
                             "or train with --ink_depth fixed")
        band = float(file[COLUMNS].attrs["band"])
        ink_range = json.loads(file.attrs.get("ink_range", "null"))
    if ink_range is not None and ink_range != [-band, band]:
        raise InputError(f"{path}: made with ink range {ink_range[0]}..{ink_range[1]} of band {band}; --ink_depth learned needs "
                         "the whole band (all_labels_to_hdf's default ink range); or train with --ink_depth fixed")
    return band


def check_inputs(config, resuming: bool) -> tuple[np.ndarray, np.ndarray]:
    """Open every input the run reads, before anything is written; returns the train and validation origins."""
    file, scan = volume.open_dataset(config.volume, volume.SCAN, level=config.level)
    shape = scan.shape
    file.close()
    datasets = [(config.train_labels, volume.INK_SUM), (config.train_labels, volume.INK_COUNT),
                (config.valid_labels, volume.INK_SUM), (config.valid_labels, volume.INK_COUNT)]
    if config.ground_truth:
        datasets.append((config.ground_truth, volume.GROUND_TRUTH))
    for path, name in datasets:
        file, dataset = volume.open_dataset(path, name, level=config.level)
        found = dataset.shape
        file.close()
        if found != shape:
            raise InputError(f"{path}: dataset '{name}' has shape {found}, the scan {config.volume} has {shape}")
    if config.init_checkpoint and not resuming:
        read_state_dict(config.init_checkpoint, config.trust_checkpoint)
    return load_origins(config.train_coords), load_origins(config.valid_coords)


def coords_blocks(config) -> int:
    """The block edge training samples within: `--block`, else the one the training coords were made with
    (pred_find_coords records it beside them), else the patch. Coords made for other blocks are refused by name:
    validation reads the patch at each origin, so its coords must be made with blocks of the patch."""
    def made_with(path) -> int | None:
        try:
            return int(json.loads(config_path_for(path).read_text())["block"])
        except (OSError, ValueError, KeyError, TypeError):  # coords from elsewhere: nothing recorded
            return None

    made = made_with(config.train_coords)
    block = config.block or made or config.patch
    if made and made != block:
        raise InputError(f"{config.train_coords} was made with --block {made}, this run samples blocks of --block {block}: make "
                         f"the coords with pred_find_coords.py --block {block}, or train with --block {made}")
    made = made_with(config.valid_coords)
    if made and made != config.patch:
        raise InputError(f"{config.valid_coords} was made with --block {made}, and validation reads a --patch {config.patch} at "
                         f"each origin (a corner of each block): make them with pred_find_coords.py --labels {config.valid_labels} "
                         f"--out {config.valid_coords} --block {config.patch}, or train with --patch {made}")
    return block


def check_origins_hold_labels(config, train_origins: np.ndarray, valid_origins: np.ndarray, block: int, rank: int) -> None:
    """Refuse a run none of whose training origins holds a labeled voxel within reach of its samples (its block and
    half a patch around it), and warn when no validation origin holds one within the patch at it."""
    with h5py.File(config.train_labels, "r") as file:
        reach = boxes_with_labels(file[volume.INK_COUNT], train_origins - config.patch // 2,
                                  train_origins + block + config.patch // 2, enough=1)
    if not reach.any():
        raise InputError(f"{config.train_coords}: none of its {len(train_origins)} block origins holds a labeled voxel of "
                         f"{config.train_labels} within its block ({block} voxels, and half a patch around it) inside the scan: "
                         "training would learn nothing; make the coords from these labels (pred_find_coords.py --labels "
                         f"{config.train_labels} --block {block})")
    with h5py.File(config.valid_labels, "r") as file:
        held = boxes_with_labels(file[volume.INK_COUNT], valid_origins, valid_origins + config.patch)
    if rank == 0 and held.sum() < len(valid_origins):
        print(f"warning: {config.valid_coords}: {len(valid_origins) - held.sum()} of its {len(valid_origins)} validation origins "
              f"hold no labeled voxel of {config.valid_labels} within the {config.patch}-voxel patch at them"
              + (": validation scores nothing, and best.pth would follow it" if not held.any() else "")
              + f" (coords made with a --block larger than --patch {config.patch}? pred_find_coords.py --block {config.patch} "
              "makes them for this run)")


RESUME_STATE = ("model", "config", "optimizer", "scaler", "step", "best_f05", "skipped_batches", "torch_rng", "python_rng")


def data_fingerprint(config) -> dict[str, str]:
    """Size and CRC-32 of each label and coords file: a file made again under the same name differs."""
    return {key: f"{Path(getattr(config, key)).stat().st_size}:{file_checksum(getattr(config, key)):08x}" for key in FINGERPRINTED}


def read_resume_state(path: Path, config, fingerprint: dict[str, str]) -> dict:
    """last.pth, checked to be a readable train.py checkpoint of a run these settings may continue on the data
    of `fingerprint`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, garbage or foreign files fail in many ways; all mean the same here
        raise InputError(f"{path}: cannot be read as a checkpoint ({type(error).__name__}: {str(error).splitlines()[0]}); "
                         "resume from a good copy of it, or start a new run in another --out_dir") from None
    missing = [key for key in RESUME_STATE if not isinstance(state, dict) or key not in state]
    if missing:
        raise InputError(f"{path}: not a train.py checkpoint to resume from (no {', '.join(missing)})")
    stored = state["config"]
    changed = [key for key in RESUME_KEYS if stored.get(key) != getattr(config, key)]
    if changed:
        raise InputError(f"{path}: cannot resume with different {', '.join(changed)} "
                         f"({', '.join(f'{k}={stored.get(k)}' for k in changed)} in the checkpoint)")
    moved = [key for key in DATA_KEYS if Path(stored.get(key, "")).resolve() != Path(getattr(config, key)).resolve()]
    if moved and not config.allow_new_data:
        raise InputError(f"{path}: the run was trained on other data ({', '.join(f'{k}={stored.get(k)}' for k in moved)}); "
                         "pass --allow_new_data true to continue it on the new files")
    rewritten = [key for key, value in stored.get("data_fingerprint", {}).items() if fingerprint.get(key) != value]
    if rewritten and not config.allow_new_data:
        raise InputError(f"{path}: {', '.join(getattr(config, key) for key in rewritten)} changed since the run began "
                         "(other size or checksum: made again?); pass --allow_new_data true to continue it on the new contents")
    return state


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


UNLABELED_GREY = 128  # labels in the validation picture: ink 255, no ink 0, unlabeled this grey
PICTURE_COLUMN = 160  # minimum width of a column of the validation picture, pixels (patches are enlarged to it)


def _text_band(width: int, texts: list[tuple[int, str]], height: int = 18) -> np.ndarray:
    """A black band with white texts at the given x positions."""
    band = np.zeros((height, width), np.uint8)
    for x, text in texts:
        cv2.putText(band, text, (x + 3, height - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1, cv2.LINE_AA)
    return band


def validation_picture(images, labels, probabilities, title: str) -> np.ndarray:
    """Under `title` and column captions, a row per validation block of its middle z-slice: the model's input,
    the label (ink white, no ink black, unlabeled grey) and the predicted probability (black 0, white 1)."""
    rows = []
    for image, label, probability in zip(images, labels, probabilities):
        middle = image.shape[-3] // 2
        label_slice = label[0, middle]
        columns = [image[0, middle] * 255, np.where(label_slice >= 0, np.clip(label_slice, 0, 1) * 255, UNLABELED_GREY),
                   probability[0, middle] * 255]
        scale = max(1, -(-PICTURE_COLUMN // label_slice.shape[1]))
        columns = [cv2.resize(np.clip(np.rint(c), 0, 255).astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
                   for c in columns]
        rows.append(np.concatenate([np.pad(c, ((0, 2), (0, 2))) for c in columns], axis=1))
    body = np.concatenate(rows, axis=0)
    column = body.shape[1] // 3
    captions = [(0, "model input"), (column, "label (grey: none)"), (2 * column, "prediction")]
    return np.concatenate([_text_band(body.shape[1], [(0, title)]), _text_band(body.shape[1], captions), body], axis=0)


class ValidationTruth:
    """The true ink and the scan of the validation blocks (a synthetic scroll's ground truth), for the 3D score."""

    def __init__(self, truth_path, volume_path, origins: np.ndarray, patch: int, air_level: int, level: int = 0):
        self.truth_file, self.truth = volume.open_dataset(truth_path, volume.GROUND_TRUTH, level=level)
        self.scan_file, self.scan = volume.open_dataset(volume_path, volume.SCAN, level=level)
        if self.truth.shape != self.scan.shape:
            raise InputError(f"{truth_path}: shape {self.truth.shape} differs from the scan's {self.scan.shape}")
        self.origins, self.patch, self.air_level = origins, patch, air_level

    def add(self, counts: VoxelCounts, index: int, probabilities: np.ndarray) -> None:
        """Count validation block `index` (in the order of the validation loader) with its predicted probabilities."""
        origin, shape = self.origins[index % len(self.origins)], (self.patch,) * 3
        ink = volume.read_crop(self.truth, origin, shape) > 0
        counts.add(to_uint8(probabilities), ink, volume.read_crop(self.scan, origin, shape), self.air_level)

    def close(self):
        self.truth_file.close()
        self.scan_file.close()


@torch.no_grad()
def validate(model, loader, device, dtype, channels_last, dice_weight, truth: ValidationTruth | None = None,
             band: float = 0.0, sharpness: float = 1.0) -> tuple[dict, tuple]:
    """Loss, best-threshold F0.5, ROC AUC over labeled voxels (with columns, `band` > 0: over the labeled pixels'
    columns, each scored by its maximum probability); the intensity-threshold baseline (columns: their mean
    intensity); with `truth`, the 3D score of every voxel of the validation blocks. Also the images, labels and
    probabilities of the first 4 blocks, for the validation picture."""
    model.eval()
    scores, truths, intensities, losses, weights, picture_parts = [], [], [], [], [], ([], [], [])
    counts, index = VoxelCounts(), 0
    for images, labels, _, *columns in loader:
        batch = images.to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        with autocast(device, dtype):
            logits = model(batch)
        logits = logits.float().cpu()
        loss, count = masked_loss(logits, labels, 0.0 if columns else dice_weight)
        count = int(count)
        if columns:
            column_logits, counted = sample_columns(logits, columns[0], band)
            targets = columns[0][..., 6][counted]
            loss = loss + column_loss(column_logits, columns[0][..., 6], sharpness, dice_weight, face_bags(columns[0], band), counted)
            count += int(counted.sum())
            scores.append(torch.sigmoid(column_logits[counted].max(dim=-1).values).numpy())
            truths.append(targets.numpy() > 0.5)
            intensities.append(sample_columns(images, columns[0], band)[0][counted].mean(dim=-1).numpy())
        if count:
            losses.append(loss.item() * count)
            weights.append(count)
        if truth is not None:
            for probabilities in torch.sigmoid(logits)[:, 0].numpy():
                truth.add(counts, index, probabilities)
                index += 1
        if not columns:
            labeled = labels >= 0
            scores.append(torch.sigmoid(logits[labeled]).numpy())
            truths.append(labels[labeled].numpy() > 0.5)
            intensities.append(images[labeled].numpy())
        if len(picture_parts[0]) < 4:
            for part, values in zip(picture_parts, (images, labels, torch.sigmoid(logits))):
                part.extend(values.numpy()[: 4 - len(part)])
    model.train()
    scores, truths, intensities = (np.concatenate(a) if a else np.zeros(0) for a in (scores, truths, intensities))
    metrics = {
        "valid_loss": sum(losses) / max(sum(weights), 1),
        "valid_f05": best_fbeta(scores, truths)[0],
        "valid_auc": roc_auc(scores, truths),
        "valid_threshold_baseline_f05": best_fbeta(intensities, truths)[0],
        "valid_voxels": int(len(scores)),
    }
    if truth is not None:
        score = counts.summary()
        metrics.update(valid_3d_f05=score["f05"], valid_3d_auc=score["auc"], valid_3d_scan_f05=score["scan_f05"])
    return metrics, picture_parts


class MetricsLog:
    """metrics.csv in out_dir (one row per event), and W&B when enabled."""

    FIELDS = ["step", "lr", "train_loss", "samples_per_s", "skipped_batches", "redraws", "valid_loss", "valid_f05",
              "valid_auc", "valid_threshold_baseline_f05", "valid_voxels", "valid_3d_f05", "valid_3d_auc", "valid_3d_scan_f05"]

    def __init__(self, out_dir: Path, use_wandb: bool, config, resume_step: int | None):
        """A new metrics.csv, or (resuming from `resume_step`) the old one without rows of later steps,
        which the resumed run writes again."""
        self.path = out_dir / "metrics.csv"
        rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as file:
                rows = [row for row in csv.DictReader(file) if int(row["step"]) <= resume_step]
        with atomic_output(self.path) as temporary, open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, self.FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self.best_f05 = max((float(row["valid_f05"]) for row in rows if row.get("valid_f05")), default=-1.0)
        self.steps = {int(row["step"]) for row in rows}
        self.wandb = None
        if use_wandb:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=config.wandb_project, config=vars(config), dir=str(out_dir), mode=mode, resume="allow")

    def has_step(self, step: int) -> bool:
        return step in self.steps

    def write(self, row: dict, picture: np.ndarray | None = None):
        self.steps.add(row["step"])
        with open(self.path, "a", newline="") as file:
            csv.writer(file).writerow([row.get(field, "") for field in self.FIELDS])
        if self.wandb is not None:
            import wandb

            payload = {k: v for k, v in row.items() if k != "step"}
            if picture is not None:
                payload["valid_picture"] = wandb.Image(picture)
            self.wandb.log(payload, step=row["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def train_step(model, optimizer, scaler, ema, images, labels, columns, matrices, shifts, config, band: float,
               dtype: torch.dtype | None, world: int) -> torch.Tensor:
    """One optimizer step on a batch on the training device, without the host waiting for the device.

    A batch without a labeled voxel (on any rank) has nothing to learn from: the optimizer's update and the EMA's
    are skipped on the device (the fused AdamW's `found_inf`, as a GradScaler skips a step that overflowed; under
    fp16 the loss is made NaN so that the GradScaler skips it, which also halves its scale once). Returns the
    (loss, skipped) of the step as one tensor on the device, for the host to read when it logs."""
    learned = columns is not None
    labeled = (labels >= 0).sum() + (0 if columns is None else (columns[..., 6] >= 0).sum())
    if world > 1:
        dist.all_reduce(labeled)
    skipped = labeled == 0
    with autocast(images.device, dtype):
        logits = model(images)
    loss, _ = masked_loss(logits, labels, 0.0 if learned else config.dice_weight, config.background_weight, config.label_smoothing)
    if learned:
        column_logits, counted = sample_columns(logits, columns, band, matrices, shifts)
        loss = loss + config.column_weight * column_loss(column_logits, columns[..., 6], config.pool_sharpness, config.dice_weight,
                                                         face_bags(columns, band), counted)
    optimizer.zero_grad(set_to_none=True)
    if scaler.is_enabled():
        scaler.scale(loss * torch.where(skipped, torch.nan, 1.0)).backward()
    else:
        loss.backward()
    if config.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.found_inf, optimizer.grad_scale = skipped.float(), None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    if ema is not None:
        ema.update(model, skipped)
    return torch.stack([loss.detach(), skipped.float()])


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, resolve_device(device_name)
    device = resolve_device(device_name)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


KEPT = "last.pth holds the last checkpoint: free disk space and rerun with --resume true"
EARLIER_RUN = ("last.pth", "best.pth", "metrics.csv", "summary.json", "config.json")  # what a run leaves in its out_dir


def main(argv=None):
    config = parse_config(globals(), argv)
    refuse_inputs_as_outputs({key: getattr(config, key) for key in (*DATA_KEYS, "init_checkpoint", "ground_truth")},
                             {"out_dir": config.out_dir}, folders=("out_dir",))
    rank = int(os.environ.get("RANK", "0"))
    with output_lock(*([config.out_dir] if rank == 0 else [])):
        return train(config)


def resolve_exclusion_radius(setting: str, patch: int) -> float:
    """`--exclusion_radius` in voxels: a number >= 0, or auto (4 patches: a region of a few blocks' reach)."""
    if setting == "auto":
        return 4.0 * patch
    try:
        radius = float(setting)
    except ValueError:
        radius = -1.0
    if not 0 <= radius < float("inf"):
        raise InputError(f"--exclusion_radius {setting}: auto, or a number of voxels >= 0")
    return radius


def train(config) -> float:
    config.exclusion_radius = resolve_exclusion_radius(str(config.exclusion_radius), config.patch)  # what the run records
    rank, world, device = setup_distributed(config.device)
    out_dir = Path(config.out_dir)
    last_path = out_dir / "last.pth"
    earlier = [path for path in (*(out_dir / name for name in EARLIER_RUN), *out_dir.glob("valid_*.png")) if path.exists()]
    if config.overwrite and rank == 0:
        for path in earlier:
            path.unlink()
    elif last_path.exists() and not config.resume:
        raise InputError(f"{last_path} exists; pass --resume true to continue that run, --overwrite true to start over, "
                         "or choose another --out_dir")
    elif earlier and not last_path.exists():
        raise InputError(f"{out_dir} holds an earlier run's {', '.join(path.name for path in earlier[:5])} without its last.pth; "
                         "pass --overwrite true to start over, or choose another --out_dir")
    resuming = config.resume and last_path.exists()
    if config.resume and not resuming and rank == 0:
        print(f"--resume: {last_path} does not exist; starting a new run")
    block = coords_blocks(config)
    learned = config.ink_depth == "learned"
    if learned and config.augment == "cpu":
        raise InputError("--ink_depth learned moves the columns with each crop's transform, where the model runs: use --augment device")
    on_device = (config.augmentation == "full" and config.augment == "device") or learned  # exact and none resample nothing
    image_mode = "bilinear" if config.augmentation == "full" else "nearest"  # exact and none map voxels onto voxels
    train_origins, valid_origins = check_inputs(config, resuming)
    check_origins_hold_labels(config, train_origins, valid_origins[:config.valid_blocks], block, rank)
    band = column_band(config.train_labels, learned)
    if learned and column_band(config.valid_labels, learned) != band:
        raise InputError(f"{config.valid_labels}: its columns' band differs from {config.train_labels}'s ({band})")
    fingerprint = data_fingerprint(config)
    state = read_resume_state(last_path, config, fingerprint) if resuming else None
    if rank == 0:
        check_output(out_dir / "metrics.csv", overwrite=True)
    air_level, normalization, estimated_air = resolve_intensity(config)
    # what inference and later stages need to treat the scan as training did
    recorded_config = {**vars(config), "normalization": normalization.to_config(), "air_level_value": air_level,
                       "data_fingerprint": fingerprint}
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    train_origins, dropped = drop_near(train_origins, valid_origins, config.exclusion_radius)
    if len(train_origins) == 0:
        raise InputError(f"no training blocks left: all {dropped} lie within {config.exclusion_radius:g} voxels of a validation block "
                         "(--exclusion_radius, by default 4 x --patch: lower it for a small area, 0 keeps every block)")
    valid_origins = valid_origins[:config.valid_blocks]

    model_args = dict(in_channels=1, out_channels=1, f_maps=config.f_maps, num_levels=config.num_levels, num_groups=config.num_groups)
    model = UNet3D(**model_args)
    if config.init_checkpoint and not resuming:
        load_weights(model, read_state_dict(config.init_checkpoint, config.trust_checkpoint)[0], config.init_checkpoint)
    dtype = autocast_dtype(device, config.amp)
    channels_last = switch(config.channels_last, "--channels_last", on_cuda=True, on_cpu=False, device=device)
    compiled = switch(config.compile, "--compile", on_cuda=True, on_cpu=False, device=device)
    model = prepare_model(model, device, channels_last=channels_last)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    # fused: one kernel for the whole update, which also skips a step on the device (train_step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    step, best_f05, skipped_batches, redraws = 0, -1.0, 0, 0
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"], state["ema_updates"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, best_f05, skipped_batches, redraws = state["step"], state["best_f05"], state["skipped_batches"], state.get("redraws", 0)
        torch.set_rng_state(state["torch_rng"])
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiled:
        model = torch.compile(model)

    train_set = ScrollSamples(config.volume, config.train_labels, train_origins, config.patch, config.max_steps * config.batch_size,
                              train=True, block=block, seed=config.seed, stream=rank, min_labeled=config.min_labeled,
                              max_tries=config.max_tries, normalization=normalization, air_level=air_level, augment=config.augmentation,
                              level=config.level, on_device=on_device, columns=config.max_columns if learned else 0,
                              face_depth=config.face_depth, ink_reach=config.ink_reach)
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=range(step * config.batch_size, len(train_set)),
                        num_workers=config.workers, pin_memory=device.type == "cuda", persistent_workers=config.workers > 0,
                        worker_init_fn=loader_worker_init)
    valid_loader = None
    log = None
    truth = None
    if rank == 0:
        valid_set = ScrollSamples(config.volume, config.valid_labels, valid_origins, config.patch, len(valid_origins),
                                  train=False, block=block, normalization=normalization, air_level=air_level, level=config.level,
                                  seed=config.seed, columns=config.max_columns if learned else 0, face_depth=config.face_depth,
                                  ink_reach=config.ink_reach)
        valid_loader = DataLoader(valid_set, batch_size=config.batch_size, num_workers=0)
        if config.ground_truth:
            truth = ValidationTruth(config.ground_truth, config.volume, valid_origins, config.patch,
                                    estimated_air if air_level is None else air_level, config.level)
        save_config(config, out_dir / "config.json")
        with writing(out_dir / "metrics.csv", advice=KEPT):
            log = MetricsLog(out_dir, config.wandb, config, step if resuming else None)
        best_f05 = max(best_f05, log.best_f05)  # a validation logged after the last checkpoint, whose best.pth was written
        print(f"{len(train_origins)} training blocks ({dropped} dropped within {config.exclusion_radius} voxels of "
              f"validation), {len(valid_origins)} validation blocks; {sum(p.numel() for p in model.parameters()):,} parameters on {device}; "
              f"air level {air_level}, input window {normalization.low:g}..{normalization.high:g}")

    def checkpoint(path: Path):
        weights = {"ema": ema.state_dict(), "ema_updates": ema.updates} if ema is not None else {}
        with writing(path, advice=KEPT):
            save_checkpoint(path, model, model_args, recorded_config, step, optimizer=optimizer.state_dict(),
                            scaler=scaler.state_dict(), best_f05=best_f05, skipped_batches=skipped_batches, redraws=redraws,
                            torch_rng=torch.get_rng_state(), python_rng=list(random.getstate()), **weights)

    def validate_and_log(train_loss: float, samples_per_s: float):
        nonlocal best_f05
        learning_rate = config.lr * lr_factor(step - 1, config.warmup_steps, config.max_steps)
        network = ema.model if ema is not None else unwrap(model)
        metrics, picture_parts = validate(network, valid_loader, device, dtype, channels_last, config.dice_weight, truth,
                                          band, config.pool_sharpness)
        picture = validation_picture(*picture_parts, title=f"step {step}: model F0.5 {metrics['valid_f05']:.3f}, best intensity "
                                                         f"threshold F0.5 {metrics['valid_threshold_baseline_f05']:.3f}")
        with writing(out_dir, advice=KEPT):
            write_image(out_dir / f"valid_{step:06d}.png", picture)
            log.write({"step": step, "lr": learning_rate, "train_loss": train_loss, "samples_per_s": samples_per_s,
                       "skipped_batches": skipped_batches, "redraws": redraws, **metrics}, picture)
        if metrics["valid_f05"] > best_f05:
            best_f05 = metrics["valid_f05"]
            checkpoint(out_dir / "best.pth")
        return metrics

    if rank == 0 and resuming and (step % config.valid_every == 0 or step == config.max_steps) and not log.has_step(step):
        validate_and_log(float("nan"), float("nan"))  # the run stopped during the validation that follows its checkpoint
    model.train()
    started, samples, running, pending = time.perf_counter(), 0, [], []

    def read_pending():
        """The host reads the steps' losses and skips since it last did (one wait for the device)."""
        nonlocal skipped_batches
        for loss, skipped in torch.stack(pending).tolist() if pending else []:
            if skipped:
                skipped_batches += 1
            else:
                running.append(loss)
        pending.clear()

    with tqdm(total=config.max_steps, initial=step, unit="step", desc="train", disable=rank != 0) as bar:
        for images, labels, sample_redraws, *transforms in loader:
            columns = transforms.pop().to(device, non_blocking=True) if learned else None
            learning_rate = config.lr * lr_factor(step, config.warmup_steps, config.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            redraws += int(sample_redraws.sum())
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            matrices = offsets = None
            if transforms:  # raw crops: normalise, resample and scale the batch here (ink3d.augment)
                matrices, offsets, scales = (t.to(device, non_blocking=True) for t in transforms)
                images, labels = warp(normalization(images), labels, matrices, offsets, config.patch, image_mode)
                images = images * scales.view(-1, 1, 1, 1, 1)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last_3d)
            pending.append(train_step(model, optimizer, scaler, ema, images, labels, columns, matrices, offsets, config, band,
                                      dtype, world))
            step += 1
            samples += len(images) * world
            rate = samples / (time.perf_counter() - started)
            bar.update(1)
            due = [step % every == 0 for every in (config.log_every, config.checkpoint_every, config.valid_every)]
            if any(due) or step == config.max_steps:
                read_pending()
                bar.set_postfix(loss=f"{np.mean(running[-20:]) if running else float('nan'):.4f}", samples_per_s=f"{rate:.2f}")
            if rank == 0 and step % config.log_every == 0:
                bar.write(f"step {step}: train loss {np.mean(running[-config.log_every:]) if running else float('nan'):.4f}, "
                          f"lr {learning_rate:.2e}, {rate:.2f} samples/s, {skipped_batches} skipped batches, {redraws} redraws")
            if rank == 0 and (step % config.checkpoint_every == 0 or step == config.max_steps):
                checkpoint(last_path)  # before validation: a failing validation loses no training
            if rank == 0 and (step % config.valid_every == 0 or step == config.max_steps):
                metrics = validate_and_log(float(np.mean(running[-config.valid_every:])) if running else float("nan"), rate)
                bar.write(f"step {step}: valid F0.5 {metrics['valid_f05']:.3f} (intensity threshold {metrics['valid_threshold_baseline_f05']:.3f}), "
                          f"AUC {metrics['valid_auc']:.3f}, loss {metrics['valid_loss']:.4f}"
                          + (f"; 3D F0.5 {metrics['valid_3d_f05']:.3f} (scan {metrics['valid_3d_scan_f05']:.3f})" if truth else ""))
            if world > 1:
                dist.barrier()
    if rank == 0:
        log.close()
        if truth is not None:
            truth.close()
        with writing(out_dir / "summary.json", advice=KEPT), atomic_output(out_dir / "summary.json") as temporary:
            temporary.write_text(json.dumps({
                "step": step, "best_valid_f05": best_f05, "skipped_batches": skipped_batches,
                "redraws": redraws, "dropped_train_blocks": dropped}, indent=2) + "\n")
    if world > 1:
        dist.destroy_process_group()
    return best_f05


if __name__ == "__main__":
    run_main(main, interrupted="last.pth holds the last checkpoint (every --checkpoint_every steps): rerun with --resume true")
