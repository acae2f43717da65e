import itertools

import numpy as np
import pytest

from ink3d.metrics import best_fbeta, roc_auc


def _fbeta_slow(scores, truth, beta):
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = (predicted & truth).sum()
        if tp == 0:
            continue
        precision, recall = tp / predicted.sum(), tp / truth.sum()
        best = max(best, (1 + beta**2) * precision * recall / (beta**2 * precision + recall))
    return best


def _auc_slow(scores, truth):
    pairs = list(itertools.product(scores[truth], scores[~truth]))
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])


@pytest.mark.parametrize("seed", range(5))
def test_against_slow_loops(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(200), 2)  # ties included
    truth = rng.random(200) < scores * 0.8
    f, threshold = best_fbeta(scores, truth, 0.5)
    assert f == pytest.approx(_fbeta_slow(scores, truth, 0.5))
    predicted = scores >= threshold
    tp = (predicted & truth).sum()
    assert f == pytest.approx(1.25 * (tp / predicted.sum()) * (tp / truth.sum()) / (0.25 * tp / predicted.sum() + tp / truth.sum()))
    assert roc_auc(scores, truth) == pytest.approx(_auc_slow(scores, truth))


def test_hand_values():
    scores = np.array([0.9, 0.8, 0.4, 0.3])
    truth = np.array([True, False, True, False])
    assert best_fbeta(scores, truth)[0] == pytest.approx(1.0 / (0.25 * 1 + 0.5) * 1.25 * 0.5)  # t=0.9: P=1, R=0.5
    assert roc_auc(scores, truth) == pytest.approx(0.75)
    assert best_fbeta(scores, np.zeros(4, bool))[0] == 0.0
    assert np.isnan(roc_auc(scores, np.ones(4, bool)))
