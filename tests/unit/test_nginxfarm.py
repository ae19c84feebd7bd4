"""The nginx loopback farm is real nginx: its token bucket, connection limit, faults and logs.

Loopback traffic only; every loop is bounded in count and time.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from distributed_downloader.demo.nginxfarm import LogEntry, NginxFarm, NginxHost, parse_log_line, peak_overlap
from tests.conftest import skip_or_fail

TIMEOUT = 5.0  # per request
UA = 'nginxfarm-test/1.0 (tab\there; "quoted")'


@pytest.fixture
def session() -> Iterator[requests.Session]:
    """Needs nginx (skip_or_fail otherwise): every test that talks to the farm uses it."""
    availability = NginxFarm.available()
    if not availability:
        skip_or_fail(f"nginx cannot run here: {availability.reason}")
    with requests.Session() as s:
        s.headers["User-Agent"] = UA
        yield s


def _burst(session: requests.Session, url: str, count: int) -> tuple[list[requests.Response], float]:
    started = time.monotonic()
    responses = [session.get(url, timeout=TIMEOUT) for _ in range(count)]
    return responses, time.monotonic() - started


def _has_retry_after(response: requests.Response) -> bool:
    return any(name.lower() == "retry-after" for name in response.headers)


def _stalled_socket(farm: NginxFarm, host: int, path: str) -> socket.socket:
    """A raw connection whose request nginx admitted: its first trickled byte has arrived."""
    address, port = farm.url(host, "").removeprefix("http://").split(":")
    sock = socket.create_connection((address, int(port)), timeout=TIMEOUT)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
    assert sock.recv(1) == b"H"
    return sock


# --------------------------------------------------------------------------- pure helpers


def test_parse_log_line_unescapes_and_rejects_partial_lines() -> None:
    line = '1700000000.250\t0.125\t200\t/img/a.jpg?x=1\tua \\"q\\"\\tt\t7\t1234\n'
    entry = parse_log_line(line)
    assert entry == LogEntry(1700000000.125, 1700000000.25, 200, "/img/a.jpg?x=1", 'ua "q"\tt', 7, 1234)
    assert parse_log_line("1700000000.250\t0.125\t200\t/img/a") is None  # a line nginx is still writing
    assert parse_log_line("x\t0.1\t200\t/\t\t1\t1") is None


def test_peak_overlap_half_open_and_instantaneous() -> None:
    def entry(start: float, end: float) -> LogEntry:
        return LogEntry(start, end, 200, "/", "")

    back_to_back = [entry(0.0, 0.010), entry(0.010, 0.020), entry(0.020, 0.020), entry(0.021, 0.030)]
    assert peak_overlap(back_to_back) == 1  # one keep-alive connection, one request after another
    nested = [entry(0.0, 1.0), entry(0.1, 0.5), entry(0.2, 0.3), entry(0.25, 0.25), entry(0.6, 0.9)]
    assert peak_overlap(nested) == 4
    assert peak_overlap([]) == 0


def test_host_validation() -> None:
    for bad in (
        {"rate": 0, "burst": 1},
        {"rate": 5, "burst": -1},
        {"rate": 5, "burst": 1, "refuse_status": 200},
        {"rate": 5, "burst": 1, "max_connections": 0},
    ):
        with pytest.raises(ValueError):
            NginxHost(**bad)


# --------------------------------------------------------------------------- real nginx


def test_token_bucket_refuses_a_naive_burst_without_retry_after(session: requests.Session) -> None:
    hosts = [NginxHost(rate=5, burst=2, refuse_status=429), NginxHost(rate=4, burst=3)]
    with NginxFarm(hosts) as farm:
        for host in range(2):
            farm.add_images(host, ["a"])
        # A naive client: 12 requests back to back. nginx admits burst + 1 at once, then ~rate per second.
        refused_first = 0
        for host, spec in enumerate(hosts):
            responses, elapsed = _burst(session, farm.url(host, "/img/a.jpg"), 12)
            ok = sum(r.status_code == 200 for r in responses)
            refused = [r for r in responses if r.status_code != 200]
            assert spec.burst + 1 <= ok <= spec.burst + 1 + math.ceil(elapsed * spec.rate), (ok, elapsed)
            assert refused and {r.status_code for r in refused} == {spec.refuse_status}
            assert not any(_has_retry_after(r) for r in responses)
            assert all(r.content == responses[0].content for r in responses[: spec.burst + 1])
            refused_first = refused_first or len(refused)

        # Sustained: 2x the rate for 1.5 s. The bucket refills at `rate`, so admissions track it.
        spec = hosts[0]
        url = farm.url(0, "/img/a.jpg")
        time.sleep(1.0)  # bucket empty again (excess drains at rate 5 within 0.4 s)
        started = time.monotonic()
        statuses = []
        for i in range(int(1.5 * 2 * spec.rate)):
            time.sleep(max(0.0, started + i / (2 * spec.rate) - time.monotonic()))
            statuses.append(session.get(url, timeout=TIMEOUT).status_code)
        elapsed = time.monotonic() - started
        ok = statuses.count(200)
        assert (
            spec.burst + 1 + math.floor(elapsed * spec.rate) - 1
            <= ok
            <= spec.burst + 1 + math.ceil(elapsed * spec.rate)
        )
        assert statuses.count(429) == len(statuses) - ok

        # The host's own access log saw every request, with our User-Agent, refusals included.
        entries = farm.log(0)
        assert len(entries) == 12 + len(statuses)
        assert {e.user_agent for e in entries} == {UA}
        assert sum(e.status == 429 for e in entries) == refused_first + statuses.count(429)
        assert farm.log(1) and all(e.status in (200, 503) for e in farm.log(1))


def test_fractional_rate_uses_requests_per_minute(session: requests.Session) -> None:
    # 0.5 r/s: a request every 2 s, so the burst must only come back within 2 s (a loaded machine's
    # scheduling noise is far below that), not within a fraction of a second.
    with NginxFarm([NginxHost(rate=0.5, burst=0)]) as farm:
        assert "rate=30r/m" in (farm.workdir / "nginx.conf").read_text()
        responses, elapsed = _burst(session, farm.url(0, "/img/none.jpg"), 4)
        assert elapsed < 2.0
        assert [r.status_code for r in responses] == [404, 503, 503, 503]  # burst 0: one request, then wait 2 s


def test_limit_conn_refuses_concurrent_requests(session: requests.Session) -> None:
    spec = NginxHost(rate=100, burst=100, refuse_status=429, max_connections=2)
    with NginxFarm([spec]) as farm:
        farm.add_images(0, ["a"])
        farm.add_faults(0, stall=["s1", "s2"])
        held = [_stalled_socket(farm, 0, "/stall/s1.jpg"), _stalled_socket(farm, 0, "/stall/s2.jpg")]
        try:
            refused = session.get(farm.url(0, "/img/a.jpg"), timeout=TIMEOUT)
            assert refused.status_code == 429 and not _has_retry_after(refused)
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(e.path.startswith("/stall/") for e in farm.log(0)) < 2:
            time.sleep(0.1)  # nginx notices a hang-up at its next trickled write, then logs the request
        assert session.get(farm.url(0, "/img/a.jpg"), timeout=TIMEOUT).status_code == 200
        # Two stalled requests in flight plus the refused one at that instant.
        assert farm.max_in_flight(0) == 3
        assert {e.path for e in farm.log(0) if e.status == 429} == {"/img/a.jpg"}


def test_faults_robots_and_images(session: requests.Session, tmp_path: Path) -> None:
    robots = "User-agent: *\nDisallow: /private/\n"
    hosts = [NginxHost(rate=50, burst=20, robots_txt=robots), NginxHost(rate=1, burst=0, refuse_status=429)]
    with NginxFarm(hosts, workdir=tmp_path / "farm", seed=3) as farm:
        farm.add_images(0, ["a", "b"], width=80, height=60)
        farm.add_faults(0, missing=["m"], reset=["r"], error500=["e"], stall=["s"])
        got = session.get(farm.url(0, "/img/a.jpg"), timeout=TIMEOUT)
        assert got.status_code == 200 and got.headers["Content-Type"] == "image/jpeg"
        assert hashlib.md5(got.content).hexdigest() == farm.expected_md5(0, "/img/a.jpg")
        assert farm.expected_md5(0, "/img/a.jpg") != farm.expected_md5(0, "/img/b.jpg")
        assert session.get(farm.url(0, "/img/a.jpg?cachebuster=1"), timeout=TIMEOUT).content == got.content
        assert session.get(farm.url(0, "/missing/m.jpg"), timeout=TIMEOUT).status_code == 404
        assert session.get(farm.url(0, "/err/e.jpg"), timeout=TIMEOUT).status_code == 500
        with pytest.raises(requests.ConnectionError):
            requests.get(farm.url(0, "/reset/r.jpg"), timeout=TIMEOUT)  # 444: closed without a response
        robots_response = session.get(farm.url(0, "/robots.txt"), timeout=TIMEOUT)
        assert robots_response.status_code == 200 and robots_response.text == robots
        assert session.get(farm.url(1, "/robots.txt"), timeout=TIMEOUT).status_code == 404
        assert farm.faults(0) == {
            "/missing/m.jpg": "missing",
            "/reset/r.jpg": "reset",
            "/err/e.jpg": "error500",
            "/stall/s.jpg": "stall",
        }
        # Stall: bytes trickle at 1 per second from the status line on, so no read timeout ever fires.
        sock = _stalled_socket(farm, 0, "/stall/s.jpg")
        sock.settimeout(1.5)
        try:
            assert sock.recv(16) == b"T"
        finally:
            sock.close()
        # Images added while running are served at once.
        farm.add_images(0, ["late"])
        late = session.get(farm.url(0, "/img/late.jpg"), timeout=TIMEOUT)
        assert hashlib.md5(late.content).hexdigest() == farm.expected_md5(0, "/img/late.jpg")

        # robots.txt is exempt from the limit; everything else on the host is not.
        statuses = [session.get(farm.url(1, "/robots.txt"), timeout=TIMEOUT).status_code for _ in range(6)]
        assert statuses == [404] * 6
        statuses = [session.get(farm.url(1, p), timeout=TIMEOUT).status_code for p in ("/img/x.jpg", "/err/e.jpg")]
        assert statuses == [404, 429]

        by_path = {e.path: e.status for e in farm.log(0)}
        assert by_path["/reset/r.jpg"] == 444 and by_path["/err/e.jpg"] == 500 and by_path["/missing/m.jpg"] == 404
        assert farm.worst_window(1) == 2  # the 6 robots.txt requests are not counted
        assert (tmp_path / "farm" / "logs" / "host_0.access.log").exists()
    assert (tmp_path / "farm").exists()  # a workdir the caller gave is kept (its logs)


def test_log_windows_and_overlap_from_real_traffic(session: requests.Session) -> None:
    with NginxFarm([NginxHost(rate=1000, burst=1000)]) as farm:
        farm.add_images(0, ["a"])
        for _ in range(10):  # one keep-alive connection: one request after the other
            assert session.get(farm.url(0, "/img/a.jpg"), timeout=TIMEOUT).status_code == 200
        assert farm.max_in_flight(0) == 1
        assert len({e.connection for e in farm.log(0)}) == 1  # keep-alive reused the connection
        time.sleep(1.1)
        for _ in range(4):
            session.get(farm.url(0, "/img/a.jpg"), timeout=TIMEOUT)
        assert farm.worst_window(0) == 10
        assert farm.worst_window(0, window=60.0) == 14
        entries = farm.log(0)
        assert all(e.start <= e.end for e in entries)
        assert abs(entries[0].end - time.time()) < 10


def test_lifecycle_stops_every_process(session: requests.Session) -> None:
    farm = NginxFarm([NginxHost(rate=5, burst=2)])
    with pytest.raises(RuntimeError):
        farm.url(0, "/")
    farm.start()
    pid = farm._proc.pid if farm._proc else 0
    workdir = farm.workdir
    try:
        assert farm.running and farm.url(0, "/img/a.jpg").startswith("http://127.0.0.2:")
        with pytest.raises(RuntimeError):
            farm.start()
    finally:
        farm.stop()
    assert not farm.running
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # master and worker are gone
    assert not workdir.exists()  # the farm's own temp dir is removed
    farm.stop()  # idempotent
