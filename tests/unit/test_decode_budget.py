"""Unit tests for distributed_downloader.imaging.decode_budget: a byte budget shared by decoding threads.

Every wait is bounded (acquire timeouts, join timeouts), so a deadlock fails a test instead of hanging it.
"""

from __future__ import annotations

import platform
import random
import sys
import threading
import time
from collections.abc import Callable

import pytest

from distributed_downloader.imaging import decode_budget
from distributed_downloader.imaging.decode_budget import DecodeBudget

JOIN = 20.0  # seconds any thread may take before the test calls it a deadlock


class _Thread(threading.Thread):
    """A daemon thread that keeps what its target raised (an assert in a thread must fail the test)."""

    def __init__(self, target: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._work = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # handed to the test thread
            self.error = exc


def _start(target: Callable[[], object]) -> _Thread:
    thread = _Thread(target)
    thread.start()
    return thread


def _join(*threads: _Thread) -> None:
    for thread in threads:
        thread.join(JOIN)
        assert not thread.is_alive(), "thread still waiting: deadlock"
        if thread.error is not None:
            raise thread.error


def _until(condition: Callable[[], bool], timeout: float = JOIN) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.002)


def test_never_exceeds_capacity_with_many_threads() -> None:
    budget = DecodeBudget(100)
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            size = rng.randint(1, 60)
            if not budget.acquire(size, timeout=JOIN):
                errors.append("timed out")
                return
            try:
                if budget.reserved > budget.capacity:
                    errors.append(f"{budget.reserved} reserved")
                time.sleep(rng.random() * 0.001)
            finally:
                budget.release(size)

    _join(*[_start(lambda s=seed: worker(s)) for seed in range(16)])
    assert errors == []
    assert 0 < budget.peak_reserved <= budget.capacity
    assert budget.peak_holders >= 2  # the threads did overlap
    assert budget.waits > 0  # and some had to wait
    assert budget.reserved == 0 and budget.holders == 0


def test_oversize_reservation_runs_alone_then_others_resume() -> None:
    budget = DecodeBudget(100)
    assert budget.acquire(30) and budget.acquire(30)
    big_done = threading.Event()

    def big() -> None:
        assert budget.acquire(250, timeout=JOIN)
        assert budget.holders == 1  # nothing else in flight
        big_done.wait(JOIN)
        budget.release(250)

    thread = _start(big)
    _until(lambda: budget.waits == 1)
    assert budget.holders == 2  # it waits while anything else holds memory
    budget.release(30)
    time.sleep(0.05)
    assert budget.holders == 1  # still waiting for the second one
    budget.release(30)
    _until(lambda: budget.reserved == 250)
    assert not budget.acquire(1, timeout=0.05)  # nothing joins it while it runs
    big_done.set()
    _join(thread)
    assert budget.acquire(100, timeout=JOIN)
    budget.release(100)
    assert budget.peak_reserved == 250 and budget.reserved == 0


def test_waiters_are_served_in_arrival_order() -> None:
    # A large reservation at the head is not starved by small ones that would fit before it.
    budget = DecodeBudget(100)
    assert budget.acquire(60)
    order: list[str] = []

    def want(name: str, size: int) -> None:
        assert budget.acquire(size, timeout=JOIN)
        order.append(name)
        budget.release(size)

    large = _start(lambda: want("large", 80))
    _until(lambda: budget.waits == 1)
    small = _start(lambda: want("small", 10))  # 60 + 10 fits, but the large one came first
    _until(lambda: budget.waits == 2)
    time.sleep(0.05)
    assert order == []
    budget.release(60)
    _join(large, small)
    assert order[0] == "large"


def test_timed_out_waiter_leaves_the_queue() -> None:
    budget = DecodeBudget(100)
    assert budget.acquire(90)
    assert not budget.acquire(50, timeout=0.05)
    assert budget.acquire(10, timeout=1.0)  # not stuck behind the one that gave up
    budget.release(10)
    budget.release(90)
    assert budget.reserved == 0 and budget.holders == 0


def test_reserve_releases_when_the_block_raises() -> None:
    budget = DecodeBudget(100)
    with pytest.raises(RuntimeError, match="decode failed"), budget.reserve(70):
        assert budget.reserved == 70
        raise RuntimeError("decode failed")
    assert budget.reserved == 0 and budget.holders == 0
    assert budget.acquire(100, timeout=1.0)  # the whole budget is free again
    budget.release(100)


def test_release_of_nothing_reserved_is_an_error() -> None:
    budget = DecodeBudget(10)
    with pytest.raises(RuntimeError):
        budget.release(1)
    assert budget.acquire(5)
    with pytest.raises(RuntimeError):
        budget.release(6)
    budget.release(5)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DecodeBudget(0)


def test_shared_budget_is_one_per_size() -> None:
    assert decode_budget.shared(123_456) is decode_budget.shared(123_456)
    assert decode_budget.shared(123_456) is not decode_budget.shared(654_321)
    assert decode_budget.shared(123_456).capacity == 123_456


def test_tune_allocator_leaves_a_chosen_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_budget, "_tuned", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert decode_budget.tune_allocator() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert decode_budget.tune_allocator() is False  # tried once per process
    monkeypatch.setattr(decode_budget, "_tuned", None)
    tuned = decode_budget.tune_allocator()
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert tuned is True
