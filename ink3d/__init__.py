"""Shared code of the 3D ink detection pipeline: config, ppm and volume I/O, output safety."""


class InputError(Exception):
    """Bad input or a refused operation; the message names the file and what is wrong."""
