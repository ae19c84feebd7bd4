"""Profiling against real loopback servers: robots.txt first (RFC 9309), then one probe of an allowed
URL after the server's pace; an unavailable robots.txt is a transient state, never an ignored server."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_downloader.demo.testserver import HostSpec, ImageFarm, closed_port
from distributed_downloader.errors import ErrorCode, is_transient
from distributed_downloader.net.fetch import FetchSettings, ServerFetcher
from distributed_downloader.net.robots import UNAVAILABLE_RETRY, RobotsCache, RobotsFetch, RobotsRules, RobotsStatus
from distributed_downloader.plan.profiling import (
    ProbeSettings,
    ServerProfile,
    first_url,
    first_urls,
    probe_server,
    profile_all,
    read_profiles,
    write_tables,
)

from .robots_support import Reply, RobotsServer

UA = "distributed-downloader/1.0 (+https://example.org/contact; unit tests)"
TOKEN = "distributed-downloader"
IMG = "/img/a.jpg?w=8&h=8"
OLD_COLUMNS = [
    "server_name",
    "total_batches",
    "total_urls",
    "rate_limit",
    "max_rate",
    "max_connections",
    "latency_ms",
    "probe_status",
    "robots_found",
    "crawl_delay",
    "advertised_rate",
    "reachable",
    "reason",
    "error_code",
]


def probe_settings(**overrides) -> ProbeSettings:
    fetch = FetchSettings(
        user_agent=UA, connect_timeout=2.0, read_timeout=3.0, total_timeout=6.0, allow_private_addresses=True
    )
    values = {
        "fetch": fetch,
        "default_rate": 50.0,
        "max_rate": 100.0,
        "max_connections": 4,
        "respect_robots": True,
    }
    return ProbeSettings(**{**values, **overrides})


def farm_with(robots: str | None) -> ImageFarm:
    return ImageFarm([HostSpec("h", robots_txt=robots)])


# ---------------------------------------------------------------- the probe obeys robots.txt


def test_probe_picks_an_allowed_url() -> None:
    with farm_with("User-agent: *\nDisallow: /status/\n") as farm:
        candidates = [farm.url(0, "/status/418"), farm.url(0, "/status/419"), farm.url(0, IMG)]
        profile, robots = probe_server("h", candidates, 2, 20, probe_settings())
        stats = farm.stats(0)
    assert profile.probe_url == candidates[2] and profile.probe_status == 200
    assert stats.requests == 2 and stats.by_status == {200: 2}  # robots.txt and the allowed image only
    assert profile.reachable and profile.robots_found and profile.error_code == 0
    assert profile.robots_status == "rules" and profile.robots_fetched_at > 0 and profile.last_request_at > 0
    assert robots is not None and robots.status is RobotsStatus.RULES


def test_no_allowed_url_among_the_first_skips_the_probe() -> None:
    with farm_with("User-agent: *\nDisallow: /\n") as farm:
        profile, robots = probe_server("h", [farm.url(0, IMG), farm.url(0, "/img/b.jpg")], 1, 2, probe_settings())
        stats = farm.stats(0)
    assert stats.requests == 1  # robots.txt alone
    assert profile.reachable and profile.probe_url == "" and profile.probe_status == 0
    assert profile.error_code == 0 and profile.reason == "" and profile.latency_ms > 0


def test_only_the_first_few_urls_are_candidates() -> None:
    with farm_with("User-agent: *\nDisallow: /status/\n") as farm:
        candidates = [farm.url(0, f"/status/{400 + i}") for i in range(5)] + [farm.url(0, IMG)]
        profile, _ = probe_server("h", candidates, 1, 6, probe_settings(probe_candidates=5))
        assert farm.stats(0).requests == 1
    assert profile.probe_url == "" and profile.reachable


def test_crawl_delay_separates_robots_txt_and_the_probe() -> None:
    with farm_with(f"User-agent: {TOKEN}\nCrawl-delay: 1\n") as farm:
        profile, _ = probe_server("h", farm.url(0, IMG), 1, 1, probe_settings())
        times = farm.stats(0).request_times
    assert len(times) == 2 and times[1] - times[0] >= 1.0
    assert profile.crawl_delay == 1.0 and profile.rate_limit == 1.0 and profile.max_rate == 1.0


def test_the_starting_rate_separates_them_too() -> None:
    with farm_with(None) as farm:
        profile, robots = probe_server("h", farm.url(0, IMG), 1, 1, probe_settings(default_rate=4.0))
        times = farm.stats(0).request_times
    assert len(times) == 2 and times[1] - times[0] >= 0.25
    assert robots is not None and robots.status is RobotsStatus.NO_RULES and profile.robots_status == "no_rules"
    assert not profile.robots_found and profile.probe_status == 200


def test_a_crawl_delay_too_long_to_wait_skips_the_probe() -> None:
    slept: list[float] = []
    with farm_with("User-agent: *\nCrawl-delay: 5\n") as farm:
        profile, _ = probe_server("h", farm.url(0, IMG), 1, 1, probe_settings(max_probe_wait=2.0, sleep=slept.append))
        assert farm.stats(0).requests == 1
    assert slept == [] and profile.reachable and profile.probe_url == "" and profile.crawl_delay == 5.0


def test_without_robots_the_first_url_is_probed_at_once() -> None:
    with farm_with("User-agent: *\nDisallow: /\n") as farm:
        profile, robots = probe_server("h", farm.url(0, IMG), 1, 1, probe_settings(respect_robots=False))
        assert farm.stats(0).requests == 1
    assert robots is None and profile.robots_status == "" and profile.probe_status == 200


# ---------------------------------------------------------------- robots.txt unavailable: transient


@pytest.mark.parametrize(("status", "expected"), [(500, "unavailable"), (503, "unavailable"), (429, "rate_limited")])
def test_robots_5xx_or_429_is_transient_not_ignored(tmp_path: Path, status: int, expected: str) -> None:
    with RobotsServer({"/robots.txt": Reply(status, b""), "/img/a.jpg": Reply(200, b"x")}) as srv:
        profile, robots = probe_server("srv", srv.url("/img/a.jpg"), 1, 1, probe_settings())
        assert srv.paths == ["/robots.txt"]  # disallow everything for now: no probe
    assert profile.error_code == 0 and profile.reason == ""
    assert profile.robots_status == expected and profile.robots_transient and profile.reachable
    write_tables([(profile, robots)], tmp_path / "profiles.csv", tmp_path / "ignored.csv", tmp_path / "robots")
    assert (tmp_path / "ignored.csv").read_text() == "server_name,reason,error_code\n"
    back = read_profiles(tmp_path / "profiles.csv")["srv"]
    assert back == profile and back.robots_transient
    held = RobotsCache(tmp_path / "robots", TOKEN).status("srv")
    assert held is not None and held.status.value == expected


def test_the_download_stage_fetches_it_again(tmp_path: Path) -> None:
    with RobotsServer({"/robots.txt": Reply(503, b"")}) as srv:
        profile, robots = probe_server("srv", srv.url("/img/a.jpg"), 1, 1, probe_settings())
        write_tables([(profile, robots)], tmp_path / "p.csv", tmp_path / "i.csv", tmp_path / "robots")
        srv.routes["/robots.txt"] = Reply(200, b"User-agent: *\nDisallow: /private/\n")
        next_round = robots.fetched_at + UNAVAILABLE_RETRY + 1
        cache = RobotsCache(tmp_path / "robots", TOKEN, clock=lambda: next_round)
        rules = cache.get("srv", srv.url("/img/a.jpg"), lambda: ServerFetcher(probe_settings().fetch))
        assert srv.count("/robots.txt") == 2
    assert isinstance(rules, RobotsRules) and not rules.allowed("/private/x")


def test_unreachable_robots_is_transient_too() -> None:
    profile, robots = probe_server("dead", f"http://127.0.0.1:{closed_port()}/img/a.jpg", 1, 1, probe_settings())
    assert robots is not None and robots.status is RobotsStatus.UNAVAILABLE
    assert profile.error_code == 0 and not profile.reachable and profile.robots_status == "unavailable"


def test_a_non_public_server_is_still_ignored_with_minus_8() -> None:
    guarded = probe_settings()
    guarded.fetch = FetchSettings(user_agent=UA, connect_timeout=2.0, read_timeout=3.0, total_timeout=6.0)
    with farm_with(None) as farm:
        profile, robots = probe_server("h", farm.url(0, IMG), 1, 1, guarded)
        assert farm.stats(0).requests == 0
    assert profile.error_code == int(ErrorCode.PRIVATE_ADDRESS)
    assert robots is not None and robots.status is RobotsStatus.NO_RULES


# ---------------------------------------------------------------- tables


def test_read_profiles_reads_an_older_table(tmp_path: Path) -> None:
    path = tmp_path / "profiles.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(OLD_COLUMNS)
        writer.writerow(["a.org", 2, 20, 3.0, 50.0, 8, 12.5, 200, True, 0.0, 0.0, True, "", 0])
        writer.writerow(["b.org", 1, 5, 3.0, 50.0, 8, 0.0, 0, False, 0.0, 0.0, False, "probe failed: x", -10])
    profiles = read_profiles(path)
    assert profiles["a.org"].robots_status == "" and profiles["a.org"].probe_url == ""
    assert profiles["a.org"].robots_fetched_at == 0.0 and profiles["a.org"].last_request_at == 0.0
    assert profiles["a.org"].robots_found is True and profiles["a.org"].latency_ms == 12.5
    assert profiles["b.org"].error_code == -10 and not profiles["b.org"].robots_transient


def test_new_columns_come_last_and_unknown_columns_are_skipped(tmp_path: Path) -> None:
    profile = ServerProfile("a.org", 1, 1, 3.0, 50.0, 8, 1.0, 200, False, 0.0, 0.0, True)
    write_tables([(profile, None)], tmp_path / "p.csv", tmp_path / "i.csv", tmp_path / "robots")
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert header[: len(OLD_COLUMNS)] == OLD_COLUMNS
    assert header[len(OLD_COLUMNS) :] == ["robots_status", "robots_fetched_at", "probe_url", "last_request_at"]
    text = (tmp_path / "p.csv").read_text().splitlines()
    (tmp_path / "p.csv").write_text(f"{text[0]},future_column\n{text[1]},42\n")
    assert read_profiles(tmp_path / "p.csv")["a.org"] == profile


def test_write_tables_stores_each_kind_of_robots_answer(tmp_path: Path) -> None:
    def profile(name: str) -> ServerProfile:
        return ServerProfile(name, 1, 1, 3.0, 50.0, 8, 1.0, 200, False, 0.0, 0.0, True)

    robots = tmp_path / "robots"
    robots.mkdir()
    (robots / "gone.txt").write_text("User-agent: *\nDisallow: /\n")
    found = RobotsFetch(RobotsStatus.RULES, "User-agent: *\nDisallow: /a/\n", "found", 1e9, checked_at=1e9)
    missing = RobotsFetch(RobotsStatus.NO_RULES, None, "HTTP 404", 1e9, checked_at=1e9)
    results = [
        (profile("found"), found),
        (profile("missing"), missing),
        (profile("text"), "User-agent: *\nDisallow: /t/\n"),  # an older caller's plain text
        (profile("gone"), None),
    ]
    write_tables(results, tmp_path / "p.csv", tmp_path / "i.csv", robots)
    assert (robots / "found.txt").read_text() == found.text
    assert not (robots / "missing.txt").exists() and (robots / "missing.json").exists()
    assert (robots / "text.txt").read_text() == "User-agent: *\nDisallow: /t/\n"
    assert not (robots / "gone.txt").exists() and not (robots / "gone.json").exists()
    cache = RobotsCache(robots, TOKEN, clock=lambda: 1e9 + 60)
    assert cache.status("found").status is RobotsStatus.RULES
    assert cache.status("missing").status is RobotsStatus.NO_RULES


def write_urls(folder: Path, server: str, urls: list[str]) -> None:
    target = folder / f"server_name={server}" / "partition_id=0"
    target.mkdir(parents=True)
    pq.write_table(pa.table({"identifier": urls}), target / "urls.parquet", row_group_size=2)


def test_profile_all_probes_an_allowed_url_of_the_first_partition(tmp_path: Path) -> None:
    with farm_with("User-agent: *\nDisallow: /status/\n") as farm:
        urls = [farm.url(0, f"/status/{400 + i}") for i in range(3)] + [farm.url(0, IMG)] * 20
        write_urls(tmp_path / "urls", "h", urls)
        assert first_urls(tmp_path / "urls", "h", 4) == urls[:4] and first_url(tmp_path / "urls", "h") == urls[0]
        manifest = {
            "servers": {"h": {"fingerprints": ["f0"], "urls": len(urls)}, "mine": {"fingerprints": ["f1"], "urls": 1}}
        }
        results = profile_all(manifest, tmp_path / "urls", probe_settings(), {"mine"})
        stats = farm.stats(0)
    by_name = {p.server_name: (p, r) for p, r in results}
    assert by_name["h"][0].probe_url == urls[3] and stats.requests == 2 and 400 not in stats.by_status
    assert by_name["mine"][0].error_code == int(ErrorCode.SERVER_IGNORED) and by_name["mine"][1] is None


# ---------------------------------------------------------------- one broken URL never judges a server


@pytest.mark.parametrize("respect_robots", [True, False])
def test_a_broken_first_url_does_not_write_off_the_server(respect_robots: bool) -> None:
    """The first URL resets the connection: the next one is probed, the server is downloaded."""
    with farm_with(None) as farm:
        candidates = [farm.url(0, "/reset/a.jpg?w=8&h=8"), farm.url(0, IMG)]
        profile, _ = probe_server("h", candidates, 1, 2, probe_settings(respect_robots=respect_robots))
    assert profile.error_code == 0 and profile.reachable
    if not respect_robots:
        assert profile.probe_url == candidates[1] and profile.probe_status == 200


def test_a_server_that_answers_nothing_is_held_for_the_round() -> None:
    """Unreachable (-18) is transient: held in round 1, downloaded again by the next round's lanes."""
    port = closed_port()
    candidates = [f"http://127.0.0.1:{port}/a.jpg", f"http://127.0.0.1:{port}/b.jpg"]
    profile, _ = probe_server("h", candidates, 1, 2, probe_settings(respect_robots=False))
    assert profile.error_code == int(ErrorCode.SERVER_UNREACHABLE) and "refused" in profile.reason
    assert is_transient(profile.error_code)
