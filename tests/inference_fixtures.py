"""The inference tests' scan, model and whole-scan runs (fixtures made once per session: conftest.py holds them for
every module that tests inference), and the run they compare."""

import h5py
import numpy as np
import pytest
import torch

import inference
from ink3d import volume
from models import UNet3D, save_checkpoint

PATCH = 16


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    model = UNet3D(f_maps=4, num_levels=2)
    with torch.no_grad():  # a livelier model than the initial one, so blending differences would show
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("model") / "model.pth"
    save_checkpoint(path, model, model.args, {}, step=0)
    return path


def write_scan(path, values):
    with h5py.File(path, "w") as file:
        volume.create_volume(file, volume.SCAN, values.shape, np.uint8, chunk=16)[:] = values
    return path


@pytest.fixture(scope="session")
def scan(tmp_path_factory):
    values = np.random.default_rng(0).integers(0, 256, (40, 35, 52)).astype(np.uint8)
    return write_scan(tmp_path_factory.mktemp("scan") / "scan.h5", values), values


def infer(scan_path, model_path, out, *extra):
    inference.main(["--volume", str(scan_path), "--checkpoint", str(model_path), "--out", str(out), "--patch", str(PATCH),
                    "--batch_size", "3", "--macro_block", "16", "--air_level", "none", "--channels_last", "false", *extra])
    with h5py.File(out) as file:
        return file[volume.PREDICTIONS][:], dict(file[volume.PREDICTIONS].attrs)


@pytest.fixture(scope="session")
def full_runs(scan, model_path, tmp_path_factory):
    """The whole scan's prediction in a single pass (one macro-block), per --channels_last, made once for the tests
    that compare against it (blocks of any size give the same: test_macro_blocks_equal_a_single_pass)."""
    made = {}

    def full(channels_last: str) -> np.ndarray:
        if channels_last not in made:
            out = tmp_path_factory.mktemp("full") / "full.h5"
            made[channels_last] = infer(scan[0], model_path, out, "--channels_last", channels_last, "--macro_block", "64")[0]
        return made[channels_last]
    return full
