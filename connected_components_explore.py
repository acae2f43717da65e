"""3D blobs of the ink prediction: a table, a picture per plausibly letter-sized blob, a page to browse.

    python connected_components_explore.py --predictions runs/demo/predictions.h5 --volume runs/demo/scan.h5 \\
        --out_dir runs/demo/blobs --min_size 200 --max_size 200000

The prediction is thresholded block by block (with `--volume` and `--air_level`, voxels of air are
left out: ink needs material) and labeled with connected-components-3d
(26-connectivity); labels are joined across block faces, so a blob crossing block borders is
one blob (ink3d/components.py). Writes `blobs.csv` (id, voxels, bbox, centroid, mean and max
probability, and with `--ground_truth` the blob's voxels that are true ink; ids by decreasing size), for each blob with min_size <= voxels <= max_size a PNG of
three orthogonal maximum projections of the prediction over its bounding box (plus margin),
beside the scan's slices through the blob's centroid when `--volume` is given, and
`index.html`, a contact sheet of those PNGs sorted by size.
"""

import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

import csv
import html
import tempfile
from pathlib import Path

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from ink3d import InputError, blocks, volume
from ink3d.components import Blobs, blob_overlap, label_blocks, write_blob_labels
from ink3d.config import config_path_for, parse_config, run_main, save_config
from ink3d.files import (atomic_output, check_output, output_file, output_lock, refuse_inputs_as_outputs, write_image,
                         writing)
from ink3d.intensity import scan_air_level

# --- config ---
PREDICTIONS = "runs/demo/predictions.h5"  # prediction volume (uint8, 255 = ink probability 1)
LEVEL = 0  # OME-Zarr inputs: the multiscale level to read (0 = full resolution)
DATASET = "predictions"  # dataset to threshold
VOLUME = ""  # optional scan volume: its views are shown beside the prediction's
OUT_DIR = "runs/demo/blobs"  # blobs.csv, PNGs and index.html go here
THRESHOLD = 0.5  # ink probability at or above which a voxel is ink
AIR_LEVEL = "auto"  # with --volume: only voxels whose scan value exceeds this can be ink; auto: estimated from the scan's histogram, otsu, none (no filter), or a number (uint8)
MIN_SIZE = 100  # smallest blob (voxels) that gets a picture
MAX_SIZE = 1000000  # largest blob (voxels) that gets a picture
MAX_VIEWS = 500  # pictures for at most this many blobs (largest first)
MACRO_BLOCK = 256  # edge of the blocks labeled at a time: bounds memory
ROI = ""  # z0:z1,y0:y1,x0:x1 to explore; empty = the whole volume
MARGIN = 8  # voxels around a blob's bounding box in its pictures
VIEW_SIZE = 160  # each view is scaled to about this many pixels
KEEP_LABELS = False  # also write out_dir/blob_labels.h5 (dataset labels: blob ids of blobs.csv)
GROUND_TRUTH = ""  # optional ground-truth ink volume (the synthetic scroll's): each blob's share of true ink voxels
OVERWRITE = False  # replace existing outputs


CSV_FIELDS = ["id", "voxels", "z0", "y0", "x0", "z1", "y1", "x1", "centroid_z", "centroid_y", "centroid_x",
              "mean_probability", "max_probability", "true_ink_voxels"]


def write_csv(path: Path, blobs: Blobs, true_ink: np.ndarray | None) -> None:
    with atomic_output(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_FIELDS)
        for i in range(len(blobs)):
            writer.writerow([i + 1, int(blobs.voxels[i]), *blobs.bbox_low[i].tolist(), *blobs.bbox_high[i].tolist(),
                             *(f"{c:.2f}" for c in blobs.centroid[i]),
                             f"{blobs.mean_value[i] / 255:.4f}", f"{blobs.max_value[i] / 255:.4f}",
                             "" if true_ink is None else int(true_ink[i])])


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    scale = size / max(image.shape)
    shape = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, shape, interpolation=cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA)


OUTLINE = (0, 140, 255)  # BGR orange: the blob's outline on its scan slices


def _outlined(image: np.ndarray, mask: np.ndarray | None, size: int) -> np.ndarray:
    """A grey view fitted to `size`, in colour, with the outline of `mask` (the blob's voxels in it) drawn on it."""
    fitted = cv2.cvtColor(_fit(image, size), cv2.COLOR_GRAY2BGR)
    if mask is not None and mask.any():
        fitted_mask = cv2.resize(mask.astype(np.uint8), fitted.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(fitted_mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(fitted, contours, -1, OUTLINE, 1)
    return fitted


def _row(views: list[np.ndarray]) -> np.ndarray:
    height = max(view.shape[0] for view in views)
    return np.concatenate([np.pad(view, ((0, height - view.shape[0]), (0, 4), (0, 0))) for view in views], axis=1)


NEIGHBOURS = 1 / 3  # brightness of other voxels of the box, beside the blob's own, in its projections


def blob_caption(blobs: Blobs, i: int, true_ink: np.ndarray | None) -> str:
    """What a blob's picture and its gallery entry say of it."""
    c = blobs.centroid[i]
    caption = (f"#{i + 1}: {int(blobs.voxels[i])} voxels, centre z {c[0]:.0f} y {c[1]:.0f} x {c[2]:.0f}, "
               f"max p {blobs.max_value[i] / 255:.2f}")
    return caption + ("" if true_ink is None else f", {true_ink[i] / blobs.voxels[i]:.0%} true ink")


def blob_picture(predictions, scan, low, high, centroid, size: int, blob_mask: np.ndarray | None = None, caption: str = "") -> np.ndarray:
    """`caption` above the maximum projections along z, y, x of the prediction: the blob's own voxels (`blob_mask`, in
    the box) at full brightness, the rest of the box (neighbouring sheets and blobs) dimmed; under them, the scan's
    slices through the centroid, with the outline of the blob where the slice cuts it. BGR."""
    box = volume.read_crop(predictions, low, high - low)
    if blob_mask is not None:
        box = np.where(blob_mask, box, (box * NEIGHBOURS).astype(box.dtype))
    rows = [_row([_outlined(box.max(axis=axis), None, size) for axis in range(3)])]
    if scan is not None:
        crop = volume.read_crop(scan, low, high - low)
        middle = np.clip(np.round(centroid).astype(int) - low, 0, np.array(crop.shape) - 1)
        cuts = [(middle[0],), (slice(None), middle[1]), (slice(None), slice(None), middle[2])]
        rows.append(_row([_outlined(crop[cut], None if blob_mask is None else blob_mask[cut], size) for cut in cuts]))
    width = max(row.shape[1] for row in rows)
    picture = np.concatenate([np.pad(row, ((0, 4), (0, width - row.shape[1]), (0, 0))) for row in rows], axis=0)
    if not caption:
        return picture
    band = np.zeros((18, max(width, 7 * len(caption)), 3), np.uint8)
    cv2.putText(band, caption, (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([band, np.pad(picture, ((0, 0), (0, band.shape[1] - width), (0, 0)))], axis=0)


def write_index(path: Path, blobs: Blobs, shown: list[int], pictures: dict[int, str], true_ink: np.ndarray | None,
                chosen: str) -> None:
    figures = [f'<figure><img src="{html.escape(pictures[i])}" loading="lazy"><figcaption>{html.escape(blob_caption(blobs, i, true_ink))}'
               "</figcaption></figure>" for i in shown]
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>ink blobs</title><style>"
        "body{font-family:sans-serif;background:#111;color:#ddd}figure{display:inline-block;margin:6px;vertical-align:top}"
        "img{image-rendering:pixelated;max-width:520px}figcaption{font-size:12px}</style></head><body>"
        f"<h1>{len(shown)} blobs (of {len(blobs)}), largest first</h1><p>{html.escape(chosen)}</p>"
        "<p>Top row: maximum projections of the prediction along z, y, x over the blob's box; the blob's own voxels "
        "bright, everything else in the box (neighbouring sheets, other blobs) at a third of its brightness. "
        "Bottom row (with a scan): scan slices through the blob's centre, the blob outlined in orange.</p>"
        + "\n".join(figures) + "</body></html>\n"
    )


def main(argv=None):
    config = parse_config(globals(), argv)
    refuse_inputs_as_outputs({"predictions": config.predictions, "volume": config.volume}, {"out_dir": config.out_dir}, folders=("out_dir",))
    with output_lock(config.out_dir):
        return explore(config)


def explore(config) -> Blobs:
    out_dir = Path(config.out_dir)
    check_output(out_dir / "blobs.csv", config.overwrite)
    if not 0 < config.threshold <= 1:
        raise InputError(f"--threshold {config.threshold}: must be in (0, 1]")
    pred_file, predictions = volume.open_dataset(config.predictions, config.dataset, level=config.level)
    scan_file, scan = volume.open_dataset(config.volume, volume.SCAN, level=config.level) if config.volume else (None, None)
    if scan is not None and scan.shape != predictions.shape:
        raise InputError(f"{config.volume}: scan shape {scan.shape} differs from the prediction's {predictions.shape}")
    truth_file, truth = volume.open_dataset(config.ground_truth, volume.GROUND_TRUTH, level=config.level) if config.ground_truth else (None, None)
    if truth is not None and truth.shape != predictions.shape:
        raise InputError(f"{config.ground_truth}: shape {truth.shape} differs from the prediction's {predictions.shape}")
    roi = blocks.parse_roi(config.roi, predictions.shape)
    level = config.threshold * 255 if predictions.dtype == np.uint8 else config.threshold
    with writing(out_dir, resumable=False):
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as scratch_dir:
            blobs, shown, in_range, pictures, true_ink = _label_and_picture(config, out_dir, Path(scratch_dir) / "labels.h5", predictions,
                                                                            scan, truth, truth_file, roi, level)
        write_csv(out_dir / "blobs.csv", blobs, true_ink)
        write_index(out_dir / "index.html", blobs, shown, pictures, true_ink,
                    f"Blobs: 26-connected voxels of p >= {config.threshold}" + (" above the scan's air level" if scan is not None else "")
                    + f"; shown: those of {config.min_size} to {config.max_size} voxels, the {config.max_views} largest at most.")
        save_config(config, config_path_for(out_dir / "blobs.csv"))
    pred_file.close()
    if scan_file is not None:
        scan_file.close()
    print(f"{len(blobs)} blobs at p >= {config.threshold}; {len(in_range)} of {config.min_size}..{config.max_size} voxels, "
          f"{len(shown)} pictured -> {out_dir / 'index.html'}")
    return blobs


def _label_and_picture(config, out_dir: Path, scratch_path: Path, predictions, scan, truth, truth_file, roi, level):
    """Label the blobs into a scratch file and draw the pictures: (blobs, shown, in range, pictures, true ink)."""
    scratch = h5py.File(scratch_path, "w")
    with output_file(scratch, scratch_path, resumable=False), writing(out_dir, resumable=False):
        air = scan_air_level(config.air_level, scan)
        if air is not None:
            print(f"air level {air} (--air_level {config.air_level}): only voxels whose scan lies above it can be ink")
        blobs = label_blocks(predictions, level, config.macro_block, scratch, roi, None if air is None else scan, air or 0)
        if config.keep_labels:
            with atomic_output(out_dir / "blob_labels.h5") as temporary:
                labels_file = h5py.File(temporary, "w")
                with output_file(labels_file, temporary, resumable=False), writing(out_dir, resumable=False):
                    labels = write_blob_labels(scratch[volume.BLOB_LABELS], blobs.label_to_blob, labels_file, config.macro_block)
                    labels.attrs["roi_origin"] = [s.start for s in roi]
        true_ink = None
        if truth is not None:
            with truth_file:
                true_ink = blob_overlap(scratch[volume.BLOB_LABELS], blobs.label_to_blob, len(blobs), truth,
                                        [s.start for s in roi], config.macro_block)
        in_range = [i for i in range(len(blobs)) if config.min_size <= blobs.voxels[i] <= config.max_size]
        shown = in_range[:config.max_views]
        pictures = {}
        shape, roi_origin = np.array(predictions.shape), np.array([s.start for s in roi])
        for i in tqdm(shown, unit="blob", desc="components: views"):
            low = np.maximum(blobs.bbox_low[i] - config.margin, 0)
            high = np.minimum(blobs.bbox_high[i] + config.margin, shape)
            blob_mask = blobs.label_to_blob[volume.read_crop(scratch[volume.BLOB_LABELS], low - roi_origin, high - low)] == i + 1
            picture = blob_picture(predictions, scan, low, high, blobs.centroid[i], config.view_size, blob_mask,
                                   blob_caption(blobs, i, true_ink))
            pictures[i] = f"blob_{i + 1:06d}.png"
            write_image(out_dir / pictures[i], picture)
    return blobs, shown, in_range, pictures, true_ink


if __name__ == "__main__":
    run_main(main)
