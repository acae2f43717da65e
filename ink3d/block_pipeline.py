"""Blocks predicted while their input is read ahead and their output written behind, on threads of their own, in
slabs of planes: the model waits for neither where it can be helped."""

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ink3d import InputError, volume
from ink3d.files import checksum
from ink3d.sliding_window import WindowPredictor, input_slabs


@dataclass
class BlockWriter:
    """Where blocks' predictions go: `slab(block, planes, values)` writes the block's output planes `planes` (a slice of
    the volume's z) and `finish(block, crc)` records the block finished with the CRC-32 of its bytes, once its slabs
    are saved. Slabs end on multiples of `align` planes of the volume (the output's chunk depth) or at a block's end."""

    slab: Callable
    finish: Callable
    align: int


def _reader(scan, blocks, patch: int, pin: bool, out_queue: queue.Queue, stop: threading.Event, wanted: threading.Semaphore):
    """Read the blocks' input boxes, slab after slab (input_slabs), into `out_queue`, each once `wanted` allows it."""
    try:
        for block in blocks:
            for start, stop_plane in input_slabs(block, patch):
                wanted.acquire()
                if stop.is_set():
                    return
                origin = block.input_origin + np.array([start, 0, 0])
                array = torch.from_numpy(volume.read_crop(scan, origin, (stop_plane - start, *block.input_shape[1:])))
                out_queue.put(array.pin_memory() if pin else array)
    except BaseException as error:  # handed to the main thread, which re-raises it
        out_queue.put(error)


def _writer(writer: BlockWriter, in_queue: queue.Queue, errors: list):
    """Write the slabs of `in_queue` ((block, planes, values), or (block, None, None) once a block is done) and record
    each block finished with the CRC-32 of its bytes, its slabs taken in order (C order: z is the outer axis)."""
    crc = 0
    while (item := in_queue.get()) is not None:
        try:
            if not errors:  # after a failure the queue is only drained
                crc = _write(writer, *item, crc)
        except BaseException as error:
            errors.append(error)
        finally:
            del item  # the slab's memory goes back once it is written, not when the next one comes
            in_queue.task_done()


def _write(writer: BlockWriter, block, planes, values, crc: int) -> int:
    """Write one slab, or record its block finished (values None); returns the block's CRC-32 so far."""
    if values is None:
        writer.finish(block, crc)
        return 0
    writer.slab(block, planes, values)
    return checksum(values, crc)


class _FromThread(Exception):
    """The reader's or the writer's error, met while the model runs a block: raised through model_errors_named as it is."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


@contextlib.contextmanager
def model_errors_named(block):
    """Name a failure of the model (out of memory, a device error) as such: the output is intact and resumable."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError) as error:
        hint = ("lower --batch_size or --patch" if isinstance(error, torch.OutOfMemoryError) else
                "check the checkpoint and --device")
        raise InputError(f"the model failed on block {block.index} at {block.input_origin.tolist()} "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); finished blocks are "
                         f"kept: {hint}, then rerun with --resume true") from None


@dataclass
class Timing:
    """Where the main thread's time went: waiting for the reader, running the model, waiting for the writer."""

    read_wait: float = 0.0
    compute: float = 0.0
    write_wait: float = 0.0
    total: float = 0.0

    def line(self) -> str:
        busy = self.compute / max(self.total, 1e-9)
        return (f"model busy {busy:.0%} of {self.total:.1f} s; waited {self.read_wait:.1f} s for reading, "
                f"{self.write_wait:.1f} s for writing")


class _SlabThreads:
    """The reader and the writer thread of `predict_blocks`, and the queues between them and the model."""

    def __init__(self, scan, writer: BlockWriter, blocks, patch: int, device, bar, timing: Timing, read_ahead: int):
        self.patch, self.device, self.bar, self.timing = patch, device, bar, timing
        self.read_queue, self.write_queue, self.wanted = queue.Queue(), queue.Queue(), threading.Semaphore(read_ahead)
        self.stop, self.write_errors = threading.Event(), []
        self.reader = threading.Thread(target=_reader, args=(scan, blocks, patch, device.type == "cuda", self.read_queue,
                                                             self.stop, self.wanted), daemon=True)
        self.writer = threading.Thread(target=_writer, args=(writer, self.write_queue, self.write_errors), daemon=True)

    def __enter__(self):
        self.started = time.perf_counter()
        self.reader.start()
        self.writer.start()
        return self

    def slabs(self, block):
        """The block's input slabs on the device, as the model asks for them."""
        for _ in input_slabs(block, self.patch):
            self.wanted.release()  # the reader reads the slab after those ready, while the model waits for this one or runs
            waiting = time.perf_counter()
            item = self.read_queue.get()
            self.timing.read_wait += time.perf_counter() - waiting
            if isinstance(item, BaseException):
                raise _FromThread(item)
            yield item.to(self.device, non_blocking=True)

    def hand_on(self, block, planes, values):
        """A slab of the block's output to the writer (values None: the block is done)."""
        if self.write_errors:
            raise _FromThread(self.write_errors[0])
        waiting = time.perf_counter()
        self.write_queue.join()  # the slab before is written: one slab at a time is held for writing
        self.write_queue.put((block, planes, values))
        self.timing.write_wait += time.perf_counter() - waiting
        if values is not None:
            self.bar.update(values.size)

    def __exit__(self, *failure):
        self.stop.set()
        self.wanted.release()  # a reader waiting to be asked for a slab sees the stop
        self.reader.join()
        handing = time.perf_counter()
        self.write_queue.put(None)
        self.writer.join()
        self.timing.write_wait += time.perf_counter() - handing
        self.timing.total += time.perf_counter() - self.started
        if self.write_errors and failure[0] is None:
            raise self.write_errors[0]


def predict_blocks(scan, writer: BlockWriter, blocks, predictor: WindowPredictor, device, bar, timing: Timing,
                   read_ahead: int | None = None) -> int:
    """Predict `blocks`, reading their input on a reader thread and handing their output to `writer` on a writer
    thread, both in slabs of planes; returns windows skipped. `timing` gathers how long the model waited for I/O.

    The reader keeps `read_ahead` slabs ready beyond those the model took: by default one on a GPU, where a row of
    windows takes about as long as reading its slab, and none on the CPU, where the row takes a hundred times longer
    and the slab's memory would be held for nothing."""
    # a block's input and output go in slabs of planes (input_slabs; the output's chunks), so that what a block holds
    # does not grow with its depth
    if read_ahead is None:
        read_ahead = int(device.type != "cpu")
    skipped = windows = 0
    with _SlabThreads(scan, writer, blocks, predictor.patch, device, bar, timing, read_ahead) as threads:
        for block in blocks:
            computing, waited = time.perf_counter(), timing.read_wait + timing.write_wait
            try:
                with model_errors_named(block):
                    # the copies to the host wait for the device: compute ends with the block's last slab
                    skipped += predictor.predict(threads.slabs(block), block.input_origin, block.windows, block.output,
                                                 lambda planes, values, block=block: threads.hand_on(block, planes, values),
                                                 writer.align)
                timing.compute += time.perf_counter() - computing - (timing.read_wait + timing.write_wait - waited)
                threads.hand_on(block, None, None)
            except _FromThread as failure:
                raise failure.error from None
            windows += len(block.windows)
            bar.set_postfix_str(f"skipped {skipped / max(windows, 1):.0%} of windows")
    return skipped
