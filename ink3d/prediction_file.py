"""An HDF5 prediction file as inference.py writes it: its plan, its finished-block record with checksums, the blocks
verified on resuming, and the part files of several ranks merged."""

import json
from pathlib import Path

import h5py
import numpy as np

from ink3d import InputError, volume
from ink3d.block_pipeline import BlockWriter
from ink3d.blocks import verify_finished
from ink3d.files import finish_output, open_interrupted, output_file, partial_path, writing

# what a resumed run must share with the interrupted one: the windows, their blending and the model
PLAN_KEYS = ("volume_shape", "roi", "patch", "overlap", "blend", "block", "block_grid", "air_level", "tta", "weights",
             "weights_sha256", "normalization")


def check_plan(path: Path, stored: dict, attrs: dict) -> None:
    """Refuse to continue (or to call complete) a prediction file made with another plan."""
    changed = [key for key in PLAN_KEYS if stored.get(key) != attrs[key]]
    if changed:
        raise InputError(f"{path}: cannot resume with different {', '.join(changed)} "
                         f"({', '.join(f'{k}={stored.get(k)}' for k in changed)} in the file); --overwrite true redoes it")


def open_output(path: Path, shape, attrs: dict, block_count: int, resume: bool, scale=(1.0, 1.0, 1.0)) -> h5py.File:
    """The prediction file, new or (resuming) checked to hold the same plan; with its finished-block record and the
    scan's voxel size (`scale`). A file killed as it was created holds nothing finished and is made anew."""
    if resume:
        file = open_interrupted(path, lambda f: {volume.PREDICTIONS, volume.FINISHED_BLOCKS, volume.BLOCK_CHECKSUMS} <= set(f)
                                and "plan" in f[volume.PREDICTIONS].attrs)  # opens the dataset: a torn one is found here
        if file is None:
            print(f"{path}: no block was finished before the interruption; starting it anew")
        else:
            try:
                check_plan(path, json.loads(file[volume.PREDICTIONS].attrs["plan"]), attrs)
            except InputError:
                file.close()
                raise
            return file
    with writing(path):
        file = h5py.File(path, "w")
        dataset = volume.create_volume(file, volume.PREDICTIONS, shape, np.uint8)
        dataset.attrs["plan"] = json.dumps(attrs)
        for key, value in attrs.items():
            dataset.attrs[key] = json.dumps(value) if isinstance(value, list) else value
        dataset.attrs["complete"] = False
        dataset.attrs[volume.SCALE] = scale
        file.create_dataset(volume.FINISHED_BLOCKS, shape=(block_count,), dtype=np.uint8)
        file.create_dataset(volume.BLOCK_CHECKSUMS, shape=(block_count,), dtype=np.uint32)
        file.flush()  # from here on the file can be reopened to resume
    return file


def verify_blocks(file: h5py.File, blocks) -> tuple[int, int]:
    """Re-read the blocks recorded as finished and unmark those whose bytes differ from their checksum;
    reset chunks the blocks to do cannot read (and unmark finished blocks sharing them). Returns
    (verified, damaged)."""
    finished, checksums = file[volume.FINISHED_BLOCKS], file[volume.BLOCK_CHECKSUMS][:]
    done = finished[:]
    recorded = [int(checksums[b.index]) if done[b.index] else None for b in blocks]
    intact = verify_finished(file[volume.PREDICTIONS], [b.output for b in blocks], recorded, "block")
    done[[b.index for b in blocks]] = intact
    finished[:] = done
    return sum(intact), sum(value is not None for value in recorded) - sum(intact)


def hdf5_writer(file: h5py.File) -> BlockWriter:
    """Write blocks into a prediction file: a block's data flushed first, then recorded finished with its checksum."""
    dataset, finished, checksums = file[volume.PREDICTIONS], file[volume.FINISHED_BLOCKS], file[volume.BLOCK_CHECKSUMS]

    def slab(block, planes, values):
        with writing(file.filename):
            dataset[(planes, *block.output[1:])] = values

    def finish(block, crc):
        with writing(file.filename):
            file.flush()  # the data first: a block is recorded finished only once its bytes are saved
            checksums[block.index] = crc
            finished[block.index] = 1
            file.flush()
    return BlockWriter(slab, finish, dataset.chunks[0])


def merge_parts(out: Path, parts: list[Path], blocks, attrs: dict, scale) -> None:
    """Copy each part file's finished blocks into `out` (rank 0, after every rank finished)."""
    partial = partial_path(out)
    file = open_output(partial, attrs["volume_shape"], attrs, len(blocks), partial.exists(), scale)
    with output_file(file, partial), writing(partial):
        target, finished, checksums = file[volume.PREDICTIONS], file[volume.FINISHED_BLOCKS], file[volume.BLOCK_CHECKSUMS]
        for part in parts:
            with h5py.File(part, "r") as source:
                done, sums = source[volume.FINISHED_BLOCKS][:], source[volume.BLOCK_CHECKSUMS][:]
                for block in blocks:
                    if done[block.index] and not finished[block.index]:
                        target[block.output] = source[volume.PREDICTIONS][block.output]
                        file.flush()
                        checksums[block.index] = sums[block.index]
                        finished[block.index] = 1
        missing = int((finished[:] == 0).sum())
        if missing:
            raise InputError(f"{out}: {missing} blocks are missing from the part files; rerun with --resume true")
        target.attrs["complete"] = True
        file.flush()
    finish_output(partial, out)
    for part in parts:
        part.unlink()
