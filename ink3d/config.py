"""Turn a script's UPPER_CASE constants into command-line flags.

Each stage script opens with a block of constants after a `# --- config ---` line, ended by
two blank lines, such as::

    # --- config ---
    VOLUME = "runs/demo/scan.h5"  # scan volume (HDF5, dataset scan_volume)
    BAND = 4  # half-width of the label band along the normal, in voxels

`parse_config(globals(), argv)` builds an argparse parser with one flag per constant
(`--volume`, `--band`), typed from the default and documented by the trailing comment,
and returns the resolved values as a namespace with lower-case names. Booleans take
`true`/`false`; a boolean flag alone (`--overwrite`) means true. Flags must be spelled out in
full, and numbers must lie in the range `LIMITS` declares for their name.
"""

import _thread
import argparse
import ast
import json
import math
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace

from ink3d import InputError
from ink3d.files import WriteError, atomic_output, writing

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


@dataclass(frozen=True)
class Bounds:
    """A closed or half-open range of valid values; None = unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Bounds(0, low_open=True)
NON_NEGATIVE = Bounds(0)
FRACTION = Bounds(0, 1, high_open=True)

# Valid values of every numeric setting, by flag name; `script.py:name` where one script means something else by it.
LIMITS = {
    **dict.fromkeys(("batch_size", "chunk", "patch", "f_maps", "num_levels", "num_groups", "max_steps", "max_tries",
                     "valid_blocks", "valid_every", "log_every", "checkpoint_every", "workers", "window_sample_slices", "tile",
                     "tile_pixels", "cache_mb", "view_size", "max_views", "largest_blobs", "line_height", "depth", "parts", "macro_block",
                     "height", "width", "max_size", "band", "block", "pool_sharpness", "max_columns"), POSITIVE),
    **dict.fromkeys(("lr", "train.py:block", "warmup_steps", "min_labeled", "margin", "min_size", "grad_clip",
                     "dice_weight", "background_weight", "weight_decay", "ink_thickness", "surface_jitter", "column_weight", "face_depth", "ink_reach",
                     "debris_contrast", "centre_drift", "train.py:workers", "volume_to_hdf.py:workers", "flatten_3d.py:workers", "level", "tifxyz_step", "flatten_3d.py:band", "part", "voxel_size", "inference.py:patch"), NON_NEGATIVE),
    **dict.fromkeys(("overlap", "label_smoothing", "ema_decay"), FRACTION),
    "threshold": Bounds(0, 1),
    "depth_threshold": Bounds(0, 1),
    **dict.fromkeys(("ink_front", "ink_back"), Bounds(-1)),  # negative: the whole band
    "surface_offset": Bounds(-10, 10),
    "pitch": Bounds(2),
    "all_labels_to_hdf.py:tile_pixels": Bounds(1, 65535),  # a tile's pixels must fit the uint16 counts it holds
    "jpeg_quality": Bounds(1, 100),
}


AUTO_SWITCH = ("auto", "true", "false")
# Valid values of every setting that names one of a few choices, by flag name (as LIMITS).
CHOICES = {
    "blend": ("gaussian", "constant"),
    "amp": ("auto", "bf16", "fp16", "fp32"),
    **dict.fromkeys(("channels_last", "compile", "depth_map"), AUTO_SWITCH),
    "weights": ("ema", "raw"),
    "reduce": ("mean", "max"),
    "axis": ("z", "y", "x"),
    "format": ("tif", "jpg"),
    "ink_depth": ("learned", "fixed"),
    "input_normalization": ("scale", "percentile"),
    "augmentation": ("full", "exact", "none"),
    "augment": ("device", "cpu"),
    "compression": ("blosc-zstd", "blosc-lz4", "blosc-lz4-byteshuffle", "gzip", "lzf", "none"),
    "volume_form": ("tiff", "ome-zarr"),
    "prediction_form": ("hdf5", "ome-zarr"),
    "segment_form": ("ppm", "tifxyz"),
}
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
AIR_LEVEL = re.compile(r"^(auto|otsu|none|25[0-5]|2[0-4]\d|1?\d?\d)$")  # each stage says which words it takes


def check_limits(script: str, config: SimpleNamespace) -> None:
    """Refuse, by flag name, a number that is not finite or lies outside its `LIMITS`, a choice outside its
    `CHOICES`, and a device name that is not auto, cpu, cuda or cuda:N."""
    for name, value in vars(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"--{name} {value}: must be a finite number")
        bounds = LIMITS.get(f"{script}:{name}", LIMITS.get(name))
        if bounds is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value not in bounds:
            raise InputError(f"--{name} {value}: must be {bounds}")
        choices = CHOICES.get(name)
        if choices is not None and isinstance(value, str) and value not in choices:
            raise InputError(f"--{name} {value!r}: choose one of {', '.join(choices)}")
        if name == "air_level" and not AIR_LEVEL.match(str(value)):
            raise InputError(f"--air_level {value!r}: choose auto, otsu, none or a number in 0..255")
        if name == "device" and not DEVICE.match(str(value)):
            raise InputError(f"--device {value!r}: choose auto, cpu, cuda or cuda:N")


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
        allow_abbrev=False,
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


# Flags renamed so that one concept has one name in every stage: the old spelling is refused with the new one.
RENAMED = {
    "skip_max": "--air_level (auto: the level the checkpoint was trained with; none: run every window; or a number)",
    "min_scan": "--air_level (auto: estimated from the scan; none: no air filter; or a number)",
    "inference.py:block": "--macro_block", "connected_components_explore.py:block": "--macro_block",
    "flatten_3d.py:predictions": "--volume",
}


def refuse_renamed(script: str, declared, argv: list[str]) -> None:
    for argument in argv:
        if argument.startswith("--"):
            name = argument[2:].split("=")[0]
            hint = RENAMED.get(f"{script}:{name}") or (RENAMED.get(name) if name not in declared else None)
            if hint:
                raise InputError(f"--{name} is now {hint}")


def parse_config(script_globals: dict, argv: list[str] | None = None) -> SimpleNamespace:
    """Resolved settings of a script: its constants, overridden by `argv` (default sys.argv), checked against `LIMITS`."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(script_globals)
    script = Path(script_globals["__file__"]).name
    refuse_renamed(script, {action.dest for action in parser._actions}, argv)
    config = SimpleNamespace(**vars(parser.parse_args(argv)))
    check_limits(script, config)
    return config


def save_config(config: SimpleNamespace, path: str | Path) -> Path:
    """Write the resolved settings as JSON (typically `<output>.config.json`)."""
    path = Path(path)
    with writing(path, resumable=False), atomic_output(path) as temporary:
        temporary.write_text(json.dumps(vars(config), indent=2, sort_keys=True) + "\n")
    return path


def config_path_for(output: str | Path) -> Path:
    """Where the config of an output file or folder is saved: beside it, as `<name>.config.json`."""
    output = Path(output)
    return output.with_name(output.name + ".config.json")


def _released_hdf5_object(error: BaseException | None, traceback) -> bool:
    """Whether an error comes from releasing an HDF5 object (h5py's ObjectID._dealloc), which after a failed write
    fails to flush again: the write failure itself is what the stage reports, once."""
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return (isinstance(error, (OSError, RuntimeError)) and traceback is not None
            and traceback.tb_frame.f_code.co_name.endswith("_dealloc") and "h5py" in traceback.tb_frame.f_code.co_filename)


def _quiet_unraisable(unraisable) -> None:
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        _interrupt_again()
    elif not _released_hdf5_object(unraisable.exc_value, unraisable.exc_traceback) and "h5py._objects.ObjectID" not in repr(unraisable.object):
        sys.__unraisablehook__(unraisable)


def _quiet_excepthook(kind, error, traceback) -> None:  # Cython prints an error in __dealloc__ through sys.excepthook
    if issubclass(kind, KeyboardInterrupt):
        _interrupt_again()
    elif not _released_hdf5_object(error, traceback):
        sys.__excepthook__(kind, error, traceback)


_stage_ended = threading.Event()  # run_main's stage returned or stopped: no Ctrl-C to deliver any more


def _interrupt_again() -> None:
    """A Ctrl-C that landed in a finalizer (an HDF5 object let go, say), where Python reports an exception and goes
    on: raise it again in the main thread, every 50 ms until the stage stops. From a thread of its own: raised in
    the hook that reports it, it would be dropped again."""
    def deliver():
        while not _stage_ended.wait(0.05):
            _thread.interrupt_main()

    threading.Thread(target=deliver, daemon=True).start()


WHOLE_OUTPUTS = "outputs appear under their names only when complete: earlier outputs are as they were; run it again"
RESUMABLE = "finished work is kept in the .partial output: rerun the same command with --resume true"


def run_main(main, interrupted: str = WHOLE_OUTPUTS) -> None:
    """Call a stage's `main()`, turning an `InputError` into a one-line message and exit code 2, and Ctrl-C
    into one line saying what is kept (`interrupted`) and exit code 130.

    After a failed write the process exits at once: releasing an HDF5 file whose write failed can
    crash the interpreter, and everything finished is already on disk.
    """
    sys.unraisablehook, sys.excepthook = _quiet_unraisable, _quiet_excepthook
    warnings.formatwarning = _stage_warning
    _stage_ended.clear()
    try:
        try:
            main()
        finally:
            _stage_ended.set()  # before the handlers below: no Ctrl-C delivered again while they report
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        if isinstance(error, WriteError):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if not _interrupted(error):
            raise
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        raise SystemExit(130) from None


PROJECT = Path(__file__).resolve().parents[1]
_library_warning = warnings.formatwarning


def _stage_warning(message, category, filename, lineno, line=None) -> str:
    """The pipeline's own warnings as one line, as its errors are; a library's with where it comes from."""
    source = Path(filename).resolve()
    if source.is_relative_to(PROJECT) and "site-packages" not in source.parts:  # a virtualenv in the project is a library's
        return f"warning: {message}\n"
    return _library_warning(message, category, filename, lineno, line)


def _interrupted(error: BaseException) -> bool:
    """Whether `error` was raised while a Ctrl-C was being handled: h5py's Cython code, interrupted inside HDF5, can
    turn the KeyboardInterrupt into another error whose context it is."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__context__
    return False
