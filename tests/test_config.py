import ast
import json
import textwrap
from pathlib import Path

import pytest

from ink3d import InputError
from ink3d.config import FRACTION, LIMITS, NON_NEGATIVE, POSITIVE, Bounds, _declared_constants, config_path_for, parse_config, save_config

SCRIPT = textwrap.dedent('''
    """A stage."""
    import os

    # --- config ---
    VOLUME = "scan.h5"  # scan volume to read
    BAND = 4  # half-width of the band
    THRESHOLD = 0.5  # ink probability threshold
    RESUME = False  # continue a run
    DERIVED = os.sep  # computed: not a setting


    LIMITS = [1, 2]  # after the config block: not a setting
''')


@pytest.fixture
def script_globals(tmp_path):
    path = tmp_path / "stage.py"
    path.write_text(SCRIPT)
    namespace = {"__file__": str(path), "__name__": "stage"}
    exec(compile(SCRIPT, str(path), "exec"), namespace)
    return namespace


def test_defaults_come_from_the_constants(script_globals):
    config = parse_config(script_globals, [])
    assert vars(config) == {"volume": "scan.h5", "band": 4, "threshold": 0.5, "resume": False}


def test_overrides_are_typed_from_the_defaults(script_globals):
    config = parse_config(script_globals, ["--volume", "x.h5", "--band", "7", "--threshold", "0.25"])
    assert (config.volume, config.band, config.threshold) == ("x.h5", 7, 0.25)
    assert isinstance(config.band, int) and isinstance(config.threshold, float)


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("false", False), ("no", False)])
def test_booleans_parse_true_and_false(script_globals, text, value):
    assert parse_config(script_globals, ["--resume", text]).resume is value


def test_a_boolean_flag_alone_means_true(script_globals):
    config = parse_config(script_globals, ["--resume", "--band", "3"])
    assert config.resume is True and config.band == 3


@pytest.mark.parametrize("argv", [["--unknown", "1"], ["--band", "four"], ["--resume", "maybe"], ["--derived", "x"], ["--limits", "1"]])
def test_bad_flags_are_rejected(script_globals, argv):
    with pytest.raises(SystemExit):
        parse_config(script_globals, argv)


def test_help_shows_the_comment(script_globals, capsys):
    with pytest.raises(SystemExit):
        parse_config(script_globals, ["--help"])
    out = capsys.readouterr().out
    assert "half-width of the band" in out and "--threshold" in out and "A stage." in out


def test_config_is_saved_beside_the_output(script_globals, tmp_path):
    config = parse_config(script_globals, ["--band", "2"])
    path = save_config(config, config_path_for(tmp_path / "out.h5"))
    assert path.name == "out.h5.config.json"
    assert json.loads(path.read_text())["band"] == 2


def test_abbreviated_flags_are_rejected(script_globals):
    with pytest.raises(SystemExit):
        parse_config(script_globals, ["--thresh", "0.2"])


@pytest.mark.parametrize("argv, message", [
    (["--band", "0"], "--band 0: must be > 0"),
    (["--band", "-2"], "--band -2: must be > 0"),
    (["--threshold", "1.5"], "--threshold 1.5: must be in \\[0, 1\\]"),
    (["--threshold", "-0.1"], "--threshold -0.1: must be in \\[0, 1\\]"),
])
def test_settings_outside_their_limits_are_refused_by_name(script_globals, argv, message):
    with pytest.raises(InputError, match=message):
        parse_config(script_globals, argv)


@pytest.mark.parametrize("bounds, inside, outside", [
    (POSITIVE, [1e-9, 3], [0, -1]),
    (NON_NEGATIVE, [0, 5], [-1e-9]),
    (FRACTION, [0, 0.999], [1, -0.1]),
    (Bounds(-1, 255), [-1, 255], [-2, 256]),
])
def test_bounds(bounds, inside, outside):
    assert all(value in bounds for value in inside) and not any(value in bounds for value in outside)


def test_every_numeric_setting_of_every_stage_has_limits():
    unbounded = []
    for script in sorted(Path(__file__).resolve().parents[1].glob("*.py")):
        source = script.read_text()
        names = _declared_constants(source)
        for node in ast.parse(source).body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in names:
                value, name = ast.literal_eval(node.value), node.targets[0].id.lower()
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if numeric and name != "seed" and f"{script.name}:{name}" not in LIMITS and name not in LIMITS:
                    unbounded.append(f"{script.name}:{name}")
    assert unbounded == []


def test_the_pipelines_warnings_print_as_one_line_and_a_librarys_with_its_source():
    from ink3d import config

    ours = config._stage_warning("batches run 50% full", UserWarning, str(config.PROJECT / "inference.py"), 12)
    assert ours == "warning: batches run 50% full\n"
    theirs = config._stage_warning("deprecated", DeprecationWarning, "/usr/lib/python3/site-packages/zarr/core.py", 7, "x = 1")
    assert theirs.startswith("/usr/lib/python3/site-packages/zarr/core.py:7: DeprecationWarning: deprecated")
    venv = str(config.PROJECT / ".venv" / "lib" / "python3.11" / "site-packages" / "zarr" / "core.py")
    assert config._stage_warning("deprecated", DeprecationWarning, venv, 7, "x = 1").startswith(f"{venv}:7: DeprecationWarning")
