"""How inference runs a block: slabs read and written as the windows need them, batches and their slots, memory."""

import itertools
import platform
import re
import sys
import textwrap
import time
import warnings
import weakref

import numpy as np
import pytest
import torch
from tqdm import tqdm

import inference
from stage_process import run_code
from ink3d import volume
from ink3d.files import checksum
from ink3d import sliding_window
from ink3d.sliding_window import importance_map, plan_blocks, window_starts
from models import UNet3D
from inference_fixtures import PATCH, infer, write_scan


@pytest.mark.parametrize("ahead", [0, 1])
def test_slabs_are_read_as_asked_and_every_block_written_slab_by_slab(ahead, monkeypatch):
    """The reader reads each block's input in the slabs its rows of windows need (input_slabs), in turn as the model
    asks for them: exactly `ahead` slabs are read beyond those the model took (one on a GPU, none on the CPU). Every
    slab the model hands on reaches the writer, in order, once the one before it is written, and each block is then
    recorded finished with the CRC-32 of its slabs' bytes."""
    blocks = plan_blocks((slice(0, 40),) * 3, (slice(0, 40),) * 3, PATCH, PATCH // 2, 16)
    reads, written, read_ahead, handed, unwritten = [], [], [], [], []
    read_crop = volume.read_crop

    def counted(dataset, origin, shape, fill=0):
        reads.append((tuple(origin), tuple(shape)))
        time.sleep(0.002)  # a reader left unchecked would run ahead meanwhile
        return read_crop(dataset, origin, shape, fill)

    class Predictor:
        patch = PATCH

        def predict(self, slabs, origin, windows, output, emit, align):
            for slab in slabs:
                taken = len(read_ahead) + 1
                deadline = time.monotonic() + 30  # left as soon as the read begins
                while len(reads) < min(taken + ahead, len(expected)) and time.monotonic() < deadline:
                    time.sleep(0.001)  # the slabs ahead are being read, however busy the machine
                time.sleep(0.005)
                read_ahead.append(len(reads) - taken)
                assert slab.dtype == torch.uint8 and slab.shape[1:] == tuple(int(n) for n in block_of[tuple(origin)].input_shape[1:])
            values = values_of(output)
            middle = (output[0].start + output[0].stop) // 2
            for planes in (slice(output[0].start, middle), slice(middle, output[0].stop)):
                emit(planes, values[planes.start - output[0].start:planes.stop - output[0].start])
                handed.append(1)
                unwritten.append(len(handed) - sum(1 for item in written if item[1] != "finished"))
            return 1

    def write_slowly(block, planes, values):
        time.sleep(0.003)  # an unchecked model would hand on slab after slab meanwhile
        written.append((block.index, planes, values.copy()))

    def values_of(output):
        return np.random.default_rng(output[0].start * 100 + output[2].start).integers(0, 256, [s.stop - s.start for s in output], np.uint8)

    block_of = {tuple(block.input_origin): block for block in blocks}
    expected = [(tuple(block.input_origin + np.array([start, 0, 0])), (stop - start, *block.input_shape[1:]))
                for block in blocks for start, stop in sliding_window.input_slabs(block, PATCH)]
    monkeypatch.setattr(inference.volume, "read_crop", counted)
    writer = inference.BlockWriter(write_slowly, lambda block, crc: written.append((block.index, "finished", crc)), align=1)
    skipped = inference.predict_blocks(np.zeros((40, 40, 40), np.uint8), writer, blocks, Predictor(), torch.device("cpu"),
                                       tqdm(disable=True), inference.Timing(), read_ahead=ahead)
    assert skipped == len(blocks) == 27 and reads == expected and len(expected) > len(blocks)
    assert max(read_ahead) == ahead and max(unwritten) == 1  # the slab just handed on: the one before it is written
    for n, block in enumerate(blocks):
        first, second, record = written[3 * n:3 * n + 3]
        assert first[0] == second[0] == record[0] == block.index and record[1] == "finished"
        assert first[1].start == block.output[0].start and first[1].stop == second[1].start and second[1].stop == block.output[0].stop
        values = np.concatenate([first[2], second[2]])
        assert np.array_equal(values, values_of(block.output)) and record[2] == checksum(values)


def test_cpu_inference_keeps_freed_memory_from_its_second_batch_on(scan, model_path, tmp_path, monkeypatch):
    """The first batch runs under the system's memory policy (what the model's first run keeps for good settles before
    any activation); then the process keeps freed memory, once, before the second batch's forward."""
    scan_path, _ = scan
    events = []
    monkeypatch.setattr(sliding_window, "reuse_freed_memory", lambda: events.append("keep"))
    forward = UNet3D.forward
    monkeypatch.setattr(UNet3D, "forward", lambda self, x: events.append("forward") or forward(self, x))
    infer(scan_path, model_path, tmp_path / "pred.h5", "--device", "cpu")
    assert events[:3] == ["forward", "keep", "forward"] and events.count("keep") == 1 and events.count("forward") > 3


def _stream_one_block(box, predictor, align, monkeypatch):
    """Run `predictor` over the whole of `box` as one block streamed in its input slabs: (windows, slabs, windows
    skipped, the emitted (planes, values), the input planes held after each read)."""
    windows = list(itertools.product(*(window_starts(0, size, PATCH, PATCH // 2) for size in box.shape)))
    output = tuple(slice(0, size) for size in box.shape)
    slabs = sliding_window.input_slabs(sliding_window.Block(0, output, np.zeros(3, np.int64), box.shape, windows), PATCH)
    held, need = [], sliding_window._Planes.need
    monkeypatch.setattr(sliding_window._Planes, "need", lambda self, stop: need(self, stop) or held.append(self.stop - self.start))
    emitted = []
    skipped = predictor.predict((box[start:stop] for start, stop in slabs), np.zeros(3, np.int64), windows, output,
                                lambda planes, values: emitted.append((planes, values)), align)
    return windows, slabs, skipped, emitted, held


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_a_block_streamed_in_slabs_of_planes_equals_a_plain_sum_over_the_whole_block(batch_size, monkeypatch):
    """A block deeper than a window and a stride takes its input in slabs of planes, keeps its sums in a ring of planes
    and hands on its finished planes in runs that end on whole chunks: the values equal a plain loop that sums every
    window over the whole block, and it holds no more than a window's depth of input planes."""
    box = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (48, 20, 20)).astype(np.uint8))
    predictor = inference.WindowPredictor(torch.nn.Identity(), PATCH, "gaussian", batch_size, "cpu", stride=PATCH // 2)
    windows, slabs, skipped, emitted, held = _stream_one_block(box, predictor, 10, monkeypatch)
    weights = torch.from_numpy(importance_map(PATCH, "gaussian"))
    numerator, denominator = torch.zeros(box.shape), torch.zeros(box.shape)
    for window in windows:
        cell = tuple(slice(start, start + PATCH) for start in window)
        probabilities = torch.sigmoid(predictor.normalization.normalize_(box[cell].float()[None, None]))[0, 0]
        numerator[cell] += weights * probabilities
    for window in windows:
        denominator[tuple(slice(start, start + PATCH) for start in window)] += weights
    expected = (numerator / denominator).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    assert skipped == 0 and np.array_equal(np.concatenate([values for _, values in emitted]), expected)
    # planes are finished at each row of windows (0, 8, ..., 32) and at the end, and handed on in runs of whole chunks
    assert [(planes.start, planes.stop) for planes, _ in emitted] == [(0, 10), (10, 20), (20, 30), (30, 40), (40, 48)]
    assert slabs == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 48)] and max(held) == PATCH
    assert predictor.buffers["numerator"].numel() == PATCH * 20 * 20  # a ring of 16 planes, not the 48


def test_rows_of_air_let_their_planes_go(monkeypatch):
    """Windows skipped as air never reach the model, and their planes are let go as the next rows are read: a block
    that is air down to its last rows holds no more of its input than one that is not."""
    box = torch.zeros((48, 20, 20), dtype=torch.uint8)
    box[40:] = 7
    predictor = inference.WindowPredictor(torch.nn.Identity(), PATCH, "gaussian", 3, "cpu", skip_max=0, stride=PATCH // 2)
    windows, _, skipped, emitted, held = _stream_one_block(box, predictor, 1, monkeypatch)
    values = np.concatenate([values for _, values in emitted])
    assert skipped == 16 and len(windows) == 20  # rows starting at 0, 8, 16 and 24 end before plane 40
    assert not values[:32].any() and values[40:].all() and max(held) == PATCH  # 32..39: partly air


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator")
def test_own_memory_is_handed_back_when_freed():
    """On the CPU, the output's finished planes and the blending's buffers get memory of their own, handed back to the
    system when freed, even where the process keeps freed memory for the model's activations (which would keep them,
    and leave their holes). One process measures each dtype's own memory, then the heap's (which keeps what it freed)."""
    script = textwrap.dedent("""
        import re
        from pathlib import Path
        import torch
        from ink3d import sliding_window
        from ink3d.memory import reuse_freed_memory
        reuse_freed_memory()
        rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) >> 10
        for how in ("own", "heap"):
            for dtype in (torch.uint8, torch.float32):
                shape = (64 // dtype.itemsize, 1024, 1024)
                values = sliding_window._own_memory(shape, dtype, torch.device("cpu")) if how == "own" else torch.empty(shape, dtype=dtype)
                values.fill_(7)
                assert values.dtype == dtype and values.shape == shape and int(values[-1, -1, -1]) == 7
                before = rss()
                del values
                print(how, before - rss())
    """)
    lines = run_code(script).stdout.split("\n")
    freed = [line.split() for line in lines if line]
    assert [how for how, _ in freed] == ["own", "own", "heap", "heap"]
    assert all(int(mb) >= 60 for how, mb in freed if how == "own") and all(int(mb) < 4 for how, mb in freed if how == "heap")  # of 64
    for dtype in (torch.uint8, torch.float32):
        assert sliding_window._own_memory((0, 64, 64), dtype, torch.device("cpu")).shape == (0, 64, 64)


@pytest.mark.parametrize("shape, batch_size", [((3, 4, 9), 4), ((2, 5, 5), 3), ((1, 1, 7), 2)])
def test_windows_take_their_grid_slot_once_each_in_grid_order(shape, batch_size):
    predictor = inference.WindowPredictor(torch.nn.Identity(), 4, "constant", batch_size, "cpu", stride=2)
    origin = np.array([6, 0, 10])
    grid = list(itertools.product(*(range(n) for n in shape)))
    keep = [i for i in range(len(grid)) if i % 5 != 3]  # windows skipped as air leave gaps
    cells = [tuple(slice(2 * g, 2 * g + 4) for g in grid[i]) for i in keep]
    events = []  # ("drawn", index), ("placed", slot, index) and ("batch", its windows) as they happen

    def drawn():
        for index, cell in enumerate(cells):
            events.append(("drawn", index))
            yield index, cell

    batches = []
    for batch in predictor._batches(drawn(), origin, lambda slot, index: events.append(("placed", slot, index))):
        events.append(("batch", tuple(batch)))
        batches.append(batch)
    run = [sorted(index for index in batch if index is not None) for batch in batches]
    assert sum(run, []) == list(range(len(cells)))  # every window once, batch after batch in grid order
    # each window takes its slot before the next is drawn, and after the batch before its own was yielded
    expected, batch_of = [], {index: n for n, batch in enumerate(batches) for index in batch if index is not None}
    for index in range(len(cells)):
        expected.append(("drawn", index))
        if index and batch_of[index] != batch_of[index - 1]:
            expected.append(("batch", tuple(batches[batch_of[index - 1]])))
        expected.append(("placed", batches[batch_of[index]].index(index), index))
    assert events == expected + [("batch", tuple(batches[-1]))]
    for batch in batches:
        assert len(batch) == batch_size
        for slot, index in enumerate(batch):
            assert index is None or slot == sum(piece.start // 2 + int(o) // 2 for piece, o in zip(cells[index], origin)) % batch_size


@pytest.mark.parametrize("patch, stride, block, batch_size, tolerance", [
    (128, 64, 512, 8, 0), (128, 64, 512, 16, 0), (128, 64, 384, 8, 0), (128, 96, 576, 8, 0), (16, 8, 32, 3, 0), (16, 12, 36, 4, 0),
    (8, 4, 64, 5, 0.03), (16, 8, 96, 4, 0.03)])  # rows and planes beyond 2 x batch_size: counted on a part of the block
def test_batch_fill_is_the_share_of_slots_an_inner_block_fills(patch, stride, block, batch_size, tolerance):
    region = tuple(slice(0, 3 * block) for _ in range(3))
    inner = next(b for b in inference.plan_blocks(region, region, patch, stride, block) if all(s.start == block for s in b.output))
    predictor = inference.WindowPredictor(torch.nn.Identity(), patch, "constant", batch_size, "cpu", stride=stride)
    cells = [tuple(slice(int(w - o), int(w - o) + patch) for w, o in zip(window, inner.input_origin)) for window in inner.windows]
    batches = list(predictor._batches(enumerate(cells), inner.input_origin))
    assert inference.batch_fill(patch, stride, block, batch_size) == pytest.approx(len(cells) / (len(batches) * batch_size),
                                                                                   abs=tolerance, rel=0)


def test_batches_left_part_empty_are_warned_of_with_settings_that_fill_them(scan, model_path, tmp_path):
    scan_path, _ = scan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        infer(scan_path, model_path, tmp_path / "full.h5")  # rows of 3 windows, batches of 3
    with pytest.warns(UserWarning, match=r"--batch_size 4 with --macro_block 16: a block's batches run 75% full") as caught:
        infer(scan_path, model_path, tmp_path / "part.h5", "--batch_size", "4")
    block, batch_size = (int(v) for v in re.search(r"--macro_block (\d+) or --batch_size (\d+) fills them", str(caught[0].message)).groups())
    assert block % 128 == 0 and inference.batch_fill(PATCH, PATCH // 2, block, 4) >= 0.97
    assert batch_size < 4 and inference.batch_fill(PATCH, PATCH // 2, 16, batch_size) >= 0.97


def test_no_earlier_output_is_held_while_the_model_runs_again(model_path, tmp_path, monkeypatch):
    """Without flips the model's output is the batch's probabilities: it is let go before the next batch's forward
    allocates its activations."""
    outputs, held = [], []
    forward = UNet3D.forward

    def recorded(self, x):
        held.append(sum(output() is not None for output in outputs))
        result = forward(self, x)
        outputs.append(weakref.ref(result))
        return result

    monkeypatch.setattr(UNet3D, "forward", recorded)
    values = np.random.default_rng(4).integers(1, 256, (32, 32, 48)).astype(np.uint8)
    infer(write_scan(tmp_path / "scan.h5", values), model_path, tmp_path / "pred.h5", "--device", "cpu")
    assert len(held) > 3 and not any(held)


def test_flipped_probabilities_are_summed_in_one_buffer(model_path, tmp_path, monkeypatch):
    """With flips, the probabilities are summed in the same memory flip after flip and batch after batch: no earlier
    result is held in the heap while the next forward's activations are allocated."""
    addresses = []
    original = inference.WindowPredictor._probabilities

    def recorded(self, batch):
        result = original(self, batch)
        addresses.append(result.data_ptr())
        return result

    monkeypatch.setattr(inference.WindowPredictor, "_probabilities", recorded)
    values = np.random.default_rng(4).integers(1, 256, (32, 32, 48)).astype(np.uint8)
    infer(write_scan(tmp_path / "scan.h5", values), model_path, tmp_path / "pred.h5", "--tta", "true")
    assert len(addresses) > 1 and len(set(addresses)) == 1
