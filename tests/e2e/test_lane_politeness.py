"""One lane against real loopback servers with hidden limits, counted at the server (its own request log).

No MPI here: a Lane runs one batch as a rank's lane thread would, so each politeness rule is
checked in seconds against a real HTTP server: faults that never slow a server, Retry-After in any
form, redirect hops that each take a slot of their own host, bans and long pauses that become
transient rows.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from distributed_downloader import config as config_mod
from distributed_downloader.demo import testserver as testserver_module
from distributed_downloader.demo.testserver import (
    FaultMix,
    HostSpec,
    ImageFarm,
    LogEntry,
    max_concurrency,
    max_requests_in_window,
)
from distributed_downloader.engine import lane as lane_module
from distributed_downloader.engine.lane import Lane, LaneSpec
from distributed_downloader.errors import ErrorCode
from distributed_downloader.net.hosts import HostRegistry
from tests.e2e.helpers import read_all, write_batch_urls

pytestmark = pytest.mark.e2e


def _config(tmp_path: Path, **downloader: object) -> dict:
    return config_mod.validate(
        {
            "path_to_input": str(tmp_path / "unused.csv"),
            "path_to_output": str(tmp_path / "out"),
            "downloader_parameters": {
                "allow_private_addresses": True,
                "respect_robots_txt": False,
                "timeout": {"connect": 3, "read": 3, "total": 10},
                **downloader,
            },
        }
    )


def _run(
    tmp_path: Path,
    farm: ImageFarm,
    urls: list[str],
    start: float = 3.0,
    ceiling: float = 80.0,
    connections: int = 8,
    hosts: HostRegistry | None = None,
    memory: dict | None = None,
    ignored_code: int = 0,
    **downloader: object,
) -> tuple[list[dict], list[dict], float]:
    """Run one batch of `urls` (all on farm host 0) through a real Lane; (successes, errors, seconds)."""
    config = _config(tmp_path, **downloader)
    paths = config_mod.paths(config)
    server = farm.base_urls[0].split("//", 1)[1]
    write_batch_urls(paths.batch_urls(server, 0), urls)
    spec = LaneSpec(
        server,
        0,
        1,
        start_rate=start,
        max_rate=ceiling,
        max_connections=connections,
        decrease=0.3,
        memory=memory,
        ignored_code=ignored_code,
    )
    lane = Lane(spec, config, paths, round_no=1, hosts=hosts)
    began = time.monotonic()
    try:
        lane.run_batch(0, "f" * 32, "full")
    finally:
        lane.close()
    seconds = time.monotonic() - began
    return read_all(paths.images, "successes.parquet"), read_all(paths.images, "errors.parquet"), seconds


def _images(log: list[LogEntry]) -> list[LogEntry]:
    return [entry for entry in log if entry.path != "/robots.txt"]


def test_everyday_faults_never_hold_a_server_below_its_limit(tmp_path: Path) -> None:
    """3% of URLs fail on their own (404, one-off 500, reset, stall): the rate still reaches the limit."""
    limit, burst = 25.0, 6.0
    spec = HostSpec(
        "h0",
        rate_limit=limit,
        burst=burst,
        refuse_status=503,
        retry_after=False,
        latency=0.01,
        background=FaultMix.everyday(0.03, stall_seconds=4.0),
    )
    with ImageFarm([spec], seed=5) as farm:
        urls = [farm.url(0, f"/img/f{i}.jpg?w=32&h=24") for i in range(500)]
        successes, errors, seconds = _run(tmp_path, farm, urls, max_retries=2)
        log = _images(farm.request_log(0))
    assert len(successes) + len(errors) == len(urls)
    missing = sum(1 for url in urls if farm.expected_outcome(0, "/" + url.split("/", 3)[3]) == "missing")
    assert len(successes) >= len(urls) - missing - 3  # a stall may still be waiting for the next round
    starts = sorted(entry.start for entry in log)
    assert max_requests_in_window(starts) <= limit + burst
    second_half = [t for t in starts if t >= starts[0] + (starts[-1] - starts[0]) / 2]
    rate = len(second_half) / (second_half[-1] - second_half[0])
    assert rate >= 0.85 * limit, f"held {rate:.1f}/s of {limit}"
    refused = sum(1 for entry in log if entry.status in (429, 503))
    assert refused <= max(4, 0.01 * len(log))


@pytest.mark.parametrize(("name", "value"), [("retry-after", "3"), ("RETRY-AFTER", "3"), ("Retry-After", "date+3")])
def test_retry_after_in_any_form_stops_every_request_until_it_ends(
    tmp_path: Path, name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One URL answers 429 with a Retry-After: the server sees no request before the pause ends."""
    monkeypatch.setattr(lane_module, "MAX_REFUSALS", 1)
    with ImageFarm(1, seed=2) as farm:
        urls = [farm.url(0, f"/img/r{i}.jpg?w=32&h=24") for i in range(8)]
        urls.insert(2, farm.url(0, f"/reply/429?h={name}&v={value.replace('+', '%2B')}"))
        successes, errors, _ = _run(tmp_path, farm, urls, start=20.0, ceiling=20.0, max_retries=0)
        log = _images(farm.request_log(0))
    refused = [entry for entry in log if entry.path.startswith("/reply/")]
    assert len(refused) == 2  # retried once after the pause (MAX_REFUSALS patched to 1), then left for next round
    for pause in refused:
        after = sorted(entry.start for entry in log if entry.start > pause.end)
        assert not after or after[0] - pause.end >= 3 - 1.05  # HTTP dates carry whole seconds
    assert len(successes) == 8
    assert len(errors) == 1 and errors[0]["error_code"] == 429


def test_a_redirect_chain_takes_one_slot_per_hop(tmp_path: Path) -> None:
    """A 4-hop chain is 5 requests: at a ceiling of 10 req/s the server sees 10 requests a second, not 50."""
    ceiling = 10.0
    with ImageFarm([HostSpec("h0", latency=0.005)], seed=3) as farm:
        urls = [farm.url(0, f"/redirect/4/c{i}.jpg?w=32&h=24") for i in range(20)]
        successes, errors, _ = _run(tmp_path, farm, urls, start=ceiling, ceiling=ceiling)
        log = _images(farm.request_log(0))
    assert len(successes) == 20 and not errors
    assert len(log) == 100
    starts = sorted(entry.start for entry in log)
    assert max_requests_in_window(starts) <= ceiling + 1


def test_a_cross_host_redirect_target_gets_a_budget_of_its_own(tmp_path: Path) -> None:
    """Host 0 sends every URL on to host 1: host 1 sees at most the default rate split over the ranks."""
    with ImageFarm(2, seed=4) as farm:
        target = farm.base_urls[1]
        urls = [farm.url(0, f"/redirect-to/{target}/img/x{i}.jpg%3Fw=32%26h=24") for i in range(12)]
        hosts = HostRegistry(default_rate=4.0, ranks=2, decrease=0.3)  # 2 req/s for this rank
        successes, errors, seconds = _run(tmp_path, farm, urls, start=50.0, ceiling=50.0, hosts=hosts)
        other = _images(farm.request_log(1))
    assert len(successes) == 12 and not errors, errors[:2]
    starts = sorted(entry.start for entry in other)
    assert max_requests_in_window(starts) <= 2 + 1
    assert seconds >= (12 - 1) / 2.0 - 0.5


def test_a_download_still_receiving_bytes_is_not_hedged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stall is silence, not time since the request: a body that keeps coming (a big original on a
    slow link) is neither cancelled and sent again nor doubled, and the server never sees two at once."""
    monkeypatch.setattr(testserver_module, "TRICKLE_SECONDS", 0.1)  # 43 bytes in ~4 s
    monkeypatch.setattr(lane_module, "HEDGE_AFTER_SECONDS", 1.0)
    with ImageFarm(1, seed=4) as farm:
        urls = [farm.url(0, "/trickle/t.gif?w=1&h=1")] + [farm.url(0, f"/img/v{i}.jpg?w=32&h=24") for i in range(6)]
        successes, errors, _ = _run(tmp_path, farm, urls, start=2.0, ceiling=2.0, connections=1)
        log = _images(farm.request_log(0))
    assert len(successes) == 7 and not errors, errors[:2]
    assert len(log) == 7
    assert max_concurrency(log) == 1


def test_an_answer_being_decoded_is_not_hedged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fetch is over once its answer is in: decoding it (or waiting for the lane thread) is no stall,
    whatever the time since the request was sent."""
    monkeypatch.setattr(lane_module, "HEDGE_AFTER_SECONDS", 0.3)
    decode = lane_module.imaging.process_image

    def slow_decode(*args: object, **kwargs: object) -> object:
        time.sleep(1.0)
        return decode(*args, **kwargs)

    monkeypatch.setattr(lane_module.imaging, "process_image", slow_decode)
    with ImageFarm(1, seed=4) as farm:
        urls = [farm.url(0, f"/img/k{i}.jpg?w=32&h=24") for i in range(2)]
        successes, errors, _ = _run(tmp_path, farm, urls, start=20.0, ceiling=20.0)
        log = _images(farm.request_log(0))
    assert len(successes) == 2 and not errors, errors[:2]
    assert len(log) == 2


def test_a_slow_redirect_target_gets_one_connection_per_rank(tmp_path: Path) -> None:
    """The budget of a host outside the rank's lanes is one connection per rank, however many of the
    lane's fetches are redirected there at once and however slowly it answers."""
    with ImageFarm([HostSpec("h0"), HostSpec("h1", latency=1.0)], seed=4) as farm:
        target = farm.base_urls[1]
        urls = [farm.url(0, f"/redirect-to/{target}/img/c{i}.jpg%3Fw=32%26h=24") for i in range(5)]
        hosts = HostRegistry(default_rate=4.0, ranks=1, decrease=0.3)
        successes, errors, _ = _run(tmp_path, farm, urls, start=20.0, ceiling=20.0, hosts=hosts)
        other = _images(farm.request_log(1))
    assert len(successes) == 5 and not errors, errors[:2]
    assert max_concurrency(other) == 1


def test_a_fetch_queued_for_its_redirect_targets_slot_is_not_hedged(tmp_path: Path) -> None:
    """Fetches wait for a slow redirect target's slots: waiting is not a stall, so no copy is sent
    (a copy re-asks the origin and queues behind it) and no slot of the target goes to a copy."""
    with ImageFarm(2, seed=4) as farm:
        target = farm.base_urls[1]
        urls = [farm.url(0, f"/redirect-to/{target}/img/w{i}.jpg%3Fw=32%26h=24") for i in range(12)]
        hosts = HostRegistry(default_rate=4.0, ranks=2, decrease=0.3)  # 2 req/s for this rank
        successes, errors, seconds = _run(tmp_path, farm, urls, start=50.0, ceiling=50.0, hosts=hosts)
        origin = _images(farm.request_log(0))
    assert len(successes) == 12 and not errors, errors[:2]
    assert len(origin) == 12
    assert seconds < (12 - 1) / 2.0 + 2.0


def test_robots_txt_requests_take_a_rate_slot_of_their_host(tmp_path: Path) -> None:
    """A lane's own robots.txt fetch and a redirect target's are requests like any other: at 1 req/s
    each host sees its next request a whole interval after its robots.txt, not right behind it."""
    rules = "User-agent: *\nDisallow: /private/\n"
    with ImageFarm([HostSpec("h0", robots_txt=rules), HostSpec("h1", robots_txt=rules)], seed=4) as farm:
        target = farm.base_urls[1]
        urls = [farm.url(0, f"/redirect-to/{target}/img/x{i}.jpg%3Fw=32%26h=24") for i in range(3)]
        hosts = HostRegistry(default_rate=1.0, ranks=1, decrease=0.3)  # 1 req/s for host 1
        successes, errors, _ = _run(tmp_path, farm, urls, start=1.0, ceiling=1.0, hosts=hosts, respect_robots_txt=True)
        logs = [sorted(farm.request_log(i)) for i in (0, 1)]
    assert len(successes) == 3 and not errors, errors[:2]
    for log in logs:
        assert log[0].path == "/robots.txt"
        gaps = [b.start - a.start for a, b in itertools.pairwise(log)]
        assert min(gaps) >= 0.75, gaps


@pytest.mark.parametrize("case", ["moved", "long"])
def test_each_request_of_a_robots_txt_fetch_takes_a_slot(tmp_path: Path, case: str) -> None:
    """robots.txt moved (301, as from http to https), or over 500 KiB (read a second time for its
    prefix): each of its two requests takes a slot of its own."""
    rules = "User-agent: *\nDisallow: /private/\n" + ("Disallow: /x\n" * 60000 if case == "long" else "")
    moved = "/moved/robots.txt" if case == "moved" else None
    with ImageFarm([HostSpec("h0", robots_txt=rules, robots_location=moved)], seed=4) as farm:
        urls = [farm.url(0, f"/img/m{i}.jpg?w=32&h=24") for i in range(2)]
        successes, errors, _ = _run(tmp_path, farm, urls, start=1.0, ceiling=1.0, respect_robots_txt=True)
        log = sorted(farm.request_log(0))
    assert len(successes) == 2 and not errors, errors[:2]
    assert [entry.path for entry in log[:2]] == ["/robots.txt", moved or "/robots.txt"]
    gaps = [b.start - a.start for a, b in itertools.pairwise(log)]
    assert min(gaps) >= 0.75, gaps


@pytest.mark.parametrize("redirected", [False, True])
def test_crawl_delay_spaces_every_request_from_the_robots_txt_fetch_on(tmp_path: Path, redirected: bool) -> None:
    """Crawl-delay: 2 of the lane's own server, or of a redirect target outside the rank's lanes."""
    delayed = HostSpec("hd", robots_txt="User-agent: *\nCrawl-delay: 2\n")
    specs = [HostSpec("h0"), delayed] if redirected else [delayed]
    with ImageFarm(specs, seed=4) as farm:
        if redirected:
            target = farm.base_urls[1]
            urls = [farm.url(0, f"/redirect-to/{target}/img/d{i}.jpg%3Fw=32%26h=24") for i in range(3)]
        else:
            urls = [farm.url(0, f"/img/d{i}.jpg?w=32&h=24") for i in range(3)]
        hosts = HostRegistry(default_rate=4.0, ranks=1, decrease=0.3)
        successes, errors, _ = _run(tmp_path, farm, urls, start=5.0, ceiling=5.0, hosts=hosts, respect_robots_txt=True)
        log = sorted(farm.request_log(len(specs) - 1))
    assert len(successes) == 3 and not errors, errors[:2]
    assert log[0].path == "/robots.txt" and len(log) == 4
    gaps = [b.start - a.start for a, b in itertools.pairwise(log)]
    assert min(gaps) >= 2.0 - 0.25, gaps


def test_a_paused_server_gets_no_robots_txt_request_either(tmp_path: Path) -> None:
    """A server that asked for an hour's pause (server memory) hears nothing, robots.txt included."""
    with ImageFarm([HostSpec("h0", robots_txt="User-agent: *\nDisallow: /private/\n")], seed=4) as farm:
        urls = [farm.url(0, f"/img/q{i}.jpg?w=32&h=24") for i in range(3)]
        memory = {"paused_until": time.time() + 3600}
        successes, errors, _ = _run(tmp_path, farm, urls, memory=memory, respect_robots_txt=True, max_pause_seconds=30)
        log = farm.request_log(0)
    assert not log, log
    assert not successes and len(errors) == 3
    assert {row["error_code"] for row in errors} <= {int(ErrorCode.SERVER_PAUSED), int(ErrorCode.ROBOTS_UNAVAILABLE)}


def test_an_ignored_server_gets_no_robots_txt_request(tmp_path: Path) -> None:
    """A server in the user's ignored_servers list (or written off by profiling) hears nothing at all."""
    with ImageFarm([HostSpec("h0", robots_txt="User-agent: *\nDisallow: /private/\n")], seed=4) as farm:
        urls = [farm.url(0, f"/img/g{i}.jpg?w=32&h=24") for i in range(3)]
        successes, errors, _ = _run(
            tmp_path, farm, urls, ignored_code=int(ErrorCode.SERVER_IGNORED), respect_robots_txt=True
        )
        log = farm.request_log(0)
    assert not log, log
    assert not successes and [row["error_code"] for row in errors] == [int(ErrorCode.SERVER_IGNORED)] * 3


def test_a_burst_of_403s_is_a_ban_whose_urls_are_tried_next_round(tmp_path: Path) -> None:
    with ImageFarm(1, seed=6) as farm:
        urls = [farm.url(0, f"/status/403?n={i}") for i in range(8)]
        successes, errors, _ = _run(tmp_path, farm, urls, start=20.0, max_pause_seconds=1)
    assert not successes
    codes = [row["error_code"] for row in errors]
    assert codes.count(int(ErrorCode.BANNED)) >= 5  # the burst, and all refused during the ban
    assert set(codes) <= {403, int(ErrorCode.BANNED)}


def test_a_pause_longer_than_the_round_may_wait_leaves_urls_for_the_next_round(tmp_path: Path) -> None:
    with ImageFarm(1, seed=8) as farm:
        urls = [farm.url(0, "/reply/429?h=Retry-After&v=3600")]
        urls += [farm.url(0, f"/img/p{i}.jpg?w=32&h=24") for i in range(10)]
        successes, errors, seconds = _run(tmp_path, farm, urls, start=1.0, ceiling=1.0, max_pause_seconds=30)
    assert seconds < 15
    paused = [row for row in errors if row["error_code"] == int(ErrorCode.SERVER_PAUSED)]
    assert len(successes) + len(errors) == 11
    assert len(paused) >= 9 and "Retry-After" in paused[0]["error_msg"]


def test_a_stalled_request_at_the_tail_is_hedged_not_waited_for(tmp_path: Path) -> None:
    """Each URL stalls on its first request (30 s of silence): the lane sends one more copy after ~2 s."""
    spec = HostSpec("h0", background=FaultMix(stall=1.0, stall_seconds=30.0))
    with ImageFarm([spec], seed=12) as farm:
        urls = [farm.url(0, f"/img/s{i}.jpg?w=32&h=24") for i in range(3)]
        successes, errors, seconds = _run(tmp_path, farm, urls, timeout={"connect": 3, "read": 20, "total": 40})
        log = _images(farm.request_log(0))
    assert len(successes) == 3 and not errors
    assert seconds < 12, f"waited {seconds:.1f}s for stalls"
    assert len(log) == 6  # each URL twice: the stalled copy and its hedge, nothing more


def test_a_request_stalled_mid_batch_is_resent_before_its_read_timeout(tmp_path: Path) -> None:
    """A stall among many URLs is cut after ~2 s of silence and its URL sent again while the batch goes on.

    Before, only a lane's tail or a lane short of connections hedged: mid-batch the stalled request
    held its batch open until the read timeout (measured: 20 s on the heavy farm for one URL).
    """
    with ImageFarm(1, seed=13) as farm:
        urls = [farm.url(0, "/stall/late.jpg?w=32&h=24")]
        urls += [farm.url(0, f"/img/m{i}.jpg?w=32&h=24") for i in range(60)]
        successes, errors, _ = _run(
            tmp_path, farm, urls, start=10.0, ceiling=10.0, timeout={"connect": 3, "read": 6, "total": 12}
        )
    log = _images(farm.request_log(0))  # a stalled request is logged when its handler ends: at the farm's stop
    stalls = sorted(entry.start for entry in log if entry.path.startswith("/stall/"))
    images = sorted(entry.start for entry in log if entry.path.startswith("/img/"))
    assert len(successes) == 60 and len(errors) == 1  # /stall/ never answers whole: a timeout row
    assert len(stalls) == 2, stalls
    assert stalls[1] - stalls[0] < 4.5, f"resent {stalls[1] - stalls[0]:.1f}s after its first request"
    assert stalls[1] < images[-1]  # while the batch was still being sent
