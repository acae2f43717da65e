"""The written face read off hand-built profiles, a segment's orientation, and the depth map's warning rule."""

import numpy as np
import pytest

import flatten_3d
from ink3d import faces
from ink3d.columns import with_face_windows
from ink3d.faces import STEP, find_faces, orientation_votes, points_into_sheet
from labels_scene import add_segment, read, run

BAND = 10.0
T = np.arange(-BAND, BAND + STEP / 2, STEP)  # the offsets of a column's samples, the surface at 0
AIR, PAPYRUS, AIR_LEVEL = 40.0, 150.0, 60.0


def profile(*layers, blur=1.0):
    """A profile along T from (start, value) steps: each value holds from its start to the next start; blurred with a
    Gaussian of `blur` voxels, as a scan blurs a face."""
    values = np.full(len(T), AIR)
    for start, value in layers:
        values[T >= start] = value
    if blur:
        weights = np.exp(-0.5 * ((T[:, None] - T[None, :]) / blur) ** 2)
        values = (weights * values[None, :]).sum(axis=1) / weights.sum(axis=1)
        values[:int(3 * blur / STEP)] = values[int(3 * blur / STEP)]  # no fall at the band's start from the padding
    return values


def face_at(values) -> float:
    found = find_faces(values[None], AIR_LEVEL)[0]
    return found * STEP - BAND


EDGE = 1.0  # a blurred fall into air crosses the air level up to a voxel beyond the edge


def test_an_air_gap_gives_its_edge():
    """Papyrus up to +2, then air: the face is the fall into air."""
    assert face_at(profile((-BAND, PAPYRUS), (2.0, AIR))) == pytest.approx(2.0, abs=EDGE)


@pytest.mark.parametrize("floor", [60.0, 80.0, 100.0])
def test_touching_sheets_give_their_contact_far_above_the_air_level(floor):
    """Two sheets pressed together with a thin contact between them (its floor far above air): the face is the
    contact, which the step into air never finds."""
    values = profile((-BAND, PAPYRUS), (1.5, floor), (3.5, PAPYRUS - 10))
    assert values.min() > AIR_LEVEL + 5
    assert face_at(values) == pytest.approx(2.5, abs=0.75)


def test_a_contact_into_a_dimmer_sheet_and_texture_inside_a_sheet():
    """A shallow wobble of the sheet's texture is no face; the contact with a dimmer sheet in front is."""
    values = profile((-BAND, PAPYRUS), (-6.0, PAPYRUS - 15), (-5.0, PAPYRUS), (3.0, 85.0), (5.0, 110.0))
    assert face_at(values) == pytest.approx(4.0, abs=0.75)


def test_thick_ink_gives_the_outer_edge_not_a_dip_inside_the_ink():
    """Ink 5 voxels thick and brighter than the papyrus, with a darker speck inside it, then air: the face is the
    fall into air, not the speck (air follows it within reach) nor the papyrus under the brighter ink."""
    values = profile((-BAND, 120.0), (-0.5, 160.0), (0.5, 70.0), (2.5, 160.0), (4.5, AIR))
    assert face_at(values) == pytest.approx(4.5, abs=EDGE)


def test_a_surface_drawn_in_front_of_the_face_finds_it_behind():
    """The surface 1.5 voxels in air in front of the papyrus; the next sheet 8 voxels further: the face behind."""
    values = profile((-BAND, PAPYRUS), (-1.5, AIR), (7.0, PAPYRUS))
    assert face_at(values) == pytest.approx(-1.5, abs=EDGE)


def test_the_nearest_face_in_front_wins_over_one_far_behind():
    """A face 3 voxels behind the surface (the sheet under it) and one 6 in front: the one in front."""
    values = profile((-BAND, PAPYRUS), (-4.0, 70.0), (-2.0, PAPYRUS), (6.0, AIR))
    assert face_at(values) == pytest.approx(6.0, abs=EDGE)


def test_no_dip_is_no_face():
    assert np.isnan(find_faces(np.stack([profile((-BAND, PAPYRUS)), profile((-BAND, AIR))]), AIR_LEVEL)).all()


@pytest.mark.parametrize("material, face", [((-8.0, 2.0), 2.0), ((-8.0, -1.0), -1.0), ((-8.0, 12.0), None), (None, None)])
def test_the_window_starts_at_the_face_along_an_oblique_column(material, face):
    """A slab of material along an oblique column, read trilinearly from a volume: the window reaches from
    face_depth behind the slab's edge to a step in front; untaught below it down to the ink's reach."""
    normal = np.array([0.48, 0.6, 0.64])
    point = np.array([20.0, 20.0, 20.0])
    grid = np.stack(np.mgrid[0:40, 0:40, 0:40], axis=-1).astype(np.float64)
    along = (grid - point) @ normal
    scan = np.full((40, 40, 40), 20, np.uint8)
    if material:
        scan[(along >= material[0]) & (along <= material[1])] = 200
    columns = np.array([[*point, *normal, 1.0]], np.float32)
    window = with_face_windows(columns, scan, BAND, 60, 3.0, 6.0)[0, 7:]
    if face is None:
        assert np.isnan(window).all()
    else:  # the slab's voxels end within a voxel of its edge along an oblique line
        assert abs(window[1] - STEP - face) <= 1.0
        assert window[1] - window[0] == pytest.approx(3.0 + STEP) and window[1] - window[2] == pytest.approx(6.0 + STEP)


def test_orientation_votes_need_air_close_on_one_side_only():
    """Air 1.5 in front and material 8 behind: out; the reverse: into; pressed on both sides, or mid-sheet: no vote."""
    out = profile((-BAND, PAPYRUS), (1.5, AIR))
    into = profile((-BAND, AIR), (-1.5, PAPYRUS))
    pressed = profile((-BAND, PAPYRUS), (1.5, 90.0), (2.5, PAPYRUS))
    thin = profile((-BAND, AIR), (-2.0, PAPYRUS), (2.0, AIR))  # air close both ways: no side tells
    assert orientation_votes(np.stack([out, out, into, pressed, thin]), AIR_LEVEL) == (2, 1)
    assert points_into_sheet(2, 30) and not points_into_sheet(20, 30) and not points_into_sheet(0, faces.VOTES_NEEDED - 1)


def _slab_scene(root, normal_x: float):
    """A scan with papyrus below x = 20 and air above; a flat segment on the plane x = 18.5 (1.5 inside the
    papyrus, as a segment drawn on the ink layer), its normals along `normal_x`."""
    import h5py

    from ink3d import volume
    with h5py.File(root / "scan.h5", "w") as file:
        scan = np.full((24, 24, 40), 30, np.uint8)
        scan[:, :, :20] = 160
        volume.create_volume(file, volume.SCAN, scan.shape, np.uint8, chunk=8)[:] = scan
    rows, cols = np.mgrid[0:20, 0:20]
    data = np.zeros((20, 20, 6))
    data[..., 0], data[..., 1], data[..., 2], data[..., 3] = 18.5, 2 + rows, 2 + cols, normal_x
    add_segment(root, "s", data, np.full((20, 20), 255, np.uint8))


@pytest.mark.parametrize("normal_x, orient, stored_x", [(-1.0, "auto", 1.0), (1.0, "auto", 1.0), (-1.0, "keep", -1.0)])
def test_labels_reverse_a_segment_whose_normals_point_into_its_sheet(scene, capsys, normal_x, orient, stored_x):
    import h5py

    from ink3d.columns import COLUMNS
    _slab_scene(scene, normal_x)
    report = run(scene, "--orient_normals", orient, "--band", "10")
    with h5py.File(scene / "train.h5") as file:
        normals = file[COLUMNS]["normals"][:]
    assert np.all(normals[:, 2] == stored_x) and len(normals) == 400
    line = next(line for line in report if "s: 400 pixels" in line)
    assert ("warning: its normals point into the sheet" in line) == (orient == "auto" and normal_x < 0)
    assert ("normals out of the sheet" in line) == (normal_x > 0)
    assert read(scene / "train.h5")[1].sum() > 0


@pytest.mark.parametrize("ink_pixels, surface_pixels, warns", [
    (999, 1000, False),  # too few pixels, however large their share
    (1000, 100_000, True),  # 1,000 and 1 %
    (1500, 200_000, False),  # 0.75 %
])
def test_the_depth_warning_needs_support(ink_pixels, surface_pixels, warns):
    depth = np.full(2000, np.nan, np.float32)
    depth[:ink_pixels] = -3.0
    summary = flatten_3d.depth_summary(depth, surface_pixels)
    assert summary["pixels"] == ink_pixels and summary["median"] == -3.0 and summary["behind_surface"] == warns
    depth[:ink_pixels] = 0.5
    assert not flatten_3d.depth_summary(depth, surface_pixels)["behind_surface"]
