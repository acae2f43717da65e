import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import cv2
import h5py
import numpy as np
import pytest

import all_labels_to_hdf
import pred_find_coords
from ink3d import InputError, labels, volume
from ink3d.coords import drop_near
from ink3d.labels import ChunkAccumulator, band_offsets
from ink3d.ppm import write_ppm

SHAPE = (20, 30, 40)


@pytest.fixture
def scene(tmp_path):
    """An empty scan volume and folders for segments."""
    with h5py.File(tmp_path / "scan.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, SHAPE, np.uint8, chunk=8)
    (tmp_path / "paths").mkdir()
    (tmp_path / "labels").mkdir()
    return tmp_path


def add_segment(root, segment_id, data, label, mask=None):
    folder = root / "paths" / segment_id
    folder.mkdir(parents=True, exist_ok=True)
    write_ppm(folder / f"{segment_id}.ppm", data)
    cv2.imwrite(str(root / "labels" / f"{segment_id}_inklabels.png"), label)
    if mask is not None:
        cv2.imwrite(str(folder / f"{segment_id}_mask.png"), mask)


def flat_segment(height=10, width=12, z=10.0, x0=5, y0=7):
    """A flat surface at constant z, normal +z; left half ink, right half none."""
    rows, cols = np.mgrid[0:height, 0:width]
    data = np.zeros((height, width, 6))
    data[..., 0], data[..., 1], data[..., 2], data[..., 5] = x0 + cols, y0 + rows, z, 1.0
    label = np.where(cols < width // 2, 255, 0).astype(np.uint8)
    return data, label


def run(root, *extra, valid="", band="2"):
    """all_labels_to_hdf on the scene; the ink range covers the whole band unless `extra` narrows it."""
    argv = ["--ppm_dir", str(root / "paths"), "--labels_dir", str(root / "labels"), "--volume", str(root / "scan.h5"),
            "--out_train", str(root / "train.h5"), "--out_valid", str(root / "valid.h5"),
            "--valid_segments", valid, "--band", band, "--chunk", "8", "--ink_back", "99", "--ink_front", "99", *extra]
    return all_labels_to_hdf.main(argv)


def read(path):
    with h5py.File(path) as file:
        return file[volume.INK_SUM][:], file[volume.INK_COUNT][:], dict(file.attrs)


def test_band_offsets_step_at_most_half_a_voxel():
    offsets = band_offsets(4)
    assert offsets[0] == -4 and offsets[-1] == 4 and np.diff(offsets).max() <= 0.5
    assert np.diff(band_offsets(1.3)).max() <= 0.5


def test_flat_surface_gives_the_exact_band(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    run(scene)
    ink_sum, ink_count, attrs = read(scene / "train.h5")
    expected_count = np.zeros(SHAPE, np.uint16)
    expected_count[8:13, 7:17, 5:17] = 1
    expected_sum = np.zeros(SHAPE, np.float32)
    expected_sum[8:13, 7:17, 5:11] = 1.0
    assert np.array_equal(ink_count, expected_count)
    assert np.array_equal(ink_sum, expected_sum)
    assert json.loads(attrs["segments"]) == ["20230101000000"] and attrs["band"] == 2.0
    assert read(scene / "valid.h5")[1].sum() == 0


@pytest.mark.parametrize("ink_back, ink_front, ink_z", [("0", "1", slice(10, 12)), ("1.5", "0.5", slice(8, 11)),
                                                     ("0", "0", slice(10, 11)), ("9", "9", slice(8, 13))])
def test_ink_range_gives_the_pixel_label_only_on_its_side_of_the_surface(scene, ink_back, ink_front, ink_z):
    data, label = flat_segment()  # surface at z = 10, normal +z: in front of it means larger z
    add_segment(scene, "20230101000000", data, label)
    run(scene, "--ink_back", ink_back, "--ink_front", ink_front)
    ink_sum, ink_count, attrs = read(scene / "train.h5")
    expected_count = np.zeros(SHAPE, np.uint16)
    expected_count[8:13, 7:17, 5:17] = 1  # the whole band is labeled ...
    expected_sum = np.zeros(SHAPE, np.float32)
    expected_sum[ink_z, 7:17, 5:11] = 1.0  # ... ink only within the ink range (clipped to the band), the rest 0
    assert np.array_equal(ink_count, expected_count)
    assert np.array_equal(ink_sum, expected_sum)
    assert json.loads(attrs["ink_range"]) == [-min(float(ink_back), 2.0), min(float(ink_front), 2.0)]


def test_update_refuses_another_ink_range(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    run(scene, "--ink_back", "0")
    add_segment(scene, "20230202000000", data, label)
    with pytest.raises(InputError, match="ink range"):
        run(scene, "--update", "true", "--ink_back", "1")


def test_overlapping_pixels_average(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    add_segment(scene, "20230202000000", data, 255 - label)
    run(scene)
    ink_sum, ink_count, _ = read(scene / "train.h5")
    band = ink_count > 0
    assert np.all(ink_count[band] == 2) and np.allclose(ink_sum[band] / ink_count[band], 0.5)


def _plane(normal_xyz, origin_xyz, size=9):
    normal = np.asarray(normal_xyz, float) / np.linalg.norm(normal_xyz)
    e1 = np.cross(normal, [0, 0, 1.0]) if abs(normal[2]) < 0.9 else np.cross(normal, [1.0, 0, 0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    rows, cols = np.mgrid[0:size, 0:size] - size // 2
    points = np.asarray(origin_xyz) + rows[..., None] * e1 + cols[..., None] * e2
    return np.concatenate([points, np.broadcast_to(normal, points.shape)], axis=-1)


def _cylinder(radius=9.0, centre_xy=(20.0, 15.0), z0=6):
    theta, z = np.meshgrid(np.linspace(0.2, 2.2, 14), np.arange(z0, z0 + 8, dtype=float), indexing="ij")
    normal = np.stack([np.cos(theta), np.sin(theta), np.zeros_like(theta)], axis=-1)
    points = np.stack([centre_xy[0] + radius * np.cos(theta), centre_xy[1] + radius * np.sin(theta), z], axis=-1)
    return np.concatenate([points, normal], axis=-1)


@pytest.mark.parametrize("surface", ["tilted", "curved"])
def test_oblique_surfaces_are_labeled_within_the_band_without_gaps(scene, surface):
    band = 3.0
    data = _plane([1.0, 0.5, 0.3], [20.3, 14.6, 9.7]) if surface == "tilted" else _cylinder()
    add_segment(scene, "20230101000000", data, np.full(data.shape[:2], 255, np.uint8))
    run(scene, band=str(band))
    _, ink_count, _ = read(scene / "train.h5")
    labeled = np.argwhere(ink_count > 0)[:, ::-1].astype(float)  # xyz
    points, normals = data[..., :3].reshape(-1, 3), data[..., 3:].reshape(-1, 3)
    # each labeled voxel lies within band (+ rounding: at most half a voxel per axis) of some pixel's normal line
    offsets = labeled[:, None, :] - points[None]
    along = np.einsum("vpk,pk->vp", offsets, normals)
    across = np.linalg.norm(offsets - along[..., None] * normals[None], axis=-1)
    rounding = 0.5 * np.abs(normals).sum(axis=1)
    near = (np.abs(along) <= band + rounding[None]) & (across <= np.sqrt(3) / 2)
    assert near.any(axis=1).all()
    # no gaps: along every normal the labeled voxels form a 26-connected chain from -band to +band
    samples = np.rint(points[:, None] + band_offsets(band)[None, :, None] * normals[:, None]).astype(int)
    assert np.all(ink_count[samples[..., 2], samples[..., 1], samples[..., 0]] > 0)
    assert np.abs(np.diff(samples, axis=1)).max() <= 1


def _per_pixel_reference(data, label, band, ink_range, shape):
    """A plain loop: each pixel's set of voxels rint(p + t n) over the band offsets, ink where any of its t is in range."""
    ink_sum, ink_count = np.zeros(shape, np.float64), np.zeros(shape, np.int64)
    for (row, col), pixel in np.ndenumerate(data[..., 0]):
        point, normal = data[row, col, 2::-1], data[row, col, 5:2:-1]
        if not data[row, col].any():
            continue  # off the surface
        voxels = {}
        for t in band_offsets(band, ink_range):
            voxel = tuple(int(v) for v in np.rint(point + t * normal))
            voxels[voxel] = voxels.get(voxel, False) or bool(ink_range[0] <= t <= ink_range[1])
        for voxel, ink in voxels.items():
            if all(0 <= v < s for v, s in zip(voxel, shape)):
                ink_sum[voxel] += np.float32(label[row, col]) / np.float32(255) if ink else 0.0
                ink_count[voxel] += 1
    return ink_sum, ink_count


@pytest.mark.parametrize("cache_mb, tile_pixels, compression", [
    ("1024", "65535", volume.LABEL_COMPRESSION), ("1", "7", volume.LABEL_COMPRESSION),
    ("1", "7", "blosc-zstd"),  # another blosc: chunks compressed here, bit shuffled
    ("1", "7", "none"),  # chunks stored as they are
    ("1", "7", "gzip"),  # HDF5 runs the filter
])
def test_labels_equal_a_per_pixel_loop_whatever_the_tiles_cache_and_codec(scene, cache_mb, tile_pixels, compression, monkeypatch):
    monkeypatch.setattr(volume, "LABEL_COMPRESSION", compression)
    data = _cylinder(radius=11.0, centre_xy=(21.0, 16.0), z0=3)
    data[..., 2] += np.linspace(0, 6, data.shape[1])[None]  # a helix: no two rows alike
    data[5:7] = 0  # rows off the surface: with small tiles, tiles without a pixel
    label = np.random.default_rng(3).choice(np.array([0, 255, 128, 37], np.uint8), data.shape[:2])
    add_segment(scene, "20230101000000", data, label)
    add_segment(scene, "20230202000000", data[::-1], label[::-1])  # the same surface again: chunks already hold labels
    if cache_mb == "1":  # a cache of one chunk: strips of 2 columns, every chunk written early and read back when reached again
        monkeypatch.setattr(all_labels_to_hdf, "ChunkAccumulator",
                            lambda ink_sum, ink_count, max_bytes: ChunkAccumulator(ink_sum, ink_count, 8**3 * 8))
    run(scene, "--ink_back", "1", "--ink_front", "2", "--tile_pixels", tile_pixels, band="3.5")
    ink_sum, ink_count, _ = read(scene / "train.h5")
    first = _per_pixel_reference(data, label, 3.5, (-1.0, 2.0), SHAPE)
    second = _per_pixel_reference(data[::-1], label[::-1], 3.5, (-1.0, 2.0), SHAPE)
    assert np.array_equal(ink_count, first[1] + second[1]) and ink_count.max() == 2
    assert np.allclose(ink_sum, first[0] + second[0], rtol=1e-6, atol=0)  # float32 sums of grey labels: one rounding apart


def test_every_chunk_is_written_once_when_a_strip_of_rows_fits_in_memory(scene, monkeypatch):
    theta, z = np.meshgrid(np.linspace(0.2, 2.2, 14), np.arange(1, 19, dtype=float), indexing="ij")
    data = np.concatenate([np.stack([21 + 11 * np.cos(theta), 16 + 11 * np.sin(theta), z], axis=-1),
                           np.stack([np.cos(theta), np.sin(theta), 0 * theta], axis=-1)], axis=-1).transpose(1, 0, 2)
    add_segment(scene, "20230101000000", data, np.full(data.shape[:2], 255, np.uint8))  # rows along z, 18 of them
    written = []
    write_chunk = labels._write_chunk
    monkeypatch.setattr(labels, "_write_chunk", lambda dataset, origin, *rest: (written.append((dataset.name, origin)),
                                                                                 write_chunk(dataset, origin, *rest)))
    run(scene, "--tile_pixels", "14")  # a tile per row: 18 tiles, chunks of 8 rows, chunks leave as the rows move on
    _, ink_count, _ = read(scene / "train.h5")
    reached = {(8 * z, 8 * y, 8 * x) for z, y, x in np.argwhere(ink_count > 0) // 8}
    assert sorted(written) == sorted((name, origin) for name in ("/ink_sum", "/ink_count") for origin in reached)


def test_a_segment_whose_rows_reach_more_chunks_than_half_the_cache_is_swept_in_bands(tmp_path):
    data = np.zeros((4, 64, 6))  # rows along y at z = 4, 64 columns along x: a row reaches 8 chunks of 8^3
    data[..., 0], data[..., 1], data[..., 2], data[..., 5] = np.arange(64)[None], 3 + np.arange(4)[:, None], 4.0, 1.0

    segment = SimpleNamespace(height=data.shape[0], width=data.shape[1], data=data)
    with h5py.File(tmp_path / "labels.h5", "w") as file:
        datasets = [volume.create_volume(file, name, (16, 16, 64), dtype, 8) for name, dtype in
                    ((volume.INK_SUM, np.float32), (volume.INK_COUNT, np.uint16))]
        for slots, columns in ((10, 22), (20, 64)):  # room for 10 // 2 - 2 = 3 chunks of a row: 3 bands
            with ChunkAccumulator(*datasets, max_bytes=slots * 8**3 * (4 + 2)) as accumulator:  # float32 sums, uint16 counts
                assert all_labels_to_hdf.band_columns(segment, accumulator, band=2.0) == columns


def test_counts_saturate_instead_of_wrapping_when_many_pixels_share_voxels(scene):
    data = np.zeros((300, 300, 6))  # 90,000 pixels on one point: every voxel of its band is reached 90,000 times
    data[..., :3], data[..., 5] = (20.0, 15.0, 10.0), 1.0
    add_segment(scene, "20230101000000", data, np.full(data.shape[:2], 255, np.uint8))
    run(scene, "--tile_pixels", "30000")  # three tiles: the chunk leaves before its held counts could pass 65535
    ink_sum, ink_count, _ = read(scene / "train.h5")
    band = ink_count > 0
    assert np.count_nonzero(band) == 5  # z = 8..12 at (y, x) = (15, 20)
    assert np.all(ink_count[band] == 65535) and np.all(ink_sum[band] == 90000)


def test_a_tile_larger_than_the_counts_can_hold_is_refused(scene):
    with pytest.raises(InputError, match="--tile_pixels 70000: must be in \\[1, 65535\\]"):
        run(scene, "--tile_pixels", "70000")


def test_update_adds_to_chunks_that_hdf5_stored_uncompressed(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    run(scene)
    noise = np.random.default_rng(0).integers(0, 60000, (8, 8, 8)).astype(np.uint16)  # blosc cannot shrink it
    with h5py.File(scene / "train.h5", "a") as file:
        file[volume.INK_COUNT][8:16, 0:8, 0:8] = noise
        assert file[volume.INK_COUNT].id.read_direct_chunk((8, 0, 0))[0] & 1  # the filter was skipped for this chunk
        before = file[volume.INK_COUNT][:]
    add_segment(scene, "20230202000000", data, label)
    run(scene, "--update", "true")
    _, ink_count, _ = read(scene / "train.h5")
    first = _per_pixel_reference(data, label, 2.0, (-2.0, 2.0), SHAPE)[1]
    assert np.array_equal(ink_count, np.minimum(before.astype(np.int64) + first, 65535))


def test_an_error_of_the_writer_reaches_the_voxelizing_thread(tmp_path, monkeypatch):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(labels, "_write_chunk", disk_full)
    with h5py.File(tmp_path / "labels.h5", "w") as file:
        datasets = [volume.create_volume(file, name, (16, 16, 16), dtype, 8, volume.LABEL_COMPRESSION)
                    for name, dtype in ((volume.INK_SUM, np.float32), (volume.INK_COUNT, np.uint16))]
        one = np.ones(1, np.int32)
        with pytest.raises(OSError, match="No space left"):
            with ChunkAccumulator(*datasets, max_bytes=8**3 * 8) as accumulator:  # one slot: every new chunk waits for the writer
                for corner in range(0, 16, 8):
                    accumulator.add(corner * one, corner * one, 0 * one, np.ones(1, np.float32), 0 * one)


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator")
def test_freed_memory_is_reused_without_page_faults():
    churn = textwrap.dedent("""
        import resource, sys
        import numpy as np
        from ink3d.memory import reuse_freed_memory
        if sys.argv[1] == "reuse":
            reuse_freed_memory()
        for size in (1 << 20, 1 << 25):  # 8 MB and 256 MB (above what glibc's heap takes by default)
            np.ones(size)  # the first one costs its pages either way
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            np.ones(1 << 20), np.ones(1 << 25)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    faults = {how: int(subprocess.run([sys.executable, "-c", churn, how], capture_output=True, text=True, check=True,
                                      cwd=Path(__file__).resolve().parents[1]).stdout)
              for how in ("default", "reuse")}
    assert faults["default"] >= 20  # every fresh array faults its pages in (4 kB or 2 MB ones)
    assert faults["reuse"] < faults["default"] / 10


def test_each_voxel_counts_once_per_pixel(scene):
    data = _plane([1.0, 1.0, 1.0], [20.0, 15.0, 10.0], size=1)
    add_segment(scene, "20230101000000", data, np.full((1, 1), 255, np.uint8))
    run(scene, band="4")
    _, ink_count, _ = read(scene / "train.h5")
    assert ink_count.max() == 1


def test_versions_validation_split_and_report(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    add_segment(scene, "20230101000001", data, 255 - label)  # newer version of the same segment
    add_segment(scene, "20230303000000", data, label)  # validation
    add_segment(scene, "20230303000002", data, label)  # its newer version: validation too, never training
    report = run(scene, valid="20230303000000")
    _, _, train_attrs = read(scene / "train.h5")
    _, _, valid_attrs = read(scene / "valid.h5")
    assert json.loads(train_attrs["segments"]) == ["20230101000001"]
    assert json.loads(valid_attrs["segments"]) == ["20230303000002"]
    lines = "\n".join(report)
    assert "20230101000000: superseded by newer version 20230101000001 (" in lines
    assert "kept 20230303000002, superseded 20230303000000; --keep_all_versions true uses every version" in lines
    ink_sum, ink_count, _ = read(scene / "train.h5")
    assert ink_sum[10, 7, 5] == 0 and ink_sum[10, 7, 16] == 1  # the newer (inverted) label was used
    run(scene, "--overwrite", "true", "--keep_all_versions", "true")
    assert json.loads(read(scene / "train.h5")[2]["segments"]) == ["20230101000000", "20230101000001", "20230303000000", "20230303000002"]


def test_a_mistyped_validation_segment_is_an_error(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    add_segment(scene, "20230303000000", data, label)
    with pytest.raises(InputError, match="--valid_segments 20230330000000: no such segment .*20230101000000, 20230303000000"):
        run(scene, valid="20230330000000")  # two digits swapped
    assert sorted(path.name for path in scene.glob("*.h5*")) == ["scan.h5"]  # nothing written
    run(scene, valid="20230303000001")  # another version of an existing segment names its family
    assert json.loads(read(scene / "valid.h5")[2]["segments"]) == ["20230303000000"]


@pytest.mark.parametrize("band", ["-2", "0"])
def test_a_band_that_is_not_positive_is_refused(scene, band):
    with pytest.raises(InputError, match=f"--band {float(band)}: must be > 0"):
        run(scene, band=band)


def test_mask_and_invalid_pixels_are_not_labeled(scene, recwarn):
    data, label = flat_segment()
    data[0, 0] = 0  # off the surface
    data[0, 1, 0] = np.nan  # points and normals that are not finite are invalid too
    data[0, 2, 4] = np.inf
    mask = np.full(label.shape, 255, np.uint8)
    mask[:, 9:] = 0
    add_segment(scene, "20230101000000", data, label, mask)
    run(scene)
    _, ink_count, _ = read(scene / "train.h5")
    assert ink_count[:, 7:17, 14:17].sum() == 0  # masked columns 9..11
    assert ink_count[:, 7, 5:8].sum() == 0  # the off-surface and the non-finite pixels
    assert ink_count[:, 7, 8].sum() == 5
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_points_outside_the_volume_are_dropped_and_counted(scene):
    data, label = flat_segment(z=1.0)  # band 2 reaches z = -1
    add_segment(scene, "20230101000000", data, label)
    report = run(scene)
    _, ink_count, _ = read(scene / "train.h5")
    assert np.array_equal(np.unique(np.nonzero(ink_count)[0]), [0, 1, 2, 3])
    assert any("120 band samples beyond the volume's edge dropped (pixels near the edge)" in line for line in report)  # 120 pixels x z=-1
    data, label = flat_segment(z=-3.0)  # the surface itself outside: a segment of another scan or level
    add_segment(scene, "20230303000000", data, label)
    report = run(scene, "--overwrite", "true")
    assert any("20230303000000: 120 pixels labeled, 0 voxel contributions" in line and "120 of its pixels lie outside the volume (600 band samples dropped): "
               "segments of another scan, or of another resolution than --level 0 reads" in line for line in report), report


def test_update_is_idempotent_and_adds_new_segments(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    run(scene)
    first = read(scene / "train.h5")
    with pytest.raises(InputError, match="exists"):
        run(scene)
    report = run(scene, "--update", "true")
    again = read(scene / "train.h5")
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert any("already in train.h5, not counted again" in line for line in report)
    add_segment(scene, "20230202000000", data, label)
    run(scene, "--update", "true")
    _, ink_count, attrs = read(scene / "train.h5")
    assert ink_count.max() == 2 and json.loads(attrs["segments"]) == ["20230101000000", "20230202000000"]


def test_label_size_mismatch_names_the_segment(scene):
    data, _ = flat_segment()
    add_segment(scene, "20230101000000", data, np.zeros((10, 11), np.uint8))
    with pytest.raises(InputError, match=r"20230101000000: ink label .* is 11 x 10 .* the ppm is 12 x 10"):
        run(scene)
    assert not (scene / "train.h5").exists() and not (scene / "train.h5.partial").exists()


def test_malformed_ppm_errors_or_is_skipped(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    add_segment(scene, "20230202000000", data, label)
    ppm = scene / "paths" / "20230202000000" / "20230202000000.ppm"
    ppm.write_bytes(ppm.read_bytes()[:-8])
    with pytest.raises(InputError, match="20230202000000.ppm.*truncated"):
        run(scene)
    report = run(scene, "--skip_bad", "true")
    assert any(line.startswith("/") and "20230202000000.ppm" in line and line.endswith("skipped") for line in report)
    assert json.loads(read(scene / "train.h5")[2]["segments"]) == ["20230101000000"]


def test_missing_ppm_errors_or_is_skipped(scene):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)
    cv2.imwrite(str(scene / "labels" / "20239999000000_inklabels.png"), label)
    with pytest.raises(InputError, match="20239999000000: no ppm"):
        run(scene)
    assert any("20239999000000: no ppm" in line for line in run(scene, "--skip_bad", "true"))


def test_a_crash_leaves_no_half_file(scene, monkeypatch):
    data, label = flat_segment()
    add_segment(scene, "20230101000000", data, label)

    def crash(*args):
        raise MemoryError

    monkeypatch.setattr(all_labels_to_hdf, "voxelize_tile", crash)
    with pytest.raises(MemoryError):
        run(scene)
    assert sorted(path.name for path in scene.glob("*.h5*")) == ["scan.h5"]


def test_synthetic_scroll_labels_match_ground_truth(synthetic_scroll, tmp_path, capsys):
    """With the band of the ink layer's half thickness, labels > 0.5 reproduce the true 3D ink."""
    import volume_to_hdf

    volume_to_hdf.main(["--tiff_dir", str(synthetic_scroll / "volume"), "--out", str(tmp_path / "scan.h5")])
    all_labels_to_hdf.main(["--ppm_dir", str(synthetic_scroll / "paths"), "--labels_dir", str(synthetic_scroll / "labels"),
                            "--volume", str(tmp_path / "scan.h5"), "--out_train", str(tmp_path / "train.h5"),
                            "--out_valid", str(tmp_path / "valid.h5"), "--valid_segments", "20231022170901", "--band", "1"])
    with h5py.File(synthetic_scroll / "ground_truth.h5") as file:
        truth = file[volume.GROUND_TRUTH][:] > 0
    for name in ("train.h5", "valid.h5"):
        ink_sum, ink_count, _ = read(tmp_path / name)
        labeled = ink_count > 0
        predicted = labeled & (ink_sum > 0.5 * ink_count)
        actual = labeled & truth
        iou = (predicted & actual).sum() / (predicted | actual).sum()
        print(f"{name}: IoU of label > 0.5 with ground-truth ink inside the labeled region = {iou:.3f}")
        assert iou >= 0.7


def _labels_file(path, ink_count, ink_sum, chunk):
    with h5py.File(path, "w") as file:
        volume.create_volume(file, volume.INK_SUM, ink_sum.shape, np.float32, chunk)[:] = ink_sum
        volume.create_volume(file, volume.INK_COUNT, ink_count.shape, np.uint16, chunk)[:] = ink_count


@pytest.mark.parametrize("block, chunk", [(8, 8), (8, 5), (5, 16)])
def test_find_coords_equals_brute_force(tmp_path, block, chunk):
    rng = np.random.default_rng(block * chunk)
    shape = (19, 23, 30)
    ink_count = (rng.random(shape) < 0.002).astype(np.uint16) * rng.integers(1, 4, shape).astype(np.uint16)
    ink_sum = (ink_count * rng.random(shape)).astype(np.float32)
    _labels_file(tmp_path / "labels.h5", ink_count, ink_sum, chunk)
    pred_find_coords.main(["--labels", str(tmp_path / "labels.h5"), "--out", str(tmp_path / "c.npy"),
                           "--out_ink", str(tmp_path / "ink.npy"), "--block", str(block), "--min_labeled", "2"])
    expected, expected_ink = [], []
    for z in range(0, shape[0], block):
        for y in range(0, shape[1], block):
            for x in range(0, shape[2], block):
                count = ink_count[z:z + block, y:y + block, x:x + block]
                total = ink_sum[z:z + block, y:y + block, x:x + block]
                if (count > 0).sum() >= 2:
                    expected.append([z, y, x])
                if (total[count > 0] / count[count > 0] > 0.5).any():
                    expected_ink.append([z, y, x])
    coords = np.load(tmp_path / "c.npy")
    assert coords.dtype == np.int32 and coords.shape[1] == 3
    assert coords.tolist() == expected and len(expected) > 0
    assert np.load(tmp_path / "ink.npy").tolist() == expected_ink


def test_distance_filter_equals_dense_reference():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 2000, (500, 3))
    valid = rng.integers(0, 2000, (40, 3))
    kept, dropped = drop_near(train, valid, 512)
    dense = np.linalg.norm(train[:, None] - valid[None], axis=-1).min(axis=1)
    assert np.array_equal(kept, train[dense >= 512]) and dropped == (dense < 512).sum() > 0
    assert drop_near(train, valid[:0], 512)[1] == 0


def test_the_chunk_pool_holds_no_more_slots_than_the_volume_has_chunks(tmp_path):
    """A pool sized by --cache_mb alone would be zeroed in full for every segment where freed memory is kept."""
    with h5py.File(tmp_path / "labels.h5", "w") as file:
        sums = volume.create_volume(file, volume.INK_SUM, (20, 40, 40), np.float32, chunk=16)
        counts = volume.create_volume(file, volume.INK_COUNT, (20, 40, 40), np.float32, chunk=16)
        with ChunkAccumulator(sums, counts, max_bytes=1 << 30) as pool:
            assert pool.slots == 2 * 3 * 3 and len(pool.sums) == 18 * 16**3
        with ChunkAccumulator(sums, counts, max_bytes=5 * 16**3 * 6) as pool:
            assert pool.slots == 5
