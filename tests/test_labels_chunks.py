"""How all_labels_to_hdf adds a segment to the label chunks: equal to a per-pixel loop, each chunk written once, the
pool, counts that saturate, the writer thread, memory."""

import platform
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

import all_labels_to_hdf
from ink3d import InputError, labels, volume
from ink3d.labels import ChunkAccumulator, band_offsets
from labels_scene import SHAPE, add_segment, cylinder_segment, flat_segment, read, run


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
    data = cylinder_segment(radius=11.0, centre_xy=(21.0, 16.0), z0=3)
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


def test_the_chunk_pool_holds_no_more_slots_than_the_volume_has_chunks(tmp_path):
    """A pool sized by --cache_mb alone would be zeroed in full for every segment where freed memory is kept."""
    with h5py.File(tmp_path / "labels.h5", "w") as file:
        sums = volume.create_volume(file, volume.INK_SUM, (20, 40, 40), np.float32, chunk=16)
        counts = volume.create_volume(file, volume.INK_COUNT, (20, 40, 40), np.float32, chunk=16)
        with ChunkAccumulator(sums, counts, max_bytes=1 << 30) as pool:
            assert pool.slots == 2 * 3 * 3 and len(pool.sums) == 18 * 16**3
        with ChunkAccumulator(sums, counts, max_bytes=5 * 16**3 * 6) as pool:
            assert pool.slots == 5
