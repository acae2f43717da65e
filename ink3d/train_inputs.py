"""The inputs of a training run, opened and checked before it writes anything: the scan and its intensity, the
label volumes and their columns, the coords and the blocks they were made with."""

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ink3d import InputError, volume
from ink3d.columns import COLUMNS
from ink3d.config import config_path_for
from ink3d.coords import drop_near
from ink3d.files import check_output
from ink3d.intensity import Normalization, resolve_air_level, scan_histogram
from ink3d.labels import boxes_with_labels
from ink3d.run_folder import data_fingerprint, read_resume_state
from models import read_state_dict



@dataclass
class TrainData:
    """What a run reads, checked: its blocks, the columns' band, the scan's intensity, and the state it resumes from."""

    train_origins: np.ndarray
    valid_origins: np.ndarray
    dropped: int  # training origins dropped near validation ones
    block: int  # the block edge training samples within
    band: float  # the label columns' band (0: fixed depth)
    air_level: int | None
    estimated_air: int  # the scan's own air level (the 3D score's)
    normalization: Normalization
    fingerprint: dict
    state: dict | None  # last.pth of the run resumed
    recorded_config: dict  # what inference and later stages need to treat the scan as training did


def read_inputs(config, resuming: bool, rank: int) -> TrainData:
    """Open and check every input the run reads, in the order a user would fix them, before anything is written."""
    block = coords_blocks(config)
    learned = config.ink_depth == "learned"
    if learned and config.augment == "cpu":
        raise InputError("--ink_depth learned moves the columns with each crop's transform, where the model runs: use --augment device")
    train_origins, valid_origins = check_inputs(config, resuming)
    check_origins_hold_labels(config, train_origins, valid_origins[:config.valid_blocks], block, rank)
    band = column_band(config.train_labels, learned)
    if learned and column_band(config.valid_labels, learned) != band:
        raise InputError(f"{config.valid_labels}: its columns' band differs from {config.train_labels}'s ({band})")
    fingerprint = data_fingerprint(config)
    state = read_resume_state(Path(config.out_dir) / "last.pth", config, fingerprint) if resuming else None
    if rank == 0:
        check_output(Path(config.out_dir) / "metrics.csv", overwrite=True)
    air_level, normalization, estimated_air = resolve_intensity(config)
    recorded_config = {**vars(config), "normalization": normalization.to_config(), "air_level_value": air_level,
                       "data_fingerprint": fingerprint}
    train_origins, dropped = drop_near(train_origins, valid_origins, config.exclusion_radius)
    if len(train_origins) == 0:
        raise InputError(f"no training blocks left: all {dropped} lie within {config.exclusion_radius:g} voxels of a validation block "
                         "(--exclusion_radius, by default 4 x --patch: lower it for a small area, 0 keeps every block)")
    return TrainData(train_origins, valid_origins[:config.valid_blocks], dropped, block, band, air_level, estimated_air,
                     normalization, fingerprint, state, recorded_config)


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
