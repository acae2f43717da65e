"""Connected components (26-connectivity) of a thresholded volume, block by block.

Pass 1 labels each block's core with connected-components-3d and stores the labels (unique over
the volume) in a scratch HDF5 dataset, with per-label statistics. Pass 2 labels each block again
with a one-voxel halo on its upper sides and joins (union-find) the stored labels that one halo
component covers: every 26-adjacent voxel pair lies inside some block plus its upper halo, so
the merged labels equal labeling the whole array at once. Memory is bounded by the block.
"""

from dataclasses import dataclass

import cc3d
import h5py
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ink3d import volume

LABELS = "labels"


class UnionFind:
    def __init__(self, size: int):
        self.parent = np.arange(size, dtype=np.int64)

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)

    def roots(self) -> np.ndarray:
        """The root of every item (pointer jumping until every pointer is a root)."""
        parent = self.parent.copy()
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                return parent
            parent = jumped


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


def label_blocks(dataset, threshold: float, block: int, scratch: h5py.File, roi=None) -> Blobs:
    """Blobs of `dataset >= threshold` within `roi` (zyx slices); pass-1 labels stored in `scratch[LABELS]`."""
    roi = roi or tuple(slice(0, size) for size in dataset.shape)
    origin = np.array([s.start for s in roi])
    shape = tuple(s.stop - s.start for s in roi)
    labels_out = volume.create_volume(scratch, LABELS, shape, np.uint32, chunk=min(block, volume.DEFAULT_CHUNK))
    boxes = list(volume.iter_blocks(shape, block))
    stats, offset = [], 0
    for box in tqdm(boxes, unit="block", desc="components: label"):
        values = dataset[tuple(slice(b.start + o, b.stop + o) for b, o in zip(box, origin))]
        labels, count = cc3d.connected_components(values >= threshold, connectivity=26, return_N=True, out_dtype=np.uint64)
        if count == 0:
            continue
        if offset + count >= np.iinfo(np.uint32).max:
            raise OverflowError("more than 2^32 components: raise the threshold or label an ROI")
        block_stats = _block_stats(labels, values, count, [b.start for b in box])
        labels_out[box] = np.where(labels > 0, labels + offset, 0).astype(np.uint32)
        stats.append(block_stats)
        offset += count
    union = UnionFind(offset + 1)
    for box in tqdm(boxes, unit="block", desc="components: merge"):
        halo = tuple(slice(b.start, min(b.stop + 1, size)) for b, size in zip(box, shape))
        stored = labels_out[halo]
        if not stored.any():
            continue
        joined = cc3d.connected_components(stored > 0, connectivity=26, out_dtype=np.uint64)
        pairs = np.unique(np.stack([joined[stored > 0], stored[stored > 0]], axis=1), axis=0)
        starts = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0]])
        for first, last in zip(starts, np.r_[starts[1:], len(pairs)]):
            for other in pairs[first + 1:last, 1]:
                union.union(int(pairs[first, 1]), int(other))
    return _merge(stats, union.roots(), offset, origin)


def _merge(stats: list[dict], roots: np.ndarray, count: int, origin: np.ndarray) -> Blobs:
    if count == 0:
        empty = np.zeros((0, 3))
        return Blobs(np.zeros(0, np.int64), empty.astype(np.int64), empty.astype(np.int64), empty, np.zeros(0), np.zeros(0),
                     np.zeros(1, np.int64))
    cat = {key: np.concatenate([s[key] for s in stats]) for key in stats[0]}
    root = roots[1:]  # pass-1 label l -> root label
    unique_roots, group = np.unique(root, return_inverse=True)
    n = len(unique_roots)
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
    dataset = volume.create_volume(out, LABELS, scratch_labels.shape, dtype, chunk=min(block, volume.DEFAULT_CHUNK))
    for box in volume.iter_blocks(scratch_labels.shape, block):
        dataset[box] = label_to_blob[scratch_labels[box]].astype(dtype)
    return dataset
