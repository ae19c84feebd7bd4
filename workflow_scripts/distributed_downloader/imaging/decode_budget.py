"""A per-process budget of bytes that image decodes may hold at once.

A rank decodes on every download thread (up to 16 lanes x 8 connections), and one image may need
gigabytes within the pixel cap, so without a bound a burst of large images takes the node's memory.
Each decode reserves its estimated working memory first and waits (first come, first served) until
it fits; an image larger than the whole budget waits until nothing else is in flight and then runs
alone, so it is slow but never refused.

The budget bounds live memory; ``tune_allocator`` makes RSS follow it (see there).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class DecodeBudget:
    """Bytes in flight, at most ``capacity`` (or one reservation alone when it is larger)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 byte, got {capacity}")
        self.capacity = capacity
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # tickets of waiting reservations, oldest first
        self._reserved = 0
        self._holders = 0
        # Instrumentation (tests, logs): the most bytes and reservations held at once, and the waits.
        self.peak_reserved = 0
        self.peak_holders = 0
        self.waits = 0

    @property
    def reserved(self) -> int:
        with self._cond:
            return self._reserved

    @property
    def holders(self) -> int:
        with self._cond:
            return self._holders

    def _fits(self, nbytes: int) -> bool:
        # Nothing in flight: anything runs, even an image larger than the whole budget.
        return self._holders == 0 or self._reserved + nbytes <= self.capacity

    def _take(self, nbytes: int) -> None:
        self._reserved += nbytes
        self._holders += 1
        self.peak_reserved = max(self.peak_reserved, self._reserved)
        self.peak_holders = max(self.peak_holders, self._holders)

    def acquire(self, nbytes: int, timeout: float | None = None) -> bool:
        """Reserve ``nbytes``, waiting until they fit; False if ``timeout`` seconds passed first."""
        nbytes = max(0, int(nbytes))
        with self._cond:
            if not self._queue and self._fits(nbytes):
                self._take(nbytes)
                return True
            # Strict arrival order: a large reservation at the head holds back smaller ones behind it,
            # otherwise a steady flow of small images would starve it (it needs the budget to drain).
            ticket = object()
            self._queue.append(ticket)
            self.waits += 1
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                while not (self._queue[0] is ticket and self._fits(nbytes)):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                self._take(nbytes)
                return True
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # a new head of the queue may fit now

    def release(self, nbytes: int) -> None:
        nbytes = max(0, int(nbytes))
        with self._cond:
            if self._holders < 1 or nbytes > self._reserved:
                raise RuntimeError(f"release of {nbytes} bytes that were not reserved")
            self._reserved -= nbytes
            self._holders -= 1
            self._cond.notify_all()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` for the duration of the block; released whatever the block raises."""
        self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)


_shared: dict[int, DecodeBudget] = {}
_shared_lock = threading.Lock()


def shared(capacity: int) -> DecodeBudget:
    """The process's budget of ``capacity`` bytes: every caller with the same size shares one.

    The first call also runs ``tune_allocator``: a process that bounds its decodes wants the freed
    memory back.
    """
    with _shared_lock:
        budget = _shared.get(capacity)
        if budget is None:
            tune_allocator()
            budget = _shared[capacity] = DecodeBudget(capacity)
        return budget


_M_TOP_PAD = -2  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 << 20
TOP_PAD = 16 << 20
_tuned: bool | None = None  # None: not tried yet; else whether glibc took the setting


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold at 16 MiB and keep 16 MiB free per arena, once per process; True if
    glibc took the threshold.

    glibc raises its mmap and trim thresholds each time a large block is freed (up to 32 and 64 MiB),
    and from then on decode-sized blocks come from per-thread arenas that keep them after free: 16
    threads under a 256 MB budget settled at 1.3 GB RSS, the sum of every arena's high-water mark;
    with the threshold set (which turns that adjustment off) they peaked at 0.3 GB (bench/README.md).
    Setting it also left the trim threshold at 128 kB: every free at an arena's top gave the memory
    back and the next body or image faulted it in again, page by page (issue #16: ~1,700 page faults
    and ~9 ms of system time per large JPEG, ~3,700 and ~18 ms per 2400x1600 PNG in a lane). The
    top pad keeps up to 16 MiB free at each arena's top when it trims: a lane's large JPEG costs
    ~400 faults and ~12 ms less CPU, a PNG ~850 and ~10 ms less; RSS keeps at most 16 MiB more per
    arena (16 decoding threads, 256 / 1024 MB budget: 318 -> 411 / 752 -> 829 MB peak; a rank of the
    images per core bench ~+65 MB). Leaves alone a process whose MALLOC_*_ environment already
    chose, and allocators without mallopt (musl, macOS).
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")):
        return _tuned
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return _tuned
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _tuned = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if _tuned:
        mallopt(_M_TOP_PAD, TOP_PAD)
    return _tuned
