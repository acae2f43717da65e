"""Turn a script's UPPER_CASE constants into command-line flags.

Each stage script opens with a block of constants after a `# --- config ---` line, ended by
two blank lines, such as::

    # --- config ---
    VOLUME = "runs/demo/scan.h5"  # scan volume (HDF5, dataset scan_volume)
    BAND = 4  # half-width of the label band along the normal, in voxels

`parse_config(globals(), argv)` builds an argparse parser with one flag per constant
(`--volume`, `--band`), typed from the default and documented by the trailing comment,
and returns the resolved values as a namespace with lower-case names. Booleans take
`true`/`false`; a boolean flag alone (`--overwrite`) means true.
"""

import argparse
import ast
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

from ink3d import InputError

_CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*$")
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def str_to_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


CONFIG_MARKER = "# --- config ---"


def _config_block(lines: list[str]) -> range:
    """Line numbers (1-based) of the config block: from the marker to the next two blank lines."""
    starts = [number for number, line in enumerate(lines, 1) if line.strip() == CONFIG_MARKER]
    if not starts:
        return range(1, len(lines) + 1)
    end = starts[0]
    while end < len(lines) and not (lines[end].strip() == "" and end + 1 < len(lines) and lines[end + 1].strip() == ""):
        end += 1
    return range(starts[0], end + 1)


def _declared_constants(source: str) -> dict[str, str]:
    """`NAME = literal  # comment` assignments of the script's config block: name -> comment."""
    lines = source.splitlines()
    block = _config_block(lines)
    constants = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and node.lineno in block):
            continue
        target = node.targets[0]
        if not (isinstance(target, ast.Name) and _CONSTANT.match(target.id)):
            continue
        try:
            ast.literal_eval(node.value)
        except ValueError:
            continue  # computed values are not settings
        line = lines[node.end_lineno - 1]
        comment = line[node.end_col_offset:].strip()
        constants[target.id] = comment[1:].strip() if comment.startswith("#") else ""
    return constants


def build_parser(script_globals: dict) -> argparse.ArgumentParser:
    """One `--lower_case_name` flag per literal UPPER_CASE constant of the script."""
    source = Path(script_globals["__file__"]).read_text()
    doc = script_globals.get("__doc__") or ""
    parser = argparse.ArgumentParser(
        prog=Path(script_globals["__file__"]).name,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, comment in _declared_constants(source).items():
        default = script_globals[name]
        if isinstance(default, bool):
            kind, metavar = str_to_bool, "true|false"
        elif isinstance(default, (int, float, str)):
            kind, metavar = type(default), type(default).__name__.upper()
        else:
            raise TypeError(f"constant {name} must be a bool, int, float or str, not {type(default).__name__}")
        flag_alone = {"nargs": "?", "const": True} if kind is str_to_bool else {}  # `--resume` means `--resume true`
        parser.add_argument(
            f"--{name.lower()}",
            type=kind,
            default=default,
            metavar=metavar,
            help=f"{comment} (default: {default!r})" if comment else f"(default: {default!r})",
            **flag_alone,
        )
    return parser


def parse_config(script_globals: dict, argv: list[str] | None = None) -> SimpleNamespace:
    """Resolved settings of a script: its constants, overridden by `argv` (default sys.argv)."""
    parser = build_parser(script_globals)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return SimpleNamespace(**vars(args))


def save_config(config: SimpleNamespace, path: str | Path) -> Path:
    """Write the resolved settings as JSON (typically `<output>.config.json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(vars(config), indent=2, sort_keys=True) + "\n")
    return path


def config_path_for(output: str | Path) -> Path:
    """Where the config of an output file or folder is saved: beside it, as `<name>.config.json`."""
    output = Path(output)
    return output.with_name(output.name + ".config.json")


def run_main(main) -> None:
    """Call a stage's `main()`, turning an `InputError` into a one-line message and exit code 2."""
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
