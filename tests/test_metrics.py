import itertools

import h5py
import numpy as np
import pytest

from ink3d import volume
from ink3d.metrics import VoxelCounts, best_fbeta, histogram_auc, histogram_fbeta, histogram_quantile, roc_auc, score_volume


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


@pytest.mark.parametrize("seed", range(3))
def test_histogram_scores_equal_the_scores_of_the_values(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 256, 5000)
    truth = rng.random(5000) < values / 400
    positives, negatives = np.bincount(values[truth], minlength=256), np.bincount(values[~truth], minlength=256)
    f, level = histogram_fbeta(positives, negatives)
    assert f == pytest.approx(best_fbeta(values, truth)[0], rel=1e-12)
    assert f == pytest.approx(_fbeta_slow(values, truth, 0.5), rel=1e-12)
    predicted = values >= level
    precision, recall = (predicted & truth).sum() / predicted.sum(), (predicted & truth).sum() / truth.sum()
    assert f == pytest.approx(1.25 * precision * recall / (0.25 * precision + recall), rel=1e-12)
    assert histogram_auc(positives, negatives) == pytest.approx(roc_auc(values, truth), rel=1e-12)
    for q in (0.05, 0.5, 0.95):
        assert histogram_quantile(np.bincount(values, minlength=256), q) == np.quantile(values, q, method="inverted_cdf")


def _brute_force_score(prediction, ink, scan, air_level):
    """The 3D score from whole arrays with the sorting metrics and numpy quantiles."""
    classes = {"air": ~ink & (scan <= air_level), "papyrus": ~ink & (scan > air_level), "ink": ink}
    expected = {"f05": best_fbeta(prediction, ink)[0], "auc": roc_auc(prediction, ink),
                "scan_f05": best_fbeta(scan, ink)[0], "scan_auc": roc_auc(scan, ink)}
    for name, where in classes.items():
        expected[f"{name}_fraction"] = where.mean()
        expected[f"{name}_median"] = np.quantile(prediction[where], 0.5, method="inverted_cdf") / 255
        expected[f"{name}_p95"] = np.quantile(prediction[where], 0.95, method="inverted_cdf") / 255
    return expected


def test_3d_score_equals_brute_force_on_a_hand_built_volume(tmp_path):
    rng = np.random.default_rng(0)
    shape = (13, 20, 17)
    scan = rng.integers(0, 120, shape).astype(np.uint8)
    scan[:, 8:12] += 100  # a sheet of material across the volume
    ink = np.zeros(shape, bool)
    ink[:, 11, 3:14] = True  # a stroke on the sheet's face
    prediction = np.clip(rng.normal(60, 30, shape) + 120 * ink, 0, 255).astype(np.uint8)
    with h5py.File(tmp_path / "v.h5", "w") as file:
        datasets = [volume.create_volume(file, name, shape, np.uint8, chunk=5) for name in ("p", "t", "s")]
        for dataset, values in zip(datasets, (prediction, ink.astype(np.uint8) * 255, scan)):
            dataset[:] = values
        region = (slice(2, 11), slice(5, 20), slice(0, 9))
        for box in (None, region):
            where = box or (slice(None),) * 3
            expected = _brute_force_score(prediction[where], ink[where], scan[where], 90)
            score = score_volume(*datasets, air_level=90, region=box, block=4)
            assert score["voxels"] == prediction[where].size
            for key, value in expected.items():
                assert score[key] == pytest.approx(value, rel=1e-12), key
    assert expected["air_fraction"] > 0.2 and expected["papyrus_fraction"] > 0.1  # every class is exercised


def test_voxel_counts_add_up_boxes():
    rng = np.random.default_rng(1)
    prediction, scan = rng.integers(0, 256, (2, 50)).astype(np.uint8)
    ink = rng.random(50) < 0.3
    whole, parts = VoxelCounts(), VoxelCounts()
    whole.add(prediction, ink, scan, 100)
    parts.add(prediction[:20], ink[:20], scan[:20], 100)
    parts.add(prediction[20:], ink[20:], scan[20:], 100)
    assert np.array_equal(whole.prediction, parts.prediction) and np.array_equal(whole.scan, parts.scan)
    assert whole.prediction[2].sum() == ink.sum() and whole.prediction[0].sum() == (~ink & (scan <= 100)).sum()
