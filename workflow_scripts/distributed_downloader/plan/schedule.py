"""Scheduling: which batches each round still has to do, and each server's lanes.

A lane is one rank's exclusive share of a server: rate/lanes requests per second and
connections/lanes connections. Lanes are handed to ranks by the download coordinator; since a
lane has one owner at a time and the shares add up to the server's budget, the server's total
rate and concurrency across all ranks and nodes never exceed its limit.
Servers are ordered longest-first (remaining URLs / rate ceiling) so the slowest server starts first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distributed_downloader.config import Paths
from distributed_downloader.errors import ErrorCode
from distributed_downloader.plan import snapshot
from distributed_downloader.plan.profiling import ServerProfile
from distributed_downloader.plan.server_memory import MEMORY_FILE, known_rate, read_memory
from distributed_downloader.store.files import valid_marker

LANE_RATE_PER_CPU = 60.0  # requests/s one lane may carry per CPU of its rank (the default ceiling, 50, fits one)
KNOWN_RATE_ROOM = 1.25  # a server's remembered level may have risen: lanes for this much more


@dataclass
class BatchWork:
    partition_id: int
    fingerprint: str
    mode: str  # "full" | "retry" | "ignored"


@dataclass
class ServerWork:
    server_name: str
    lanes: int
    start_rate: float  # whole-server requests/s to start with
    max_rate: float  # whole-server ceiling
    max_connections: int  # whole-server connections
    urls_left: int
    ignored_code: int = 0
    ignored_reason: str = ""
    not_before: float = 0.0  # epoch: profiling's last request + one interval at the starting rate
    batches: list[BatchWork] = field(default_factory=list)

    @property
    def estimated_seconds(self) -> float:
        return 0.0 if self.ignored_code else self.urls_left / max(self.max_rate, 1e-9)


def lanes_for(
    batches_left: int,
    max_rate: float,
    rules: Mapping,
    cpu_per_worker: int,
    ranks: int,
    max_connections: int = 1 << 30,
    known_rate: float | None = None,
) -> int:
    """How many ranks may share a server: by the rate it may get (its ceiling, or a little over the
    rate it was seen to accept: server memory), or by the original's schedule_rules, but never more
    than a remembered rate needs.

    Never more lanes than the server has connections: each lane needs one of its own. No more lanes
    than its rate needs: lanes on other ranks send without coordinating, and on a server with a
    small burst allowance their requests collide although together they send below its rate.
    """
    if batches_left <= 0:
        return 0
    rate = max_rate if known_rate is None else min(max_rate, known_rate * KNOWN_RATE_ROOM)
    lanes = math.ceil(rate / (LANE_RATE_PER_CPU * cpu_per_worker))
    if rules:
        eligible = [int(v) for k, v in rules.items() if batches_left >= int(k)]
        # The rules' lanes, but no more than a remembered rate needs: schedule_rules {1: 3} gave a
        # 4 req/s burst-1 server 3 lanes whose requests collide (simulated, 2 lanes: 25% refused, 11% held).
        lanes = min(max(eligible) if eligible else 1, lanes if known_rate is not None else 1 << 30)
    return max(1, min(lanes, batches_left, max(1, ranks), max(1, max_connections)))


def _not_before(profile: ServerProfile) -> float:
    """No download request before one interval after profiling's last request to the server."""
    last = getattr(profile, "last_request_at", 0.0) or 0.0
    rate = min(r for r in (profile.rate_limit, profile.max_rate) if r > 0) if profile.rate_limit > 0 else 0.0
    return last + 1.0 / rate if last and rate else 0.0


def batch_mode(batch_dir: Path, fp: str, round_no: int, ignored: bool) -> str | None:
    """What a batch needs in this round, or None when it is done."""
    marker = valid_marker(batch_dir, fp)
    if marker is None:
        return "ignored" if ignored else "full"
    if marker.transient > 0 and marker.round < round_no:
        return "ignored" if ignored else "retry"
    return None


def build(
    manifest: Mapping,
    profiles: Mapping[str, ServerProfile],
    paths: Paths,
    config: Mapping,
    round_no: int,
) -> dict:
    params = config["downloader_parameters"]
    ranks = params["max_nodes"] * params["workers_per_node"]
    memory = read_memory(paths.state / MEMORY_FILE, config.get("previous_dataset"))
    servers: list[ServerWork] = []
    for name, info in manifest["servers"].items():
        profile = profiles[name]
        # A server unreachable at profiling is held for round 1 only: later rounds download it.
        ignored_code = profile.error_code
        if ignored_code == ErrorCode.SERVER_UNREACHABLE and round_no > 1:
            ignored_code = 0
        work = ServerWork(
            server_name=name,
            lanes=0,
            start_rate=profile.rate_limit,
            max_rate=profile.max_rate,
            max_connections=profile.max_connections,
            urls_left=0,
            ignored_code=ignored_code,
            ignored_reason=profile.reason if ignored_code else "",
            not_before=_not_before(profile),
        )
        for partition_id, fp in enumerate(info["fingerprints"]):
            mode = batch_mode(paths.batch_images(name, partition_id), fp, round_no, bool(ignored_code))
            if mode is not None:
                work.batches.append(BatchWork(partition_id, fp, mode))
        if not work.batches:
            continue
        work.urls_left = sum(
            min(manifest["batch_size"], info["urls"] - b.partition_id * manifest["batch_size"])
            # a monthly snapshot's rows copied or kept without a request (the first attempt of a batch)
            - (snapshot.not_downloaded(paths, name, b.partition_id) if b.mode == "full" else 0)
            for b in work.batches
        )
        if not work.ignored_code:
            # A remembered connection cap bounds the lanes too: each lane holds at least one
            # connection (4 lanes of a server that takes 2 at once held 4).
            cap = (memory.get(name) or {}).get("connection_cap") or work.max_connections
            work.lanes = lanes_for(
                len(work.batches),
                work.max_rate,
                config["schedule_rules"],
                params["cpu_per_worker"],
                ranks,
                min(work.max_connections, int(cap)),
                known_rate(memory.get(name)),
            )
        servers.append(work)
    servers.sort(key=lambda s: (-s.estimated_seconds, s.server_name))
    bound = max((s.estimated_seconds for s in servers), default=0.0)
    return {
        "round": round_no,
        "num_rounds": params["num_downloads"],
        "config": dict(config),
        "servers": [asdict(s) for s in servers],
        "totals": {
            "servers": len(servers),
            "batches": sum(len(s.batches) for s in servers),
            "urls": sum(s.urls_left for s in servers),
            "lower_bound_seconds": round(bound, 1),
        },
    }
