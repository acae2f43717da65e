"""Stage scripts run in processes of their own, forked from a server that has imported torch and the project once.

A stage started as `python stage.py` spends ~2-3 s importing before it does anything; the tests that need a stage
in a process of its own (to kill it, to fill its disk, to run workers or ranks side by side) start it here instead
(multiprocessing's forkserver), where it runs the script as `__main__` with the same argv, working folder, signals,
start method and exit status. The server only imports: a process forked after OpenMP's threads have started hangs
in its first parallel region, which is why the tests' own process cannot be forked instead.
"""

import atexit
import contextlib
import multiprocessing
import os
import resource
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "h5py", "hdf5plugin", "zarr", "scipy.ndimage", "cv2", "tifffile", "inference", "train",
                                 "stage_process"])


def _run_script(script: str, argv: list[str], file_bytes: int | None, stdout: Connection, stderr: Connection) -> None:
    for fd, pipe in ((1, stdout), (2, stderr)):
        os.dup2(pipe.fileno(), fd)
        pipe.close()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's foreground command has it
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)  # the platform's, not the server's
    if file_bytes is not None:  # writes past the limit then fail with EFBIG, as on a full disk (pipes have no limit)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, resource.RLIM_INFINITY))
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:  # a process of multiprocessing ends without them
        atexit._run_exitfuncs()


class _Drain(threading.Thread):
    """Reads a pipe as it fills, so that the process writing it never waits; once `ended` is set, stops as soon as
    nothing more is there (processes the stage started may hold the pipe open after it ends)."""

    def __init__(self, pipe: Connection):
        super().__init__(daemon=True)
        self.pipe, self.ended, self.chunks = pipe, threading.Event(), []
        self.start()

    def run(self) -> None:
        while True:
            if select.select([self.pipe], [], [], 0.05)[0]:
                data = os.read(self.pipe.fileno(), 1 << 16)
                if not data:
                    break
                self.chunks.append(data)
            elif self.ended.is_set():
                break
        self.pipe.close()

    def text(self) -> str:
        self.ended.set()
        self.join()
        return b"".join(self.chunks).decode(errors="replace")


class StageProcess:
    """`python <script> <argv...>` in its own process (`file_bytes`: no file it writes may grow past this, a full
    disk), its standard output and error kept for `communicate`; pid, poll, send_signal, wait as subprocess.Popen."""

    def __init__(self, script: str, argv: list[str], file_bytes: int | None = None):
        self.args = [script, *argv]
        pipes = [_CONTEXT.Pipe(duplex=False) for _ in range(2)]
        self._process = _CONTEXT.Process(target=_run_script, args=(script, list(argv), file_bytes, *(write for _, write in pipes)))
        self._process.start()
        for _, write in pipes:
            write.close()
        self._outputs = [_Drain(read) for read, _ in pipes]
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs; -N where signal N ended it, as Popen has it."""
        return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # an ended process is not signalled, as Popen does
            os.kill(self.pid, sig)

    def wait(self) -> int:
        self._process.join()
        return self.returncode

    def communicate(self) -> tuple[str, str]:
        """Waits for the process to end: its standard output and error."""
        self.wait()
        stdout, stderr = (output.text() for output in self._outputs)
        return stdout, stderr


def run_stage(script: str, argv: list[str], file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """Run a stage script in its own process to the end (see StageProcess): its exit status and output."""
    process = StageProcess(script, argv, file_bytes)
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _hold_lock(path: str, held, release) -> None:
    sys.path.insert(0, str(ROOT))
    from ink3d.files import output_lock
    with output_lock(path):
        held.set()
        release.wait()


@contextlib.contextmanager
def another_run_writing(path: Path):
    """A second process holding the lock of the output `path` while the block runs, as a run writing it does."""
    held, release = _CONTEXT.Event(), _CONTEXT.Event()
    holder = _CONTEXT.Process(target=_hold_lock, args=(str(path), held, release))
    holder.start()
    try:
        assert held.wait(60), "the holder never took the lock"
        yield
    finally:
        release.set()
        holder.join()


def run_code(code: str, argv: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """`python -c <code> <argv...>` in a process of its own (see StageProcess), checked to end with status 0."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "code.py"
        script.write_text(code)
        run = run_stage(str(script), list(argv))
    if run.returncode:
        raise subprocess.CalledProcessError(run.returncode, run.args, run.stdout, run.stderr)
    return run
