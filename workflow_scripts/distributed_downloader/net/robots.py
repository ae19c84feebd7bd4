"""robots.txt by RFC 9309: matching, fetching and a per-server cache shared by every lane.

Matching (``RobotsRules``). Group selection is ours, path matching is Protego's (the parser
Scrapy uses), on the group we selected:

- Groups: consecutive ``User-agent`` lines start a group, its rules follow; a ``User-agent`` line
  after a rule starts the next one. Rules before any group are ignored; blank lines and records
  that are not part of the protocol (Sitemap, unknown lines) do not end a group (RFC 9309 §2.2.4:
  other records MUST NOT interfere). The value of a ``User-agent`` line is read up to its first
  character outside ``A-Za-z0-9_-`` (``Googlebot/2.1`` is ``googlebot``, as Google reads it) and
  compared case-insensitively and *exactly* with our product token (the first word of
  ``user_agent``). Every group naming us is merged; if none does, every ``*`` group is; if there is
  neither, no rules apply.
- Paths (Protego): ``*`` and a trailing ``$``, the longest match wins, ``Allow`` wins a tie,
  percent-encoding normalised on both sides (``%62`` equals ``b``, ``ツ`` equals ``%E3%83%84``,
  ``%2F`` stays distinct from ``/``), ``/index.html`` allowed means its directory is too.
- ``/robots.txt`` is always allowed. ``Crawl-delay`` and ``Request-rate`` of the selected groups
  give ``request_rate()``: the strictest of them.

Why not Protego alone: its group selection is a substring test (``User-agent: distributed`` would
apply to ``distributed-downloader``, ``User-agent: foobot/1.0`` to nobody), an unknown line ends
a group, and of several groups with Crawl-delay it keeps the last. The conformance table in
tests/unit/test_robots.py shows the figures.

Fetching (``fetch_robots``), RFC 9309 §2.3: up to 5 redirects; 2xx = rules (the first 500 KiB are
parsed, a longer file is cut at its last whole line, never discarded; ``X-Robots-Tag`` on robots.txt
is ignored: it is not an image); 4xx (401 and 403 included), too many redirects = no rules;
429 = rate limited (back off, retry later); 5xx, a network failure or a timeout = unavailable:
disallow everything *for now*, a transient state that is fetched again after a few minutes.

Caching (``RobotsCache``): one ``<server>.txt`` (the body) and ``<server>.json`` (status, times)
per server under one folder, shared by the ranks; fetched on first need and again when older than
24 hours. A failed refresh keeps the last good copy (RFC 9309 §2.4 allows a cached copy beyond 24
hours while robots.txt is unreachable) for at most 30 days, and is retried after a few minutes.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
from protego import Protego

from distributed_downloader.errors import DownloadError, ErrorCode
from distributed_downloader.net.fetch import REDIRECT_STATUSES, HopGate, HttpStatusError, ServerFetcher
from distributed_downloader.store.files import atomic_write_json, atomic_write_text

try:  # advisory locks between the ranks of one node (and between nodes where the filesystem has them)
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

PARSE_LIMIT = 500 * 1024  # RFC 9309 §2.5: parse at least the first 500 KiB
MAX_REDIRECTS = 5  # RFC 9309 §2.3.1.2: follow at least five consecutive redirects
MAX_AGE = 24 * 3600.0  # RFC 9309 §2.4: a cached copy is used for at most 24 hours...
STALE_LIMIT = 30 * 24 * 3600.0  # ...unless robots.txt is unreachable meanwhile (RFC's example: 30 days)
UNAVAILABLE_RETRY = 600.0  # a 5xx / unreachable robots.txt is fetched again after this long
RATE_LIMITED_RETRY = 60.0  # a 429 without Retry-After is fetched again after this long
MAX_RETRY_AFTER = 600.0  # never trust a longer Retry-After on robots.txt
MAX_STEM = 200  # longest server name used as is in the cache's file names
MEMORY_ENTRIES = 256  # servers whose parsed rules a cache keeps in memory (the disk keeps every one)
ROBOTS_PATH = "/robots.txt"
_CHUNK = 64 * 1024


class RobotsStatus(str, Enum):
    """What fetching a server's robots.txt found (the value is what tables and sidecars store)."""

    RULES = "rules"  # 2xx: obey its rules
    NO_RULES = "no_rules"  # 4xx, absent, too many redirects: no rules apply
    UNAVAILABLE = "unavailable"  # 5xx or unreachable: disallow everything for now (transient)
    RATE_LIMITED = "rate_limited"  # 429: back off, fetch it again later; disallow meanwhile

    @property
    def transient(self) -> bool:
        """Whether this state forbids downloading for now, without any permanent verdict."""
        return self in (RobotsStatus.UNAVAILABLE, RobotsStatus.RATE_LIMITED)


# ---------------------------------------------------------------- matching

# Field names as written in the wild (case-insensitive, spaces collapsed), as Protego reads them.
_UA, _ALLOW, _DISALLOW, _DELAY, _RATE, _OTHER = "user-agent", "allow", "disallow", "crawl-delay", "request-rate", ""
_FIELDS = {
    "user-agent": _UA,
    "useragent": _UA,
    "user agent": _UA,
    "allow": _ALLOW,
    "disallow": _DISALLOW,
    "dissallow": _DISALLOW,
    "dissalow": _DISALLOW,
    "disalow": _DISALLOW,
    "diasllow": _DISALLOW,
    "disallaw": _DISALLOW,
    "crawl-delay": _DELAY,
    "crawl delay": _DELAY,
    "crawldelay": _DELAY,
    "request-rate": _RATE,
    "request rate": _RATE,
    "requestrate": _RATE,
}
_PRODUCT = re.compile(r"[A-Za-z0-9_-]*")
_RATE_VALUE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*([smhd]?)\b", re.IGNORECASE)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BOM = "\ufeff"


def product_token(value: str) -> str:
    """The product token of a User-agent value or of our user_agent: up to the first other character."""
    match = _PRODUCT.match(value.strip())
    return match.group(0).lower() if match else ""


def _directive(line: str) -> tuple[str, str] | None:
    """(field, value) of one line, field one of the _FIELDS values or _OTHER; None for a blank line."""
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    if ":" in line:
        name, value = line.split(":", 1)
        field = _FIELDS.get(" ".join(name.lower().split()))
        if field:
            return field, value.strip()
    # No colon, or a value that holds one ("Disallow /a:b"): "<field> <value>", as Google accepts.
    words = line.split()
    for count in (2, 1):
        field = _FIELDS.get(" ".join(words[:count]).lower())
        if field and len(words) > count - 1:
            return field, " ".join(words[count:]).lstrip(":").strip()
    return _OTHER, ""


@dataclass
class _Group:
    agents: list[str]
    rules: list[tuple[str, str]]


def _groups(text: str) -> Iterator[_Group]:
    current: _Group | None = None
    for line in text.splitlines():
        parsed = _directive(line)
        if parsed is None or parsed[0] == _OTHER:
            continue  # blank lines and other records never end a group
        field, value = parsed
        if field == _UA:
            if current is None or current.rules:
                if current is not None:
                    yield current
                current = _Group([], [])
            current.agents.append(value)
        elif current is not None:  # a rule outside any group is ignored
            current.rules.append((field, value))
    if current is not None:
        yield current


def _is_star(agent: str) -> bool:
    return agent == "*" or (agent.startswith("*") and agent[1:2].isspace())


def _crawl_delay(value: str) -> float | None:
    try:
        delay = float(value)
    except ValueError:
        return None
    return delay if math.isfinite(delay) and delay > 0 else None


def _request_rate(value: str) -> float | None:
    """Requests/second of a Request-rate value: ``1/5``, ``10/1m``, ``1/10s 0600-0845`` (window ignored)."""
    match = _RATE_VALUE.match(value)
    if not match:
        return None
    requests_, seconds = float(match.group(1)), float(match.group(2)) * _UNIT_SECONDS[match.group(3).lower()]
    if requests_ <= 0 or seconds <= 0:
        return None
    return requests_ / seconds


def request_target(url: str) -> str:
    """Path and query of a URL (what rules match), without ever raising: '/' when there is none."""
    url = url.split("#", 1)[0]
    scheme_end = url.find("://")
    if scheme_end > 0 and url[:scheme_end].replace("+", "").replace("-", "").replace(".", "").isalnum():
        authority_start = scheme_end + 3
    elif url.startswith("//"):  # a network-path reference
        authority_start = 2
    else:
        authority_start = -1
    if authority_start >= 0:
        rest = url[authority_start:]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=-1)
        url = rest[cut:] if cut >= 0 else "/"
    if not url.startswith("/"):
        url = "/" + url
    return url


class RobotsRules:
    """The robots.txt rules that apply to one product token."""

    def __init__(self, text: str | None, token: str) -> None:
        self.token = product_token(token) or "*"
        self._matcher: Protego | None = None
        self._delay: float | None = None
        self._rate: float | None = None
        self.has_rules = False
        if text:
            self._build(text)

    @classmethod
    def parse(cls, text: str | None, token: str) -> RobotsRules:
        """Rules of ``text`` (None or '' = no rules) for ``token``; only the first 500 KiB count."""
        if text and len(text) > PARSE_LIMIT // 4:  # cheap test first: a char is at most 4 bytes
            text = truncate_text(text)
        return cls(text, token)

    def _build(self, text: str) -> None:
        text = text.removeprefix(_BOM)
        groups = list(_groups(text))
        chosen = [g for g in groups if any(product_token(a) == self.token for a in g.agents)]
        if not chosen:
            chosen = [g for g in groups if any(_is_star(a) for a in g.agents)]
        lines = ["User-agent: *"]
        delays: list[float] = []
        rates: list[float] = []
        for group in chosen:
            for field, value in group.rules:
                if field in (_ALLOW, _DISALLOW) and value:
                    lines.append(f"{field}: {value}")
                elif field == _DELAY and (delay := _crawl_delay(value)) is not None:
                    delays.append(delay)
                elif field == _RATE and (rate := _request_rate(value)) is not None:
                    rates.append(rate)
        self.has_rules = len(lines) > 1
        if self.has_rules:
            self._matcher = Protego.parse("\n".join(lines))
        self._delay = max(delays) if delays else None
        candidates = rates + [1.0 / d for d in delays]
        self._rate = min(candidates) if candidates else None

    @property
    def empty(self) -> bool:
        """No rule and no rate limit applies to us: everything is allowed, at any pace."""
        return not self.has_rules and self._rate is None

    def allowed(self, url: str) -> bool:
        """Whether our token may fetch ``url`` (any host: only its path and query count). Never raises.

        Should the matcher ever fail on a URL, the answer is "disallowed" when rules exist (the
        safe side; the caller records it like any disallowed URL) and "allowed" when none do.
        """
        target = request_target(url)
        if target.split("?", 1)[0] == ROBOTS_PATH:
            return True
        if self._matcher is None:
            return True
        try:
            return bool(self._matcher.can_fetch("http://robots.invalid" + target, self.token))
        except Exception:  # a URL the matcher cannot read: rules exist, so stay on the safe side
            return False

    def crawl_delay(self) -> float | None:
        """Seconds from Crawl-delay (the largest of the groups that apply), or None."""
        return self._delay

    def request_rate(self) -> float | None:
        """Requests/second from Crawl-delay or Request-rate for our group, the stricter; None if neither."""
        return self._rate


def truncate_text(text: str, limit: int = PARSE_LIMIT) -> str:
    """The part of ``text`` within the parse limit (in UTF-8 bytes), cut at its last whole line."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return text
    return _cut_at_line(data[:limit]).decode("utf-8", errors="replace")


def _cut_at_line(data: bytes) -> bytes:
    """A truncated body without its partial last line (``Disallow: /a`` cut from ``/abc`` widens a rule)."""
    end = max(data.rfind(b"\n"), data.rfind(b"\r"))
    return data[: end + 1] if end >= 0 else b""


def decode_body(data: bytes) -> str:
    """robots.txt is UTF-8 (RFC 9309 §2.2); a BOM is skipped, invalid bytes replaced."""
    return data.decode("utf-8", errors="replace").removeprefix(_BOM)


# ---------------------------------------------------------------- fetching


@dataclass(frozen=True)
class RobotsFetch:
    """One attempt at a server's robots.txt, or what the cache serves from its last good attempt."""

    status: RobotsStatus
    text: str | None  # the body (first 500 KiB) for RULES, else None
    reason: str  # why this status, for logs and error rows
    fetched_at: float  # epoch seconds of the attempt that produced ``text``/``status``
    retry_after: float | None = None  # seconds the server asked us to wait (429, 503)
    url: str = ""  # the robots.txt URL asked for
    elapsed: float = 0.0  # seconds the attempt took (a latency estimate for profiling)
    truncated: bool = False  # the body was longer than the parse limit
    checked_at: float = 0.0  # epoch seconds of the latest attempt (later than fetched_at after a failed refresh)
    http_status: int = 0  # the final HTTP status of the attempt, 0 when none arrived (network failure)

    @property
    def transient(self) -> bool:
        return self.status.transient

    def rules(self, token: str) -> RobotsRules | None:
        """The rules to obey, or None while downloads are forbidden for now (UNAVAILABLE, RATE_LIMITED)."""
        if self.transient:
            return None
        return RobotsRules.parse(self.text if self.status is RobotsStatus.RULES else None, token)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("text")
        data["status"] = self.status.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], text: str | None) -> RobotsFetch:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k not in ("status", "text")}
        return cls(status=RobotsStatus(data["status"]), text=text, **known)


def robots_url(any_url: str) -> str:
    parts = urlsplit(any_url)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # never send credentials of a URL to its robots.txt
    return urlunsplit((parts.scheme, netloc, ROBOTS_PATH, "", ""))


def robots_settings(fetcher: ServerFetcher) -> Any:
    """The fetcher's settings for robots.txt: 5 redirects, the parse limit as byte cap, no X-Robots-Tag."""
    return replace(fetcher.settings, max_redirects=MAX_REDIRECTS, max_bytes=PARSE_LIMIT, respect_x_robots_tag=False)


def fetch_robots(
    fetcher: ServerFetcher,
    any_url_of_host: str,
    clock: Callable[[], float] = time.time,
    gate: HopGate | None = None,
) -> RobotsFetch:
    """Fetch and classify the robots.txt of ``any_url_of_host``'s server by RFC 9309. Never raises.

    Uses a short-lived fetcher with ``fetcher``'s user agent, headers, timeouts and address policy
    (so redirects and connections are guarded the same way) and robots.txt's own limits; a body
    over 500 KiB is streamed again and cut, never discarded. ``fetcher`` itself is left as it is.
    """
    url = robots_url(any_url_of_host)
    started_at = clock()
    started = time.monotonic()

    def done(status: RobotsStatus, reason: str, text: str | None = None, **extra: Any) -> RobotsFetch:
        return RobotsFetch(
            status,
            text,
            reason,
            started_at,
            url=url,
            elapsed=time.monotonic() - started,
            checked_at=started_at,
            **extra,
        )

    settings = robots_settings(fetcher)
    own = ServerFetcher(settings, pool_size=1, address_policy=fetcher.address_policy)
    try:
        try:
            result = own.get(url, gate)  # the gate sees every later request: redirect hops, a second read
            return done(RobotsStatus.RULES, "robots.txt found", decode_body(result.body), http_status=result.status)
        except HttpStatusError as exc:
            return _classify_status(exc.code, exc.headers, done, clock)
        except DownloadError as exc:
            if exc.code == ErrorCode.TOO_LARGE:
                try:
                    body = read_prefix(own, url, PARSE_LIMIT, gate)
                except HttpStatusError as again:
                    return _classify_status(again.code, again.headers, done, clock)
                except DownloadError as again:
                    return _classify_error(again, done)
                return done(
                    RobotsStatus.RULES,
                    f"robots.txt over {PARSE_LIMIT} bytes: its first {PARSE_LIMIT} bytes are obeyed",
                    decode_body(_cut_at_line(body)),
                    truncated=True,
                    http_status=200,
                )
            return _classify_error(exc, done)
    except Exception as exc:  # a fetch of robots.txt must never take a lane down (handlers included)
        return done(RobotsStatus.UNAVAILABLE, f"robots.txt fetch failed: {type(exc).__name__}: {exc}")
    finally:
        own.close()


def _classify_status(
    code: int, headers: Any, done: Callable[..., RobotsFetch], clock: Callable[[], float]
) -> RobotsFetch:
    retry = _retry_after(headers, clock())
    if code == 429:
        return done(
            RobotsStatus.RATE_LIMITED,
            "robots.txt answered HTTP 429: back off, fetched again later",
            retry_after=retry,
            http_status=code,
        )
    if 400 <= code < 500:
        return done(
            RobotsStatus.NO_RULES, f"robots.txt answered HTTP {code}: no rules apply (RFC 9309)", http_status=code
        )
    if 300 <= code < 400:  # a redirect without a Location, 304 to a plain GET...
        return done(
            RobotsStatus.NO_RULES,
            f"robots.txt answered HTTP {code} without a usable redirect: no rules",
            http_status=code,
        )
    if 200 <= code < 300:  # 204 and the like: an empty file
        return done(RobotsStatus.RULES, f"robots.txt answered HTTP {code}: empty", "", http_status=code)
    return done(
        RobotsStatus.UNAVAILABLE,
        f"robots.txt answered HTTP {code}: disallow everything for now (RFC 9309), fetched again later",
        retry_after=retry,
        http_status=code,
    )


def _classify_error(exc: DownloadError, done: Callable[..., RobotsFetch]) -> RobotsFetch:
    if exc.code == ErrorCode.REDIRECT:  # loop, over 5 redirects, or a non-HTTP target
        return done(RobotsStatus.NO_RULES, f"robots.txt unavailable ({exc.message}): no rules (RFC 9309)")
    if exc.code == ErrorCode.PRIVATE_ADDRESS:
        # Nothing is fetched from a non-public address anyway: every URL that resolves to one gets -8.
        return done(RobotsStatus.NO_RULES, f"robots.txt not fetched: {exc.message}")
    return done(
        RobotsStatus.UNAVAILABLE,
        f"robots.txt unreachable ({exc.message}): disallow everything for now (RFC 9309), fetched again later",
    )


def _retry_after(headers: Any, now_epoch: float) -> float | None:
    value = None
    if headers:
        value = next((v for k, v in dict(headers).items() if k.lower() == "retry-after"), None)
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # e.g. an hour of 20 digits
        return None
    if when is None or when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - now_epoch), MAX_RETRY_AFTER)


def read_prefix(fetcher: ServerFetcher, url: str, limit: int, gate: HopGate | None = None) -> bytes:
    """The first ``limit`` decoded bytes of a 200 at ``url``, following redirects by hand.

    For the rare robots.txt over the fetcher's byte cap (ServerFetcher raises TOO_LARGE instead of
    returning a prefix). Each hop is checked by the fetcher's address policy, each connection by its
    session's guarded adapter; the time is bounded by the fetcher's total timeout between socket
    reads, each read by its read timeout. Raises HttpStatusError / DownloadError like ``get``.
    """
    settings = fetcher.settings
    deadline = time.monotonic() + settings.total_timeout
    current, seen = url, {url}
    for _hop in range(settings.max_redirects + 1):
        parts = urlsplit(current)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DownloadError(ErrorCode.REDIRECT, f"refusing URL with scheme '{parts.scheme}'")
        fetcher.address_policy.check_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        if gate is not None:  # every request of it comes after the caller's first one
            gate.before_hop(current)
        timeout = (settings.connect_timeout, settings.read_timeout)
        try:
            response = fetcher.session.get(current, stream=True, allow_redirects=False, timeout=timeout)
        except requests.exceptions.RequestException as exc:
            raise DownloadError(ErrorCode.NETWORK, f"robots.txt request failed: {exc}") from exc
        with contextlib.closing(response):
            if response.status_code in REDIRECT_STATUSES and response.headers.get("Location"):
                current = urljoin(current, response.headers["Location"])
                if current in seen:
                    raise DownloadError(ErrorCode.REDIRECT, "redirect loop")
                seen.add(current)
                continue
            if response.status_code != 200:
                raise HttpStatusError(response.status_code, dict(response.headers), 0.0)
            chunks: list[bytes] = []
            size = 0
            try:
                while size < limit:
                    if time.monotonic() > deadline:
                        raise DownloadError(ErrorCode.TIMEOUT, f"robots.txt: total time limit after {size} bytes")
                    chunk = response.raw.read1(min(_CHUNK, limit - size), decode_content=True)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            except DownloadError:
                raise
            except Exception as exc:
                raise DownloadError(ErrorCode.NETWORK, f"robots.txt body broken after {size} bytes: {exc}") from exc
            return b"".join(chunks)[:limit]
    raise DownloadError(ErrorCode.REDIRECT, f"more than {settings.max_redirects} redirects")


# ---------------------------------------------------------------- the cache


@dataclass
class _Entry:
    fetch: RobotsFetch
    due_at: float  # epoch seconds when it must be fetched again
    rules: RobotsRules | None


def _file_stem(server: str) -> str:
    """The server's name as a file name stem; a name too long for a file name with its temp-file
    affixes (DNS allows 253 characters, a file name 255) is cut and made unique by its hash."""
    if len(server) <= MAX_STEM:
        return server
    return f"{server[: MAX_STEM - 17]}-{hashlib.sha256(server.encode()).hexdigest()[:16]}"


class RobotsCache:
    """robots.txt per server on disk (``<server>.txt`` + ``<server>.json``), shared by threads and ranks.

    ``get`` answers from memory while the entry is fresh; when it is due it looks at the disk
    first (another rank may have fetched it meanwhile), then fetches under a per-server lock (a
    thread lock, plus an advisory file lock between processes where the filesystem has one).
    Freshness: RULES / NO_RULES for ``max_age``; UNAVAILABLE for ``unavailable_retry``; RATE_LIMITED
    for its Retry-After (or ``rate_limited_retry``). A refresh that fails while a good copy younger
    than ``stale_limit`` exists keeps serving that copy and is retried after ``unavailable_retry``.
    A ``<server>.txt`` without sidecar (written by an older profiling) counts as RULES from its mtime.
    """

    def __init__(
        self,
        folder: Path,
        token: str,
        max_age: float = MAX_AGE,
        unavailable_retry: float = UNAVAILABLE_RETRY,
        rate_limited_retry: float = RATE_LIMITED_RETRY,
        stale_limit: float = STALE_LIMIT,
        clock: Callable[[], float] = time.time,
        max_entries: int = MEMORY_ENTRIES,
    ) -> None:
        self.folder = Path(folder)
        # A rank meets thousands of servers in a round, and parsed rules weigh 30-400 KB each:
        # memory holds the latest ones, the others are read back from disk when needed again.
        self.max_entries = max(1, max_entries)
        self.token = token
        self.max_age = max_age
        self.unavailable_retry = unavailable_retry
        self.rate_limited_retry = rate_limited_retry
        self.stale_limit = stale_limit
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.fetches = 0  # robots.txt requests this cache made (for tests and logs)

    # -------------------------------------------------------------- public

    def get(
        self,
        server_name: str,
        sample_url: str,
        fetcher_factory: Callable[[], ServerFetcher],
        gate: HopGate | None = None,
    ) -> RobotsRules | RobotsFetch:
        """The rules to obey for ``server_name``, or the RobotsFetch (UNAVAILABLE / RATE_LIMITED) that
        forbids downloading for now. Fetches when there is no fresh copy; ``fetcher_factory`` is called
        only then, and the fetcher it returns is closed afterwards; ``gate`` sees the fetch's later
        requests (redirect hops, the second read of a long file)."""
        entry = self._entry(server_name, sample_url, fetcher_factory, gate)
        return entry.rules if entry.rules is not None else entry.fetch

    def status(self, server_name: str) -> RobotsFetch | None:
        """What the cache holds for a server (memory, else disk), without fetching."""
        entry = self._entries.get(server_name)
        if entry is not None:
            return entry.fetch
        loaded = self._load(server_name)
        return loaded[0] if loaded else None

    def due_at(self, server_name: str) -> float | None:
        """Epoch seconds when the server's robots.txt will be fetched again, None if never fetched."""
        entry = self._entries.get(server_name)
        if entry is None:
            loaded = self._load(server_name)
            return loaded[1] if loaded else None
        return entry.due_at

    def store(self, server_name: str, fetch: RobotsFetch) -> None:
        """Record an attempt (profiling seeds the cache this way); a failed refresh keeps a good copy."""
        with self._lock(server_name):
            self._remember(server_name, self._merge(server_name, fetch))

    def refresh(
        self,
        server_name: str,
        sample_url: str,
        fetcher_factory: Callable[[], ServerFetcher],
        gate: HopGate | None = None,
    ) -> RobotsFetch:
        """Fetch now, whatever the cache holds (profiling), and return what the cache serves next."""
        with self._lock(server_name), self._file_lock(server_name):
            return self._fetch(server_name, sample_url, fetcher_factory, gate).fetch

    # -------------------------------------------------------------- internals

    def _entry(
        self,
        server: str,
        sample_url: str,
        fetcher_factory: Callable[[], ServerFetcher],
        gate: HopGate | None = None,
    ) -> _Entry:
        entry = self._entries.get(server)
        if entry is not None and self.clock() < entry.due_at:
            return entry
        with self._lock(server):
            entry = self._entries.get(server)
            if entry is not None and self.clock() < entry.due_at:
                return entry  # another thread fetched it meanwhile
            entry = self._from_disk(server)
            if entry is not None and self.clock() < entry.due_at:
                return entry
            with self._file_lock(server):
                entry = self._from_disk(server)  # another process may have fetched it meanwhile
                if entry is not None and self.clock() < entry.due_at:
                    return entry
                return self._fetch(server, sample_url, fetcher_factory, gate)

    def _fetch(
        self,
        server: str,
        sample_url: str,
        fetcher_factory: Callable[[], ServerFetcher],
        gate: HopGate | None = None,
    ) -> _Entry:
        fetcher = fetcher_factory()
        try:
            self.fetches += 1
            fetch = fetch_robots(fetcher, sample_url, clock=self.clock, gate=gate)
        finally:
            fetcher.close()
        return self._remember(server, self._merge(server, fetch))

    def _merge(self, server: str, fetch: RobotsFetch) -> RobotsFetch:
        """A failed attempt after a good one: keep serving the good copy (RFC 9309 §2.4) while young enough."""
        if not fetch.transient:
            return fetch
        previous = self._entries.get(server)
        old = previous.fetch if previous is not None else None
        if old is None:
            loaded = self._load(server)
            old = loaded[0] if loaded else None
        if old is None or old.transient or fetch.checked_at - old.fetched_at > self.stale_limit:
            return fetch
        age_h = (fetch.checked_at - old.fetched_at) / 3600
        return replace(
            old,
            checked_at=fetch.checked_at,
            retry_after=fetch.retry_after,
            reason=f"{fetch.reason}; meanwhile the copy of {age_h:.1f} h ago is obeyed (RFC 9309 §2.4)",
        )

    def _due_at(self, fetch: RobotsFetch) -> float:
        checked = fetch.checked_at or fetch.fetched_at
        if fetch.status is RobotsStatus.RATE_LIMITED:
            return checked + (fetch.retry_after if fetch.retry_after else self.rate_limited_retry)
        if fetch.status is RobotsStatus.UNAVAILABLE:
            return checked + max(self.unavailable_retry, fetch.retry_after or 0.0)
        if checked > fetch.fetched_at:  # a failed refresh: serving the older copy, retry soon
            return min(checked + self.unavailable_retry, fetch.fetched_at + self.stale_limit)
        return fetch.fetched_at + self.max_age

    def _remember(self, server: str, fetch: RobotsFetch) -> _Entry:
        self._write(server, fetch)
        entry = _Entry(fetch, self._due_at(fetch), fetch.rules(self.token))
        self._keep(server, entry)
        return entry

    def _from_disk(self, server: str) -> _Entry | None:
        loaded = self._load(server)
        if loaded is None:
            return None
        fetch, due_at = loaded
        current = self._entries.get(server)
        if current is not None and current.fetch == fetch:
            current.due_at = due_at
            return current
        entry = _Entry(fetch, due_at, fetch.rules(self.token))
        self._keep(server, entry)
        return entry

    def _keep(self, server: str, entry: _Entry) -> None:
        with self._guard:
            self._entries.pop(server, None)
            self._entries[server] = entry
            while len(self._entries) > self.max_entries:
                del self._entries[next(iter(self._entries))]

    def _paths(self, server: str) -> tuple[Path, Path]:
        stem = _file_stem(server)
        return self.folder / f"{stem}.txt", self.folder / f"{stem}.json"

    def _write(self, server: str, fetch: RobotsFetch) -> None:
        text_path, meta_path = self._paths(server)
        self.folder.mkdir(parents=True, exist_ok=True)
        if fetch.status is RobotsStatus.RULES and fetch.text is not None:
            atomic_write_text(text_path, fetch.text)
        elif not fetch.transient:
            text_path.unlink(missing_ok=True)
        # A transient status with no good copy leaves any old body alone: the sidecar says not to use it.
        atomic_write_json(meta_path, {**fetch.to_json(), "due_at": self._due_at(fetch)})

    def _load(self, server: str) -> tuple[RobotsFetch, float] | None:
        text_path, meta_path = self._paths(server)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            meta = None
        except (OSError, ValueError):
            return None  # unreadable sidecar: fetch again
        if meta is None:  # an older profiling's robots/<server>.txt, or nothing
            try:
                text = text_path.read_text(errors="replace")
                mtime = text_path.stat().st_mtime
            except OSError:
                return None
            fetch = RobotsFetch(
                RobotsStatus.RULES, text, "robots.txt from an earlier profiling", mtime, checked_at=mtime
            )
            return fetch, self._due_at(fetch)
        try:
            status = RobotsStatus(meta["status"])
            text = None
            if status is RobotsStatus.RULES:
                text = text_path.read_text(errors="replace")
            fetch = RobotsFetch.from_json(meta, text)
            due_at = float(meta.get("due_at", self._due_at(fetch)))
        except (OSError, KeyError, TypeError, ValueError):
            return None
        return fetch, due_at

    def _lock(self, server: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(server)
            if lock is None:
                lock = self._locks[server] = threading.Lock()
            return lock

    @contextlib.contextmanager
    def _file_lock(self, server: str) -> Iterator[None]:
        """An advisory lock between processes; none where the filesystem refuses one."""
        handle = None
        if fcntl is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                handle = open(self.folder / f"{_file_stem(server)}.lock", "a+b")  # noqa: SIM115 - closed below
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            except OSError:
                if handle is not None:
                    handle.close()
                handle = None
        try:
            yield
        finally:
            if handle is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()
