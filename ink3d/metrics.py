"""Ink metrics: F0.5 at the best threshold and ROC AUC over labeled voxels or pixels, and the 3D
score of a whole prediction volume against a ground-truth ink volume.

The 3D score streams: predictions and scan are uint8, so per-value counts (histograms) of each
class give the exact best-threshold F0.5, AUC and quantiles without holding the volume.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from ink3d import blocks, volume

LEVELS = 256  # predictions and the scan are uint8


def best_fbeta(scores: np.ndarray, truth: np.ndarray, beta: float = 0.5) -> tuple[float, float]:
    """(best F-beta over all thresholds `score >= t`, that threshold); exact, by sorting."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    positives = truth.sum()
    if positives == 0 or len(scores) == 0:
        return 0.0, float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_truth = scores[order], truth[order]
    last_of_value = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]  # thresholds between distinct scores
    true_positives = np.cumsum(sorted_truth)[last_of_value]
    predicted = (np.arange(1, len(scores) + 1))[last_of_value]
    precision = true_positives / predicted
    recall = true_positives / positives
    b2 = beta * beta
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(true_positives > 0, (1 + b2) * precision * recall / (b2 * precision + recall), 0.0)
    best = int(np.argmax(f))
    return float(f[best]), float(sorted_scores[last_of_value][best])


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks); nan with one class only."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    positives, negatives = truth.sum(), (~truth).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    from scipy.stats import rankdata  # here: importing scipy.stats takes most of a second of every stage's start

    ranks = rankdata(scores)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def histogram_fbeta(positives: np.ndarray, negatives: np.ndarray, beta: float = 0.5) -> tuple[float, int]:
    """Best F-beta over thresholds `value >= t` for integer values given as per-value counts of the
    positive and the negative class; returns (F-beta, t). Exact, as `best_fbeta` on the values."""
    true_positives = np.cumsum(np.asarray(positives, np.float64)[::-1])[::-1]
    predicted = true_positives + np.cumsum(np.asarray(negatives, np.float64)[::-1])[::-1]
    total = true_positives[0] if len(true_positives) else 0.0
    if total == 0:
        return 0.0, -1
    b2 = beta * beta
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = true_positives / predicted, true_positives / total
        f = np.where(true_positives > 0, (1 + b2) * precision * recall / (b2 * precision + recall), 0.0)
    best = int(np.argmax(f))
    return float(f[best]), best


def histogram_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """ROC AUC from per-value counts (ties count one half), as `roc_auc` on the values."""
    positives, negatives = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    if positives.sum() == 0 or negatives.sum() == 0:
        return float("nan")
    below = np.cumsum(negatives) - negatives
    return float((positives * (below + 0.5 * negatives)).sum() / (positives.sum() * negatives.sum()))


def histogram_quantile(counts: np.ndarray, q: float) -> int:
    """The smallest value whose cumulative count reaches q of the total (numpy's 'inverted_cdf')."""
    cumulative = np.cumsum(counts)
    return int(np.searchsorted(cumulative, q * cumulative[-1])) if cumulative[-1] else -1


CLASSES = ("air", "papyrus", "ink")  # air: scan <= air level and no ink; papyrus: material without ink


@dataclass
class VoxelCounts:
    """Per-value counts of uint8 predictions in each class of CLASSES, and of scan values without / with ink."""

    prediction: np.ndarray = field(default_factory=lambda: np.zeros((len(CLASSES), LEVELS), np.int64))
    scan: np.ndarray = field(default_factory=lambda: np.zeros((2, LEVELS), np.int64))

    def add(self, prediction: np.ndarray, ink: np.ndarray, scan: np.ndarray, air_level: int) -> None:
        """Count one box: uint8 `prediction` and `scan`, boolean `ink`, all of the same shape."""
        ink = np.asarray(ink, bool).ravel()
        scan = np.asarray(scan, np.uint8).ravel()
        category = np.where(ink, 2, np.where(scan <= air_level, 0, 1))
        keys = category * LEVELS + np.asarray(prediction, np.uint8).ravel()
        self.prediction += np.bincount(keys, minlength=len(CLASSES) * LEVELS).reshape(len(CLASSES), LEVELS)
        self.scan += np.bincount(ink * LEVELS + scan, minlength=2 * LEVELS).reshape(2, LEVELS)

    def summary(self) -> dict:
        """Best-threshold F0.5 (threshold as a probability) and AUC of the prediction and of the scan
        intensity (ink denser), the share of each class, and the prediction's median and 95th
        percentile in each class. What a class without voxels leaves undefined (an AUC, a quantile,
        a threshold) is None, JSON's null."""
        ink = self.prediction[2]
        no_ink = self.prediction[0] + self.prediction[1]
        f05, level = histogram_fbeta(ink, no_ink)
        scan_f05, scan_level = histogram_fbeta(self.scan[1], self.scan[0])
        voxels = int(self.prediction.sum())
        result = {"voxels": voxels, "f05": f05, "threshold": _defined(level, 255), "auc": _defined(histogram_auc(ink, no_ink)),
                  "scan_f05": scan_f05, "scan_threshold": _defined(scan_level),
                  "scan_auc": _defined(histogram_auc(self.scan[1], self.scan[0]))}
        for name, counts in zip(CLASSES, self.prediction):
            result[f"{name}_fraction"] = float(counts.sum() / max(voxels, 1))
            result[f"{name}_median"] = _defined(histogram_quantile(counts, 0.5), 255)
            result[f"{name}_p95"] = _defined(histogram_quantile(counts, 0.95), 255)
        return result


def _defined(value: float, scale: float = 1.0) -> float | None:
    """`value / scale`, or None where a class without voxels leaves it undefined (NaN, or -1 from a quantile or a threshold)."""
    return None if math.isnan(value) or value < 0 else value / scale


def score_volume(predictions, truth, scan, air_level: int, region=None, block: int = volume.DEFAULT_CHUNK) -> dict:
    """The 3D score (VoxelCounts.summary) of a uint8 prediction volume against a ground-truth ink volume
    (> 0 = ink) with the scan beside it, over `region` (zyx slices; the whole volume when None), block by block."""
    region = region or tuple(slice(0, size) for size in predictions.shape)
    counts = VoxelCounts()
    for box in blocks.iter_blocks([r.stop - r.start for r in region], block):
        box = tuple(slice(r.start + b.start, r.start + b.stop) for r, b in zip(region, box))
        counts.add(predictions[box], truth[box] > 0, scan[box], air_level)
    return counts.summary()
