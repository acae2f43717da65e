"""A training run's output folder: what an earlier run left there, and the last.pth a run resumes from.

A resumed run reads the same data (unless --allow_new_data) and keeps the settings that define the model, the sample
stream and the schedule; the label and coords files are compared by size and checksum too.
"""

from pathlib import Path

import torch

from ink3d import InputError
from ink3d.files import file_checksum

DATA_KEYS = ("volume", "train_labels", "valid_labels", "train_coords", "valid_coords")
FINGERPRINTED = ("train_labels", "valid_labels", "train_coords", "valid_coords")
RESUME_KEYS = ("patch", "block", "batch_size", "lr", "weight_decay", "warmup_steps", "max_steps", "f_maps", "num_levels",
               "num_groups", "seed", "dice_weight", "min_labeled", "max_tries", "exclusion_radius", "label_smoothing",
               "air_level", "background_weight", "ema_decay", "input_normalization", "percentiles", "augmentation", "ink_depth",
               "pool_sharpness", "column_weight", "face_depth", "ink_reach", "max_columns")
RESUME_STATE = ("model", "config", "optimizer", "scaler", "step", "best_f05", "skipped_batches", "torch_rng", "python_rng")
KEPT = "last.pth holds the last checkpoint: free disk space and rerun with --resume true"
EARLIER_RUN = ("last.pth", "best.pth", "metrics.csv", "summary.json", "config.json")  # what a run leaves in its out_dir


def claim_out_dir(out_dir: Path, config, rank: int) -> bool:
    """Apply the output folder's rules before anything is read or written: an earlier run's outputs are removed
    with --overwrite, continued with --resume (from its last.pth), and refused otherwise. Returns whether this
    run resumes."""
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
    return resuming


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
