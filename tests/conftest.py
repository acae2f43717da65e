import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import make_synthetic_scroll  # noqa: E402
from inference_fixtures import full_runs, model_path, scan  # noqa: E402, F401  fixtures of the modules that test inference
from labels_scene import scene  # noqa: E402, F401  ... that test labeling
from volume_files import dataset  # noqa: E402, F401  ... that read volumes


@pytest.fixture(scope="session")
def synthetic_scroll(tmp_path_factory) -> Path:
    """The default synthetic scroll (seed 0), made once per test session."""
    out_dir = tmp_path_factory.mktemp("scroll")
    make_synthetic_scroll.main(["--out_dir", str(out_dir), "--seed", "0"])
    return out_dir


@pytest.fixture(scope="session")
def scroll_info(synthetic_scroll) -> dict:
    return json.loads((synthetic_scroll / "scroll.json").read_text())


ROOT = Path(__file__).resolve().parents[1]
