"""Small volumes the volume tests read: an HDF5 scan dataset and an OME-Zarr 0.4 group."""

import h5py
import numpy as np
import pytest
import zarr

from ink3d.volume import create_volume


@pytest.fixture
def dataset(tmp_path):
    data = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7)
    with h5py.File(tmp_path / "v.h5", "w") as file:
        create_volume(file, "scan_volume", data.shape, data.dtype, chunk=4)[:] = data
    file = h5py.File(tmp_path / "v.h5", "r")
    yield data, file["scan_volume"]
    file.close()


def ome_v04(path, values, axes=("z", "y", "x"), filters=None):
    """An OME-Zarr 0.4 group (zarr v2), as the scroll data server publishes volumes."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=values.shape, chunks=(4, 4, 4), dtype=values.dtype, filters=filters)[:] = values
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in axes], "datasets": [{"path": "0"}]}]
    return path
