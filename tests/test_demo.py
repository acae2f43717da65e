import csv
import json
import re

import cv2
import h5py
import numpy as np

import demo
from ink3d import volume
from models import load_model


def test_demo_end_to_end_with_reduced_settings(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--out_dir", str(out), "--depth", "32", "--patch", "32", "--f_maps", "4", "--num_levels", "2", "--max_steps", "4",
            "--device", "cpu", "--tta", "false", "--summary_copy", str(tmp_path / "docs" / "summary.png")]  # TTA: 8x inference
    model_f05, baseline_f05 = demo.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    held_out = "20231022170901"
    assert re.fullmatch(rf"held-out segment {held_out}: F0\.5 model=\d\.\d{{3}} threshold-baseline=\d\.\d{{3}}", lines[-1])
    assert 0 <= model_f05 <= 1 and 0 < baseline_f05 <= 1
    assert lines[-3].startswith("3D voxel F0.5 (true ink of the whole scroll): model=")
    results = json.loads((out / "results.json").read_text())
    assert re.fullmatch(r"held-out segment: predicted ink peaks at a median depth of [+-]\d+\.\d\d voxels along the normal "
                        r"\(the scroll's ink lies at \+0\.00\)", lines[-4]) or \
        (lines[-4] == "held-out segment: no predicted ink peak for a depth" and results["depth"]["pixels"] == 0)
    assert results["held_out_f05"] == model_f05 and results["true_depth"] == 0 and results["forms"]["ink_depth"] == "learned"
    assert re.fullmatch(r"largest [1-9]\d* blobs of the gallery: \d+% of their voxels are true ink", lines[-2]) or \
        lines[-2] == "no blob of the gallery's size range: no true-ink share"
    whole = json.loads((out / "score_3d.json").read_text())
    assert f"model={whole['f05']:.3f} scan-threshold={whole['scan_f05']:.3f}" in lines[-3]
    assert whole["voxels"] == 32 * 256 * 256 and json.loads((out / "score_3d_held_out.json").read_text())["voxels"] < whole["voxels"]

    with h5py.File(out / "scan.h5") as file:
        scan = file[volume.SCAN]
        assert scan.shape == (32, 256, 256) and scan.dtype == np.uint8 and scan.attrs["complete"]
    for split in ("train", "valid"):
        with h5py.File(out / f"labels_{split}.h5") as file:
            assert file[volume.INK_COUNT][:].any() and file[volume.INK_SUM].dtype == np.float32
        coords = np.load(out / f"coords_{split}.npy")
        assert coords.dtype == np.int32 and coords.shape[1] == 3 and len(coords) > 0 and not (coords % 32).any()
    assert load_model(out / "train" / "best.pth").args.f_maps == 4
    with h5py.File(out / "predictions.h5") as file:
        predictions = file[volume.PREDICTIONS]
        assert predictions.shape == (32, 256, 256) and predictions.dtype == np.uint8 and predictions.attrs["complete"]
    inference_config = json.loads((out / "predictions.h5.config.json").read_text())
    assert inference_config["tta"] is False and inference_config["patch"] == 2 * 32  # the demo's settings, passed on
    label = cv2.imread(str(out / "scroll" / "labels" / f"{held_out}_inklabels.png"), cv2.IMREAD_GRAYSCALE)
    for name in ("prediction", "scan"):
        assert cv2.imread(str(out / "flat" / f"{held_out}_{name}.png"), cv2.IMREAD_GRAYSCALE).shape == label.shape
    with open(out / "blobs" / "blobs.csv") as file:
        assert next(csv.reader(file))[:2] == ["id", "voxels"]
    assert "<html>" in (out / "blobs" / "index.html").read_text()
    summary = cv2.imread(str(out / "summary.png"))
    assert summary is not None and summary.shape[1] > 3 * label.shape[1]
    assert (tmp_path / "docs" / "summary.png").read_bytes() == (out / "summary.png").read_bytes()

    demo.main(argv)  # a re-run reuses every stage
    table = capsys.readouterr().out
    assert table.count("(reused)") == 12

    (out / "keep.txt").write_text("not the demo's")
    demo.main(argv + ["--fresh", "true", "--prediction_form", "ome-zarr"])  # every stage again; other files in out_dir stay
    assert "(reused)" not in capsys.readouterr().out
    assert (out / "keep.txt").read_text() == "not the demo's"
    assert not (out / "predictions.h5").exists() and (out / "predictions.zarr" / "meta.json").exists()
    assert json.loads((out / "score_3d.json").read_text()) == whole  # the same predictions, in the other form
    assert json.loads((out / "results.json").read_text())["held_out_f05"] == model_f05


def test_the_colour_bar_runs_from_probability_1_to_0_in_the_predictions_colours():
    bar = demo.colour_bar(101)
    colours = cv2.applyColorMap(np.array([[255], [128], [0]], np.uint8), demo.PROBABILITY_COLOURS)[:, 0]
    assert np.array_equal(bar[0, :16], np.tile(colours[0], (16, 1))) and np.array_equal(bar[-1, :16], np.tile(colours[2], (16, 1)))
    assert np.array_equal(bar[50, 0], colours[1]) and bar[:, 20:].any()  # the middle, and the values written beside
