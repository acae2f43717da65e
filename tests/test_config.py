import json
import textwrap

import pytest

from ink3d.config import config_path_for, parse_config, save_config

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
