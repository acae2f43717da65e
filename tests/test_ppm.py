import numpy as np
import pytest

from ink3d import InputError
from ink3d.ppm import positions_along_normals, read_ppm, valid_mask, write_ppm


def test_round_trip_is_exact(tmp_path):
    data = np.random.default_rng(0).normal(size=(13, 17, 6))
    write_ppm(tmp_path / "a.ppm", data, rows_per_write=4)
    ppm = read_ppm(tmp_path / "a.ppm")
    assert (ppm.height, ppm.width) == (13, 17)
    assert np.array_equal(ppm.data, data)
    assert isinstance(ppm.data, np.memmap)


def _write_raw(path, header: str, body_values: int):
    path.write_bytes(header.encode() + np.zeros(body_values, "<f8").tobytes())
    return path


GOOD = "width: 3\nheight: 2\ndim: 6\nordered: true\ntype: double\nversion: 1\n<>\n"


@pytest.mark.parametrize(
    "header, values, message",
    [
        ("width: 3\nheight: 2\ndim: 6\ntype: double\n", 36, "no '<>'"),
        ("height: 2\ndim: 6\ntype: double\n<>\n", 36, "no 'width'"),
        ("width: 3\ndim: 6\ntype: double\n<>\n", 36, "no 'height'"),
        ("width: 3\nheight: 2\ndim: 3\ntype: double\n<>\n", 36, "dim is 3"),
        ("width: 3\nheight: 2\ndim: 6\ntype: float\n<>\n", 36, "type is float"),
        (GOOD, 35, "truncated"),
        (GOOD, 37, "too long"),
    ],
)
def test_malformed_files_raise_a_clear_error(tmp_path, header, values, message):
    path = _write_raw(tmp_path / "bad.ppm", header, values)
    with pytest.raises(InputError, match=message) as error:
        read_ppm(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("version", ["1", "1.0"])
def test_versions_1_and_1_0_are_accepted(tmp_path, version):
    path = _write_raw(tmp_path / "v.ppm", GOOD.replace("version: 1", f"version: {version}"), 36)
    assert read_ppm(path).data.shape == (2, 3, 6)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_ppm(tmp_path / "nothing.ppm")


def test_valid_mask_and_positions_along_normals():
    data = np.zeros((1, 2, 6))
    data[0, 0] = [10.0, 20.0, 30.0, 0.0, 0.6, 0.8]  # x, y, z, nx, ny, nz
    assert valid_mask(data).tolist() == [[True, False]]
    positions = positions_along_normals(data, [-1.0, 0.0, 2.0])
    assert positions.shape == (1, 2, 3, 3)
    expected = [[29.2, 19.4, 10.0], [30.0, 20.0, 10.0], [31.6, 21.2, 10.0]]  # zyx
    assert np.allclose(positions[0, 0], expected)


def test_valid_mask_is_finite_and_not_all_zero_for_every_kind_of_value():
    kinds = [0.0, -0.0, 1.0, -2.5, 5e-324, 1e308, np.inf, -np.inf, np.nan]
    rng = np.random.default_rng(0)
    data = rng.choice(kinds, size=(50, 40, 6), p=[0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.03, 0.03, 0.04])
    data[:5] = 0.0  # whole rows off the surface
    expected = [[any(v != 0 for v in pixel) and all(np.isfinite(v) for v in pixel) for pixel in row] for row in data]
    assert valid_mask(data).tolist() == expected
    assert valid_mask(data[3, 7]) == expected[3][7] and valid_mask(data[20, 4]) == expected[20][4]  # one pixel
