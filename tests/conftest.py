import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import make_synthetic_scroll  # noqa: E402


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
FULL_DISK_RUNNER = """
import resource, runpy, signal, sys
sys.path.insert(0, ".")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_on_a_full_disk(script: str, file_bytes: int, argv: list[str]) -> subprocess.CompletedProcess:
    """Run a stage script in a process that cannot write a file past `file_bytes`: a full disk."""
    return subprocess.run([sys.executable, "-c", FULL_DISK_RUNNER, str(file_bytes), script, *argv], cwd=ROOT, capture_output=True, text=True)
