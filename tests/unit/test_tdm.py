"""Opt-outs an answer carries (fetch.py): the W3C TDM Reservation Protocol's ``tdm-reservation``
header and X-Robots-Tag's agent-scoped forms, against the real loopback ImageFarm (127.x only);
plus the testserver's robots.txt behaviours the end-to-end robots tests rely on."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from distributed_downloader import config as config_mod
from distributed_downloader.demo.testserver import HostSpec, ImageFarm
from distributed_downloader.errors import DownloadError, ErrorCode, is_transient
from distributed_downloader.net.fetch import FetchSettings, ServerFetcher, tdm_reserved, x_robots_opt_out
from distributed_downloader.net.robots import RobotsStatus, fetch_robots

from .robots_support import Reply, RobotsServer

UA = "tdm-test-bot/1.0 (+https://example.org/contact; unit tests)"
TOKEN = "tdm-test-bot"
SMALL = "w=64&h=48"
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def farm() -> Iterator[ImageFarm]:
    with ImageFarm([HostSpec("t1")], seed=5) as running:
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


def _reply(code: int, name: str, value: str) -> str:
    return f"/reply/{code}?h={quote(name)}&v={quote(value)}"


# ---------------------------------------------------------------- tdm-reservation


@pytest.mark.parametrize(
    ("values", "reserved"),
    [
        ([], False),
        (["1"], True),
        (["0"], False),
        ([" 1 "], True),
        (['"1"'], True),
        (["0", "1"], True),  # two header lines: reserved when any says so
        (["0, 1"], True),  # the same, folded into one value
        (["0", "0"], False),
        (["yes"], False),  # not a TDMRep value: reserves nothing
        (["true"], False),
        (["10"], False),
        ([""], False),
    ],
)
def test_tdm_reserved_table(values: list[str], reserved: bool) -> None:
    assert tdm_reserved(values) is reserved


def test_tdm_reservation_1_is_an_opt_out_row(farm: ImageFarm, fetcher: ServerFetcher) -> None:
    before = farm.stats(0).requests
    with pytest.raises(DownloadError) as caught:
        fetcher.get(farm.url(0, f"/tdm/1/a.jpg?{SMALL}"))
    assert caught.value.code == ErrorCode.TDM_RESERVED == -16
    assert "tdm-reservation: 1" in caught.value.message
    assert farm.stats(0).requests == before + 1  # one request, nothing retried inside the fetch
    assert not is_transient(ErrorCode.TDM_RESERVED)  # permanent: never tried again in a later round


@pytest.mark.parametrize("path", [f"/tdm/0/b.jpg?{SMALL}", f"/img/b.jpg?{SMALL}"])
def test_tdm_reservation_0_or_absent_reserves_nothing(farm: ImageFarm, fetcher: ServerFetcher, path: str) -> None:
    result = fetcher.get(farm.url(0, path))
    assert result.status == 200 and result.body == farm.expected_bytes(f"/img/b.jpg?{SMALL}")


@pytest.mark.parametrize("name", ["tdm-reservation", "TDM-Reservation", "TDM-RESERVATION", "Tdm-reservation"])
def test_header_name_in_any_case(farm: ImageFarm, fetcher: ServerFetcher, name: str) -> None:
    with pytest.raises(DownloadError) as caught:
        fetcher.get(farm.url(0, _reply(200, name, "1")))
    assert caught.value.code == ErrorCode.TDM_RESERVED
    assert fetcher.get(farm.url(0, _reply(200, name, "0"))).status == 200


def test_tdm_policy_is_named_in_the_message(fetcher: ServerFetcher) -> None:
    policy = "https://publisher.example/tdm-policy.json"
    headers = {"tdm-reservation": "1", "tdm-policy": policy}
    with RobotsServer({"/a.jpg": Reply(200, b"x", headers)}) as srv, pytest.raises(DownloadError) as caught:
        fetcher.get(srv.url("/a.jpg"))
    assert caught.value.code == ErrorCode.TDM_RESERVED and policy in caught.value.message


def test_reservation_on_a_redirect_target_counts(farm: ImageFarm, fetcher: ServerFetcher) -> None:
    target = farm.url(0, f"/tdm/1/c.jpg?{SMALL}")
    with pytest.raises(DownloadError) as caught:
        fetcher.get(farm.url(0, "/redirect-to/" + quote(target, safe="")))
    assert caught.value.code == ErrorCode.TDM_RESERVED


def test_switched_off_by_config(farm: ImageFarm) -> None:
    off = ServerFetcher(settings(respect_tdm_reservation=False))
    try:
        result = off.get(farm.url(0, f"/tdm/1/d.jpg?{SMALL}"))
    finally:
        off.close()
    assert result.body == farm.expected_bytes(f"/img/d.jpg?{SMALL}")


def test_x_robots_tag_switch_leaves_tdm_alone(farm: ImageFarm) -> None:
    no_xrobots = ServerFetcher(settings(respect_x_robots_tag=False))
    try:
        assert no_xrobots.get(farm.url(0, f"/xrobots/noai/e.jpg?{SMALL}")).status == 200
        with pytest.raises(DownloadError) as caught:
            no_xrobots.get(farm.url(0, f"/tdm/1/e.jpg?{SMALL}"))
    finally:
        no_xrobots.close()
    assert caught.value.code == ErrorCode.TDM_RESERVED


def _params(**downloader: object) -> dict:
    config = config_mod.validate(
        {"path_to_input": "x.csv", "path_to_output": "out", "downloader_parameters": downloader}
    )
    return config["downloader_parameters"]


def test_config_key_default_and_override() -> None:
    assert _params()["respect_tdm_reservation"] is True
    assert FetchSettings.from_config(_params()).respect_tdm_reservation is True
    assert FetchSettings.from_config(_params(respect_tdm_reservation=False)).respect_tdm_reservation is False
    with pytest.raises(config_mod.ConfigError, match="respect_tdm_reservation"):
        _params(respect_tdm_reservation="no")
    schema = config_mod.load_schema()["properties"]["downloader_parameters"]["properties"]
    assert schema["respect_tdm_reservation"]["description"]


@pytest.mark.parametrize("route", ["/robots.txt", "/moved.txt"])
def test_opt_out_headers_on_robots_txt_are_ignored(fetcher: ServerFetcher, route: str) -> None:
    """A site that sends tdm-reservation / X-Robots-Tag on every answer still has readable rules."""
    robots = b"User-agent: *\nDisallow: /private/\n"
    opt_out = {"tdm-reservation": "1", "X-Robots-Tag": "noai, noimageai"}
    routes = {route: Reply(200, robots, opt_out)}
    if route != "/robots.txt":
        routes["/robots.txt"] = Reply(301, b"", {"Location": route, **opt_out})
    with RobotsServer(routes) as srv:
        result = fetch_robots(fetcher, srv.url("/img/x.jpg"))
        direct = fetcher.get(srv.url("/robots.txt"))  # the image fetcher too: robots.txt is not content
    assert result.status is RobotsStatus.RULES and result.text == robots.decode()
    assert direct.body == robots


def test_readme_documents_every_code_written() -> None:
    """Each of our codes has a row in the README's error table (-11 is reserved: nothing writes it)."""
    rows = {int(m) for m in re.findall(r"^\| (-\d+) \|", README.read_text(), flags=re.MULTILINE)}
    written = {int(code) for code in ErrorCode if code is not ErrorCode.RETRIES_EXHAUSTED}
    assert written <= rows, sorted(written - rows)
    assert "tdm-reservation: 1" in README.read_text()


# ---------------------------------------------------------------- X-Robots-Tag, agent-scoped


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["tdm-test-bot: noai"], "noai"),
        (["TDM-Test-Bot: NoImageAI"], "noimageai"),
        (["tdm-test-bot:noai"], "noai"),
        (["tdm-test-bot: noindex, noai"], "noai"),  # the scope covers the whole list after it
        (["otherbot: noai"], None),
        (["tdm-test: noai"], None),  # a prefix of our token is another crawler
        (["tdm-test-bot-2: noai"], None),  # so is a longer name
        # Folded from several header lines (RFC 9110 §5.3): each "<crawler>:" starts a new scope.
        (["googlebot: noindex, tdm-test-bot: noai"], "noai"),
        (["tdm-test-bot: noindex, googlebot: noai"], None),
        (["noindex, googlebot: noai"], None),
        (["noai, googlebot: noindex"], "noai"),
        (["googlebot: noai, *: noimageai"], "noimageai"),
        (["googlebot: noai", "noindex"], None),  # a new header line starts unscoped
        (["googlebot: noindex", "noimageai"], "noimageai"),
        (["googlebot: unavailable_after: Wednesday, 03-Jun-2030 15:00:00 GMT, noai"], None),
        (["max-image-preview:none, tdm-test-bot: noai"], "noai"),
    ],
)
def test_x_robots_agent_scoped(values: list[str], expected: str | None) -> None:
    assert x_robots_opt_out(values, TOKEN) == expected


@pytest.mark.parametrize(
    ("directive", "opted_out"),
    [
        ("tdm-test-bot: noai", True),
        ("TDM-TEST-BOT: noimageai", True),
        ("otherbot: noai", False),
        ("otherbot: noindex, tdm-test-bot: noimageai", True),
        ("tdm-test-bot: noindex, otherbot: noai", False),
    ],
)
def test_x_robots_agent_scoped_at_the_server(
    farm: ImageFarm, fetcher: ServerFetcher, directive: str, opted_out: bool
) -> None:
    path = f"/xrobots/{quote(directive, safe='')}/f.jpg?{SMALL}"
    if opted_out:
        with pytest.raises(DownloadError) as caught:
            fetcher.get(farm.url(0, path))
        assert caught.value.code == ErrorCode.X_ROBOTS_TAG
    else:
        assert fetcher.get(farm.url(0, path)).body == farm.expected_bytes(path)


def test_two_x_robots_tag_lines_are_read_separately(fetcher: ServerFetcher) -> None:
    """Two header lines are two scopes: the second line's unscoped noai applies to everyone."""
    raw = b"HTTP/1.1 200 OK\r\nX-Robots-Tag: otherbot: noindex\r\nX-Robots-Tag: noai\r\nContent-Length: 1\r\n\r\nx"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(raw)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(DownloadError) as caught:
            fetcher.get(f"http://127.0.0.1:{listener.getsockname()[1]}/a.jpg")
    finally:
        thread.join(5)
        listener.close()
    assert caught.value.code == ErrorCode.X_ROBOTS_TAG


# ---------------------------------------------------------------- the testserver's robots behaviours


def test_robots_failures_then_rules_and_a_live_switch() -> None:
    robots = "User-agent: *\nDisallow: /no/\n"
    with ImageFarm([HostSpec("r", robots_txt=robots, robots_failures=2)]) as farm:
        url = farm.url(0, "/robots.txt")
        statuses = [requests.get(url, timeout=5).status_code for _ in range(3)]
        farm.set_robots_failures(0, 1)
        again = [requests.get(url, timeout=5).status_code for _ in range(2)]
        farm.set_robots_failures(0, 10**6)
        held = requests.get(url, timeout=5)
        farm.set_robots_failures(0, 0)
        released = requests.get(url, timeout=5)
        image = requests.get(farm.url(0, f"/img/x.jpg?{SMALL}"), timeout=5)  # images are not affected
    assert statuses == [503, 503, 200] and again == [503, 200]
    assert held.status_code == 503 and released.status_code == 200 and released.text == robots
    assert image.status_code == 200
    with pytest.raises(ValueError):
        HostSpec("bad", robots_failures=-1)


def test_robots_location_redirects_on_the_same_host() -> None:
    robots = "User-agent: *\nDisallow: /moved-off/\n"
    with ImageFarm([HostSpec("m", robots_txt=robots, robots_location="/site/robots-v2.txt")]) as farm:
        first = requests.get(farm.url(0, "/robots.txt"), allow_redirects=False, timeout=5)
        followed = requests.get(farm.url(0, "/robots.txt"), timeout=5)
        deadline = time.monotonic() + 5  # a handler logs its request just after the reply has left
        while len(farm.request_log(0)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        paths = [entry.path for entry in farm.request_log(0)]
    assert first.status_code == 301 and first.headers["Location"] == "/site/robots-v2.txt"
    assert followed.status_code == 200 and followed.text == robots
    assert paths.count("/site/robots-v2.txt") == 1
    with pytest.raises(ValueError):
        HostSpec("bad", robots_location="/robots.txt")


def test_tdm_route_serves_the_image_bytes(farm: ImageFarm) -> None:
    path = f"/tdm/1/g.png?{SMALL}"
    response = requests.get(farm.url(0, path), timeout=5)
    assert response.headers["tdm-reservation"] == "1"
    assert response.content == farm.expected_bytes(path) == farm.expected_bytes(f"/img/g.png?{SMALL}")
