"""Block origins of labeled regions, and the distance filter that keeps validation honest."""

import numpy as np
from scipy.spatial import cKDTree


def drop_near(train: np.ndarray, valid: np.ndarray, radius: float) -> tuple[np.ndarray, int]:
    """Training origins farther than `radius` (Euclidean, voxels) from every validation origin.

    Returns (kept origins, number dropped). A KD-tree keeps this O(n log n) for any count.
    """
    train = np.asarray(train).reshape(-1, 3)
    valid = np.asarray(valid).reshape(-1, 3)
    if len(train) == 0 or len(valid) == 0 or radius <= 0:
        return train, 0
    distances, _ = cKDTree(valid).query(train, k=1)
    keep = distances >= radius
    return train[keep], int((~keep).sum())
