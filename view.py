"""Look at a prediction over its scan in napari: the scan in grey, the predicted ink in magma over it (additive),
each volume at its own voxel size, so that an OME-Zarr level and a full-resolution HDF5 volume line up.

    python view.py --volume runs/demo/scan.h5 --predictions runs/demo/predictions.h5
    python view.py --volume /data/scroll1.zarr --predictions /shared/scroll1_pred.zarr --level 2
    python view.py ... --labels runs/demo/labels_valid.h5 --blobs runs/demo/blobs/blob_labels.h5
    python view.py ... --screenshot view.png      # draw the window once, save its canvas and exit

Volumes are read as napari shows them, a slice at a time (HDF5, zarr arrays, OME-Zarr groups, prediction stores):
nothing reads a whole volume. `--labels` shows a label volume's labeled voxels (ink and no ink, from all_labels_to_hdf),
`--blobs` connected_components_explore's blob ids. napari is not one of the pipeline's requirements:
`pip install -r requirements-viewer.txt` (napari with PyQt6). On a machine without a display, run it under
`xvfb-run`, e.g. with `--screenshot`.
"""

import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

from pathlib import Path

import numpy as np

from ink3d import InputError, volume
from ink3d.config import parse_config, run_main
from ink3d.files import check_output, refuse_inputs_as_outputs, write_image

# --- config ---
VOLUME = "runs/demo/scan.h5"  # the scan: an HDF5 file (dataset scan_volume), a zarr array or an OME-Zarr group
PREDICTIONS = "runs/demo/predictions.h5"  # the prediction: an HDF5 file (dataset predictions) or an OME-Zarr store
LEVEL = 0  # OME-Zarr inputs: the multiscale level to show (an HDF5 volume shows its one resolution)
LABELS = ""  # optional: a label volume of all_labels_to_hdf, shown as ink (2) and no ink (1) where labeled
BLOBS = ""  # optional: blob_labels.h5 of connected_components_explore (--keep_labels true), one colour per blob
SCREENSHOT = ""  # save the drawn canvas to this PNG and exit instead of opening the window for use

NO_INK, INK = 1, 2  # label values of the labels layer (0: unlabeled)


class LabeledVoxels:
    """A label volume (ink_sum, ink_count) read as napari reads an array: 0 unlabeled, NO_INK, INK (mean label >= 0.5),
    a slice at a time."""

    def __init__(self, ink_sum, ink_count):
        self.ink_sum, self.ink_count = ink_sum, ink_count
        self.shape, self.dtype, self.ndim = tuple(ink_count.shape), np.dtype(np.uint8), 3
        self.scale = volume.level_scale(ink_count)

    def __getitem__(self, key) -> np.ndarray:
        count = np.asarray(self.ink_count[key])
        ink = np.asarray(self.ink_sum[key]) >= 0.5 * count
        return np.where(count > 0, np.where(ink, INK, NO_INK), 0).astype(np.uint8)


def main(argv=None):
    config = parse_config(globals(), argv)
    inputs = {key: getattr(config, key) for key in ("volume", "predictions", "labels", "blobs") if getattr(config, key)}
    if config.screenshot:
        refuse_inputs_as_outputs(inputs, {"screenshot": config.screenshot})
        check_output(Path(config.screenshot), overwrite=True)
    return view(config)


def view(config):
    """Open every volume before the viewer starts (a bad input is named without a window), then show them."""
    handles, layers = [], []
    try:
        for path, name, kind in ((config.volume, volume.SCAN, "scan"), (config.predictions, volume.PREDICTIONS, "predictions"),
                                 (config.labels, volume.INK_COUNT, "labels"), (config.blobs, volume.BLOB_LABELS, "blobs")):
            if not path:
                continue
            level = config.level if Path(path).is_dir() else 0  # an HDF5 volume holds one resolution
            file, dataset = volume.open_dataset(path, name, level=level)
            handles.append(file)
            if kind == "labels":
                sums_file, sums = volume.open_dataset(path, volume.INK_SUM, level=level)
                handles.append(sums_file)
                dataset = LabeledVoxels(sums, dataset)
            scale = volume.level_scale(dataset)
            layers.append((kind, dataset, scale))
            print(f"{kind}: {path}, shape {tuple(dataset.shape)}, voxel size {scale.tolist()} (zyx, in voxels of full resolution)")
        show(layers, config.screenshot)
    finally:
        for handle in handles:
            handle.close()


def show(layers, screenshot: str):
    try:
        import napari
    except ImportError:
        raise InputError("napari is not installed: pip install -r requirements-viewer.txt") from None
    viewer = napari.Viewer(title="3d-ink-detection", show=True)
    for kind, data, scale in layers:
        if kind == "scan":
            viewer.add_image(data, name="scan", colormap="gray", contrast_limits=(0, 255), scale=scale)
        elif kind == "predictions":  # uint8 = round(255 p)
            viewer.add_image(data, name="predictions", colormap="magma", contrast_limits=(0, 255), blending="additive",
                             scale=scale)
        else:
            viewer.add_labels(data, name=kind, scale=scale, opacity=0.5)
    viewer.reset_view()
    if not screenshot:
        napari.run()
        return None
    picture = viewer.screenshot(canvas_only=True, flash=False)
    viewer.close()
    write_image(Path(screenshot), np.ascontiguousarray(picture[..., 2::-1]))  # RGBA -> BGR
    print(f"screenshot: {screenshot}")
    return picture


if __name__ == "__main__":
    run_main(main)
