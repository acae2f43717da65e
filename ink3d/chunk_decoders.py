"""A stored chunk's bytes decoded outside HDF5 and zarr: by numcodecs, which decompresses without the GIL (HDF5 runs
its filters one call at a time in a process), with none of zarr's per-chunk machinery (see ink3d.volume_readers)."""

import functools
import zlib

import h5py
import hdf5plugin
import numcodecs
import numcodecs.zstd
import numpy as np
import zarr


def read_raw_chunk(dataset: h5py.Dataset, origin: tuple[int, ...], decoders):
    """The bytes of the stored chunk at `origin`, read as stored and decoded here by `decoders` (one per filter of the
    dataset, see chunk_decoders), last to first, but for the filters HDF5 skipped on this chunk."""
    skipped, data = dataset.id.read_direct_chunk(origin)
    for position in range(len(decoders) - 1, -1, -1):
        if not skipped & (1 << position):  # a set bit: HDF5 skipped that filter on this chunk
            data = decoders[position](data)
    return data


def chunk_decoders(dataset: h5py.Dataset) -> list | None:
    """Per filter of an HDF5 dataset, in the order HDF5 applies them, a function that undoes it on a chunk's bytes;
    None when some filter is not one undone here (blosc with a compressor numcodecs has, deflate, shuffle)."""
    plist = dataset.id.get_create_plist()
    decoders = []
    for position in range(plist.get_nfilters()):
        code, _, options, _ = plist.get_filter(position)
        if code == hdf5plugin.BLOSC_ID and blosc_codec(options) is not None:
            decoders.append(numcodecs.blosc.decompress)  # without the GIL off the main thread
        elif code == h5py.h5z.FILTER_DEFLATE:
            decoders.append(zlib.decompress)
        elif code == h5py.h5z.FILTER_SHUFFLE:
            decoders.append(functools.partial(unshuffle, itemsize=dataset.dtype.itemsize))
        else:
            return None
    return decoders


def blosc_codec(options) -> numcodecs.Blosc | None:
    """The numcodecs Blosc of an HDF5 blosc filter's options; None where numcodecs lacks its compressor."""
    blosc = hdf5plugin.from_filter_options(hdf5plugin.BLOSC_ID, options)
    if blosc.cname not in numcodecs.blosc.list_compressors():
        return None
    return numcodecs.Blosc(cname=blosc.cname, clevel=blosc.clevel, shuffle=blosc.shuffle)


def unshuffle(data, itemsize: int):
    """Undo HDF5's shuffle filter: it stores the first bytes of all elements, then the second bytes, ...; the
    bytes after the last whole element stay as they are."""
    if itemsize == 1:
        return data
    shuffled = np.frombuffer(data, np.uint8)
    whole = len(shuffled) // itemsize * itemsize
    out = np.empty_like(shuffled)
    out[:whole].reshape(-1, itemsize)[:] = shuffled[:whole].reshape(itemsize, -1).T
    out[whole:] = shuffled[whole:]
    return out


ZARR_V3_DECODERS = {zarr.codecs.BloscCodec: numcodecs.blosc.decompress, zarr.codecs.ZstdCodec: numcodecs.zstd.decompress,
                    zarr.codecs.GzipCodec: numcodecs.GZip().decode}


def stored_chunk_decoder(array: zarr.Array) -> tuple | None:
    """How a chunk file of a zarr array is read without zarr: (decode its bytes, the dtype they hold, the fill
    value); None unless the chunks are stored whole through one compressor numcodecs decodes (zarr v2: no filters,
    C order; v3: bytes, then blosc, zstd or gzip: not sharded)."""
    metadata = array.metadata
    fill = 0 if metadata.fill_value is None else metadata.fill_value
    if metadata.zarr_format == 2:
        if metadata.filters or metadata.order != "C":
            return None
        return (_as_stored if metadata.compressor is None else metadata.compressor.decode), metadata.dtype.to_native_dtype(), fill
    serializer, *compressors = metadata.codecs
    if not isinstance(serializer, zarr.codecs.BytesCodec) or len(compressors) > 1:
        return None
    dtype = metadata.data_type.to_native_dtype()
    if serializer.endian is not None:
        dtype = dtype.newbyteorder("<" if serializer.endian.value == "little" else ">")
    decode = ZARR_V3_DECODERS.get(type(compressors[0])) if compressors else _as_stored
    return None if decode is None else (decode, dtype, fill)


def _as_stored(data: bytes) -> bytes:
    return data
