"""Predict ink over a whole scan volume (or a region of it) with a sliding 3D window.

    python inference.py --volume runs/demo/scan.h5 --checkpoint runs/demo/train/best.pth --out runs/demo/predictions.h5
    python inference.py --volume /data/scroll1.h5 --checkpoint checkpoints/published_3d_ink.pth \\
        --out /data/scroll1_pred.h5 --roi 6000:7000,2000:5000,2000:5000 --batch_size 8
    python inference.py ... --resume true                       # after an interruption
    torchrun --nproc_per_node=4 inference.py ... --batch_size 8  # several GPUs (see docs/REAL_SCROLL.md)

Windows of `--patch` voxels on the volume's window grid (docs/DESIGN.md: stride
patch * (1 - overlap) from the volume's origin, the last window flush with its far edge) are
blended as probabilities with a Gaussian (or constant) weight and written as
uint8 = round(255 * p) to dataset `predictions`, the scan's shape. The grid belongs to the
volume, not to the region: an `--roi` result is the same voxels' result of a whole-volume run.
The region is processed in output macro-blocks of `--macro_block` voxels, each reading the input its
windows need, so the result equals one pass over the whole region. Windows whose input maximum
is at or below the air level (`--air_level`) are not run and predict 0. The scan is normalised as the checkpoint
records (`scan / 255` when it records nothing). Background threads read the input ahead and write
the output, in slabs of planes, while the model runs.

The output is written as `<out>.partial` and renamed to `<out>` when complete. Each finished
block is recorded, with a checksum of its bytes, after its data is flushed: `--resume true`
verifies the finished blocks (redoing damaged ones) and completes the rest, with the same
settings and the same weights (the plan records their SHA-256). A full disk stops the run with
a named error; free space and resume.

Under torchrun each rank takes every world_size-th block and writes its own part file
`<out>.rank<r>-of-<n>.h5` (HDF5 has one writer per file); when all ranks are done rank 0
merges the parts into `<out>` and deletes them.
"""

import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ink3d import InputError, volume
from ink3d.block_pipeline import BlockWriter, Timing, predict_blocks
from ink3d.blocks import parse_roi
from ink3d.config import RESUMABLE, config_path_for, parse_config, run_main, save_config
from ink3d.device import autocast_dtype, prepare_model, resolve_device, switch
from ink3d.files import (OutputBusy, finish_output, output_file, output_lock, refuse_inputs_as_outputs, resumable_output,
                         warn_if_short_of_space, writing)
from ink3d.intensity import Normalization, parse_air_level, scan_air_level
from ink3d.prediction_file import PLAN_KEYS, check_plan, hdf5_writer, merge_parts, open_output, verify_blocks
from ink3d.prediction_store import CHUNK, PredictionStore, chunk_for, is_store
from ink3d.sliding_window import FLIPS, WindowPredictor, batch_fill, fuller_batches, plan_blocks
from models import model_from_checkpoint, read_checkpoint, weights_digest

# --- config ---
VOLUME = "runs/demo/scan.h5"  # scan volume (dataset scan_volume)
LEVEL = 0  # OME-Zarr inputs: the multiscale level to read (0 = full resolution)
CHECKPOINT = "runs/demo/train/best.pth"  # train.py checkpoint or the published model.-prefixed state_dict
OUT = "runs/demo/predictions.h5"  # prediction volume (uint8, the scan's shape): HDF5 (dataset predictions), or an OME-Zarr store when it ends in .zarr
ROI = ""  # z0:z1,y0:y1,x0:x1 to predict; empty = the whole volume
PATCH = 0  # window edge in voxels; 0: the patch the checkpoint was trained with (128 for one that records none)
OVERLAP = 0.5  # window overlap fraction: stride = patch * (1 - overlap)
BLEND = "gaussian"  # gaussian or constant window weights
BATCH_SIZE = 4  # windows per forward pass
MACRO_BLOCK = 512  # output macro-block edge (a multiple of the stride): bounds memory, unit of resuming
AIR_LEVEL = "auto"  # windows whose input maximum is at or below this are air: not run, predicted 0. auto: the level the checkpoint was trained with (0 when it records none), none: run every window, or a number (uint8)
TTA = False  # test-time augmentation: average the 8 flips of the window (identity, each axis, each pair, all three; 8x the compute)
DEVICE = "auto"  # auto (cuda if present), cuda, cuda:1, cpu
AMP = "auto"  # autocast dtype: auto (bf16 on CUDA where supported, else fp16; fp32 on CPU), bf16, fp16, fp32
CHANNELS_LAST = "auto"  # channels_last_3d memory format: auto (on the CPU, where it is faster; not on CUDA), true, false
COMPILE = "auto"  # torch.compile the model: auto (on CUDA, where the compiled model ran ~3.6x the eager one), true, false
TRUST_CHECKPOINT = False  # allow a checkpoint with pickled Python objects (only for files you trust)
WEIGHTS = "ema"  # ema: the checkpoint's moving average of the weights where it has one; raw: the trained weights
PARTS = 1  # OME-Zarr output (--out X.zarr): the number of independent workers sharing the work (a shell loop, a SLURM array, torchrun)
PART = 0  # ... and which of them this is (0 .. parts - 1): it runs every parts-th macro-block
FINALIZE = False  # OME-Zarr output: only build the lower levels and mark the store complete (once every part is done)
VOXEL_SIZE = 0.0  # OME-Zarr output: voxel size in micrometres for the viewers; 0 = the scan's OME-Zarr metadata (1, no unit, without)
RESUME = False  # complete an interrupted run into the same output
OVERWRITE = False  # replace an existing output


DEFAULT_PATCH = 128  # windows for a checkpoint that records no training patch (the published one's)
BATCH_FILL_WARNING = 0.9  # warn when the windows take less than this share of the batches' slots
AIR_LEVEL_TOLERANCE = 8  # warn when the checkpoint's air level and the scan's own differ by more than this (uint8 levels)


def skipped_air(setting: str, trained: int | None) -> int:
    """The `--air_level` as the window predictor's threshold: -1 runs every window."""
    try:
        level = parse_air_level(setting, ("auto", "none"))
    except ValueError as error:
        raise InputError(f"--air_level {error}") from None
    if level == "auto":
        return trained or 0
    return -1 if level == "none" else level


def warn_if_trained_on_other_air(trained: int, scan) -> None:
    """A model trained on another scan skips windows by that scan's air level: say so where this scan's own differs."""
    own = scan_air_level("auto", scan)
    if abs(own - trained) > AIR_LEVEL_TOLERANCE:
        warnings.warn(f"the checkpoint was trained on a scan whose air level was {trained}; this scan's own is {own}: windows "
                      f"at or below {trained} are skipped as air (--air_level {own} skips by this scan's)", stacklevel=2)


def plan_attrs(config, shape, region, normalization: Normalization, weights_sha256: str) -> dict:
    return {
        "volume_shape": list(shape), "roi": [[s.start, s.stop] for s in region], "patch": config.patch,
        "overlap": config.overlap, "blend": config.blend, "block": config.macro_block, "block_grid": "volume", "air_level": config.air_level,
        "tta": len(FLIPS) if config.tta else False, "checkpoint": str(Path(config.checkpoint).resolve()), "weights": config.weights,
        "weights_sha256": weights_sha256, "normalization": normalization.to_config(),
    }


def main(argv=None):
    config = parse_config(globals(), argv)
    refuse_inputs_as_outputs({"volume": config.volume, "checkpoint": config.checkpoint}, {"out": config.out})
    out = Path(config.out)
    rank, world = (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    if is_store(out):
        parts, part = (world, rank) if world > 1 else (config.parts, config.part)
        if part >= parts:
            raise InputError(f"--part {part}: must be below --parts {parts} (parts are numbered 0..{parts - 1})")
        with output_lock(out.with_name(f"{out.name}.part{part}-of-{parts}")):
            return predict_into_store(config, out, parts, part)
    if config.parts > 1 or config.finalize:
        raise InputError(f"{out}: --parts and --finalize write an OME-Zarr store; give --out a name ending in .zarr")
    mine = out if world == 1 else out.with_name(f"{out.name}.rank{rank}-of-{world}.h5")
    with output_lock(*([mine] if rank else [out, mine] if world > 1 else [out])):
        return predict(config, out)


@dataclass
class Run:
    """What every form of output shares: the scan, the region's blocks, the plan and the model around its windows."""

    scan_file: object
    scan: object
    region: tuple
    blocks: list
    attrs: dict
    predictor: WindowPredictor
    device: torch.device


def prepare(config, device: torch.device) -> Run:
    scan_file, scan = volume.open_dataset(config.volume, volume.SCAN, level=config.level)
    try:
        checkpoint = read_checkpoint(config.checkpoint, config.trust_checkpoint)
        recorded = (checkpoint.get("config") if isinstance(checkpoint, dict) else None) or {}
        if not config.patch:  # the windows the model was trained on
            config.patch = int(recorded.get("patch") or DEFAULT_PATCH)
            print(f"windows of {config.patch} voxels: " + ("the checkpoint's training patch" if recorded.get("patch") else
                                                           "the checkpoint records no training patch") + " (--patch)")
        stride = int(config.patch * (1 - config.overlap))
        if not 0 < stride <= config.patch or config.macro_block % stride:
            raise InputError(f"--overlap {config.overlap} gives stride {stride} (--patch {config.patch}); it must be in 1..patch "
                             f"and divide --macro_block {config.macro_block}")
    except BaseException:
        scan_file.close()
        raise
    region = parse_roi(config.roi, scan.shape)
    blocks = plan_blocks(region, tuple(slice(0, size) for size in scan.shape), config.patch, stride, config.macro_block)
    normalization = Normalization.from_config(checkpoint.get("config") if isinstance(checkpoint, dict) else None)
    model = model_from_checkpoint(checkpoint, config.checkpoint, weights=config.weights)
    setting, config.air_level = config.air_level, skipped_air(config.air_level, recorded.get("air_level_value"))
    print(f"air level {config.air_level} (--air_level {setting}): windows with no scan value above it are skipped"
          if config.air_level >= 0 else "--air_level none: every window is predicted")
    if setting == "auto" and recorded.get("air_level_value") is not None:
        warn_if_trained_on_other_air(config.air_level, scan)
    attrs = plan_attrs(config, scan.shape, region, normalization, weights_digest(model))
    channels_last = switch(config.channels_last, "--channels_last", on_cuda=False, on_cpu=True, device=device)
    model = prepare_model(model, device, channels_last=channels_last,
                          compile=switch(config.compile, "--compile", on_cuda=True, on_cpu=False, device=device))
    fill = batch_fill(config.patch, stride, config.macro_block, config.batch_size)
    if fill < BATCH_FILL_WARNING:
        advice = fuller_batches(config.patch, stride, config.macro_block, config.batch_size, CHUNK)
        warnings.warn(f"--batch_size {config.batch_size} with --macro_block {config.macro_block}: a block's batches run {fill:.0%} "
                      f"full (each window keeps its slot; the empty ones repeat a window), so the model does {1 / fill:.2f}x "
                      "the work" + (f"; {advice} fills them" if advice else ""), stacklevel=2)
    predictor = WindowPredictor(model, config.patch, config.blend, config.batch_size, device,
                                autocast_dtype(device, config.amp), channels_last, config.air_level, config.tta,
                                normalization, stride, keep_freed_memory=device.type == "cpu")
    return Run(scan_file, scan, region, blocks, attrs, predictor, device)


def run_blocks(run: Run, writer: BlockWriter, mine, todo, show: bool) -> tuple[int, Timing]:
    """Predict the blocks `todo` into `writer`, with a progress bar over this worker's blocks `mine`;
    (windows skipped, timing)."""
    timing = Timing()
    total, remaining = (sum(int(np.prod([s.stop - s.start for s in b.output])) for b in blocks) for blocks in (mine, todo))
    with tqdm(total=total, initial=total - remaining, unit="vox", unit_scale=True, desc="inference", disable=not show) as bar:
        skipped = predict_blocks(run.scan, writer, todo, run.predictor, run.device, bar, timing)
    return skipped, timing


def report(todo, skipped: int, timing: Timing, started: float, out: Path) -> None:
    windows = sum(len(b.windows) for b in todo)
    print(f"{len(todo)} blocks, {windows} windows ({skipped} skipped as air) in {time.perf_counter() - started:.1f} s -> {out}")
    print(timing.line())


def predict_into_store(config, out: Path, parts: int, part: int) -> Path:
    """Worker `part` of `parts`: predict every parts-th block into the OME-Zarr store `out`, then finalize it when
    every block is recorded (or `--finalize true` asks)."""
    device = resolve_device(config.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if config.overwrite and parts > 1:
        raise InputError("--overwrite true with --parts: one worker would delete the others' work; remove the store, then start them")
    run = prepare(config, device)
    started = time.perf_counter()
    with run.scan_file:
        chunk = chunk_for(config.macro_block)
        voxel_size, unit = ([config.voxel_size] * 3, "micrometer") if config.voxel_size else store_voxel_size(run.scan)
        plan = {key: run.attrs[key] for key in PLAN_KEYS}  # workers may name the same weights by other paths
        store = PredictionStore.open(out, run.scan.shape, plan, chunk, voxel_size, unit, config.overwrite)
        if store.complete():
            print(f"{out} is complete; nothing to do (--overwrite true redoes it)")
            return out
        mine = [b for b in run.blocks if b.index % parts == part]
        recorded = set(store.finished())
        if recorded & {b.index for b in mine} and not config.resume:
            raise InputError(f"{out}: part {part} of {parts} has finished blocks already; --resume true continues it")
        with writing(out, advice="free disk space and start this worker again with --resume true"):
            intact, damaged = store.verify(mine) if config.resume else ([], 0)
        if intact or damaged:
            print(f"resuming part {part} of {parts}: {len(intact)} finished blocks verified" + (f", {damaged} damaged ones redone" if damaged else ""))
        finished = set(intact)
        todo = [] if config.finalize else [b for b in mine if b.index not in finished]

        advice = "what was finished is kept: free disk space and start this worker again with --resume true"

        def slab(block, planes, values):
            with writing(out, advice=advice):
                store.write_slab(block, planes, values)

        def finish(block, crc):
            with writing(out, advice=advice):
                store.record_finished(block, crc)

        writer = BlockWriter(slab, finish, store.level0.chunks[0])
        skipped, timing = run_blocks(run, writer, mine, todo, part == 0)
    missing = len(run.blocks) - len(store.finished())
    if missing and config.finalize:
        raise InputError(f"{out}: {missing} blocks are not finished yet; run the parts that hold them (with --resume true), then finalize")
    if not missing:
        finalize(store, out)
    else:
        print(f"part {part} of {parts} done; {missing} blocks of other parts to go before {out} is complete")
    save_config(config, config_path_for(out.with_name(f"{out.name}.part{part}-of-{parts}")))
    report(todo, skipped, timing, started, out)
    return out


def finalize(store: PredictionStore, out: Path) -> None:
    """Build the lower levels and mark the store complete, unless another worker is doing it."""
    try:
        with output_lock(out.with_name(f"{out.name}.finalize")):
            if store.complete():
                return
            with writing(out, advice="free disk space and run any worker again with --finalize true"):
                levels = store.finalize()
            print(f"{out}: every block finished; {levels} levels written, complete")
    except OutputBusy:
        print(f"{out}: another worker is finalizing it")


def store_voxel_size(scan) -> tuple[list[float], str]:
    """The zyx voxel size (and its unit) the scan's OME-Zarr metadata gives its level, or 1 without a unit."""
    metadata = getattr(scan, "voxel_size", None)
    return (list(metadata[0]), metadata[1]) if metadata else ([1.0, 1.0, 1.0], "")


def predict(config, out: Path) -> Path:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = resolve_device(config.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    target = resumable_output(out, config.overwrite, config.resume)
    if target is None:  # complete: what was asked for only if made with the same plan
        run = prepare(config, device)
        with run.scan_file, h5py.File(out, "r") as file:
            check_plan(out, json.loads(file[volume.PREDICTIONS].attrs["plan"]), run.attrs)
        print(f"{out} is complete; nothing to resume (--overwrite true redoes it)")
        return out
    part = target[0] if world == 1 else out.with_name(f"{out.name}.rank{rank}-of-{world}.h5")
    if world > 1 and part.exists() and not (config.resume or config.overwrite):
        raise InputError(f"{part} exists (an interrupted run?); pass --resume true to complete it or --overwrite true")
    resuming = config.resume and not config.overwrite and part.exists()
    run = prepare(config, device)
    if rank == 0:
        warn_if_short_of_space(out, int(np.prod([r.stop - r.start for r in run.region])))

    file = open_output(part, run.scan.shape, run.attrs, len(run.blocks), resuming, volume.level_scale(run.scan))
    started = time.perf_counter()
    with output_file(file, part), run.scan_file:
        mine = [b for b in run.blocks if b.index % world == rank]
        if resuming:
            with writing(part):
                verified, damaged = verify_blocks(file, mine)
            if rank == 0:
                print(f"resuming: {verified} finished blocks verified" + (f", {damaged} damaged ones redone" if damaged else ""))
        done = file[volume.FINISHED_BLOCKS][:]
        todo = [b for b in mine if not done[b.index]]
        skipped, timing = run_blocks(run, hdf5_writer(file), mine, todo, rank == 0)
        if world == 1:
            with writing(part):
                file[volume.PREDICTIONS].attrs["complete"] = True
                file.flush()
    if world == 1:
        finish_output(part, out)
    if distributed:
        dist.barrier()
    if world > 1 and rank == 0:
        merge_parts(out, [out.with_name(f"{out.name}.rank{r}-of-{world}.h5") for r in range(world)], run.blocks, run.attrs,
                    volume.level_scale(run.scan))
    if rank == 0:
        save_config(config, config_path_for(out))
        report(todo, skipped, timing, started, out)
    if distributed:
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    run_main(main, interrupted=RESUMABLE)
