"""robots.txt by RFC 9309 (robots.py): a conformance table, rates, the fetch policy against real
loopback servers, and the on-disk cache on a fake clock."""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from protego import Protego

from distributed_downloader.demo.testserver import HostSpec, ImageFarm, closed_port
from distributed_downloader.net.fetch import FetchSettings, ServerFetcher
from distributed_downloader.net.robots import (
    MAX_AGE,
    PARSE_LIMIT,
    UNAVAILABLE_RETRY,
    RobotsCache,
    RobotsFetch,
    RobotsRules,
    RobotsStatus,
    fetch_robots,
    product_token,
    request_target,
    robots_url,
    truncate_text,
)

from .robots_support import CASES, Case, Reply, RobotsServer

UA = "distributed-downloader/1.0 (+https://example.org/contact; unit tests)"
TOKEN = "distributed-downloader"


def settings(**overrides) -> FetchSettings:
    values = {
        "user_agent": UA,
        "connect_timeout": 2.0,
        "read_timeout": 3.0,
        "total_timeout": 6.0,
        "allow_private_addresses": True,
        "max_redirects": 0,  # robots.txt must get its own 5 whatever the lane's setting
        "max_bytes": 1000,  # ...and its own byte cap
    }
    return FetchSettings(**{**values, **overrides})


@pytest.fixture
def fetcher() -> Iterator[ServerFetcher]:
    f = ServerFetcher(settings())
    yield f
    f.close()


# ---------------------------------------------------------------- conformance


def check(case: Case) -> bool:
    return RobotsRules.parse(case.robots, case.token).allowed("http://example.com" + case.path)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(case: Case) -> None:
    assert check(case) is case.allowed


def test_conformance_table_size_and_score(capsys: pytest.CaptureFixture[str]) -> None:
    """The figures of the parser choice: ours must pass every case; raw Protego's count is printed."""
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    ours = sum(check(c) is c.allowed for c in CASES)
    raw = 0
    for c in CASES:
        with contextlib.suppress(Exception):  # a parser that raises fails the case
            raw += Protego.parse(c.robots).can_fetch("http://example.com" + c.path, c.token) is c.allowed
    with capsys.disabled():
        print(f"\nrobots.txt conformance: robots.py {ours}/{len(CASES)}, Protego alone {raw}/{len(CASES)}")
    assert ours == len(CASES)


# ---------------------------------------------------------------- rates


@pytest.mark.parametrize(
    ("robots", "token", "rate", "delay"),
    [
        ("User-agent: *\nCrawl-delay: 2\n", "foobot", 0.5, 2.0),
        ("User-agent: *\nRequest-rate: 1/5\n", "foobot", 0.2, None),
        ("User-agent: *\nRequest-rate: 10/1m\n", "foobot", 10 / 60, None),
        ("User-agent: *\nRequest-rate: 3/1h 0600-0845\n", "foobot", 3 / 3600, None),
        ("User-agent: *\nCrawl-delay: 1\nRequest-rate: 1/5\n", "foobot", 0.2, 1.0),  # the stricter
        ("User-agent: *\nCrawl-delay: 10\nRequest-rate: 1/2\n", "foobot", 0.1, 10.0),
        ("User-agent: *\nCrawl-delay: 0.5\n", "foobot", 2.0, 0.5),
        ("User-agent: *\nCrawl-delay: 0\n", "foobot", None, None),  # no limit
        ("User-agent: *\nCrawl-delay: soon\nRequest-rate: fast\n", "foobot", None, None),
        ("User-agent: *\nCrawl-delay: -3\nRequest-rate: 0/5\n", "foobot", None, None),
        ("User-agent: *\nCrawl-delay: nan\nCrawl-delay: inf\n", "foobot", None, None),
        ("User-agent: foobot\nCrawl-delay: 3\nUser-agent: *\nCrawl-delay: 30\n", "foobot", 1 / 3, 3.0),
        ("User-agent: foobot\nCrawl-delay: 3\nUser-agent: *\nCrawl-delay: 30\n", "otherbot", 1 / 30, 30.0),
        ("User-agent: foobot\nDisallow: /x\nUser-agent: *\nCrawl-delay: 30\n", "foobot", None, None),  # ours only
        ("User-agent: foobot\nCrawl-delay: 2\n\nUser-agent: FOOBOT\nCrawl-delay: 5\n", "foobot", 0.2, 5.0),  # merged
        ("User-agent: otherbot\nCrawl-delay: 2\n", "foobot", None, None),
        ("Crawl-delay: 2\nUser-agent: *\nDisallow: /x\n", "foobot", None, None),  # outside any group
        ("User-agent: *\ncrawl delay 4\n", "foobot", 0.25, 4.0),
    ],
)
def test_request_rate(robots: str, token: str, rate: float | None, delay: float | None) -> None:
    rules = RobotsRules.parse(robots, token)
    assert rules.request_rate() == (pytest.approx(rate) if rate is not None else None)
    assert rules.crawl_delay() == delay


def test_rates_do_not_touch_matching() -> None:
    rules = RobotsRules.parse("User-agent: *\nCrawl-delay: 5\nDisallow: /private/\nCrawl-delay: 1\n", TOKEN)
    assert rules.allowed("http://h/img/1.jpg") and not rules.allowed("http://h/private/1.jpg")
    assert rules.crawl_delay() == 5.0  # several in one group: the strictest
    assert not rules.empty


# ---------------------------------------------------------------- rules object


@pytest.mark.parametrize("text", [None, "", "# only a comment\n", "User-agent: *\nDisallow:\n", "Sitemap: /s.xml\n"])
def test_empty_rules_allow_everything(text: str | None) -> None:
    rules = RobotsRules.parse(text, TOKEN)
    assert rules.empty
    assert rules.allowed("http://h/anything")
    assert rules.request_rate() is None and rules.crawl_delay() is None


def test_not_empty_with_only_a_rate() -> None:
    rules = RobotsRules.parse("User-agent: *\nCrawl-delay: 1\n", TOKEN)
    assert not rules.empty and rules.allowed("http://h/x")


def test_our_token_from_a_user_agent_string() -> None:
    robots = "User-agent: distributed-downloader\nDisallow: /\n"
    assert not RobotsRules.parse(robots, UA).allowed("http://h/x")
    assert not RobotsRules(robots, TOKEN).allowed("http://h/x")  # the constructor takes the same arguments
    assert FetchSettings(user_agent=UA).robots_token == TOKEN


@pytest.mark.parametrize(
    ("value", "token"),
    [("Googlebot/2.1", "googlebot"), ("Foo Bar", "foo"), ("  FooBot  ", "foobot"), ("*", ""), ("img2bot", "img2bot")],
)
def test_product_token(value: str, token: str) -> None:
    assert product_token(value) == token


def test_robots_txt_is_always_allowed() -> None:
    rules = RobotsRules.parse("User-agent: *\nDisallow: /\nDisallow: /robots.txt\n", TOKEN)
    assert rules.allowed("http://h/robots.txt")
    assert rules.allowed("https://user@h:8443/robots.txt?x=1")
    assert not rules.allowed("http://h/robots.txt.bak")
    assert not rules.allowed("http://h/sub/robots.txt")


@pytest.mark.parametrize(
    "url",
    [
        "http://a[b@example.com/private/x",  # user-info with an unbalanced [ (urllib.robotparser raises)
        "http://a%5B@example.com/private/x",  # ...the same, percent-encoded
        "http://[::1/private/x",  # an unbalanced IPv6 literal
        "http://h:99999/private/x",  # a port out of range
        "/private/x",  # a bare path
        "private/x",  # a relative one
        "http://h/private/%FF%FE",  # bytes that are not UTF-8
        "http://h/private/x#frag",
    ],
)
def test_allowed_never_raises_and_reads_the_path(url: str) -> None:
    rules = RobotsRules.parse("User-agent: *\nDisallow: /private/\n", TOKEN)
    assert rules.allowed(url) is False
    assert RobotsRules.parse(None, TOKEN).allowed(url) is True


@pytest.mark.parametrize("url", ["", "http://", "http://h", "http://h?q=1", "?q", "#", "h://x/"])
def test_allowed_on_degenerate_urls(url: str) -> None:
    assert RobotsRules.parse("User-agent: *\nDisallow: /private/\n", TOKEN).allowed(url) is True
    assert RobotsRules.parse("User-agent: *\nDisallow: /\n", TOKEN).allowed(url) is False


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://h/a/b?c=d#e", "/a/b?c=d"),
        ("https://u:p@h:81/a", "/a"),
        ("http://h", "/"),
        ("http://h?x", "/?x"),
        ("//h/a", "/a"),
        ("/a?b", "/a?b"),
        ("a", "/a"),
        ("http://a[b@h/x", "/x"),
    ],
)
def test_request_target(url: str, target: str) -> None:
    assert request_target(url) == target


def test_allowed_when_the_matcher_fails_is_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = RobotsRules.parse("User-agent: *\nDisallow: /private/\n", TOKEN)

    def broken(*_args: object) -> bool:
        raise ValueError("cannot read this URL")

    monkeypatch.setattr(rules._matcher, "can_fetch", broken)
    assert rules.allowed("http://h/public/x") is False  # rules exist and cannot be evaluated: disallowed
    assert rules.allowed("http://h/robots.txt") is True


def test_only_the_first_500_kib_are_parsed() -> None:
    head = "User-agent: *\nDisallow: /early/\n"
    filler = "# " + "x" * 1000 + "\n"
    body = head + filler * (PARSE_LIMIT // len(filler) + 5) + "Disallow: /late/\n"
    assert len(body.encode()) > PARSE_LIMIT
    rules = RobotsRules.parse(body, TOKEN)
    assert not rules.allowed("http://h/early/x")
    assert rules.allowed("http://h/late/x")  # beyond the limit: ignored, the rest is kept


def test_truncation_drops_a_partial_last_line() -> None:
    """A cut 'Allow: /public-pages' must not become 'Allow: /p', which would widen the rule."""
    prefix = "User-agent: *\nDisallow: /\n"
    body = prefix + "#" * (PARSE_LIMIT - len(prefix) - 10) + "\nAllow: /public-pages\n"
    cut = truncate_text(body)
    assert len(cut.encode()) <= PARSE_LIMIT
    assert cut.endswith("\n") and "Allow" not in cut
    assert not RobotsRules.parse(body, TOKEN).allowed("http://h/p")


# ---------------------------------------------------------------- fetching (real loopback servers)


def test_rules_from_the_image_farm(fetcher: ServerFetcher) -> None:
    robots = "User-agent: *\nDisallow: /private/\nCrawl-delay: 2\n"
    with ImageFarm([HostSpec("r", robots_txt=robots), HostSpec("none")]) as farm:
        found = fetch_robots(fetcher, farm.url(0, "/img/a.jpg?w=8&h=8"))
        missing = fetch_robots(fetcher, farm.url(1, "/img/a.jpg"))
        assert farm.stats(0).requests == 1 and farm.stats(1).requests == 1
    assert found.status is RobotsStatus.RULES and found.text == robots and found.http_status == 200
    assert found.url == farm.url(0, "/robots.txt")
    assert found.fetched_at > 0 and found.elapsed > 0 and not found.transient
    rules = found.rules(UA)
    assert rules is not None and not rules.allowed(farm.url(0, "/private/x")) and rules.request_rate() == 0.5
    assert missing.status is RobotsStatus.NO_RULES and missing.text is None and missing.http_status == 404
    assert missing.rules(UA) is not None and missing.rules(UA).empty


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, RobotsStatus.NO_RULES),
        (403, RobotsStatus.NO_RULES),
        (404, RobotsStatus.NO_RULES),
        (410, RobotsStatus.NO_RULES),
        (418, RobotsStatus.NO_RULES),
        (429, RobotsStatus.RATE_LIMITED),
        (500, RobotsStatus.UNAVAILABLE),
        (502, RobotsStatus.UNAVAILABLE),
        (503, RobotsStatus.UNAVAILABLE),
        (504, RobotsStatus.UNAVAILABLE),
        (204, RobotsStatus.RULES),
    ],
)
def test_status_policy(fetcher: ServerFetcher, status: int, expected: RobotsStatus) -> None:
    with RobotsServer({"/robots.txt": Reply(status, b"User-agent: *\nDisallow: /\n" if status == 200 else b"")}) as srv:
        result = fetch_robots(fetcher, srv.url("/img/x.jpg"))
    assert result.status is expected and result.http_status == status
    assert result.transient is (expected in (RobotsStatus.UNAVAILABLE, RobotsStatus.RATE_LIMITED))
    assert (result.rules(TOKEN) is None) is result.transient
    if expected is RobotsStatus.RULES:
        assert result.text == "" and result.rules(TOKEN).empty


@pytest.mark.parametrize(("header", "seconds"), [("120", 120.0), ("99999", 600.0), ("", None), ("soon", None)])
def test_429_keeps_retry_after(fetcher: ServerFetcher, header: str, seconds: float | None) -> None:
    headers = {"Retry-After": header} if header else {}
    with RobotsServer({"/robots.txt": Reply(429, b"", headers)}) as srv:
        result = fetch_robots(fetcher, srv.url("/x"))
    assert result.status is RobotsStatus.RATE_LIMITED and result.retry_after == seconds


def test_unreachable_is_unavailable(fetcher: ServerFetcher) -> None:
    result = fetch_robots(fetcher, f"http://127.0.0.1:{closed_port()}/img/x.jpg")
    assert result.status is RobotsStatus.UNAVAILABLE and result.http_status == 0
    assert "unreachable" in result.reason and result.rules(TOKEN) is None


def test_up_to_five_redirects_whatever_the_fetchers_setting(fetcher: ServerFetcher) -> None:
    robots = b"User-agent: *\nDisallow: /no/\n"
    routes = {f"/r{i}": Reply(302, b"", {"Location": f"/r{i + 1}"}) for i in range(1, 6)}
    routes["/robots.txt"] = Reply(301, b"", {"Location": "/r1"})
    routes["/r6"] = Reply(200, robots)  # /robots.txt -> r1 -> ... -> r5 -> r6: 6 redirects
    with RobotsServer(routes) as srv:
        too_many = fetch_robots(fetcher, srv.url("/x"))
        srv.routes["/robots.txt"] = Reply(301, b"", {"Location": "/r2"})  # 5 redirects
        five = fetch_robots(fetcher, srv.url("/x"))
        srv.routes["/robots.txt"] = Reply(302, b"", {"Location": "/robots.txt"})
        loop = fetch_robots(fetcher, srv.url("/x"))
    assert too_many.status is RobotsStatus.NO_RULES and "redirect" in too_many.reason
    assert five.status is RobotsStatus.RULES and five.text == robots.decode()
    assert loop.status is RobotsStatus.NO_RULES
    assert fetcher.settings.max_redirects == 0  # the caller's fetcher is left as it was


def test_redirect_to_another_host_is_followed(fetcher: ServerFetcher) -> None:
    robots = b"User-agent: *\nDisallow: /elsewhere/\n"
    with RobotsServer({"/moved.txt": Reply(200, robots)}, address="127.0.0.3") as other, RobotsServer() as srv:
        srv.routes["/robots.txt"] = Reply(301, b"", {"Location": other.url("/moved.txt")})
        result = fetch_robots(fetcher, srv.url("/img/x.jpg"))
    assert result.status is RobotsStatus.RULES and result.text == robots.decode()


def test_redirect_to_a_non_public_address_is_refused_without_rules() -> None:
    guarded = ServerFetcher(settings(allow_private_addresses=False))
    try:
        with RobotsServer({"/robots.txt": Reply(200, b"User-agent: *\nDisallow: /\n")}) as srv:
            result = fetch_robots(guarded, srv.url("/x"))
            assert srv.paths == []  # never contacted
    finally:
        guarded.close()
    assert result.status is RobotsStatus.NO_RULES and "non-public" in result.reason


@pytest.mark.parametrize("chunked", [False, True])
def test_600_kib_robots_is_cut_not_discarded(fetcher: ServerFetcher, chunked: bool) -> None:
    head = b"User-agent: *\nDisallow: /early/\n"
    filler = b"# " + b"x" * 1000 + b"\n"
    body = head + filler * (600 * 1024 // len(filler) + 1) + b"Disallow: /late/\n"
    assert len(body) > 600 * 1024
    with RobotsServer({"/robots.txt": Reply(200, body, {"Content-Type": "text/plain"}, chunked)}) as srv:
        result = fetch_robots(fetcher, srv.url("/x"))
    assert result.status is RobotsStatus.RULES and result.truncated
    assert 0 < len(result.text.encode()) <= PARSE_LIMIT and result.text.endswith("\n")
    rules = result.rules(TOKEN)
    assert not rules.allowed("http://h/early/a") and rules.allowed("http://h/late/a")


def test_big_gzip_robots_is_cut_after_decoding(fetcher: ServerFetcher) -> None:
    body = b"User-agent: *\nDisallow: /early/\n" + b"#" * (2 * 1024 * 1024) + b"\nDisallow: /late/\n"
    packed = gzip.compress(body)
    with RobotsServer({"/robots.txt": Reply(200, packed, {"Content-Encoding": "gzip"})}) as srv:
        result = fetch_robots(fetcher, srv.url("/x"))
    assert result.status is RobotsStatus.RULES and result.truncated
    assert not result.rules(TOKEN).allowed("/early/x") and result.rules(TOKEN).allowed("/late/x")


def test_x_robots_tag_on_robots_txt_is_ignored(fetcher: ServerFetcher) -> None:
    robots = b"User-agent: *\nDisallow: /private/\n"
    with RobotsServer({"/robots.txt": Reply(200, robots, {"X-Robots-Tag": "noai, noimageai"})}) as srv:
        result = fetch_robots(fetcher, srv.url("/x"))
    assert result.status is RobotsStatus.RULES and result.text == robots.decode()


def test_bom_and_invalid_utf8_bodies(fetcher: ServerFetcher) -> None:
    body = b"\xef\xbb\xbfUser-agent: *\nDisallow: /caf\xc3\xa9/\nDisallow: /bad\xff/\n"
    with RobotsServer({"/robots.txt": Reply(200, body)}) as srv:
        result = fetch_robots(fetcher, srv.url("/x"))
    rules = result.rules(TOKEN)
    assert not result.text.startswith("\ufeff")
    assert not rules.allowed("http://h/caf%C3%A9/x") and not rules.allowed("http://h/café/x")
    assert rules.allowed("http://h/other")


def test_robots_url_drops_credentials_query_and_path() -> None:
    assert robots_url("https://user:pw@h.org:8443/a/b.jpg?x=1#f") == "https://h.org:8443/robots.txt"


# ---------------------------------------------------------------- the cache


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def factory():
    return lambda: ServerFetcher(settings())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_cache_fetches_once_then_again_after_24_hours(tmp_path: Path, clock: FakeClock) -> None:
    with RobotsServer({"/robots.txt": Reply(200, b"User-agent: *\nDisallow: /a/\n")}) as srv:
        cache = RobotsCache(tmp_path / "robots", TOKEN, clock=clock)
        first = cache.get("srv", srv.url("/img/1.jpg"), factory())
        assert isinstance(first, RobotsRules) and not first.allowed("/a/x")
        clock.advance(MAX_AGE - 1)
        assert cache.get("srv", srv.url("/img/2.jpg"), factory()) is first
        assert srv.count("/robots.txt") == 1
        srv.routes["/robots.txt"] = Reply(200, b"User-agent: *\nDisallow: /b/\n")
        clock.advance(2)  # older than 24 h: fetched again, inside a long round too
        second = cache.get("srv", srv.url("/img/3.jpg"), factory())
        assert srv.count("/robots.txt") == 2
    assert second.allowed("/a/x") and not second.allowed("/b/x")
    meta = json.loads((tmp_path / "robots" / "srv.json").read_text())
    assert meta["status"] == "rules" and meta["fetched_at"] == clock.t and meta["due_at"] == clock.t + MAX_AGE
    assert (tmp_path / "robots" / "srv.txt").read_text() == "User-agent: *\nDisallow: /b/\n"
    assert sorted(p.name for p in (tmp_path / "robots").iterdir()) == ["srv.json", "srv.lock", "srv.txt"]


def test_all_lanes_see_the_new_rules(tmp_path: Path, clock: FakeClock) -> None:
    """Two caches on one folder (two ranks): one fetch per 24 h between them, both obey the new file."""
    with RobotsServer({"/robots.txt": Reply(200, b"User-agent: *\nDisallow: /a/\n")}) as srv:
        rank_a = RobotsCache(tmp_path, TOKEN, clock=clock)
        rank_b = RobotsCache(tmp_path, TOKEN, clock=clock)
        assert not rank_a.get("srv", srv.url("/"), factory()).allowed("/a/1")
        assert not rank_b.get("srv", srv.url("/"), factory()).allowed("/a/1")  # from disk
        assert srv.count("/robots.txt") == 1
        srv.routes["/robots.txt"] = Reply(200, b"User-agent: *\nDisallow: /b/\n")
        clock.advance(MAX_AGE + 1)
        assert not rank_a.get("srv", srv.url("/"), factory()).allowed("/b/1")
        assert not rank_b.get("srv", srv.url("/"), factory()).allowed("/b/1")  # rank a's fresh copy
        assert srv.count("/robots.txt") == 2


def test_concurrent_lanes_fetch_once(tmp_path: Path, clock: FakeClock) -> None:
    with RobotsServer({"/robots.txt": Reply(200, b"User-agent: *\nDisallow: /a/\n")}) as srv:
        caches = [RobotsCache(tmp_path, TOKEN, clock=clock) for _ in range(2)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: caches[i % 2].get("srv", srv.url("/"), factory()), range(16)))
        assert srv.count("/robots.txt") == 1
    assert all(isinstance(r, RobotsRules) and not r.allowed("/a/") for r in results)


def test_unavailable_is_transient_and_retried_after_minutes(tmp_path: Path, clock: FakeClock) -> None:
    with RobotsServer({"/robots.txt": Reply(503, b"", {"Retry-After": "30"})}) as srv:
        cache = RobotsCache(tmp_path, TOKEN, clock=clock)
        first = cache.get("srv", srv.url("/x"), factory())
        assert isinstance(first, RobotsFetch) and first.status is RobotsStatus.UNAVAILABLE
        assert cache.due_at("srv") == clock.t + UNAVAILABLE_RETRY
        clock.advance(UNAVAILABLE_RETRY - 1)
        assert cache.get("srv", srv.url("/x"), factory()) == first
        assert srv.count("/robots.txt") == 1
        srv.routes["/robots.txt"] = Reply(200, b"User-agent: *\nDisallow: /a/\n")
        clock.advance(2)  # the next round
        rules = cache.get("srv", srv.url("/x"), factory())
        assert srv.count("/robots.txt") == 2
    assert isinstance(rules, RobotsRules) and not rules.allowed("/a/")
    assert RobotsCache(tmp_path, TOKEN, clock=clock).status("srv").status is RobotsStatus.RULES


def test_rate_limited_waits_its_retry_after(tmp_path: Path, clock: FakeClock) -> None:
    with RobotsServer({"/robots.txt": Reply(429, b"", {"Retry-After": "120"})}) as srv:
        cache = RobotsCache(tmp_path, TOKEN, clock=clock)
        got = cache.get("srv", srv.url("/x"), factory())
        assert isinstance(got, RobotsFetch) and got.status is RobotsStatus.RATE_LIMITED
        assert cache.due_at("srv") == clock.t + 120
        clock.advance(119)
        cache.get("srv", srv.url("/x"), factory())
        assert srv.count("/robots.txt") == 1
        clock.advance(2)
        cache.get("srv", srv.url("/x"), factory())
        assert srv.count("/robots.txt") == 2


def test_failed_refresh_keeps_the_last_good_copy(tmp_path: Path, clock: FakeClock) -> None:
    with RobotsServer({"/robots.txt": Reply(200, b"User-agent: *\nDisallow: /a/\n")}) as srv:
        cache = RobotsCache(tmp_path, TOKEN, clock=clock)
        good = cache.get("srv", srv.url("/x"), factory())
        fetched_at = clock.t
        srv.routes["/robots.txt"] = Reply(500, b"")
        clock.advance(MAX_AGE + 1)
        kept = cache.get("srv", srv.url("/x"), factory())
        assert isinstance(kept, RobotsRules) and not kept.allowed("/a/") and not good.allowed("/a/")
        state = cache.status("srv")
        assert state.status is RobotsStatus.RULES and state.fetched_at == fetched_at and state.checked_at == clock.t
        assert "HTTP 500" in state.reason
        assert cache.due_at("srv") == clock.t + UNAVAILABLE_RETRY
        assert (tmp_path / "srv.txt").exists()
        # Another rank reads the same state from disk.
        assert RobotsCache(tmp_path, TOKEN, clock=clock).get("srv", srv.url("/x"), factory()).allowed("/b/")
        assert srv.count("/robots.txt") == 2
        clock.advance(UNAVAILABLE_RETRY + 1)
        cache.get("srv", srv.url("/x"), factory())
        assert srv.count("/robots.txt") == 3


def test_failed_refresh_after_the_stale_limit_disallows(tmp_path: Path, clock: FakeClock) -> None:
    with RobotsServer({"/robots.txt": Reply(200, b"User-agent: *\nDisallow: /a/\n")}) as srv:
        cache = RobotsCache(tmp_path, TOKEN, clock=clock, stale_limit=3 * 24 * 3600)
        cache.get("srv", srv.url("/x"), factory())
        srv.routes["/robots.txt"] = Reply(503, b"")
        clock.advance(4 * 24 * 3600)
        got = cache.get("srv", srv.url("/x"), factory())
    assert isinstance(got, RobotsFetch) and got.status is RobotsStatus.UNAVAILABLE


def test_no_rules_removes_an_old_body(tmp_path: Path, clock: FakeClock) -> None:
    with RobotsServer({"/robots.txt": Reply(200, b"User-agent: *\nDisallow: /\n")}) as srv:
        cache = RobotsCache(tmp_path, TOKEN, clock=clock)
        assert not cache.get("srv", srv.url("/x"), factory()).allowed("/x")
        srv.routes["/robots.txt"] = Reply(404, b"")
        clock.advance(MAX_AGE)
        rules = cache.get("srv", srv.url("/x"), factory())
    assert isinstance(rules, RobotsRules) and rules.empty
    assert not (tmp_path / "srv.txt").exists()
    assert json.loads((tmp_path / "srv.json").read_text())["status"] == "no_rules"


def test_an_older_profilings_robots_file_is_used_until_24_hours(tmp_path: Path) -> None:
    (tmp_path / "srv.txt").write_text("User-agent: *\nDisallow: /old/\n")
    mtime = (tmp_path / "srv.txt").stat().st_mtime
    clock = FakeClock(mtime + 60)

    def no_fetch() -> ServerFetcher:
        raise AssertionError("must not fetch")

    cache = RobotsCache(tmp_path, TOKEN, clock=clock)
    assert not cache.get("srv", "http://127.0.0.1:9/x", no_fetch).allowed("/old/1")
    assert cache.due_at("srv") == pytest.approx(mtime + MAX_AGE)


def test_store_seeds_the_cache_and_an_unreadable_sidecar_refetches(tmp_path: Path, clock: FakeClock) -> None:
    cache = RobotsCache(tmp_path, TOKEN, clock=clock)
    seeded = RobotsFetch(RobotsStatus.RULES, "User-agent: *\nDisallow: /s/\n", "profiling", clock.t, checked_at=clock.t)
    cache.store("srv", seeded)

    def no_fetch() -> ServerFetcher:
        raise AssertionError("must not fetch")

    assert not RobotsCache(tmp_path, TOKEN, clock=clock).get("srv", "http://h/", no_fetch).allowed("/s/")
    (tmp_path / "srv.json").write_text("{not json")
    with RobotsServer({"/robots.txt": Reply(200, b"User-agent: *\nDisallow: /t/\n")}) as srv:
        fresh = RobotsCache(tmp_path, TOKEN, clock=clock).get("srv", srv.url("/"), factory())
        assert srv.count("/robots.txt") == 1
    assert not fresh.allowed("/t/") and fresh.allowed("/s/")


def test_the_cache_keeps_a_bounded_number_of_servers_in_memory(tmp_path: Path, clock: FakeClock) -> None:
    """A rank meets thousands of servers: memory keeps the latest few, the disk answers for the others."""
    cache = RobotsCache(tmp_path, TOKEN, clock=clock, max_entries=4)
    for i in range(10):
        text = f"User-agent: *\nDisallow: /s{i}/\n"
        cache.store(f"srv{i}", RobotsFetch(RobotsStatus.RULES, text, "profiling", clock.t, checked_at=clock.t))
    assert len(cache._entries) == 4

    def no_fetch() -> ServerFetcher:
        raise AssertionError("must not fetch")

    rules = cache.get("srv0", "http://h/", no_fetch)
    assert not rules.allowed("/s0/a") and rules.allowed("/s1/a")
    assert len(cache._entries) == 4 and "srv0" in cache._entries


@pytest.mark.parametrize("length", [200, 237, 253])
def test_a_server_name_as_long_as_dns_allows_is_cached(tmp_path: Path, clock: FakeClock, length: int) -> None:
    """Its batch folder exists (server_name=<name>), so its robots.txt must be storable too (it used to
    raise 'File name too long' from profiling and from the lane thread, which ends the MPI job)."""
    name = ".".join(["a" * 60] * 5)[:length]
    others = name[:-1] + "b"
    cache = RobotsCache(tmp_path, TOKEN, clock=clock)
    for server, path in ((name, "/x/"), (others, "/y/")):
        text = f"User-agent: *\nDisallow: {path}\n"
        cache.store(server, RobotsFetch(RobotsStatus.RULES, text, "profiling", clock.t, checked_at=clock.t))

    def no_fetch() -> ServerFetcher:
        raise AssertionError("must not fetch")

    fresh = RobotsCache(tmp_path, TOKEN, clock=clock)
    assert not fresh.get(name, "http://h/", no_fetch).allowed("/x/") and fresh.status(name) is not None
    assert fresh.get(others, "http://h/", no_fetch).allowed("/x/")


@pytest.mark.parametrize(("code", "status"), [(429, RobotsStatus.RATE_LIMITED), (503, RobotsStatus.UNAVAILABLE)])
def test_a_malformed_retry_after_date_on_robots_txt_never_raises(code: int, status: RobotsStatus) -> None:
    """An hour of 20 digits overflows the date parser: fetch_robots raised it into the lane thread (MPI job over)."""
    bad = "Mon, 01 Jan 2024 99999999999999999999:00:00 GMT"
    with RobotsServer({"/robots.txt": Reply(code, b"", {"Retry-After": bad})}) as srv:
        got = fetch_robots(ServerFetcher(settings()), srv.url("/x.jpg"))
    assert got.status is status and got.retry_after is None


def test_a_long_robots_txt_whose_second_read_redirects_to_garbage_never_raises() -> None:
    """Over 500 KiB, robots.txt is read again for its prefix; a hostile server then redirects to an
    unparsable URL: that ValueError escaped fetch_robots (into the lane thread) from its except clause."""
    big = b"User-agent: *\n" + b"Disallow: /x\n" * 60000
    replies = iter([Reply(200, big)])

    def route() -> Reply:
        return next(replies, Reply(302, b"", {"Location": "http://[::1/robots.txt"}))

    with RobotsServer({"/robots.txt": route}) as srv:
        got = fetch_robots(ServerFetcher(settings()), srv.url("/x.jpg"))
    assert got.status is RobotsStatus.UNAVAILABLE and "ValueError" in got.reason


def test_refresh_fetches_whatever_the_cache_holds(tmp_path: Path, clock: FakeClock) -> None:
    with RobotsServer({"/robots.txt": Reply(200, b"User-agent: *\nDisallow: /a/\n")}) as srv:
        cache = RobotsCache(tmp_path, TOKEN, clock=clock)
        cache.get("srv", srv.url("/"), factory())
        state = cache.refresh("srv", srv.url("/"), factory())
        assert srv.count("/robots.txt") == 2 and state.status is RobotsStatus.RULES


def test_cache_for_redirect_targets_on_other_hosts(tmp_path: Path, clock: FakeClock) -> None:
    """A lane checks a redirect target against its own host's robots.txt, fetched on first need."""
    with (
        RobotsServer({"/robots.txt": Reply(200, b"User-agent: *\nDisallow: /private/\n")}, "127.0.0.4") as other,
        RobotsServer({}) as own,
    ):
        cache = RobotsCache(tmp_path, TOKEN, clock=clock)
        own_rules = cache.get("own", own.url("/img/1.jpg"), factory())
        target = other.url("/private/1.jpg")
        other_rules = cache.get("other", target, factory())
        assert own_rules.empty and not other_rules.allowed(target)
        assert own.count("/robots.txt") == 1 and other.count("/robots.txt") == 1 and len(other.paths) == 1


def test_cache_is_thread_safe_under_refresh(tmp_path: Path, clock: FakeClock) -> None:
    """Lanes reading while the entry expires: every answer is a complete rules object, one fetch per expiry."""
    with RobotsServer({"/robots.txt": Reply(200, b"User-agent: *\nDisallow: /a/\n")}) as srv:
        cache = RobotsCache(tmp_path, TOKEN, clock=clock)
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                for _ in range(50):
                    got = cache.get("srv", srv.url("/"), factory())
                    assert isinstance(got, RobotsRules) and not got.allowed("/a/")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(6)]
        for t in threads:
            t.start()
        for _ in range(3):
            clock.advance(MAX_AGE + 1)
        for t in threads:
            t.join(30)
        assert not errors
        assert 1 <= srv.count("/robots.txt") <= 4
