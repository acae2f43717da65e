"""Imported first by every stage: a Ctrl-C while the stage is still starting (importing torch, zarr, ...) ends in
one line, as one later does (ink3d.config.run_main takes over once the stage runs)."""

import sys


def _starting_interrupted(kind, value, traceback) -> None:
    if issubclass(kind, KeyboardInterrupt):
        print("\ninterrupted while starting: nothing was written", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, traceback)


sys.excepthook = _starting_interrupted
