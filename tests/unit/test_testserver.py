"""Tests for the loopback image farm (distributed_downloader.demo.testserver). Loopback traffic only."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import requests
from PIL import Image

from distributed_downloader.demo.testserver import (
    BOMB_SIDE,
    CONTENT_TYPES,
    MAX_BIG_MB,
    MODES,
    OUTCOMES,
    RETRIEVABLE_OUTCOMES,
    FaultMix,
    HostSpec,
    ImageFarm,
    LogEntry,
    SilentHost,
    closed_port,
    max_concurrency,
    max_requests_in_window,
    refusal_share,
    render_image,
)

TIMEOUT = 5.0  # per request; keeps every test bounded
SMALL = "w=64&h=48"  # small images keep the suite fast
ROBOTS = "User-agent: *\nDisallow: /private/\n"


@pytest.fixture(scope="module")
def farm() -> Iterator[ImageFarm]:
    hosts = [HostSpec("h1"), HostSpec("h2", robots_txt=ROBOTS), HostSpec("h3")]
    with ImageFarm(hosts, seed=7) as running:
        yield running


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def get(session: requests.Session, url: str) -> requests.Response:
    return session.get(url, timeout=TIMEOUT)


def decode(body: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(body))
    image.load()
    return image


def test_hosts_are_distinct_loopback_addresses(farm: ImageFarm, session: requests.Session) -> None:
    hosts = [url.split("//")[1].split(":")[0] for url in farm.base_urls]
    assert hosts == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    for index in range(3):
        assert get(session, farm.url(index, "/status/200")).status_code == 200


@pytest.mark.parametrize("ext", sorted(CONTENT_TYPES))
def test_every_extension_decodes_and_matches_expected(farm: ImageFarm, session: requests.Session, ext: str) -> None:
    path = f"/img/cat.{ext}?w=80&h=60"
    response = get(session, farm.url(0, path))
    assert response.status_code == 200
    assert response.headers["Content-Type"] == CONTENT_TYPES[ext]
    assert int(response.headers["Content-Length"]) == len(response.content)
    assert response.content == farm.expected_bytes(path)
    assert decode(response.content).size == (80, 60)


def test_default_size_is_640x480(farm: ImageFarm, session: requests.Session) -> None:
    assert decode(get(session, farm.url(0, "/img/default.jpg")).content).size == (640, 480)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_modes_decode_with_their_property(farm: ImageFarm, session: requests.Session, mode: str) -> None:
    path = f"/img/variant.{MODES[mode]}?mode={mode}&{SMALL}"
    response = get(session, farm.url(1, path))
    assert response.status_code == 200
    assert response.content == farm.expected_bytes(path)
    image = decode(response.content)
    checks = {
        "cmyk": lambda: image.mode == "CMYK",
        "progressive": lambda: bool(image.info.get("progressive")),
        "exif6": lambda: image.getexif().get(0x0112) == 6,
        "rgba": lambda: image.mode == "RGBA" and image.getchannel("A").getextrema() == (128, 128),
        "i16": lambda: image.mode.startswith("I") and image.getextrema()[1] > 255,
        "palette": lambda: image.mode == "P" and "transparency" in image.info,
        "anim": lambda: getattr(image, "n_frames", 1) == 2,
    }
    assert checks[mode]()


def test_same_key_identical_different_keys_differ(farm: ImageFarm, session: requests.Session) -> None:
    first = get(session, farm.url(0, f"/img/a.png?{SMALL}")).content
    again = get(session, farm.url(2, f"/img/a.png?{SMALL}")).content  # every host serves the same space
    other = get(session, farm.url(0, f"/img/b.png?{SMALL}")).content
    assert first == again
    assert first != other


def test_bytes_survive_cache_eviction_and_depend_on_seed(farm: ImageFarm) -> None:
    paths = [f"/img/k.{ext}?{SMALL}" for ext in CONTENT_TYPES]
    paths += [f"/img/k.{ext}?mode={mode}&{SMALL}" for mode, ext in MODES.items()]
    before = [farm.expected_bytes(p) for p in paths]
    render_image.cache_clear()
    assert [farm.expected_bytes(p) for p in paths] == before
    reseeded = ImageFarm(1, seed=farm.seed + 1)  # expected_bytes needs no running server
    assert reseeded.expected_bytes(paths[0]) != before[0]


def test_unknown_query_params_do_not_change_bytes(farm: ImageFarm, session: requests.Session) -> None:
    plain = get(session, farm.url(0, f"/img/q.jpg?{SMALL}")).content
    busted = get(session, farm.url(0, f"/img/q.jpg?{SMALL}&1625090991&utm=x")).content
    assert plain == busted == farm.expected_bytes(f"/img/q.jpg?1625090991&{SMALL}")


def test_alias_serves_the_img_bytes(farm: ImageFarm, session: requests.Session) -> None:
    alias = get(session, farm.url(1, f"/alias/dup.webp?{SMALL}"))
    assert alias.status_code == 200
    assert alias.content == get(session, farm.url(0, f"/img/dup.webp?{SMALL}")).content


def test_free_form_image_paths(farm: ImageFarm, session: requests.Session) -> None:
    path = "/photos/140038152/original.jpeg?1625090991"
    response = get(session, farm.url(0, path))
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    assert response.content == farm.expected_bytes(path)
    assert response.content != farm.expected_bytes("/photos/140038153/original.jpeg")
    decode(response.content)


@pytest.mark.parametrize("code", [403, 404, 410, 500])
def test_status_route(farm: ImageFarm, session: requests.Session, code: int) -> None:
    response = get(session, farm.url(0, f"/status/{code}"))
    assert response.status_code == code
    assert response.text


def test_bad_or_unknown_requests(farm: ImageFarm, session: requests.Session) -> None:
    assert get(session, farm.url(0, "/img/x.jpg?w=0")).status_code == 400
    assert get(session, farm.url(0, "/img/x.jpg?mode=rgba")).status_code == 400  # rgba is png-only
    assert get(session, farm.url(0, "/status/abc")).status_code == 400
    assert get(session, farm.url(0, "/no/such/thing")).status_code == 404
    with pytest.raises(ValueError):
        farm.expected_bytes("/status/404")


def test_flaky_fails_n_times_then_serves(farm: ImageFarm, session: requests.Session) -> None:
    url = farm.url(0, f"/flaky/2/f.jpg?{SMALL}")
    responses = [get(session, url) for _ in range(3)]
    assert [r.status_code for r in responses] == [503, 503, 200]
    assert responses[0].headers["Retry-After"] == "1"
    assert responses[2].content == farm.expected_bytes(f"/img/f.jpg?{SMALL}")


def test_truncated_serves_half(farm: ImageFarm, session: requests.Session) -> None:
    full = farm.expected_bytes(f"/img/t.png?{SMALL}")
    response = get(session, farm.url(0, f"/truncated/t.png?{SMALL}"))
    assert response.status_code == 200
    assert response.content == full[: len(full) // 2]
    assert int(response.headers["Content-Length"]) == len(full) // 2


def test_html_route_lies_about_its_type(farm: ImageFarm, session: requests.Session) -> None:
    response = get(session, farm.url(0, "/html/page.jpg"))
    assert response.headers["Content-Type"] == "image/jpeg"
    assert response.content.lstrip().lower().startswith(b"<!doctype html")


def test_robots_txt(farm: ImageFarm, session: requests.Session) -> None:
    assert get(session, farm.url(1, "/robots.txt")).text == ROBOTS
    assert get(session, farm.url(0, "/robots.txt")).status_code == 404


def test_head_has_headers_but_no_body(farm: ImageFarm, session: requests.Session) -> None:
    response = session.head(farm.url(0, f"/img/h.gif?{SMALL}"), timeout=TIMEOUT)
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == len(farm.expected_bytes(f"/img/h.gif?{SMALL}"))
    assert response.content == b""


def test_keep_alive_reuses_the_connection(farm: ImageFarm) -> None:
    address, port = farm.base_urls[0].split("//")[1].split(":")
    connection = http.client.HTTPConnection(address, int(port), timeout=TIMEOUT)
    try:
        bodies = []
        for _ in range(2):
            connection.request("GET", f"/img/ka.bmp?{SMALL}")
            response = connection.getresponse()
            assert response.getheader("Connection") == "keep-alive"
            bodies.append(response.read())
            sock = connection.sock
        assert sock is connection.sock and bodies[0] == bodies[1]
    finally:
        connection.close()


def test_slow_route_delays_then_serves(farm: ImageFarm, session: requests.Session) -> None:
    start = time.monotonic()
    response = get(session, farm.url(0, f"/slow/0.3/s.jpg?{SMALL}"))
    assert time.monotonic() - start >= 0.3
    assert response.content == farm.expected_bytes(f"/img/s.jpg?{SMALL}")


def test_stats_count_requests(farm: ImageFarm, session: requests.Session) -> None:
    farm.reset_stats()
    session.headers["User-Agent"] = "farm-test/1.0"
    for path in (f"/img/st.jpg?{SMALL}", "/status/404", "/robots.txt", f"/img/st2.jpg?{SMALL}"):
        get(session, farm.url(2, path))
    stats = farm.stats(2)
    assert stats.requests == 4
    assert stats.by_status == {200: 2, 404: 2}
    assert stats.user_agents == {"farm-test/1.0"}
    assert stats.max_in_flight == 1
    assert max_requests_in_window(stats.request_times, window=60.0) == 4


def test_max_requests_in_window() -> None:
    assert max_requests_in_window([]) == 0
    assert max_requests_in_window([5.0]) == 1
    times = [0.0, 0.5, 0.99, 1.0, 1.49, 3.0]
    assert max_requests_in_window(times) == 4  # [0.5, 0.99, 1.0, 1.49]; 0.0 and 1.0 are a full second apart
    assert max_requests_in_window(list(reversed(times))) == 4
    assert max_requests_in_window(times, window=0.1) == 2


def test_rate_limit_returns_429_with_retry_after() -> None:
    with ImageFarm([HostSpec("limited", rate_limit=5, burst=5)]) as farm, requests.Session() as session:
        responses = [get(session, farm.url(0, "/img/r.jpg?w=8&h=8")) for _ in range(30)]
        statuses = [r.status_code for r in responses]
        assert statuses[:5] == [200] * 5  # the burst
        assert 429 in statuses
        assert statuses.count(200) < 15
        for response in responses:
            if response.status_code == 429:
                assert int(response.headers["Retry-After"]) >= 1
        stats = farm.stats(0)
        assert stats.requests == 30 and stats.by_status[429] == statuses.count(429)


def test_robots_is_exempt_from_rate_limit_and_limits_are_advertised() -> None:
    spec = HostSpec("adv", rate_limit=2, burst=2, advertise_limits=True, robots_txt="")
    with ImageFarm([spec]) as farm, requests.Session() as session:
        assert [get(session, farm.url(0, "/robots.txt")).status_code for _ in range(5)] == [200] * 5
        first = get(session, farm.url(0, "/status/200"))
        assert first.headers["RateLimit-Policy"] == "2;w=1"
        assert first.headers["X-RateLimit-Limit"] == "2"
        assert first.headers["X-RateLimit-Remaining"] == "1"
        assert farm.stats(0).requests == 6


def test_max_connections_rejects_with_503() -> None:
    with ImageFarm([HostSpec("narrow", max_connections=1)]) as farm:

        def fetch(_: int) -> requests.Response:
            return requests.get(farm.url(0, "/slow/0.5/c.jpg?w=8&h=8"), timeout=TIMEOUT)

        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(fetch, range(3)))
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 503 in statuses
        assert all(r.headers["Retry-After"] == "1" for r in responses if r.status_code == 503)
        assert farm.stats(0).max_in_flight >= 2


def test_latency_is_added() -> None:
    with ImageFarm([HostSpec("far", latency=0.2)]) as farm:
        start = time.monotonic()
        assert requests.get(farm.url(0, "/status/200"), timeout=TIMEOUT).status_code == 200
        assert time.monotonic() - start >= 0.2


def test_faults_are_deterministic_per_path_and_attempt() -> None:
    def statuses() -> list[int]:
        with ImageFarm([HostSpec("faulty", fault_rate=0.5)], seed=3) as farm, requests.Session() as session:
            return [get(session, farm.url(0, "/img/z.jpg?w=8&h=8")).status_code for _ in range(16)]

    first = statuses()
    assert set(first) == {200, 500}
    assert statuses() == first


def test_stop_is_quick_idempotent_and_frees_the_port() -> None:
    farm = ImageFarm(1).start()
    address, port = farm.base_urls[0].split("//")[1].split(":")
    session = requests.Session()
    assert get(session, farm.url(0, "/status/200")).status_code == 200  # leaves an idle keep-alive socket
    slow = threading.Thread(target=lambda: _swallow(farm.url(0, "/slow/20/x.jpg")), daemon=True)
    slow.start()
    time.sleep(0.1)
    start = time.monotonic()
    farm.stop()
    assert time.monotonic() - start < 5.0  # not the 20 s the slow handler would take
    farm.stop()  # idempotent
    slow.join(TIMEOUT)
    assert not slow.is_alive()
    session.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, int(port)), timeout=TIMEOUT).close()
    with socket.socket() as sock:  # a restarted server (SO_REUSEADDR, like http.server) can bind again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, int(port)))


def _swallow(url: str) -> None:
    with contextlib.suppress(requests.RequestException):  # stop() drops the connection; that is the point
        requests.get(url, timeout=TIMEOUT)


def test_cli_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "workflow_scripts")}
    command = [sys.executable, "-m", "distributed_downloader.demo.testserver", "--hosts", "2", "--seed", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert process.stdout is not None
        urls = [process.stdout.readline().strip() for _ in range(2)]
        assert [u.rsplit(":", 1)[0] for u in urls] == ["http://127.0.0.2", "http://127.0.0.3"]
        response = requests.get(urls[1] + "/img/cli.png?w=8&h=8", timeout=TIMEOUT)
        assert response.content == ImageFarm(1, seed=1).expected_bytes("/img/cli.png?w=8&h=8")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---------------------------------------------------------------- hostile routes


def raw_get(url: str, seconds: float = TIMEOUT) -> tuple[bytes, BaseException | None]:
    """GET over a fresh socket; every byte until EOF, an error (returned), or ``seconds`` pass (bounded)."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    received = bytearray()
    deadline = time.monotonic() + seconds
    with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        for _ in range(100_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(received), None
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return bytes(received), None
            except OSError as exc:
                return bytes(received), exc
            if not data:
                return bytes(received), None
            received += data
    return bytes(received), None


def split_response(data: bytes) -> tuple[dict[str, list[str]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    headers: dict[str, list[str]] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return headers, body


def test_reset_sends_half_then_a_tcp_reset(farm: ImageFarm) -> None:
    image = farm.expected_bytes(f"/img/r.jpg?{SMALL}")
    data, error = raw_get(farm.url(0, f"/reset/r.jpg?{SMALL}"))
    headers, body = split_response(data)
    assert headers["content-length"] == [str(len(image))]
    assert body == image[: len(image) // 2]
    assert isinstance(error, ConnectionResetError)  # an RST, not a clean FIN
    with pytest.raises(requests.exceptions.ChunkedEncodingError, match="reset"):
        requests.get(farm.url(0, f"/reset/r.jpg?{SMALL}"), timeout=TIMEOUT)


def test_stall_sends_half_then_nothing(farm: ImageFarm) -> None:
    image = farm.expected_bytes(f"/img/st.png?{SMALL}")
    started = time.monotonic()
    data, error = raw_get(farm.url(0, f"/stall/st.png?{SMALL}"), seconds=0.6)
    assert error is None and time.monotonic() - started >= 0.6  # still open, still silent
    headers, body = split_response(data)
    assert headers["content-length"] == [str(len(image))]
    assert body == image[: len(image) // 2]


def test_trickle_sends_one_byte_every_half_second(farm: ImageFarm) -> None:
    image = farm.expected_bytes(f"/img/tr.jpg?{SMALL}")
    assert farm.expected_bytes(f"/trickle/tr.jpg?{SMALL}") == image  # it would all arrive, eventually
    data, error = raw_get(farm.url(0, f"/trickle/tr.jpg?{SMALL}"), seconds=1.2)
    headers, body = split_response(data)
    assert error is None
    assert headers["content-length"] == [str(len(image))]
    assert body == image[: len(body)] and 2 <= len(body) <= 4  # bytes at 0, 0.5 and 1.0 s


def test_slowheaders_never_finishes_the_headers(farm: ImageFarm) -> None:
    data, error = raw_get(farm.url(0, "/slowheaders/sh.jpg"), seconds=1.2)
    assert error is None
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Slowloris: z" in data
    assert b"\r\n\r\n" not in data


def test_redirect_chain_ends_at_the_image(farm: ImageFarm, session: requests.Session) -> None:
    response = get(session, farm.url(0, f"/redirect/3/rc.jpg?{SMALL}"))
    assert [r.status_code for r in response.history] == [302, 302, 302]
    assert [r.headers["Location"] for r in response.history] == [
        f"/redirect/2/rc.jpg?{SMALL}",
        f"/redirect/1/rc.jpg?{SMALL}",
        f"/img/rc.jpg?{SMALL}",
    ]
    assert response.content == farm.expected_bytes(f"/img/rc.jpg?{SMALL}")
    assert farm.expected_bytes(f"/redirect/3/rc.jpg?{SMALL}") == response.content
    direct = get(session, farm.url(0, f"/redirect/0/rc.jpg?{SMALL}"))
    assert not direct.history and direct.content == response.content
    assert get(session, farm.url(0, "/redirect/101/rc.jpg")).status_code == 400


def test_loop_cycles(farm: ImageFarm, session: requests.Session) -> None:
    def location(path: str) -> str:
        response = session.get(farm.url(0, path), timeout=TIMEOUT, allow_redirects=False)
        assert response.status_code == 302
        return response.headers["Location"]

    assert [location(p) for p in ("/loop/3", "/loop/3/1", "/loop/3/2")] == ["/loop/3/1", "/loop/3/2", "/loop/3"]
    assert location("/loop/1") == "/loop/1"
    assert get(session, farm.url(0, "/loop/0")).status_code == 400
    assert get(session, farm.url(0, "/loop/2/2")).status_code == 400
    with pytest.raises(requests.exceptions.TooManyRedirects):
        get(session, farm.url(0, "/loop/2"))


def test_redirect_to_anywhere(farm: ImageFarm, session: requests.Session) -> None:
    target = farm.url(1, f"/img/elsewhere.gif?{SMALL}")
    response = session.get(farm.url(0, "/redirect-to/" + quote(target, safe="")), timeout=TIMEOUT)
    assert response.history[0].headers["Location"] == target
    assert response.content == farm.expected_bytes(f"/img/elsewhere.gif?{SMALL}")
    assert get(session, farm.url(0, "/redirect-to/%0D%0AX-Injected:%201")).status_code == 400  # no header injection


def test_json_labelled_as_jpeg(farm: ImageFarm, session: requests.Session) -> None:
    response = get(session, farm.url(0, "/json/item/7"))
    assert response.headers["Content-Type"] == "image/jpeg"
    assert response.json()["error"] == "not an image"


def test_bomb_png_declares_30000_squared(farm: ImageFarm, session: requests.Session) -> None:
    response = get(session, farm.url(0, "/bomb.png?cache=1"))
    assert response.headers["Content-Type"] == "image/png"
    assert len(response.content) < 200
    assert struct.unpack(">II", response.content[16:24]) == (BOMB_SIDE, BOMB_SIDE)
    with pytest.raises(Image.DecompressionBombError):  # a real PNG to Pillow, and a bomb
        Image.open(io.BytesIO(response.content))


def test_big_streams_megabytes_with_or_without_a_length(farm: ImageFarm, session: requests.Session) -> None:
    response = get(session, farm.url(0, "/big/3"))
    assert int(response.headers["Content-Length"]) == len(response.content) == 3_000_000
    assert response.content[:512] == bytes(range(256)) * 2
    chunked = get(session, farm.url(0, "/big/0.5?chunked=1"))
    assert "Content-Length" not in chunked.headers and chunked.headers["Transfer-Encoding"] == "chunked"
    assert len(chunked.content) == 500_000
    capped = session.head(farm.url(0, "/big/1000"), timeout=TIMEOUT)
    assert capped.headers["Content-Length"] == str(int(MAX_BIG_MB * 1_000_000)) and capped.content == b""
    assert get(session, farm.url(0, "/big/-1")).status_code == 400


def test_gzbomb_is_small_on_the_wire(farm: ImageFarm, session: requests.Session) -> None:
    response = session.get(farm.url(0, "/gzbomb/5"), timeout=TIMEOUT, stream=True)
    assert response.headers["Content-Encoding"] == "gzip"
    wire = response.raw.read(decode_content=False)
    assert len(wire) < 50_000
    assert gzip.decompress(wire) == bytes(5_000_000)


def test_badlength_promises_more_than_it_sends(farm: ImageFarm) -> None:
    image = farm.expected_bytes(f"/img/bl.jpg?{SMALL}")
    data, error = raw_get(farm.url(0, f"/badlength/bl.jpg?{SMALL}"))
    headers, body = split_response(data)
    assert error is None  # a clean close ...
    assert body == image and int(headers["content-length"][0]) > len(image)  # ... after too few bytes


def test_duplength_sends_two_lengths(farm: ImageFarm) -> None:
    data, _ = raw_get(farm.url(0, f"/duplength/dl.jpg?{SMALL}"))
    lengths = split_response(data)[0]["content-length"]
    assert len(lengths) == 2 and len(set(lengths)) == 2


def test_gzip_and_badgzip(farm: ImageFarm, session: requests.Session) -> None:
    image = farm.expected_bytes(f"/img/gz.bmp?{SMALL}")
    response = session.get(farm.url(0, f"/gzip/gz.bmp?{SMALL}"), timeout=TIMEOUT, stream=True)
    assert response.headers["Content-Encoding"] == "gzip"
    wire = response.raw.read(decode_content=False)
    assert gzip.decompress(wire) == image and len(wire) == int(response.headers["Content-Length"])
    assert farm.expected_bytes(f"/gzip/gz.bmp?{SMALL}") == image
    bad = session.get(farm.url(0, f"/badgzip/gz.bmp?{SMALL}"), timeout=TIMEOUT, stream=True)
    assert bad.headers["Content-Encoding"] == "gzip"
    assert bad.raw.read(decode_content=False) == image  # not gzip at all


def test_badchunk_breaks_the_chunked_framing(farm: ImageFarm) -> None:
    image = farm.expected_bytes(f"/img/bc.jpg?{SMALL}")
    data, _ = raw_get(farm.url(0, f"/badchunk/bc.jpg?{SMALL}"))
    headers, body = split_response(data)
    assert headers["transfer-encoding"] == ["chunked"]
    half = image[: len(image) // 2]
    assert body == b"%x\r\n%s\r\nnot-a-size\r\n" % (len(half), half)


def test_xrobots_adds_the_decoded_directive(farm: ImageFarm, session: requests.Session) -> None:
    response = get(session, farm.url(0, f"/xrobots/otherbot%3A%20noai/xr.png?{SMALL}"))
    assert response.headers["X-Robots-Tag"] == "otherbot: noai"
    assert response.content == farm.expected_bytes(f"/img/xr.png?{SMALL}")
    assert farm.expected_bytes(f"/xrobots/noai/xr.png?{SMALL}") == response.content


@pytest.mark.parametrize(
    "path",
    ["/reset/a.jpg", "/stall/a.jpg", "/badlength/a.jpg", "/badgzip/a.jpg", "/big/1", "/bomb.png", "/loop/2", "/json/a"],
)
def test_expected_bytes_refuses_routes_that_never_serve_a_whole_image(farm: ImageFarm, path: str) -> None:
    with pytest.raises(ValueError):
        farm.expected_bytes(path)


def test_connections_are_counted(farm: ImageFarm) -> None:
    farm.reset_stats()
    with requests.Session() as keep_alive:
        for _ in range(3):
            get(keep_alive, farm.url(2, f"/img/conn.jpg?{SMALL}"))
    with requests.Session() as another:
        get(another, farm.url(2, f"/img/conn.jpg?{SMALL}"))
    assert farm.stats(2).connections == 2 and farm.stats(2).requests == 4
    # The request log names each request's connection: three on the first, one on the second. A
    # handler logs its request after the answer is sent: give the last one a moment.
    deadline = time.monotonic() + 5.0
    while len(farm.request_log(2)) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [entry.connection for entry in farm.request_log(2)] == [1, 1, 1, 2]


def test_hosts_on_chosen_addresses(session: requests.Session) -> None:
    with ImageFarm(2, addresses=["127.0.0.9", "127.0.0.7"]) as farm:
        assert [url.split("//")[1].split(":")[0] for url in farm.base_urls] == ["127.0.0.9", "127.0.0.7"]
        assert get(session, farm.url(1, "/status/200")).status_code == 200
    with pytest.raises(ValueError, match="loopback"):
        ImageFarm(2, addresses=["127.0.0.9"])
    with pytest.raises(ValueError, match="loopback"):
        ImageFarm(1, addresses=["10.0.0.1"])


def test_stop_ends_stalled_and_trickling_handlers_at_once() -> None:
    farm = ImageFarm(1).start()
    paths = ["/stall/s.jpg?w=8&h=8", "/trickle/t.jpg?w=8&h=8", "/slowheaders/h.jpg"]
    threads = [threading.Thread(target=raw_get, args=(farm.url(0, p), TIMEOUT), daemon=True) for p in paths]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    farm.stop()
    assert time.monotonic() - started < 5.0  # a stall lasts until the farm stops, a trickle ~0.5 s a byte
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def test_silent_hosts_time_out_and_closed_ports_refuse() -> None:
    with SilentHost() as accepting, SilentHost(mode="backlog") as full:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(accepting.url("/a.jpg"), timeout=(2, 0.3))
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ConnectTimeout):
            requests.get(full.url("/a.jpg"), timeout=(0.3, 2))
        assert time.monotonic() - started < 2
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", closed_port()), timeout=TIMEOUT).close()
    with pytest.raises(ValueError):
        SilentHost(mode="other")


# ---------------------------------------------------------------- realistic limits: refusal styles


@pytest.mark.parametrize(("status", "retry_after"), [(429, False), (503, True), (503, False)])
def test_rate_limit_refusal_status_and_retry_after_are_configurable(status: int, retry_after: bool) -> None:
    spec = HostSpec("styled", rate_limit=2, burst=1, refuse_status=status, retry_after=retry_after)
    with ImageFarm([spec]) as farm, requests.Session() as session:
        responses = [get(session, farm.url(0, "/status/200")) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, status, status]
    for response in responses[1:]:
        assert ("Retry-After" in response.headers) is retry_after


def test_connection_cap_refusal_is_configurable() -> None:
    spec = HostSpec("capped", max_connections=1, connection_refuse_status=429, connection_retry_after=False)
    with ImageFarm([spec]) as farm:

        def fetch(_: int) -> requests.Response:
            return requests.get(farm.url(0, "/slow/0.4/c.jpg?w=8&h=8"), timeout=TIMEOUT)

        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(fetch, range(3)))
    refused = [r for r in responses if r.status_code != 200]
    assert refused and all(r.status_code == 429 and "Retry-After" not in r.headers for r in refused)


def test_refusal_statuses_are_checked() -> None:
    with pytest.raises(ValueError, match="429 or 503"):
        HostSpec("x", refuse_status=500)
    with pytest.raises(ValueError, match="429 or 503"):
        HostSpec("x", connection_refuse_status=403)
    assert HostSpec("x", rate_limit=8, burst=2).bucket_capacity == 2
    assert HostSpec("x", rate_limit=0.5).bucket_capacity == 1.0
    assert HostSpec("x").bucket_capacity is None


# ---------------------------------------------------------------- the per-URL fault background

MIX = FaultMix(missing=0.2, error500=0.2, reset=0.2, stall=0.2, stall_seconds=0.5)


def settled_log(farm: ImageFarm, host: int, count: int) -> list[LogEntry]:
    """The host's request log once ``count`` entries are in (a handler logs just after its reply left)."""
    deadline = time.monotonic() + TIMEOUT
    while len(log := farm.request_log(host)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return log


def paths_by_outcome(farm: ImageFarm, host: int, count: int = 400) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {outcome: [] for outcome in OUTCOMES}
    for n in range(count):
        path = f"/img/bg{n}.jpg?w=16&h=12"
        found[farm.expected_outcome(host, path)].append(path)
    return found


def test_fault_mix_is_validated_and_shares_hold() -> None:
    with pytest.raises(ValueError):
        FaultMix(missing=0.6, stall=0.5)
    with pytest.raises(ValueError):
        FaultMix(reset=-0.1)
    with pytest.raises(ValueError):
        FaultMix(stall_seconds=-1)
    everyday = FaultMix.everyday(0.02)
    assert everyday.total == pytest.approx(0.02) and everyday.missing > everyday.stall > 0
    farm = ImageFarm([HostSpec("bg", background=MIX), HostSpec("clean")], seed=5)  # never started
    found = paths_by_outcome(farm, 0, 4000)
    for outcome in OUTCOMES:
        assert 0.16 < len(found[outcome]) / 4000 < 0.24
    assert {farm.expected_outcome(1, p) for p in found["missing"]} == {"ok"}  # no background: all served
    assert set(OUTCOMES) - {"missing"} == RETRIEVABLE_OUTCOMES


def test_expected_outcome_depends_on_seed_and_path_only() -> None:
    one = ImageFarm([HostSpec("a", background=MIX), HostSpec("b", background=MIX)], seed=1)
    other = ImageFarm([HostSpec("a", background=MIX)], seed=2)
    paths = [f"/img/k{n}.png" for n in range(200)]
    outcomes = [one.expected_outcome(0, p) for p in paths]
    assert outcomes == [one.expected_outcome(1, p) for p in paths]  # same mix, same seed: same fates
    assert outcomes == [one.expected_outcome(0, p + "?w=8&h=8&cachebuster=1") for p in paths]  # query ignored
    assert outcomes == [FaultMix.outcome(MIX, 1, p) for p in paths]
    assert outcomes != [other.expected_outcome(0, p) for p in paths]
    # Hostile wrappers and special routes keep their own behaviour.
    assert one.expected_outcome(0, "/bomb.png") == "ok"
    assert {one.expected_outcome(0, "/slow/0/" + p[len("/img/") :]) for p in paths} == {"ok"}


def test_background_faults_play_once_per_url_then_serve(session: requests.Session) -> None:
    with ImageFarm([HostSpec("bg", background=MIX)], seed=5) as farm:
        found = paths_by_outcome(farm, 0, 60)
        missing, error500, ok = found["missing"][0], found["error500"][0], found["ok"][0]
        assert [get(session, farm.url(0, missing)).status_code for _ in range(3)] == [404] * 3
        assert [get(session, farm.url(0, error500)).status_code for _ in range(2)] == [500, 200]
        again = get(session, farm.url(0, ok))
        assert again.status_code == 200 and again.content == farm.expected_bytes(ok)
        # A reset: like /reset/, headers + half the body then an RST; served on the next request.
        reset = found["reset"][0]
        image = farm.expected_bytes(reset)
        data, error = raw_get(farm.url(0, reset))
        assert isinstance(error, ConnectionResetError)
        assert split_response(data)[1] == image[: len(image) // 2]
        assert get(session, farm.url(0, reset)).content == image
        # A stall: half the body, stall_seconds of silence, then the server hangs up; served next time.
        stall = found["stall"][0]
        started = time.monotonic()
        data, error = raw_get(farm.url(0, stall), seconds=3.0)
        assert error is None and 0.45 <= time.monotonic() - started < 2.0
        headers, body = split_response(data)
        stalled = farm.expected_bytes(stall)
        assert headers["content-length"] == [str(len(stalled))] and body == stalled[: len(stalled) // 2]
        assert get(session, farm.url(0, stall)).content == stalled
        first, second = (entry for entry in settled_log(farm, 0, 10) if entry.path == stall)
        assert first.end - first.start >= 0.45 and first.status == second.status == 200


def test_background_stall_ends_when_the_client_hangs_up() -> None:
    mix = FaultMix(stall=1.0, stall_seconds=20.0)
    with ImageFarm([HostSpec("stally", background=mix)]) as farm:
        with pytest.raises(requests.exceptions.ConnectionError):  # read timeout mid-body
            requests.get(farm.url(0, "/img/st.jpg?w=8&h=8"), timeout=(2, 0.3))
        (entry,) = settled_log(farm, 0, 1)
        assert entry.status == 200 and entry.end - entry.start < 2.0  # noticed the hang-up, not 20 s later


def test_background_skips_refused_requests_and_wrappers(session: requests.Session) -> None:
    mix = FaultMix(error500=1.0)
    with ImageFarm([HostSpec("bg", rate_limit=4, burst=1, background=mix)]) as farm:
        assert get(session, farm.url(0, "/status/200")).status_code == 200  # empties the bucket
        assert get(session, farm.url(0, "/img/one.jpg?w=8&h=8")).status_code == 429  # refused: no fault used up
        time.sleep(0.3)
        assert get(session, farm.url(0, "/img/one.jpg?w=8&h=8")).status_code == 500
        time.sleep(0.3)
        assert get(session, farm.url(0, "/img/one.jpg?w=8&h=8")).status_code == 200
        time.sleep(0.3)
        assert get(session, farm.url(0, "/slow/0/two.jpg?w=8&h=8")).status_code == 200  # wrappers untouched


# ---------------------------------------------------------------- the server-side request log


def test_request_log_records_every_request(session: requests.Session) -> None:
    spec = HostSpec("logged", rate_limit=50, burst=2, refuse_status=503, retry_after=False)
    with ImageFarm([spec]) as farm:
        session.headers["User-Agent"] = "log-test/1.0"
        statuses = [get(session, farm.url(0, f"/img/l{n}.jpg?w=8&h=8")).status_code for n in range(4)]
        get(session, farm.url(0, "/robots.txt"))
        log = settled_log(farm, 0, 5)
        assert [entry.status for entry in log] == [*statuses, 404]
        assert statuses[:2] == [200, 200] and 503 in statuses
        assert [entry.path for entry in log][:2] == ["/img/l0.jpg?w=8&h=8", "/img/l1.jpg?w=8&h=8"]
        assert all(entry.user_agent == "log-test/1.0" and entry.start <= entry.end for entry in log)
        assert [entry.start for entry in log] == farm.stats(0).request_times
        assert refusal_share(log) == statuses.count(503) / 5
        farm.reset_stats()
        assert farm.request_log(0) == []


def test_request_log_shows_concurrency_and_is_bounded() -> None:
    with ImageFarm([HostSpec("busy")], max_log_entries=5) as farm:

        def fetch(n: int) -> int:
            return requests.get(farm.url(0, f"/slow/0.3/p{n}.jpg?w=8&h=8"), timeout=TIMEOUT).status_code

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(fetch, range(3))) == [200] * 3
        assert max_concurrency(settled_log(farm, 0, 3)) == 3 == farm.stats(0).max_in_flight
        for n in range(4):
            requests.get(farm.url(0, f"/status/20{n}"), timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while farm.stats(0).log_dropped < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(farm.request_log(0)) == 5 and farm.stats(0).log_dropped == 2


def test_max_concurrency_and_refusal_share() -> None:
    def entry(start: float, end: float, status: int = 200) -> LogEntry:
        return LogEntry(start, end, status, "/x", "")

    assert max_concurrency([]) == 0 and refusal_share([]) == 0.0
    log = [entry(0, 1), entry(0.5, 2, 429), entry(1.5, 3, 503), entry(2.5, 2.6), entry(1, 1.2)]
    assert max_concurrency(log) == 3  # 0.5..2 overlaps 0..1 and 1..1.2 at t=1 (touching counts)
    assert max_concurrency([entry(0, 1), entry(2, 3)]) == 1
    assert refusal_share(log) == 0.4
    assert refusal_share(log, [429]) == 0.2
