import h5py
import numpy as np
import pytest
import torch

from ink3d import volume
from ink3d.intensity import Normalization, air_level, otsu_level, scan_histogram
from ink3d.metrics import histogram_quantile

skimage_filters = pytest.importorskip("skimage.filters", reason="scikit-image is the reference Otsu threshold")


@pytest.mark.parametrize("seed", range(3))
def test_otsu_level_equals_scikit_image(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(20, 12, 7000), rng.normal(120 + 20 * seed, 30, 3000)])
    values = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    counts = np.bincount(values, minlength=256)
    assert otsu_level(counts) == skimage_filters.threshold_otsu(hist=(counts, np.arange(256)))


def test_histogram_percentile_is_numpys_inverted_cdf():
    values = np.random.default_rng(0).integers(0, 256, 1001)
    counts = np.bincount(values, minlength=256)
    for percent in (0.5, 10, 50, 99.5):
        assert histogram_quantile(counts, percent / 100) == np.percentile(values, percent, method="inverted_cdf")


def test_scan_histogram_counts_every_voxel_or_a_bounded_sample(tmp_path):
    values = np.random.default_rng(0).integers(0, 256, (20, 30, 25)).astype(np.uint8)
    with h5py.File(tmp_path / "s.h5", "w") as file:
        scan = volume.create_volume(file, volume.SCAN, values.shape, np.uint8, chunk=8)
        scan[:] = values
        assert np.array_equal(scan_histogram(scan, block=8), np.bincount(values.ravel(), minlength=256))
        sample = scan_histogram(scan, max_blocks=5, block=8)
        assert 5 * 8**3 >= sample.sum() >= 5 * 4 * 6 * 1 and np.all(sample <= np.bincount(values.ravel(), minlength=256))


def test_normalization_scale_is_division_by_255_and_numpy_equals_torch():
    values = np.arange(256, dtype=np.uint8)
    assert np.array_equal(Normalization()(values), values.astype(np.float32) / 255)
    assert torch.equal(Normalization()(torch.from_numpy(values)), torch.from_numpy(values).float().div_(255))
    window = Normalization(50.0, 150.0)
    expected = np.clip((values.astype(np.float32) - 50) / 100, 0, 1)
    assert np.array_equal(window(values), expected)
    assert np.array_equal(window(torch.from_numpy(values)).numpy(), expected)


def test_normalization_of_a_volume_windows_the_material_and_round_trips_through_a_config():
    rng = np.random.default_rng(0)
    air = np.clip(rng.normal(20, 8, 9000), 0, 255)
    material = np.clip(rng.normal(150, 20, 3000), 0, 255)
    values = np.rint(np.concatenate([air, material])).astype(int)
    counts = np.bincount(values, minlength=256)
    window = Normalization.of_volume(counts, "percentile", 1, 99)
    above_air = values[values > air_level(counts)]
    assert len(above_air) == pytest.approx(3000, rel=0.01)
    assert window.low == np.percentile(above_air, 1, method="inverted_cdf")
    assert window.high == np.percentile(above_air, 99, method="inverted_cdf")
    assert Normalization.from_config({"normalization": window.to_config()}) == window
    assert Normalization.from_config({}) == Normalization() == Normalization.of_volume(counts, "scale", 1, 99)
    with pytest.raises(ValueError, match="scale or percentile"):
        Normalization.of_volume(counts, "zscore", 1, 99)


def test_air_level_lies_in_the_valley_where_otsu_splits_the_papyrus():
    """The shape of a real scroll block's histogram: air peaks at 42, papyrus (broad) at 121, the valley near 55;
    Otsu's threshold lands in the papyrus (above 90), the air level between 50 and 75."""
    levels = np.arange(256.0)
    counts = 1e6 * (0.15 / 4 * np.exp(-0.5 * ((levels - 42) / 4) ** 2) + 0.85 / 25 * np.exp(-0.5 * ((levels - 121) / 25) ** 2))
    counts[0] = 5 * counts.max()  # padding outside the field of view is no mode of its own
    assert np.argmax(counts[20:80]) + 20 == 42 and np.argmax(counts[80:]) + 80 == 121
    assert otsu_level(counts[1:]) + 1 > 90
    assert 50 <= air_level(counts) <= 60


def test_air_level_falls_back_to_otsu_with_one_mode():
    counts = np.exp(-0.5 * ((np.arange(256.0) - 100) / 20) ** 2)
    assert air_level(counts) == otsu_level(np.r_[0, counts[1:-1], 0])


@pytest.mark.parametrize("seed", [0, 1])
def test_air_level_of_a_ct_like_scroll_is_the_generators_boundary(tmp_path, seed):
    import json

    import tifffile

    import make_synthetic_scroll

    make_synthetic_scroll.main(["--out_dir", str(tmp_path), "--seed", str(seed), "--depth", "24", "--ct_like", "true"])
    scan = volume.UINT16_TO_UINT8[np.stack([tifffile.imread(path) for path in sorted((tmp_path / "volume").glob("*.tif"))])]
    boundary = json.loads((tmp_path / "scroll.json").read_text())["air_boundary"]
    assert abs(air_level(scan_histogram(scan)) - boundary) <= 3
    assert otsu_level(scan_histogram(scan)) - boundary > 3  # the test can tell the estimates apart
