"""Rank 0's coordination cost at GBIF scale (issue #15): the real Coordinator, simulated ranks and lanes.

    python bench/coordinator_bench.py [--ranks 400] [--servers 545] [--slots 32] [--batches 20000]

The download protocol (worker.run_rank) replayed in simulated time against the real
``Coordinator``: each rank asks for lanes while it has free slots, each lane asks for its next batch
when it has sent its current one and reports each batch done. Batch durations follow each server's
rate (Zipf-sized servers, 1-66 req/s, 1-4 lanes). Two rank policies, same plan:

- ``poll`` (before): a rank with a free slot asks again every 0.25 s until the round is exhausted;
- ``push`` (now): a rank asks once per freed slot and stops after an empty answer, which is final
  (see ``Coordinator.request_lanes``).

Printed per policy, over the first ``--horizon`` simulated seconds (start-up included, when every
rank asks at once): messages rank 0 served and per simulated second, the CPU rank 0 spent in the
coordinator (measured with ``time.process_time`` around each call) as a share of one core, and the
slowest single call.
"""

from __future__ import annotations

import argparse
import heapq
import random
import time
from dataclasses import dataclass

from distributed_downloader.engine.coordinator import Coordinator

ASK_PERIOD = 0.25  # the old polling period of a rank with a free slot


@dataclass
class Figures:
    messages: int = 0
    asks: int = 0
    cpu: float = 0.0
    worst: float = 0.0
    makespan: float = 0.0


def plan(servers: int, batches: int, seed: int) -> tuple[dict, dict[str, float]]:
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** 0.9 for i in range(servers)]
    total = sum(weights)
    infos, rates = [], {}
    for i, weight in enumerate(weights):
        name = f"server{i:04d}.example.org"
        count = max(1, round(batches * weight / total))
        rate = rng.uniform(1.0, 66.0)
        lanes = min(4, max(1, count // 50))
        rates[name] = rate
        infos.append(
            {
                "server_name": name,
                "lanes": lanes,
                "start_rate": rate,
                "max_rate": rate,
                "max_connections": 8,
                "ignored_code": 0,
                "ignored_reason": "",
                "batches": [{"partition_id": p, "fingerprint": "f", "mode": "full", "todo": 100} for p in range(count)],
            }
        )
    return {"servers": infos}, rates


def simulate(
    schedule: dict, rates: dict[str, float], ranks: int, slots: int, poll: bool, horizon: float = float("inf")
) -> Figures:
    coordinator = Coordinator(schedule, decrease=0.5)
    figures = Figures()
    events: list[tuple[float, int, str, int, str, int, int]] = []  # (t, order, kind, rank, server, lane, pid)
    order = 0
    held: dict[int, dict[str, int]] = {r: {} for r in range(ranks)}
    done_asking: set[int] = set()

    def call(fn, *args):  # noqa: ANN001, ANN202
        started = time.process_time()
        result = fn(*args)
        spent = time.process_time() - started
        figures.cpu += spent
        figures.worst = max(figures.worst, spent)
        figures.messages += 1
        return result

    def batch_seconds(server: str) -> float:
        info = coordinator.servers[server].info
        return 100 / (rates[server] / max(1, info["lanes"]))

    def push(t: float, kind: str, rank: int, server: str = "", lane: int = 0, pid: int = 0) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (t, order, kind, rank, server, lane, pid))

    for rank in range(ranks):
        push(0.0, "ask", rank)
    now = 0.0
    while events:
        now, _, kind, rank, server, lane, pid = heapq.heappop(events)
        if now > horizon:  # rates over the window are what matter
            break
        if kind == "ask":
            if rank in done_asking or len(held[rank]) >= slots:
                continue
            figures.asks += 1
            given = call(coordinator.request_lanes, rank, slots - len(held[rank]), set(held[rank]))
            for assignment in given:
                name = assignment.lane["server_name"]
                held[rank][name] = assignment.lane["lane_index"]
                push(now + batch_seconds(name), "next", rank, name, held[rank][name], assignment.batch["partition_id"])
            if not given:
                if not poll or coordinator.exhausted:
                    done_asking.add(rank)
                else:
                    push(now + ASK_PERIOD, "ask", rank)
        elif kind == "next":  # the lane sent its batch: asks for the next, reports this one done
            stats = {"partition_id": pid, "processed": 100, "new_successes": 95, "bytes": 0, "server_failed": False}
            call(coordinator.finished_batch, server, stats)
            batch = call(coordinator.next_batch, server, lane, None)
            if batch is None:
                del held[rank][server]
                push(now, "ask", rank)
            else:
                push(now + batch_seconds(server), "next", rank, server, lane, batch["partition_id"])
    figures.makespan = now
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=400)
    parser.add_argument("--servers", type=int, default=545)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--horizon", type=float, default=300.0, help="simulated seconds (rates are per second)")
    args = parser.parse_args()
    schedule, rates = plan(args.servers, args.batches, args.seed)
    total = sum(len(s["batches"]) for s in schedule["servers"])
    print(f"coordinator bench: {args.ranks} ranks x {args.slots} slots, {args.servers} servers, {total} batches")
    for name, poll in (("poll (before)", True), ("push (now)", False)):
        f = simulate(schedule, rates, args.ranks, args.slots, poll, args.horizon)
        print(
            f"  {name:14} first {f.makespan:6.0f} s of the round; rank 0 served {f.messages:9,} messages "
            f"({f.messages / f.makespan:8.1f}/s, lane asks {f.asks:,}); coordinator CPU {f.cpu:6.2f} s = "
            f"{100 * f.cpu / f.makespan:.3f}% of a core; slowest call {1000 * f.worst:.2f} ms"
        )


if __name__ == "__main__":
    main()
