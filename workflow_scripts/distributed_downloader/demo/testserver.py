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
    /flaky/<n>/<rest>      503 + Retry-After: 1 (?ra=N: N) for the first n requests of this path, then /img/<rest>
    /status/<code>         that status (200-599) with a short text body
    /reply/<code>?h=&v=    that status with the header h: v spelled as given (v=date+N: an HTTP date N s ahead)
    /html/<anything>       an HTML page labelled image/jpeg (a lying server)
    /robots.txt            HostSpec.robots_txt, or 404; exempt from the rate limit. HostSpec.robots_failures:
                           the first N requests get robots_failure_status (503) instead (ImageFarm.set_robots_failures
                           changes N live); HostSpec.robots_location: a 301 to that path, which serves robots_txt

Hostile routes (every host), for timeout, guard and error-code tests::

    /reset/<rest>          headers + half of /img/<rest>, then a TCP reset (SO_LINGER 0, close)
    /stall/<rest>          headers + half of /img/<rest>, then silence until the farm stops
    /trickle/<rest>        /img/<rest> at 1 byte every 0.5 s (slowloris body)
    /slowheaders/<rest>    the status line, then a header trickled 1 byte every 0.5 s (slowloris headers)
    /redirect/<n>/<rest>   302 chain of n hops (/redirect/<n-1>/<rest> ...) ending at /img/<rest>; query kept
    /loop/<k>              302 cycle of k URLs: /loop/<k>/1 -> ... -> /loop/<k>/<k-1> -> /loop/<k>
    /redirect-to/<url>     302 to the percent-decoded <url> (another host, a closed port, anything)
    /json/<anything>       a JSON document labelled image/jpeg
    /bomb.png              a tiny PNG whose IHDR declares 30000x30000 pixels
    /big/<mb>              <mb> MB (10^6 bytes, float, capped at 100) of filler, streamed; ?chunked=1: no
                           Content-Length (chunked transfer encoding)
    /gzbomb/<mb>           <mb> MB (capped at 100) of zeros, gzip-encoded (a few hundred bytes per MB on the wire)
    /badlength/<rest>      /img/<rest> with a Content-Length larger than the body, then the connection closes
    /duplength/<rest>      /img/<rest> with two conflicting Content-Length headers
    /gzip/<rest>           /img/<rest> gzip-encoded (Content-Encoding: gzip); decodes to the /img/ bytes
    /badgzip/<rest>        /img/<rest> as is, but labelled Content-Encoding: gzip
    /badchunk/<rest>       chunked transfer encoding: half of /img/<rest>, then a chunk size that is not hex
    /xrobots/<directive>/<rest>  /img/<rest> plus ``X-Robots-Tag: <percent-decoded directive>``
    /tdm/<value>/<rest>    /img/<rest> plus ``tdm-reservation: <percent-decoded value>`` (W3C TDMRep)

Hidden limits and the everyday fault background (``HostSpec``)::

    rate_limit / burst     token bucket; a refusal is ``refuse_status`` (429 or 503), with Retry-After
                           unless ``retry_after=False`` (nginx's bare refusal)
    max_connections        concurrent admitted requests; a refusal is ``connection_refuse_status`` (503 or
                           429), with ``Retry-After: 1`` unless ``connection_retry_after=False``
    background=FaultMix()  per-URL faults on plain image requests (/img/, /alias/, /truncated/, free-form
                           image paths), chosen by hashing (farm seed, path): a permanent 404, or a one-off
                           500 / reset (like /reset/) / stall (like /stall/, for ``stall_seconds``, then a
                           hang-up) on the URL's first admitted request only; ``ImageFarm.expected_outcome``
                           tells which, without a running server

Revisions (monthly snapshot tests): plain image responses (``/img/``, ``/alias/``, free-form paths)
carry ``ETag`` and ``Last-Modified`` and answer a conditional GET whose validator still holds
(``If-None-Match``, or ``If-Modified-Since`` without it) with ``304 Not Modified``.
``ImageFarm.change_image(path)`` gives a path new bytes and new validators on every host;
``ImageFarm.remove_image(path, status)`` makes it answer 404 (or 410) from then on.

Every host keeps a request log (``ImageFarm.request_log``): one ``LogEntry(start, end, status, path,
user_agent)`` per request, so benches measure at the server (``max_requests_in_window``,
``max_concurrency``, ``refusal_share``).

``SilentHost`` is a loopback listener that never answers (accepts and stays silent, or never
accepts at all), and ``closed_port`` finds a port with nothing listening: a dead host.

Run ``python -m distributed_downloader.demo.testserver --hosts 3 --seed 0`` to serve until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import functools
import gzip
import hashlib
import io
import ipaddress
import itertools
import json
import math
import select
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

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
MAX_BIG_MB = 100.0  # /big/ and /gzbomb/ bodies
MAX_REDIRECT_HOPS = 100  # /redirect/<n>/ and /loop/<k>
TRICKLE_SECONDS = 0.5  # /trickle/ and /slowheaders/: one byte per this many seconds
BOMB_SIDE = 30_000  # /bomb.png declares BOMB_SIDE x BOMB_SIDE pixels
_STREAM_CHUNK = 64 * 1024
_MB = 1_000_000
_TEXT = "text/plain; charset=utf-8"
_HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Not an image</title></head><body>Sorry.</body></html>\n"
_NO_BODY_STATUSES = frozenset({204, 304})


# --------------------------------------------------------------------------- specs and stats


# Outcomes of a plain image URL under a host's fault background (``ImageFarm.expected_outcome``).
OUTCOME_OK = "ok"  # served
OUTCOME_MISSING = "missing"  # 404 on every request: never retrievable
OUTCOME_ERROR500 = "error500"  # 500 on the URL's first admitted request, then served
OUTCOME_RESET = "reset"  # headers + half the body then a TCP reset on the first admitted request, then served
OUTCOME_STALL = "stall"  # headers + half the body, silence for stall_seconds, hang-up; then served
OUTCOMES = (OUTCOME_OK, OUTCOME_MISSING, OUTCOME_ERROR500, OUTCOME_RESET, OUTCOME_STALL)
RETRIEVABLE_OUTCOMES = frozenset(OUTCOMES) - {OUTCOME_MISSING}
DEFAULT_STALL_SECONDS = 30.0  # longer than the downloader's default read timeout (20 s) and img2dataset's (10 s)


@dataclass(frozen=True)
class FaultMix:
    """Shares of plain image URLs that fail in the everyday ways, each URL's fate fixed by (seed, path).

    ``missing``: a permanent 404. ``error500``, ``reset`` and ``stall``: one-off faults, on the first
    request of that URL which passes the host's limits only; every later request is served. A stall
    sends the headers and half the body, then nothing for ``stall_seconds`` (or until the client hangs
    up or the farm stops), then closes the connection.
    """

    missing: float = 0.0
    error500: float = 0.0
    reset: float = 0.0
    stall: float = 0.0
    stall_seconds: float = DEFAULT_STALL_SECONDS

    def __post_init__(self) -> None:
        shares = (self.missing, self.error500, self.reset, self.stall)
        if any(not 0.0 <= share <= 1.0 for share in shares) or sum(shares) > 1.0 + 1e-9:
            raise ValueError("FaultMix shares must each be within [0, 1] and sum to at most 1")
        if not (math.isfinite(self.stall_seconds) and self.stall_seconds >= 0):
            raise ValueError("stall_seconds must be finite and >= 0")

    @classmethod
    def everyday(cls, total: float, stall_seconds: float = DEFAULT_STALL_SECONDS) -> FaultMix:
        """``total`` split as real logs look: 40% 404s, 30% one-off 500s, 20% resets, 10% stalls."""
        return cls(total * 0.4, total * 0.3, total * 0.2, total * 0.1, stall_seconds)

    @property
    def total(self) -> float:
        return self.missing + self.error500 + self.reset + self.stall

    def outcome(self, seed: int, path: str) -> str:
        """The fate of ``path`` (its query string is ignored) on a farm of this ``seed``."""
        draw = _unit_float("background", seed, _split_target(path)[0])
        for name, share in (
            (OUTCOME_MISSING, self.missing),
            (OUTCOME_ERROR500, self.error500),
            (OUTCOME_RESET, self.reset),
            (OUTCOME_STALL, self.stall),
        ):
            if draw < share:
                return name
            draw -= share
        return OUTCOME_OK


_REFUSAL_STATUSES = (429, 503)


@dataclass
class HostSpec:
    """One logical host and its hidden behaviour."""

    name: str
    rate_limit: float | None = None  # token-bucket limit in req/s; over it -> refuse_status
    burst: float | None = None  # bucket capacity; default max(1, rate_limit)
    max_connections: int | None = None  # concurrent admitted requests; over it -> connection_refuse_status
    latency: float = 0.0  # seconds added before the headers of every admitted response
    advertise_limits: bool = False  # send RateLimit-Policy / X-RateLimit-* headers
    fault_rate: float = 0.0  # probability of a transient 500 on an image request (per attempt)
    robots_txt: str | None = None  # body of /robots.txt (404 if None)
    refuse_status: int = 429  # rate-limit refusal: 429 or 503
    retry_after: bool = True  # rate-limit refusals carry Retry-After (False: bare, like nginx's limit_req)
    connection_refuse_status: int = 503  # connection-cap refusal: 503 or 429
    connection_retry_after: bool = True  # connection-cap refusals carry Retry-After: 1
    background: FaultMix | None = None  # per-URL everyday faults on plain image requests
    robots_failures: int = 0  # the first N requests of robots.txt answer robots_failure_status
    robots_failure_status: int = 503
    robots_location: str | None = None  # /robots.txt answers 301 to this path, which serves robots_txt

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
        if self.refuse_status not in _REFUSAL_STATUSES or self.connection_refuse_status not in _REFUSAL_STATUSES:
            raise ValueError("refusal statuses must be 429 or 503")
        if self.robots_failures < 0:
            raise ValueError("robots_failures must be >= 0")
        if not 400 <= self.robots_failure_status <= 599:
            raise ValueError("robots_failure_status must be within 400..599")
        if self.robots_location is not None and (
            not self.robots_location.startswith("/") or self.robots_location == "/robots.txt"
        ):
            raise ValueError("robots_location must be a path other than /robots.txt")

    @property
    def bucket_capacity(self) -> float | None:
        """The token bucket's capacity (the burst), None without a rate limit."""
        if self.rate_limit is None:
            return None
        return self.burst if self.burst is not None else max(1.0, self.rate_limit)


class LogEntry(NamedTuple):
    """One request as the host saw it (times on the time.monotonic() scale)."""

    start: float  # the request's headers were read
    end: float  # the handler finished: response sent, connection reset or hung up
    status: int  # the status sent (0: none, e.g. the farm stopped first)
    path: str  # the request target as sent (query string included)
    user_agent: str
    connection: int = 0  # the TCP connection's serial number on its host, from 1 (keep-alive reuse)


@dataclass
class HostStats:
    """What one host saw. ``ImageFarm.stats`` returns a snapshot copy."""

    requests: int = 0  # every GET/HEAD, including 429 and 503 rejections
    by_status: dict[int, int] = field(default_factory=dict)
    request_times: list[float] = field(default_factory=list)  # time.monotonic() at arrival
    max_in_flight: int = 0  # peak of concurrently handled requests, rejected ones included
    user_agents: set[str] = field(default_factory=set)  # "" when the header was missing
    connections: int = 0  # TCP connections accepted (keep-alive reuse keeps this low)
    log_dropped: int = 0  # requests left out of the request log (over the farm's max_log_entries)

    def copy(self) -> HostStats:
        return HostStats(
            self.requests,
            dict(self.by_status),
            list(self.request_times),
            self.max_in_flight,
            set(self.user_agents),
            self.connections,
            self.log_dropped,
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


def max_concurrency(entries: Iterable[LogEntry]) -> int:
    """Most requests in flight at once: the peak overlap of the [start, end] intervals of a request log.

    Intervals touching at one instant count as overlapping (a conservative peak).
    """
    events = []
    for entry in entries:
        events.append((entry.start, 0))  # at equal times, arrivals sort before departures
        events.append((max(entry.end, entry.start), 1))
    events.sort()
    peak = current = 0
    for _, kind in events:
        current += 1 if kind == 0 else -1
        peak = max(peak, current)
    return peak


def refusal_share(entries: Sequence[LogEntry], statuses: Iterable[int] = _REFUSAL_STATUSES) -> float:
    """Share of the logged requests answered with one of ``statuses`` (429 and 503 by default)."""
    if not entries:
        return 0.0
    wanted = frozenset(statuses)
    return sum(1 for entry in entries if entry.status in wanted) / len(entries)


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


# Routes that wrap an image: /<kind>/[<arg>/]<rest> serves (a variant of) /img/<rest>. Value: takes an <arg>.
_WRAPPERS: dict[str, bool] = {
    "slow": True,
    "flaky": True,
    "redirect": True,
    "xrobots": True,
    "tdm": True,
    "reset": False,
    "stall": False,
    "trickle": False,
    "slowheaders": False,
    "badlength": False,
    "duplength": False,
    "gzip": False,
    "badgzip": False,
    "badchunk": False,
}
# Wrappers whose response, once complete and decoded, is exactly the /img/<rest> bytes.
_FAITHFUL = frozenset({"", "slow", "flaky", "redirect", "xrobots", "tdm", "trickle", "gzip"})
# Routes that name no image at all.
_SPECIAL_PREFIXES = ("/status/", "/html/", "/json/", "/big/", "/gzbomb/", "/loop/", "/redirect-to/")


def _unwrap(path: str) -> tuple[str, str, str]:
    """``/<kind>/[<arg>/]<rest>`` for a kind in ``_WRAPPERS`` -> (kind, arg, "/img/<rest>")."""
    kind, sep, remainder = path[1:].partition("/")
    if not sep or kind not in _WRAPPERS:
        return "", "", path
    arg = ""
    if _WRAPPERS[kind]:
        arg, _, remainder = remainder.partition("/")
    return kind, arg, "/img/" + remainder


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
    return path in ("/robots.txt", "/bomb.png") or path.startswith(_SPECIAL_PREFIXES)


def _body(seed: int, ref: _ImageRef) -> bytes:
    data = render_image(seed, ref.key, ref.ext, ref.width, ref.height, ref.mode)
    return data[: len(data) // 2] if ref.truncate else data


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header declares BOMB_SIDE x BOMB_SIDE RGB pixels."""
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    pixels = zlib.compress(b"\x00" * 64)  # the start of the first scanline; a decoder would want ~2.7 GB
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


@functools.lru_cache(maxsize=4)
def gzip_zeros(size: int) -> bytes:
    """``size`` zero bytes, gzip-compressed (deterministic: no timestamp)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 16+15: gzip container
    block = bytes(_STREAM_CHUNK)
    parts = [compressor.compress(block) for _ in range(size // _STREAM_CHUNK)]
    parts.append(compressor.compress(bytes(size % _STREAM_CHUNK)))
    parts.append(compressor.flush())
    return b"".join(parts)


_FILLER = bytes(range(256)) * (_STREAM_CHUNK // 256)  # /big/ bodies repeat this block


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


REVISION_EPOCH = 1_700_000_000  # Last-Modified of an image never changed; each change adds a day


class _Revisions:
    """Which image paths changed or were removed: shared by every host of a farm (query strings ignored)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.versions: dict[str, int] = {}
        self.removed: dict[str, int] = {}  # path -> the status it answers now

    def version(self, path: str) -> int:
        with self.lock:
            return self.versions.get(path, 0)

    def removed_status(self, path: str) -> int:
        with self.lock:
            return self.removed.get(path, 0)


def _versioned(ref: _ImageRef, version: int) -> _ImageRef:
    """The image a changed path serves now: another key, so other bytes."""
    return (
        ref
        if not version
        else _ImageRef(f"{ref.key}#v{version}", ref.ext, ref.width, ref.height, ref.mode, ref.truncate)
    )


def validators(seed: int, ref: _ImageRef, version: int) -> dict[str, str]:
    """``ETag`` (strong, from the image's inputs) and ``Last-Modified`` of a plain image response."""
    tag = _digest("etag", seed, ref.key, ref.ext, ref.width, ref.height, ref.mode, version).hex()[:20]
    modified = email.utils.formatdate(REVISION_EPOCH + version * 86_400, usegmt=True)
    return {"ETag": f'"{tag}"', "Last-Modified": modified}


def not_modified(request_headers: object, current: dict[str, str]) -> bool:
    """RFC 9110 §13.2.2: If-None-Match decides when present (weak comparison), else If-Modified-Since."""
    get = request_headers.get  # type: ignore[attr-defined]
    match = get("If-None-Match")
    if match is not None:
        tags = [tag.strip().removeprefix("W/") for tag in match.split(",")]
        return "*" in tags or current["ETag"] in tags
    since = get("If-Modified-Since")
    if since is None:
        return False
    try:
        asked = email.utils.parsedate_to_datetime(since).timestamp()
        modified = email.utils.parsedate_to_datetime(current["Last-Modified"]).timestamp()
    except (TypeError, ValueError):
        return False  # an unparsable date is ignored (RFC 9110 §13.1.3)
    return modified <= asked


class _Host:
    """Bookkeeping shared by the handler threads of one host. All mutation under ``lock``."""

    def __init__(
        self,
        index: int,
        spec: HostSpec,
        seed: int,
        max_log_entries: int = 1_000_000,
        revisions: _Revisions | None = None,
    ) -> None:
        self.revisions = revisions or _Revisions()
        self.index = index
        self.spec = spec
        self.seed = seed
        self.lock = threading.Lock()
        self.stats = HostStats()
        self.log: list[LogEntry] = []
        self.max_log_entries = max_log_entries
        self.in_flight = 0  # every request being handled, for stats
        self.admitted = 0  # requests past the limits, for max_connections
        self.hits: dict[tuple[str, str], int] = {}  # (purpose, path) -> requests so far
        self.robots_failures_left = spec.robots_failures
        self.bucket: _TokenBucket | None = None
        if spec.rate_limit is not None and spec.bucket_capacity is not None:
            self.bucket = _TokenBucket(spec.rate_limit, spec.bucket_capacity)

    def connected(self) -> int:
        """Count a TCP connection in; its serial number on this host."""
        with self.lock:
            self.stats.connections += 1
            return self.stats.connections

    def arrive(self, user_agent: str) -> float:
        """Count a request in; its arrival time (time.monotonic())."""
        with self.lock:
            stats = self.stats
            stats.requests += 1
            now = time.monotonic()  # taken under the lock so the list stays sorted
            stats.request_times.append(now)
            stats.user_agents.add(user_agent)
            self.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, self.in_flight)
            return now

    def leave(self, start: float, status: int, path: str, user_agent: str, connection: int = 0) -> None:
        with self.lock:
            self.in_flight -= 1
            if len(self.log) < self.max_log_entries:
                entry = LogEntry(start, time.monotonic(), status, path, sys.intern(user_agent), connection)
                self.log.append(entry)
            else:
                self.stats.log_dropped += 1

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

    def robots_fails(self) -> bool:
        """Whether this robots.txt request gets the failure status (counts one failure down)."""
        with self.lock:
            if self.robots_failures_left <= 0:
                return False
            self.robots_failures_left -= 1
            return True

    def set_robots_failures(self, count: int) -> None:
        with self.lock:
            self.robots_failures_left = count

    def is_robots_path(self, path: str) -> bool:
        return path == "/robots.txt" or (self.spec.robots_location is not None and path == self.spec.robots_location)

    def should_fault(self, target: str) -> bool:
        if self.spec.fault_rate <= 0:
            return False
        attempt = self.count_hit("fault", target)
        return _unit_float("fault", self.seed, target, attempt) < self.spec.fault_rate

    def outcome(self, path: str) -> str:
        """This URL's fate under the host's fault background (OUTCOME_OK without one)."""
        mix = self.spec.background
        return OUTCOME_OK if mix is None else mix.outcome(self.seed, path)

    def background_fault(self, path: str) -> str | None:
        """The background fault to play for this admitted request of ``path``, or None to serve it."""
        outcome = self.outcome(path)
        if outcome == OUTCOME_OK:
            return None
        if outcome == OUTCOME_MISSING:
            return outcome
        return outcome if self.count_hit("background", _split_target(path)[0]) == 1 else None

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

    def request_log(self) -> list[LogEntry]:
        with self.lock:
            return list(self.log)

    def reset(self) -> None:
        with self.lock:
            self.stats = HostStats(max_in_flight=self.in_flight)
            self.log = []


# --------------------------------------------------------------------------- HTTP


_connection = threading.local()  # .serial: the connection the current handler thread serves


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
        self._sent_status = 0
        host = self.server.host
        user_agent = self.headers.get("User-Agent", "")
        start = host.arrive(user_agent)
        try:
            self._admit_and_route(host)
        finally:
            host.leave(start, self._sent_status, self.path, user_agent, getattr(_connection, "serial", 0))

    def _record(self, status: int) -> None:
        """The response's status, for the stats and the request log (the first one sent wins)."""
        if not self._sent_status:
            self._sent_status = status
        self.server.host.record_status(status)

    def _admit_and_route(self, host: _Host) -> None:
        path, params = _split_target(self.path)
        spec = host.spec
        if not host.is_robots_path(path):  # crawlers must be able to read the rules without paying for it
            allowed, value = host.take_token()
            if not allowed:
                self._remaining = 0
                headers = {"Retry-After": str(max(1, math.ceil(value)))} if spec.retry_after else {}
                self._reply(spec.refuse_status, b"rate limited\n", _TEXT, headers)
                return
            self._remaining = value if host.bucket is not None else None
        if not host.try_admit():
            headers = {"Retry-After": "1"} if spec.connection_retry_after else {}
            self._reply(spec.connection_refuse_status, b"too many connections\n", _TEXT, headers)
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
        if host.is_robots_path(path):
            self._robots(host, path)
        elif path.startswith("/status/"):
            self._status(path[len("/status/") :])
        elif path.startswith("/reply/"):
            self._reply_with_header(path[len("/reply/") :], params)
        elif path.startswith("/html/"):
            self._reply(200, _HTML_PAGE, "image/jpeg")  # deliberately lies
        elif path.startswith("/json/"):
            document = json.dumps({"error": "not an image", "path": path}).encode()
            self._reply(200, document, "image/jpeg")  # lies too
        elif path == "/bomb.png":
            self._reply(200, bomb_png(), "image/png")
        elif path.startswith("/big/"):
            self._big(path[len("/big/") :], params)
        elif path.startswith("/gzbomb/"):
            size = int(_parse_megabytes(path[len("/gzbomb/") :]) * _MB)
            self._reply(200, gzip_zeros(size), "image/jpeg", {"Content-Encoding": "gzip"})
        elif path.startswith("/loop/"):
            self._loop(path[len("/loop/") :])
        elif path.startswith("/redirect-to/"):
            self._redirect(unquote(path[len("/redirect-to/") :]))
        else:
            self._image_route(host, path, params)

    def _robots(self, host: _Host, path: str) -> None:
        spec = host.spec
        if path == "/robots.txt" and host.robots_fails():
            status = spec.robots_failure_status
            self._reply(status, f"robots.txt unavailable ({status})\n".encode(), _TEXT)
        elif path == "/robots.txt" and spec.robots_location is not None:
            self._reply(301, b"moved\n", _TEXT, {"Location": spec.robots_location})
        elif spec.robots_txt is None:
            self._reply(404, b"no robots.txt\n", _TEXT)
        else:
            self._reply(200, spec.robots_txt.encode(), _TEXT)

    def _status(self, code_text: str) -> None:
        try:
            code = int(code_text.strip("/"))
        except ValueError:
            raise _BadRequest("status code must be an integer") from None
        if not 200 <= code <= 599:
            raise _BadRequest("status code must be within 200..599")
        headers = {"Retry-After": "1"} if code in (429, 503) else {}
        self._reply(code, f"status {code}\n".encode(), _TEXT, headers)

    def _reply_with_header(self, code_text: str, params: dict[str, str]) -> None:
        """/reply/<code>?h=<name>&v=<value>: that status with one header exactly as spelled.

        ``v=date+N`` sends an HTTP date N seconds from now (Retry-After as a date).
        """
        try:
            code = int(code_text.strip("/"))
        except ValueError:
            raise _BadRequest("status code must be an integer") from None
        if not 200 <= code <= 599:
            raise _BadRequest("status code must be within 200..599")
        name, value = params.get("h", ""), params.get("v", "")
        if value.startswith("date+"):
            value = email.utils.formatdate(time.time() + _parse_seconds(value[len("date+") :]), usegmt=True)
        headers = {_header_value(name): _header_value(value)} if name else {}
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
            retry_after = str(_parse_count(params.get("ra", "1"), 600))  # ?ra=N: another Retry-After
            self._reply(503, b"try again later\n", _TEXT, {"Retry-After": retry_after})
            return
        if kind == "redirect":
            hops = _parse_count(arg, MAX_REDIRECT_HOPS)
            if hops:
                query = urlsplit(self.path).query
                target = inner if hops == 1 else f"/redirect/{hops - 1}/{inner[len('/img/') :]}"
                self._redirect(target + (f"?{query}" if query else ""))
                return
        if host.should_fault(self.path):
            self._reply(500, b"transient fault\n", _TEXT)
            return
        plain = kind == "" and not ref.truncate  # the plain image routes carry validators
        version, headers = 0, {}
        if plain:
            gone = host.revisions.removed_status(path)
            if gone:
                self._reply(gone, b"gone\n", _TEXT)
                return
            version = host.revisions.version(path)
            ref = _versioned(ref, version)
            headers = validators(host.seed, ref, version)
        body, content_type = _body(host.seed, ref), CONTENT_TYPES[ref.ext]
        fault = host.background_fault(path) if kind == "" else None
        if fault == OUTCOME_MISSING:
            self._reply(404, b"not found\n", _TEXT)
            return
        if fault == OUTCOME_ERROR500:
            self._reply(500, b"internal server error\n", _TEXT)
            return
        if fault in (OUTCOME_RESET, OUTCOME_STALL):
            assert host.spec.background is not None
            self._half_then(body, content_type, reset=fault == OUTCOME_RESET, stall=host.spec.background.stall_seconds)
            return
        if kind in ("reset", "stall"):
            self._half_then(body, content_type, reset=kind == "reset")
        elif kind == "trickle":
            self._trickle(body, content_type)
        elif kind == "slowheaders":
            self._slow_headers()
        elif kind == "badlength":  # promise more than we send, then hang up
            self.close_connection = True
            self._reply(200, body, content_type, declared_length=len(body) + max(1, len(body) // 2))
        elif kind == "duplength":
            self.close_connection = True
            self._reply(200, body, content_type, {"Content-Length": str(len(body) + 10)})
        elif kind == "gzip":
            self._reply(200, gzip.compress(body, mtime=0), content_type, {"Content-Encoding": "gzip"})
        elif kind == "badchunk":  # a proper first chunk, then a chunk-size line that is not hex
            self._start(200, content_type, None, {"Transfer-Encoding": "chunked"})
            self.close_connection = True
            if not self._head:
                half = body[: len(body) // 2]
                self.wfile.write(b"%x\r\n%s\r\nnot-a-size\r\n" % (len(half), half))
        elif kind == "badgzip":
            self._reply(200, body, content_type, {"Content-Encoding": "gzip"})
        elif kind == "xrobots":
            self._reply(200, body, content_type, {"X-Robots-Tag": _header_value(unquote(arg))})
        elif kind == "tdm":
            self._reply(200, body, content_type, {"tdm-reservation": _header_value(unquote(arg))})
        elif plain and not_modified(self.headers, headers):
            self._reply(304, b"", content_type, headers)
        else:
            self._reply(200, body, content_type, headers)

    # ------------------------------------------------------------------ hostile behaviours

    def _redirect(self, location: str) -> None:
        self._reply(302, b"redirecting\n", _TEXT, {"Location": _header_value(location)})

    def _loop(self, rest: str) -> None:
        size_text, _, index_text = rest.partition("/")
        size = _parse_count(size_text, MAX_REDIRECT_HOPS)
        index = _parse_count(index_text) if index_text else 0
        if size < 1 or index >= size:
            raise _BadRequest("/loop/<k>[/<i>] needs 1 <= k and i < k")
        following = (index + 1) % size
        self._redirect(f"/loop/{size}" + (f"/{following}" if following else ""))

    def _half_then(self, body: bytes, content_type: str, reset: bool, stall: float | None = None) -> None:
        """Headers for the whole body, half of it, then a TCP reset or silence.

        The silence lasts until the farm stops, or with ``stall`` seconds given, until then, the
        client hangs up or the farm stops, whichever is first; then the connection is closed.
        """
        self._start(200, content_type, len(body))
        self.close_connection = True
        if self._head:
            return
        self.wfile.write(body[: len(body) // 2])
        if not reset:
            if stall is None:
                self.server.stopping.wait()
            else:
                self.wfile.flush()
                self._silence(stall)
            return
        self.server.stopping.wait(0.05)  # let the half body leave: an abortive close drops unsent data
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()  # the reader holds a reference; close() must release the descriptor now
            sock.close()  # with SO_LINGER 0: RST instead of FIN

    def _silence(self, seconds: float) -> None:
        """Send nothing for ``seconds``, ending early when the client hangs up or the farm stops."""
        deadline = time.monotonic() + seconds
        sock = self.connection
        while not self.server.stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                readable, _, _ = select.select([sock], [], [], min(0.1, remaining))
                if readable and not sock.recv(1, socket.MSG_PEEK):
                    return  # EOF: the client gave up (a server notices a closed connection too)
            except (OSError, ValueError):
                return  # reset by the client, or the farm closed the socket

    def _trickle(self, body: bytes, content_type: str) -> None:
        self._start(200, content_type, len(body))
        if self._head:
            return
        for offset in range(len(body)):
            if offset and self.server.stopping.wait(TRICKLE_SECONDS):
                self.close_connection = True
                return
            self.wfile.write(body[offset : offset + 1])  # raises once the client has hung up

    def _slow_headers(self) -> None:
        """A status line, then a header that never ends (1 byte per TRICKLE_SECONDS) until stop or hang-up."""
        self.close_connection = True
        self._record(200)
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Slowloris: ")
        for _ in range(1_000_000):
            if self.server.stopping.wait(TRICKLE_SECONDS):
                return
            self.wfile.write(b"z")

    def _big(self, size_text: str, params: dict[str, str]) -> None:
        """A large body, streamed from one small buffer; ?chunked=1 sends no Content-Length."""
        size = int(_parse_megabytes(size_text) * _MB)
        chunked = params.get("chunked", "") not in ("", "0")
        framing = {"Transfer-Encoding": "chunked"} if chunked else None
        self._start(200, "image/jpeg", None if chunked else size, framing)
        if self._head:
            return
        sent = 0
        while sent < size:
            if self.server.stopping.is_set():
                self.close_connection = True
                return
            piece = _FILLER[: min(_STREAM_CHUNK, size - sent)]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    # ------------------------------------------------------------------ writing

    def _start(self, status: int, content_type: str, length: int | None, headers: dict[str, str] | None = None) -> None:
        """Status line and headers; ``length`` None sends no Content-Length (the caller frames the body)."""
        host = self.server.host
        self._record(status)
        self.send_response(status)
        if status not in _NO_BODY_STATUSES:
            self.send_header("Content-Type", content_type)
            if length is not None:
                self.send_header("Content-Length", str(length))
        for name, value in {**(headers or {}), **host.limit_headers(self._remaining)}.items():
            self.send_header(name, value)
        self.send_header("Connection", "close" if self.close_connection else "keep-alive")
        self.end_headers()

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        declared_length: int | None = None,
    ) -> None:
        if status in _NO_BODY_STATUSES:
            body = b""
        self._start(status, content_type, len(body) if declared_length is None else declared_length, headers)
        if body and not self._head:
            self.wfile.write(body)


def _header_value(text: str) -> str:
    """A header value from a URL part: printable ASCII only (no header injection, nothing latin-1 cannot carry)."""
    if not text or not all(" " <= c <= "~" for c in text):
        raise _BadRequest("header values must be non-empty printable ASCII")
    return text


def _parse_megabytes(text: str) -> float:
    try:
        size = float(text.strip("/"))
    except ValueError:
        raise _BadRequest("size must be a number of megabytes") from None
    if not math.isfinite(size) or size < 0:
        raise _BadRequest("size must be finite and >= 0")
    return min(size, MAX_BIG_MB)


def _parse_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise _BadRequest("seconds must be a number") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise _BadRequest("seconds must be finite and >= 0")
    return min(seconds, MAX_SLOW_SECONDS)


def _parse_count(text: str, limit: int | None = None) -> int:
    try:
        count = int(text)
    except ValueError:
        raise _BadRequest("count must be an integer") from None
    if count < 0:
        raise _BadRequest("count must be >= 0")
    if limit is not None and count > limit:
        raise _BadRequest(f"count must be <= {limit}")
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
        _connection.serial = self.host.connected()  # this thread serves that one connection
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

    def __init__(
        self,
        hosts: list[HostSpec] | int = 3,
        seed: int = 0,
        first_address: int = 2,
        max_log_entries: int = 1_000_000,
        addresses: Sequence[str] | None = None,
    ) -> None:
        """``addresses``: one loopback address per host (default: consecutive from 127.0.0.``first_address``)."""
        specs = [HostSpec(f"h{i + 1}") for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        if not specs:
            raise ValueError("an ImageFarm needs at least one host")
        if addresses is None:
            first = int(ipaddress.IPv4Address("127.0.0.0")) + first_address
            if first_address < 1 or first + len(specs) - 1 > int(ipaddress.IPv4Address("127.255.255.254")):
                raise ValueError("host addresses must stay inside 127.0.0.1-127.255.255.254")
            addresses = [str(ipaddress.IPv4Address(first + i)) for i in range(len(specs))]
        if len(addresses) != len(specs) or not all(ipaddress.IPv4Address(a).is_loopback for a in addresses):
            raise ValueError("an ImageFarm needs one loopback address per host")
        self.specs = specs
        self.seed = seed
        self.addresses = list(addresses)
        self.base_urls: list[str] = []
        # Bookkeeping outlives start/stop so stats can be read after the farm stopped.
        self._revisions = _Revisions()
        self._hosts = [_Host(i, spec, seed, max_log_entries, self._revisions) for i, spec in enumerate(specs)]
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
        """The exact body a client ends up with for an image path (query string allowed; full URLs too).

        /redirect/, /xrobots/, /tdm/, /trickle/ and /gzip/ (once decoded) give the /img/ bytes; routes that
        never deliver a whole image (/reset/, /stall/, /badlength/, /status/, /big/...) raise ValueError.
        """
        path_only, params = _split_target(path)
        kind, _, inner = _unwrap(path_only)
        ref = None if _is_special(path_only) or kind not in _FAITHFUL else _resolve_image(inner, params)
        if ref is None:
            raise ValueError(f"{path!r} does not name an image (or never serves one whole)")
        if not kind and not ref.truncate:
            ref = _versioned(ref, self._revisions.version(path_only))
        return _body(self.seed, ref)

    def change_image(self, path: str) -> None:
        """From now on the image path (query ignored) serves other bytes, with a new ETag and a later
        Last-Modified, on every host."""
        key = _split_target(path)[0]
        with self._revisions.lock:
            self._revisions.versions[key] = self._revisions.versions.get(key, 0) + 1

    def remove_image(self, path: str, status: int = 404) -> None:
        """From now on the image path (query ignored) answers ``status`` (404 or 410) on every host."""
        if status not in (404, 410):
            raise ValueError("a removed image answers 404 or 410")
        with self._revisions.lock:
            self._revisions.removed[_split_target(path)[0]] = status

    def expected_outcome(self, host_index: int, path: str) -> str:
        """What a plain image path meets on this host under its fault background (no server needed).

        One of OUTCOMES: ``ok``; ``missing`` (404 on every request); ``error500``, ``reset`` or
        ``stall`` on the URL's first admitted request, served after that. The query string is
        ignored. Routes the background does not touch (wrappers such as /slow/, /status/, /bomb.png)
        are ``ok`` here whatever they serve.
        """
        path_only = _split_target(path)[0]
        if _is_special(path_only) or _unwrap(path_only)[0]:
            return OUTCOME_OK
        return self._hosts[host_index].outcome(path_only)

    def stats(self, host_index: int) -> HostStats:
        return self._hosts[host_index].snapshot()

    def request_log(self, host_index: int) -> list[LogEntry]:
        """Every request this host saw since the start or the last ``reset_stats``, in finishing order."""
        return self._hosts[host_index].request_log()

    def set_robots_failures(self, host_index: int, count: int) -> None:
        """From now on, the next ``count`` robots.txt requests of this host fail (0: robots.txt answers again)."""
        if count < 0:
            raise ValueError("count must be >= 0")
        self._hosts[host_index].set_robots_failures(count)

    def reset_stats(self) -> None:
        """Clear every host's stats and request log; /flaky/, fault and background counters keep counting."""
        for host in self._hosts:
            host.reset()


# --------------------------------------------------------------------------- hosts that never answer


def closed_port(address: str = "127.0.0.1") -> int:
    """A port on ``address`` with nothing listening (connections are refused): a dead host.

    The OS picks a free port and we release it; nothing else on this machine is expected to grab it
    in the meantime (ephemeral ports are handed out in sequence, not reused at once).
    """
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


class SilentHost:
    """A loopback TCP listener that never sends a byte: a blackholed server.

    ``mode="accept"``: connections are accepted and then ignored, so a client times out waiting
    for the response (read timeout). ``mode="backlog"``: nothing is ever accepted and the tiny
    backlog is filled by our own idle connections, so the kernel drops new SYNs and a client
    times out connecting (connect timeout; Linux drops SYNs to a listener whose accept queue is full).
    Use ``with SilentHost() as silent: silent.url("/a.jpg")``.
    """

    def __init__(self, address: str = "127.0.0.1", mode: str = "accept") -> None:
        if mode not in ("accept", "backlog"):
            raise ValueError("mode must be 'accept' or 'backlog'")
        self.address = address
        self.mode = mode
        self.port = 0
        self._listener: socket.socket | None = None
        self._held: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SilentHost:
        listener = socket.socket()
        listener.bind((self.address, 0))
        listener.listen(0 if self.mode == "backlog" else 64)
        self._listener, self.port = listener, listener.getsockname()[1]
        if self.mode == "backlog":
            for _ in range(3):  # the accept queue holds backlog + 1; one more SYN stays pending forever
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex((self.address, self.port))
                self._held.append(filler)
        else:
            listener.settimeout(0.1)
            self._thread = threading.Thread(target=self._accept_forever, name="silent-host", daemon=True)
            self._thread.start()
        return self

    def _accept_forever(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(connection)  # kept open, never read, never answered

    def url(self, path: str = "/") -> str:
        return f"http://{self.address}:{self.port}" + (path if path.startswith("/") else "/" + path)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        for sock in [*self._held, *([self._listener] if self._listener else [])]:
            sock.close()
        self._held, self._listener = [], None

    def __enter__(self) -> SilentHost:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distributed_downloader.demo.testserver",
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
