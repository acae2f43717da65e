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

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ink3d.augment import warp
from ink3d.columns import column_loss, face_bags, sample_columns
from ink3d.config import parse_config, run_main, save_config
from ink3d.dataset import ScrollSamples, loader_worker_init
from ink3d.device import autocast, autocast_dtype, prepare_model, setup_distributed, switch
from ink3d.files import atomic_output, output_lock, refuse_inputs_as_outputs, write_image, writing
from ink3d.loss import masked_loss
from ink3d.metrics_log import MetricsLog
from ink3d.run_folder import DATA_KEYS, KEPT, claim_out_dir
from ink3d.train_inputs import TrainData, read_inputs, resolve_exclusion_radius
from ink3d.validation import ValidationTruth, validate, validation_picture
from models import UNet3D, load_weights, read_state_dict, save_checkpoint, unwrap
from models.ema import EMA

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
INK_REACH = 4.5  # learned depth: ... except down to this deep behind the face, where ink may still lie (thick ink): left untaught
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
CHANNELS_LAST = "auto"  # channels_last_3d memory format: auto (on CUDA and on the CPU, where a step ran 1.2-1.7x faster), true, false
COMPILE = "auto"  # torch.compile the model: auto (on CUDA), true, false
SEED = 0  # seed of the weights and of the sample stream
TRUST_CHECKPOINT = False  # allow checkpoints with pickled Python objects (only files you trust)
WANDB = False  # log to Weights & Biases (mode from WANDB_MODE; offline unless WANDB_API_KEY is set)
WANDB_PROJECT = "3d-ink-detection"  # W&B project


def main(argv=None):
    config = parse_config(globals(), argv)
    refuse_inputs_as_outputs({key: getattr(config, key) for key in (*DATA_KEYS, "init_checkpoint", "ground_truth")},
                             {"out_dir": config.out_dir}, folders=("out_dir",))
    rank = int(os.environ.get("RANK", "0"))
    with output_lock(*([config.out_dir] if rank == 0 else [])):
        return train(config)


def train(config) -> float:
    config.exclusion_radius = resolve_exclusion_radius(str(config.exclusion_radius), config.patch)  # what the run records
    rank, world, device = setup_distributed(config.device)
    resuming = claim_out_dir(Path(config.out_dir), config, rank)
    data = read_inputs(config, resuming, rank)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    run = build_run(config, data, device, world)
    loader = training_loader(config, data, run.step, device, rank)
    monitor = Monitor(config, data, run, resuming) if rank == 0 else None
    if monitor and resuming and due(run.step, config.valid_every, config) and not monitor.log.has_step(run.step):
        monitor.validate_and_log(float("nan"), float("nan"))  # the run stopped during the validation after its checkpoint
    run_steps(config, data, run, loader, monitor, world)
    if monitor:
        monitor.close(data.dropped)
    if world > 1:
        dist.destroy_process_group()
    return run.best_f05


@dataclass
class Run:
    """The state a checkpoint holds: the model, its moving average, the optimiser, and the run's counters."""

    model: torch.nn.Module
    model_args: dict
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None  # autocast's
    channels_last: bool
    step: int = 0
    best_f05: float = -1.0
    skipped_batches: int = 0
    redraws: int = 0

    def save(self, path: Path, recorded_config: dict):
        weights = {"ema": self.ema.state_dict(), "ema_updates": self.ema.updates} if self.ema is not None else {}
        with writing(path, advice=KEPT):
            save_checkpoint(path, self.model, self.model_args, recorded_config, self.step, optimizer=self.optimizer.state_dict(),
                            scaler=self.scaler.state_dict(), best_f05=self.best_f05, skipped_batches=self.skipped_batches,
                            redraws=self.redraws, torch_rng=torch.get_rng_state(), python_rng=list(random.getstate()), **weights)


def build_run(config, data: TrainData, device: torch.device, world: int) -> Run:
    """The model (from --init_checkpoint, or the resumed state), on the device, with what trains it."""
    model_args = dict(in_channels=1, out_channels=1, f_maps=config.f_maps, num_levels=config.num_levels, num_groups=config.num_groups)
    model = UNet3D(**model_args)
    if config.init_checkpoint and data.state is None:
        load_weights(model, read_state_dict(config.init_checkpoint, config.trust_checkpoint)[0], config.init_checkpoint)
    dtype = autocast_dtype(device, config.amp)
    channels_last = switch(config.channels_last, "--channels_last", on_cuda=True, on_cpu=True, device=device)
    compiled = switch(config.compile, "--compile", on_cuda=True, on_cpu=False, device=device)
    model = prepare_model(model, device, channels_last=channels_last)
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    # fused: one kernel for the whole update, which also skips a step on the device (train_step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    run = Run(model, model_args, ema, optimizer, scaler, device, dtype, channels_last)
    if data.state is not None:
        state = data.state
        unwrap(model).load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"], state["ema_updates"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        run.step, run.best_f05, run.skipped_batches = state["step"], state["best_f05"], state["skipped_batches"]
        run.redraws = state.get("redraws", 0)
        torch.set_rng_state(state["torch_rng"])
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    if world > 1:
        run.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiled:
        run.model = torch.compile(run.model)
    return run


def scroll_samples(config, data: TrainData, origins: np.ndarray, count: int, train: bool, rank: int = 0) -> ScrollSamples:
    learned = config.ink_depth == "learned"
    on_device = (config.augmentation == "full" and config.augment == "device") or learned  # exact and none resample nothing
    augmentation = dict(stream=rank, min_labeled=config.min_labeled, max_tries=config.max_tries, augment=config.augmentation,
                        on_device=on_device) if train else {}
    return ScrollSamples(config.volume, config.train_labels if train else config.valid_labels, origins, config.patch, count,
                         train=train, block=data.block, seed=config.seed, normalization=data.normalization,
                         air_level=data.air_level, level=config.level, columns=config.max_columns if learned else 0,
                         face_depth=config.face_depth, ink_reach=config.ink_reach, **augmentation)


def training_loader(config, data: TrainData, step: int, device: torch.device, rank: int) -> DataLoader:
    """The training samples from `step` on (a resumed run continues the stream where it stopped)."""
    train_set = scroll_samples(config, data, data.train_origins, config.max_steps * config.batch_size, train=True, rank=rank)
    return DataLoader(train_set, batch_size=config.batch_size, sampler=range(step * config.batch_size, len(train_set)),
                      num_workers=config.workers, pin_memory=device.type == "cuda", persistent_workers=config.workers > 0,
                      worker_init_fn=loader_worker_init)


class Monitor:
    """Rank 0's view of the run: validation, its pictures and metrics.csv, and the checkpoints."""

    def __init__(self, config, data: TrainData, run: Run, resuming: bool):
        self.config, self.data, self.run, self.out_dir = config, data, run, Path(config.out_dir)
        valid_set = scroll_samples(config, data, data.valid_origins, len(data.valid_origins), train=False)
        self.loader = DataLoader(valid_set, batch_size=config.batch_size, num_workers=0)
        self.truth = None
        if config.ground_truth:
            self.truth = ValidationTruth(config.ground_truth, config.volume, data.valid_origins, config.patch,
                                         data.estimated_air if data.air_level is None else data.air_level, config.level)
        save_config(config, self.out_dir / "config.json")
        with writing(self.out_dir / "metrics.csv", advice=KEPT):
            self.log = MetricsLog(self.out_dir, config.wandb, config, run.step if resuming else None)
        run.best_f05 = max(run.best_f05, self.log.best_f05)  # a validation logged after the last checkpoint, whose best.pth was written
        print(f"{len(data.train_origins)} training blocks ({data.dropped} dropped within {config.exclusion_radius} voxels of "
              f"validation), {len(data.valid_origins)} validation blocks; {sum(p.numel() for p in run.model.parameters()):,} "
              f"parameters on {run.device}; air level {data.air_level}, "
              f"input window {data.normalization.low:g}..{data.normalization.high:g}")

    def checkpoint(self, name: str = "last.pth"):
        self.run.save(self.out_dir / name, self.data.recorded_config)

    def validate_and_log(self, train_loss: float, samples_per_s: float) -> dict:
        config, run = self.config, self.run
        learning_rate = config.lr * lr_factor(run.step - 1, config.warmup_steps, config.max_steps)
        network = run.ema.model if run.ema is not None else unwrap(run.model)
        metrics, picture_parts = validate(network, self.loader, run.device, run.dtype, run.channels_last,
                                          config.dice_weight, self.truth, self.data.band, config.pool_sharpness)
        picture = validation_picture(*picture_parts, title=f"step {run.step}: model F0.5 {metrics['valid_f05']:.3f}, best intensity "
                                                         f"threshold F0.5 {metrics['valid_threshold_baseline_f05']:.3f}")
        with writing(self.out_dir, advice=KEPT):
            write_image(self.out_dir / f"valid_{run.step:06d}.png", picture)
            self.log.write({"step": run.step, "lr": learning_rate, "train_loss": train_loss, "samples_per_s": samples_per_s,
                            "skipped_batches": run.skipped_batches, "redraws": run.redraws, **metrics}, picture)
        if metrics["valid_f05"] > run.best_f05:
            run.best_f05 = metrics["valid_f05"]
            self.checkpoint("best.pth")
        return metrics

    def close(self, dropped: int):
        self.log.close()
        if self.truth is not None:
            self.truth.close()
        summary = self.out_dir / "summary.json"
        with writing(summary, advice=KEPT), atomic_output(summary) as temporary:
            temporary.write_text(json.dumps({"step": self.run.step, "best_valid_f05": self.run.best_f05, "skipped_batches":
                                             self.run.skipped_batches, "redraws": self.run.redraws, "dropped_train_blocks": dropped},
                                            indent=2) + "\n")


def run_steps(config, data: TrainData, run: Run, loader: DataLoader, monitor: Monitor | None, world: int):
    """The training loop: a step per batch; every --log_every steps a line, every --checkpoint_every last.pth, every
    --valid_every a validation (rank 0)."""
    device = run.device
    learned = config.ink_depth == "learned"
    image_mode = "bilinear" if config.augmentation == "full" else "nearest"  # exact and none map voxels onto voxels
    started, sample_count, losses, pending = time.perf_counter(), 0, [], []
    with tqdm(total=config.max_steps, initial=run.step, unit="step", desc="train", disable=monitor is None) as bar:
        for images, labels, sample_redraws, *transforms in loader:
            columns = transforms.pop().to(device, non_blocking=True) if learned else None
            learning_rate = config.lr * lr_factor(run.step, config.warmup_steps, config.max_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = learning_rate
            run.redraws += int(sample_redraws.sum())
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            matrices = offsets = None
            if transforms:  # raw crops: normalise, resample and scale the batch here (ink3d.augment)
                matrices, offsets, scales = (t.to(device, non_blocking=True) for t in transforms)
                # maps onto voxels, held on the host, are applied as views of the crops (ink3d.augment.warp)
                maps = transforms[:2] if image_mode == "nearest" else (matrices, offsets)
                images, labels = warp(data.normalization(images), labels, *maps, config.patch, image_mode)
                images = images * scales.view(-1, 1, 1, 1, 1)
            if run.channels_last:
                images = images.contiguous(memory_format=torch.channels_last_3d)
            pending.append(train_step(run.model, run.optimizer, run.scaler, run.ema, images, labels, columns, matrices, offsets,
                                      config, data.band, run.dtype, world))
            run.step += 1
            sample_count += len(images) * world
            rate = sample_count / (time.perf_counter() - started)
            bar.update(1)
            due = [run.step % every == 0 for every in (config.log_every, config.checkpoint_every, config.valid_every)]
            if any(due) or run.step == config.max_steps:
                read_losses(run, pending, losses)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]) if losses else float('nan'):.4f}", samples_per_s=f"{rate:.2f}")
            if monitor:
                report(config, run, monitor, bar, losses, rate, learning_rate)
            if world > 1:
                dist.barrier()


def due(step: int, every: int, config) -> bool:
    """Whether a checkpoint or a validation falls at `step`: every `every` steps, and at the last."""
    return step % every == 0 or step == config.max_steps


def read_losses(run: Run, pending: list, losses: list):
    """The host reads the steps' losses and skips since it last did (one wait for the device)."""
    for loss, skipped in torch.stack(pending).tolist() if pending else []:
        if skipped:
            run.skipped_batches += 1
        else:
            losses.append(loss)
    pending.clear()


def report(config, run: Run, monitor: Monitor, bar: tqdm, losses: list, rate: float, learning_rate: float):
    """What is due after a step: the log line, the checkpoint, then validation (a failing validation loses no training)."""
    def mean_loss(count: int) -> float:
        return float(np.mean(losses[-count:])) if losses else float("nan")

    if run.step % config.log_every == 0:
        bar.write(f"step {run.step}: train loss {mean_loss(config.log_every):.4f}, lr {learning_rate:.2e}, {rate:.2f} samples/s, "
                  f"{run.skipped_batches} skipped batches, {run.redraws} redraws")
    if due(run.step, config.checkpoint_every, config):
        monitor.checkpoint()
    if due(run.step, config.valid_every, config):
        metrics = monitor.validate_and_log(mean_loss(config.valid_every), rate)
        bar.write(f"step {run.step}: valid F0.5 {metrics['valid_f05']:.3f} (intensity threshold "
                  f"{metrics['valid_threshold_baseline_f05']:.3f}), AUC {metrics['valid_auc']:.3f}, loss {metrics['valid_loss']:.4f}"
                  + (f"; 3D F0.5 {metrics['valid_3d_f05']:.3f} (scan {metrics['valid_3d_scan_f05']:.3f})" if monitor.truth else ""))


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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


if __name__ == "__main__":
    run_main(main, interrupted="last.pth holds the last checkpoint (every --checkpoint_every steps): rerun with --resume true")
