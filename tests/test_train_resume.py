"""train.py stopped and resumed: the same run as an uninterrupted one, its metrics and checkpoints, and what a resume refuses."""

import json
import shutil

import numpy as np
import pytest
import torch

import train
from ink3d import InputError
from train_scene import metrics_rows, train_briefly, training_scene


@pytest.mark.parametrize("augment, ink_depth", [("cpu", "fixed"), ("device", "fixed"), ("device", "learned")])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, augment, ink_depth):
    root = training_scene(tmp_path)
    augment = (augment, "--ink_depth", ink_depth)
    train_briefly(root, tmp_path / "whole", "--augment", *augment)
    original, calls = train.masked_loss, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third training step, after last.pth at step 2 (validation calls go elsewhere)
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "masked_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        train_briefly(root, tmp_path / "halves", "--valid_every", "100", "--augment", *augment)
    monkeypatch.setattr(train, "masked_loss", original)
    assert torch.load(tmp_path / "halves" / "last.pth", weights_only=True)["step"] == 2
    with pytest.raises(InputError, match="different max_steps"):
        train_briefly(root, tmp_path / "halves", "--resume", "true", "--max_steps", "8", "--augment", *augment)
    train_briefly(root, tmp_path / "halves", "--resume", "true", "--augment", *augment)
    whole = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)["model"]
    halves = torch.load(tmp_path / "halves" / "last.pth", weights_only=True)["model"]
    assert all(torch.allclose(whole[k], halves[k], atol=1e-6) for k in whole)


def test_resume_rewrites_the_metrics_the_checkpoint_does_not_hold(tmp_path, monkeypatch):
    root = training_scene(tmp_path)
    flags = ("--valid_every", "1", "--checkpoint_every", "2")
    train_briefly(root, tmp_path / "whole", *flags)
    original, calls = train.masked_loss, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # training step 4: last.pth is at step 2
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "masked_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        train_briefly(root, tmp_path / "halves", *flags)
    monkeypatch.setattr(train, "masked_loss", original)
    assert [row["step"] for row in metrics_rows(tmp_path / "halves" / "metrics.csv")] == ["1", "2", "3"]
    train_briefly(root, tmp_path / "halves", *flags, "--resume", "true")
    whole, halves = metrics_rows(tmp_path / "whole" / "metrics.csv"), metrics_rows(tmp_path / "halves" / "metrics.csv")
    assert [row["step"] for row in halves] == ["1", "2", "3", "4"]
    assert halves == whole  # the redraws counter and the losses continue, no row twice


def test_checkpoint_precedes_validation_and_resume_redoes_an_interrupted_one(tmp_path, monkeypatch):
    root = training_scene(tmp_path)
    train_briefly(root, tmp_path / "whole")
    original = train.validate
    monkeypatch.setattr(train, "validate", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train_briefly(root, tmp_path / "halves")
    monkeypatch.setattr(train, "validate", original)
    assert torch.load(tmp_path / "halves" / "last.pth", weights_only=True)["step"] == 2
    train_briefly(root, tmp_path / "halves", "--resume", "true")
    whole, halves = metrics_rows(tmp_path / "whole" / "metrics.csv"), metrics_rows(tmp_path / "halves" / "metrics.csv")
    assert [row["step"] for row in halves] == ["2", "4"] and halves[0]["train_loss"] == "nan"
    assert [{**row, "train_loss": ""} for row in halves] == [{**row, "train_loss": ""} for row in whole]


@pytest.mark.parametrize("flags", [(), ("--resume", "true")])
def test_an_earlier_runs_outputs_without_last_checkpoint_are_kept_unless_overwritten(tmp_path, flags):
    root = training_scene(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("step,lr\n99,0.1\n")
    (tmp_path / "run" / "best.pth").write_bytes(b"an earlier run's")
    with pytest.raises(InputError, match="holds an earlier run's best.pth, metrics.csv without its last.pth; pass --overwrite true"):
        train_briefly(root, tmp_path / "run", *flags)
    assert (tmp_path / "run" / "best.pth").read_bytes() == b"an earlier run's"
    train_briefly(root, tmp_path / "run", *flags, "--overwrite", "true")
    assert [row["step"] for row in metrics_rows(tmp_path / "run" / "metrics.csv")] == ["2", "4"]


def test_resume_refuses_other_data_unless_allowed(tmp_path):
    root = training_scene(tmp_path)
    train_briefly(root, tmp_path / "run", "--max_steps", "2")
    shutil.copy(root / "train.npy", root / "other.npy")
    moved = ("--resume", "true", "--max_steps", "2", "--train_coords", str(root / "other.npy"))
    with pytest.raises(InputError, match="trained on other data \\(train_coords=.*train.npy\\).*--allow_new_data true"):
        train_briefly(root, tmp_path / "run", *moved)
    train_briefly(root, tmp_path / "run", *moved, "--allow_new_data", "true")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_coords"] == str(root / "other.npy")


def test_resume_refuses_data_files_made_again_under_the_same_name(tmp_path):
    root = training_scene(tmp_path)
    train_briefly(root, tmp_path / "run", "--max_steps", "2")
    np.save(root / "train.npy", np.array([[0, 0, 0], [16, 16, 0]], np.int32))  # the coords made again, fewer blocks
    with pytest.raises(InputError, match="train.npy changed since the run began \\(other size or checksum: made again\\?\\); "
                                         "pass --allow_new_data true"):
        train_briefly(root, tmp_path / "run", "--max_steps", "2", "--resume", "true")
    train_briefly(root, tmp_path / "run", "--max_steps", "2", "--resume", "true", "--allow_new_data", "true")


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01garbage", "cannot be read as a checkpoint"),
    ("truncated", "cannot be read as a checkpoint"),
    ("bare", "not a train.py checkpoint to resume from \\(no model, config"),
])
def test_a_bad_last_checkpoint_gets_a_named_error(tmp_path, content, message):
    root = training_scene(tmp_path)
    train_briefly(root, tmp_path / "run", "--max_steps", "2")
    last = tmp_path / "run" / "last.pth"
    if content == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif content == "bare":
        torch.save(torch.load(last, weights_only=True)["model"], last)
    else:
        last.write_bytes(content)
    with pytest.raises(InputError, match=message):
        train_briefly(root, tmp_path / "run", "--resume", "true", "--max_steps", "2")
