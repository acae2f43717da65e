"""Output safety: refuse to clobber, write to a temporary name and rename when complete."""

import contextlib
import os
from pathlib import Path

from ink3d import InputError


def check_output(path: str | Path, overwrite: bool, resume: bool = False, resumable: bool = False) -> None:
    """Refuse an existing output unless the user asked to overwrite (or, where the stage can, resume) it."""
    path = Path(path)
    if path.exists() and not (overwrite or resume):
        hint = "--overwrite true to replace it" + (" or --resume true to continue it" if resumable else "")
        raise InputError(f"{path} exists; pass {hint}")


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
