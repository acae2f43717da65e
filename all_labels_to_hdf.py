"""Map 2D ink labels of segments into 3D label volumes (train and validation) beside the scan.

    python all_labels_to_hdf.py --ppm_dir runs/demo/scroll/paths --labels_dir runs/demo/scroll/labels \\
        --volume runs/demo/scan.h5 --out_train runs/demo/labels_train.h5 --out_valid runs/demo/labels_valid.h5 \\
        --valid_segments 20231022170901

Every `<labels_dir>/<id>_inklabels.png` with a `<ppm_dir>/<id>/<id>.ppm` is used. When ids
differ only in the last character, only the highest (the newest version) is used. Pixels with
a valid ppm point, inside `<id>_mask.png` when it exists, label the voxels within `--band`
of the surface along the normal: those from `--ink_back` behind to `--ink_front` in front of the
surface get the pixel's label, the rest of the band 0 (see ink3d/labels.py). By default the whole
band takes the label: a voxel labeled 0 then lies on no ink column, and training learns where along
the ink columns the ink lies from the columns kept beside the voxels (ink3d/columns.py). Validation
segments, and every version of them, go to `--out_train`'s sibling `--out_valid`, never into training.

Outputs are written under a temporary name and renamed when complete. `--update true` adds
segments to existing outputs; segments already listed in their `attrs["segments"]` are not
counted twice.
"""

import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from ink3d import InputError, faces, volume
from ink3d.columns import COLUMNS, ColumnWriter
from ink3d.config import config_path_for, parse_config, run_main, save_config
from ink3d.files import check_output, output_file, output_lock, partial_path, refuse_inputs_as_outputs, writing
from ink3d.intensity import scan_air_level
from ink3d.labels import ChunkAccumulator, VoxelizeStats, ink_range_within, voxelize_tile
from ink3d.memory import reuse_freed_memory
from ink3d.ppm import find_segment, open_segment, segment_size, valid_mask

# --- config ---
PPM_DIR = "runs/demo/scroll/paths"  # segments: <ppm_dir>/<id>/<id>.ppm and optional <id>_mask.png, or tifxyz folders <ppm_dir>/<id>/
LABELS_DIR = "runs/demo/scroll/labels"  # ink labels: <labels_dir>/<id>_inklabels.png (0 none .. 255 ink)
VOLUME = "runs/demo/scan.h5"  # scan volume: gives the label volumes' shape
LEVEL = 0  # OME-Zarr inputs: the multiscale level to read (0 = full resolution)
OUT_TRAIN = "runs/demo/labels_train.h5"  # label volume of the training segments
OUT_VALID = "runs/demo/labels_valid.h5"  # label volume of the validation segments
VALID_SEGMENTS = "20231022170901"  # comma-separated validation segment ids (Scroll 1: 20230904135535)
BAND = 10.0  # half-width of the labeled band along the normal, in voxels: through the sheet, short of the next written face
INK_FRONT = -1.0  # of the band, voxels up to this far in front of the surface (the normal's side) take the pixel's label (negative: the whole band)
INK_BACK = -1.0  # ... and up to this far behind it (negative: the whole band); the rest of the band is labeled 0 (no ink)
ORIENT_NORMALS = "auto"  # auto: a segment whose normals point into its sheet (read off the scan) is labeled with them reversed; keep: as given
AIR_LEVEL = "auto"  # scan values (uint8) at or below this are air, for reading the segments' orientation: auto (the histogram's valley), otsu, a number
KEEP_ALL_VERSIONS = False  # use every version of a segment instead of only the newest
SKIP_BAD = False  # skip (and report) segments with a missing or malformed ppm, label or mask
CHUNK = 128  # HDF5 chunk edge of the label volumes
TILE_PIXELS = 32768  # pixels voxelized at once (rows of a band of columns, at most 65535): bounds the memory of one step
CACHE_MB = 1024  # label chunks held in memory while a segment is voxelized (a wider segment goes in bands of columns)
OVERWRITE = False  # replace existing outputs
UPDATE = False  # add new segments to existing outputs


@dataclass
class Segment:
    segment_id: str
    label_path: Path
    ppm_path: Path
    mask_path: Path | None
    pixels: int


@dataclass
class Plan:
    train: list[Segment] = field(default_factory=list)
    valid: list[Segment] = field(default_factory=list)
    report: list[str] = field(default_factory=list)


def plan_segments(ppm_dir: Path, labels_dir: Path, valid_ids: set[str], keep_all_versions: bool, skip_bad: bool) -> Plan:
    """Which segments go where, and why the others do not."""
    if not labels_dir.is_dir():
        raise InputError(f"{labels_dir}: labels folder not found")
    suffix = "_inklabels.png"
    ids = sorted(path.name[: -len(suffix)] for path in labels_dir.glob(f"*{suffix}"))
    if not ids:
        raise InputError(f"{labels_dir}: no *{suffix} files")
    plan = Plan()
    newest = {}
    for segment_id in ids:
        family = segment_id[:-1]
        newest[family] = max(newest.get(family, segment_id), segment_id)
    valid_families = {segment_id[:-1] for segment_id in valid_ids}
    families = {segment_id[:-1] for segment_id in ids}
    unknown = sorted(segment_id for segment_id in valid_ids if segment_id[:-1] not in families)
    if unknown:  # a typo would silently put the real validation segment into training
        raise InputError(f"--valid_segments {', '.join(unknown)}: no such segment (nor a version of one) has ink labels in "
                         f"{labels_dir}; segments there: {', '.join(ids)}")
    for missing in sorted(valid_ids - set(ids)):
        plan.report.append(f"{missing}: validation segment has no ink labels in {labels_dir}; its family's versions are used")
    for segment_id in ids:
        family = segment_id[:-1]
        if not keep_all_versions and newest[family] != segment_id:
            plan.report.append(f"{segment_id}: superseded by newer version {newest[family]} (ids that differ only in their last "
                               f"character are versions of one segment: kept {newest[family]}, superseded {segment_id}; "
                               "--keep_all_versions true uses every version)")
            continue
        ppm_path = find_segment(ppm_dir, segment_id)
        try:
            if ppm_path is None:
                raise InputError(f"{segment_id}: no ppm at {ppm_dir / segment_id / f'{segment_id}.ppm'} nor a tifxyz folder")
            height, width = segment_size(ppm_path)
        except InputError as error:
            if not skip_bad:
                raise InputError(f"{error} (pass --skip_bad true to skip such segments)") from None
            plan.report.append(f"{error}; skipped")
            continue
        mask_path = ppm_dir / segment_id / f"{segment_id}_mask.png"  # tifxyz folders may carry one too, beside mask.tif
        segment = Segment(segment_id, labels_dir / f"{segment_id}{suffix}", ppm_path,
                          mask_path if mask_path.is_file() else None, height * width)
        is_valid = segment_id in valid_ids or family in valid_families
        (plan.valid if is_valid else plan.train).append(segment)
        plan.report.append(f"{segment_id}: {'validation' if is_valid else 'training'}")
    return plan


def _read_png(path: Path, shape, what: str, segment_id: str) -> np.ndarray:
    """A uint8 grey image, checked to be `shape` (None: any). A colour image is reduced to its brightest colour
    channel at each pixel (red, green or blue ink on black reads as ink; alpha is ignored); 16-bit images are
    brought to 0..255 as volume_to_hdf brings scans."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"{segment_id}: cannot read {what} {path}")
    if image.ndim == 3:
        image = image[..., :3].max(axis=-1)
    if image.dtype == np.uint16:
        image = volume.UINT16_TO_UINT8[image]
    elif image.dtype != np.uint8:
        raise InputError(f"{segment_id}: {what} {path.name} holds {image.dtype}; labels and masks are 8- or 16-bit images")
    if shape is not None and image.shape != shape:
        raise InputError(f"{segment_id}: {what} {path.name} is {image.shape[1]} x {image.shape[0]} (w x h), "
                         f"the ppm is {shape[1]} x {shape[0]}")
    return image


def voxelize_segment(segment: Segment, ink_sum, ink_count, pixel_columns: ColumnWriter, band: float, ink_range, tile_pixels: int,
                     cache_bytes: int, bar, scale_zyx=(1.0, 1.0, 1.0), orientation=None) -> tuple[VoxelizeStats, str]:
    """Add one segment's labels to the label volumes; its coordinates are taken to the volume's level (`scale_zyx`).
    With `orientation` (the scan and its air level), normals that point into the sheet are reversed first. Returns
    the counts and what was found of the orientation."""
    if segment.ppm_path.is_dir():  # tifxyz: brought to the label image's resolution
        labels = _read_png(segment.label_path, None, "ink label", segment.segment_id)
        ppm = open_segment(segment.ppm_path, labels.shape, scale_zyx)
    else:
        ppm = open_segment(segment.ppm_path, scale_zyx=scale_zyx)
        labels = _read_png(segment.label_path, (ppm.height, ppm.width), "ink label", segment.segment_id)
    shape = (ppm.height, ppm.width)
    mask = _read_png(segment.mask_path, shape, "mask", segment.segment_id) if segment.mask_path else None
    reverse, found = False, "orientation kept as given (--orient_normals keep)"
    if orientation is not None:
        scan, air_level = orientation
        out, into = faces.segment_votes(scan, ppm.data, band, air_level, np.random.default_rng(0))
        reverse = faces.points_into_sheet(out, into)
        if reverse:
            found = (f"warning: its normals point into the sheet ({into} of {out + into} read columns show air close "
                     f"behind the surface, none in front): labeled with them reversed (--orient_normals keep: as given)")
        elif out + into:
            found = f"normals out of the sheet at {out} of {out + into} read columns"
        else:
            found = "orientation not read: no read column shows air close on one side (normals kept as given)"
    stats = VoxelizeStats()
    with ChunkAccumulator(ink_sum, ink_count, cache_bytes) as accumulator:
        columns = band_columns(ppm, accumulator, band)
        rows = max(1, tile_pixels // columns)
        for left in range(0, ppm.width, columns):
            for row in range(0, ppm.height, rows):
                tile = (slice(row, row + rows), slice(left, left + columns))
                data = np.asarray(ppm.data[tile])
                if reverse:
                    data = data.copy()
                    data[..., 3:6] *= -1
                use = valid_mask(data)
                if mask is not None:
                    use &= mask[tile] > 0
                pixels = data[use]
                kept = pixel_columns.add(pixels[:, 2::-1].astype(np.float32), pixels[:, 5:2:-1].astype(np.float32), labels[tile][use])
                stats.pixels_outside += len(pixels) - kept
                stats.add(voxelize_tile(data, labels[tile] / np.float32(255), use, band, accumulator, ink_range))
                bar.update(data.shape[0] * data.shape[1])
    return stats, found


def band_columns(ppm, accumulator: ChunkAccumulator, band: float) -> int:
    """Columns of the bands a segment is swept in, strip of rows by strip: the whole width unless a strip would reach
    more chunks than are held. A strip crossing into the next layer of chunks reaches two layers' worth; the chunks
    of a row are counted on up to 64 rows."""
    widest = 0
    for row in np.unique(np.linspace(0, ppm.height - 1, min(ppm.height, 64)).round().astype(int)):
        data = np.asarray(ppm.data[row:row + 1])[0]
        data = data[valid_mask(data)]
        widest = max(widest, accumulator.chunks_reached(data[:, 2::-1], data[:, 5:2:-1], band))
    bands = min(ppm.width, max(1, -(-widest // max(1, accumulator.slots // 2 - 2))))
    return -(-ppm.width // bands)


def _open_output(path: Path, shape, scale_zyx, config, update: bool) -> tuple[h5py.File, list[str]]:
    """A writable temporary copy of the output: empty, or the existing file when updating."""
    temporary = partial_path(path)
    temporary.unlink(missing_ok=True)
    if update and path.exists():
        with writing(temporary, resumable=False):
            shutil.copyfile(path, temporary)
        file = h5py.File(temporary, "a")
        stored_scale = volume.level_scale(file[volume.INK_SUM])
        problem = None
        if file[volume.INK_SUM].shape != tuple(shape):
            problem = f"shape {file[volume.INK_SUM].shape} differs from the scan's {tuple(shape)}"
        elif COLUMNS not in file:
            problem = "holds no label columns (made by an earlier version); make it anew without --update"
        elif not np.array_equal(stored_scale, scale_zyx):
            problem = f"made at voxel size {stored_scale.tolist()}, the scan's is {list(scale_zyx)}"
        else:
            stored = (float(file.attrs["band"]), *json.loads(file.attrs.get("ink_range", json.dumps([-config.band, config.band]))))
            wanted = (config.band, *ink_range_of(config))
            if stored != wanted:
                problem = f"made with band {stored[0]} and ink range {stored[1]}..{stored[2]}, not {wanted[0]} and {wanted[1]}..{wanted[2]}"
        if problem:
            file.close()
            temporary.unlink()
            raise InputError(f"{path}: {problem}")
        return file, json.loads(file.attrs["segments"])
    with writing(temporary, resumable=False):
        file = h5py.File(temporary, "w")
        for name, dtype in ((volume.INK_SUM, np.float32), (volume.INK_COUNT, np.uint16)):
            volume.create_volume(file, name, shape, dtype, config.chunk, volume.LABEL_COMPRESSION).attrs[volume.SCALE] = scale_zyx
        file.attrs["band"] = config.band
        file.attrs["ink_range"] = json.dumps(list(ink_range_of(config)))
        file.attrs["segments"] = "[]"
    return file, []


def ink_range_of(config) -> tuple[float, float]:
    try:
        return ink_range_within(config.band, config.ink_back, config.ink_front)
    except ValueError as error:
        raise InputError(f"--band {config.band} --ink_back {config.ink_back} --ink_front {config.ink_front}: {error}") from None


def write_label_volume(path: Path, segments: list[Segment], shape, scale_zyx, config, bar, orientation=None) -> list[str]:
    """Fill `path`'s temporary file with the segments; the caller renames it when all succeeded. `orientation`: the
    scan and its air level, to read each segment's orientation off (None: normals as given)."""
    lines = []
    file, done = _open_output(path, shape, scale_zyx, config, config.update)
    temporary = partial_path(path)
    with output_file(file, temporary, resumable=False), writing(temporary, resumable=False):
        pixel_columns = ColumnWriter(file, shape, file[volume.INK_SUM].chunks[0], config.band)
        for segment in segments:
            if segment.segment_id in done:
                lines.append(f"{segment.segment_id}: already in {path.name}, not counted again")
                bar.update(segment.pixels)
                continue
            try:
                stats, found = voxelize_segment(segment, file[volume.INK_SUM], file[volume.INK_COUNT], pixel_columns, config.band,
                                                ink_range_of(config), config.tile_pixels, config.cache_mb << 20, bar, scale_zyx,
                                                orientation)
            except InputError as error:
                if not config.skip_bad:
                    raise
                lines.append(f"{segment.segment_id}: skipped: {error}")
                continue
            done.append(segment.segment_id)
            file.attrs["segments"] = json.dumps(done)
            ink = stats.ink_pixels / max(stats.pixels, 1)
            lines.append(f"{segment.segment_id}: {stats.pixels} pixels labeled, {stats.contributions} voxel contributions, "
                         f"ink fraction {ink:.3f}" + _outside(stats, config.level)
                         + f"; {found}")
        file.attrs["config"] = json.dumps(vars(config))
    return lines


def _outside(stats: VoxelizeStats, level: int) -> str:
    """What of a segment fell outside the volume, and why it likely did."""
    if stats.pixels_outside:
        return (f", {stats.pixels_outside} of its pixels lie outside the volume ({stats.dropped_outside} band samples dropped): "
                f"segments of another scan, or of another resolution than --level {level} reads")
    if stats.dropped_outside:
        return f", {stats.dropped_outside} band samples beyond the volume's edge dropped (pixels near the edge)"
    return ""


def main(argv=None):
    config = parse_config(globals(), argv)
    refuse_inputs_as_outputs({"volume": config.volume, "ppm_dir": config.ppm_dir, "labels_dir": config.labels_dir},
                             {"out_train": config.out_train, "out_valid": config.out_valid}, collections=("ppm_dir", "labels_dir"))
    with output_lock(config.out_train, config.out_valid):
        return write_outputs(config)


def write_outputs(config) -> list[str]:
    reuse_freed_memory()
    outputs = [Path(config.out_train), Path(config.out_valid)]
    for out in outputs:
        if not config.update:
            check_output(out, config.overwrite)
    ink_range_of(config)
    valid_ids = {s.strip() for s in config.valid_segments.split(",") if s.strip()}
    plan = plan_segments(Path(config.ppm_dir), Path(config.labels_dir), valid_ids, config.keep_all_versions, config.skip_bad)
    if config.orient_normals not in ("auto", "keep"):
        raise InputError(f"--orient_normals {config.orient_normals}: choose auto or keep")
    scan_file, scan = volume.open_dataset(config.volume, volume.SCAN, level=config.level)
    shape, scale_zyx = scan.shape, volume.level_scale(scan).tolist()
    report = list(plan.report)
    orientation = None
    if config.orient_normals == "auto":
        try:
            air_level = scan_air_level(config.air_level, scan)
        except ValueError as error:
            raise InputError(f"--air_level {error}") from None
        if air_level is None:
            raise InputError("--orient_normals auto reads the orientation off the scan's air: give an --air_level, or --orient_normals keep")
        orientation = (scan, air_level)
        report.append(f"air level {air_level} (--air_level {config.air_level}): each segment's orientation read against it")
    total = sum(segment.pixels for segment in plan.train + plan.valid)
    try:
        with scan_file, tqdm(total=total, unit="px", unit_scale=True, desc="all_labels_to_hdf") as bar:
            for out, segments in zip(outputs, (plan.train, plan.valid)):
                report += [f"[{out.name}] {line}"
                           for line in write_label_volume(out, segments, shape, scale_zyx, config, bar, orientation)]
        for out in outputs:  # both or neither: a crash leaves the previous outputs as they were
            save_config(config, config_path_for(out))
        for out in outputs:
            os.replace(partial_path(out), out)
    except BaseException:
        for out in outputs:
            partial_path(out).unlink(missing_ok=True)
        raise
    print("\n".join(report))
    return report


if __name__ == "__main__":
    run_main(main)
