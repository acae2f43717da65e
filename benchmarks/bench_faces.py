"""Where is the written face along a labeled column? The face read-off against truth, on a real block and the synthetic family.

    python benchmarks/bench_faces.py                              # the real block (if present) and every variant
    python benchmarks/bench_faces.py --variants touching --seed 1 --real none

Each row: the share of columns whose face read-off lies within 2 voxels of the true face, for the read-off the
training uses (ink3d.faces: a dip relative to the sheet's own level) beside the previous one (the step from
material into air), on the same columns in the same run, and how many columns each finds a face for at all.

- Real block (`../shared/real_ct/scroll_block_256.zarr`, skipped with a reason when absent): its sheets run along z
  and y. The true faces are the sheet interfaces found by another method than either read-off: local minima along
  x of the whole block smoothed in 3D (sigma 1.5) that lie at least 25 below the maximum within 8 voxels along x.
  Columns are placed at random interfaces, their normal +x or -x (the sheet behind, the interface in front), their
  surface on the interface or 1-2 voxels inside the sheet; the air level is the scan's own (ink3d.intensity).
- Synthetic variants: the segments' pixels as columns, their true face where the generator put the ink layer's
  outer edge; the segments' orientation is checked first, as all_labels_to_hdf.py checks it (ink3d.faces).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import make_synthetic_scroll as synthetic  # noqa: E402
from ink3d import faces, intensity, volume  # noqa: E402
from ink3d.columns import face_offsets  # noqa: E402
from ink3d.faces import profiles_along  # noqa: E402

REAL_BLOCK = ROOT.parent / "shared" / "real_ct" / "scroll_block_256.zarr"
BAND = 10.0
NEAR = 2.0  # a read-off within this many voxels of the true face counts
VARIANTS = {  # make_synthetic_scroll's Variant fields, as bench_science.py's flags give them
    "default": {},
    "thick": {"ink_thickness": 5.0, "surface_offset": 0.5},
    "jitter": {"surface_jitter": 2.0},
    "ct_like": {"ct_like": True},
    "pitch14": {"pitch": 14.0},
    "flipped": {"flip_normals": ("20231012184421",)},
    "touching": {"ct_like": True, "touching": True},
}


def air_step_faces(profiles: np.ndarray, air_level: float) -> np.ndarray:
    """The previous read-off, for comparison: the last sample above the air level before the first air in front of the
    surface, or, where the surface lies in air, the first sample above it behind; in samples (NaN: none)."""
    material = profiles > air_level
    centre = profiles.shape[1] // 2
    front_air = ~material[:, centre:]
    first_air = np.where(front_air.any(axis=1), front_air.argmax(axis=1), -1)
    behind = material[:, :centre + 1][:, ::-1]
    first_material = np.where(behind.any(axis=1), behind.argmax(axis=1), -1)
    face = np.full(len(profiles), np.nan)
    inside = material[:, centre] & (first_air > 0)
    face[inside] = centre + first_air[inside] - 1
    in_air = ~material[:, centre] & (first_material > 0)
    face[in_air] = centre - first_material[in_air]
    return face


def score(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Share of columns with a face within NEAR of the truth, and share with a face at all."""
    return float(np.mean(np.abs(found - truth) <= NEAR)), float(np.mean(np.isfinite(found)))


def real_block_columns(block: np.ndarray, air_level: int, count: int, rng: np.random.Generator):
    """Columns (count, 6) at random interfaces of the block (surface 0-2 voxels inside the sheet, normal +-x), the
    true face of each (in voxels along its normal), and where its interface's minimum lies."""
    smoothed = ndimage.gaussian_filter(block.astype(np.float32), 1.5)
    before, after = np.roll(smoothed, 1, axis=2), np.roll(smoothed, -1, axis=2)
    interface = (smoothed < before) & (smoothed <= after) & (ndimage.maximum_filter1d(smoothed, 17, axis=2) - smoothed >= 25)
    margin = int(BAND) + 3
    interface[:, :, :margin], interface[:, :, -margin:] = False, False
    z, y, x = np.nonzero(interface)
    pick = rng.choice(len(z), count, replace=False)
    z, y, x = z[pick], y[pick], x[pick]
    sign = rng.choice([-1, 1], count)
    inside = rng.integers(0, 3, count)
    # where the interface is an air gap, the sheet's face is the gap's edge, not its middle: the last voxel before air
    edge = np.zeros(count)  # air voxels from the minimum back towards the sheet
    for k in range(1, margin):
        behind = smoothed[z, y, x - sign * k]
        still_air = (behind <= air_level) & (edge == k - 1) & (smoothed[z, y, x] <= air_level)
        edge[still_air] = k
    columns = np.zeros((count, 6))
    columns[:, 0], columns[:, 1], columns[:, 2] = z, y, x - sign * inside
    columns[:, 5] = sign
    return columns, inside - np.where(edge > 0, edge + 0.5, 0), inside


def synthetic_columns(variant_fields: dict, seed: int, count: int, rng: np.random.Generator):
    """The variant's scan (uint8, as volume_to_hdf writes it), its segments' pixels as columns (count, 6) after the
    orientation check, their true faces, the air level, and how many segments the check reversed."""
    variant = synthetic.Variant(**variant_fields)
    scroll_rng = np.random.default_rng(seed)
    scroll = synthetic.Scroll((160, 256, 256), scroll_rng, variant, jitter_rng=np.random.default_rng([seed, 1]),
                              contact_rng=np.random.default_rng([seed, 2]))
    scan = np.stack([volume.UINT16_TO_UINT8[np.round(scroll.slice_intensity(z, scroll_rng)[0] * 65535).astype(np.uint16)]
                     for z in range(160)])
    air = intensity.air_level(np.bincount(scan.ravel(), minlength=256))
    columns, truths, reversed_segments = [], [], 0
    for spec in synthetic.SEGMENTS:
        z, u = scroll.pixel_grid(spec)
        zz, uu = np.meshgrid(z, u, indexing="ij")
        zz, uu = zz.ravel(), uu.ravel()
        pick = rng.choice(len(zz), min(len(zz), count // len(synthetic.SEGMENTS)), replace=False)
        data = scroll.surface_at(zz[pick], uu[pick])
        segment = np.concatenate([data[:, 2::-1], data[:, 5:2:-1]], axis=1)
        # the written face: the ink layer's outer edge, along the normal from the surface
        truth = np.full(len(pick), variant.ink_thickness - variant.surface_offset)
        if scroll.drift is not None:
            truth -= scroll.field(scroll.drift, zz[pick], uu[pick])
        if spec.segment_id in variant.flip_normals:
            segment[:, 3:] *= -1
        if faces.points_into_sheet(*faces.orientation_votes(profiles_along(segment, scan, BAND), air)):
            segment[:, 3:] *= -1
            reversed_segments += 1
        columns.append(segment)
        truths.append(truth)
    return scan, np.concatenate(columns), np.concatenate(truths), air, reversed_segments


def row(name: str, scan: np.ndarray, columns: np.ndarray, truth: np.ndarray, air: int, note: str = "") -> str:
    profiles = profiles_along(columns, scan, BAND)
    previous = air_step_faces(profiles, air) * faces.STEP - BAND
    current = face_offsets(columns, scan, BAND, air)
    (near_new, found_new), (near_old, found_old) = score(current, truth), score(previous, truth)
    return (f"| {name} | {len(columns)} | {air} | {near_new:.1%} ({found_new:.0%}) | {near_old:.1%} ({found_old:.0%}) | {note} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)} (none: only the real block)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", type=int, default=4000)
    parser.add_argument("--real", default=str(REAL_BLOCK), help="the real block's OME-Zarr group (none: skip it)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip() and name.strip() != "none"]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    rng = np.random.default_rng(args.seed)
    print(f"face within {NEAR:g} voxels of the truth (share with a face at all); band {BAND:g}, seed {args.seed}")
    print("| scan | columns | air level | dip read-off (ink3d.faces) | air-step read-off (previous) | note |")
    print("|---|---|---|---|---|---|")
    if args.real != "none":
        if not Path(args.real).exists():
            print(f"| real block | - | - | - | - | skipped: {args.real} not found |")
        else:
            file, dataset = volume.open_dataset(args.real, volume.SCAN)
            block = np.asarray(dataset[:])  # a 256^3 benchmark block, not a scan
            air = intensity.air_level(np.bincount(block.ravel(), minlength=256))
            columns, truth, minimum = real_block_columns(block, air, args.columns, rng)
            print(row("real block", block, columns, truth, air, "faces of the 3D-smoothed block's interfaces"))
            print(row("real block", block, columns, minimum, air, "... their minima (an air gap's middle)"))
    for name in names:
        scan, columns, truth, air, reversed_segments = synthetic_columns(VARIANTS[name], args.seed, args.columns, rng)
        print(row(name, scan, columns, truth, air, f"{reversed_segments} segment(s) found flipped and reversed"))


if __name__ == "__main__":
    main()
