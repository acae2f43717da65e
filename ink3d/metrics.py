"""Ink metrics over labeled voxels or pixels: F0.5 at the best threshold, ROC AUC."""

import numpy as np
from scipy.stats import rankdata


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
    ranks = rankdata(scores)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))
