"""Tests for HTTP fetching against the real loopback ImageFarm (127.x only), plus pure helpers."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from distributed_downloader import config as config_mod
from distributed_downloader.errors import DownloadError, ErrorCode
from distributed_downloader.fetch import (
    FetchSettings,
    HttpStatusError,
    ServerFetcher,
    is_public_address,
    x_robots_opt_out,
)
from distributed_downloader.imaging import ImageSettings, process_image
from distributed_downloader.testserver import HostSpec, ImageFarm

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
