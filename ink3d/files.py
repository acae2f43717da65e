"""Output safety: refuse to clobber, write under a temporary name and rename when complete,
turn a failed write into a named error, and reopen an interrupted output to continue it."""

import contextlib
import os
import re
import shutil
import warnings
import zlib
from pathlib import Path

import h5py
import numpy as np

from ink3d import InputError


class WriteError(InputError):
    """Writing an output failed (disk full, read-only, quota): what was finished before is kept."""


def _ensure_writable_folder(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{path}: cannot create its folder ({error.strerror or error})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: its folder {path.parent} is not writable")


def check_output(path: str | Path, overwrite: bool, resume: bool = False, resumable: bool = False) -> None:
    """Refuse an existing output unless the user asked to overwrite (or, where the stage can, resume) it,
    and an output whose folder cannot be written."""
    path = Path(path)
    if path.exists() and not (overwrite or resume):
        hint = "--overwrite true to replace it" + (" or --resume true to continue it" if resumable else "")
        raise InputError(f"{path} exists; pass {hint}")
    _ensure_writable_folder(path)


def partial_path(path: str | Path) -> Path:
    """The temporary name an output has while it is being written."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def atomic_output(path: str | Path):
    """Yield a temporary path; on success rename it to `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(path)
    temporary.unlink(missing_ok=True)
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)


def resumable_output(out: str | Path, overwrite: bool, resume: bool) -> tuple[Path, bool] | None:
    """Where a long resumable stage writes, `<out>.partial`, and whether it continues it there.

    The output name only ever holds a complete output: the stage renames the partial file when it is
    done, so `--overwrite` leaves the previous output in place until the new one is complete. None
    when `--resume` finds `out` complete and nothing interrupted.
    """
    out = Path(out)
    partial = partial_path(out)
    if partial.exists() and not (resume or overwrite):
        raise InputError(f"{partial} exists: an interrupted run; pass --resume true to continue it or --overwrite true to start over")
    if resume and not overwrite and not partial.exists() and out.exists():
        return None
    check_output(out, overwrite, resume, resumable=True)
    return partial, resume and not overwrite and partial.exists()


def finish_output(partial: Path, out: Path) -> None:
    os.replace(partial, out)


def checksum(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes (C order): what a finished block or slab is checked against on resume."""
    return zlib.crc32(np.ascontiguousarray(array).data)


@contextlib.contextmanager
def writing(path: str | Path):
    """Turn a failed write or flush of `path` (HDF5 reports OSError or RuntimeError) into a WriteError."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        reason = str(error).splitlines()[0]
        match = re.search(r"error message = '([^']+)'", str(error))
        if match:
            reason = match.group(1)
        raise WriteError(f"{path}: writing failed ({reason}); what was finished is kept: free disk space "
                         "(or fix the folder's permissions) and rerun with --resume true") from None


_ABANDONED = []  # HDF5 files whose write failed and that could not be closed: see close_output


def close_output(file: h5py.File, failed: bool) -> None:
    """Close an output file. After a failed write HDF5 may refuse to close it, and releasing such a file
    can crash the interpreter, so it is kept open until the process exits (run_main exits without
    releasing objects after a WriteError)."""
    try:
        file.close()
    except (OSError, RuntimeError):
        if not failed:
            raise
        _ABANDONED.append(file)


@contextlib.contextmanager
def output_file(file: h5py.File, path: Path):
    """Write into the open HDF5 `file` (at `path`): a failed write becomes a WriteError, and the file is closed
    on the way out (see close_output for a file whose write failed)."""
    failed = False
    try:
        with writing(path):
            yield file
    except WriteError:
        failed = True
        raise
    finally:
        close_output(file, failed)


def open_interrupted(path: Path) -> h5py.File:
    """Reopen an interrupted HDF5 output for appending.

    A write that failed for lack of space leaves the file shorter than its superblock says; it is
    extended to that length (the missing tail reads as zeros, and the stage's checksums find and
    redo what it held). A file that cannot be opened at all gets a named error.
    """
    try:
        return h5py.File(path, "r+")
    except OSError as error:
        stored = re.search(r"truncated file: eof = (\d+), sblock->base_addr = \d+, stored_eof = (\d+)", str(error))
        if stored is None:
            raise InputError(f"{path}: cannot be opened to resume ({str(error).splitlines()[0]}); the run stopped before "
                             "its first write was saved, or the file is damaged: start over with --overwrite true") from None
    os.truncate(path, int(stored.group(2)))
    try:
        return h5py.File(path, "r+")
    except OSError as error:
        raise InputError(f"{path}: cannot be repaired to resume ({str(error).splitlines()[0]}): start over with --overwrite true") from None


def warn_if_short_of_space(path: Path, uncompressed_bytes: int) -> None:
    """Warn when the output's folder has less free space than the output's uncompressed size."""
    free = shutil.disk_usage(path.parent).free
    if free < uncompressed_bytes:
        warnings.warn(f"{path.parent}: {free / 1e9:.1f} GB free, the output holds up to {uncompressed_bytes / 1e9:.1f} GB "
                      "before compression; if the disk fills, the run stops and --resume true continues it", stacklevel=2)
