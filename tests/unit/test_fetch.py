"""Tests for HTTP fetching against the real loopback ImageFarm (127.x only), plus pure helpers."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

from distributed_downloader import config as config_mod
from distributed_downloader.demo import testserver
from distributed_downloader.demo.testserver import HostSpec, ImageFarm, SilentHost, closed_port
from distributed_downloader.errors import DownloadError, ErrorCode
from distributed_downloader.imaging.process import ImageSettings, process_image
from distributed_downloader.net import fetch as fetch_mod
from distributed_downloader.net.fetch import (
    AddressPolicy,
    FetchSettings,
    HopGate,
    HttpStatusError,
    ServerFetcher,
    is_public_address,
    x_robots_opt_out,
)

UA = "distributed-downloader/1.0 (+https://example.org/contact; unit tests)"
SMALL = "w=64&h=48"


@pytest.fixture(scope="module")
def farm() -> Iterator[ImageFarm]:
    with ImageFarm([HostSpec("h1"), HostSpec("h2")], seed=11) as running:
        yield running


def settings(**overrides) -> FetchSettings:
    values = {
        "user_agent": UA,
        "connect_timeout": 3.0,
        "read_timeout": 5.0,
        "total_timeout": 8.0,
        "allow_private_addresses": True,
    }
    return FetchSettings(**{**values, **overrides})


@pytest.fixture
def fetcher() -> Iterator[ServerFetcher]:
    f = ServerFetcher(settings())
    yield f
    f.close()


def test_success_returns_the_exact_body(farm: ImageFarm, fetcher: ServerFetcher) -> None:
    path = f"/img/cat.jpg?{SMALL}"
    result = fetcher.get(farm.url(0, path))
    assert result.status == 200
    assert result.body == farm.expected_bytes(path)
    assert result.headers["Content-Type"] == "image/jpeg"
    assert result.url == farm.url(0, path)
    assert 0 < result.elapsed < 5


def test_a_gate_cancelled_before_its_fetch_starts_sends_nothing(farm: ImageFarm, fetcher: ServerFetcher) -> None:
    """A hedged copy whose twin answered before its fetch thread began: nothing may reach the server."""
    path = f"/img/cancelled-early.jpg?{SMALL}"
    gate = HopGate()
    gate.cancel()
    with pytest.raises(DownloadError) as info:
        fetcher.get(farm.url(0, path), gate)
    assert info.value.code == ErrorCode.TIMEOUT
    assert not [entry for entry in farm.request_log(0) if entry.path == path]
    assert fetcher.get(farm.url(0, path), HopGate()).body == farm.expected_bytes(path)  # a fresh gate fetches


def test_cache_buster_query_and_free_path(farm: ImageFarm, fetcher: ServerFetcher) -> None:
    path = f"/photos/140038152/original.jpeg?1625090991&{SMALL}"
    assert fetcher.get(farm.url(1, path)).body == farm.expected_bytes(path)


@pytest.mark.parametrize("code", [404, 410, 500])
def test_error_status_raises_http_status_error(farm: ImageFarm, fetcher: ServerFetcher, code: int) -> None:
    with pytest.raises(HttpStatusError) as info:
        fetcher.get(farm.url(0, f"/status/{code}"))
    assert info.value.code == code
    assert info.value.message == f"HTTP {code}"
    assert info.value.elapsed >= 0


def test_429_keeps_headers_for_the_rate_controller(farm: ImageFarm, fetcher: ServerFetcher) -> None:
    with pytest.raises(HttpStatusError) as info:
        fetcher.get(farm.url(0, "/status/429"))
    assert info.value.code == 429
    assert {k.lower(): v for k, v in info.value.headers.items()}["retry-after"] == "1"


def test_closed_port_is_a_network_error(fetcher: ServerFetcher) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError) as info:
        fetcher.get(f"http://127.0.0.1:{port}/img/a.jpg")
    assert info.value.code == ErrorCode.NETWORK


def test_private_address_guard(farm: ImageFarm) -> None:
    guarded = ServerFetcher(settings(allow_private_addresses=False))
    before = farm.stats(1).requests
    try:
        with pytest.raises(DownloadError) as info:
            guarded.get(farm.url(1, f"/img/a.jpg?{SMALL}"))
    finally:
        guarded.close()
    assert info.value.code == ErrorCode.PRIVATE_ADDRESS
    assert farm.stats(1).requests == before  # refused before any traffic
    allowed = ServerFetcher(settings(allow_private_addresses=True))
    try:
        assert allowed.get(farm.url(1, f"/img/a.jpg?{SMALL}")).status == 200
    finally:
        allowed.close()


@pytest.mark.parametrize("url", ["ftp://127.0.0.2/a.jpg", "file:///etc/passwd", "http:///a.jpg"])
def test_non_http_urls_are_refused_without_traffic(url: str, fetcher: ServerFetcher) -> None:
    with pytest.raises(DownloadError) as info:
        fetcher.get(url)
    assert info.value.code == ErrorCode.REDIRECT


def test_byte_cap_by_content_length(farm: ImageFarm) -> None:
    path = "/img/big.png?w=1600&h=1200"
    capped = ServerFetcher(settings(max_bytes=10_000))
    try:
        with pytest.raises(DownloadError) as info:
            capped.get(farm.url(0, path))
    finally:
        capped.close()
    assert info.value.code == ErrorCode.TOO_LARGE
    assert "Content-Length" in info.value.message
    assert len(farm.expected_bytes(path)) > 10_000


def test_total_timeout_on_a_slow_server(farm: ImageFarm) -> None:
    impatient = ServerFetcher(settings(total_timeout=1.0))
    started = time.monotonic()
    try:
        with pytest.raises(DownloadError) as info:
            impatient.get(farm.url(0, f"/slow/3/a.jpg?{SMALL}"))
    finally:
        impatient.close()
    assert info.value.code == ErrorCode.TIMEOUT
    assert time.monotonic() - started < 2.0


def test_truncated_body_is_returned_and_fails_to_decode(farm: ImageFarm, fetcher: ServerFetcher) -> None:
    full = farm.expected_bytes(f"/img/t.jpg?{SMALL}")
    result = fetcher.get(farm.url(0, f"/truncated/t.jpg?{SMALL}"))
    assert result.status == 200
    assert 0 < len(result.body) < len(full)
    assert full.startswith(result.body)
    with pytest.raises(DownloadError) as info:
        process_image(result.body, ImageSettings(image_size=32))
    assert info.value.code == ErrorCode.IMAGE_DECODE


def test_user_agent_reaches_the_server(farm: ImageFarm, fetcher: ServerFetcher) -> None:
    fetcher.get(farm.url(1, f"/img/ua.png?{SMALL}"))
    assert UA in farm.stats(1).user_agents


def test_header_line_from_config_overrides_the_user_agent(farm: ImageFarm) -> None:
    cfg = config_mod.validate(
        {
            "path_to_input": "in.csv",
            "path_to_output": "out",
            "downloader_parameters": {
                "header": "User-Agent: LabBot/2.0 (lab@example.org)",
                "timeout": 2,
                "allow_private_addresses": True,
            },
        }
    )
    fetch_settings = FetchSettings.from_config(cfg["downloader_parameters"])
    assert fetch_settings.user_agent == "LabBot/2.0 (lab@example.org)"
    assert fetch_settings.robots_token == "LabBot"
    timeouts = (fetch_settings.connect_timeout, fetch_settings.read_timeout, fetch_settings.total_timeout)
    assert timeouts == (2, 2, 6)
    lab = ServerFetcher(fetch_settings)
    try:
        lab.get(farm.url(1, f"/img/lab.png?{SMALL}"))
    finally:
        lab.close()
    assert "LabBot/2.0 (lab@example.org)" in farm.stats(1).user_agents


def test_other_header_line_is_sent_as_an_extra_header() -> None:
    raw = {"path_to_input": "in.csv", "path_to_output": "out"}
    cfg = config_mod.validate({**raw, "downloader_parameters": {"header": "From: a@b.org"}})
    fetch_settings = FetchSettings.from_config(cfg["downloader_parameters"])
    assert dict(fetch_settings.extra_headers) == {"From": "a@b.org"}
    assert fetch_settings.user_agent.startswith("distributed-downloader/")
    assert fetch_settings.robots_token == "distributed-downloader"


# ---------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "10.255.255.254",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.0.1",
        "127.0.0.1",
        "127.0.0.2",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "::",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "fe80::1%eth0",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
    ],
)
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "172.32.0.1", "2001:4860:4860::8888"])
def test_public_addresses(address: str) -> None:
    assert is_public_address(address)


@pytest.mark.parametrize("address", ["100.64.0.1", "100.100.100.200"])
def test_shared_address_space_is_not_public(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], None),
        (["noai"], "noai"),
        (["NoImageAI"], "noimageai"),
        (["noindex, nofollow"], None),
        (["noindex"], None),
        (["noindex, noai"], "noai"),
        (["noindex noimageai"], "noimageai"),
        (["googlebot: noai"], None),
        (["googlebot: noindex", "distributed-downloader: noimageai"], "noimageai"),
        (["Distributed-Downloader: noai"], "noai"),
        (["*: noai"], "noai"),
        (["otherbot: noai, noimageai", "noindex"], None),
        (["distributed-downloader: noindex"], None),
        (["distributed-downloader:noai"], "noai"),
        (["noai, max-image-preview:none"], "noai"),
    ],
)
def test_x_robots_opt_out_table(values: list[str], expected: str | None) -> None:
    assert x_robots_opt_out(values, "distributed-downloader") == expected


@pytest.mark.parametrize(
    "value",
    ["max-image-preview:none, noai", "noimageai,unavailable_after: 25 Jun 2030 15:00:00 PST"],
)
def test_x_robots_opt_out_after_a_directive_with_a_colon(value: str) -> None:
    assert x_robots_opt_out([value], "distributed-downloader") in ("noai", "noimageai")


@pytest.mark.parametrize(
    ("agent", "token"),
    [
        ("distributed-downloader/1.0 (+https://x)", "distributed-downloader"),
        ("MyBot", "MyBot"),
        ("Lab Crawler/3", "Lab"),
        ("", "*"),
    ],
)
def test_robots_token(agent: str, token: str) -> None:
    assert FetchSettings(user_agent=agent).robots_token == token


# ---------------------------------------------------------------- hostile servers (testserver's hostile routes)

HOSTILE = {"connect_timeout": 0.5, "read_timeout": 1.0, "total_timeout": 1.5, "max_bytes": 2_000_000}
# Scheduling noise allowed on top of a time bound: a 2-core machine shared with other runs stalls a
# thread for a second at times. Every hostile route lasts far longer than bound + SLACK without the
# limit under test (a stall until the farm stops, a trickle of 0.5 s a byte), and the message tells
# which limit ended the fetch.
SLACK = 2.0
QUICK = 1.0 + SLACK  # a failure that needs no timeout at all


@pytest.fixture(scope="module")
def silent() -> Iterator[tuple[SilentHost, SilentHost]]:
    with SilentHost(mode="accept") as accepting, SilentHost(mode="backlog") as full:
        yield accepting, full


@pytest.fixture(scope="module", autouse=True)
def _gzip_bomb_built() -> None:
    """The in-process farm compresses /gzbomb/50 on its first request: 1.6 s on a busy 2-core machine,
    past the hostile cases' 1-s read timeout (the case then failed as a timeout, not as the bomb)."""
    testserver.gzip_zeros(50 * 1_000_000)


@pytest.fixture
def hostile_fetcher() -> Iterator[ServerFetcher]:
    f = ServerFetcher(settings(**HOSTILE))
    yield f
    f.close()


def _to(url: str) -> str:
    return "/redirect-to/" + quote(url, safe="")


# (case, path builder, code, message fragment, seconds the fetch may take at most)
HOSTILE_CASES = [
    ("reset", lambda farm, s: f"/reset/r.jpg?{SMALL}", ErrorCode.NETWORK, "reset mid-body", QUICK),
    ("stall", lambda farm, s: f"/stall/s.jpg?{SMALL}", ErrorCode.TIMEOUT, "read timeout mid-body", 1.0 + SLACK),
    ("trickle", lambda farm, s: f"/trickle/t.jpg?{SMALL}", ErrorCode.TIMEOUT, "trickles it", 1.0 + SLACK),
    ("slowheaders", lambda farm, s: "/slowheaders/h.jpg", ErrorCode.TIMEOUT, "response headers", 1.5 + SLACK),
    ("too many redirects", lambda farm, s: "/redirect/6/a.jpg", ErrorCode.REDIRECT, "more than 5 redirects", QUICK),
    ("loop", lambda farm, s: "/loop/2", ErrorCode.REDIRECT, "redirect loop", QUICK),
    ("long loop", lambda farm, s: "/loop/40", ErrorCode.REDIRECT, "more than 5 redirects", QUICK),
    ("to a closed port", lambda farm, s: _to(f"http://127.0.0.1:{closed_port()}/a.jpg"), -1, "refused", QUICK),
    ("to a silent host", lambda farm, s: _to(s[0].url("/a.jpg")), ErrorCode.TIMEOUT, "no response", 1.0 + SLACK),
    ("to a full backlog", lambda farm, s: _to(s[1].url("/a.jpg")), ErrorCode.TIMEOUT, "connect timeout", 0.5 + SLACK),
    ("to ftp", lambda farm, s: _to("ftp://127.0.0.2/a.jpg"), ErrorCode.REDIRECT, "scheme 'ftp'", QUICK),
    ("big", lambda farm, s: "/big/5", ErrorCode.TOO_LARGE, "Content-Length 5000000", QUICK),
    ("big chunked", lambda farm, s: "/big/5?chunked=1", ErrorCode.TOO_LARGE, "body over", QUICK),
    ("gzip bomb", lambda farm, s: "/gzbomb/50", ErrorCode.TOO_LARGE, "body over the 2000000-byte cap", QUICK),
    ("badlength", lambda farm, s: f"/badlength/b.jpg?{SMALL}", ErrorCode.NETWORK, "short of its Content-Length", QUICK),
    ("duplength", lambda farm, s: f"/duplength/d.jpg?{SMALL}", ErrorCode.PROTOCOL, "Content-Length", QUICK),
    ("badgzip", lambda farm, s: f"/badgzip/g.jpg?{SMALL}", ErrorCode.PROTOCOL, "Content-Encoding", QUICK),
    ("badchunk", lambda farm, s: f"/badchunk/c.jpg?{SMALL}", ErrorCode.NETWORK, "chunked", QUICK),
    ("x-robots-tag", lambda farm, s: f"/xrobots/noimageai/x.jpg?{SMALL}", ErrorCode.X_ROBOTS_TAG, "noimageai", QUICK),
]


@pytest.mark.parametrize(
    ("path_of", "code", "fragment", "bound"),
    [case[1:] for case in HOSTILE_CASES],
    ids=[case[0] for case in HOSTILE_CASES],
)
def test_hostile_server_becomes_a_coded_error_in_bounded_time(
    farm: ImageFarm,
    silent: tuple[SilentHost, SilentHost],
    hostile_fetcher: ServerFetcher,
    path_of,
    code: int,
    fragment: str,
    bound: float,
) -> None:
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        hostile_fetcher.get(farm.url(0, path_of(farm, silent)))
    elapsed = time.monotonic() - started
    assert not isinstance(info.value, HttpStatusError)
    assert (info.value.code, fragment in info.value.message) == (code, True), info.value.message
    assert elapsed < bound, f"took {elapsed:.2f}s"


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/slowheaders/h.jpg", "response headers not complete within the connect + read timeouts (1.5s)"),
        (f"/trickle/t.jpg?{SMALL}", "would need"),
    ],
)
def test_a_trickling_server_is_cut_long_before_the_total_timeout(farm: ImageFarm, path: str, fragment: str) -> None:
    """A byte every 0.5 s keeps every read alive: without these cuts each such URL held a fetch for the
    whole total timeout (60 s by default), every round (measured on nginx's limit_rate 1)."""
    fetcher = ServerFetcher(settings(**{**HOSTILE, "total_timeout": 30.0}))
    try:
        started = time.monotonic()
        with pytest.raises(DownloadError) as info:
            fetcher.get(farm.url(0, path))
        elapsed = time.monotonic() - started
    finally:
        fetcher.close()
    assert info.value.code == ErrorCode.TIMEOUT and fragment in info.value.message, info.value.message
    assert elapsed < 2.0 + SLACK, f"took {elapsed:.2f}s"


@contextlib.contextmanager
def _thinking_server(seconds: float) -> Iterator[str]:
    """A loopback server that thinks ``seconds`` before each answer, then sends it at once ("abc")."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(seconds)
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"abc")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/a.jpg"
    finally:
        server.shutdown()
        server.server_close()


def test_trickled_headers_are_cut_soon_after_their_first_byte_under_long_timeouts(farm: ImageFarm) -> None:
    """The default timeouts (10 + 20 s) gave a server trickling its headers 30 s per URL and round
    (nginx's limit_rate from the status line on); the rest of the headers get HEADERS_AFTER_FIRST_BYTE."""
    fetcher = ServerFetcher(settings(connect_timeout=10.0, read_timeout=20.0, total_timeout=60.0))
    try:
        started = time.monotonic()
        with pytest.raises(DownloadError) as info:
            fetcher.get(farm.url(0, "/slowheaders/h5.jpg"))
        elapsed = time.monotonic() - started
    finally:
        fetcher.close()
    assert info.value.code == ErrorCode.TIMEOUT, info.value.message
    assert "5s after their first byte: the server trickles them" in info.value.message, info.value.message
    assert elapsed < fetch_mod.HEADERS_AFTER_FIRST_BYTE + SLACK, f"took {elapsed:.2f}s"


def test_the_short_headers_limit_starts_at_the_first_byte_not_at_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that thinks 1.5 s before answering (well within the read timeout) and then sends its
    headers at once is not trickling, even when the after-first-byte limit is shorter than its think time."""
    monkeypatch.setattr(fetch_mod, "HEADERS_AFTER_FIRST_BYTE", 0.5)
    fetcher = ServerFetcher(settings(connect_timeout=1.0, read_timeout=4.0, total_timeout=12.0))
    with _thinking_server(1.5) as url:
        try:
            assert fetcher.get(url).body == b"abc"
        finally:
            fetcher.close()


def test_a_slow_body_that_will_end_in_time_is_not_cut(farm: ImageFarm, monkeypatch: pytest.MonkeyPatch) -> None:
    """20 bytes/s is far under the 1 kB/s floor, but a 43-byte body at that speed ends well before
    the deadline: its declared length says so (a big original on a slow link)."""
    monkeypatch.setattr(testserver, "TRICKLE_SECONDS", 0.05)
    fetcher = ServerFetcher(settings(**{**HOSTILE, "total_timeout": 30.0}))
    try:
        started = time.monotonic()
        result = fetcher.get(farm.url(0, "/trickle/t.gif?w=1&h=1"))
    finally:
        fetcher.close()
    assert result.body == farm.expected_bytes("/img/t.gif?w=1&h=1")
    assert time.monotonic() - started > 1.5  # it did take several read timeouts' worth of checks


@pytest.mark.parametrize(
    "path", [f"/gzip/z.png?{SMALL}", f"/redirect/5/z.png?{SMALL}", f"/xrobots/noindex%2C%20nofollow/z.png?{SMALL}"]
)
def test_benign_variants_deliver_the_image(farm: ImageFarm, hostile_fetcher: ServerFetcher, path: str) -> None:
    # gzip is decoded (and the stored MD5 is that of the image file); exactly max_redirects hops are fine.
    assert hostile_fetcher.get(farm.url(0, path)).body == farm.expected_bytes(f"/img/z.png?{SMALL}")


@pytest.mark.parametrize(
    ("path", "code"), [("/json/a", ErrorCode.IMAGE_DECODE), ("/bomb.png", ErrorCode.TOO_MANY_PIXELS)]
)
def test_lying_bodies_fail_when_decoded(farm: ImageFarm, hostile_fetcher: ServerFetcher, path: str, code: int) -> None:
    body = hostile_fetcher.get(farm.url(0, path)).body
    assert len(body) < 200
    with pytest.raises(DownloadError) as info:
        process_image(body, ImageSettings(image_size=32))
    assert info.value.code == code


@pytest.mark.parametrize("path", [f"/stall/w.jpg?{SMALL}", f"/trickle/w.jpg?{SMALL}", "/slowheaders/w.jpg"])
def test_total_timeout_bounds_even_a_long_read_timeout(farm: ImageFarm, path: str) -> None:
    """Per-read timeouts cannot stop a server that dribbles bytes; the deadline watchdog does."""
    patient = ServerFetcher(settings(read_timeout=30.0, total_timeout=0.8))
    started = time.monotonic()
    try:
        with pytest.raises(DownloadError) as info:
            patient.get(farm.url(1, path))
    finally:
        patient.close()
    assert info.value.code == ErrorCode.TIMEOUT and "total time limit of 0.8s" in info.value.message
    assert time.monotonic() - started < 0.8 + SLACK


def test_one_hostile_url_does_not_hurt_the_others_on_a_shared_fetcher(farm: ImageFarm) -> None:
    shared = ServerFetcher(settings(total_timeout=0.6), pool_size=4)

    def fetch(i: int) -> tuple[str, int]:
        path = f"/trickle/m{i}.jpg?w=8&h=8" if i % 3 == 0 else f"/img/m{i % 5}.jpg?w=8&h=8"
        try:
            return path, len(shared.get(farm.url(0, path)).body)
        except DownloadError as exc:
            return path, exc.code

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(fetch, range(24)))
    finally:
        shared.close()
    for path, outcome in results:
        if path.startswith("/trickle/"):
            assert outcome == ErrorCode.TIMEOUT
        else:
            assert outcome == len(farm.expected_bytes(path)), (path, outcome)


def test_connections_are_reused_and_replaced_after_a_broken_one(farm: ImageFarm) -> None:
    reuse = ServerFetcher(settings())
    before = farm.stats(1).connections
    try:
        for i in range(10):
            reuse.get(farm.url(1, f"/img/ka{i}.jpg?w=8&h=8"))
        assert farm.stats(1).connections - before == 1
        with pytest.raises(DownloadError):
            reuse.get(farm.url(1, f"/reset/ka.jpg?{SMALL}"))
        assert reuse.get(farm.url(1, "/img/ka0.jpg?w=8&h=8")).status == 200
        assert farm.stats(1).connections - before == 2
    finally:
        reuse.close()


# ---------------------------------------------------------------- the address policy at every hop


def _only(network: str, **overrides) -> ServerFetcher:
    """A fetcher that refuses private addresses except ``network`` (so a loopback farm host can be hop 1)."""
    return ServerFetcher(
        settings(allow_private_addresses=False, **overrides), address_policy=AddressPolicy(also_allowed=[network])
    )


def test_redirect_to_a_private_address_is_refused_before_any_request(farm: ImageFarm) -> None:
    guarded = _only(f"{farm.addresses[0]}/32")
    other_before, first_before = farm.stats(1).requests, farm.stats(0).requests
    try:
        assert guarded.get(farm.url(0, f"/img/ok.jpg?{SMALL}")).status == 200  # hop 1 is allowed
        with pytest.raises(DownloadError) as info:
            guarded.get(farm.url(0, _to(farm.url(1, f"/img/ok.jpg?{SMALL}"))))
    finally:
        guarded.close()
    assert info.value.code == ErrorCode.PRIVATE_ADDRESS
    assert farm.addresses[1] in info.value.message
    assert farm.stats(1).requests == other_before  # the second host never saw a request
    assert farm.stats(0).requests == first_before + 2


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/a.jpg",
        "http://[::1]:{port}/a.jpg",
        "http://2130706433:{port}/a.jpg",  # 127.0.0.1 as one decimal number
        "http://127.1:{port}/a.jpg",
        "http://[::ffff:127.0.0.1]:{port}/a.jpg",
    ],
)
def test_redirect_hops_to_loopback_in_any_spelling_are_refused(farm: ImageFarm, target: str) -> None:
    guarded = _only(f"{farm.addresses[0]}/32")
    # A closed port: had the guard let the hop through, the error would be -1 (refused), not -8.
    hop = target.format(port=closed_port())
    try:
        with pytest.raises(DownloadError) as info:
            guarded.get(farm.url(0, _to(hop)))
    finally:
        guarded.close()
    assert info.value.code == ErrorCode.PRIVATE_ADDRESS, info.value.message


def test_url_to_loopback_is_refused_without_a_connection_attempt() -> None:
    guarded = ServerFetcher(settings(allow_private_addresses=False))
    try:
        with pytest.raises(DownloadError) as info:
            guarded.get(f"http://127.0.0.1:{closed_port()}/a.jpg")  # a connect would have been refused (-1)
    finally:
        guarded.close()
    assert info.value.code == ErrorCode.PRIVATE_ADDRESS


class _RebindingPolicy(AddressPolicy):
    """Our DNS answer says public; the connection's own lookup then lands on loopback (DNS rebinding)."""

    def resolve(self, host: str, port: int) -> list[str]:
        return ["93.184.216.34"]  # only ever compared, never contacted


def test_connection_that_lands_on_a_private_address_is_refused(farm: ImageFarm) -> None:
    rebound = ServerFetcher(settings(allow_private_addresses=False), address_policy=_RebindingPolicy())
    before = farm.stats(0).requests
    try:
        with pytest.raises(DownloadError) as info:
            rebound.get(farm.url(0, f"/img/rebind.jpg?{SMALL}"))
    finally:
        rebound.close()
    assert info.value.code == ErrorCode.PRIVATE_ADDRESS and "connection reached" in info.value.message
    assert farm.stats(0).requests == before  # connected, then closed before a byte was sent


def test_a_proxy_is_not_held_to_the_target_rule(farm: ImageFarm) -> None:
    """Behind an HTTP proxy the target is checked by name; the (often private) proxy itself is allowed."""
    proxied = _only(f"{farm.addresses[1]}/32")
    proxied.session.proxies = {"http": farm.base_urls[0]}  # the farm answers absolute-form requests
    before = farm.stats(0).requests
    try:
        path = f"/img/proxied.jpg?{SMALL}"
        assert proxied.get(farm.url(1, path)).body == farm.expected_bytes(path)
    finally:
        proxied.close()
    assert farm.stats(0).requests == before + 1  # it went through the proxy


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.2", True),
        ("127.0.0.3", False),
        ("::ffff:127.0.0.2", True),
        ("10.1.2.3", True),
        ("10.2.0.1", False),
        ("fd00::5", True),
        ("::1", False),
        ("8.8.8.8", True),
    ],
)
def test_address_policy_exceptions(address: str, allowed: bool) -> None:
    policy = AddressPolicy(also_allowed=["127.0.0.2/32", "10.1.0.0/16", "fd00::/64"])
    assert policy.permits(address) is allowed
    assert AddressPolicy(allow_private=True).permits(address)


def test_backslash_authority_is_refused_and_the_real_host_is_what_gets_guarded(farm: ImageFarm) -> None:
    """http://A\\@B/: RFC 3986 parsers say B, the HTTP client (like browsers) connects to A."""
    guarded = _only(f"{farm.addresses[1]}/32")  # B (host 2) allowed, A (host 1) not
    a, b = (base.split("//", 1)[1] for base in farm.base_urls[:2])
    before = farm.stats(0).requests
    try:
        with pytest.raises(DownloadError) as info:
            guarded.get(f"http://{a}\\@{b}/img/bs.jpg")
        with pytest.raises(DownloadError) as hop:  # the same trick in a redirect
            guarded.get(farm.url(1, _to(f"http://{a}\\@{b}/img/bs.jpg")))
    finally:
        guarded.close()
    assert "ambiguous host" in info.value.message and "ambiguous host" in hop.value.message
    assert farm.stats(0).requests == before


def test_the_headers_limit_runs_from_the_wire_not_from_our_own_wait_for_it() -> None:
    """Our wait at the wire (space_send: spacing, a short Retry-After) is not the server's time: a
    2-s wait there and a 1.5-s answer, under 1 + 2 s timeouts, was cut as "the server trickles them"."""

    class Waits(HopGate):
        def on_wire(self) -> None:
            time.sleep(2.0)

    fetcher = ServerFetcher(settings(connect_timeout=1.0, read_timeout=2.0, total_timeout=12.0))
    with _thinking_server(1.5) as url:
        try:
            assert fetcher.get(url, gate=Waits()).body == b"abc"
        finally:
            fetcher.close()
