"""Multiscale pyramids: OME-Zarr groups of a volume at full resolution and halved again and again."""

from pathlib import Path

import numpy as np
import zarr

from ink3d.blocks import iter_blocks
from ink3d.volume import AXES, DEFAULT_CHUNK


def downsample_into(source, target) -> None:
    """`target` = the 2 x 2 x 2 mean of `source`, rounded (edges repeated where `source` has an odd size), a chunk of
    `target` at a time: a level of a multiscale pyramid."""
    for box in iter_blocks(target.shape, target.chunks):
        data = np.asarray(source[tuple(slice(2 * b.start, 2 * b.stop) for b in box)], dtype=np.float64)
        sizes = [b.stop - b.start for b in box]
        data = np.pad(data, [(0, 2 * n - s) for n, s in zip(sizes, data.shape)], mode="edge")
        target[box] = np.rint(data.reshape(sizes[0], 2, sizes[1], 2, sizes[2], 2).mean(axis=(1, 3, 5)))


def write_ome_zarr(path: str | Path, source, levels: int = 2, chunk: int = DEFAULT_CHUNK) -> None:
    """Write a (z, y, x) uint8 or uint16 volume as an OME-Zarr 0.5 multiscale group (zarr v3): level 0 is
    `source`, copied in slabs of `chunk` slices, each further level the 2 x 2 x 2 mean of the one before."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    shape, datasets = tuple(source.shape), []
    previous = source
    for level in range(levels):
        array = group.create_array(str(level), shape=shape, chunks=tuple(min(chunk, s) for s in shape), dtype=source.dtype,
                                   compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
                                   dimension_names=tuple(AXES))  # OME-Zarr 0.5 asks each level's array to name the axes
        if level == 0:
            for start in range(0, shape[0], chunk):
                array[start:start + chunk] = previous[start:start + chunk]
        else:
            downsample_into(previous, array)
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [2.0**level] * 3}]})
        previous, shape = array, tuple(-(-s // 2) for s in shape)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "name": Path(path).stem, "axes": [{"name": axis, "type": "space", "unit": "micrometer"} for axis in AXES], "datasets": datasets}]}
