"""HTTP for one server: a pooled session, manual redirects with an address guard at every hop,
timeouts on connect, read and total time, a byte cap, and X-Robots-Tag opt-outs."""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from distributed_downloader.errors import DownloadError, ErrorCode

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
COLON_DIRECTIVES = frozenset({"max-image-preview", "max-snippet", "max-video-preview", "unavailable_after"})
_CRAWLER_NAME = re.compile(r"^[A-Za-z0-9._*-]+$")
CHUNK_BYTES = 64 * 1024


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
        )


@dataclass
class FetchResult:
    status: int
    body: bytes
    headers: Mapping[str, str]
    url: str
    elapsed: float  # seconds from request start to the last body byte


class HttpStatusError(DownloadError):
    """A non-success HTTP status; headers kept for the rate controller (Retry-After...)."""

    def __init__(self, status: int, headers: Mapping[str, str], elapsed: float) -> None:
        super().__init__(status, f"HTTP {status}")
        self.headers = headers
        self.elapsed = elapsed


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global also excludes shared address space (100.64/10, where cloud metadata can live).
    return ip.is_global and not ip.is_multicast


def check_host(host: str, port: int, allow_private: bool) -> None:
    """Resolve and refuse private/loopback/link-local/multicast answers unless allowed."""
    try:
        answers = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise DownloadError(ErrorCode.NETWORK, f"DNS lookup failed for {host}: {exc}") from exc
    if allow_private:
        return
    for *_, sockaddr in answers:
        if not is_public_address(str(sockaddr[0])):
            raise DownloadError(ErrorCode.PRIVATE_ADDRESS, f"{host} resolves to non-public address {sockaddr[0]}")


def x_robots_opt_out(values: list[str], robots_token: str) -> str | None:
    """The opt-out directive that applies to us, if any ('noai', 'noimageai')."""
    token = robots_token.lower()
    for value in values:
        scope = None
        directives = value
        head, sep, rest = value.partition(":")
        name = head.strip().lower()
        # "googlebot: noindex" scopes the rules to a crawler; "max-image-preview:none" is a directive.
        if sep and _CRAWLER_NAME.match(name) and name not in OPT_OUT_DIRECTIVES | COLON_DIRECTIVES:
            scope, directives = name, rest
        if scope not in (None, "*", token):
            continue
        for directive in directives.replace(",", " ").split():
            if directive.strip().lower() in OPT_OUT_DIRECTIVES:
                return directive.strip().lower()
    return None


class ServerFetcher:
    """Fetches URLs of one server over a pooled keep-alive session."""

    def __init__(self, settings: FetchSettings, pool_size: int = 8) -> None:
        self.settings = settings
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, pool_size), max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"User-Agent": settings.user_agent, **settings.extra_headers})
        self._checked_hosts: dict[tuple[str, int], float] = {}

    def close(self) -> None:
        self.session.close()

    def _guard(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DownloadError(ErrorCode.REDIRECT, f"refusing URL with scheme '{parts.scheme}': {url[:200]}")
        key = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        now = time.monotonic()
        if self._checked_hosts.get(key, -1e9) > now - 60:  # re-resolve each minute
            return
        check_host(key[0], key[1], self.settings.allow_private_addresses)
        self._checked_hosts[key] = now

    def get(self, url: str) -> FetchResult:
        """GET with redirects followed by hand (each hop guarded). Raises DownloadError."""
        started = time.monotonic()
        deadline = started + self.settings.total_timeout
        seen = {url}
        current = url
        for _hop in range(self.settings.max_redirects + 1):
            self._guard(current)
            response = self._send(current, deadline)
            try:
                if response.status_code in REDIRECT_STATUSES and response.headers.get("Location"):
                    target = urljoin(current, response.headers["Location"])
                    if target in seen:
                        raise DownloadError(ErrorCode.REDIRECT, f"redirect loop at {target[:200]}")
                    seen.add(target)
                    current = target
                    continue
                return self._finish(response, current, started, deadline)
            finally:
                response.close()
        raise DownloadError(ErrorCode.REDIRECT, f"more than {self.settings.max_redirects} redirects")

    def _send(self, url: str, deadline: float) -> requests.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DownloadError(ErrorCode.TIMEOUT, "total time limit reached")
        timeout = (min(self.settings.connect_timeout, remaining), min(self.settings.read_timeout, remaining))
        try:
            return self.session.get(url, stream=True, allow_redirects=False, timeout=timeout)
        except requests.exceptions.ConnectTimeout as exc:
            raise DownloadError(ErrorCode.TIMEOUT, f"connect timeout: {_short(exc)}") from exc
        except requests.exceptions.ReadTimeout as exc:
            raise DownloadError(ErrorCode.TIMEOUT, f"read timeout: {_short(exc)}") from exc
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, ValueError) as exc:
            raise DownloadError(ErrorCode.NETWORK, f"invalid URL: {_short(exc)}") from exc
        except requests.exceptions.RequestException as exc:
            raise DownloadError(ErrorCode.NETWORK, f"connection failed: {_short(exc)}") from exc

    def _finish(self, response: requests.Response, url: str, started: float, deadline: float) -> FetchResult:
        headers = response.headers
        if response.status_code != 200:
            raise HttpStatusError(response.status_code, dict(headers), time.monotonic() - started)
        if self.settings.respect_x_robots_tag:
            directive = x_robots_opt_out(_header_values(response, "X-Robots-Tag"), self.settings.robots_token)
            if directive:
                raise DownloadError(ErrorCode.X_ROBOTS_TAG, f"X-Robots-Tag: {directive}")
        declared = headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.settings.max_bytes:
            raise DownloadError(
                ErrorCode.TOO_LARGE, f"Content-Length {declared} over the {self.settings.max_bytes}-byte cap"
            )
        body = self._read_body(response, deadline)
        return FetchResult(200, body, dict(headers), url, time.monotonic() - started)

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        raw = response.raw
        try:
            while True:
                if time.monotonic() > deadline:
                    raise DownloadError(
                        ErrorCode.TIMEOUT,
                        f"total time limit of {self.settings.total_timeout:g}s reached mid-body",
                    )
                # read1 returns after at most one socket read, so a trickling server cannot hold us past the deadline.
                chunk = raw.read1(CHUNK_BYTES, decode_content=True)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.settings.max_bytes:
                    raise DownloadError(ErrorCode.TOO_LARGE, f"body over the {self.settings.max_bytes}-byte cap")
                chunks.append(chunk)
        except DownloadError:
            raise
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as exc:
            raise DownloadError(ErrorCode.TIMEOUT, f"read timeout mid-body: {_short(exc)}") from exc
        except urllib3.exceptions.DecodeError as exc:
            raise DownloadError(ErrorCode.PROTOCOL, f"bad content encoding: {_short(exc)}") from exc
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise DownloadError(ErrorCode.NETWORK, f"connection broken mid-body: {_short(exc)}") from exc
        return b"".join(chunks)


def _header_values(response: requests.Response, name: str) -> list[str]:
    raw_headers = getattr(response.raw, "headers", None)
    if raw_headers is not None and hasattr(raw_headers, "getlist"):
        return list(raw_headers.getlist(name))
    value = response.headers.get(name)
    return [value] if value else []


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
