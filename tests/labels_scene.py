"""A scene for all_labels_to_hdf: an empty scan, folders of segments and labels, segments added to it, the run, its output."""

import cv2
import h5py
import numpy as np
import pytest

import all_labels_to_hdf
from ink3d import volume
from ink3d.ppm import write_ppm


SHAPE = (20, 30, 40)


@pytest.fixture
def scene(tmp_path):
    """An empty scan volume and folders for segments."""
    with h5py.File(tmp_path / "scan.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, SHAPE, np.uint8, chunk=8)
    (tmp_path / "paths").mkdir()
    (tmp_path / "labels").mkdir()
    return tmp_path


def add_segment(root, segment_id, data, label, mask=None):
    folder = root / "paths" / segment_id
    folder.mkdir(parents=True, exist_ok=True)
    write_ppm(folder / f"{segment_id}.ppm", data)
    cv2.imwrite(str(root / "labels" / f"{segment_id}_inklabels.png"), label)
    if mask is not None:
        cv2.imwrite(str(folder / f"{segment_id}_mask.png"), mask)


def flat_segment(height=10, width=12, z=10.0, x0=5, y0=7):
    """A flat surface at constant z, normal +z; left half ink, right half none."""
    rows, cols = np.mgrid[0:height, 0:width]
    data = np.zeros((height, width, 6))
    data[..., 0], data[..., 1], data[..., 2], data[..., 5] = x0 + cols, y0 + rows, z, 1.0
    label = np.where(cols < width // 2, 255, 0).astype(np.uint8)
    return data, label


def run(root, *extra, valid="", band="2"):
    """all_labels_to_hdf on the scene; the ink range covers the whole band unless `extra` narrows it."""
    argv = ["--ppm_dir", str(root / "paths"), "--labels_dir", str(root / "labels"), "--volume", str(root / "scan.h5"),
            "--out_train", str(root / "train.h5"), "--out_valid", str(root / "valid.h5"),
            "--valid_segments", valid, "--band", band, "--chunk", "8", "--ink_back", "99", "--ink_front", "99", *extra]
    return all_labels_to_hdf.main(argv)


def read(path):
    with h5py.File(path) as file:
        return file[volume.INK_SUM][:], file[volume.INK_COUNT][:], dict(file.attrs)


def cylinder_segment(radius=9.0, centre_xy=(20.0, 15.0), z0=6):
    """An arc of a cylinder along z (14 angles x 8 slices) as .ppm data, its normals pointing out."""
    theta, z = np.meshgrid(np.linspace(0.2, 2.2, 14), np.arange(z0, z0 + 8, dtype=float), indexing="ij")
    normal = np.stack([np.cos(theta), np.sin(theta), np.zeros_like(theta)], axis=-1)
    points = np.stack([centre_xy[0] + radius * np.cos(theta), centre_xy[1] + radius * np.sin(theta), z], axis=-1)
    return np.concatenate([points, normal], axis=-1)
