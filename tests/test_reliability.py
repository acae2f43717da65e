"""Failures every writing stage must meet the same way: a named error, nothing left behind."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import all_labels_to_hdf
import connected_components_explore
import export_slices
import inference
import make_synthetic_scroll
import pred_find_coords
import score_3d
import volume_to_hdf
from conftest import ROOT
from stage_process import StageProcess, another_run_writing, run_stage
from ink3d import InputError, volume
from ink3d.files import lock_path

# each stage with its output (under `out`) and dummy inputs: outputs are checked before inputs are read
STAGES = {
    "volume_to_hdf": (volume_to_hdf, lambda out: ["--tiff_dir", "missing", "--out", str(out / "scan.h5")]),
    "inference": (inference, lambda out: ["--volume", "missing.h5", "--checkpoint", "missing.pth", "--out", str(out / "p.h5")]),
    "all_labels_to_hdf": (all_labels_to_hdf, lambda out: ["--out_train", str(out / "t.h5"), "--out_valid", str(out / "v.h5")]),
    "pred_find_coords": (pred_find_coords, lambda out: ["--labels", "missing.h5", "--out", str(out / "c.npy")]),
    "score_3d": (score_3d, lambda out: ["--predictions", "missing.h5", "--out", str(out / "s.json")]),
    "connected_components_explore": (connected_components_explore, lambda out: ["--predictions", "missing.h5", "--out_dir", str(out)]),
    "export_slices": (export_slices, lambda out: ["--volume", "missing.h5", "--out_dir", str(out)]),
    "make_synthetic_scroll": (make_synthetic_scroll, lambda out: ["--out_dir", str(out)]),
}


@pytest.mark.parametrize("stage", STAGES)
def test_an_output_folder_that_cannot_be_written_is_named_first(tmp_path, stage):
    module, argv = STAGES[stage]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(InputError, match="a_file.*cannot create its folder"):
        module.main(argv(blocker / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def _inputs(root):
    """Stand-ins for a run's inputs (the check comes before any input is read): a scan file, a store, a TIFF stack,
    a label file, and links to them."""
    (root / "scan.h5").write_bytes(b"a scan")
    (root / "labels.h5").write_bytes(b"labels")
    (root / "vol.zarr" / "0").mkdir(parents=True)
    (root / "vol.zarr" / "0" / "zarr.json").write_text("{}")
    (root / "volume").mkdir()
    (root / "volume" / "00000.tif").write_bytes(b"slice 0")
    (root / "link.h5").symlink_to(root / "scan.h5")
    (root / "link.zarr").symlink_to(root / "vol.zarr")
    os.link(root / "scan.h5", root / "hard.h5")


def _tree(root) -> dict:
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None for path in sorted(root.rglob("*"))}


def _inference(scan: str, out: str):
    return lambda root: ["--volume", f"{root}/{scan}", "--checkpoint", "c.pth", "--out", f"{root}/{out}"]


OUTPUT_IS_INPUT = {  # stage, its arguments under the test's folder r, and the message's start
    "inference into its scan": (inference, _inference("scan.h5", "scan.h5"), "--out .*scan.h5 is --volume"),
    "inference from a link to its output": (inference, _inference("link.h5", "scan.h5"), "--out .*scan.h5 is --volume .*link.h5"),
    "inference into a hard link of its scan": (inference, _inference("scan.h5", "hard.h5"), "--out .*hard.h5 is --volume"),
    "inference into its scan store": (inference, _inference("vol.zarr", "vol.zarr"), "--out .*vol.zarr is --volume"),
    "inference into a link to its scan store": (inference, _inference("vol.zarr", "link.zarr"), "--out .*link.zarr is --volume"),
    "inference into a store holding its scan": (inference, _inference("vol.zarr/0", "vol.zarr"), "--out .*vol.zarr holds --volume"),
    "a conversion into its own slice": (volume_to_hdf, lambda r: ["--tiff_dir", f"{r}/volume", "--out", f"{r}/volume/00000.tif"],
                                        "--out .*00000.tif lies inside --tiff_dir"),
    "labels into the scan": (all_labels_to_hdf, lambda r: ["--volume", f"{r}/scan.h5", "--out_train", f"{r}/scan.h5", "--out_valid", f"{r}/v.h5"],
                             "--out_train .*scan.h5 is --volume"),
    "labels updating the scan": (all_labels_to_hdf, lambda r: ["--volume", f"{r}/scan.h5", "--out_train", f"{r}/t.h5", "--out_valid", f"{r}/scan.h5",
                                                               "--update", "true"], "--out_valid .*scan.h5 is --volume"),
    "coords into the labels": (pred_find_coords, lambda r: ["--labels", f"{r}/labels.h5", "--out", f"{r}/labels.h5"], "--out .*labels.h5 is --labels"),
    "scores into the predictions": (score_3d, lambda r: ["--predictions", f"{r}/scan.h5", "--out", f"{r}/link.h5"], "--out .*link.h5 is --predictions"),
    "slices into the store": (export_slices, lambda r: ["--volume", f"{r}/vol.zarr", "--out_dir", f"{r}/vol.zarr/slices"],
                              "--out_dir .*slices lies inside --volume"),
}


@pytest.mark.parametrize("case", OUTPUT_IS_INPUT)
def test_an_output_that_is_an_input_is_refused_and_changes_nothing(tmp_path, case):
    module, argv, message = OUTPUT_IS_INPUT[case]
    _inputs(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(InputError, match=message + ".*an input of this run: writing it would destroy the input"):
        module.main([*argv(tmp_path), "--overwrite", "true"])
    assert _tree(tmp_path) == before


def test_a_label_file_without_ink_sum_is_named(tmp_path):
    with h5py.File(tmp_path / "labels.h5", "w") as file:
        volume.create_volume(file, volume.INK_COUNT, (8, 8, 8), np.uint16)
    with pytest.raises(InputError, match="labels.h5: no dataset 'ink_sum' \\(datasets: ink_count\\)"):
        pred_find_coords.main(["--labels", str(tmp_path / "labels.h5"), "--out", str(tmp_path / "c.npy")])
    assert not (tmp_path / "c.npy").exists()


# --- one writer per output ---

LOCKED = {  # the output each stage of STAGES locks first
    "volume_to_hdf": "scan.h5", "inference": "p.h5", "all_labels_to_hdf": "v.h5", "pred_find_coords": "c.npy",
    "score_3d": "s.json", "connected_components_explore": "out", "export_slices": "out", "make_synthetic_scroll": "out",
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_second_run_on_an_output_being_written_is_refused_and_changes_nothing(tmp_path, stage):
    module, argv = STAGES[stage]
    target = tmp_path / LOCKED[stage]
    folder = stage in ("connected_components_explore", "export_slices", "make_synthetic_scroll")  # writes into its out_dir
    if folder:
        target.mkdir()
        (target / "earlier.txt").write_text("an earlier output")
    else:
        target.write_text("an earlier output")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with another_run_writing(target):
        with pytest.raises(InputError, match=f"{target.name} is being written by another run \\(pid \\d+ on .*; lock .*{target.name}.lock\\)"):
            module.main([*argv(target if folder else tmp_path), "--overwrite", "true"])
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == sorted(before + [f"{target.name}.lock"])
    assert (target / "earlier.txt" if target.is_dir() else target).read_text() == "an earlier output"
    assert not lock_path(target).exists()  # the holder released it on its way out


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_message(pipeline, tmp_path, capsys):
    out = tmp_path / "coords.npy"
    lock_path(out).write_text("pid 4194303 on a-machine since 2026-01-01 00:00:00")  # no process holds it
    pred_find_coords.main(["--labels", str(pipeline / "labels_train.h5"), "--out", str(out), "--block", "8"])
    assert "taking over the lock of a run that ended without releasing it (pid 4194303 on a-machine" in capsys.readouterr().err
    assert out.exists() and not lock_path(out).exists()


def test_the_lock_of_a_killed_training_run_is_free_at_once_though_its_loader_workers_live_on(tmp_path):
    """kill -9 of train.py's own process (the OOM killer, a pre-empted node) while its forked data-loader workers
    live on: a retry takes the output's lock at once (a flock would live on in the workers for seconds)."""
    import signal

    from train_scene import training_scene

    from ink3d.files import output_lock
    root = training_scene(tmp_path)
    out = tmp_path / "run"
    argv = ["--volume", str(root / "scan.h5"), "--train_labels", str(root / "train.h5"), "--valid_labels", str(root / "valid.h5"),
            "--train_coords", str(root / "train.npy"), "--valid_coords", str(root / "valid.npy"), "--out_dir", str(out),
            "--patch", "16", "--f_maps", "4", "--num_levels", "2", "--batch_size", "2", "--max_steps", "100000",
            "--valid_every", "100000", "--checkpoint_every", "2", "--workers", "2", "--exclusion_radius", "0", "--device", "cpu"]
    run = StageProcess("train.py", argv)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pth").exists():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-2000:] if run.poll() is not None else "timeout"
            time.sleep(0.1)
        workers = [int(stat.name) for stat in Path("/proc").iterdir() if stat.name.isdigit() and _parent(stat) == run.pid]
        assert len(workers) >= 2
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        with output_lock(out):
            alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        assert alive, "the workers ended before the lock was tried: the test shows nothing"
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGKILL)
        run.communicate()


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_one_path_given_as_two_outputs_is_refused(pipeline, tmp_path):
    with pytest.raises(InputError, match="same.h5: given as two outputs of one run"):
        all_labels_to_hdf.main([*_labels_argv(pipeline), "--out_train", str(tmp_path / "same.h5"), "--out_valid", str(tmp_path / "same.h5")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", ["volume_to_hdf", "inference", "pred_find_coords", "score_3d"])
def test_a_folder_where_the_output_file_goes_is_refused_before_any_work(tmp_path, stage):
    module, argv = STAGES[stage]
    (tmp_path / LOCKED[stage]).mkdir()
    with pytest.raises(InputError, match=f"{LOCKED[stage]} is a folder; the output is a file"):
        module.main([*argv(tmp_path), "--overwrite", "true"])


# --- a full disk in every stage ---

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A small synthetic scroll taken through the stages that make the files the others read: scan.h5,
    labels_{train,valid}.h5, and predictions.h5 (the ground truth as uint8 probabilities)."""
    root = tmp_path_factory.mktemp("pipeline")
    make_synthetic_scroll.main(["--out_dir", str(root / "scroll"), "--depth", "24"])
    volume_to_hdf.main(["--tiff_dir", str(root / "scroll" / "volume"), "--out", str(root / "scan.h5"), "--chunk", "16"])
    all_labels_to_hdf.main([*_labels_argv(root), "--out_train", str(root / "labels_train.h5"), "--out_valid", str(root / "labels_valid.h5")])
    with h5py.File(root / "scroll" / "ground_truth.h5") as truth, h5py.File(root / "predictions.h5", "w") as file:
        ink = truth[volume.GROUND_TRUTH][:]
        volume.create_volume(file, volume.PREDICTIONS, ink.shape, np.uint8, chunk=16)[:] = np.where(ink > 0, 255, 0)
    return root


def _labels_argv(root):
    return ["--ppm_dir", str(root / "scroll" / "paths"), "--labels_dir", str(root / "scroll" / "labels"),
            "--volume", str(root / "scan.h5"), "--band", "4", "--chunk", "16"]


FULL_DISK = {  # stage script, bytes a file may grow to, arguments (root: the pipeline, out: a fresh folder), output
    "all_labels_to_hdf": ("all_labels_to_hdf.py", 60_000, lambda root, out: [*_labels_argv(root), "--out_train", str(out / "t.h5"),
                                                                            "--out_valid", str(out / "v.h5")], "t.h5"),
    "pred_find_coords": ("pred_find_coords.py", 60, lambda root, out: ["--labels", str(root / "labels_train.h5"),
                                                                       "--out", str(out / "c.npy"), "--block", "4"], "c.npy"),
    "flatten_3d --layers": ("flatten_3d.py", 20_000, lambda root, out: ["--volume", str(root / "scan.h5"), "--dataset", "scan_volume",
                                                                        "--ppm_dir", str(root / "scroll" / "paths"), "--out_dir", str(out),
                                                                        "--layers", "true"], "*.png"),
    "connected_components_explore": ("connected_components_explore.py", 2_000, lambda root, out: [
        "--predictions", str(root / "predictions.h5"), "--volume", str(root / "scan.h5"), "--out_dir", str(out), "--macro_block", "16"], "blobs.csv"),
    "export_slices jpg": ("export_slices.py", 300, lambda root, out: ["--volume", str(root / "predictions.h5"), "--out_dir", str(out),
                                                                        "--format", "jpg"], "export.json"),
    "export_slices tif": ("export_slices.py", 2_000, lambda root, out: ["--volume", str(root / "scan.h5"), "--dataset", "scan_volume",
                                                                        "--out_dir", str(out)], "export.json"),
    "score_3d": ("score_3d.py", 100, lambda root, out: ["--predictions", str(root / "predictions.h5"), "--volume", str(root / "scan.h5"),
                                                        "--ground_truth", str(root / "scroll" / "ground_truth.h5"),
                                                        "--out", str(out / "s.json")], "s.json"),
    "make_synthetic_scroll": ("make_synthetic_scroll.py", 20_000, lambda root, out: ["--out_dir", str(out), "--depth", "24"], "scroll.json"),
}


@pytest.fixture(scope="module")
def full_disk_runs(pipeline, tmp_path_factory):
    """Every stage of FULL_DISK run at once, each in its own process and folder: stage -> (its run, its folder)."""
    folders = {stage: tmp_path_factory.mktemp("full_disk") for stage in FULL_DISK}
    started = {stage: StageProcess(script, argv(pipeline, folders[stage]), file_bytes)
               for stage, (script, file_bytes, argv, _) in FULL_DISK.items()}
    runs = {}
    for stage, process in started.items():
        stdout, stderr = process.communicate()
        runs[stage] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), folders[stage])
    return runs


@pytest.mark.parametrize("stage", FULL_DISK)
def test_a_full_disk_stops_every_stage_with_a_named_error_and_no_output(full_disk_runs, stage):
    output = FULL_DISK[stage][3]
    run, tmp_path = full_disk_runs[stage]
    assert run.returncode == 2, run.stderr[-3000:]
    assert re.search(r"^error: .*writing failed \((File too large|\d+ requested and \d+ written)\)", run.stderr, re.MULTILINE), run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert "--resume" not in run.stderr  # these stages start again from nothing
    assert not list(tmp_path.glob(output)) and not list(tmp_path.glob("*.lock"))


def test_a_full_disk_in_training_is_named_and_says_how_to_resume(tmp_path):
    from train_scene import training_scene

    root = training_scene(tmp_path)
    argv = ["--volume", str(root / "scan.h5"), "--train_labels", str(root / "train.h5"), "--valid_labels", str(root / "valid.h5"),
            "--train_coords", str(root / "train.npy"), "--valid_coords", str(root / "valid.npy"), "--out_dir", str(tmp_path / "run"),
            "--patch", "16", "--f_maps", "4", "--num_levels", "2", "--batch_size", "2", "--max_steps", "4", "--valid_blocks", "1",
            "--valid_every", "2", "--checkpoint_every", "2", "--workers", "0", "--exclusion_radius", "0"]
    run = run_stage("train.py", argv, file_bytes=20_000)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert re.search(r"error: .*writing failed \(File too large\); last.pth holds the last checkpoint: free disk space and rerun "
                     r"with --resume true", run.stderr, re.MULTILINE), run.stderr[-3000:]


STAGE_SCRIPTS = ["volume_to_hdf.py", "all_labels_to_hdf.py", "pred_find_coords.py", "train.py", "inference.py", "flatten_3d.py",
                 "score_3d.py", "connected_components_explore.py", "export_slices.py", "make_synthetic_scroll.py", "demo.py"]


def test_a_ctrl_c_while_a_stage_starts_ends_in_one_line():
    """Every stage imports ink3d.quiet_start before anything else, and a Ctrl-C after it is one line, no traceback."""
    import ast

    for script in STAGE_SCRIPTS:
        tree = ast.parse((ROOT / script).read_text())
        first = next(node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))
        assert ast.unparse(first) == "import ink3d.quiet_start", script
    run = subprocess.run([sys.executable, "-c", "import ink3d.quiet_start\nimport json\nraise KeyboardInterrupt"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.stderr.strip() == "interrupted while starting: nothing was written" and run.returncode != 0
