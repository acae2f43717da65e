"""Volumes read through the chunk cache and the chunk decoders held here: as zarr and HDF5 read them, each chunk once,
threads side by side, damaged chunks named."""

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import h5py
import numcodecs
import numpy as np
import pytest
import zarr

from ink3d import InputError
from ink3d.chunk_cache import ChunkCache
from ink3d.volume import UINT16_TO_UINT8, compression_options, create_volume, open_dataset, read_crop
from ink3d.volume_readers import Hdf5Volume
from volume_files import ome_v04


class _ReadSpy:
    """A zarr array that records the keys read from it."""

    def __init__(self, array):
        self.array, self.keys = array, []

    def __getitem__(self, key):
        self.keys.append(key)
        return self.array[key]

    def boxes(self) -> list[tuple]:
        return [tuple((part.start, part.stop) for part in key) for key in self.keys]

    def __getattr__(self, name):
        return getattr(self.array, name)


def _chunks_of_aligned(box, shape, chunk: int) -> list[tuple]:
    """The chunks a read of `box` covers, which must be whole chunks."""
    for (start, stop), size in zip(box, shape):
        assert start % chunk == 0 and (stop % chunk == 0 or stop == size), f"{box} is not chunk-aligned"
    return list(itertools.product(*(range(start // chunk, -(-stop // chunk)) for start, stop in box)))


class _ChunkReadSpy:
    """Stands in for the chunk reader of a volume's chunk cache: records the chunks read, in order, after `before`."""

    def __init__(self, scan, before=lambda index: None):
        self.read, self._read, self._before = [], scan.cache._read_chunks, before
        scan.cache._read_chunks = self

    def __call__(self, missing):
        for index in missing:
            self._before(index)
        self.read.extend(missing)
        return self._read(missing)


CHUNK_READERS = ["chunk files", "zarr"]  # how a cached zarr volume reads its chunks: here from their files, or through zarr


def _cached_ome_v04(path, values, reader, cache_bytes):
    """An OME-Zarr 0.4 volume read through a chunk cache; "zarr": a filter the chunk files are not read with."""
    filters = [numcodecs.Delta(values.dtype)] if reader == "zarr" else None
    _, scan = open_dataset(ome_v04(path, values, filters=filters), "scan_volume", cache_bytes=cache_bytes)
    assert (scan.decoder is not None) == (reader == "chunk files")
    return scan


@pytest.mark.parametrize("reader", CHUNK_READERS)
def test_zarr_reads_through_the_chunk_cache_decompress_each_chunk_once(tmp_path, reader):
    values = np.random.default_rng(0).integers(0, 65536, (9, 10, 11)).astype(np.uint16)
    scan = _cached_ome_v04(tmp_path / "v.zarr", values, reader, 1 << 20)
    chunks = _ChunkReadSpy(scan)
    spy = scan.array = _ReadSpy(scan.array)
    expected = UINT16_TO_UINT8[values]
    rng = np.random.default_rng(1)
    touched = set()
    for _ in range(60):
        origin, shape = rng.integers(-3, 10, 3), rng.integers(1, 8, 3)
        assert np.array_equal(read_crop(scan, origin, shape), np.pad(expected, 12)[tuple(slice(o + 12, o + 12 + s) for o, s in zip(origin, shape))])
        low, high = np.maximum(origin, 0), np.minimum(origin + shape, values.shape)
        if np.all(high > low):
            touched |= set(itertools.product(*(range(a // 4, -(-b // 4)) for a, b in zip(low, high))))
    assert np.array_equal(scan[2:7], expected[2:7]) and np.array_equal(scan[:, 3:9], expected[:, 3:9]) and scan[5:5].shape == (0, 10, 11)
    assert sorted(chunks.read) == sorted(touched | set(itertools.product(range(3), range(3), range(3))))  # each chunk read once
    assert scan[1, 2:4, :].tolist() == expected[1, 2:4, :].tolist() and scan[::2, 0, 0].tolist() == expected[::2, 0, 0].tolist()
    assert spy.keys[-2:] == [(1, slice(2, 4), slice(None)), (slice(None, None, 2), 0, 0)]  # other keys are read as they are


@pytest.mark.parametrize("reader", CHUNK_READERS)
def test_the_zarr_chunk_cache_drops_the_least_recently_used_chunk(tmp_path, reader):
    values = np.arange(4 * 4 * 16, dtype=np.uint8).reshape(4, 4, 16)
    scan = _cached_ome_v04(tmp_path / "v.zarr", values, reader, 2 * 4**3)  # two chunks
    chunks = _ChunkReadSpy(scan)
    for chunk in (0, 1, 0, 2, 0, 1):  # 2 drops 1 (0 was used since); 1 then drops 2
        assert np.array_equal(scan[:, :, 4 * chunk:4 * chunk + 4], values[:, :, 4 * chunk:4 * chunk + 4])
    assert [index[2] for index in chunks.read] == [0, 1, 2, 1]


@pytest.mark.parametrize("reader", CHUNK_READERS)
def test_threads_read_the_same_values_through_a_small_zarr_chunk_cache(tmp_path, reader):
    values = np.random.default_rng(2).integers(0, 256, (12, 12, 12)).astype(np.uint8)
    scan = _cached_ome_v04(tmp_path / "v.zarr", values, reader, 3 * 4**3)  # 3 of 27 chunks: evictions

    def crops(seed: int) -> bool:
        rng = np.random.default_rng(seed)
        for _ in range(100):
            origin, shape = rng.integers(0, 11, 3), rng.integers(1, 6, 3)
            box = tuple(slice(o, o + s) for o, s in zip(origin, shape))
            if not np.array_equal(scan[box], values[box]):
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(crops, range(8)))
    assert sum(chunk.nbytes for chunk in scan.cache.values()) <= 3 * 4**3


@pytest.mark.parametrize("reader", CHUNK_READERS)
def test_a_chunk_two_threads_ask_for_at_once_is_decompressed_once(tmp_path, reader):
    values = np.random.default_rng(3).integers(0, 256, (8, 8, 8)).astype(np.uint8)
    scan = _cached_ome_v04(tmp_path / "v.zarr", values, reader, 1 << 20)
    reading, asked = threading.Event(), threading.Event()

    def slowly(index):
        reading.set()
        asked.wait(5)  # the other thread asks for the same chunk while this read is under way
        time.sleep(0.1)

    chunks = _ChunkReadSpy(scan, slowly)

    def ask_while_it_is_read():
        reading.wait(5)
        asked.set()
        return scan[0:4, 0:4, 0:4]

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(lambda: scan[0:4, 0:4, 0:4]), pool.submit(ask_while_it_is_read)
        assert np.array_equal(first.result(), values[:4, :4, :4]) and np.array_equal(second.result(), values[:4, :4, :4])
    assert chunks.read == [(0, 0, 0)]


@pytest.mark.parametrize("reader", CHUNK_READERS)
def test_threads_read_different_zarr_chunks_side_by_side(tmp_path, reader):
    values = np.random.default_rng(4).integers(0, 256, (8, 8, 8)).astype(np.uint8)
    scan = _cached_ome_v04(tmp_path / "v.zarr", values, reader, 1 << 20)
    started = {0: threading.Event(), 1: threading.Event()}  # by the chunk's z index

    def meeting(index):
        started[index[0]].set()
        assert started[1 - index[0]].wait(120), "one read waited for the other"  # both under way at once (never near 120 s)

    chunks = _ChunkReadSpy(scan, meeting)
    with ThreadPoolExecutor(2) as pool:
        low, high = pool.submit(lambda: scan[0:4, 0:4, 0:4]), pool.submit(lambda: scan[4:8, 0:4, 0:4])
        assert np.array_equal(low.result(), values[:4, :4, :4]) and np.array_equal(high.result(), values[4:, :4, :4])
    assert sorted(chunks.read) == [(0, 0, 0), (1, 0, 0)]


ZARR_FORMATS = {  # zarr format, create_array keywords, and whether the cache reads the chunk files itself
    "v2 blosc": (2, {}, True),
    "v2 zstd": (2, {"compressors": numcodecs.Zstd(level=3)}, True),
    "v2 gzip": (2, {"compressors": numcodecs.GZip()}, True),
    "v2 uncompressed": (2, {"compressors": None}, True),
    "v2 nested keys": (2, {"chunk_key_encoding": {"name": "v2", "separator": "/"}}, True),
    "v2 delta filter": (2, {"filters": [numcodecs.Delta("u2")]}, False),
    "v3 zstd": (3, {}, True),
    "v3 blosc": (3, {"compressors": zarr.codecs.BloscCodec(cname="lz4", shuffle="bitshuffle")}, True),
    "v3 gzip": (3, {"compressors": zarr.codecs.GzipCodec()}, True),
    "v3 uncompressed": (3, {"compressors": None}, True),
    "v3 sharded": (3, {"shards": (8, 16, 16)}, False),
    "v3 checksummed": (3, {"compressors": [zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()]}, False),
}


@pytest.mark.filterwarnings("ignore:.*absent from the store")
@pytest.mark.parametrize("dtype, order", [(np.uint8, None), (np.uint16, "little"), (np.uint16, "big")])
@pytest.mark.parametrize("form", ZARR_FORMATS)
def test_zarr_chunk_files_read_here_as_zarr_reads_them(tmp_path, form, dtype, order):
    zarr_format, options, read_here = ZARR_FORMATS[form]
    values = (np.random.default_rng(6).integers(0, 3, (11, 17, 18)) * 20000 + 9).astype(dtype)
    if zarr_format == 2:
        options = {"dtype": np.dtype(dtype).newbyteorder("<" if order == "little" else ">"), **options}
    else:
        options = {"dtype": dtype, "serializer": zarr.codecs.BytesCodec(endian=order), **options}
    if "filters" in options:
        options["filters"] = [numcodecs.Delta(options["dtype"])]
    array = zarr.create_array(str(tmp_path / "v.zarr"), shape=values.shape, chunks=(4, 8, 8), fill_value=7,
                              zarr_format=zarr_format, **options)
    array[:8] = values[:8]  # the chunks beyond z 8 are never written: the fill value
    expected = values.copy()
    expected[8:] = 7
    expected = UINT16_TO_UINT8[expected] if dtype == np.uint16 else expected
    _, scan = open_dataset(tmp_path / "v.zarr", "scan_volume", cache_bytes=1 << 20)
    assert (scan.decoder is not None) == read_here, form
    _, uncached = open_dataset(tmp_path / "v.zarr", "scan_volume")  # through zarr
    assert np.array_equal(uncached[:], expected)
    rng = np.random.default_rng(7)
    for _ in range(40):
        origin, shape = rng.integers(-2, 16, 3), rng.integers(1, 9, 3)
        assert np.array_equal(read_crop(scan, origin, shape, fill=3), np.pad(expected, 20, constant_values=3)[
            tuple(slice(o + 20, o + 20 + s) for o, s in zip(origin, shape))]), (origin, shape)


def test_a_damaged_zarr_chunk_file_is_named(tmp_path):
    values = np.random.default_rng(8).integers(0, 256, (8, 8, 8)).astype(np.uint8)
    path = ome_v04(tmp_path / "v.zarr", values)
    (path / "0" / "1.0.0").write_bytes(b"not a blosc frame")
    _, scan = open_dataset(path, "scan_volume", cache_bytes=1 << 20)
    assert np.array_equal(read_crop(scan, (0, 0, 0), (4, 8, 8)), values[:4])
    with pytest.raises(InputError, match=r"v.zarr level 0 .* at \[4, 0, 0\]\.\.\[8, 8, 8\] failed \(the chunk .*1\.0\.0 does not decompress"):
        read_crop(scan, (4, 0, 0), (4, 8, 8))


HDF5_FILTERS = {  # create_dataset keywords, and whether the chunks are decompressed here (else through HDF5)
    "none": ({}, True),
    "gzip": ({"compression": "gzip"}, True),
    "gzip with shuffle": ({"compression": "gzip", "shuffle": True}, True),
    "blosc-lz4": (compression_options("blosc-lz4"), True),
    "blosc-zstd": (compression_options("blosc-zstd"), True),
    "blosc-lz4-byteshuffle": (compression_options("blosc-lz4-byteshuffle"), True),
    "lzf": ({"compression": "lzf"}, False),
    "gzip with fletcher32": ({"compression": "gzip", "fletcher32": True}, False),
}


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("filters", HDF5_FILTERS)
def test_hdf5_volumes_read_through_the_chunk_cache_as_hdf5_reads_them(tmp_path, filters, dtype):
    options, decoded_here = HDF5_FILTERS[filters]
    values = (np.random.default_rng(5).integers(0, 3, (11, 17, 18)) * 50.25 + 9).astype(dtype)  # compressible: through each filter
    with h5py.File(tmp_path / "v.h5", "w") as file:
        stored = file.create_dataset("ink", shape=values.shape, dtype=dtype, chunks=(4, 8, 8), fillvalue=7, **options)
        stored[:8, :, :] = values[:8]  # the chunks beyond z 8 are never written: the fill value
        assert stored.id.get_chunk_info_by_coord((0, 0, 0)).filter_mask == 0  # stored through every filter
    values[8:] = 7
    _, cached = open_dataset(tmp_path / "v.h5", "ink", cache_bytes=1 << 20)
    assert isinstance(cached, Hdf5Volume) and (cached.decoders is not None) == decoded_here and cached.dtype == dtype
    rng = np.random.default_rng(6)
    padded = np.pad(values, 16)
    for _ in range(40):
        origin, shape = rng.integers(-3, 16, 3), rng.integers(1, 12, 3)
        assert np.array_equal(read_crop(cached, origin, shape), padded[tuple(slice(o + 16, o + 16 + s) for o, s in zip(origin, shape))])
    assert np.array_equal(cached[:], values) and np.array_equal(cached[3, ::2], values[3, ::2])  # the last through HDF5


def test_a_uint16_hdf5_scan_reads_through_the_chunk_cache_as_uint8(dataset, tmp_path):
    data, _ = dataset
    _, scan = open_dataset(tmp_path / "v.h5", "scan_volume", cache_bytes=1 << 20)
    assert scan.dtype == np.uint8 and np.array_equal(scan[1:5, 2:6, :], UINT16_TO_UINT8[data[1:5, 2:6, :]])
    assert np.array_equal(scan[2, :, 3], UINT16_TO_UINT8[data[2, :, 3]])


def test_an_hdf5_chunk_stored_without_its_filter_reads_as_hdf5_reads_it(tmp_path):
    values = (np.arange(16 * 16 * 32) // 97).astype(np.uint8).reshape(16, 16, 32)  # compressible: chunks go through blosc
    with h5py.File(tmp_path / "v.h5", "w") as file:
        stored = create_volume(file, "predictions", values.shape, np.uint8, chunk=16)
        stored[:, :, :16] = values[:, :, :16]
        stored.id.write_direct_chunk((0, 0, 16), values[:, :, 16:].tobytes(), filter_mask=1)  # blosc skipped, as HDF5 may
        assert [stored.id.get_chunk_info_by_coord((0, 0, x)).filter_mask for x in (0, 16)] == [0, 1]
    with h5py.File(tmp_path / "v.h5", "r") as file:
        assert np.array_equal(file["predictions"][:], values)
    _, cached = open_dataset(tmp_path / "v.h5", "predictions", cache_bytes=1 << 20)
    assert np.array_equal(cached[0:16, 0:16, 0:32], values)


def test_a_damaged_hdf5_chunk_read_through_the_chunk_cache_is_named(tmp_path):
    data = (np.arange(32**3).reshape(32, 32, 32) // 97).astype(np.uint8)  # compressible: chunks go through blosc
    with h5py.File(tmp_path / "v.h5", "w") as file:
        create_volume(file, "predictions", data.shape, np.uint8, chunk=16)[:] = data
        info = file["predictions"].id.get_chunk_info_by_coord((16, 0, 0))
    assert info.filter_mask == 0
    with open(tmp_path / "v.h5", "r+b") as raw:  # the bytes of chunk (16, 0, 0) are lost
        raw.seek(info.byte_offset)
        raw.write(bytes(info.size))
    _, cached = open_dataset(tmp_path / "v.h5", "predictions", cache_bytes=1 << 20)
    assert np.array_equal(read_crop(cached, (0, 0, 0), (16, 32, 32)), data[:16])  # the chunks before it read
    with pytest.raises(InputError, match=r"v\.h5\[predictions\] at \[15, 0, 0\]\.\.\[32, 32, 32\] failed .*\[16, 0, 0\] does not decompress"):
        read_crop(cached, (15, 0, 0), (17, 32, 32))
    import connected_components_explore  # a stage that writes while it reads names the read, not a write, as what failed
    with pytest.raises(InputError, match=r"reading .*v\.h5\[predictions\] at .* failed .*the file is damaged or unreadable"):
        connected_components_explore.main(["--predictions", str(tmp_path / "v.h5"), "--out_dir", str(tmp_path / "blobs"),
                                           "--threshold", "0.01"])


def test_threads_decompress_the_chunks_of_one_box_side_by_side():
    started = {0: threading.Event(), 1: threading.Event()}  # by the chunk's index along x

    def read_chunks(indices):
        assert len(indices) == 1, "a thread took more than one chunk at a time"
        started[indices[0][2]].set()
        assert started[1 - indices[0][2]].wait(120), "one chunk waited for the other"  # both under way at once (never near 120 s)
        return {index: np.full((2, 2, 2), index[2], np.uint8) for index in indices}

    cache = ChunkCache((2, 2, 4), (2, 2, 2), np.uint8, 1 << 20, read_chunks)
    with ThreadPoolExecutor(2) as pool:
        boxes = [pool.submit(cache.read, [(0, 2), (0, 2), (0, 4)]) for _ in range(2)]
        expected = np.repeat(np.array([0, 1], np.uint8), 2)[None, None].repeat(2, 0).repeat(2, 1)
        assert all(np.array_equal(box.result(), expected) for box in boxes)
