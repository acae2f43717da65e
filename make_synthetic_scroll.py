"""Make a small synthetic scroll with known ink: the embedded default data of every demo and test.

    python make_synthetic_scroll.py --out_dir runs/demo/scroll --seed 0

A papyrus sheet rolled into an Archimedean spiral (in y/x, its centre drifting slowly with z)
is written as uint16 TIFF slices like a real scan. Letter-like strokes of ink lie on the outer
face of the sheet as a thin layer, denser than the papyrus under it but not brighter than the
papyrus elsewhere (papyrus brightness and thickness vary across the scroll). Where there is no
ink, loose fibres cover the face instead: as dense on average as ink, but speckled. So neither
a global intensity threshold nor the mean along the normal finds the ink, while a model that
sees the 3D texture can.
Segments are patches of the sheet surface written as real .ppm files, with their 2D ink labels.

Harder variants of the same scroll come from flags: a thicker ink layer (`--ink_thickness`),
segments that sit elsewhere than the middle of the ink (`--surface_offset`, their height above
the papyrus face) or drift along their normal (`--surface_jitter`), sheets packed closer
(`--pitch`), segments whose normals point into the sheet (`--flip_normals`), and an intensity
model whose histogram resembles a real CT scan (`--ct_like true`: air around 0.16 and papyrus
around 0.47 of full scale with overlapping tails, blurred faces). `scroll.json` records the
variant, the true depth of the ink's middle along each segment's normal, and the air/papyrus
boundary of the written scan (the uint8 level that best separates air from material voxels).

Writes `volume/00000.tif...`, `paths/<id>/<id>.ppm` (+ `<id>_mask.png`),
`labels/<id>_inklabels.png`, `ground_truth.h5` (dataset `ink`, 255 = ink) and `scroll.json`;
with `--ome_zarr true` also the volume as an OME-Zarr group `volume.zarr`, and with
`--tifxyz_step N` every segment as a tifxyz folder `tifxyz/<id>/` (one vertex per N pixels):
the forms the scroll data server publishes today.
"""

import ink3d.quiet_start  # noqa: F401, I001  first: a Ctrl-C while the rest imports ends in one line

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import tifffile
from scipy import ndimage, special

from ink3d import InputError, pyramid, volume
from ink3d.config import config_path_for, parse_config, run_main, save_config
from ink3d.files import atomic_output, check_output, output_lock, write_image, writing
from ink3d.ppm import write_ppm
from ink3d.tifxyz import write_tifxyz

# --- config ---
OUT_DIR = "runs/demo/scroll"  # folder to create (refused if it holds a scroll, unless --overwrite true)
SEED = 0  # random seed: the same seed gives identical files
DEPTH = 160  # z size (number of slices)
HEIGHT = 256  # y size
WIDTH = 256  # x size
OME_ZARR = False  # also write the volume as an OME-Zarr group, volume.zarr (2 levels), as the data server publishes scans
TIFXYZ_STEP = 0  # also write each segment as a tifxyz folder, tifxyz/<id>/, one grid vertex per this many pixels (0 = none)
OVERWRITE = False  # replace an existing scroll in out_dir
INK_THICKNESS = 3.0  # voxels of the ink layer on the outer face of the sheet
SURFACE_OFFSET = 1.5  # segments' height above the papyrus face along the normal (1.5: the middle of a 3-voxel ink layer)
SURFACE_JITTER = 0.0  # amplitude (voxels) of a smooth random drift of each segment along its normal
PITCH = 20.0  # radial distance between turns of the sheet (sheet ~8 voxels thick: below ~12 neighbouring sheets touch)
FLIP_NORMALS = ""  # comma-separated segment ids whose .ppm normals point into the sheet instead of out of the written face
CT_LIKE = False  # an intensity model like a real scan: air ~0.16, papyrus ~0.47 of full scale, overlapping tails, blurred faces
TOUCHING = False  # sheets pressed together as in a real scroll: each turn fills the pitch, a thin contact layer (not air) between turns


# Geometry of the roll, in voxels. The sheet centre line is r = INNER_RADIUS + pitch * phi / (2 pi).
INNER_RADIUS = 18.0
TURNS = 4.5
CENTRE_DRIFT = 3.0  # the roll's axis wanders this much in y/x along z
LINE_HEIGHT = 30  # text lines, in slices
DEBRIS_CONTRAST = 0.35  # relative intensity spread of the loose fibres on the face where there is no ink
JITTER_SMOOTHNESS = 12.0  # voxels over which a segment's drift along its normal changes
# Touching sheets (calibrated on a real scroll block, docs/SCIENCE.md): between two turns a contact layer whose
# openness varies smoothly over the sheet, evenly from 0 to 1. At each openness (the knots) its width in voxels, and
# how far it is filled from air towards papyrus: most of the sheet pressed (thin, part filled), the rest an air gap.
CONTACT_OPENNESS = (0.0, 0.55, 0.75, 0.82, 1.0)
CONTACT_WIDTH = (1.2, 2.5, 4.0, 6.0, 7.0)
CONTACT_FILL = (0.4, 0.15, 0.0, 0.0, 0.0)
CONTACT_SMOOTHNESS = 10.0


@dataclass(frozen=True)
class Variant:
    """What differs between the scrolls of the family; the defaults are the demo's scroll."""

    ink_thickness: float = INK_THICKNESS
    surface_offset: float = SURFACE_OFFSET
    surface_jitter: float = SURFACE_JITTER
    pitch: float = PITCH
    flip_normals: tuple[str, ...] = ()
    ct_like: bool = CT_LIKE
    touching: bool = TOUCHING

    @property
    def intensity(self) -> dict:
        """Air level, noise, blur of the faces (sigma, voxels) and the scale of material intensities."""
        if self.ct_like:  # the papyrus mode lands near 0.47 and air near 0.16, as in a real scan's histogram
            return {"air": 0.16, "noise": 0.04, "blur": 1.0, "material": 1.0}
        return {"air": 0.08, "noise": 0.05, "blur": 0.6, "material": 1.0}


@dataclass
class SegmentSpec:
    segment_id: str
    wrap: int  # which turn of the spiral the patch lies on
    theta: tuple[float, float]  # angular range within that turn, in units of pi
    z: tuple[float, float]  # z range as fractions of the depth


# Training patches lie in the half-turns 0.75 pi .. 2 pi; the validation patch in 0 .. 0.55 pi,
# so validation blocks are spatially apart. The first segment has an older, smaller version.
SEGMENTS = [
    SegmentSpec("20231005123330", 1, (1.0, 1.7), (0.025, 0.75)),
    SegmentSpec("20231005123331", 1, (0.75, 2.0), (0.025, 0.975)),
    SegmentSpec("20231012184421", 2, (0.75, 2.0), (0.025, 0.975)),
    SegmentSpec("20231016151002", 3, (0.75, 2.0), (0.025, 0.975)),
    SegmentSpec("20231022170901", 3, (0.0, 0.55), (0.025, 0.975)),
]
VALID_SEGMENTS = ["20231022170901"]


class Scroll:
    """The analytic scroll: smooth 2D fields over the unrolled sheet (z, arc length u) and the spiral."""

    def __init__(self, shape, rng: np.random.Generator, variant: Variant = Variant(), jitter_rng: np.random.Generator | None = None,
                 contact_rng: np.random.Generator | None = None):
        self.shape, self.variant = shape, variant
        self.b = variant.pitch / (2 * np.pi)
        self.phi_max = TURNS * 2 * np.pi
        depth = shape[0]
        length = int(np.ceil(self.arc_length(self.phi_max))) + 2
        canvas = (depth, length)
        self.brightness = 0.6 + 0.3 * _smooth_field(rng, canvas, 7)
        self.thickness = 8.0 + 2.0 * _smooth_field(rng, canvas, 20)
        self.fibres_along_u = 0.14 * _smooth_field(rng, canvas, (0.8, 25))
        self.fibres_along_z = 0.14 * _smooth_field(rng, canvas, (25, 0.8))
        self.ink_grain = 0.12 * _smooth_field(rng, canvas, 0.7)
        self.ink = _letters(rng, canvas)
        phase = rng.uniform(0, 2 * np.pi, 2)
        z = np.arange(depth)
        self.centre_y = shape[1] / 2 + CENTRE_DRIFT * np.sin(2 * np.pi * z / depth + phase[0])
        self.centre_x = shape[2] / 2 + CENTRE_DRIFT * np.cos(2 * np.pi * z / depth + phase[1])
        # a generator of its own, so that the drift leaves every other field of the seed as it was
        jitter_rng = jitter_rng or np.random.default_rng()
        self.drift = variant.surface_jitter * _smooth_field(jitter_rng, canvas, JITTER_SMOOTHNESS) if variant.surface_jitter else None
        if variant.touching:  # a generator of its own too
            contact_rng = contact_rng or np.random.default_rng()
            openness = _evenly(_smooth_field(contact_rng, canvas, CONTACT_SMOOTHNESS))
            self.contact_width = np.interp(openness, CONTACT_OPENNESS, CONTACT_WIDTH)
            self.contact_fill = np.interp(openness, CONTACT_OPENNESS, CONTACT_FILL)

    def arc_length(self, phi):
        return INNER_RADIUS * phi + self.b * phi**2 / 2

    def phi_of_arc_length(self, u):
        return (np.sqrt(INNER_RADIUS**2 + 2 * self.b * u) - INNER_RADIUS) / self.b

    def field(self, field, z, u):
        """Bilinear value of a canvas field at (z, u), clamped to the canvas."""
        return ndimage.map_coordinates(field, [np.asarray(z, float), np.asarray(u, float)], order=1, mode="nearest")

    def face_offset(self, z, u):
        """Where the papyrus' outer face lies along the radius, relative to the sheet's centre line: half the sheet's
        thickness, or, where turns touch, the pitch's outer half less the ink layer and the contact layer."""
        if self.variant.touching:
            return self.variant.pitch / 2 - self.variant.ink_thickness - self.field(self.contact_width, z, u)
        return self.field(self.thickness, z, u) / 2

    def slice_intensity(self, z: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Intensity in [0, 1], ink mask, material mask (sheet or its face layer) and air mask of one slice (the
        contact layers between touching turns are neither)."""
        y, x = np.mgrid[0:self.shape[1], 0:self.shape[2]].astype(np.float64)
        dy, dx = y - self.centre_y[z], x - self.centre_x[z]
        radius = np.hypot(dy, dx)
        theta = np.mod(np.arctan2(dy, dx), 2 * np.pi)
        wrap = np.round((radius - INNER_RADIUS - self.b * theta) / self.variant.pitch)
        phi = theta + 2 * np.pi * wrap
        inside = (phi >= 0) & (phi <= self.phi_max)
        depth_from_centre = radius - (INNER_RADIUS + self.b * phi)
        u = self.arc_length(np.clip(phi, 0, self.phi_max))
        zz = np.full_like(u, z)
        face = self.face_offset(zz, u)
        back = -self.variant.pitch / 2 if self.variant.touching else -face
        brightness = self.field(self.brightness, zz, u)
        sheet = inside & (depth_from_centre >= back) & (depth_from_centre <= face)
        ink_layer = inside & (depth_from_centre > face) & (depth_from_centre <= face + self.variant.ink_thickness)
        contact = inside & (depth_from_centre > face + self.variant.ink_thickness) if self.variant.touching else np.zeros_like(sheet)
        ink = ink_layer & (self.ink[z, np.clip(np.round(u).astype(int), 0, self.ink.shape[1] - 1)] > 0)
        fibres = np.where(depth_from_centre < 0, self.field(self.fibres_along_u, zz, u), self.field(self.fibres_along_z, zz, u))
        look = self.variant.intensity
        brightness = brightness * look["material"]
        intensity = np.full(radius.shape, look["air"])
        intensity[sheet] = (brightness * (0.82 + fibres))[sheet]
        intensity[ink] = (brightness * (0.95 + self.field(self.ink_grain, zz, u)))[ink]
        # loose surface fibres where there is no ink: as dense on average as ink, but coarse and speckled,
        # so the mean along a normal (a flattened scan) does not tell ink from no ink
        debris = ink_layer & ~ink
        speckle = ndimage.gaussian_filter(rng.standard_normal(radius.shape), 0.8)
        intensity[debris] = (brightness * (0.95 + DEBRIS_CONTRAST * speckle / speckle.std()))[debris]
        if self.variant.touching:  # partly filled: between air and the papyrus around it
            fill = self.field(self.contact_fill, zz, u)
            intensity[contact] = (look["air"] + fill * (brightness * 0.82 - look["air"]))[contact]
        intensity = ndimage.gaussian_filter(intensity, look["blur"]) + rng.normal(0, look["noise"], intensity.shape)
        material = sheet | ink_layer
        return np.clip(intensity, 0, 1), ink, material, ~material & ~contact

    def pixel_grid(self, spec: SegmentSpec) -> tuple[np.ndarray, np.ndarray]:
        """z and arc length u of a segment's first pixel row and column; a pixel is 1 voxel of each."""
        phi0, phi1 = (2 * spec.wrap + np.array(spec.theta)) * np.pi
        u = np.arange(np.ceil(self.arc_length(phi0)), np.floor(self.arc_length(phi1)))
        z = np.arange(*np.round(np.array(spec.z) * self.shape[0]), dtype=np.float64)
        return z, u

    def surface(self, spec: SegmentSpec) -> tuple[np.ndarray, np.ndarray]:
        """ppm data (rows = z, columns = 1 voxel of arc length) and the 2D ink label of a segment."""
        z, u = self.pixel_grid(spec)
        zz, uu = np.meshgrid(z, u, indexing="ij")
        data = self.surface_at(zz, uu)
        label = self.ink[zz.astype(int), uu.astype(int)]
        return data, label

    def surface_at(self, zz: np.ndarray, uu: np.ndarray) -> np.ndarray:
        """(x, y, z, nx, ny, nz) of the sheet's written face at z `zz`, arc length `uu`; the normal points out of it."""
        phi = self.phi_of_arc_length(uu)
        step = 1e-3
        point = self._surface_point(phi, zz)
        d_phi = (self._surface_point(phi + step, zz) - self._surface_point(phi - step, zz)) / (2 * step)
        d_z = (self._surface_point(phi, zz + step) - self._surface_point(phi, zz - step)) / (2 * step)
        normal = np.cross(d_phi, d_z)
        radial = np.stack([np.cos(phi), np.sin(phi), np.zeros_like(phi)], axis=-1)
        normal *= np.sign(np.sum(normal * radial, axis=-1, keepdims=True))
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        return np.concatenate([point, normal], axis=-1)

    def _surface_point(self, phi, z):
        """xyz of the segment surface at (phi, z): `surface_offset` above the papyrus face, plus the drift; z may be fractional."""
        u = self.arc_length(phi)
        radius = INNER_RADIUS + self.b * phi + self.face_offset(z, u) + self.variant.surface_offset
        if self.drift is not None:
            radius = radius + self.field(self.drift, z, u)
        centre_y = np.interp(z, np.arange(self.shape[0]), self.centre_y)
        centre_x = np.interp(z, np.arange(self.shape[0]), self.centre_x)
        return np.stack([centre_x + radius * np.cos(phi), centre_y + radius * np.sin(phi), z], axis=-1)


def _smooth_field(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-smoothed noise scaled to [-1, 1]."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / np.abs(field).max()


def _evenly(field: np.ndarray) -> np.ndarray:
    """A smooth field mapped onto [0, 1], its values spread evenly (through the normal distribution's CDF)."""
    return special.ndtr(field / field.std())


def _letters(rng: np.random.Generator, shape) -> np.ndarray:
    """Lines of letter-like glyphs (bars, diagonals, bowls) on the unrolled sheet; 255 = ink."""
    canvas = np.zeros(shape, np.uint8)
    glyph_h, glyph_w, stroke = 18, 12, 3
    for top in range(6, shape[0] - glyph_h - 4, LINE_HEIGHT):
        left = int(rng.integers(4, 12))
        while left + glyph_w < shape[1] - 4:
            if rng.random() < 0.15:  # a space between words
                left += glyph_w
                continue
            for _ in range(int(rng.integers(2, 4))):
                _draw_stroke(canvas, rng, left, top, glyph_w, glyph_h, stroke)
            left += glyph_w + int(rng.integers(4, 8))
    return canvas


def _draw_stroke(canvas, rng, left, top, width, height, stroke):
    kind = rng.integers(4)
    right, bottom, middle = left + width, top + height, top + height // 2
    if kind == 0:  # vertical bar
        x = int(rng.integers(left, right + 1))
        cv2.line(canvas, (x, top), (x, bottom), 255, stroke)
    elif kind == 1:  # horizontal bar at top, middle or bottom
        y = int(rng.choice([top, middle, bottom]))
        cv2.line(canvas, (left, y), (right, y), 255, stroke)
    elif kind == 2:  # diagonal
        if rng.random() < 0.5:
            cv2.line(canvas, (left, top), (right, bottom), 255, stroke)
        else:
            cv2.line(canvas, (left, bottom), (right, top), 255, stroke)
    else:  # bowl or ring
        start = int(rng.choice([0, 90, 180, 270]))
        cv2.ellipse(canvas, ((left + right) // 2, middle), (width // 2, height // 3), 0, start, start + 270, 255, stroke)


def write_tifxyz_segment(scroll: Scroll, spec: SegmentSpec, folder: Path, step: int, ragged: np.ndarray, mask: np.ndarray) -> None:
    """A segment as tifxyz: the surface at every `step`-th pixel (the grid reaching one step past the last
    pixel where needed), with the ppm's ragged edge invalid and its mask as mask.tif."""
    z, u = scroll.pixel_grid(spec)
    rows, cols = (-(-(len(z) - 1) // step) + 1, -(-(len(u) - 1) // step) + 1)
    zz, uu = np.meshgrid(z[0] + step * np.arange(rows), u[0] + step * np.arange(cols), indexing="ij")
    points = scroll.surface_at(zz, uu)[..., :3]
    at = (np.minimum(step * np.arange(rows), len(z) - 1)[:, None], np.minimum(step * np.arange(cols), len(u) - 1)[None, :])
    points[ragged[at]] = np.nan
    write_tifxyz(folder, points, (1 / step, 1 / step), mask[at])


def air_boundary(air_counts: np.ndarray, material_counts: np.ndarray) -> int:
    """The uint8 level t that misclassifies fewest voxels when values <= t are called air."""
    errors = np.cumsum(material_counts) + (air_counts.sum() - np.cumsum(air_counts))
    return int(np.argmin(errors))


def make_scroll(out_dir: Path, seed: int, shape: tuple[int, int, int], tifxyz_step: int = 0, variant: Variant = Variant()) -> dict:
    rng = np.random.default_rng(seed)
    scroll = Scroll(shape, rng, variant, jitter_rng=np.random.default_rng([seed, 1]), contact_rng=np.random.default_rng([seed, 2]))
    volume_dir = out_dir / "volume"
    volume_dir.mkdir(parents=True)
    histograms = np.zeros((2, 256), np.int64)  # of air and of material voxels, at the scan's uint8 values
    with h5py.File(out_dir / "ground_truth.h5", "w") as file:
        truth = volume.create_volume(file, volume.GROUND_TRUTH, shape, np.uint8)
        slab = np.zeros((truth.chunks[0],) + shape[1:], np.uint8)
        for z in range(shape[0]):
            intensity, ink, material, air = scroll.slice_intensity(z, rng)
            scan = np.round(intensity * 65535).astype(np.uint16)
            tifffile.imwrite(volume_dir / f"{z:05d}.tif", scan)
            as_uint8 = volume.UINT16_TO_UINT8[scan]
            histograms[0] += np.bincount(as_uint8[air], minlength=256)
            histograms[1] += np.bincount(as_uint8[material], minlength=256)
            slab[z % len(slab)] = ink * np.uint8(255)
            if z % len(slab) == len(slab) - 1 or z == shape[0] - 1:
                start = z - z % len(slab)
                truth[start:z + 1] = slab[:z + 1 - start]
    for spec in SEGMENTS:
        data, label = scroll.surface(spec)
        if spec.segment_id in variant.flip_normals:
            data[..., 3:] *= -1
        segment_dir = out_dir / "paths" / spec.segment_id
        segment_dir.mkdir(parents=True)
        # a ragged edge of off-surface pixels, as real segments have, and a mask 2 pixels inside it
        ragged = np.arange(data.shape[0])[:, None] + np.arange(data.shape[1])[None, :] < 6
        data[ragged] = 0
        write_ppm(segment_dir / f"{spec.segment_id}.ppm", data)
        mask = ndimage.binary_erosion(~ragged, iterations=2, border_value=0)
        write_image(segment_dir / f"{spec.segment_id}_mask.png", mask.astype(np.uint8) * 255)
        if tifxyz_step:
            write_tifxyz_segment(scroll, spec, out_dir / "tifxyz" / spec.segment_id, tifxyz_step, ragged, mask)
        labels_dir = out_dir / "labels"
        labels_dir.mkdir(exist_ok=True)
        write_image(labels_dir / f"{spec.segment_id}_inklabels.png", label)
    return {
        "shape": list(shape),
        "segments": [spec.segment_id for spec in SEGMENTS],
        "valid_segments": VALID_SEGMENTS,
        "seed": seed,
        "segment_specs": [asdict(spec) for spec in SEGMENTS],
        "variant": asdict(variant),
        # where the ink's middle lies along each segment's normal, relative to its surface
        "ink_depth": {spec.segment_id: (-1 if spec.segment_id in variant.flip_normals else 1)
                      * (variant.ink_thickness / 2 - variant.surface_offset) for spec in SEGMENTS},
        "air_boundary": air_boundary(*histograms),
    }


class _TiffSlices:
    """The scroll's TIFF slices as a (z, y, x) volume, read a slab at a time."""

    def __init__(self, folder: Path):
        self.files = sorted(folder.glob("*.tif"))
        first = tifffile.imread(self.files[0])
        self.shape, self.dtype = (len(self.files),) + first.shape, first.dtype

    def __getitem__(self, key: slice) -> np.ndarray:
        return np.stack([tifffile.imread(path) for path in self.files[key]])


def main(argv=None):
    config = parse_config(globals(), argv)
    with output_lock(config.out_dir):
        return make(config)


def make(config) -> dict:
    out_dir = Path(config.out_dir)
    flips = tuple(s.strip() for s in config.flip_normals.split(",") if s.strip())
    unknown = sorted(set(flips) - {spec.segment_id for spec in SEGMENTS})
    if unknown:
        raise InputError(f"--flip_normals {', '.join(unknown)}: no such segment; the scroll's segments are "
                         f"{', '.join(spec.segment_id for spec in SEGMENTS)}")
    if flips and config.tifxyz_step:
        raise InputError("--flip_normals applies to .ppm segments; a tifxyz grid's normals follow its orientation (--tifxyz_step 0)")
    if config.pitch < 2:
        raise InputError(f"--pitch {config.pitch}: must be >= 2 voxels")
    variant = Variant(config.ink_thickness, config.surface_offset, config.surface_jitter, config.pitch, flips, config.ct_like, config.touching)
    if config.touching and config.pitch < config.ink_thickness + CONTACT_WIDTH[-1] + 4:
        raise InputError(f"--touching true --pitch {config.pitch}: a turn must hold the ink layer, the contact layer and "
                         f"4 voxels of papyrus: --pitch >= {config.ink_thickness + CONTACT_WIDTH[-1] + 4:g}")
    outer_radius = INNER_RADIUS + config.pitch * TURNS + 10 + CENTRE_DRIFT
    if min(config.height, config.width) < 2 * outer_radius or config.depth < 16:
        raise InputError(f"the roll needs height and width >= {2 * outer_radius:.0f} and depth >= 16")
    if (out_dir / "scroll.json").exists() or (out_dir / "volume").exists():
        if not config.overwrite:
            raise InputError(f"{out_dir} already holds a scroll; pass --overwrite true to replace it")
        for name in ("volume", "paths", "labels", "ground_truth.h5", "scroll.json", "volume.zarr", "tifxyz"):
            target = out_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    check_output(out_dir / "scroll.json", overwrite=True)  # a folder that can be written
    with writing(out_dir, advice="the scroll is incomplete (scroll.json, written last, is missing): free disk space and "
                                 "run again with --overwrite true"):
        description = make_scroll(out_dir, config.seed, (config.depth, config.height, config.width), config.tifxyz_step, variant)
        if config.ome_zarr:
            pyramid.write_ome_zarr(out_dir / "volume.zarr", _TiffSlices(out_dir / "volume"), levels=2)
        with atomic_output(out_dir / "scroll.json") as temporary:
            temporary.write_text(json.dumps(description, indent=2) + "\n")
    save_config(config, config_path_for(out_dir / "scroll.json"))
    print(f"synthetic scroll {tuple(description['shape'])} with {len(SEGMENTS)} segments -> {out_dir}")
    return description


if __name__ == "__main__":
    run_main(main)
