"""A small training scene (scan, labels with their columns, block origins), a short training run on it, its metrics."""

import csv

import h5py
import numpy as np

import train
from ink3d import volume
from ink3d.columns import ColumnWriter

COLUMN_BAND = 4.0


def training_scene(tmp_path, unlabeled=False):
    """A random scan with a labeled slab y 8..24 (ink where the scan is bright), and the columns of pixels at y 16
    along y that label it (ink where their band holds ink; none when `unlabeled`)."""
    rng = np.random.default_rng(0)
    scan = rng.integers(0, 256, (32, 32, 32)).astype(np.uint8)
    count = np.zeros(scan.shape, np.uint16)
    count[:, 8:24] = 1
    ink = ((scan > 128) & (count > 0)).astype(np.float32)
    if unlabeled:
        count[:] = 0
        ink[:] = 0
    with h5py.File(tmp_path / "scan.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, scan.shape, np.uint8, chunk=16)[:] = scan
    for name in ("train", "valid"):
        with h5py.File(tmp_path / f"{name}.h5", "w") as file:
            volume.create_volume(file, volume.INK_SUM, scan.shape, np.float32, chunk=16)[:] = ink
            volume.create_volume(file, volume.INK_COUNT, scan.shape, np.uint16, chunk=16)[:] = count
            columns = ColumnWriter(file, scan.shape, 16, COLUMN_BAND)
            if not unlabeled:
                z, x = np.mgrid[0:32, 0:32].reshape(2, -1)
                points = np.stack([z, np.full_like(z, 16), x], axis=1).astype(np.float32)
                normals = np.tile(np.float32([0, 1, 0]), (len(z), 1))
                columns.add(points, normals, np.where(ink[z, 12:21, x].any(axis=1), 255, 0).astype(np.uint8))
    np.save(tmp_path / "train.npy", np.array([[0, 0, 0], [16, 0, 0], [0, 16, 16], [16, 16, 0]], np.int32))
    np.save(tmp_path / "valid.npy", np.array([[16, 16, 16]], np.int32))
    return tmp_path


def train_briefly(root, out, *extra):
    return train.main(["--volume", str(root / "scan.h5"), "--train_labels", str(root / "train.h5"),
                       "--valid_labels", str(root / "valid.h5"), "--train_coords", str(root / "train.npy"),
                       "--valid_coords", str(root / "valid.npy"), "--out_dir", str(out), "--patch", "16",
                       "--f_maps", "4", "--num_levels", "2", "--batch_size", "2", "--max_steps", "4", "--warmup_steps", "1",
                       "--valid_every", "2", "--checkpoint_every", "2", "--workers", "0", "--min_labeled", "1",
                       "--exclusion_radius", "0", "--lr", "0.01", *extra])


def metrics_rows(path):
    """metrics.csv's rows without the measured rate (which differs from run to run)."""
    with open(path, newline="") as file:
        return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(file)]
