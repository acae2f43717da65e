import itertools
import json
import re
import warnings

import h5py
import numpy as np
import pytest
import torch

import inference
from ink3d import InputError, blocks, volume
from ink3d.intensity import air_level, scan_histogram
from ink3d.pyramid import write_ome_zarr
from ink3d import sliding_window
from ink3d.sliding_window import importance_map, plan_blocks, window_starts
from models import UNet3D, save_checkpoint
from inference_fixtures import PATCH, infer, write_scan

monai_inferers = pytest.importorskip("monai.inferers", reason="MONAI is the reference sliding-window implementation")
from monai.data.utils import compute_importance_map  # noqa: E402


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_importance_map_equals_monai(blend):
    ours = importance_map(24, blend)
    theirs = compute_importance_map((24, 24, 24), mode=blend, sigma_scale=0.125).numpy()
    assert np.allclose(ours, theirs, rtol=1e-6, atol=0) and ours.min() >= 1e-3


@pytest.mark.parametrize("size, expected", [(100, [0, 16, 32, 48, 64, 68]), (96, [0, 16, 32, 48, 64]), (32, [0]), (20, [0])])
def test_window_grid(size, expected):
    assert window_starts(0, size, 32, 16) == expected


def test_blocks_cover_the_region_once_and_read_every_window_they_need():
    region = (slice(3, 40), slice(0, 35), slice(10, 52))
    blocks = plan_blocks(region, region, 16, 8, 16)
    hits = np.zeros((40, 35, 52), int)
    for block in blocks:
        hits[block.output] += 1
        for window in block.windows:  # every window lies inside the block's input box
            assert np.all(np.array(window) >= block.input_origin)
            assert np.all(np.array(window) + 16 <= block.input_origin + block.input_shape)
    assert np.all(hits[region] == 1) and hits.sum() == np.prod([37, 35, 42])


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_parity_with_monai_sliding_window_inference(scan, model_path, tmp_path, blend):
    scan_path, values = scan
    ours, attrs = infer(scan_path, model_path, tmp_path / "pred.h5", "--blend", blend)
    model = torch.load(model_path, weights_only=True)
    net = UNet3D(**model["model_args"]).eval()
    net.load_state_dict(model["model"])
    x = torch.from_numpy(values)[None, None].float() / 255
    with torch.no_grad():
        theirs = monai_inferers.sliding_window_inference(x, (PATCH,) * 3, 3, lambda w: torch.sigmoid(net(w)), overlap=0.5,
                                                         mode=blend, sigma_scale=0.125)
    theirs = np.rint(theirs[0, 0].numpy() * 255)
    assert np.abs(ours.astype(int) - theirs).max() <= 2
    assert attrs["blend"] == blend and attrs["patch"] == PATCH and attrs["complete"]


def test_the_checkpoints_input_normalization_and_ema_weights_are_applied(scan, model_path, tmp_path):
    scan_path, values = scan
    state = torch.load(model_path, weights_only=True)
    net = UNet3D(**state["model_args"]).eval()
    net.load_state_dict(state["model"])
    raw = {k: v.clone() for k, v in state["model"].items()}
    ema = {k: v * 0.9 for k, v in state["model"].items()}  # other weights, stored as the moving average
    save_checkpoint(tmp_path / "windowed.pth", net, state["model_args"], {"normalization": [50.0, 150.0]}, step=1, ema=ema)
    ours, attrs = infer(scan_path, tmp_path / "windowed.pth", tmp_path / "pred.h5")
    raw_ours, _ = infer(scan_path, tmp_path / "windowed.pth", tmp_path / "raw.h5", "--weights", "raw")
    x = torch.from_numpy(values)[None, None].float()
    for weights, result in ((ema, ours), (raw, raw_ours)):
        net.load_state_dict(weights)
        with torch.no_grad():
            theirs = monai_inferers.sliding_window_inference(((x - 50) / 100).clamp(0, 1), (PATCH,) * 3, 3,
                                                             lambda w: torch.sigmoid(net(w)), overlap=0.5, mode="gaussian", sigma_scale=0.125)
        assert np.abs(result.astype(int) - np.rint(theirs[0, 0].numpy() * 255)).max() <= 2
    assert np.abs(ours.astype(int) - raw_ours).max() > 10
    assert json.loads(attrs["plan"])["normalization"] == [50.0, 150.0]


@pytest.mark.filterwarnings("ignore:--batch_size .* batches run")  # small blocks on purpose: their batches run part empty
@pytest.mark.parametrize("channels_last", ["false", "true"])  # true: the CPU default, whose kernels depend on the batch size
def test_macro_blocks_equal_a_single_pass(scan, model_path, full_runs, tmp_path, channels_last):
    scan_path, _ = scan
    blocks, _ = infer(scan_path, model_path, tmp_path / "blocks.h5", "--macro_block", "8", "--channels_last", channels_last)
    assert np.array_equal(blocks, full_runs(channels_last))


def test_weights_summed_a_few_planes_at_a_time_equal_one_sum(scan, model_path, full_runs, tmp_path, monkeypatch):
    scan_path, _ = scan
    whole = full_runs("false")
    monkeypatch.setattr(sliding_window, "SLAB_VOXELS", 35 * 52 * 3)  # 3 planes of the one 40 x 35 x 52 block
    slabs, _ = infer(scan_path, model_path, tmp_path / "slabs.h5", "--macro_block", "64")
    assert np.array_equal(whole, slabs)


@pytest.mark.parametrize("roi, channels_last", [("8:32,16:35,8:40", "false"), ("5:29,3:30,7:45", "false"),
                                                ("13:14,0:35,51:52", "false"), ("5:29,3:30,7:45", "true"), ("13:14,0:35,51:52", "true")])
def test_an_roi_is_a_crop_of_the_full_run(scan, model_path, full_runs, tmp_path, roi, channels_last):
    scan_path, _ = scan
    full = full_runs(channels_last)
    result, attrs = infer(scan_path, model_path, tmp_path / "roi.h5", "--roi", roi, "--channels_last", channels_last)
    region = blocks.parse_roi(roi, full.shape)
    assert np.array_equal(result[region], full[region])  # the window grid is the volume's, wherever the region lies
    outside = np.ones(result.shape, bool)
    outside[region] = False
    assert not result[outside].any()
    assert json.loads(attrs["roi"]) == [[s.start, s.stop] for s in region]


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "-1"], "--batch_size -1: must be > 0"),
    (["--batch_size", "0"], "--batch_size 0: must be > 0"),
    (["--macro_block", "0"], "--macro_block 0: must be > 0"),
    (["--overlap", "1"], "--overlap 1.0: must be in \\[0, 1\\)"),
    (["--air_level", "-5"], "--air_level '-5': choose auto, otsu, none or a number in 0..255"),
    (["--air_level", "otsu"], "--air_level 'otsu': expected a number in 0..255, auto, none"),
])
def test_bad_settings_are_refused_before_any_output(scan, model_path, tmp_path, flags, message):
    scan_path, _ = scan
    with pytest.raises(InputError, match=message):
        infer(scan_path, model_path, tmp_path / "pred.h5", *flags)
    assert list(tmp_path.iterdir()) == []


def test_an_unfinished_scan_volume_is_refused(model_path, tmp_path):
    scan_path = write_scan(tmp_path / "scan.h5", np.ones((16, 16, 16), np.uint8))
    with h5py.File(scan_path, "a") as file:
        file[volume.SCAN].attrs["complete"] = False  # as volume_to_hdf leaves it until its last slab
    with pytest.raises(InputError, match="scan.h5: dataset 'scan_volume' is not complete"):
        infer(scan_path, model_path, tmp_path / "pred.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.h5"]


def test_an_ome_zarr_scan_predicts_what_its_hdf5_copy_does(scan, model_path, full_runs, tmp_path):
    scan_path, values = scan
    write_ome_zarr(tmp_path / "scan.zarr", values, levels=2, chunk=16)
    from_hdf5 = full_runs("false")
    from_zarr, _ = infer(tmp_path / "scan.zarr", model_path, tmp_path / "b.h5")
    assert np.array_equal(from_zarr, from_hdf5)
    coarse, attrs = infer(tmp_path / "scan.zarr", model_path, tmp_path / "c.h5", "--level", "1")
    assert coarse.shape == (20, 18, 26) and json.loads(attrs["volume_shape"]) == [20, 18, 26]


@pytest.mark.parametrize("value, device, expected", [("auto", "cuda", True), ("auto", "cpu", False), ("true", "cpu", True),
                                                     ("False", "cuda", False)])
def test_compile_switch_takes_the_measured_best_per_device(value, device, expected):
    assert inference.switch(value, "--compile", on_cuda=True, on_cpu=False, device=torch.device(device)) is expected


def test_a_bad_switch_is_named():
    with pytest.raises(InputError, match="--channels_last 'sometimes': choose auto, true or false"):
        inference.switch("sometimes", "--channels_last", on_cuda=False, on_cpu=True, device=torch.device("cpu"))


def test_a_run_reports_where_its_time_went(scan, model_path, tmp_path, capsys):
    scan_path, _ = scan
    infer(scan_path, model_path, tmp_path / "pred.h5")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    busy, total, read_wait, write_wait = (float(v) for v in re.fullmatch(
        r"model busy (\d+)% of ([\d.]+) s; waited ([\d.]+) s for reading, ([\d.]+) s for writing", line).groups())
    assert 0 < busy <= 100 and read_wait + write_wait <= total * (1 - busy / 100) + 0.1


def test_air_is_not_run_through_the_model(model_path, tmp_path, monkeypatch):
    values = np.zeros((32, 32, 48), np.uint8)
    values[:, :, 32:] = np.random.default_rng(1).integers(1, 256, (32, 32, 16))
    scan_path = write_scan(tmp_path / "scan.h5", values)
    batches = []
    original = inference.WindowPredictor._batches

    def recorded(self, cells, origin, placed=None):
        for batch in original(self, cells, origin, placed):
            batches.append(batch)
            yield batch

    monkeypatch.setattr(inference.WindowPredictor, "_batches", recorded)
    pred, _ = infer(scan_path, model_path, tmp_path / "pred.h5", "--air_level", "0", "--macro_block", "64")
    run = [index for batch in batches for index in batch if index is not None]
    assert len(run) == len(set(run)) == 3 * 3 * 2  # windows with x start 24 or 32 touch the non-air part; x start 0..16 are skipped
    assert not pred[:, :, :8].any()  # covered only by skipped windows


def test_tta_equals_the_mean_of_flipped_passes(model_path, tmp_path):
    values = np.random.default_rng(2).integers(0, 256, (32, 24, 40)).astype(np.uint8)  # (size - 16) % 8 == 0: flips keep the grid
    passes = []
    for axes in [axes for count in range(4) for axes in itertools.combinations(range(3), count)]:  # all 8 flips
        flipped = np.flip(values, axes) if axes else values
        pred, _ = infer(write_scan(tmp_path / f"s{axes}.h5", np.ascontiguousarray(flipped)), model_path, tmp_path / f"p{axes}.h5",
                         "--channels_last", "false")
        passes.append(np.flip(pred, axes).astype(float) if axes else pred.astype(float))
    assert len(passes) == 8
    tta, _ = infer(write_scan(tmp_path / "s.h5", values), model_path, tmp_path / "tta.h5", "--tta", "true")
    assert np.abs(tta - np.mean(passes, axis=0)).max() <= 1  # each pass is rounded to uint8 once more
    assert np.abs(tta - passes[0]).max() > 1  # and TTA is not just the plain pass


def test_published_checkpoint_form(scan, model_path, tmp_path):
    scan_path, _ = scan
    state = torch.load(model_path, weights_only=True)["model"]
    torch.save({"model." + key: value for key, value in state.items()}, tmp_path / "published.pth")
    ours, _ = infer(scan_path, model_path, tmp_path / "a.h5", "--roi", "0:16,0:16,0:16")
    published, _ = infer(scan_path, tmp_path / "published.pth", tmp_path / "b.h5", "--roi", "0:16,0:16,0:16")
    assert np.array_equal(ours, published)


def test_a_uint16_hdf5_scan_reads_as_volume_to_hdf_converts_it_and_a_float_scan_is_refused(scan, model_path, tmp_path):
    scan_path, values = scan
    wide = (values.astype(np.uint16) * 257 + np.random.default_rng(3).integers(-128, 128, values.shape)).clip(0, 65535).astype(np.uint16)
    with h5py.File(tmp_path / "wide.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, wide.shape, np.uint16, chunk=16)[:] = wide
    file, dataset = volume.open_dataset(tmp_path / "wide.h5", volume.SCAN)
    with file:
        assert dataset.dtype == np.uint8 and np.array_equal(dataset[3:9, :, 7:30], volume.UINT16_TO_UINT8[wide[3:9, :, 7:30]])
    converted, _ = infer(write_scan(tmp_path / "narrow.h5", volume.UINT16_TO_UINT8[wide]), model_path, tmp_path / "a.h5")
    direct, _ = infer(tmp_path / "wide.h5", model_path, tmp_path / "b.h5")
    assert np.array_equal(direct, converted)
    with h5py.File(tmp_path / "float.h5", "w") as file:
        volume.create_volume(file, volume.SCAN, values.shape, np.float32, chunk=16)[:] = values / 255
    with pytest.raises(InputError, match="float.h5: 'scan_volume' holds float32; scans must be uint8 or uint16"):
        infer(tmp_path / "float.h5", model_path, tmp_path / "c.h5")
    assert not (tmp_path / "c.h5").exists()


def test_the_window_defaults_to_the_checkpoints_training_patch(scan, model_path, tmp_path, capsys):
    """Without --patch, inference windows are the patch the model was trained with, as a run with --patch gives."""
    scan_path, _ = scan
    trained = tmp_path / "trained.pth"
    state = torch.load(model_path, weights_only=True)
    state["config"] = {"patch": PATCH}
    torch.save(state, trained)
    argv = ["--volume", str(scan_path), "--checkpoint", str(trained), "--batch_size", "3", "--macro_block", "16",
            "--air_level", "none", "--channels_last", "false"]
    inference.main([*argv, "--out", str(tmp_path / "default.h5")])
    output = capsys.readouterr().out
    assert f"windows of {PATCH} voxels: the checkpoint's training patch (--patch)" in output
    assert "--air_level none: every window is predicted" in output
    inference.main([*argv, "--out", str(tmp_path / "given.h5"), "--patch", str(PATCH)])
    with h5py.File(tmp_path / "default.h5") as default, h5py.File(tmp_path / "given.h5") as given:
        assert default[volume.PREDICTIONS].attrs["patch"] == PATCH
        assert np.array_equal(default[volume.PREDICTIONS][:], given[volume.PREDICTIONS][:])


def test_a_checkpoint_trained_on_another_scans_air_level_is_warned_of(scan, model_path, tmp_path):
    """By default windows are skipped by the air level the model was trained with; where the scan's own differs, the
    run says so and names the flag that skips by the scan's."""
    scan_path, _ = scan
    file, dataset = volume.open_dataset(scan_path, volume.SCAN)
    with file:
        own = air_level(scan_histogram(dataset))
    state = torch.load(model_path, weights_only=True)
    argv = ["--volume", str(scan_path), "--patch", str(PATCH), "--batch_size", "3", "--macro_block", "16", "--roi", "0:8,0:8,0:8"]
    for trained, flags, warned in ((own + 30, [], True), (own + 8, [], False), (own + 30, ["--air_level", str(own + 30)], False)):
        state["config"] = {"air_level_value": trained}
        torch.save(state, tmp_path / "trained.pth")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inference.main([*argv, *flags, "--checkpoint", str(tmp_path / "trained.pth"), "--out", str(tmp_path / f"{trained}{flags}.h5")])
        messages = [str(warning.message) for warning in caught if "air level" in str(warning.message)]
        expected = [f"the checkpoint was trained on a scan whose air level was {trained}; this scan's own is {own}: windows at or "
                    f"below {trained} are skipped as air (--air_level {own} skips by this scan's)"]
        assert messages == (expected if warned else []), (trained, flags)
