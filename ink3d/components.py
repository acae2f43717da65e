"""Connected components (26-connectivity) of a thresholded volume, block by block.

Pass 1 labels each block's core with connected-components-3d and stores the labels (unique over
the volume) in a scratch HDF5 dataset, with per-label statistics. Pass 2 labels each block again
with a one-voxel halo on its upper sides; the stored labels that one halo component covers are
joined (edges of a graph whose connected components, found by scipy's csgraph, are the blobs).
Every 26-adjacent voxel pair lies inside some block plus its upper halo, so the merged labels
equal labeling the whole array at once. Memory is bounded by the block (and the edge list, which
grows with the number of labels touching block faces).
"""

from dataclasses import dataclass

import cc3d
import h5py
import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from tqdm import tqdm

from ink3d import blocks, volume


@dataclass
class Blobs:
    """Per-blob statistics, blobs ordered by decreasing voxel count (id = index + 1)."""

    voxels: np.ndarray  # (n,)
    bbox_low: np.ndarray  # (n, 3) zyx, inclusive
    bbox_high: np.ndarray  # (n, 3) zyx, exclusive
    centroid: np.ndarray  # (n, 3) zyx
    mean_value: np.ndarray  # (n,) mean of the volume's values over the blob
    max_value: np.ndarray  # (n,)
    label_to_blob: np.ndarray  # pass-1 label -> blob id (0 = background)

    def __len__(self) -> int:
        return len(self.voxels)


def _block_stats(labels: np.ndarray, values: np.ndarray, count: int, origin) -> dict:
    labels = labels.astype(np.int64)
    index = np.arange(1, count + 1)
    voxels = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    value_sum = np.bincount(labels.ravel(), weights=values.ravel().astype(np.float64), minlength=count + 1)[1:]
    maximum = np.asarray(ndimage.maximum(values, labels, index), dtype=np.float64).reshape(-1)
    coords_sum = np.stack([
        np.bincount(labels.ravel(), weights=np.broadcast_to(grid, labels.shape).ravel(), minlength=count + 1)[1:]
        for grid in np.ogrid[tuple(slice(o, o + s) for o, s in zip(origin, labels.shape))]
    ], axis=1)
    boxes = ndimage.find_objects(labels, max_label=count)
    low = np.array([[s.start + o for s, o in zip(box, origin)] for box in boxes], dtype=np.int64).reshape(-1, 3)
    high = np.array([[s.stop + o for s, o in zip(box, origin)] for box in boxes], dtype=np.int64).reshape(-1, 3)
    return dict(voxels=voxels, value_sum=value_sum, maximum=maximum, coords_sum=coords_sum, low=low, high=high, index=index)


def label_blocks(dataset, threshold: float, block: int, scratch: h5py.File, roi=None, scan=None, min_scan: int = 0) -> Blobs:
    """Blobs of `dataset >= threshold` within `roi` (zyx slices); pass-1 labels stored in `scratch[volume.BLOB_LABELS]`.

    With a `scan` (same shape), only voxels whose scan value exceeds `min_scan` count: ink needs
    material, and a model trained on sparse labels is never told that air holds no ink.
    """
    roi = roi or tuple(slice(0, size) for size in dataset.shape)
    origin = np.array([s.start for s in roi])
    shape = tuple(s.stop - s.start for s in roi)
    labels_out = volume.create_volume(scratch, volume.BLOB_LABELS, shape, np.uint32, chunk=min(block, volume.DEFAULT_CHUNK))
    boxes = list(blocks.iter_blocks(shape, block))
    stats, offset = [], 0
    for box in tqdm(boxes, unit="block", desc="components: label"):
        where = tuple(slice(b.start + o, b.stop + o) for b, o in zip(box, origin))
        corner, size = [w.start for w in where], [w.stop - w.start for w in where]
        values = volume.read_crop(dataset, corner, size)  # a damaged chunk is named as a read failure
        foreground = values >= threshold
        if scan is not None:
            foreground &= volume.read_crop(scan, corner, size) > min_scan
        labels, count = cc3d.connected_components(foreground, connectivity=26, return_N=True, out_dtype=np.uint64)
        if count == 0:
            continue
        if offset + count >= np.iinfo(np.uint32).max:
            raise OverflowError("more than 2^32 components: raise the threshold or label an ROI")
        block_stats = _block_stats(labels, values, count, [b.start for b in box])
        labels_out[box] = np.where(labels > 0, labels + offset, 0).astype(np.uint32)
        stats.append(block_stats)
        offset += count
    edges = []
    for box in tqdm(boxes, unit="block", desc="components: merge"):
        halo = tuple(slice(b.start, min(b.stop + 1, size)) for b, size in zip(box, shape))
        stored = labels_out[halo]
        foreground = stored > 0
        if not foreground.any():
            continue
        joined = cc3d.connected_components(foreground, connectivity=26, out_dtype=np.uint64)
        # a label joined to another shows up next to the halo: in the halo or in the core's last layer
        faces = np.zeros(stored.shape, bool)
        for axis, (piece, size) in enumerate(zip(box, shape)):
            if piece.stop < size:
                faces[(slice(None),) * axis + (slice(-2, None),)] = True
        faces &= foreground
        keys = np.unique(joined[faces].astype(np.int64) * (offset + 1) + stored[faces])
        if len(keys) < 2:
            continue
        pairs = np.stack([keys // (offset + 1), keys % (offset + 1)], axis=1)
        group_start = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
        first_label = pairs[np.flatnonzero(group_start)[np.cumsum(group_start) - 1], 1]
        linked = first_label != pairs[:, 1]
        edges.append(np.stack([first_label[linked], pairs[linked, 1]], axis=1))
    return _merge(stats, _label_groups(edges, offset), offset, origin)


def _label_groups(edges: list[np.ndarray], count: int) -> np.ndarray:
    """Group index of every label 0..count (label 0, background, is its own group)."""
    pairs = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    graph = sparse.coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(count + 1, count + 1))
    return csgraph.connected_components(graph, directed=False)[1]


def _merge(stats: list[dict], groups: np.ndarray, count: int, origin: np.ndarray) -> Blobs:
    if count == 0:
        empty = np.zeros((0, 3))
        return Blobs(np.zeros(0, np.int64), empty.astype(np.int64), empty.astype(np.int64), empty, np.zeros(0), np.zeros(0),
                     np.zeros(1, np.int64))
    cat = {key: np.concatenate([s[key] for s in stats]) for key in stats[0]}
    unique_groups, group = np.unique(groups[1:], return_inverse=True)  # pass-1 label l -> blob group
    n = len(unique_groups)
    voxels = np.bincount(group, weights=cat["voxels"], minlength=n)
    value_sum = np.bincount(group, weights=cat["value_sum"], minlength=n)
    coords_sum = np.stack([np.bincount(group, weights=cat["coords_sum"][:, a], minlength=n) for a in range(3)], axis=1)
    maximum = np.full(n, -np.inf)
    np.maximum.at(maximum, group, cat["maximum"])
    low = np.full((n, 3), np.iinfo(np.int64).max)
    high = np.zeros((n, 3), np.int64)
    np.minimum.at(low, group, cat["low"])
    np.maximum.at(high, group, cat["high"])
    order = np.lexsort((np.arange(n), -voxels))  # biggest first, ties by first appearance
    blob_of_group = np.empty(n, np.int64)
    blob_of_group[order] = np.arange(1, n + 1)
    return Blobs(
        voxels=voxels[order].astype(np.int64),
        bbox_low=low[order] + origin,
        bbox_high=high[order] + origin,
        centroid=coords_sum[order] / voxels[order, None] + origin,
        mean_value=value_sum[order] / voxels[order],
        max_value=maximum[order],
        label_to_blob=np.r_[0, blob_of_group[group]],
    )


def write_blob_labels(scratch_labels, label_to_blob: np.ndarray, out: h5py.File, block: int) -> h5py.Dataset:
    """The final labels volume (blob ids as in the blob table), block by block."""
    dtype = np.uint32 if len(label_to_blob) < np.iinfo(np.uint32).max else np.uint64
    dataset = volume.create_volume(out, volume.BLOB_LABELS, scratch_labels.shape, dtype, chunk=min(block, volume.DEFAULT_CHUNK))
    for box in blocks.iter_blocks(scratch_labels.shape, block):
        dataset[box] = label_to_blob[scratch_labels[box]].astype(dtype)
    return dataset


def blob_overlap(scratch_labels, label_to_blob: np.ndarray, count: int, other, origin, block: int) -> np.ndarray:
    """Per blob (in the order of the blob table), its voxels where `other` (a volume the size of the whole
    prediction, e.g. the true ink) is > 0; `origin` is the zyx position of the labels' region in it."""
    totals = np.zeros(count + 1, np.int64)
    for box in blocks.iter_blocks(scratch_labels.shape, block):
        ids = label_to_blob[scratch_labels[box]]
        inside = other[tuple(slice(o + b.start, o + b.stop) for o, b in zip(origin, box))] > 0
        totals += np.bincount(ids[inside], minlength=count + 1)
    return totals[1:]
