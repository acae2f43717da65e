"""tifxyz segments (Volume Cartographer's newer form), read and presented pixel by pixel like a `.ppm`.

A tifxyz segment is a folder: `x.tif`, `y.tif`, `z.tif` (the 3D point of each vertex of a regular
grid), `meta.json` (with `scale = [sx, sy]`: the grid is stored sub-sampled, vertex (i, j) lying at
full-resolution pixel (row i / sy, column j / sx)) and an optional `mask.tif` (255 = keep; at the
grid's resolution or an integer multiple of it). Vertices with z <= 0, or any coordinate not finite,
are invalid (writers use (-1, -1, -1)).

`SurfaceMap` brings the grid to full resolution on demand: each pixel's point is the bilinear
interpolation of its grid cell's four vertices (invalid unless all four are valid), and its normal the
normalised cross product of the surface's derivatives along the columns and along the rows, the
`.ppm` convention of this pipeline (for a sheet whose rows run along z and whose columns run along the
written face, the normal points out of the face).
"""

import json
from pathlib import Path

import numpy as np
import tifffile

from ink3d import InputError

COORDINATES = ("x.tif", "y.tif", "z.tif")


MIN_SCALE = 0.01  # vertices per pixel: tifxyz grids are written at 0.05-0.2; far sparser ones are damaged meta.json


def is_tifxyz(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (*COORDINATES, "meta.json"))


def _scale(folder: Path) -> tuple[float, float]:
    missing = [name for name in (*COORDINATES, "meta.json") if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{folder}: tifxyz segment without {', '.join(missing)}")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        sx, sy = (float(value) for value in meta["scale"])
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{folder / 'meta.json'}: needs \"scale\": [sx, sy] ({type(error).__name__}: {error})") from None
    if not (MIN_SCALE <= sx <= 1 and MIN_SCALE <= sy <= 1):
        raise InputError(f"{folder / 'meta.json'}: scale {[sx, sy]} must lie in [{MIN_SCALE}, 1] "
                         f"(a vertex every 1 to {round(1 / MIN_SCALE)} pixels)")
    return sx, sy


def _covered(grid_shape, sx: float, sy: float) -> tuple[int, int]:
    """Full-resolution pixels a grid covers: every pixel up to its last vertex."""
    return int(np.floor((grid_shape[0] - 1) / sy + 1e-9)) + 1, int(np.floor((grid_shape[1] - 1) / sx + 1e-9)) + 1


def tifxyz_size(folder: str | Path) -> tuple[int, int]:
    """(height, width) in full-resolution pixels, from the files' headers and meta.json: checks a segment
    without reading its grid."""
    folder = Path(folder)
    sx, sy = _scale(folder)
    shapes = []
    for name in COORDINATES:
        try:
            with tifffile.TiffFile(folder / name) as tiff:
                shapes.append(tuple(tiff.pages[0].shape))
        except Exception as error:  # any decoder failure is reported with the file's name
            raise InputError(f"{folder / name}: cannot read ({type(error).__name__}: {error})") from None
    if len(set(shapes)) != 1 or len(shapes[0]) != 2:
        raise InputError(f"{folder}: x, y and z must be 2D images of one size, got {', '.join(map(str, shapes))}")
    return _covered(shapes[0], sx, sy)


def read_tifxyz(folder: str | Path) -> tuple[np.ndarray, tuple[float, float]]:
    """The grid's points (H, W, 3) xyz, float64, NaN where invalid, and `scale` (sx, sy)."""
    folder = Path(folder)
    sx, sy = _scale(folder)
    grids = []
    for name in COORDINATES:
        try:
            grids.append(np.asarray(tifffile.imread(folder / name), dtype=np.float64))
        except Exception as error:  # any decoder failure is reported with the file's name
            raise InputError(f"{folder / name}: cannot read ({type(error).__name__}: {error})") from None
    shapes = [grid.shape for grid in grids]
    if len(set(shapes)) != 1 or len(shapes[0]) != 2:
        raise InputError(f"{folder}: x, y and z must be 2D images of one size, got {', '.join(map(str, shapes))}")
    points = np.stack(grids, axis=-1)
    invalid = (points[..., 2] <= 0) | ~np.isfinite(points).all(axis=-1)
    if (folder / "mask.tif").is_file():
        invalid |= ~_mask_at_grid(folder / "mask.tif", shapes[0])
    points[invalid] = np.nan
    return points, (sx, sy)


def _mask_at_grid(path: Path, shape) -> np.ndarray:
    """Vertices the mask keeps (channel 0 >= 255); a mask k times the grid's size keeps a vertex only if
    all its k x k pixels do."""
    mask = tifffile.imread(path)
    mask = mask[..., 0] if mask.ndim == 3 else mask
    factor = (mask.shape[0] // shape[0], mask.shape[1] // shape[1])
    if mask.ndim != 2 or min(factor) < 1 or mask.shape != (shape[0] * factor[0], shape[1] * factor[1]):
        raise InputError(f"{path}: mask of shape {mask.shape} is not the grid's {tuple(shape)} or an integer multiple of it")
    keep = mask >= 255
    return keep.reshape(shape[0], factor[0], shape[1], factor[1]).all(axis=(1, 3))


def grid_normals(points: np.ndarray) -> np.ndarray:
    """Unit normals (H, W, 3) of a grid of points: d/dcolumn x d/drow, by central differences where both
    neighbours are valid, one-sided where only one is; NaN where neither derivative exists."""
    def derivative(axis: int) -> np.ndarray:
        forward = np.full(points.shape, np.nan)
        backward = np.full(points.shape, np.nan)
        ahead = [slice(None)] * 3
        behind = [slice(None)] * 3
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        difference = points[tuple(ahead)] - points[tuple(behind)]
        forward[tuple(behind)] = difference
        backward[tuple(ahead)] = difference
        central = (forward + backward) / 2
        return np.where(np.isnan(central), np.where(np.isnan(forward), backward, forward), central)

    normal = np.cross(derivative(1), derivative(0))
    length = vector_length(normal)[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(length > 0, normal / length, np.nan)


class SurfaceMap:
    """A tifxyz segment at full resolution, read like a `.ppm`: `height`, `width` and `data[rows, cols]`
    (rows, cols, 6) float64 `x, y, z, nx, ny, nz`, all zeros off the surface. `shape` (height, width)
    defaults to every pixel the grid covers; a label image's shape may differ from that by less than one
    grid step (pixels past the last vertex are off the surface)."""

    def __init__(self, folder: str | Path, shape: tuple[int, int] | None = None):
        self.path = Path(folder)
        self.points, (self.sx, self.sy) = read_tifxyz(folder)
        self.normals = grid_normals(self.points)
        rows, cols = self.points.shape[:2]
        covered = _covered((rows, cols), self.sx, self.sy)
        if shape is not None:
            spare = (int(np.ceil(1 / self.sy)), int(np.ceil(1 / self.sx)))
            if not all(abs(s - c) < extra for c, s, extra in zip(covered, shape, spare)):
                raise InputError(f"{self.path}: an image of {shape[1]} x {shape[0]} (w x h) does not fit the grid of "
                                 f"{cols} x {rows} vertices at scale {[self.sx, self.sy]} ({covered[1]} x {covered[0]} pixels)")
        self.height, self.width = shape if shape is not None else covered
        self.data = _PixelData(self)

    def pixels(self, rows: slice, cols: slice) -> np.ndarray:
        row = np.arange(self.height)[rows] * self.sy
        col = np.arange(self.width)[cols] * self.sx
        out = np.zeros((len(row), len(col), 6))
        last_row, last_col = self.points.shape[0] - 1, self.points.shape[1] - 1
        r0 = np.minimum(np.floor(row).astype(int), max(last_row - 1, 0))
        c0 = np.minimum(np.floor(col).astype(int), max(last_col - 1, 0))
        fr, fc = (row - r0)[:, None, None], (col - c0)[None, :, None]
        r1, c1 = np.minimum(r0 + 1, last_row), np.minimum(c0 + 1, last_col)
        inside = (row <= last_row)[:, None] & (col <= last_col)[None, :]
        grid_rows, at = np.unique(np.concatenate([r0, r1]), return_inverse=True)  # the few grid rows the pixels span
        at_r0, at_r1 = at[:len(r0)], at[len(r0):]

        def bilinear(grid):
            """(1 - fr) ((1 - fc) g00 + fc g01) + fr ((1 - fc) g10 + fc g11), operation for operation, with the inner
            sums formed once per grid row spanned rather than once per pixel row."""
            spanned = grid[grid_rows]
            along_columns = (1 - fc) * spanned[:, c0] + fc * spanned[:, c1]
            return (1 - fr) * along_columns[at_r0] + fr * along_columns[at_r1]

        point = bilinear(self.points)
        normal = bilinear(self.normals)
        length = vector_length(normal)
        valid = inside & _finite(point) & _finite(normal) & (length > 0)
        out[..., :3] = np.where(valid[..., None], point, 0)
        out[..., 3:] = np.where(valid[..., None], normal / np.where(valid, length, 1)[..., None], 0)
        return out


def _finite(vectors: np.ndarray) -> np.ndarray:
    """Whether each (..., 3) vector is finite: column by column, far faster than reducing the short last axis."""
    return np.isfinite(vectors[..., 0]) & np.isfinite(vectors[..., 1]) & np.isfinite(vectors[..., 2])


def vector_length(vectors: np.ndarray) -> np.ndarray:
    """The length of each (..., 3) vector, bit for bit np.linalg.norm's (the same sum of squares), ~8x faster: column
    by column rather than reducing the short last axis."""
    return np.sqrt(vectors[..., 0] ** 2 + vectors[..., 1] ** 2 + vectors[..., 2] ** 2)


class _PixelData:
    """`SurfaceMap.data`: slicing computes the pixels asked for."""

    def __init__(self, surface: SurfaceMap):
        self.surface = surface
        self.shape = (surface.height, surface.width, 6)

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = (key, slice(None)) if not isinstance(key, tuple) else (key + (slice(None),))[:2]
        if not (isinstance(rows, slice) and isinstance(cols, slice)):
            raise TypeError("SurfaceMap.data takes row and column slices")
        return self.surface.pixels(rows, cols)


def write_tifxyz(folder: str | Path, points: np.ndarray, scale: tuple[float, float], mask: np.ndarray | None = None) -> None:
    """Write a grid of xyz points (H, W, 3; NaN where invalid, written as -1) as a tifxyz folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.where(np.isfinite(points).all(axis=-1, keepdims=True), points, -1.0).astype(np.float32)
    for axis, name in enumerate(COORDINATES):
        tifffile.imwrite(folder / name, stored[..., axis])
    if mask is not None:
        tifffile.imwrite(folder / "mask.tif", np.where(mask, 255, 0).astype(np.uint8))
    (folder / "meta.json").write_text(json.dumps({"format": "tifxyz", "type": "seg", "uuid": folder.name, "scale": list(scale)}) + "\n")
