"""view.py draws the prediction over its scan where it is high, at each volume's voxel size, from HDF5 and OME-Zarr.

Runs where napari is installed (pip install -r requirements-viewer.txt) and a display is at hand: $DISPLAY, or Xvfb,
started here; skipped with the reason otherwise."""

import importlib.util
import os
import shutil
import subprocess
import sys

import cv2
import h5py
import numpy as np
import pytest

from conftest import ROOT
from ink3d import volume
from ink3d.pyramid import write_ome_zarr

pytestmark = pytest.mark.skipif(importlib.util.find_spec("napari") is None,
                                reason="napari is not installed (pip install -r requirements-viewer.txt)")

SHAPE = (16, 48, 64)
SCAN_GREY = 100


@pytest.fixture(scope="module")
def display():
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    if shutil.which("Xvfb") is None:
        pytest.skip("no display: neither $DISPLAY nor Xvfb (apt install xvfb)")
    read, write = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                              pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    probe = subprocess.run([sys.executable, "-c", "from qtpy.QtWidgets import QApplication; QApplication([])"],
                           env={**os.environ, "DISPLAY": f":{number}"}, capture_output=True, text=True, timeout=60)
    if probe.returncode:
        server.terminate()
        pytest.skip(f"Qt cannot open the display (system libraries missing?): {probe.stderr.strip().splitlines()[-1:]}")
    yield f":{number}"
    server.terminate()
    server.wait()


def _volumes(root):
    """A uniform grey scan; predictions 255 in the left half of x (0 elsewhere), as HDF5 and as a two-level OME-Zarr;
    labels: ink in the right half of the middle slices; blobs: none."""
    scan = np.full(SHAPE, SCAN_GREY, np.uint8)
    predictions = np.zeros(SHAPE, np.uint8)
    predictions[:, :, : SHAPE[2] // 2] = 255
    with h5py.File(root / "scan.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, SHAPE, np.uint8)[:] = scan
    with h5py.File(root / "predictions.h5", "w") as file:
        volume.create_volume(file, volume.PREDICTIONS, SHAPE, np.uint8)[:] = predictions
    write_ome_zarr(root / "predictions.zarr", predictions, levels=2, chunk=16)
    count = np.zeros(SHAPE, np.float32)
    count[:, :, SHAPE[2] // 2:] = 1
    with h5py.File(root / "labels.h5", "w") as file:
        volume.create_volume(file, volume.INK_SUM, SHAPE, np.float32)[:] = count
        volume.create_volume(file, volume.INK_COUNT, SHAPE, np.float32)[:] = count


def _screenshot(display, root, *flags) -> np.ndarray:
    out = root / f"view{len(list(root.glob('view*.png')))}.png"
    run = subprocess.run([sys.executable, "view.py", *flags, "--screenshot", str(out)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb"}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    picture = cv2.imread(str(out))
    drawn = np.argwhere(picture.sum(axis=2) > 0)  # the volume's extent on the black canvas
    (top, left), (bottom, right) = drawn.min(axis=0), drawn.max(axis=0) + 1
    return picture[top:bottom, left:right]


def _halves(picture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean colour (BGR) of the left and the right fifth of the drawn volume, over its middle rows."""
    rows = picture[picture.shape[0] // 4: 3 * picture.shape[0] // 4]
    fifth = picture.shape[1] // 5
    return rows[:, :fifth].reshape(-1, 3).mean(axis=0), rows[:, -fifth:].reshape(-1, 3).mean(axis=0)


def test_the_prediction_is_drawn_over_its_scan_where_it_is_high(display, tmp_path):
    _volumes(tmp_path)
    high, low = _halves(_screenshot(display, tmp_path, "--volume", str(tmp_path / "scan.h5"), "--predictions",
                                    str(tmp_path / "predictions.h5")))
    assert np.all(high > 240)  # magma's brightest over the grey scan, added
    assert np.all(np.abs(low - SCAN_GREY) < 6)  # the scan alone where the prediction is 0


def test_an_ome_zarr_level_lines_up_with_a_full_resolution_scan(display, tmp_path):
    """Level 1 of the predictions (half the voxels, voxel size 2) covers the HDF5 scan's extent; at voxel size 1 it would
    cover its top left quarter only, and the middle rows' left fifth would show the scan alone."""
    _volumes(tmp_path)
    picture = _screenshot(display, tmp_path, "--volume", str(tmp_path / "scan.h5"), "--predictions",
                          str(tmp_path / "predictions.zarr"), "--level", "1")
    high, low = _halves(picture)
    assert np.all(high > 240) and np.all(np.abs(low - SCAN_GREY) < 6)
    assert abs(picture.shape[1] / picture.shape[0] - SHAPE[2] / SHAPE[1]) < 0.05  # the scan's extent, not level 1's alone


def test_labels_are_drawn_where_labeled(display, tmp_path):
    _volumes(tmp_path)
    _, labeled = _halves(_screenshot(display, tmp_path, "--volume", str(tmp_path / "scan.h5"), "--predictions",
                                     str(tmp_path / "predictions.h5"), "--labels", str(tmp_path / "labels.h5")))
    assert np.ptp(labeled) > 20  # the ink label's colour over the grey scan, no longer grey
