"""HTTP for one server: a pooled session, manual redirects with an address guard at every hop
(and on every new connection), timeouts on connect, read and total time (the total enforced by a
deadline watchdog), a byte cap on the decoded body, and the opt-outs an answer carries: X-Robots-Tag
(noai, noimageai) and the W3C TDM Reservation Protocol's ``tdm-reservation: 1``."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import http.client
import ipaddress
import itertools
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.wait import wait_for_read

from distributed_downloader.errors import DownloadError, ErrorCode

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
COLON_DIRECTIVES = frozenset({"max-image-preview", "max-snippet", "max-video-preview", "unavailable_after"})
_CRAWLER_NAME = re.compile(r"^[A-Za-z0-9._*-]+$")
# Largest body read per call: one socket read (bounded by the read timeout) gives what has arrived,
# up to this. 1 MiB, not 64 KiB: a 7 MB original is a handful of reads (each a GIL hand-off in a
# busy rank) instead of ~100; the byte cap may be overshot by one chunk before it is noticed.
CHUNK_BYTES = 1024 * 1024
MIN_BODY_SPEED = 1024  # bytes/s a body must average over each read timeout (else it is cut: -3)
# Seconds the rest of the response headers may take once their first byte is in. A server sends
# its headers in one go when it has them; one that trickles them (nginx's limit_rate from the
# status line on, a tarpit) otherwise held the URL for the whole connect + read timeout, every round.
HEADERS_AFTER_FIRST_BYTE = 5.0
# Content-Encodings the body is decoded from (urllib3's decoders); any other value is read as is.
_DECODED_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})
ROBOTS_TXT_PATH = "/robots.txt"  # a fetch of robots.txt (and its redirects) never counts as opted out


@dataclass(frozen=True)
class FetchSettings:
    user_agent: str
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    total_timeout: float = 60.0
    max_bytes: int = 50_000_000
    max_redirects: int = 5
    allow_private_addresses: bool = False
    respect_x_robots_tag: bool = True
    respect_tdm_reservation: bool = True

    @property
    def robots_token(self) -> str:
        """The product token robots.txt rules are matched against (e.g. 'distributed-downloader')."""
        return self.user_agent.split("/", 1)[0].split(" ", 1)[0] or "*"

    @classmethod
    def from_config(cls, params: Mapping) -> FetchSettings:
        headers: dict[str, str] = {}
        user_agent = params["user_agent"]
        if params.get("header"):  # the original's single 'Name: value' header line
            name, _, value = params["header"].partition(":")
            if name.strip().lower() == "user-agent":
                user_agent = value.strip()
            elif name.strip():
                headers[name.strip()] = value.strip()
        timeout = params["timeout"]
        return cls(
            user_agent=user_agent,
            extra_headers=headers,
            connect_timeout=float(timeout["connect"]),
            read_timeout=float(timeout["read"]),
            total_timeout=float(timeout["total"]),
            max_bytes=int(params["max_image_bytes"]),
            max_redirects=int(params["max_redirects"]),
            allow_private_addresses=bool(params["allow_private_addresses"]),
            respect_x_robots_tag=bool(params["respect_x_robots_tag"]),
            respect_tdm_reservation=bool(params.get("respect_tdm_reservation", True)),
        )


@dataclass
class FetchResult:
    status: int
    body: bytes
    headers: Mapping[str, str]
    url: str
    elapsed: float  # seconds from request start to the last body byte
    md5: str = ""  # MD5 hex of ``body``, hashed as it was read ('' when the fetch did not hash it)


class HttpStatusError(DownloadError):
    """A non-success HTTP status; headers kept for the rate controller (Retry-After...)."""

    def __init__(self, status: int, headers: Mapping[str, str], elapsed: float) -> None:
        super().__init__(status, f"HTTP {status}")
        self.headers = headers
        self.elapsed = elapsed


class HopGate:
    """What a fetch tells politeness about each hop (see ServerFetcher.get); this one allows all.

    ``cancel()`` ends the fetch the gate belongs to from another thread (a hedged request whose
    other copy already answered); the fetch then fails with a timeout error.
    """

    _watch: _Watch | None = None
    cancelled: bool = False

    @property
    def progress(self) -> float:
        """When its fetch last received anything (headers or body bytes); 0.0 before it began."""
        return self._watch.progress if self._watch is not None else 0.0

    def attach(self, watch: _Watch) -> None:
        self._watch = watch
        if self.cancelled:  # cancelled before its fetch began (a hedge whose twin answered): send nothing
            _WATCHDOG.cancel(watch)

    def cancel(self) -> None:
        self.cancelled = True
        if self._watch is not None:
            _WATCHDOG.cancel(self._watch)

    def before_hop(self, url: str) -> None:
        """Called before a redirect hop to ``url`` is sent; may wait for a rate slot or raise DownloadError."""

    def on_wire(self) -> None:
        """Called right before a request's bytes are written to its connection (may wait a moment)."""

    def wrote(self) -> None:
        """Called right after a request's bytes were handed to the kernel."""

    def on_response(self, url: str, status: int, headers: Mapping[str, str], elapsed: float) -> None:
        """Called with every answer's status line and headers, redirects included."""

    def on_network_error(self, url: str) -> None:
        """Called when a hop to ``url`` failed without an answer (reset, timeout, refused)."""


_OPEN_GATE = HopGate()


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address without its zone id, IPv4-mapped IPv6 seen as the IPv4 it carries."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public_address(address: str) -> bool:
    ip = _ip(address)
    # is_global also excludes shared address space (100.64/10, where cloud metadata can live).
    return ip.is_global and not ip.is_multicast


class AddressPolicy:
    """Which addresses a fetcher may talk to.

    Loopback, private, link-local, shared (100.64/10), multicast and unspecified addresses are
    refused unless ``allow_private``; ``also_allowed`` names networks accepted anyway (an intranet
    mirror, tests). A ServerFetcher applies it twice: to every URL it is about to request (the
    first and each redirect hop), from a fresh DNS answer of which every address must pass, before
    anything is sent; and to the address each new direct connection actually reached, which closes
    the gap between our DNS answer and the connection's own lookup (DNS rebinding).
    """

    def __init__(self, allow_private: bool = False, also_allowed: Iterable[str] = ()) -> None:
        self.allow_private = allow_private
        self.also_allowed = tuple(ipaddress.ip_network(network, strict=False) for network in also_allowed)

    def permits(self, address: str) -> bool:
        if self.allow_private:
            return True
        ip = _ip(address)
        return any(ip in network for network in self.also_allowed if network.version == ip.version) or (
            is_public_address(address)
        )

    def resolve(self, host: str, port: int) -> list[str]:
        """Every address ``host`` resolves to (DownloadError -1 when it does not resolve)."""
        try:
            answers = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as exc:
            raise DownloadError(ErrorCode.NETWORK, f"DNS lookup failed for {host}: {exc}") from exc
        return [str(sockaddr[0]) for *_, sockaddr in answers]

    def check_host(self, host: str, port: int) -> None:
        """Resolve and refuse (-8) when any answer is an address we may not talk to."""
        for address in self.resolve(host, port):
            if not self.permits(address):
                raise DownloadError(ErrorCode.PRIVATE_ADDRESS, f"{host} resolves to non-public address {address}")

    def check_peer(self, address: str) -> None:
        """Refuse (-8) a connection that reached an address we may not talk to."""
        if not self.permits(address):
            raise DownloadError(ErrorCode.PRIVATE_ADDRESS, f"connection reached non-public address {address}")


def check_host(host: str, port: int, allow_private: bool) -> None:
    """Resolve and refuse private/loopback/link-local/multicast answers unless allowed."""
    AddressPolicy(allow_private).check_host(host, port)


# ---------------------------------------------------------------- the total-time watchdog


class _Watch:
    """One fetch's deadline and the socket it is using right now."""

    __slots__ = ("deadline", "done", "fired", "limit_phase", "limited", "progress", "sock")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.sock: socket.socket | None = None
        self.fired = False  # the deadline passed while the fetch was running
        self.limited = False  # it was a shorter limit (the response headers') that passed
        self.limit_phase = 0  # a shorter limit holds only while this has not moved on
        self.done = False
        self.progress = time.monotonic()  # when the fetch last received anything (headers, body bytes)


class _Watchdog:
    """Enforces total deadlines on blocking socket reads: one daemon thread per process.

    Per-read timeouts cannot bound a server that sends one byte just before each would expire:
    slow headers, a slow chunk-size line, or a body that feeds a decoder which waits for more.
    A fetch registers its deadline; whichever connection it uses attaches its socket (the
    connection hooks below). At the deadline that socket is shut down, which wakes any read
    blocked on it at once. A connection goes back to the pool only after being detached, so a
    late deadline never touches a socket another fetch is using.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float) -> _Watch:
        watch = _Watch(deadline)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), watch, None))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0][2] is watch:
                self._cond.notify()
        return watch

    def limit(self, watch: _Watch, deadline: float) -> None:
        """A shorter deadline for the fetch's current step, until ``release``."""
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), watch, watch.limit_phase))
            if self._heap[0][2] is watch:
                self._cond.notify()

    def release(self, watch: _Watch) -> None:
        with self._cond:
            watch.limit_phase += 1

    def attach(self, watch: _Watch, sock: socket.socket) -> None:
        with self._cond:
            if watch.done:
                return
            watch.sock = sock
            if watch.fired:  # out of time already: no new connection gets to wait either
                _shutdown(sock)

    def detach(self, watch: _Watch) -> None:
        with self._cond:
            watch.sock = None

    def cancel(self, watch: _Watch) -> None:
        """End a fetch now, as if its deadline had passed (its answer is no longer wanted)."""
        with self._cond:
            if watch.done:
                return
            watch.fired = True
            if watch.sock is not None:
                _shutdown(watch.sock)

    def finish(self, watch: _Watch) -> None:
        with self._cond:
            watch.done = True
            watch.sock = None

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                _, _, watch, phase = heapq.heappop(self._heap)
                if phase is not None and phase != watch.limit_phase:
                    continue  # a step's limit that was released
                watch.fired = True
                watch.limited = phase is not None
                if watch.sock is not None:
                    _shutdown(watch.sock)


def _shutdown(sock: socket.socket) -> None:
    """Wake every read blocked on ``sock`` (the descriptor stays open: its owner closes it)."""
    with contextlib.suppress(OSError):  # closed meanwhile
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain call, also for TLS sockets


_WATCHDOG = _Watchdog()
_current = threading.local()  # .watch / .gate / .headers_within: the fetch running in this thread


def _attach_current(sock: socket.socket | None) -> None:
    watch = getattr(_current, "watch", None)
    if watch is not None and sock is not None:
        _WATCHDOG.attach(watch, sock)


def _detach_current() -> None:
    watch = getattr(_current, "watch", None)
    if watch is not None:
        _WATCHDOG.detach(watch)


class _ConnectionHooks:
    """Mixed into urllib3 connections: peer-address check on connect, deadline watch on every use."""

    peer_check: Callable[[str], None] | None = None  # set on the generated subclasses

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        if self.peer_check is not None:
            try:
                self.peer_check(str(sock.getpeername()[0]))
            except BaseException:
                sock.close()
                raise
        _attach_current(sock)
        return sock

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _attach_current(self.sock)  # type: ignore[attr-defined]  # TLS replaces the plain socket

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach_current(self.sock)  # type: ignore[attr-defined]  # a reused connection (None: connects now)
        gate = getattr(_current, "gate", None)
        if gate is not None:
            gate.on_wire()  # the pacing that counts is the one the server sees: at the wire
        # The headers' limit runs from here: our own wait for the wire (spacing, a short pause) is
        # not the server's (a 2-s wait cut a 1.5-s answer as "trickled" under 1 + 2 s timeouts).
        watch, within = getattr(_current, "watch", None), getattr(_current, "headers_within", None)
        if watch is not None and within is not None:
            _current.headers_deadline = min(watch.deadline, time.monotonic() + within)
            if _current.headers_deadline < watch.deadline:
                _WATCHDOG.limit(watch, _current.headers_deadline)
        super().request(*args, **kwargs)  # type: ignore[misc]
        if gate is not None:
            gate.wrote()  # a write that went out late (the GIL, a busy CPU) moves our next one back

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        watch = getattr(_current, "watch", None)
        if watch is not None and getattr(_current, "headers_within", None) is not None:
            _limit_after_first_byte(watch, self.sock, self.timeout)  # type: ignore[attr-defined]
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


def _limit_after_first_byte(watch: _Watch, sock: socket.socket | None, read_timeout: float | None) -> None:
    """Wait (as the read would) for the answer's first byte; from then the headers get a short limit.

    No byte within the read timeout raises the timeout the read itself would have raised.
    """
    if sock is None:
        return
    pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted and buffered
    if not (pending is not None and pending()):
        wait = watch.deadline - time.monotonic()
        if isinstance(read_timeout, (int, float)):
            wait = min(wait, read_timeout)
        try:
            readable = wait_for_read(sock, timeout=max(0.0, wait))  # poll(): no FD_SETSIZE limit
        except (OSError, ValueError):  # closed or shut down meanwhile: the read reports it
            return
        if not readable:
            raise TimeoutError("timed out")  # urllib3 turns it into its read timeout, as for a blocked read
    limit = time.monotonic() + HEADERS_AFTER_FIRST_BYTE
    if limit < getattr(_current, "headers_deadline", watch.deadline):
        _current.headers_trickle = True
        _WATCHDOG.limit(watch, limit)


class _PoolHooks:
    """Mixed into urllib3 pools: a connection leaves the current fetch's watch before it is pooled."""

    def _put_conn(self, conn: Any) -> None:
        _detach_current()
        super()._put_conn(conn)  # type: ignore[misc]


def _pool_classes(peer_check: Callable[[str], None] | None) -> dict[str, type]:
    check = {"peer_check": staticmethod(peer_check) if peer_check else None}
    http_conn = type("GuardedHTTPConnection", (_ConnectionHooks, HTTPConnection), check)
    https_conn = type("GuardedHTTPSConnection", (_ConnectionHooks, HTTPSConnection), check)
    return {
        "http": type("GuardedHTTPConnectionPool", (_PoolHooks, HTTPConnectionPool), {"ConnectionCls": http_conn}),
        "https": type("GuardedHTTPSConnectionPool", (_PoolHooks, HTTPSConnectionPool), {"ConnectionCls": https_conn}),
    }


class _GuardedAdapter(HTTPAdapter):
    """requests' adapter with our connection classes: direct connections get the peer check and the
    deadline watch; connections through an HTTP proxy get the watch only (the proxy is the peer)."""

    def __init__(self, policy: AddressPolicy, **kwargs: Any) -> None:
        self._direct_pools = _pool_classes(policy.check_peer)
        self._proxy_pools = _pool_classes(None)
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._direct_pools

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> urllib3.ProxyManager:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is urllib3.ProxyManager:  # a SOCKS manager brings its own pools
            manager.pool_classes_by_scheme = self._proxy_pools
        return manager


def x_robots_opt_out(values: list[str], robots_token: str) -> str | None:
    """The opt-out directive that applies to us, if any ('noai', 'noimageai').

    Each value is a comma-separated list of directives; ``<crawler>: <directives>`` scopes what follows
    (up to the next ``<crawler>:``) to that crawler, so a value folded from several header lines
    (``googlebot: noindex, our-bot: noai``) reads like the lines did. Scopes that apply to us: none,
    ``*``, and our product token (case-insensitive). ``max-image-preview:none`` and the other
    directives that carry a colon are directives, not crawler names.
    """
    token = robots_token.lower()
    for value in values:
        scope = None  # a new header line starts unscoped
        for part in value.split(","):
            head, sep, rest = part.partition(":")
            name = head.strip().lower()
            if sep and _CRAWLER_NAME.match(name) and name not in OPT_OUT_DIRECTIVES | COLON_DIRECTIVES:
                scope, part = name, rest
            if scope not in (None, "*", token):
                continue
            for directive in part.split():
                if directive.lower() in OPT_OUT_DIRECTIVES:
                    return directive.lower()
    return None


def tdm_reserved(values: list[str]) -> bool:
    """Whether ``tdm-reservation`` values reserve text and data mining rights (W3C TDMRep: ``1``).

    ``0`` or no header: not reserved. Several headers (or a folded ``0, 1``): reserved when any says 1.
    Anything else is not a valid value and reserves nothing.
    """
    return any(item.strip().strip('"').strip() == "1" for value in values for item in value.split(","))


class ServerFetcher:
    """Fetches URLs of one server over a pooled keep-alive session.

    Time bounds of one ``get`` (all hops together): a connection attempt waits at most
    ``connect_timeout`` per address, a read at most ``read_timeout`` without data, and the whole
    fetch ends with a -3 at ``total_timeout`` at the latest (the deadline watchdog interrupts
    whatever read is blocked then). Only the DNS lookups before each hop are not bounded by us
    (the system resolver's own timeouts apply).
    """

    def __init__(
        self, settings: FetchSettings, pool_size: int = 8, address_policy: AddressPolicy | None = None
    ) -> None:
        self.settings = settings
        # Fixed at construction: `settings` may be swapped later (profiling does), the policy stays.
        self.address_policy = address_policy or AddressPolicy(settings.allow_private_addresses)
        self.session = requests.Session()
        adapter = _GuardedAdapter(
            self.address_policy, pool_connections=4, pool_maxsize=max(1, pool_size), max_retries=0
        )
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"User-Agent": settings.user_agent, **settings.extra_headers})
        # requests reads the proxy variables of the environment on every request (a fifth of a
        # rank's CPU in the politeness bench): read them once per host instead, with the same rules
        # (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY), and the CA bundle variables once.
        self.session.trust_env = False
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle:
            self.session.verify = bundle
        self._checked_hosts: dict[tuple[str, int], float] = {}

    def close(self) -> None:
        self.session.close()

    def _guard(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DownloadError(ErrorCode.REDIRECT, f"refusing URL with scheme '{parts.scheme}': {url[:200]}")
        key = _client_target(parts.scheme, parts.netloc)  # the host the client will really contact
        if "\\" in parts.netloc:
            # e.g. http://127.0.0.1\@example.org/: RFC 3986 says example.org, the HTTP client (like
            # browsers) goes to 127.0.0.1. Such a URL is an attack or garbage; its server_name is wrong too.
            raise DownloadError(
                ErrorCode.NETWORK,
                f"invalid URL: ambiguous host ({key[0]} to the HTTP client, {parts.hostname} by RFC 3986)",
            )
        now = time.monotonic()
        if self._checked_hosts.get(key, -1e9) > now - 60:  # re-resolve each minute
            return
        self.address_policy.check_host(key[0].strip("[]"), key[1])
        self._checked_hosts[key] = now

    def get(self, url: str, gate: HopGate | None = None, headers: Mapping[str, str] | None = None) -> FetchResult:
        """GET with redirects followed by hand (each hop guarded). Raises DownloadError.

        ``gate`` sees every hop: ``before_hop`` before each redirect hop is sent (it takes a rate
        slot of the host the hop goes to, checks its robots.txt, and may refuse with a
        DownloadError), ``on_response`` for each answer's status and headers, ``on_network_error``
        when a hop fails without an answer. The first request's slot is the caller's. ``headers``: extra
        request headers (a monthly snapshot's conditional GET); a 304 raises HttpStatusError(304).
        """
        started = time.monotonic()
        watch = _WATCHDOG.watch(started + self.settings.total_timeout)
        _current.watch = watch
        _current.gate = gate
        if gate is not None:
            gate.attach(watch)
        try:
            return self._get(url, started, watch, gate or _OPEN_GATE, headers)
        finally:
            _current.watch = None
            _current.gate = None
            _WATCHDOG.finish(watch)

    def _get(
        self, url: str, started: float, watch: _Watch, gate: HopGate, headers: Mapping[str, str] | None = None
    ) -> FetchResult:
        seen = {url}
        current = url
        for hop in range(self.settings.max_redirects + 1):
            self._guard(current)
            if hop:
                gate.before_hop(current)
            try:
                response = self._send(current, watch, headers)
            except DownloadError as exc:
                if exc.code in (ErrorCode.NETWORK, ErrorCode.TIMEOUT):
                    gate.on_network_error(current)
                raise
            try:
                gate.on_response(current, response.status_code, response.headers, time.monotonic() - started)
                if response.status_code in REDIRECT_STATUSES and response.headers.get("Location"):
                    target = urljoin(current, response.headers["Location"])
                    if target in seen:
                        raise DownloadError(ErrorCode.REDIRECT, f"redirect loop at {target[:200]}")
                    seen.add(target)
                    current = target
                    continue
                try:
                    return self._finish(response, current, started, watch, opt_outs=not _is_robots_txt(url))
                except DownloadError as exc:
                    if exc.code in (ErrorCode.NETWORK, ErrorCode.TIMEOUT):
                        gate.on_network_error(current)
                    raise
            finally:
                response.close()
        raise DownloadError(ErrorCode.REDIRECT, f"more than {self.settings.max_redirects} redirects")

    def _out_of_time(self, where: str) -> DownloadError:
        return DownloadError(ErrorCode.TIMEOUT, f"total time limit of {self.settings.total_timeout:g}s reached {where}")

    def _send(self, url: str, watch: _Watch, headers: Mapping[str, str] | None = None) -> requests.Response:
        """One hop's request, up to its response headers.

        The headers must all be in within connect + read timeout of sending, and within
        ``HEADERS_AFTER_FIRST_BYTE`` of their first byte: a server that trickles them (a byte a
        second, a tarpit) never lets a per-read timeout fire and would hold the URL for the whole
        total timeout, every round.
        """
        now = time.monotonic()
        remaining = watch.deadline - now
        if remaining <= 0 or watch.fired:
            raise self._out_of_time("before the request")
        timeout = (min(self.settings.connect_timeout, remaining), min(self.settings.read_timeout, remaining))
        _current.headers_within = self.settings.connect_timeout + self.settings.read_timeout  # armed at the wire
        try:
            return self._send_within(url, watch, timeout, headers)
        finally:
            _current.headers_within = None
            _current.headers_trickle = False
            _current.headers_deadline = math.inf
            _WATCHDOG.release(watch)

    def _late(self, watch: _Watch) -> DownloadError:
        if not watch.limited:
            return self._out_of_time("waiting for the response headers")
        if getattr(_current, "headers_trickle", False):
            return DownloadError(
                ErrorCode.TIMEOUT,
                f"response headers not complete {HEADERS_AFTER_FIRST_BYTE:g}s after their first byte:"
                " the server trickles them",
            )
        return DownloadError(
            ErrorCode.TIMEOUT,
            "response headers not complete within the connect + read timeouts"
            f" ({self.settings.connect_timeout + self.settings.read_timeout:g}s): the server trickles them",
        )

    def _send_within(
        self, url: str, watch: _Watch, timeout: tuple[float, float], headers: Mapping[str, str] | None
    ) -> requests.Response:
        try:
            response = self.session.get(
                url,
                headers=headers,  # issue #18 hook: a revalidation's If-None-Match / If-Modified-Since, every hop
                stream=True,
                allow_redirects=False,
                timeout=timeout,
                proxies=_proxies_for(url),
            )
        except requests.exceptions.RequestException as exc:
            if watch.fired:
                raise self._late(watch) from exc
            raise _request_error(exc, url, timeout) from exc
        except (urllib3.exceptions.HTTPError, http.client.HTTPException) as exc:  # not wrapped by requests
            if watch.fired:
                raise self._late(watch) from exc
            raise DownloadError(ErrorCode.PROTOCOL, f"malformed response: {_short(exc)}") from exc
        except ValueError as exc:
            raise DownloadError(ErrorCode.NETWORK, f"invalid URL: {_short(exc)}") from exc
        if watch.fired:  # cut off mid-headers: what arrived is not a response to trust
            response.close()
            raise self._late(watch)
        watch.progress = time.monotonic()
        return response

    def _finish(
        self, response: requests.Response, url: str, started: float, watch: _Watch, opt_outs: bool = True
    ) -> FetchResult:
        headers = response.headers
        if response.status_code != 200:
            raise HttpStatusError(response.status_code, CaseInsensitiveDict(headers), time.monotonic() - started)
        if opt_outs:
            self._check_opt_outs(response)
        declared = headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.settings.max_bytes:
            raise DownloadError(
                ErrorCode.TOO_LARGE, f"Content-Length {declared} over the {self.settings.max_bytes}-byte cap"
            )
        body, md5 = self._read_body(response, watch)
        return FetchResult(200, body, CaseInsensitiveDict(headers), url, time.monotonic() - started, md5)

    def _check_opt_outs(self, response: requests.Response) -> None:
        """Raise the opt-out row's error when a 200's headers forbid us its content (before any body byte)."""
        if self.settings.respect_x_robots_tag:
            directive = x_robots_opt_out(_header_values(response, "X-Robots-Tag"), self.settings.robots_token)
            if directive:
                raise DownloadError(ErrorCode.X_ROBOTS_TAG, f"X-Robots-Tag: {directive}")
        if self.settings.respect_tdm_reservation and tdm_reserved(_header_values(response, "tdm-reservation")):
            policy = " ".join(_header_values(response, "tdm-policy"))
            raise DownloadError(
                ErrorCode.TDM_RESERVED,
                "tdm-reservation: 1 (W3C TDM Reservation Protocol: text and data mining rights reserved)"
                + (f"; tdm-policy: {policy[:200]}" if policy else ""),
            )

    @staticmethod
    def _check_speed(got: int, seconds: float, size: int, expected: int | None, left: float) -> None:
        """Raise -3 for a body too slow to be worth waiting for (see _read_body)."""
        speed = got / seconds
        if expected is not None:
            if size >= expected or (expected - size) <= speed * left:
                return
            need = "ever" if speed <= 0 else f"{(expected - size) / speed:.0f}s more"
            reason = f"at {speed:.0f} bytes/s its last {expected - size} bytes would need {need}, {left:.0f}s are left"
        elif speed < MIN_BODY_SPEED:
            reason = f"slower than {MIN_BODY_SPEED} bytes/s for {seconds:.0f}s"
        else:
            return
        raise DownloadError(ErrorCode.TIMEOUT, f"body {reason} (after {size} bytes): the server trickles it")

    def _read_body(self, response: requests.Response, watch: _Watch) -> tuple[bytes, str]:
        """The (decoded) body and its MD5 hex, in one pass; the byte cap counts decoded bytes, so a
        gzip bomb stops at the cap.

        Each chunk is hashed as it arrives (while it is in cache, and while the next bytes are on
        their way) so the stored ``hashsum_original`` costs no second pass over a multi-MB body.
        A body without a Content-Encoding is read undecoded: urllib3's decoded-content path
        copies every chunk twice more (a BytesIO write and getvalue) for nothing. The only copy
        left is the final join of the socket's chunks (none for a body that came in one read);
        the decoder then reads it through a BytesIO view.
        """
        chunks: list[bytes] = []
        size = 0
        # Low-speed cut: bytes trickling in keep every read alive. Each read timeout's worth of time,
        # a body whose length is declared is cut when at its speed it cannot end before the
        # deadline (a slow link that will finish is left alone); one without, when slower than
        # MIN_BODY_SPEED (curl's --speed-limit / --speed-time).
        mark_time, mark_size = time.monotonic(), 0
        raw = response.raw
        digest = hashlib.md5(usedforsecurity=False)  # a content fingerprint, not a security feature
        encoding = (response.headers.get("Content-Encoding") or "").strip().lower()
        decode = any(part.strip() in _DECODED_ENCODINGS for part in encoding.split(","))
        declared = response.headers.get("Content-Length")  # of the encoded body: not ours when decoding
        expected = int(declared) if declared and declared.isdigit() and not decode else None
        try:
            while True:
                if time.monotonic() > watch.deadline:
                    raise self._out_of_time(f"mid-body after {size} bytes")
                # read1: at most one socket read (each bounded by the read timeout, and the watchdog ends
                # any read at the deadline); the decoder yields at most CHUNK_BYTES per call.
                chunk = raw.read1(CHUNK_BYTES, decode_content=decode)
                if not chunk:
                    break
                watch.progress = now = time.monotonic()
                size += len(chunk)
                if now - mark_time >= self.settings.read_timeout:
                    self._check_speed(size - mark_size, now - mark_time, size, expected, watch.deadline - now)
                    mark_time, mark_size = now, size
                if size > self.settings.max_bytes:
                    raise DownloadError(ErrorCode.TOO_LARGE, f"body over the {self.settings.max_bytes}-byte cap")
                digest.update(chunk)  # releases the GIL for chunks over 2 KB
                chunks.append(chunk)
        except DownloadError:
            raise
        except Exception as exc:
            if watch.fired:
                raise self._out_of_time(f"mid-body after {size} bytes") from exc
            raise _body_error(exc, size, self.settings.read_timeout) from exc
        if watch.fired:  # the watchdog's shutdown looks like a clean end of a body without a length
            raise self._out_of_time(f"mid-body after {size} bytes")
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), digest.hexdigest()


def _proxies_for(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    return _host_proxies(parts.scheme, parts.netloc)


@functools.lru_cache(maxsize=4096)
def _host_proxies(scheme: str, netloc: str) -> dict[str, str]:
    """The environment's proxies for a host, as requests would pick them (NO_PROXY honoured)."""
    return requests.utils.get_environ_proxies(f"{scheme}://{netloc}/")


@functools.lru_cache(maxsize=4096)
def _client_target(scheme: str, netloc: str) -> tuple[str, int]:
    """(host, port) the HTTP client connects to for a URL with this scheme and (urlsplit) netloc.

    The client's own parse, not urlsplit's: they differ on a backslash, as in http://a\\@b/.
    """
    url = f"{scheme}://{netloc}/"
    try:
        target = urllib3.util.parse_url(requests.Request("GET", url).prepare().url)
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ValueError) as exc:
        raise DownloadError(ErrorCode.NETWORK, f"invalid URL: {_short(exc)}") from exc
    if not target.host:
        raise DownloadError(ErrorCode.NETWORK, f"invalid URL: no host in {url[:200]}")
    default = 443 if target.scheme == "https" else 80
    return target.host.rstrip("."), default if target.port is None else target.port


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: __cause__/__context__, urllib3's reason and exception arguments."""
    found: list[BaseException] = []
    todo = [exc]
    while todo and len(found) < 20:
        current = todo.pop(0)
        if current in found:
            continue
        found.append(current)
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        todo.extend(item for item in linked if isinstance(item, BaseException))
    return found


def _request_error(exc: requests.exceptions.RequestException, url: str, timeout: tuple[float, float]) -> DownloadError:
    """A failure before the response headers arrived, as a coded error with a short clear message."""
    causes = _causes(exc)
    where = urlsplit(url).netloc
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return DownloadError(ErrorCode.TIMEOUT, f"connect timeout: {where} did not answer within {timeout[0]:g}s")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return DownloadError(ErrorCode.TIMEOUT, f"read timeout: no response from {where} within {timeout[1]:g}s")
    if isinstance(exc, requests.exceptions.InvalidHeader) or any(
        isinstance(c, urllib3.exceptions.InvalidHeader) for c in causes
    ):
        return DownloadError(ErrorCode.PROTOCOL, f"malformed response headers: {_short(exc)}")
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema)):
        return DownloadError(ErrorCode.NETWORK, f"invalid URL: {_short(exc)}")
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return DownloadError(ErrorCode.NETWORK, f"connection refused by {where}")
    if any(isinstance(c, (socket.gaierror, urllib3.exceptions.NameResolutionError)) for c in causes):
        return DownloadError(ErrorCode.NETWORK, f"DNS lookup failed: {_short(exc)}")
    if any(isinstance(c, http.client.RemoteDisconnected) for c in causes):
        return DownloadError(ErrorCode.NETWORK, "connection closed by the server before any response")
    if any(isinstance(c, ConnectionResetError) for c in causes):
        return DownloadError(ErrorCode.NETWORK, "connection reset by the server before any response")
    if any(isinstance(c, (http.client.HTTPException, urllib3.exceptions.HeaderParsingError)) for c in causes):
        return DownloadError(ErrorCode.PROTOCOL, f"malformed response: {_short(exc)}")
    return DownloadError(ErrorCode.NETWORK, f"connection failed: {_short(exc)}")


def _body_error(exc: Exception, size: int, read_timeout: float) -> DownloadError:
    """A failure while reading the body, as a coded error with a short clear message."""
    causes = _causes(exc)
    if any(isinstance(c, (urllib3.exceptions.ReadTimeoutError, TimeoutError)) for c in causes):
        return DownloadError(
            ErrorCode.TIMEOUT, f"read timeout mid-body: no data for {read_timeout:g}s after {size} bytes"
        )
    if isinstance(exc, urllib3.exceptions.DecodeError):
        detail = next((c for c in causes[1:] if not isinstance(c, urllib3.exceptions.HTTPError)), exc)
        return DownloadError(ErrorCode.PROTOCOL, f"body does not decode per its Content-Encoding: {_short(detail)}")
    incomplete = next((c for c in causes if isinstance(c, http.client.IncompleteRead)), None)
    if incomplete is not None:  # a clean close too early: a crashed server and a lying one look alike
        missing = (
            f"{incomplete.expected} bytes short of its Content-Length"
            if isinstance(incomplete.expected, int)
            else "before its chunked encoding ended (or at a malformed chunk)"
        )
        return DownloadError(ErrorCode.NETWORK, f"connection closed mid-body after {size} bytes, {missing}")
    if any(isinstance(c, ConnectionResetError) for c in causes):
        return DownloadError(ErrorCode.NETWORK, f"connection reset mid-body after {size} bytes")
    if any(isinstance(c, (ValueError, http.client.HTTPException)) and not isinstance(c, OSError) for c in causes):
        # A broken chunked framing, an unparsable length...: the response itself is malformed.
        return DownloadError(ErrorCode.PROTOCOL, f"malformed response body: {_short(exc)}")
    return DownloadError(ErrorCode.NETWORK, f"connection broken mid-body after {size} bytes: {_short(exc)}")


def _is_robots_txt(url: str) -> bool:
    """A request for robots.txt: protocol, not content, so no opt-out header applies to it or its redirects."""
    try:
        return urlsplit(url).path == ROBOTS_TXT_PATH
    except ValueError:
        return False


def _header_values(response: requests.Response, name: str) -> list[str]:
    raw_headers = getattr(response.raw, "headers", None)
    if raw_headers is not None and hasattr(raw_headers, "getlist"):
        return list(raw_headers.getlist(name))
    value = response.headers.get(name)
    return [value] if value else []


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
