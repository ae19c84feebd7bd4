"""One server shared by two lanes on two MPI ranks: together they stay within its limits, counted at the server.

The lanes' shares of the rate and the connections must add up to the server's budget: if each lane
took the whole budget (or its share of connections were rounded up), the server would see twice its
connection cap and far more refusals; if a pause reached only one lane, the other would keep sending.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from distributed_downloader.demo import scenario as demo
from distributed_downloader.demo.testserver import (
    FaultMix,
    HostSpec,
    ImageFarm,
    max_concurrency,
    max_requests_in_window,
)
from tests.conftest import run, snakemake_cmd
from tests.e2e.helpers import check_dataset

pytestmark = pytest.mark.e2e

RATE, BURST, CONNECTIONS = 16.0, 4.0, 3


def test_two_lanes_on_two_ranks_share_one_servers_limits(tmp_path: Path) -> None:
    spec = HostSpec(
        "shared",
        rate_limit=RATE,
        burst=BURST,
        max_connections=CONNECTIONS,
        refuse_status=503,
        retry_after=False,  # nginx-style bare refusals
        latency=0.25,  # slow answers: the connection cap, not the rate, binds (3 / 0.25 s = 12 req/s)
        background=FaultMix(missing=0.01, error500=0.01),
    )
    with ImageFarm([spec], seed=21) as farm:
        rows = []
        for i in range(300):
            path = f"/img/sh{i}.jpg?w=32&h=24"
            missing = farm.expected_outcome(0, path) == "missing"
            md5 = None if missing else hashlib.md5(farm.expected_bytes(path)).hexdigest()
            rows.append(demo.Expected(f"shared-{i}", farm.url(0, path), md5, 404 if missing else None))
        # One URL answers 503 + Retry-After: 3 once: both lanes, on both ranks, must pause.
        pause_path = "/flaky/1/sh-pause.jpg?w=32&h=24&ra=3"
        expected = hashlib.md5(farm.expected_bytes("/img/sh-pause.jpg?w=32&h=24")).hexdigest()
        rows.insert(150, demo.Expected("shared-pause", farm.url(0, pause_path), expected, None))
        config = demo.write_config(
            tmp_path,
            demo.write_input(rows, tmp_path / "urls.csv"),
            batch_size=40,
            default_rate_limit=4,
            max_rate_limit=40,
            max_connections_per_server=CONNECTIONS,
            max_retries=2,
        )
        data = yaml.safe_load(config.read_text())
        data["schedule_rules"] = {"1": 2}  # every server: two lanes (the original's schedule_rules)
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        run(snakemake_cmd(config, tmp_path), timeout=600)
        log = [entry for entry in farm.request_log(0) if entry.path != "/robots.txt"]
    output = tmp_path / "output"
    check_dataset(output, rows, image_size=720)
    assert json.loads((output / "reports" / "verification.json").read_text())["ok"]

    # Both ranks held a lane of the server.
    holders = set()
    for rank_log in (output / "logs" / "download" / "round_1").glob("rank_*.log"):
        text = rank_log.read_text()
        holders.update(lane for lane in ("#0 (of 2)", "#1 (of 2)") if lane in text)
    assert holders == {"#0 (of 2)", "#1 (of 2)"}, holders

    # The pause reached the other lane too (relayed through rank 0: allow it a second on a busy machine).
    paused_at = next(entry.end for entry in log if entry.path.startswith("/flaky/") and entry.status == 503)
    during = [entry for entry in log if paused_at + 1.0 < entry.start < paused_at + 3.0 - 0.05]
    assert not during, f"{len(during)} requests during the Retry-After pause"

    starts = sorted(entry.start for entry in log)
    refused = sum(1 for entry in log if entry.status in (429, 503))
    report = (
        f"{len(log)} requests, worst 1-s window {max_requests_in_window(starts)} (limit {RATE:g}+{BURST:g}), "
        f"peak concurrency {max_concurrency(log)} (cap {CONNECTIONS}), refused {refused}"
    )
    print(report)
    assert max_concurrency(log) <= CONNECTIONS, report
    assert max_requests_in_window(starts) <= RATE + BURST + 1, report
    assert refused <= 10, report


CEILING = 10.0  # max_rate_limit: the server's budget, split between its lanes


def test_the_last_lane_running_takes_the_whole_servers_budget(tmp_path: Path) -> None:
    """Two lanes on two ranks split a server's budget; when one lane's (smaller) batch is done and
    no batch is left for it, the other lane runs at the whole budget, not at its half: measured at
    the server, the tail runs near the budget and never above it."""
    with ImageFarm([HostSpec("tail")], seed=22) as farm:  # no hidden limit: our own ceiling binds
        rows = []
        for i in range(130):  # batches of 100 and 30, one per lane
            path = f"/img/tail{i}.jpg?w=32&h=24"
            rows.append(
                demo.Expected(f"tail-{i}", farm.url(0, path), hashlib.md5(farm.expected_bytes(path)).hexdigest(), None)
            )
        config = demo.write_config(
            tmp_path,
            demo.write_input(rows, tmp_path / "urls.csv"),
            batch_size=100,
            default_rate_limit=4,
            max_rate_limit=CEILING,
        )
        data = yaml.safe_load(config.read_text())
        data["schedule_rules"] = {"1": 2}  # two lanes
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        run(snakemake_cmd(config, tmp_path), timeout=600)
        log = [entry for entry in farm.request_log(0) if entry.path != "/robots.txt"]
    output = tmp_path / "output"
    check_dataset(output, rows, image_size=720)
    texts = [p.read_text() for p in (output / "logs" / "download" / "round_1").glob("rank_*.log")]
    assert sum("(of 2)" in text for text in texts) == 2, "both ranks held a lane of the server"
    assert any("now 100% of the server" in text for text in texts), "the remaining lane was told its new share"

    starts = sorted(entry.start for entry in log)
    tail = starts[-40:]  # the 100-URL lane alone: the 30-URL one was done after ~60 requests
    tail_rate = (len(tail) - 1) / (tail[-1] - tail[0])
    report = f"{len(starts)} requests; tail {tail_rate:.1f} req/s; worst 1-s window {max_requests_in_window(starts)}"
    print(report)
    assert tail_rate >= 0.75 * CEILING, report  # at half the budget it ran at ~5 req/s
    assert max_requests_in_window(starts) <= CEILING + 1, report
