"""The download coordinator's bookkeeping (no MPI here, so it is unit-testable).

It owns every server's lanes and pending batches. A rank asking for work gets lanes of servers
it does not hold yet, longest server first; a lane asking for its next batch gets one of its
server's remaining batches. A server never has more lanes open than the schedule allows, which
is what keeps its total rate within its budget.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class _ServerState:
    info: dict
    pending: deque = field(default_factory=deque)
    open_lanes: set[int] = field(default_factory=set)
    holders: dict[int, int] = field(default_factory=dict)  # lane index -> rank
    done_batches: int = 0
    failed: bool = False


@dataclass
class Assignment:
    lane: dict  # LaneSpec fields
    batch: dict  # BatchWork fields


class Coordinator:
    def __init__(self, schedule: Mapping, decrease: float) -> None:
        self.servers: dict[str, _ServerState] = {}
        self.order: list[str] = []
        for info in schedule["servers"]:
            state = _ServerState(info=info, pending=deque(info["batches"]))
            self.servers[info["server_name"]] = state
            self.order.append(info["server_name"])
        self.decrease = decrease
        self.total_batches = sum(len(s.pending) for s in self.servers.values())
        self.done_batches = 0
        self.started = time.monotonic()
        self.batch_stats: list[dict] = []

    def _lane_limit(self, state: _ServerState) -> int:
        return max(1, state.info["lanes"]) if not state.info["ignored_code"] else 1

    def _lane_spec(self, state: _ServerState, index: int) -> dict:
        info = state.info
        return {
            "server_name": info["server_name"],
            "lane_index": index,
            "lanes": self._lane_limit(state),
            "start_rate": info["start_rate"],
            "max_rate": info["max_rate"],
            "max_connections": info["max_connections"],
            "decrease": self.decrease,
            "ignored_code": info["ignored_code"],
            "ignored_reason": info["ignored_reason"],
        }

    def request_lanes(self, rank: int, free: int, held: set[str]) -> list[Assignment]:
        """Up to `free` new lanes for `rank`, never a server it already holds."""
        out: list[Assignment] = []
        for name in self.order:
            if len(out) >= free:
                break
            state = self.servers[name]
            if name in held or not state.pending or len(state.open_lanes) >= self._lane_limit(state):
                continue
            index = min(set(range(self._lane_limit(state))) - state.open_lanes)
            state.open_lanes.add(index)
            state.holders[index] = rank
            out.append(Assignment(self._lane_spec(state, index), state.pending.popleft()))
            held = held | {name}
        return out

    def next_batch(self, server: str, lane_index: int, stats: dict | None) -> dict | None:
        """Record a finished batch; the lane's next batch, or None (the lane is closed)."""
        state = self.servers[server]
        if stats is not None:
            self.record(state, stats)
        if state.pending:
            return state.pending.popleft()
        state.open_lanes.discard(lane_index)
        state.holders.pop(lane_index, None)
        return None

    def record(self, state: _ServerState, stats: dict) -> None:
        state.done_batches += 1
        state.failed = state.failed or bool(stats.get("server_failed"))
        self.done_batches += 1
        self.batch_stats.append(stats)

    @property
    def exhausted(self) -> bool:
        return all(not s.pending for s in self.servers.values())

    @property
    def finished(self) -> bool:
        return self.done_batches >= self.total_batches

    def progress(self) -> dict:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        urls = sum(s["urls"] for s in self.batch_stats)
        successes = sum(s["successes"] for s in self.batch_stats)
        rate = successes / elapsed
        busy = [n for n, s in self.servers.items() if s.open_lanes]
        remaining = self.total_batches - self.done_batches
        eta = elapsed / self.done_batches * remaining if self.done_batches else None
        return {
            "batches_done": self.done_batches,
            "batches_total": self.total_batches,
            "urls_done": urls,
            "successes": successes,
            "images_per_s": round(rate, 1),
            "bytes": sum(s["bytes"] for s in self.batch_stats),
            "servers_active": len(busy),
            "servers_failed": sorted(n for n, s in self.servers.items() if s.failed),
            "elapsed_s": round(elapsed, 1),
            "eta_s": None if eta is None else round(eta, 1),
        }
