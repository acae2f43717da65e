"""Scan intensity: a histogram sampled from the volume, the air level, and the model's input normalisation.

Real scans differ in brightness and contrast, so two things are read off the volume itself:
the air level (scan values at or below it are air, which holds no ink) and, optionally, a
percentile window that maps the papyrus' range onto [0, 1]. Both come from a bounded sample of
chunks, so they cost the same on a 1 TB scan as on the demo.

The air level is the valley between the two lowest modes of the smoothed histogram (air, then
papyrus). Otsu's threshold is no air level for a real scan: its broad papyrus mode pulls the
threshold into the papyrus (93 on a scroll block whose air peaks at 42, papyrus at 121, with the
valley at 54), so the sheet faces, where the ink lies, would count as air.
"""

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ink3d import volume
from ink3d.blocks import iter_blocks
from ink3d.metrics import LEVELS, histogram_quantile


def scan_histogram(dataset, max_blocks: int = 64, block: int = volume.DEFAULT_CHUNK, seed: int = 0) -> np.ndarray:
    """Counts of each uint8 value over at most `max_blocks` blocks of the volume (all blocks when it has fewer)."""
    blocks = list(iter_blocks(dataset.shape, block))
    if len(blocks) > max_blocks:
        chosen = np.random.default_rng(seed).choice(len(blocks), max_blocks, replace=False)
        blocks = [blocks[i] for i in sorted(chosen)]
    counts = np.zeros(LEVELS, np.int64)
    for box in blocks:
        counts += np.bincount(np.asarray(dataset[box]).ravel(), minlength=LEVELS)[:LEVELS]
    return counts


def otsu_level(counts: np.ndarray) -> int:
    """Otsu's threshold of a histogram: the level t maximising the between-class variance of
    {values <= t} and {values > t}."""
    counts = np.asarray(counts, np.float64)
    levels = np.arange(len(counts))
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * levels)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_low = sum_low / weight_low
        mean_high = (sum_low[-1] - sum_low) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return int(np.argmax(np.nan_to_num(between[:-1], nan=-1.0)))


AIR_SMOOTHING = 2.0  # sigma, in grey levels, of the histogram smoothing before its modes are found
MODE_PROMINENCE = 0.02  # a mode stands out of the smoothed histogram by this fraction of its highest count


def air_level(counts: np.ndarray) -> int:
    """The air/papyrus boundary of a uint8 histogram: the lowest level of the valley between its two lowest modes
    (Otsu's threshold where the histogram has fewer than two). Levels 0 and 255 are left out: padding outside a
    scan's field of view and saturated voxels form modes of their own."""
    from scipy.signal import find_peaks  # here: importing scipy.signal takes most of a second of every stage's start

    counts = np.asarray(counts, np.float64).copy()
    counts[0] = counts[-1] = 0
    smooth = ndimage.gaussian_filter1d(counts, AIR_SMOOTHING, mode="constant")
    modes, _ = find_peaks(smooth, prominence=MODE_PROMINENCE * smooth.max()) if smooth.max() > 0 else ([], None)
    if len(modes) < 2:
        return otsu_level(counts)
    low, high = modes[:2]
    return int(low + np.argmin(smooth[low:high + 1]))


AIR_LEVELS = ("auto", "otsu", "none")


def parse_air_level(setting: str, allowed=AIR_LEVELS) -> str | int:
    """An `--air_level` setting: one of the words `allowed` (of auto, otsu, none), or a uint8 number."""
    if setting in allowed:
        return setting
    try:
        level = int(setting)
    except ValueError:
        level = -1
    if not 0 <= level <= 255:
        raise ValueError(f"{setting!r}: expected a number in 0..255, {', '.join(allowed)}")
    return level


def resolve_air_level(setting, counts: np.ndarray) -> int | None:
    """The air level a setting names: `auto` (the valley, `air_level`), `otsu`, `none`, or a uint8 number."""
    level = parse_air_level(setting)
    if level == "auto":
        return air_level(counts)
    if level == "otsu":
        return otsu_level(counts)
    return None if level == "none" else level


def scan_air_level(setting: str, scan) -> int | None:
    """The air level `setting` names for a stage that reads it off the scan (`volume`): the scan's histogram is
    read (one streaming pass) only for `auto` and `otsu`. None for `none`, or without a scan."""
    level = parse_air_level(setting)
    if scan is None or level == "none":
        return None
    return resolve_air_level(level, scan_histogram(scan)) if level in ("auto", "otsu") else level


@dataclass(frozen=True)
class Normalization:
    """Model input = clip((scan - low) / (high - low), 0, 1). `low=0, high=255` is plain `scan / 255`."""

    low: float = 0.0
    high: float = 255.0

    @classmethod
    def from_config(cls, config: dict | None) -> "Normalization":
        """The normalisation a checkpoint's config records (`/255` for checkpoints that record none)."""
        values = (config or {}).get("normalization")
        return cls(*values) if values else cls()

    @classmethod
    def of_volume(cls, counts: np.ndarray, mode: str, low_percent: float, high_percent: float) -> "Normalization":
        """`scale`: /255; `percentile`: the window between two percentiles of the material above the air
        level (air dominates a scroll's bounding box and would otherwise set the low end)."""
        if mode == "scale":
            return cls()
        if mode != "percentile":
            raise ValueError(f"normalization {mode!r}: choose scale or percentile")
        material = np.array(counts, copy=True)
        material[:air_level(counts) + 1] = 0
        low, high = histogram_quantile(material, low_percent / 100), histogram_quantile(material, high_percent / 100)
        return cls(float(low), float(max(high, low + 1)))

    def normalize_(self, values: torch.Tensor) -> torch.Tensor:
        """The model input from scan values already in a float32 tensor, in place."""
        return values.sub_(self.low).div_(self.high - self.low).clamp_(0, 1)

    def to_config(self) -> list[float]:
        return [self.low, self.high]

    def __call__(self, scan):
        """Float input of the model from uint8 scan values (a numpy array or a torch tensor)."""
        if isinstance(scan, torch.Tensor):
            return self.normalize_(scan.to(torch.float32, copy=True))
        return np.clip((np.asarray(scan, np.float32) - np.float32(self.low)) / np.float32(self.high - self.low), 0, 1)
