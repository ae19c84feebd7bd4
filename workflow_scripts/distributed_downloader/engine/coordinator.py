"""The download coordinator's bookkeeping (no MPI here, so it is unit-testable).

It owns every server's lanes and pending batches. A rank asking for work gets lanes of servers
it does not hold yet, longest server first; a lane asking for its next batch gets one of its
server's remaining batches. A server never has more lanes open than the schedule allows, which
is what keeps its total rate within its budget. Until every rank has asked once, a rank gets at
most its fair share of the lanes (``Coordinator.request_lanes``).
"""

from __future__ import annotations

import math
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
    failed_reason: str = ""  # why its batches are set aside for the round
    given: dict[int, list[int]] = field(default_factory=dict)  # lane index -> partition ids it holds
    running: dict[int, int] = field(default_factory=dict)  # lane index -> rank, until the lane has exited
    share_told: float = 0.0  # the share each running lane was last told (reshares)


@dataclass
class Assignment:
    lane: dict  # LaneSpec fields
    batch: dict  # BatchWork fields


class Coordinator:
    def __init__(
        self, schedule: Mapping, decrease: float, memory: Mapping[str, dict] | None = None, ranks: int = 1
    ) -> None:
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
        self.failed_batches: dict[str, str] = {}  # "server/partition_id" -> why it was not written this round
        self.live: dict[int, list[dict]] = {}  # rank -> its lanes' latest snapshots
        self._congestion_seen: dict[str, int] = {}
        # What each server taught us (rate, level, connection cap, pause), whole-server figures;
        # persisted by the worker so rounds and resumes start where the last one left off.
        self.memory: dict[str, dict] = {name: dict(value) for name, value in (memory or {}).items()}
        # Fair share (issue #16): with fewer lanes than the first rank to ask has slots, it took them
        # all and the other ranks idled (one process, one GIL, for the whole round). Until every rank
        # has asked, a rank is given at most its share of the lanes the round can open.
        self.ranks = max(1, ranks)
        self.asked: set[int] = set()
        self.given_lanes: dict[int, int] = {}  # rank -> lanes given to it this round
        openable = sum(min(self._lane_limit(s), len(s.pending)) for s in self.servers.values())
        self.fair_share = max(1, math.ceil(openable / self.ranks))

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
            "memory": self.memory.get(info["server_name"]),
            "not_before": info.get("not_before", 0.0),
        }

    def request_lanes(self, rank: int, free: int, held: set[str]) -> list[Assignment]:
        """Up to `free` new lanes for `rank`, never a server it already holds.

        Two passes: every server with work gets its first lane before any server gets a second,
        so a small slow server never waits behind the extra lanes of a big one.

        An empty answer is final for that rank: batches are only ever taken, and a lane closes only
        once its server has none left, so no lane can open up later. Ranks therefore ask once per
        freed slot and never poll (rank 0's cost does not grow with ranks x time).

        Fair share: while some rank has not asked yet, a rank is given at most ``fair_share``
        lanes (the round's openable lanes over the ranks, rounded up); the answer that hits the cap
        is empty, and final, for it. No server is left without a lane by this: every rank asks at
        its start, the last one to ask is not capped, and when a rank was capped (it had more free
        slots than its share; all ranks have the same slots) the lanes left for the last one are at
        most a share, within its slots.
        """
        self.asked.add(rank)
        if len(self.asked) < self.ranks:
            free = min(free, self.fair_share - self.given_lanes.get(rank, 0))
        out = self._hand_out(rank, free, held)
        self.given_lanes[rank] = self.given_lanes.get(rank, 0) + len(out)
        return out

    def _hand_out(self, rank: int, free: int, held: set[str]) -> list[Assignment]:
        out: list[Assignment] = []
        held = set(held)
        for first_lanes_only in (True, False):
            for name in self.order:
                if len(out) >= free:
                    return out
                state = self.servers[name]
                if name in held or not state.pending or len(state.open_lanes) >= self._lane_limit(state):
                    continue
                if first_lanes_only and state.open_lanes:
                    continue
                index = min(set(range(self._lane_limit(state))) - state.open_lanes)
                state.open_lanes.add(index)
                state.holders[index] = rank
                state.running[index] = rank
                batch = state.pending.popleft()
                state.given.setdefault(index, []).append(batch["partition_id"])
                out.append(Assignment(self._lane_spec(state, index), batch))
                held.add(name)
        return out

    def next_batch(self, server: str, lane_index: int, stats: dict | None, lane: dict | None = None) -> dict | None:
        """Record a finished batch; the lane's next batch, or None (the lane is closed)."""
        state = self.servers[server]
        if lane is not None:
            self.learn([lane])
        if stats is not None:
            self.record(state, stats)
        if state.pending:
            batch = state.pending.popleft()
            state.given.setdefault(lane_index, []).append(batch["partition_id"])
            return batch
        state.open_lanes.discard(lane_index)
        state.holders.pop(lane_index, None)
        return None

    def finished_batch(self, server: str, stats: dict, lane: dict | None = None) -> None:
        """A lane committed a batch (lanes ask for their next batch before the last one is done)."""
        if lane is not None:
            self.learn([lane])
        self.record(self.servers[server], stats)

    def record(self, state: _ServerState, stats: dict) -> None:
        partition_id = stats.get("partition_id")
        for held in state.given.values():
            if partition_id in held:
                held.remove(partition_id)
        if stats.get("failed"):
            self.failed_batches[f"{state.info['server_name']}/{partition_id}"] = stats["failed"]
            if stats.get("server_failed") and not state.failed_reason:
                state.failed_reason = stats["failed"]
        state.done_batches += 1
        state.failed = state.failed or bool(stats.get("server_failed"))
        self.done_batches += 1
        self.batch_stats.append(stats)

    def lane_failed(self, server: str, lane_index: int, reason: str) -> None:
        """A lane died: its server is set aside for the round; its batches are downloaded next round."""
        state = self.servers[server]
        state.failed = True
        state.failed_reason = state.failed_reason or reason
        for partition_id in state.given.pop(lane_index, []):
            self.failed_batches[f"{server}/{partition_id}"] = reason
        while state.pending:
            batch = state.pending.popleft()
            self.failed_batches[f"{server}/{batch['partition_id']}"] = f"set aside: {reason}"
        state.open_lanes.discard(lane_index)
        state.holders.pop(lane_index, None)
        # Still in `running` until the rank says lane_closed (after its fetch threads stopped).

    def lane_closed(self, server: str, lane_index: int) -> None:
        """A lane ended (its batches done, or it died and its fetches are over): it sends nothing more."""
        self.servers[server].running.pop(lane_index, None)

    def reshares(self, server: str) -> list[tuple[int, float]]:
        """(rank, share) for each lane of ``server`` still running, when their share of it grew.

        A server's lanes each run at 1/lanes of its budget. Once no lane can open for it any more
        (no batch left to hand out) and fewer are running, the running ones split the whole of it:
        the server then sees from them what all its lanes sent before (a lane closed, or never
        opened because the batches ran out first). Told once per growth.
        """
        state = self.servers[server]
        if state.pending or not state.running:
            return []
        share = 1.0 / len(state.running)
        if share <= max(state.share_told, 1.0 / self._lane_limit(state)) + 1e-9:
            return []
        state.share_told = share
        return [(rank, share) for rank in sorted(set(state.running.values()))]

    @property
    def exhausted(self) -> bool:
        return all(not s.pending for s in self.servers.values())

    def update_live(self, rank: int, lanes: list[dict]) -> None:
        self.live[rank] = lanes
        self.learn(lanes)

    def learn(self, lanes: list[dict]) -> None:
        """Fold lane snapshots into the servers' memory (each lane's figures scaled to the whole server)."""
        by_server: dict[str, list[dict]] = {}
        for lane in lanes:
            # A lane that had no answer (its batches were all done already) learned nothing: its
            # figures are only where it started.
            if lane.get("share") and lane.get("answers", 1):
                by_server.setdefault(lane["server"], []).append(lane)
        for server, group in by_server.items():
            entry = self.memory.setdefault(server, {})
            # Never a rate the server was not seen to accept: a lane whose connection-cap finding
            # dropped its level regrew to 7.9 req/s on a 4/s host without sending at it (its CPU
            # starved), and the next monthly run started there (28 refusals instead of 0).
            rates = [min(lane["rate"], lane.get("peak") or lane["rate"]) / lane["share"] for lane in group]
            entry["rate"] = round(sum(rates) / len(rates), 4)
            # Measured levels only (slow start's step back is a guess: 5.6 req/s for a 4/s host, from
            # which the next monthly run started above the limit). Without a new one, the last
            # measured level stays.
            measured = [lane for lane in group if lane.get("level") and not lane.get("level_guessed")]
            if measured:
                lowest = min(measured, key=lambda lane: lane["level"] / lane["share"])
                entry["level"] = round(lowest["level"] / lowest["share"], 4)
                # A level read through a pause is kept at its low end; what the lane ran at is kept
                # beside it, so the next run knows the low end may lie well below the limit.
                reading = (lowest.get("level_reading") or 0.0) / lowest["share"]
                entry["level_reading"] = round(reading, 4) if reading > entry["level"] else None
            else:
                entry.setdefault("level", None)
            caps = [
                lane["connection_cap"] / (lane.get("connection_share") or lane["share"])
                for lane in group
                if lane.get("connection_cap")
            ]
            entry["connection_cap"] = int(min(caps)) if caps else None
            entry["paused_until"] = max([entry.get("paused_until") or 0.0] + [lane["paused_until"] for lane in group])

    def pause(self, server: str, until: float, from_rank: int) -> list[int]:
        """A lane of `server` was told to pause until `until` (epoch): the other ranks holding it, to relay to."""
        state = self.servers.get(server)
        entry = self.memory.setdefault(server, {})
        entry["paused_until"] = max(entry.get("paused_until") or 0.0, until)
        if state is None:
            return []
        return sorted({rank for rank in state.running.values() if rank != from_rank})

    def backing_off(self) -> list[str]:
        """Servers pausing (Retry-After, quota) or that slowed down since the last look."""
        names = set()
        for lanes in self.live.values():
            for lane in lanes:
                key = f"{lane['server']}#{lane['lane']}"
                if lane["paused_for"] > 0 or lane["congestion"] > self._congestion_seen.get(key, 0):
                    names.add(lane["server"])
                self._congestion_seen[key] = lane["congestion"]
        return sorted(names)

    def progress(self) -> dict:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        live = [lane for lanes in self.live.values() for lane in lanes]
        total_urls = sum(self._batch_urls(state) for state in self.servers.values()) or 1
        urls = sum(s["processed"] for s in self.batch_stats) + sum(lane["done"] for lane in live)
        successes = sum(s["new_successes"] for s in self.batch_stats) + sum(lane["successes"] for lane in live)
        fraction = min(1.0, urls / total_urls)
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        return {
            "batches_done": self.done_batches,
            "batches_total": self.total_batches,
            "urls_done": urls,
            "urls_total": total_urls,
            "successes": successes,
            "images_per_s": round(successes / elapsed, 1),
            "bytes": sum(s["bytes"] for s in self.batch_stats) + sum(lane["bytes"] for lane in live),
            "servers_active": len({lane["server"] for lane in live}),
            "servers_backing_off": self.backing_off(),
            "servers_failed": sorted(n for n, s in self.servers.items() if s.failed),
            "batches_failed": len(self.failed_batches),
            "elapsed_s": round(elapsed, 1),
            "eta_s": None if eta is None else round(eta, 1),
        }

    def _batch_urls(self, state: _ServerState) -> int:
        """URLs this round tries for a server (remaining_work() counts them per batch as `todo`)."""
        return sum(int(b.get("todo", 0)) for b in state.info["batches"])
