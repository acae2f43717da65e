"""Output safety: one writer per output, refuse to clobber, write under a temporary name and rename
when complete, turn a failed write into a named error, and reopen an interrupted output to continue it."""

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import sys
import time
import warnings
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np

from ink3d import InputError


class OutputBusy(InputError):
    """Another run holds the lock of an output."""


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
    a folder where the output file would go, and an output whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; the output is a file: give another name or move the folder away")
    if path.exists() and not (overwrite or resume):
        hint = "--overwrite true to replace it" + (" or --resume true to continue it" if resumable else "")
        raise InputError(f"{path} exists; pass {hint}")
    _ensure_writable_folder(path)


def _same(a: Path, b: Path) -> bool:
    """One file or folder: the same resolved path, or the same device and inode (a hard link)."""
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def refuse_inputs_as_outputs(inputs: dict, outputs: dict, folders=(), collections=()) -> None:
    """Refuse, by name and before anything is created or removed, an output that is one of the run's inputs (once
    symlinks are resolved, or by device and inode), lies inside an input folder (a TIFF stack, a zarr store), or
    holds an input (a store replaced whole). `inputs` and `outputs` map flag names to paths (empty ones are
    skipped); outputs named in `folders` are folders written into by name, which may hold inputs; inputs named in
    `collections` are folders of many inputs (segments, labels), which only an output that is the folder itself
    would destroy."""
    for out_flag, out in outputs.items():
        if not out:
            continue
        output = Path(out).resolve()
        for in_flag, given in inputs.items():
            if not given:
                continue
            source = Path(given).resolve()
            if _same(output, source):
                relation = "is"
            elif source in output.parents and in_flag not in collections:
                relation = "lies inside"
            elif output in source.parents and out_flag not in folders:
                relation = "holds"
            else:
                continue
            raise InputError(f"--{out_flag} {out} {relation} --{in_flag} {given}, an input of this run: writing it would "
                             "destroy the input, with --overwrite true or not; choose another output")


def lock_path(path: str | Path) -> Path:
    """The lock a run holds beside an output (a file or a folder) while it writes it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _take_lock(path: Path) -> int:
    """Hold `<path>.lock`: an exclusive POSIX record lock, which the kernel releases when the process ends however it
    ends, and which the processes it forks (data-loader workers) do not hold: a flock would live on in them."""
    lock = lock_path(path)
    _ensure_writable_folder(path)
    while True:
        try:
            descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise WriteError(f"{lock}: cannot create the output's lock ({error.strerror or error})") from None
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(descriptor)
                raise WriteError(f"{lock}: cannot lock the output ({error.strerror or error})") from None
            holder = os.read(descriptor, 200).decode(errors="replace").strip() or "a run"
            os.close(descriptor)
            raise OutputBusy(f"{path} is being written by another run ({holder}; lock {lock}); "
                             "wait for it to end or stop it, or choose another output") from None
        try:  # a run that finished unlinked the file between our open and flock: lock the new one
            if os.stat(lock).st_ino == os.fstat(descriptor).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)
    stale = os.read(descriptor, 200).decode(errors="replace").strip()
    if stale:
        print(f"{lock}: taking over the lock of a run that ended without releasing it ({stale})", file=sys.stderr)
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    except OSError as error:
        os.close(descriptor)
        raise WriteError(f"{lock}: cannot write the output's lock ({error.strerror or error}); free disk space") from None
    return descriptor


@contextlib.contextmanager
def output_lock(*paths: str | Path):
    """One writer per output: hold `<path>.lock` beside each output for the whole run, taken before anything
    is created or truncated. A second run on any of them is refused by name; a lock left by a run that
    ended without releasing it (kill -9, power loss) is taken over with a message. The locks are POSIX record
    locks (fcntl): on a shared filesystem they hold across machines where it supports them (NFS, Lustre)."""
    resolved = [Path(path).resolve() for path in paths]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise InputError(f"{paths[index]}: given as two outputs of one run; each output needs its own path")
    held = []
    try:
        for path in resolved:
            held.append((path, _take_lock(path)))
        yield
    finally:
        for path, descriptor in reversed(held):
            lock_path(path).unlink(missing_ok=True)
            os.close(descriptor)


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


def file_checksum(path: str | Path, piece: int = 16 << 20) -> int:
    """CRC-32 of a file's bytes, read a piece at a time."""
    value = 0
    with open(path, "rb") as stream:
        while data := stream.read(piece):
            value = zlib.crc32(data, value)
    return value


def write_image(path: str | Path, image: np.ndarray, params=()) -> None:
    """Write an image in the format of `path`'s suffix. Encoding first and writing the bytes makes a failed write
    (a full disk) an OSError, where cv2.imwrite would only return False."""
    path = Path(path)
    encoded, data = cv2.imencode(path.suffix, image, list(params))
    if not encoded:
        raise ValueError(f"{path}: OpenCV cannot encode a {image.dtype} image of shape {image.shape} as {path.suffix}")
    path.write_bytes(data.tobytes())


def checksum(array: np.ndarray, previous: int = 0) -> int:
    """CRC-32 of an array's bytes (C order): what a finished block or slab is checked against on resume. With the
    CRC-32 of the bytes before them (`previous`), that of all of them: a block's from its slabs of planes."""
    return zlib.crc32(np.ascontiguousarray(array).data, previous)


# failures of the filesystem, not of the file: freeing space (or fixing permissions) and resuming completes the output
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS, errno.EPERM}


@contextlib.contextmanager
def writing(path: str | Path, resumable: bool = True, advice: str = ""):
    """Turn a failed write or flush of `path` (HDF5 reports OSError or RuntimeError) into a WriteError that says
    what to do: `advice` where given, else free space and resume (a `resumable` output failing for lack of space
    or permission), start over (a resumable file that is itself damaged), or run again (an output renamed into
    place only whole)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        text = str(error)
        reason = (error.strerror if isinstance(error, OSError) and error.strerror else text.splitlines()[0] if text
                  else type(error).__name__)
        match = re.search(r"error message = '([^']+)'", text)
        if match:
            reason = match.group(1)
        found = re.search(r"errno = (\d+)", text)
        code = error.errno if isinstance(error, OSError) and error.errno else int(found.group(1)) if found else None
        if advice:
            raise WriteError(f"{path}: writing failed ({reason}); {advice}") from None
        if not resumable:
            raise WriteError(f"{path}: writing failed ({reason}); nothing is kept under the output's name: "
                             "free disk space (or fix the folder's permissions) and run again") from None
        if code in _SPACE_ERRNOS:
            raise WriteError(f"{path}: writing failed ({reason}); what was finished is kept: free disk space "
                             "(or fix the folder's permissions) and rerun with --resume true") from None
        raise WriteError(f"{path}: writing failed ({reason}); the file is damaged and cannot be resumed: "
                         "start over with --overwrite true") from None


_ABANDONED = []  # HDF5 files whose write failed, never closed: see close_output


def close_output(file: h5py.File, failed: bool, path: Path, resumable: bool = True) -> None:
    """Close an output file. After a failed write, closing (or releasing) the file can crash the interpreter in
    HDF5, so such a file is kept open until the process exits (run_main exits without releasing objects after a
    WriteError); everything finished is on disk already."""
    if failed:
        _ABANDONED.append(file)
        return
    try:
        file.close()
    except (OSError, RuntimeError) as error:
        _ABANDONED.append(file)
        with writing(path, resumable):
            raise error


@contextlib.contextmanager
def output_file(file: h5py.File, path: Path, resumable: bool = True):
    """Write into the open HDF5 `file` (at `path`), closing it on the way out (see close_output for a file
    whose write failed; `resumable` as for `writing`). Writes go inside `writing(path)`: reading and computing
    errors stay what they are."""
    failed = False
    try:
        yield file
    except WriteError:
        failed = True
        raise
    finally:
        close_output(file, failed, path, resumable)


NEWLY_CREATED_BYTES = 1 << 20  # an output this small that cannot be opened was killed as it was created: nothing finished


def open_interrupted(path: Path, has_record) -> h5py.File | None:
    """Reopen an interrupted HDF5 output for appending; None when it holds nothing finished to keep.

    A write that failed for lack of space leaves the file shorter than its superblock says; it is
    extended to that length (the missing tail reads as zeros, and the stage's checksums find and
    redo what it held). A run killed as it created the file leaves one without its record of finished
    work (`has_record(file)` false), or a tiny one that cannot be opened, or whose objects, though
    listed, cannot be (killed while HDF5 wrote its metadata): the caller starts it anew. A larger file
    that cannot be opened gets a named error.
    """
    try:
        file = h5py.File(path, "r+")
    except OSError as error:
        stored = re.search(r"truncated file: eof = (\d+), sblock->base_addr = \d+, stored_eof = (\d+)", str(error))
        if stored is None:
            return _unopenable(path, error)
        os.truncate(path, int(stored.group(2)))
        try:
            file = h5py.File(path, "r+")
        except OSError as error:
            raise InputError(f"{path}: cannot be repaired to resume ({str(error).splitlines()[0]}): start over with --overwrite true") from None
    try:
        recorded = has_record(file)
    except (KeyError, OSError) as error:
        file.close()
        return _unopenable(path, error)
    if recorded:
        return file
    file.close()
    return None


def _unopenable(path: Path, error: Exception) -> None:
    """None for a file killed as it was created (tiny: nothing finished), else the named error of a damaged one."""
    if path.stat().st_size < NEWLY_CREATED_BYTES:
        return None
    raise InputError(f"{path}: cannot be opened to resume ({str(error).splitlines()[0]}); the file is damaged: "
                     "start over with --overwrite true") from None


def warn_if_short_of_space(path: Path, uncompressed_bytes: int) -> None:
    """Warn when the output's folder has less free space than the output's uncompressed size."""
    free = shutil.disk_usage(path.parent).free
    if free < uncompressed_bytes:
        warnings.warn(f"{path.parent}: {free / 1e9:.1f} GB free, the output holds up to {uncompressed_bytes / 1e9:.1f} GB "
                      "before compression; if the disk fills, the run stops and --resume true continues it", stacklevel=2)
