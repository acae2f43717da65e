"""Blocks of a volume: the grid that tiles it, regions of interest, and the checks of an interrupted output's blocks."""

import itertools
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from ink3d import InputError
from ink3d.files import checksum
from ink3d.volume_readers import AXES


def iter_blocks(shape, block) -> Iterator[tuple[slice, slice, slice]]:
    """zyx slices of the blocks tiling `shape` on a grid of `block` (int or 3 ints), last ones clipped."""
    block = (block,) * 3 if np.isscalar(block) else tuple(block)
    starts = [range(0, size, step) for size, step in zip(shape, block)]
    for origin in itertools.product(*starts):
        yield tuple(slice(o, min(o + b, size)) for o, b, size in zip(origin, block, shape))


def parse_roi(text: str, shape) -> tuple[slice, slice, slice]:
    """`z0:z1,y0:y1,x0:x1` (empty bounds = volume edge; empty text = whole volume) -> zyx slices."""
    if not text:
        return tuple(slice(0, size) for size in shape)
    parts = text.split(",")
    if len(parts) != 3:
        raise InputError(f"roi {text!r}: expected z0:z1,y0:y1,x0:x1")
    slices = []
    for axis, (part, size) in enumerate(zip(parts, shape)):
        bounds = part.split(":")
        if len(bounds) != 2:
            raise InputError(f"roi {text!r}: axis {AXES[axis]} is {part!r}, expected start:stop")
        try:
            start = int(bounds[0]) if bounds[0] else 0
            stop = int(bounds[1]) if bounds[1] else size
        except ValueError:
            raise InputError(f"roi {text!r}: bounds must be integers") from None
        if not 0 <= start < stop <= size:
            raise InputError(f"roi {text!r}: axis {AXES[axis]} range {start}:{stop} is empty or outside 0:{size}")
        slices.append(slice(start, stop))
    return tuple(slices)


def chunks_of(dataset, box) -> list[tuple[slice, slice, slice]]:
    """The dataset's chunks (zyx slices, clipped to the shape) that a box of zyx slices touches."""
    ranges = [range(b.start // c * c, b.stop, c) for b, c in zip(box, dataset.chunks)]
    return [tuple(slice(o, min(o + c, size)) for o, c, size in zip(origin, dataset.chunks, dataset.shape))
            for origin in itertools.product(*ranges)]


def reset_unreadable_chunks(dataset, boxes) -> list[tuple[slice, slice, slice]]:
    """Overwrite with the fill value every chunk touched by `boxes` that cannot be read (its bytes were lost
    when a write failed), so that blocks sharing it can be written again; returns those chunks.

    A write that covers a whole chunk does not read it, so the reset itself never fails on the damage.
    """
    seen, reset = set(), []
    for box in boxes:
        for chunk in chunks_of(dataset, box):
            key = tuple(s.start for s in chunk)
            if key in seen:
                continue
            seen.add(key)
            try:
                dataset[chunk]
            except (OSError, RuntimeError):
                dataset[chunk] = np.full([s.stop - s.start for s in chunk], dataset.fillvalue, dataset.dtype)
                reset.append(chunk)
    return reset


def verify_finished(dataset, boxes, checksums, unit: str) -> list[bool]:
    """Which `boxes` (zyx slices) of an interrupted output still hold the bytes their recorded CRC-32 says
    (`checksums`, None where a box was not finished). Finished boxes are read back; chunks that the other
    boxes cannot read are reset so they can be written again, and a finished box sharing one counts as lost."""
    intact = []
    for box, recorded in tqdm(list(zip(boxes, checksums)), unit=unit, desc=f"verifying finished {unit}s", leave=False):
        try:
            intact.append(recorded is not None and checksum(dataset[box]) == recorded)
        except (OSError, RuntimeError):  # an unreadable chunk
            intact.append(False)
    reset = reset_unreadable_chunks(dataset, [box for box, ok in zip(boxes, intact) if not ok])
    return [ok and not any(overlaps(box, chunk) for chunk in reset) for box, ok in zip(boxes, intact)]


def overlaps(a, b) -> bool:
    """Whether two boxes of zyx slices share a voxel."""
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b))
