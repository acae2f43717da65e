"""Export a sub-volume as a numbered image stack, for 3D Slicer (ImageStacks) or Fiji.

    python export_slices.py --volume runs/demo/predictions.h5 --out_dir runs/demo/slices --roi 40:120,:,:
    python export_slices.py --volume runs/demo/scan.h5 --dataset scan_volume --axis y --format jpg --out_dir runs/demo/scan_y

Slices are cut along `--axis` and named by their coordinate on that axis (`00040.tif` is z = 40),
so a stack keeps its place in the volume. TIFF keeps the dataset's dtype; JPEG needs uint8.
The ROI is read one slab of chunk thickness at a time.
"""

import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

import json
from pathlib import Path

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from ink3d import InputError, blocks, volume
from ink3d.config import parse_config, run_main, save_config
from ink3d.files import atomic_output, check_output, output_lock, refuse_inputs_as_outputs, write_image, writing

# --- config ---
VOLUME = "runs/demo/predictions.h5"  # volume to export: an HDF5 file, a zarr array or an OME-Zarr group
LEVEL = 0  # OME-Zarr inputs: the multiscale level to read (0 = full resolution)
DATASET = "predictions"  # dataset in that file (predictions, scan_volume, ink, ...)
OUT_DIR = "runs/demo/slices"  # numbered images go here
ROI = ""  # z0:z1,y0:y1,x0:x1; empty = the whole volume
AXIS = "z"  # cut slices perpendicular to z, y or x
FORMAT = "tif"  # tif (any dtype, lossless) or jpg (uint8)
JPEG_QUALITY = 95  # for --format jpg
OVERWRITE = False  # write into an out_dir that already holds images


def main(argv=None):
    config = parse_config(globals(), argv)
    refuse_inputs_as_outputs({"volume": config.volume}, {"out_dir": config.out_dir}, folders=("out_dir",))
    with output_lock(config.out_dir):
        return export(config)


def export(config) -> int:
    """Write the slices; returns how many."""
    out_dir = Path(config.out_dir)
    if out_dir.is_dir() and any(out_dir.glob(f"*.{config.format}")) and not config.overwrite:
        raise InputError(f"{out_dir} already holds .{config.format} images; pass --overwrite true to write over them")
    check_output(out_dir / "export.json", overwrite=True)  # a folder that can be written
    file, dataset = volume.open_dataset(config.volume, config.dataset, level=config.level)
    if config.format == "jpg" and dataset.dtype != np.uint8:
        file.close()
        raise InputError(f"{config.volume}[{config.dataset}] is {dataset.dtype}; JPEG needs uint8, use --format tif")
    roi = blocks.parse_roi(config.roi, dataset.shape)
    axis = "zyx".index(config.axis)
    step = dataset.chunks[axis] if dataset.chunks else 64
    axis_range = roi[axis]
    with file, writing(out_dir, resumable=False), tqdm(total=axis_range.stop - axis_range.start, unit="slice", desc="export_slices") as bar:
        out_dir.mkdir(parents=True, exist_ok=True)
        for start in range(axis_range.start, axis_range.stop, step):
            stop = min(start + step, axis_range.stop)
            box = list(roi)
            box[axis] = slice(start, stop)
            slab = np.moveaxis(volume.read_crop(dataset, [b.start for b in box], [b.stop - b.start for b in box]), axis, 0)
            for offset, image in enumerate(slab):
                path = out_dir / f"{start + offset:05d}.{config.format}"
                if config.format == "tif":
                    tifffile.imwrite(path, image)
                else:
                    write_image(path, image, [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality])
            bar.update(stop - start)
        with atomic_output(out_dir / "export.json") as temporary:
            temporary.write_text(json.dumps({
                "volume": str(config.volume), "dataset": config.dataset, "axis": config.axis,
                "roi": [[s.start, s.stop] for s in roi], "names": "coordinate along axis",
            }, indent=2) + "\n")
    save_config(config, out_dir / "export.config.json")
    print(f"{axis_range.stop - axis_range.start} slices along {config.axis} -> {out_dir}")
    return axis_range.stop - axis_range.start


if __name__ == "__main__":
    run_main(main)
