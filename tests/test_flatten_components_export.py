import csv
import json

import cc3d
import cv2
import h5py
import numpy as np
import pytest
import tifffile
from scipy import ndimage
from tqdm import tqdm

import connected_components_explore
import export_slices
import flatten_3d
from ink3d import InputError, chunk_cache, pyramid, volume
from ink3d.ppm import write_ppm
from ink3d.sampling import trilinear

GRADIENT = np.array([2.0, 3.0, 5.0])  # zyx: value = 2 z + 3 y + 5 x + 1


@pytest.fixture
def linear_volume(tmp_path):
    z, y, x = np.mgrid[0:30, 0:24, 0:20].astype(np.float32)
    values = GRADIENT[0] * z + GRADIENT[1] * y + GRADIENT[2] * x + 1
    with h5py.File(tmp_path / "linear.h5", "w") as file:
        volume.create_volume(file, "field", values.shape, np.float32, chunk=8)[:] = values
    return tmp_path / "linear.h5"


def _tilted_segment(tmp_path, segment_id="20230101000000", height=7, width=9):
    """A plane at non-integer position with a tilted normal; pixel (0, 0) is off the surface."""
    normal = np.array([0.6, 0.0, 0.8])  # xyz
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    data = np.zeros((height, width, 6))
    data[..., 0] = 4.37 + 0.8 * cols
    data[..., 1] = 6.71 + rows
    data[..., 2] = 12.43 - 0.6 * cols  # values stay clear of .5 rounding ties
    data[..., 3:] = normal
    data[0, 0] = 0
    write_ppm(tmp_path / "paths" / segment_id / f"{segment_id}.ppm", data)
    return data


def _flatten(tmp_path, *extra):
    flatten_3d.main(["--volume", str(tmp_path / "linear.h5"), "--dataset", "field", "--ppm_dir", str(tmp_path / "paths"),
                     "--out_dir", str(tmp_path / "flat"), "--overwrite", "true", *extra])
    return cv2.imread(str(tmp_path / "flat" / "20230101000000_prediction.png"), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_trilinear_equals_map_coordinates_bit_for_bit(dtype):
    rng = np.random.default_rng(3)
    box = (rng.integers(0, 256, (9, 11, 13)) if dtype == np.uint8 else rng.normal(0, 100, (9, 11, 13))).astype(dtype)
    origin = np.array([40.0, -7.0, 1000.0])  # the box's place in the volume: coordinates are the volume's
    local = np.concatenate([rng.uniform(0, np.array(box.shape)[:, None] - 1, (3, 5000)),  # anywhere inside
                            rng.integers(0, np.array(box.shape)[:, None] - 1, (3, 200)).astype(float),  # on voxels
                            np.array(box.shape, float)[:, None] - 1 - rng.uniform(0, 1e-9, (3, 50))], axis=1)  # at the far faces
    expected = ndimage.map_coordinates(box, local, output=np.float32, order=1, mode="constant", cval=0.0, prefilter=False)
    for chunk in (64, 777, 1 << 14):  # whole chunks and a ragged last one
        assert np.array_equal(trilinear(box, local + origin[:, None], origin, chunk), expected)


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_flatten_linear_field_exactly(tmp_path, linear_volume, reduce):
    data = _tilted_segment(tmp_path)
    band = 3
    image = _flatten(tmp_path, "--band", str(band), "--reduce", reduce)
    point_zyx = data[..., 2::-1]
    slope = float(GRADIENT @ data[0, 1, 5:2:-1])  # value change per voxel along the normal
    value_at_surface = point_zyx @ GRADIENT + 1
    expected = value_at_surface if reduce == "mean" else value_at_surface + band * abs(slope)
    expected = np.clip(np.rint(expected), 0, 255).astype(np.uint8)
    expected[0, 0] = 0
    assert image.dtype == np.uint8 and np.array_equal(image, expected)


def test_flatten_tiles_equal_one_pass_and_layers(tmp_path, linear_volume):
    data = _tilted_segment(tmp_path)
    one_pass = _flatten(tmp_path, "--tile", "64", "--layers", "true", "--band", "2")
    tiled = _flatten(tmp_path, "--tile", "2", "--band", "2")
    assert np.array_equal(one_pass, tiled)
    layers = tifffile.imread(tmp_path / "flat" / "20230101000000_prediction_layers.tif")
    assert layers.shape == (5, 7, 9)
    for layer, t in enumerate(range(-2, 3)):
        expected = np.rint((data[..., 2::-1] + t * data[..., 5:2:-1]) @ GRADIENT + 1).astype(np.uint8)
        expected[0, 0] = 0
        assert np.array_equal(layers[layer], expected)


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_flatten_counts_only_samples_inside_the_volume(tmp_path, linear_volume, reduce):
    data = np.zeros((2, 6, 6))
    data[..., 0], data[..., 1], data[..., 2], data[..., 5] = np.arange(6) + 3, 5, 2.0, 1.0  # a plane at z = 2, normal +z
    data[1, :3, 2] = -20.0  # these pixels' samples all lie below the volume
    write_ppm(tmp_path / "paths" / "20230101000000" / "20230101000000.ppm", data)
    image = _flatten(tmp_path, "--band", "4", "--reduce", reduce)
    mask = cv2.imread(str(tmp_path / "flat" / "20230101000000_prediction_mask.png"), cv2.IMREAD_UNCHANGED)
    x = np.arange(6) + 3
    inside_z = np.arange(0, 7)  # samples at z = -2..6; those at z < 0 lie outside
    values = GRADIENT[0] * inside_z[:, None] + GRADIENT[1] * 5 + GRADIENT[2] * x + 1
    expected = np.rint(values.mean(axis=0) if reduce == "mean" else values.max(axis=0)).astype(np.uint8)
    assert np.array_equal(image[0], expected)
    assert np.array_equal(image[1], np.r_[np.zeros(3, np.uint8), expected[3:]])
    assert np.array_equal(mask, np.array([[255] * 6, [0, 0, 0, 255, 255, 255]], np.uint8))


def test_flatten_reads_an_ome_zarr_scan_as_its_hdf5_copy(tmp_path):
    values = np.random.default_rng(5).integers(0, 256, (30, 24, 20)).astype(np.uint8)
    with h5py.File(tmp_path / "scan.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, values.shape, np.uint8, chunk=8)[:] = values
    pyramid.write_ome_zarr(tmp_path / "scan.zarr", values, levels=1, chunk=8)
    _tilted_segment(tmp_path)
    outputs = []
    for name in ("h5", "zarr"):  # small tiles in two threads: neighbouring tiles share chunks through zarr's chunk cache
        flatten_3d.main(["--volume", str(tmp_path / f"scan.{name}"), "--dataset", volume.SCAN, "--name", name, "--ppm_dir",
                         str(tmp_path / "paths"), "--out_dir", str(tmp_path / "flat"), "--band", "3", "--tile", "3", "--workers", "2",
                         "--layers", "true", "--depth_map", "true", "--cache_mb", "1"])
        stem = tmp_path / "flat" / f"20230101000000_{name}"
        outputs.append([cv2.imread(f"{stem}.png", cv2.IMREAD_UNCHANGED), cv2.imread(f"{stem}_mask.png", cv2.IMREAD_UNCHANGED),
                        tifffile.imread(f"{stem}_layers.tif"), tifffile.imread(f"{stem}_depth.tif")])
    assert outputs[0][2].any() and outputs[0][2].shape == (7, 7, 9)
    assert all(np.array_equal(h5, zarr_, equal_nan=True) for h5, zarr_ in zip(*outputs))


def test_flatten_refuses_to_overwrite(tmp_path, linear_volume):
    _tilted_segment(tmp_path)
    _flatten(tmp_path)
    with pytest.raises(InputError, match="exists"):
        flatten_3d.main(["--volume", str(linear_volume), "--dataset", "field", "--ppm_dir", str(tmp_path / "paths"),
                         "--out_dir", str(tmp_path / "flat")])


def test_flatten_keeps_freed_memory_before_it_reads(tmp_path, linear_volume, monkeypatch):
    """Tiles' arrays and decompressed chunks come and go by the thousand: the process keeps freed memory from the
    start instead of touching fresh pages for each."""
    events = []
    monkeypatch.setattr(flatten_3d, "reuse_freed_memory", lambda: events.append("keep"))
    read_crop = volume.read_crop
    monkeypatch.setattr(volume, "read_crop", lambda *args, **kwargs: events.append("read") or read_crop(*args, **kwargs))
    _tilted_segment(tmp_path)
    _flatten(tmp_path, "--tile", "4")
    assert events[0] == "keep" and events.count("keep") == 1 and events.count("read") == 6


def test_tiles_go_in_bands_of_columns_that_fit_the_chunk_cache():
    cache = chunk_cache.ChunkCache((8, 8, 20), (4, 4, 4), np.uint8, 2 * 6 * 4**3, read_chunks=None)  # 6 chunks a column of tiles
    assert flatten_3d.tile_origins(8, 20, 4, cache) == [(0, 0), (0, 4), (4, 0), (4, 4), (0, 8), (0, 12), (4, 8), (4, 12),
                                                        (0, 16), (4, 16)]
    assert flatten_3d.tile_origins(8, 20, 4) == [(row, col) for row in (0, 4) for col in range(0, 20, 4)]


@pytest.mark.parametrize("in_bands", [True, False])
def test_a_segment_wider_than_the_chunk_cache_decompresses_each_chunk_about_once(tmp_path, monkeypatch, in_bands):
    """A flat segment 400 pixels wide whose rows of tiles share a row of chunks: through a cache of 40 of its 300
    chunks, row by row would read the shared row again; in bands of columns it stays in the cache."""
    with h5py.File(tmp_path / "wide.h5", "w") as file:
        volume.create_volume(file, volume.PREDICTIONS, (16, 24, 408), np.uint8, chunk=8)[:] = 100
    rows, cols = np.mgrid[0:16, 0:400].astype(np.float64)
    data = np.zeros((16, 400, 6))
    data[..., 0], data[..., 1], data[..., 2], data[..., 5] = cols + 0.5, rows + 4.5, 8.5, 1  # xyz, the normal along z
    write_ppm(tmp_path / "wide.ppm", data)
    _, opened = volume.open_dataset(tmp_path / "wide.h5", volume.PREDICTIONS, cache_bytes=40 * 8**3)
    decompressed = []
    chunk = opened._chunk
    monkeypatch.setattr(opened, "_chunk", lambda index: decompressed.append(index) or chunk(index))
    if not in_bands:
        monkeypatch.setattr(flatten_3d, "tile_origins", lambda height, width, tile, cache: [
            (row, col) for row in range(0, height, tile) for col in range(0, width, tile)])
    image = flatten_3d.flatten_segment(opened, tmp_path / "wide.ppm", 2, "mean", 8, tqdm(disable=True), None)[0]
    assert (image == 100).all() and len(set(decompressed)) == 2 * 3 * 51  # z 6-11, y 4-20, x 0-401
    assert (len(decompressed) <= 1.1 * 306) if in_bands else (len(decompressed) >= 1.3 * 306)


def test_flattening_ground_truth_reproduces_inklabels(synthetic_scroll, scroll_info, tmp_path):
    flatten_3d.main(["--volume", str(synthetic_scroll / "ground_truth.h5"), "--dataset", "ink", "--reduce", "max",
                     "--ppm_dir", str(synthetic_scroll / "paths"), "--out_dir", str(tmp_path)])
    for segment_id in scroll_info["segments"]:
        flat = cv2.imread(str(tmp_path / f"{segment_id}_prediction.png"), cv2.IMREAD_GRAYSCALE) > 127
        label = cv2.imread(str(synthetic_scroll / "labels" / f"{segment_id}_inklabels.png"), cv2.IMREAD_GRAYSCALE) > 127
        assert (flat & label).sum() / (flat | label).sum() >= 0.9


def _blob_volume():
    """Hand-built blobs: some cross block borders (block 8), one touches another only diagonally."""
    v = np.zeros((20, 20, 20), np.uint8)
    v[6:10, 2:4, 2:4] = 255  # crosses z = 8: 16 voxels
    v[1:3, 1:18, 10] = 200  # crosses y = 8 and 16: 34 voxels
    v[7, 7, 12] = 255  # diagonal chain across the corner at (8, 8, 8)-ish
    v[8, 8, 13] = 255
    v[9, 9, 14] = 255
    v[15, 15, 15] = 180  # single voxel
    v[15, 15, 16] = 100  # below threshold: not part of it
    v[12:20, 0:3, 0:3] = 130  # touches the volume edge: 72 voxels
    return v


def _components(tmp_path, values, *extra):
    with h5py.File(tmp_path / "pred.h5", "w") as file:
        volume.create_volume(file, volume.PREDICTIONS, values.shape, np.uint8, chunk=8)[:] = values
    connected_components_explore.main(["--predictions", str(tmp_path / "pred.h5"), "--out_dir", str(tmp_path / "blobs"),
                                       "--overwrite", "true", "--keep_labels", "true", *extra])
    with open(tmp_path / "blobs" / "blobs.csv") as file:
        rows = list(csv.DictReader(file))
    with h5py.File(tmp_path / "blobs" / "blob_labels.h5") as file:
        labels = file[volume.BLOB_LABELS][:]
    return rows, labels


@pytest.mark.parametrize("block", [4, 5, 8, 64])
def test_blockwise_components_equal_whole_array(tmp_path, block):
    values = _blob_volume()
    rows, labels = _components(tmp_path, values, "--macro_block", str(block), "--min_size", "1")
    reference, count = cc3d.connected_components(values >= 127.5, connectivity=26, return_N=True)
    assert len(rows) == count == 5
    assert sorted(int(r["voxels"]) for r in rows) == sorted(np.bincount(reference.ravel())[1:].tolist()) == [1, 3, 16, 34, 72]
    # the same partition: every reference component maps to exactly one blob and back
    pairs = np.unique(np.stack([reference.ravel(), labels.ravel()], axis=1), axis=0)
    assert len(pairs) == count + 1 and len(np.unique(pairs[:, 1])) == count + 1


def test_random_volume_matches_cc3d(tmp_path):
    rng = np.random.default_rng(0)
    values = (rng.random((23, 17, 29)) < 0.3).astype(np.uint8) * 255
    rows, labels = _components(tmp_path, values, "--macro_block", "6", "--min_size", "1", "--max_views", "3")
    reference, count = cc3d.connected_components(values > 0, connectivity=26, return_N=True)
    assert len(rows) == count
    pairs = np.unique(np.stack([reference.ravel(), labels.ravel()], axis=1), axis=0)
    assert len(pairs) == count + 1 and len(np.unique(pairs[:, 1])) == count + 1


def test_csv_fields_and_size_filter(tmp_path):
    values = _blob_volume()
    rows, _ = _components(tmp_path, values, "--macro_block", "8", "--min_size", "10", "--max_size", "40")
    big = rows[0]
    assert big["id"] == "1" and big["voxels"] == "72"
    assert [big[k] for k in ("z0", "y0", "x0", "z1", "y1", "x1")] == ["12", "0", "0", "20", "3", "3"]
    assert [float(big[k]) for k in ("centroid_z", "centroid_y", "centroid_x")] == [15.5, 1.0, 1.0]
    assert float(big["mean_probability"]) == pytest.approx(130 / 255, abs=1e-4)
    line = next(r for r in rows if r["voxels"] == "34")
    assert float(line["max_probability"]) == pytest.approx(200 / 255, abs=1e-4)
    pictures = sorted(p.name for p in (tmp_path / "blobs").glob("blob_*.png"))
    assert pictures == ["blob_000002.png", "blob_000003.png"]  # 34 and 16 voxels lie in 10..40
    page = (tmp_path / "blobs" / "index.html").read_text()
    assert page.index("blob_000002.png") < page.index("blob_000003.png")


def test_outline_is_the_border_of_the_mask():
    mask = np.zeros((8, 8), bool)
    mask[2:6, 3:7] = True
    picture = connected_components_explore._outlined(np.full((8, 8), 90, np.uint8), mask, 8)
    orange = np.all(picture == connected_components_explore.OUTLINE, axis=-1)
    assert np.array_equal(orange, mask & ~ndimage.binary_erosion(mask))
    assert np.all(picture[~orange] == 90)


def test_the_blob_is_outlined_on_its_scan_slices_only(tmp_path, capsys):
    values = np.zeros((20, 20, 20), np.uint8)
    values[6:12, 6:12, 6:12] = 255  # the blob: a 6^3 cube
    values[6:12, 6:12, 14:16] = 100  # beside it, below the threshold: in the picture's box, not the blob
    with h5py.File(tmp_path / "scan.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, values.shape, np.uint8)[:] = 90
    _components(tmp_path, values, "--volume", str(tmp_path / "scan.h5"), "--min_size", "1", "--margin", "4", "--view_size", "17",
                "--air_level", "40")
    assert "air level 40 (--air_level 40): only voxels whose scan lies above it can be ink" in capsys.readouterr().out
    picture = cv2.imread(str(tmp_path / "blobs" / "blob_000001.png"))[18:]  # below the caption's band
    orange = np.all(picture == connected_components_explore.OUTLINE, axis=-1)
    assert not orange[:17 + 4].any()  # the prediction's projections (17 rows, then a gap) carry no outline
    # the box is 2..16 on each axis (the cube 6..11 and a margin of 4), drawn 17 / 14 larger, each view followed by a
    # 4-pixel gap; the cube's voxels 4..9 of the box cover pixels 5..12 (nearest: pixel i shows voxel floor(i * 14 / 17))
    for view in (orange[21:, 0:17], orange[21:, 21:38], orange[21:, 42:59]):
        rows, cols = np.nonzero(view)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 12, 5, 12)
    along_z = picture[:17, :17, 0]  # the neighbour (x 14..15: box 12..13, pixels 15..16) is dimmed to a third
    assert along_z[8, 8] == 255 and along_z[8, 15] == 33
    index = (tmp_path / "blobs" / "index.html").read_text()
    assert "#1: 216 voxels, centre z 8 y 8 x 8, max p 1.00" in index
    assert "Blobs: 26-connected voxels of p &gt;= 0.5 above the scan&#x27;s air level; shown: those of 1 to" in index


def test_empty_volume(tmp_path):
    rows, labels = _components(tmp_path, np.zeros((10, 10, 10), np.uint8), "--macro_block", "4")
    assert rows == [] and not labels.any()
    assert "0 blobs" in (tmp_path / "blobs" / "index.html").read_text()


def test_one_voxel(tmp_path):
    values = np.zeros((9, 9, 9), np.uint8)
    values[4, 4, 4] = 255
    rows, _ = _components(tmp_path, values, "--macro_block", "4", "--min_size", "1")
    assert len(rows) == 1 and rows[0]["voxels"] == "1" and rows[0]["centroid_z"] == "4.00"


@pytest.mark.parametrize("axis", ["z", "y", "x"])
def test_export_roi_round_trip(tmp_path, axis):
    values = np.random.default_rng(0).integers(0, 256, (12, 14, 16)).astype(np.uint8)
    with h5py.File(tmp_path / "v.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, values.shape, np.uint8, chunk=5)[:] = values
    export_slices.main(["--volume", str(tmp_path / "v.h5"), "--dataset", volume.SCAN, "--out_dir", str(tmp_path / "s"),
                        "--roi", "2:11,3:,:9", "--axis", axis])
    a = "zyx".index(axis)
    start = [2, 3, 0][a]
    stop = [11, 14, 9][a]
    files = sorted((tmp_path / "s").glob("*.tif"))
    assert [f.name for f in files] == [f"{i:05d}.tif" for i in range(start, stop)]
    stack = np.stack([tifffile.imread(f) for f in files], axis=a)
    assert np.array_equal(stack, values[2:11, 3:, :9])
    with pytest.raises(InputError, match="already holds"):
        export_slices.main(["--volume", str(tmp_path / "v.h5"), "--dataset", volume.SCAN, "--out_dir", str(tmp_path / "s")])


def test_air_in_the_scan_is_not_ink(tmp_path):
    values = np.zeros((12, 12, 12), np.uint8)
    values[2:10, 4:6, 4:6] = 255  # one bar of high probability...
    scan = np.full(values.shape, 200, np.uint8)
    scan[5:7] = 10  # ...crossing two slices of air, which split it in two
    with h5py.File(tmp_path / "scan.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, scan.shape, np.uint8, chunk=8)[:] = scan
    rows, _ = _components(tmp_path, values, "--macro_block", "8", "--min_size", "1", "--volume", str(tmp_path / "scan.h5"),
                          "--air_level", "50")
    assert sorted(int(r["voxels"]) for r in rows) == [12, 12]
    rows, _ = _components(tmp_path, values, "--macro_block", "8", "--min_size", "1")
    assert [int(r["voxels"]) for r in rows] == [32]


@pytest.mark.parametrize("roi", ["", "2:20,0:20,0:20"])
def test_true_ink_of_each_blob_equals_a_count_over_its_voxels(tmp_path, roi):
    values = _blob_volume()
    truth = np.zeros(values.shape, np.uint8)
    truth[::2] = 255  # every other slice is "ink"
    truth[14:] = 255
    with h5py.File(tmp_path / "truth.h5", "w") as file:
        volume.create_volume(file, volume.GROUND_TRUTH, truth.shape, np.uint8, chunk=8)[:] = truth
    rows, labels = _components(tmp_path, values, "--macro_block", "5", "--min_size", "1", "--ground_truth", str(tmp_path / "truth.h5"),
                               *(["--roi", roi] if roi else []))
    origin = [int(part.split(":")[0]) for part in roi.split(",")] if roi else [0, 0, 0]
    region = truth[origin[0]:origin[0] + labels.shape[0], origin[1]:origin[1] + labels.shape[1], origin[2]:origin[2] + labels.shape[2]]
    for row in rows:
        inside = labels == int(row["id"])
        assert int(row["true_ink_voxels"]) == int((region[inside] > 0).sum())
    assert {int(r["voxels"]): int(r["true_ink_voxels"]) for r in rows}[72] == 7 * 9  # slices 12..19 but 13
    assert "true ink" in (tmp_path / "blobs" / "index.html").read_text()


@pytest.mark.parametrize("normal_sign, depth", [(1, 3.0), (1, -0.4), (-1, 2.5)])
def test_depth_map_finds_the_ink_at_its_offset(tmp_path, capsys, normal_sign, depth):
    """A plane z = 12.3 with ink (a Gaussian profile of probability) at a known offset along its normal: the depth map
    holds that offset at every pixel."""
    surface_z, ink_z = 12.3, 12.3 + normal_sign * depth
    z = np.arange(30, dtype=np.float64)[:, None, None]
    predictions = np.broadcast_to(np.rint(200 * np.exp(-0.5 * ((z - ink_z) / 1.5) ** 2)), (30, 24, 20)).astype(np.uint8)
    with h5py.File(tmp_path / "pred.h5", "w") as file:
        volume.create_volume(file, volume.PREDICTIONS, predictions.shape, np.uint8, chunk=8)[:] = predictions
    rows, cols = np.mgrid[0:6, 0:8].astype(np.float64)
    data = np.zeros((6, 8, 6))
    data[..., 0], data[..., 1], data[..., 2], data[..., 5] = 5 + cols, 4 + rows, surface_z, normal_sign
    write_ppm(tmp_path / "paths" / "s" / "s.ppm", data)
    flatten_3d.main(["--volume", str(tmp_path / "pred.h5"), "--ppm_dir", str(tmp_path / "paths"),
                     "--out_dir", str(tmp_path / "flat"), "--band", "6"])
    depth_map = tifffile.imread(tmp_path / "flat" / "s_prediction_depth.tif")
    summary = json.loads((tmp_path / "flat" / "s_prediction_depth.json").read_text())
    # the sampled profile is trilinear between integer z, so the parabola's vertex lies within a few hundredths
    assert depth_map.shape == (6, 8) and np.allclose(depth_map, depth, atol=0.08)
    assert summary["pixels"] == 48 and summary["median"] == pytest.approx(depth, abs=0.08)
    output = capsys.readouterr().out
    assert f"median depth of {np.median(depth_map):+.2f} voxels" in output
    # 48 pixels are too few to warn on, whatever their depth (tests/test_faces.py: the support rule)
    assert not summary["behind_surface"] and "behind the surface" not in output
    flatten_3d.main(["--volume", str(tmp_path / "pred.h5"), "--ppm_dir", str(tmp_path / "paths"), "--out_dir",
                     str(tmp_path / "flat"), "--band", "6", "--depth_threshold", "0.9", "--overwrite", "true", "--name", "high"])
    assert np.isnan(tifffile.imread(tmp_path / "flat" / "s_high_depth.tif")).all()  # the peaks are 200 / 255 < 0.9


@pytest.mark.parametrize("band", [3, 150])  # 7 layers, and more than a byte counts
def test_peak_depth_equals_a_per_pixel_loop_with_ties_and_samples_outside(band):
    """Each pixel's depth by a plain loop over its samples: the first highest sample inside the volume, refined by the
    parabola through it and its neighbours when both are inside and it bends down; NaN below the threshold."""
    rng = np.random.default_rng(3)
    offsets = np.arange(-band, band + 1.0)
    samples = rng.integers(0, 4, (len(offsets), 9, 11)).astype(np.float32)  # few values: many ties
    inside = rng.random(samples.shape) > 0.2
    inside[:, 0, 0] = False
    expected = np.full(samples.shape[1:], np.nan, np.float32)
    for row, col in np.ndindex(*samples.shape[1:]):
        values = [samples[k, row, col] if inside[k, row, col] else -np.inf for k in range(len(offsets))]
        peak = max(range(len(values)), key=lambda k: (values[k], -k))
        if values[peak] < 2:
            continue
        shift = 0.0
        if 0 < peak < len(values) - 1 and np.isfinite(values[peak - 1]) and np.isfinite(values[peak + 1]):
            curvature = values[peak - 1] - 2 * values[peak] + values[peak + 1]
            if curvature < 0:
                shift = 0.5 * (values[peak - 1] - values[peak + 1]) / curvature
        expected[row, col] = offsets[peak] + shift
    assert np.allclose(flatten_3d.peak_depth(samples, inside, offsets, 2), expected, equal_nan=True, rtol=0, atol=1e-6)


def test_depth_map_is_written_for_predictions_only_unless_asked(tmp_path, linear_volume):
    _tilted_segment(tmp_path)
    _flatten(tmp_path, "--band", "2")
    assert not (tmp_path / "flat" / "20230101000000_prediction_depth.tif").exists()  # dataset 'field'
    _flatten(tmp_path, "--band", "2", "--depth_map", "true", "--depth_threshold", "0")
    depth_map = tifffile.imread(tmp_path / "flat" / "20230101000000_prediction_depth.tif")
    # the linear field grows along the normal: it peaks at the band's front end, +2
    assert np.array_equal(np.isnan(depth_map), np.arange(63).reshape(7, 9) == 0) and np.allclose(depth_map[~np.isnan(depth_map)], 2)


def test_pixels_outside_a_predicted_region_are_not_predicted_in_the_mask(tmp_path, capsys):
    """A prediction of a region (--roi) holds 0 outside it: flattened, those pixels are masked out (not predicted),
    while a 0 inside the region stays a predicted 0 (no ink)."""
    with h5py.File(tmp_path / "pred.h5", "w") as file:
        dataset = volume.create_volume(file, volume.PREDICTIONS, (20, 30, 30), np.uint8)
        dataset[:10] = 0
        dataset.attrs["roi"] = json.dumps([[0, 10], [0, 30], [0, 30]])
    rows, cols = np.mgrid[0:20, 0:30]
    data = np.zeros((20, 30, 6))
    data[..., 0], data[..., 1], data[..., 2], data[..., 4] = cols, 15.0, rows, 1.0  # the plane y = 15, a row per z
    (tmp_path / "paths" / "s").mkdir(parents=True)
    write_ppm(tmp_path / "paths" / "s" / "s.ppm", data)
    flatten_3d.main(["--volume", str(tmp_path / "pred.h5"), "--ppm_dir", str(tmp_path / "paths"), "--out_dir", str(tmp_path / "flat"),
                     "--band", "2"])
    mask = cv2.imread(str(tmp_path / "flat" / "s_prediction_mask.png"), cv2.IMREAD_UNCHANGED)
    assert (mask[:10] == 255).all() and (mask[10:] == 0).all()
    assert "predicts the region [0, 0, 0]..[10, 30, 30] (voxels of this level) only" in capsys.readouterr().out
