"""A lane that dies leaves its share of the server to its siblings only once its fetches are over.

run_rank is driven with a fake comm whose requests the real CoordinatorThread.handle serves;
LaneThread is the real one. The fake Lane's run_lane raises while a fetch thread is still working
(as in a real Lane, whose ``close`` -> ``pool.shutdown(wait=True)`` waits for in-flight fetches,
which may still write a request that took its slot, or follow a redirect hop that takes a new slot
from the lane's own controller). Told "lane_failed" first, rank 0 had pushed the sibling its grown
share while the failed lane still sent: the server got more than its budget."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from distributed_downloader.engine import worker
from distributed_downloader.engine.coordinator import Coordinator
from tests.unit.test_coordinator import build_schedule, stats

EVENTS: list[tuple[float, str]] = []


class FakeController:
    share = 0.5
    level = None
    level_floor = None
    level_guessed = False
    level_measured = True

    def paused_until_epoch(self) -> float:
        return 0.0

    def congestion_count(self) -> int:
        return 0


class FakeLane:
    def __init__(self, spec, *args, **kwargs) -> None:  # noqa: ANN001
        self.spec = spec
        self.controller = FakeController()
        self._fetch: threading.Thread | None = None

    def snapshot(self) -> dict:
        return {}

    def run_lane(self, inbox, ask_more, finished) -> None:  # noqa: ANN001
        inbox.get()

        def fetch() -> None:  # an in-flight request: its redirect hop goes out 0.3 s later
            time.sleep(0.3)
            EVENTS.append((time.monotonic(), "failed lane sends a request (redirect hop)"))
            time.sleep(0.2)
            EVENTS.append((time.monotonic(), "failed lane's fetch over"))

        self._fetch = threading.Thread(target=fetch)
        self._fetch.start()
        raise RuntimeError("a bug in the lane")

    def close(self) -> None:  # Lane.close: pool.shutdown(wait=True)
        if self._fetch is not None:
            self._fetch.join()


class FakeComm:
    """Rank 1's comm; its requests are served by the real CoordinatorThread.handle (rank 0)."""

    def __init__(self, coordinator_thread) -> None:  # noqa: ANN001
        self.replies: list[dict] = []
        self.coordinator_thread = coordinator_thread

    def Get_rank(self) -> int:  # noqa: N802
        return 1

    def Get_size(self) -> int:  # noqa: N802
        return 2

    def Abort(self, code: int) -> None:  # noqa: N802
        raise SystemExit(code)

    def send(self, message: dict, dest: int, tag: int) -> None:
        self.replies.append(self.coordinator_thread.handle(1, message))

    def Iprobe(self, source: int, tag: int) -> bool:  # noqa: N802
        return tag == worker.TAG_REPLY and bool(self.replies)

    def recv(self, source: int, tag: int) -> dict:
        return self.replies.pop(0)


class Rank0Comm:
    """Rank 0's coordinator thread pushes through this: a share push is what makes the sibling grow."""

    def isend(self, push: dict, dest: int, tag: int):  # noqa: ANN201
        if push["kind"] == "share":
            EVENTS.append((time.monotonic(), f"share push to rank {dest}: sibling now {push['share']:.0%}"))
        return SimpleNamespace(Test=lambda: True)


def test_siblings_are_reshared_only_after_the_failed_lane_stopped_sending(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    coord = Coordinator(build_schedule(tmp_path, rules={"1": 2}), decrease=0.5)
    coord.request_lanes(0, free=3, held=set())  # rank 0: lane 0 of long.org, mid.org, short.org
    thread = worker.CoordinatorThread(Rank0Comm(), coord, tmp_path / "p.json", tmp_path / "m.json")
    monkeypatch.setattr(worker, "Lane", FakeLane)
    monkeypatch.setattr(worker, "RobotsCache", lambda *a, **k: None)
    monkeypatch.setattr(
        worker, "FetchSettings", SimpleNamespace(from_config=lambda p: SimpleNamespace(robots_token="x"))
    )
    monkeypatch.setattr(worker, "HostRegistry", lambda *a, **k: None)
    schedule = {
        "config": {"downloader_parameters": {"default_rate_limit": 1.0, "rate_multiplier": 0.5}},
        "round": 1,
        "servers": [{"server_name": "long.org"}],
    }
    owner = SimpleNamespace(lost=lambda: None)
    comm = FakeComm(thread)
    # rank 1's lane 1 of long.org; then rank 0's lane takes every batch left (none left to hand out)
    real_handle = thread.handle

    def handle(rank, message):  # noqa: ANN001, ANN202
        reply = real_handle(rank, message)
        if message["kind"] == "lanes":
            while coord.servers["long.org"].pending:
                coord.next_batch("long.org", 0, stats())
        return reply

    thread.handle = handle
    worker.run_rank(comm, schedule, SimpleNamespace(robots=None), 1, owner)
    EVENTS.sort()
    text = "\n".join(f"{t - EVENTS[0][0]:6.3f}s {what}" for t, what in EVENTS)
    print(text)
    order = [what for _, what in EVENTS]
    reshare_at = next(i for i, what in enumerate(order) if what.startswith("share push to rank 0"))
    last_send = order.index("failed lane sends a request (redirect hop)")
    assert reshare_at > last_send, "the sibling takes the whole server while the failed lane still sends:\n" + text
