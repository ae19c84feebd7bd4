"""A loopback HTTP image server farm for end-to-end tests, the demo command and benchmarks.

Each logical host is a real ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive) bound to its own
loopback address (127.0.0.2, 127.0.0.3, ...) on an OS-chosen port, so a downloader sees
distinct servers, each with its own hidden politeness limits (``HostSpec``).

Bodies are deterministic: they depend only on the path, the known query params (``w``, ``h``,
``mode``) and the farm seed. Unknown params (cache busters such as ``?1625090991``) are ignored.
``ImageFarm.expected_bytes`` calls the same function as the handler, so tests compare bytes.
Different keys give different bytes; the same key always gives the same bytes.

URL space (identical on every host)::

    /img/<key>.<ext>       generated image; ext: jpg png gif bmp tif webp; ?w=640&h=480&mode=
                           modes: cmyk, progressive, exif6 (jpg); rgba, i16, palette (png); anim (gif)
    /alias/<key>.<ext>     exactly the bytes of /img/<key>.<ext> (duplicate content, other URL)
    /<any path>.<suffix>   image keyed by the full path (rewritten real URLs, e.g. .../original.jpeg)
    /truncated/<rest>      first half of /img/<rest>, with Content-Length equal to that half
    /slow/<secs>/<rest>    /img/<rest> after sleeping <secs> (float, capped at 30)
    /flaky/<n>/<rest>      503 + Retry-After: 1 for the first n requests of this path, then /img/<rest>
    /status/<code>         that status (200-599) with a short text body
    /html/<anything>       an HTML page labelled image/jpeg (a lying server)
    /robots.txt            HostSpec.robots_txt, or 404; exempt from the rate limit

Run ``python -m distributed_downloader.testserver --hosts 3 --seed 0`` to serve until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import ipaddress
import itertools
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from PIL import Image

CONTENT_TYPES: dict[str, str] = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "webp": "image/webp",
}
# Suffixes accepted on free-form paths: real URLs say .jpeg, .JPG, .tiff.
_SUFFIX_TO_EXT: dict[str, str] = {**{ext: ext for ext in CONTENT_TYPES}, "jpeg": "jpg", "tiff": "tif"}
# Variant mode -> the only extension it applies to.
MODES: dict[str, str] = {
    "cmyk": "jpg",
    "progressive": "jpg",
    "exif6": "jpg",
    "rgba": "png",
    "i16": "png",
    "palette": "png",
    "anim": "gif",
}
DEFAULT_SIZE = (640, 480)
MAX_SIDE = 8192  # keeps one request from costing gigabytes of RAM
MAX_SLOW_SECONDS = 30.0
_TEXT = "text/plain; charset=utf-8"
_HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Not an image</title></head><body>Sorry.</body></html>\n"
_NO_BODY_STATUSES = frozenset({204, 304})


# --------------------------------------------------------------------------- specs and stats


@dataclass
class HostSpec:
    """One logical host and its hidden behaviour."""

    name: str
    rate_limit: float | None = None  # token-bucket limit in req/s; over it -> 429 + Retry-After
    burst: float | None = None  # bucket capacity; default max(1, rate_limit)
    max_connections: int | None = None  # concurrent admitted requests; over it -> 503 + Retry-After: 1
    latency: float = 0.0  # seconds added before the headers of every admitted response
    advertise_limits: bool = False  # send RateLimit-Policy / X-RateLimit-* headers
    fault_rate: float = 0.0  # probability of a transient 500 on an image request
    robots_txt: str | None = None  # body of /robots.txt (404 if None)

    def __post_init__(self) -> None:
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ValueError("rate_limit must be > 0")
        if self.burst is not None and not self.burst >= 1:
            raise ValueError("burst must be >= 1 (a smaller bucket never holds a whole token)")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate must be within [0, 1]")
        if self.latency < 0:
            raise ValueError("latency must be >= 0")


@dataclass
class HostStats:
    """What one host saw. ``ImageFarm.stats`` returns a snapshot copy."""

    requests: int = 0  # every GET/HEAD, including 429 and 503 rejections
    by_status: dict[int, int] = field(default_factory=dict)
    request_times: list[float] = field(default_factory=list)  # time.monotonic() at arrival
    max_in_flight: int = 0  # peak of concurrently handled requests, rejected ones included
    user_agents: set[str] = field(default_factory=set)  # "" when the header was missing

    def copy(self) -> HostStats:
        return HostStats(
            self.requests,
            dict(self.by_status),
            list(self.request_times),
            self.max_in_flight,
            set(self.user_agents),
        )


def max_requests_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """Most requests inside any half-open interval ``[t, t + window)``: the observed peak rate.

    Two pointers over sorted times, O(n); unsorted input is sorted first.
    """
    if any(b < a for a, b in itertools.pairwise(times)):
        times = sorted(times)
    best = left = 0
    for right, t in enumerate(times):
        while t - times[left] >= window:
            left += 1
        best = max(best, right - left + 1)
    return best


# --------------------------------------------------------------------------- image generation


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()


def _unit_float(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    return int.from_bytes(_digest(*parts)[:8], "big") / 2.0**64


def _pixels(seed: int, key: str, ext: str, width: int, height: int, mode: str) -> np.ndarray:
    """RGB pixels: gradients + seeded blocky noise + a rectangle placed by a hash of the key."""
    rng = np.random.default_rng(int.from_bytes(_digest(seed, key, ext, width, height, mode)[:16], "big"))
    xs = np.linspace(0.0, 255.0, width, dtype=np.float32)[None, :]
    ys = np.linspace(0.0, 255.0, height, dtype=np.float32)[:, None]
    canvas = np.empty((height, width, 3), np.float32)
    canvas[..., 0] = xs
    canvas[..., 1] = ys
    canvas[..., 2] = 255.0 - (xs + ys) / 2
    # Noise in 8x8 cells, not per pixel: distinct per key, yet it compresses like a photo.
    cells = rng.integers(-48, 49, size=(-(-height // 8), -(-width // 8), 3)).astype(np.float32)
    canvas += cells.repeat(8, axis=0).repeat(8, axis=1)[:height, :width]
    pixels = np.clip(canvas, 0, 255).astype(np.uint8)
    placement = _digest("rect", seed, key)
    rect_w, rect_h = max(1, width // 4), max(1, height // 4)
    x0 = int.from_bytes(placement[0:4], "big") % (width - rect_w + 1)
    y0 = int.from_bytes(placement[4:8], "big") % (height - rect_h + 1)
    pixels[y0 : y0 + rect_h, x0 : x0 + rect_w] = np.frombuffer(placement[8:11], np.uint8)
    return pixels


def _encode_jpg(img: Image.Image, mode: str, out: io.BytesIO) -> None:
    options: dict[str, object] = {"quality": 90}
    if mode == "cmyk":
        img = img.convert("CMYK")
    elif mode == "progressive":
        options["progressive"] = True
    elif mode == "exif6":
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 CW to display
        options["exif"] = exif.tobytes()
    img.save(out, "JPEG", **options)


def _encode_png(img: Image.Image, mode: str, out: io.BytesIO) -> None:
    options: dict[str, object] = {}
    if mode == "rgba":
        img = img.convert("RGBA")
        img.putalpha(128)  # half-transparent everywhere
    elif mode == "i16":
        gray = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # spread over the full 16-bit range
        img = Image.fromarray(gray)  # uint16 2-D -> mode "I;16"
    elif mode == "palette":
        img = img.quantize(colors=64)
        options["transparency"] = 0
    img.save(out, "PNG", **options)


def _encode_gif(img: Image.Image, mode: str, out: io.BytesIO) -> None:
    first = img.quantize(colors=128)
    if mode != "anim":
        first.save(out, "GIF")
        return
    second = Image.fromarray(255 - np.asarray(img)).quantize(colors=128)
    first.save(out, "GIF", save_all=True, append_images=[second], duration=200, loop=0)


def _encode_bmp(img: Image.Image, mode: str, out: io.BytesIO) -> None:
    img.save(out, "BMP")


def _encode_tif(img: Image.Image, mode: str, out: io.BytesIO) -> None:
    img.save(out, "TIFF")


def _encode_webp(img: Image.Image, mode: str, out: io.BytesIO) -> None:
    img.save(out, "WEBP", quality=80, method=4)


_ENCODERS = {
    "jpg": _encode_jpg,
    "png": _encode_png,
    "gif": _encode_gif,
    "bmp": _encode_bmp,
    "tif": _encode_tif,
    "webp": _encode_webp,
}


@functools.lru_cache(maxsize=512)
def render_image(seed: int, key: str, ext: str, width: int, height: int, mode: str = "") -> bytes:
    """The encoded image for these inputs; cached because generation costs CPU."""
    out = io.BytesIO()
    _ENCODERS[ext](Image.fromarray(_pixels(seed, key, ext, width, height, mode)), mode, out)
    return out.getvalue()


# --------------------------------------------------------------------------- URL resolution


class _BadRequest(ValueError):
    """A malformed known parameter; answered with 400."""


@dataclass(frozen=True)
class _ImageRef:
    key: str
    ext: str
    width: int
    height: int
    mode: str
    truncate: bool = False


def _split_target(target: str) -> tuple[str, dict[str, str]]:
    """Path and query params of a request target or full URL (last value of a repeated param wins)."""
    parts = urlsplit(target)
    return parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))


def _parse_params(params: dict[str, str], ext: str) -> tuple[int, int, str]:
    try:
        width = int(params.get("w", DEFAULT_SIZE[0]))
        height = int(params.get("h", DEFAULT_SIZE[1]))
    except ValueError:
        raise _BadRequest("w and h must be integers") from None
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise _BadRequest(f"w and h must be within 1..{MAX_SIDE}")
    mode = params.get("mode", "")
    if mode and MODES.get(mode) != ext:
        raise _BadRequest(f"mode {mode!r} is not available for .{ext}")
    return width, height, mode


def _unwrap(path: str) -> tuple[str, str, str]:
    """``/slow/<arg>/<rest>`` and ``/flaky/<arg>/<rest>`` -> (kind, arg, "/img/<rest>")."""
    for kind in ("slow", "flaky"):
        prefix = f"/{kind}/"
        if path.startswith(prefix):
            arg, _, rest = path[len(prefix) :].partition("/")
            return kind, arg, "/img/" + rest
    return "", "", path


def _resolve_image(path: str, params: dict[str, str]) -> _ImageRef | None:
    """The image an (unwrapped) path names, or None when it names no image."""
    truncate = path.startswith("/truncated/")
    if truncate or path.startswith("/alias/"):
        path = "/img/" + path.split("/", 2)[2]
    if path.startswith("/img/"):
        key, dot, ext = path[len("/img/") :].rpartition(".")
        if not dot or not key or ext not in CONTENT_TYPES:
            return None
    else:
        _, dot, suffix = path.rpartition(".")
        ext = _SUFFIX_TO_EXT.get(suffix.lower(), "")
        if not dot or not ext:
            return None
        key = "path:" + path  # the prefix keeps free-form keys apart from /img/ keys
    width, height, mode = _parse_params(params, ext)
    return _ImageRef(key, ext, width, height, mode, truncate)


def _is_special(path: str) -> bool:
    return path == "/robots.txt" or path.startswith(("/status/", "/html/"))


def _body(seed: int, ref: _ImageRef) -> bytes:
    data = render_image(seed, ref.key, ref.ext, ref.width, ref.height, ref.mode)
    return data[: len(data) // 2] if ref.truncate else data


# --------------------------------------------------------------------------- per-host state


class _TokenBucket:
    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = time.monotonic()

    def take(self, now: float) -> tuple[bool, float]:
        """(allowed, tokens left) when allowed, else (False, seconds until a token is due)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True, self.tokens
        return False, (1 - self.tokens) / self.rate


def _advertised_policy(rate: float) -> tuple[int, int]:
    """(limit, window seconds) as integers; rates under 1/s become ``1;w=<ceil(1/rate)>``."""
    if rate >= 1:
        return int(rate), 1
    return 1, math.ceil(1 / rate)


class _Host:
    """Bookkeeping shared by the handler threads of one host. All mutation under ``lock``."""

    def __init__(self, index: int, spec: HostSpec, seed: int) -> None:
        self.index = index
        self.spec = spec
        self.seed = seed
        self.lock = threading.Lock()
        self.stats = HostStats()
        self.in_flight = 0  # every request being handled, for stats
        self.admitted = 0  # requests past the limits, for max_connections
        self.hits: dict[tuple[str, str], int] = {}  # (purpose, path) -> requests so far
        self.bucket: _TokenBucket | None = None
        if spec.rate_limit is not None:
            burst = spec.burst if spec.burst is not None else max(1.0, spec.rate_limit)
            self.bucket = _TokenBucket(spec.rate_limit, burst)

    def arrive(self, user_agent: str) -> None:
        with self.lock:
            stats = self.stats
            stats.requests += 1
            stats.request_times.append(time.monotonic())  # taken under the lock so the list stays sorted
            stats.user_agents.add(user_agent)
            self.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def record_status(self, status: int) -> None:
        with self.lock:
            self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1

    def take_token(self) -> tuple[bool, float]:
        if self.bucket is None:
            return True, math.inf
        with self.lock:
            return self.bucket.take(time.monotonic())

    def try_admit(self) -> bool:
        with self.lock:
            limit = self.spec.max_connections
            if limit is not None and self.admitted >= limit:
                return False
            self.admitted += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.admitted -= 1

    def count_hit(self, purpose: str, path: str) -> int:
        """1 for the first request of ``path`` for this purpose, 2 for the next, ..."""
        with self.lock:
            count = self.hits.get((purpose, path), 0) + 1
            self.hits[(purpose, path)] = count
            return count

    def should_fault(self, target: str) -> bool:
        if self.spec.fault_rate <= 0:
            return False
        attempt = self.count_hit("fault", target)
        return _unit_float("fault", self.seed, target, attempt) < self.spec.fault_rate

    def limit_headers(self, remaining: float | None) -> dict[str, str]:
        if not self.spec.advertise_limits or self.spec.rate_limit is None:
            return {}
        limit, window = _advertised_policy(self.spec.rate_limit)
        headers = {"RateLimit-Policy": f"{limit};w={window}", "X-RateLimit-Limit": str(limit)}
        if remaining is not None:
            headers["X-RateLimit-Remaining"] = str(max(0, math.floor(remaining)))
        return headers

    def snapshot(self) -> HostStats:
        with self.lock:
            return self.stats.copy()

    def reset(self) -> None:
        with self.lock:
            self.stats = HostStats(max_in_flight=self.in_flight)


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "ImageFarm/1.0"
    timeout = 30.0  # an idle keep-alive connection gives its thread back eventually
    disable_nagle_algorithm = True  # headers and body are two writes; Nagle + delayed ACK would add 40 ms
    server: _FarmServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base-class signature
        pass  # thousands of requests per test run; the stats are the log

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        self._head = head
        self._remaining: float | None = None
        host = self.server.host
        host.arrive(self.headers.get("User-Agent", ""))
        try:
            self._admit_and_route(host)
        finally:
            host.leave()

    def _admit_and_route(self, host: _Host) -> None:
        path, params = _split_target(self.path)
        if path != "/robots.txt":  # crawlers must be able to read the rules without paying for it
            allowed, value = host.take_token()
            if not allowed:
                self._remaining = 0
                self._reply(429, b"rate limited\n", _TEXT, {"Retry-After": str(max(1, math.ceil(value)))})
                return
            self._remaining = value if host.bucket is not None else None
        if not host.try_admit():
            self._reply(503, b"too many connections\n", _TEXT, {"Retry-After": "1"})
            return
        try:
            if self._pause(host.spec.latency):
                self._route(host, path, params)
        except _BadRequest as exc:
            self._reply(400, f"{exc}\n".encode(), _TEXT)
        finally:
            host.release()

    def _pause(self, seconds: float) -> bool:
        """Sleep unless the farm stops first; on stop, drop the connection without a response."""
        if seconds <= 0:
            return True
        if self.server.stopping.wait(seconds):
            self.close_connection = True
            return False
        return True

    def _route(self, host: _Host, path: str, params: dict[str, str]) -> None:
        if path == "/robots.txt":
            self._robots(host)
        elif path.startswith("/status/"):
            self._status(path[len("/status/") :])
        elif path.startswith("/html/"):
            self._reply(200, _HTML_PAGE, "image/jpeg")  # deliberately lies
        else:
            self._image_route(host, path, params)

    def _robots(self, host: _Host) -> None:
        if host.spec.robots_txt is None:
            self._reply(404, b"no robots.txt\n", _TEXT)
        else:
            self._reply(200, host.spec.robots_txt.encode(), _TEXT)

    def _status(self, code_text: str) -> None:
        try:
            code = int(code_text.strip("/"))
        except ValueError:
            raise _BadRequest("status code must be an integer") from None
        if not 200 <= code <= 599:
            raise _BadRequest("status code must be within 200..599")
        headers = {"Retry-After": "1"} if code in (429, 503) else {}
        self._reply(code, f"status {code}\n".encode(), _TEXT, headers)

    def _image_route(self, host: _Host, path: str, params: dict[str, str]) -> None:
        kind, arg, inner = _unwrap(path)
        ref = _resolve_image(inner, params)
        if ref is None:
            self._reply(404, b"not found\n", _TEXT)
            return
        if kind == "slow" and not self._pause(_parse_seconds(arg)):
            return
        if kind == "flaky" and host.count_hit("flaky", path) <= _parse_count(arg):
            self._reply(503, b"try again later\n", _TEXT, {"Retry-After": "1"})
            return
        if host.should_fault(self.path):
            self._reply(500, b"transient fault\n", _TEXT)
            return
        self._reply(200, _body(host.seed, ref), CONTENT_TYPES[ref.ext])

    def _reply(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        host = self.server.host
        host.record_status(status)
        self.send_response(status)
        if status in _NO_BODY_STATUSES:
            body = b""
        else:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        for name, value in {**(headers or {}), **host.limit_headers(self._remaining)}.items():
            self.send_header(name, value)
        self.send_header("Connection", "close" if self.close_connection else "keep-alive")
        self.end_headers()
        if body and not self._head:
            self.wfile.write(body)


def _parse_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise _BadRequest("seconds must be a number") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise _BadRequest("seconds must be finite and >= 0")
    return min(seconds, MAX_SLOW_SECONDS)


def _parse_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise _BadRequest("count must be an integer") from None
    if count < 0:
        raise _BadRequest("count must be >= 0")
    return count


class _FarmServer(ThreadingHTTPServer):
    """One host's server; tracks its connections so ``stop`` can end keep-alive threads at once."""

    daemon_threads = True
    block_on_close = False  # we join our own way, with a deadline
    request_queue_size = 128  # the default backlog of 5 drops SYNs under benchmark concurrency

    def __init__(self, address: tuple[str, int], host: _Host, stopping: threading.Event) -> None:
        self.host = host
        self.stopping = stopping
        self._live: dict[threading.Thread, socket.socket] = {}
        self._live_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        me = threading.current_thread()
        with self._live_lock:
            self._live[me] = request
        try:
            if self.stopping.is_set():  # accepted during stop(), after close_connections ran
                _hang_up(request)
            super().process_request_thread(request, client_address)
        finally:
            with self._live_lock:
                self._live.pop(me, None)

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # clients hanging up mid-body is routine in downloader tests
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self._live_lock:
            sockets = list(self._live.values())
        for sock in sockets:
            _hang_up(sock)

    def join_handlers(self, deadline: float) -> None:
        with self._live_lock:
            threads = list(self._live)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading the next keep-alive request


# --------------------------------------------------------------------------- the farm


class ImageFarm:
    """Several loopback image hosts. Use ``start``/``stop`` or ``with ImageFarm(...) as farm``."""

    def __init__(self, hosts: list[HostSpec] | int = 3, seed: int = 0, first_address: int = 2) -> None:
        specs = [HostSpec(f"h{i + 1}") for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        if not specs:
            raise ValueError("an ImageFarm needs at least one host")
        first = int(ipaddress.IPv4Address("127.0.0.0")) + first_address
        if first_address < 1 or first + len(specs) - 1 > int(ipaddress.IPv4Address("127.255.255.254")):
            raise ValueError("host addresses must stay inside 127.0.0.1-127.255.255.254")
        self.specs = specs
        self.seed = seed
        self.addresses = [str(ipaddress.IPv4Address(first + i)) for i in range(len(specs))]
        self.base_urls: list[str] = []
        # Bookkeeping outlives start/stop so stats can be read after the farm stopped.
        self._hosts = [_Host(i, spec, seed) for i, spec in enumerate(specs)]
        self._servers: list[_FarmServer] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def start(self) -> ImageFarm:
        if self._servers:
            raise RuntimeError("ImageFarm already started")
        self._stopping = threading.Event()
        try:
            for address, host in zip(self.addresses, self._hosts, strict=True):
                self._servers.append(_FarmServer((address, 0), host, self._stopping))
        except OSError:
            self.stop()
            raise
        for server, host in zip(self._servers, self._hosts, strict=True):
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},  # shutdown() waits up to one poll interval
                name=f"imagefarm-{host.spec.name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        self.base_urls = [f"http://{s.server_address[0]}:{s.server_address[1]}" for s in self._servers]
        return self

    def stop(self) -> None:
        servers, threads = self._servers, self._threads
        self._servers, self._threads = [], []
        if not servers:
            return
        self._stopping.set()  # wakes latency and /slow/ sleepers
        for server in servers[: len(threads)]:  # shutdown() would block forever on a never-served server
            server.shutdown()
        for server in servers:
            server.server_close()
            server.close_connections()
        deadline = time.monotonic() + 2.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for server in servers:
            server.join_handlers(deadline)

    def __enter__(self) -> ImageFarm:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, host_index: int, path: str) -> str:
        if not self.base_urls:
            raise RuntimeError("ImageFarm not started")
        return self.base_urls[host_index] + (path if path.startswith("/") else "/" + path)

    def expected_bytes(self, path: str) -> bytes:
        """The exact body served for an image path (query string allowed; full URLs too)."""
        path_only, params = _split_target(path)
        ref = None if _is_special(path_only) else _resolve_image(_unwrap(path_only)[2], params)
        if ref is None:
            raise ValueError(f"{path!r} does not name an image")
        return _body(self.seed, ref)

    def stats(self, host_index: int) -> HostStats:
        return self._hosts[host_index].snapshot()

    def reset_stats(self) -> None:
        """Clear every host's stats; /flaky/ and fault attempt counters keep counting."""
        for host in self._hosts:
            host.reset()


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distributed_downloader.testserver",
        description="Serve deterministic generated images from several loopback hosts until Ctrl-C.",
    )
    parser.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="image content seed (default 0)")
    parser.add_argument("--first-address", type=int, default=2, help="first host is 127.0.0.<this>")
    args = parser.parse_args(argv)
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    with ImageFarm(args.hosts, seed=args.seed, first_address=args.first_address) as farm:
        for base_url in farm.base_urls:
            print(base_url, flush=True)
        print(f"e.g. {farm.url(0, '/img/example.jpg')} ; Ctrl-C to stop", file=sys.stderr, flush=True)
        while not done.wait(0.5):  # a bounded wait so the signal handler's flag is seen promptly
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
