"""Failures every writing stage must meet the same way: a named error, nothing left behind."""

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
from ink3d import InputError, volume

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


def test_a_label_file_without_ink_sum_is_named(tmp_path):
    with h5py.File(tmp_path / "labels.h5", "w") as file:
        volume.create_volume(file, volume.INK_COUNT, (8, 8, 8), np.uint16)
    with pytest.raises(InputError, match="labels.h5: no dataset 'ink_sum' \\(datasets: ink_count\\)"):
        pred_find_coords.main(["--labels", str(tmp_path / "labels.h5"), "--out", str(tmp_path / "c.npy")])
    assert not (tmp_path / "c.npy").exists()
