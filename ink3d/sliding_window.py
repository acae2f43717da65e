"""Sliding-window prediction over a region, split into output macro-blocks with exact results.

Windows lie on the grid of docs/DESIGN.md: along each axis they start at the volume's start, step
by `stride = patch * (1 - overlap)`, and the last one lies flush against the volume's end (the grid
of MONAI and pytorch-3dunet); a region runs the windows of that grid that touch it. Each window's sigmoid probabilities are weighted by the Gaussian
importance map (or uniformly) and averaged. An output macro-block runs every window that
touches it, reading the input those windows need, so its voxels get exactly the windows (in the
same order) that one in-memory pass over the whole region would give them: no seams.
"""

import collections
import itertools
import math
import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ink3d.device import autocast
from ink3d.intensity import Normalization
from ink3d.memory import reuse_freed_memory

GAUSSIAN_SIGMA_SCALE = 0.125
GAUSSIAN_FLOOR = 1e-3


def window_starts(start: int, stop: int, patch: int, stride: int) -> list[int]:
    """Window origins along one axis: start, start + stride, ..., and the last flush at stop - patch."""
    if stop - start <= patch:
        return [start]
    starts = list(range(start, stop - patch, stride))
    return starts + [stop - patch]


def importance_map(patch: int, blend: str) -> np.ndarray:
    """Per-voxel window weight: 1 everywhere ('constant'), or a product of 1D Gaussians centred on the
    window with sigma = patch / 8, scaled to a maximum of 1 and clamped below at 1e-3 ('gaussian')."""
    if blend == "constant":
        return np.ones((patch,) * 3, np.float32)
    if blend != "gaussian":
        raise ValueError(f"blend {blend!r}: choose gaussian or constant")
    x = torch.arange(-(patch - 1) / 2.0, (patch - 1) / 2.0 + 1, dtype=torch.float)
    g = torch.exp(x**2 / (-2 * (patch * GAUSSIAN_SIGMA_SCALE) ** 2))
    weights = g[:, None, None] * g[None, :, None] * g[None, None, :]
    return weights.clamp(min=max(weights.min().item(), GAUSSIAN_FLOOR)).numpy()


@dataclass
class Block:
    index: int
    output: tuple[slice, slice, slice]  # voxels this block writes (volume coordinates)
    input_origin: np.ndarray  # zyx origin of the input box its windows read
    input_shape: tuple[int, int, int]
    windows: list[tuple[int, int, int]]  # window origins, volume coordinates


def plan_blocks(region, context, patch: int, stride: int, block: int) -> list[Block]:
    """Output macro-blocks tiling `region`: the cells of a grid of `block` voxels from the volume's origin, cut to
    the region (so that a volume's chunks, when `block` is a multiple of them, each lie in one block), with
    windows on the grid of `context`.

    `region` and `context` are zyx slices; `context` contains `region` and is where windows may
    read (the region plus real surrounding volume).
    """
    starts = [window_starts(c.start, c.stop, patch, stride) for c in context]
    per_axis = []
    for r, axis_starts in zip(region, starts):
        pieces = []
        for a in [r.start, *range((r.start // block + 1) * block, r.stop, block)]:
            b = min((a // block + 1) * block, r.stop)
            touching = [s for s in axis_starts if s < b and s + patch > a]
            pieces.append((slice(a, b), touching))
        per_axis.append(pieces)
    blocks = []
    for index, pieces in enumerate(itertools.product(*per_axis)):
        output = tuple(piece[0] for piece in pieces)
        origin = np.array([piece[1][0] for piece in pieces])
        shape = tuple(int(piece[1][-1] + patch - o) for piece, o in zip(pieces, origin))
        windows = list(itertools.product(*(piece[1] for piece in pieces)))
        blocks.append(Block(index, output, origin, shape, windows))
    return blocks


def batch_slots(windows, batch_size: int, placed=None) -> Iterator[list]:
    """Batches of `batch_size` slots holding windows (from `windows`, (window, place) pairs in grid order, its place
    on the volume's window grid) or None, each window in the slot its place gives it (the sum of its grid indices,
    modulo the batch size); a batch ends where the next window's slot is taken, and is yielded then, so that windows
    may be decided on (air or not) as they come. `placed(slot, window)`, if given, is called as each window takes its
    slot, before the next window is drawn. Empty slots are run on a copy of one of the batch's windows and
    their result is dropped. CPU kernels may compute a window differently at another batch size or slot, and a
    window's result must not depend on the region it was run for: this way every run computes it in the same slot of
    a batch of the same size, and the windows still come in grid order (the order their probabilities are summed in)."""
    batch = [None] * batch_size
    for window, place in windows:
        slot = sum(place) % batch_size
        if batch[slot] is not None:
            yield batch
            batch = [None] * batch_size
        batch[slot] = window
        if placed is not None:
            placed(slot, window)
    if any(window is not None for window in batch):
        yield batch


def input_slabs(block: Block, patch: int) -> list[tuple[int, int]]:
    """The planes of a block's input box in slabs, (start, stop) from the box's first plane, cut where a row of
    windows starts or ends: the rows need them in turn, and each can be let go once the rows before the last that
    reaches it are done."""
    starts = {int(window[0] - block.input_origin[0]) for window in block.windows}
    cuts = sorted((starts | {start + patch for start in starts}) - {0})
    return list(zip([0, *cuts[:-1]], cuts))


def batch_fill(patch: int, stride: int, block: int, batch_size: int) -> float:
    """The share of the batches' slots that windows take in a macro-block inside the volume (the others repeat a
    window): close to 1 where a block's rows of windows are a multiple of the batch size or one more, e.g. where the
    batch size divides block / stride at overlap 0.5. Counted over at most 2 x batch_size planes and rows of the
    block (a row's first slot moves by one from row to row and from plane to plane, so the pattern about repeats:
    within a few hundredths of the whole block's count), so that it stays quick for blocks of many windows."""
    line = (slice(0, 4 * block + patch),)  # the volume's far end, with its flush window, out of the second block's reach
    axis = [start // stride for (start,) in plan_blocks(line, line, patch, stride, block)[1].windows]
    rows = axis[:2 * batch_size]
    windows = list(itertools.product(rows, rows, axis))
    return len(windows) / (sum(1 for _ in batch_slots(enumerate(windows), batch_size)) * batch_size)


def fuller_batches(patch: int, stride: int, block: int, batch_size: int, chunk: int = 1, enough: float = 0.97) -> str:
    """As advice: the macro-block nearest `block` among the multiples of both the stride and `chunk`, and the largest
    batch size below `batch_size`, whose batches are at least `enough` full."""
    unit = math.lcm(stride, chunk)
    blocks = sorted(range(unit, 2 * max(block, unit) + 1, unit), key=lambda size: (abs(size - block), size))
    choices = [f"--macro_block {size}" for size in blocks if batch_fill(patch, stride, size, batch_size) >= enough][:1]
    choices += [f"--batch_size {size}" for size in range(batch_size - 1, 1, -1) if batch_fill(patch, stride, block, size) >= enough][:1]
    return " or ".join(choices)


SLAB_VOXELS = 1 << 21  # the blending weights' sums are made this many voxels at a time
# test-time augmentation: every combination of flips of the spatial axes of (N, C, D, H, W), the identity first
FLIPS = [dims for count in range(4) for dims in itertools.combinations((2, 3, 4), count)]


def _window_cells(windows, origin, output, patch: int):
    """The output's shape in the input box read at `origin`; per window its box slices (cells) and (its part inside
    the output, the same part in the window) (parts)."""
    inside = [(o.start - int(b), o.stop - int(b)) for o, b in zip(output, origin)]
    shape = tuple(stop - start for start, stop in inside)
    cells, parts = [], []
    for window in windows:
        starts = [int(w - o) for w, o in zip(window, origin)]
        cells.append(tuple(slice(a, a + patch) for a in starts))
        first = [max(a, i0) for a, (i0, _) in zip(starts, inside)]
        stop = [min(a + patch, i1) for a, (_, i1) in zip(starts, inside)]
        parts.append((tuple(slice(f - i0, e - i0) for f, e, (i0, _) in zip(first, stop, inside)),
                      tuple(slice(f - a, e - a) for f, e, a in zip(first, stop, starts))))
    return shape, cells, parts


class WindowPredictor:
    """Runs a model over the windows of one input box and blends them into uint8 probabilities.

    The input batch, the blending's sums and the summed weights (and, with flips, the probabilities) are buffers kept
    from block to block (grown to the largest block), so that a long run does not allocate, and the system does not zero,
    fresh memory for every block; on the CPU they lie out of the heap (see _own_memory), which then holds little but
    the model's activations."""

    def __init__(self, model, patch: int, blend: str, batch_size: int, device, dtype=None,
                 channels_last: bool = False, skip_max: int = -1, tta: bool = False, normalization: Normalization = Normalization(),
                 stride: int | None = None, keep_freed_memory: bool = False):
        self.model, self.patch, self.batch_size = model, patch, batch_size
        self.stride = stride or patch  # of the window grid: consecutive windows take consecutive slots of a batch
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.weights = torch.from_numpy(importance_map(patch, blend)).to(self.device)
        self.skip_max = skip_max
        self.flips = FLIPS if tta else [()]
        self.normalization = normalization
        self.buffers: dict[str, torch.Tensor] = {}
        self.keep_freed_memory = keep_freed_memory  # from the second batch on (see predict)

    def _buffer(self, name: str, shape) -> torch.Tensor:
        """A float32 tensor of `shape` in the buffer `name`, which is grown when it is too small."""
        count = math.prod(shape)
        if name not in self.buffers or self.buffers[name].numel() < count:
            self.buffers.pop(name, None)  # freed before its successor is made
            self.buffers[name] = _own_memory((count,), torch.float32, self.device)
        return self.buffers[name][:count].view(shape)

    @torch.no_grad()
    def predict(self, slabs: Iterable[torch.Tensor], origin: np.ndarray, windows, output, emit, align: int = 1) -> int:
        """Blend the windows' probabilities over the `output` slices into uint8 (`round(255 p)`), handed to
        `emit(planes, values)` (a slice of the volume's z, values on the host) as planes are finished, in order and in
        runs that end on multiples of `align` planes of the volume or at the output's end. Returns the number of
        windows skipped.

        The input box, read at volume position `origin`, comes as `slabs`: uint8 tensors (planes, H, W) on the
        device, in order (see input_slabs); each is taken when a row of windows first needs it and dropped once the
        rows that reach it are in batches (each window's input is copied into its batch slot as it takes the slot).
        Only the output's voxels are summed (each window's part inside it), in the order a sum over the whole box
        would take. The sums are kept for the planes that windows still reach only, in a ring of `patch` planes:
        windows come in grid order, so the planes before a window are final once the windows before it are summed,
        and are divided and rounded, and their ring planes reused. A block thus holds about `patch` planes of its
        input and of its sums whatever its depth.
        """
        p = self.patch
        shape, cells, parts = _window_cells(windows, origin, output, p)
        planes = _Planes(slabs)
        handed = []  # the windows handed to the model

        def windows_to_run():
            """(index, cell) of the windows the model runs, in grid order; a row's air is judged once its planes are read."""
            for start, row in itertools.groupby(range(len(cells)), key=lambda index: cells[index][0].start):
                planes.drop(start)  # the rows before are copied into batches: no window to come reaches these planes
                planes.need(start + p)
                row = list(row)
                if self.skip_max >= 0:  # air: probability 0, the model is not run; one device sync per row
                    maxima = torch.stack([planes.amax(cells[index]) for index in row]).tolist()
                    row = [index for index, maximum in zip(row, maxima) if maximum > self.skip_max]
                handed.extend(row)
                for index in row:
                    yield index, cells[index]

        numerator = self._buffer("numerator", (min(shape[0], p), *shape[1:])).zero_()
        finished = _Finished(output[0], align, emit)
        final = 0  # the output's planes before this are finished
        batch = self._buffer("batch", (self.batch_size, 1, p, p, p))
        for batch_windows in self._batches(windows_to_run(), origin, lambda slot, index: planes.copy(cells[index], batch[slot, 0])):
            probabilities = self._run_batch(batch, batch_windows)
            for slot in sorted((slot for slot, index in enumerate(batch_windows) if index is not None), key=batch_windows.__getitem__):
                target, source = parts[batch_windows[slot]]  # in grid order: no later window reaches the planes before it
                self._finish(numerator, final, target[0].start, parts, finished)
                final = target[0].start
                self._add(numerator, target, probabilities[slot][source].mul_(self.weights[source]))  # in place: used once
            del probabilities  # before the next batch's activations are allocated (see _probabilities)
        self._finish(numerator, final, shape[0], parts, finished)
        return len(cells) - len(handed)

    def _run_batch(self, batch: torch.Tensor, batch_windows: list) -> torch.Tensor:
        """The model's probabilities for a batch whose empty slots (None) are filled with a copy of a window's input."""
        first = next(slot for slot, index in enumerate(batch_windows) if index is not None)
        for slot, index in enumerate(batch_windows):
            if index is None:
                batch[slot].copy_(batch[first])
        model_input = self.normalization.normalize_(batch)
        if self.channels_last:  # a single channel: the same memory, only marked channels-last
            model_input = model_input.contiguous(memory_format=torch.channels_last_3d)
        probabilities = self._probabilities(model_input)
        if self.keep_freed_memory:
            # memory the model frees now stays in the process for the next batch (ink3d.memory). The first batch
            # ran under the system's default, which maps large blocks apart: what the model's first run keeps for
            # good (oneDNN's caches) settled in the heap before any activation, not in holes between them, where
            # it would have left the next batch's activations no room
            reuse_freed_memory()
            self.keep_freed_memory = False
        return probabilities

    @staticmethod
    def _ring(depth: int, start: int, stop: int) -> list[tuple[int, int, int]]:
        """The output planes start..stop as (first plane, ring plane, count) runs of the ring of `depth` planes."""
        runs = []
        while start < stop:
            ring = start % depth
            count = min(stop - start, depth - ring)
            runs.append((start, ring, count))
            start += count
        return runs

    def _add(self, numerator: torch.Tensor, target, addend: torch.Tensor) -> None:
        """numerator[target] += addend, the target's planes taken in the ring."""
        for plane, ring, count in self._ring(numerator.shape[0], target[0].start, target[0].stop):
            offset = plane - target[0].start
            numerator[(slice(ring, ring + count), *target[1:])] += addend[offset:offset + count]

    def _finish(self, numerator: torch.Tensor, start: int, stop: int, parts, finished: "_Finished") -> None:
        """The output planes start..stop divided by their windows' summed weights and rounded (as to_uint8) into
        `finished`, their ring planes cleared for the planes to come."""
        height, width = numerator.shape[1:]
        slab = max(1, SLAB_VOXELS // (height * width))
        for plane, ring, count in self._ring(numerator.shape[0], start, stop):
            for offset in range(0, count, slab):
                low, high = plane + offset, plane + min(offset + slab, count)
                sums = numerator[ring + offset:ring + offset + high - low]
                sums.div_(self._summed_weights(low, high, height, width, parts))
                finished.add(sums.clamp_(0, 1).mul_(255).round_())
                sums.zero_()

    def _summed_weights(self, start: int, stop: int, height: int, width: int, parts) -> torch.Tensor:
        """The windows' weights summed (in window order) over the output planes start..stop."""
        denominator = self._buffer("denominator", (stop - start, height, width)).zero_()
        for target, source in parts:
            low, high = max(target[0].start, start), min(target[0].stop, stop)
            if low < high:
                shift = source[0].start - target[0].start
                denominator[(slice(low - start, high - start), *target[1:])] += self.weights[(slice(low + shift, high + shift), *source[1:])]
        return denominator

    def _batches(self, cells, origin: np.ndarray, placed=None) -> Iterator[list]:
        """Batches of the windows `cells` ((index, box slices) pairs in grid order, of a box read at `origin`) as
        indices: see batch_slots."""
        return batch_slots(((index, tuple((piece.start + int(o)) // self.stride for piece, o in zip(cell, origin))) for index, cell in cells),
                           self.batch_size, placed)

    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's probabilities (N, D, H, W) for a batch (N, 1, D, H, W), averaged over the flips.

        The memory the model's activations take must never hold an earlier result while the next forward allocates
        them (on the CPU, such a remnant between them grows the process by a second set of activations). One pass's
        probabilities are the model's output itself, made in place and let go before the next batch; the flips' are
        summed in a buffer."""
        if len(self.flips) == 1:
            with autocast(self.device, self.dtype):
                logits = self.model(batch)
            return torch.sigmoid_(logits[:, 0].float())
        total = self._buffer("probabilities", (batch.shape[0], *batch.shape[2:]))
        for flip, dims in enumerate(self.flips):
            flipped = batch.flip(dims) if dims else batch
            with autocast(self.device, self.dtype):
                logits = self.model(flipped)
            logits = (logits.flip(dims) if dims else logits)[:, 0].float()
            if flip:
                total.add_(torch.sigmoid(logits))
            else:
                torch.sigmoid(logits, out=total)
            del logits
        return total.div_(len(self.flips))


def _own_memory(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor. On the CPU it gets memory of its own (an anonymous map, handed back to the system when
    it is freed), not the heap: the process keeps the heap's freed memory for the model's activations (ink3d.memory),
    and arrays that come and go between them would leave holes that make the heap grow by more than they hold."""
    size = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or not size:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype).view(shape)


class _Planes:
    """The planes of an input box that windows still need, held as the slabs (planes, H, W) that an iterable yields in
    order: taken as windows first need them, dropped once no window to come reaches them."""

    def __init__(self, slabs: Iterable[torch.Tensor]):
        self.slabs, self.held = iter(slabs), collections.deque()
        self.start = self.stop = 0  # the held slabs cover the box's planes start..stop

    def need(self, stop: int) -> None:
        while self.stop < stop:
            slab = next(self.slabs)
            self.held.append(slab)
            self.stop += len(slab)

    def drop(self, before: int) -> None:
        while self.held and self.start + len(self.held[0]) <= before:
            self.start += len(self.held.popleft())

    def pieces(self, cell) -> Iterator[tuple[slice, torch.Tensor]]:
        """The box's `cell` (slices) as (its planes within the cell, their values) from each slab it spans."""
        first, last, position = cell[0].start, cell[0].stop, self.start
        for slab in self.held:
            low, high = max(first, position), min(last, position + len(slab))
            if low < high:
                yield slice(low - first, high - first), slab[(slice(low - position, high - position), *cell[1:])]
            position += len(slab)

    def copy(self, cell, out: torch.Tensor) -> None:
        for planes, values in self.pieces(cell):
            out[planes].copy_(values)

    def amax(self, cell) -> torch.Tensor:
        return torch.stack([values.amax() for _, values in self.pieces(cell)]).amax()


class _Finished:
    """Finished output planes gathered into runs of uint8 that end on multiples of `align` planes of the volume (whole
    chunks of the output) or at the output's end, each handed on as soon as it is full."""

    def __init__(self, output: slice, align: int, emit):
        self.output, self.align, self.emit = output, align, emit
        self.run, self.start, self.filled = None, output.start, 0  # the run being filled starts at the volume's plane start

    def add(self, values: torch.Tensor) -> None:
        """Append planes (planes, H, W) of values in 0..255."""
        while len(values):
            if self.run is None:
                stop = min((self.start // self.align + 1) * self.align, self.output.stop)
                self.run = _own_memory((stop - self.start, *values.shape[1:]), torch.uint8, values.device)
            taken = min(len(values), len(self.run) - self.filled)
            self.run[self.filled:self.filled + taken] = values[:taken]
            self.filled, values = self.filled + taken, values[taken:]
            if self.filled == len(self.run):
                run, self.run, self.filled = self.run, None, 0
                self.emit(slice(self.start, self.start + len(run)), run.cpu().numpy())
                self.start += len(run)


def to_uint8(probabilities: np.ndarray) -> np.ndarray:
    """round(255 * p) as uint8."""
    return np.rint(np.clip(probabilities, 0, 1) * 255).astype(np.uint8)
