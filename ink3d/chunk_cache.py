"""Decompressed chunks of a volume held in memory and read through by boxes, shared by threads."""

import collections
import itertools
import threading

import numpy as np


class ChunkCache:
    """Decompressed chunks of a volume, by chunk index, read through by boxes: the least recently used dropped beyond
    `cache_bytes`, shared by threads. `read_chunks(indices)` reads and decompresses chunks (index -> array of the
    chunk, clipped to the volume). A thread takes the missing chunks that no other thread is reading (`together`:
    all of them at once, for a reader that reads them faster in one call; else one at a time, so that threads
    decompress a box's chunks side by side) and waits for those that one is: no chunk is decompressed twice."""

    def __init__(self, shape, chunks, dtype, cache_bytes: int, read_chunks, together: bool = False):
        self.shape, self.chunks, self.dtype = tuple(shape), tuple(chunks), np.dtype(dtype)
        self.cache_bytes, self.cached_bytes, self._read_chunks, self._together = cache_bytes, 0, read_chunks, together
        self._cache, self._lock, self._reading = collections.OrderedDict(), threading.Lock(), {}  # _reading: index -> set once read

    def read(self, box: list[tuple[int, int]]) -> np.ndarray:
        """The (start, stop) per axis box of the volume (a new array)."""
        out = np.empty([max(stop - start, 0) for start, stop in box], self.dtype)
        if not out.size:
            return out
        indices = list(itertools.product(*(range(start // chunk, -(-stop // chunk)) for (start, stop), chunk in zip(box, self.chunks))))
        chunks = self._chunks(indices)
        for index in indices:
            source, target = [], []
            for (start, stop), i, chunk in zip(box, index, self.chunks):
                low, high = max(start, i * chunk), min(stop, (i + 1) * chunk)
                source.append(slice(low - i * chunk, high - i * chunk))
                target.append(slice(low - start, high - start))
            out[tuple(target)] = chunks[index][tuple(source)]
        return out

    def values(self) -> list[np.ndarray]:
        """The chunks held."""
        with self._lock:
            return list(self._cache.values())

    def _chunks(self, indices: list[tuple[int, ...]]) -> dict:
        found = {}
        while len(found) < len(indices):
            with self._lock:
                for index in indices:
                    if index not in found and index in self._cache:
                        found[index] = self._cache[index]
                        self._cache.move_to_end(index)
                mine = [index for index in indices if index not in found and index not in self._reading]
                mine = mine if self._together else mine[:1]
                theirs = {self._reading[index] for index in indices if index not in found and index in self._reading}
                done = threading.Event()
                self._reading.update(dict.fromkeys(mine, done))
            if mine:
                try:
                    found.update(self._keep(self._read_chunks(mine)))
                finally:
                    with self._lock:
                        for index in mine:
                            del self._reading[index]
                    done.set()
            else:  # then taken from the cache, or read here if it was dropped or its read failed
                for reading in theirs:
                    reading.wait()
        return found

    def _keep(self, read: dict) -> dict:
        with self._lock:
            for index, values in read.items():
                self._cache[index] = values
                self.cached_bytes += values.nbytes
            while self.cached_bytes > self.cache_bytes and len(self._cache) > 1:  # the least recently used go first
                self.cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return read


def inside_of_chunk(index: tuple[int, ...], chunks, shape) -> tuple[slice, ...]:
    """The part of the chunk at `index` inside the volume: edge chunks are stored whole."""
    return tuple(slice(0, min(chunk, size - i * chunk)) for i, chunk, size in zip(index, chunks, shape))


def box_of(key, shape) -> list[tuple[int, int]] | None:
    """(start, stop) per axis of a key of slices with step 1; None for any other key."""
    key = key if isinstance(key, tuple) else (key,)
    if len(key) > 3 or not all(isinstance(part, slice) and part.step in (None, 1) for part in key):
        return None
    key += (slice(None),) * (3 - len(key))
    return [part.indices(size)[:2] for part, size in zip(key, shape)]
