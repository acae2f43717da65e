"""metrics.csv of a training run, cut back to a resumed step, and its mirror on Weights & Biases."""

import csv
import os
from pathlib import Path

import numpy as np

from ink3d.files import atomic_output


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
