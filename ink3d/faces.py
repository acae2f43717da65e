"""The written face along a labeled column, read off the scan, and whether a segment's normals point out of it.

A 2D ink label says the written face carries ink at a pixel; carbon ink lies on that face. Along the pixel's
normal, the face is where the sheet the surface lies on ends: the scan falls from the sheet's level into what
lies in front of it. In front of it there is air only where the turns stand apart; on a real scroll most turns
are pressed together, and the fall is into the contact between two sheets: a dip of the scan that may stay far
above the air level (on a real block the median dip lies at 75, papyrus ~121, the air level 54). So a face is
read off as a dip, relative to the sheet's own level, not as the step into air:

- the profile (samples STEP apart along the column) is smoothed with a Gaussian of SMOOTHING voxels;
- a dip is a local minimum at least DIP of the sheet's height above the air level below the sheet's level (the
  highest sample within REACH voxels before it) that either lies in air, or rises again after it (RISE of that
  height, within REACH) with no air within AHEAD voxels ahead (a darker speck inside a thick ink layer, before
  the fall into air, is no face);
- the face of a dip is its minimum where it stays above the air level (two sheets meet there), else where the
  fall crosses the air level (linear between samples);
- a column's face is the one nearest its surface no more than BEHIND voxels behind it (a segment drawn a little
  in front of the papyrus finds its own sheet's face behind it; the sheet under a surface drawn inside it does
  not count), else the nearest behind it.

A segment whose normals point into its sheet would put the window on the sheet's back. The scan tells the
orientation only where a surface lies in material with air close on one side and material on the other:
`orientation_votes` counts such columns each way, and `points_into_sheet` decides for a whole segment.
"""

import numpy as np
import torch
from scipy import ndimage

from ink3d import volume
from ink3d.ppm import valid_mask
from ink3d.sampling import trilinear

STEP = 0.5  # voxels between samples along a column (as ink3d.columns samples them)
SMOOTHING = 0.5  # sigma (voxels) of the smoothing along the column before faces are read
REACH = 8.0  # voxels before (and after) a dip over which the sheet's level (and the rise beyond) are taken
DIP = 0.25  # a dip lies at least this share of the sheet's height above the air level below the sheet's level ...
RISE = 0.1  # ... and rises again by this share of it after (unless air follows)
BEHIND = 2.0  # a column's face: the nearest no further than this behind its surface, else the nearest behind
AHEAD = REACH  # ... and lies in air or has no air this many voxels ahead (a dip in the ink layer before air is no face)
AIR_NEAR = 4.0  # orientation: air this close to the surface on one side (voxels) ...
MATERIAL_FAR = 6.0  # ... and none this far on the other side make a column's vote
VOTES_NEEDED = 20  # a segment is found flipped on at least this many votes ...
VOTE_SHARE = 0.75  # ... of which at least this share say its normals point into the sheet
PATCHES = 64  # a segment's orientation is read on this many patches of its pixels ...
PATCH = 8  # ... each this many pixels square, at random places


def smooth(profiles: np.ndarray) -> np.ndarray:
    """Profiles (n, T) smoothed along the column."""
    return ndimage.gaussian_filter1d(np.asarray(profiles, np.float32), SMOOTHING / STEP, axis=1, mode="nearest")


def _window_max(values: np.ndarray, reach: int, forward: bool) -> np.ndarray:
    """Per sample, the maximum over the `reach` samples before it (or after it) and itself."""
    origin = -((reach + 1) // 2) if forward else reach // 2  # shifts scipy's centred window to one side
    return ndimage.maximum_filter1d(values, reach + 1, axis=1, mode="constant", cval=-np.inf, origin=origin)


def find_faces(profiles: np.ndarray, air_level: float, centre: int | None = None) -> np.ndarray:
    """(n,) the face nearest sample `centre` (the surface; the middle sample by default) of each profile (n, T),
    in samples from its first sample (fractional); NaN where a profile holds no dip."""
    s = smooth(profiles)
    n, length = s.shape
    centre = length // 2 if centre is None else centre
    faces = np.full(n, np.nan)
    if length < 3:
        return faces
    reach = int(round(REACH / STEP))
    before, after = _window_max(s, reach, forward=False), _window_max(s, reach, forward=True)
    interior = np.zeros_like(s, dtype=bool)
    interior[:, 1:-1] = (s[:, 1:-1] < s[:, :-2]) & (s[:, 1:-1] <= s[:, 2:])
    interior[:, -1] = s[:, -1] < s[:, -2]  # still falling at the band's end: a dip only if in air
    height = before - air_level
    deep = (height > 0) & (before - s >= DIP * height)
    rises = (after - s >= RISE * height) & (np.arange(length) < length - 1)
    in_air = s <= air_level
    air_ahead = _window_max(in_air.astype(np.float32), int(round(AHEAD / STEP)), forward=True) > 0
    rows, minima = np.nonzero(interior & deep & ((rises & ~air_ahead) | in_air))
    if not len(rows):
        return faces
    level = np.maximum(s[rows, minima], air_level)
    # the last sample before the minimum (within reach) above that level: the face lies between it and the next
    back = minima[:, None] - np.arange(1, reach + 1)[None, :]
    above = (back >= 0) & (s[rows[:, None], np.clip(back, 0, None)] > level[:, None])
    j = minima - 1 - np.argmax(above, axis=1)
    high, low = s[rows, j], s[rows, j + 1]
    face = j + (high - level) / np.maximum(high - low, 1e-6)
    behind = face < centre - BEHIND / STEP
    order = np.lexsort((np.abs(face - centre), behind, rows))
    rows, face = rows[order], face[order]
    first = np.r_[True, rows[1:] != rows[:-1]]
    faces[rows[first]] = face[first]
    return faces


def orientation_votes(profiles: np.ndarray, air_level: float, centre: int | None = None) -> tuple[int, int]:
    """(out, into): how many profiles (n, T) show their normal pointing out of the sheet (air within AIR_NEAR in
    front of a surface in material, none within MATERIAL_FAR behind it) and how many into it (the reverse)."""
    s = smooth(profiles)
    length = s.shape[1]
    centre = length // 2 if centre is None else centre
    air = s <= air_level
    t = (np.arange(length) - centre) * STEP

    def nearest_air(side: np.ndarray) -> np.ndarray:
        distance = np.where(air & side[None, :], np.abs(t)[None, :], np.inf)
        return distance.min(axis=1)

    front, behind = nearest_air(t > 0), nearest_air(t < 0)
    in_material = ~air[:, centre]
    out = in_material & (front <= AIR_NEAR) & (behind > MATERIAL_FAR)
    into = in_material & (behind <= AIR_NEAR) & (front > MATERIAL_FAR)
    return int(out.sum()), int(into.sum())


def points_into_sheet(out: int, into: int) -> bool:
    """Whether a segment's votes say that its normals point into its sheet."""
    return out + into >= VOTES_NEEDED and into >= VOTE_SHARE * (out + into)


def profiles_along(columns: np.ndarray, scan: np.ndarray, band: float) -> np.ndarray:
    """(n, T) trilinear samples of `scan` along the columns (n, >= 6: point and normal in its voxel coordinates),
    every STEP from -band to band; 0 beyond the scan's edge voxels (as map_coordinates' constant mode)."""
    t = torch.linspace(-band, band, int(round(2 * band / STEP)) + 1).numpy()  # the samples ink3d.columns.offsets gives
    positions = columns[:, None, :3] + t[None, :, None] * columns[:, None, 3:6]
    coordinates = positions.reshape(-1, 3).T.astype(np.float64)
    values = trilinear(scan, coordinates, np.zeros(3, np.int64))
    beyond = np.any((coordinates < 0) | (coordinates > np.array(scan.shape)[:, None] - 1), axis=0)
    values[beyond] = 0
    return values.reshape(len(columns), len(t))


def segment_votes(scan, data: np.ndarray, band: float, air_level: float, rng: np.random.Generator) -> tuple[int, int]:
    """Orientation votes (out, into) of a segment's columns: `data` (rows, cols, 6: xyz and normal, in `scan`'s
    voxels, a .ppm's memory map), read on PATCHES patches of its pixels from `scan` (a box around each patch)."""
    rows, cols = data.shape[:2]
    votes = np.zeros(2, np.int64)
    for row, col in zip(rng.integers(0, max(1, rows - PATCH + 1), PATCHES), rng.integers(0, max(1, cols - PATCH + 1), PATCHES)):
        patch = np.asarray(data[row:row + PATCH, col:col + PATCH]).reshape(-1, 6)
        patch = patch[valid_mask(patch)]
        if not len(patch):
            continue
        columns = np.concatenate([patch[:, 2::-1], patch[:, 5:2:-1]], axis=1).astype(np.float32)
        ends = np.concatenate([columns[:, :3] - band * columns[:, 3:], columns[:, :3] + band * columns[:, 3:]])
        low = np.floor(ends.min(axis=0)).astype(np.int64)
        box = volume.read_crop(scan, low, np.floor(ends.max(axis=0)).astype(np.int64) + 2 - low, fill=0)
        columns[:, :3] -= low
        votes += orientation_votes(profiles_along(columns, box, band), air_level)
    return int(votes[0]), int(votes[1])
