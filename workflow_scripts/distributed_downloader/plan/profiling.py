"""Profiling: probe every server for real before scheduling it.

Per server (servers probed in parallel, each with at most two requests): robots.txt by RFC 9309
(robots.py: rules, Crawl-delay, Request-rate), then, after waiting the server's pace (Crawl-delay or
the starting rate, bounded), one GET of the first URL robots.txt allows among the first few of its
first partition, for reachability, latency and rate-limit headers. No allowed URL among them, or
a Crawl-delay too long to wait: no probe, reachability from the robots.txt answer alone.

robots.txt unavailable (5xx, unreachable) or rate limited (429) is a transient state, never a
reason to ignore the server: the profile records it (``robots_status``) and nothing else is
requested; the download stage asks the robots cache again (it re-fetches after a few minutes) and
writes transient error rows while it stays so.

Writes the profiles table, the ignored table and the robots cache (robots/<server>.txt + .json).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pyarrow.parquet as pq

from distributed_downloader.config import batch_folder
from distributed_downloader.errors import DownloadError, ErrorCode, is_transient
from distributed_downloader.net.fetch import FetchSettings, HttpStatusError, ServerFetcher
from distributed_downloader.net.politeness import advertised_rate
from distributed_downloader.net.robots import PARSE_LIMIT, RobotsCache, RobotsFetch, RobotsStatus, fetch_robots
from distributed_downloader.store.files import atomic_write_text

log = logging.getLogger(__name__)
ROBOTS_MAX_BYTES = PARSE_LIMIT  # kept for callers of the old name
PROBE_CANDIDATES = 10  # first URLs of partition 0 tried for one that robots.txt allows
PROBE_MAX_WAIT = 30.0  # longest pause between robots.txt and the probe; a longer Crawl-delay skips the probe


@dataclass
class ServerProfile:
    server_name: str
    total_batches: int
    total_urls: int
    rate_limit: float  # starting requests/s for the whole server
    max_rate: float  # ceiling the adaptive rate may reach for the whole server
    max_connections: int
    latency_ms: float
    probe_status: int
    robots_found: bool
    crawl_delay: float
    advertised_rate: float
    reachable: bool
    reason: str = ""
    error_code: int = 0
    # Added for RFC 9309 (older tables without them read as the defaults):
    robots_status: str = ""  # a RobotsStatus value; "" when robots.txt was not consulted
    robots_fetched_at: float = 0.0  # epoch seconds of that robots.txt answer
    probe_url: str = ""  # the URL probed; "" when no probe request was sent
    last_request_at: float = 0.0  # epoch seconds when profiling's last request to the server ended

    @property
    def robots_transient(self) -> bool:
        """robots.txt was unavailable or rate limited: nothing may be downloaded until it is fetched again."""
        return self.robots_status in (RobotsStatus.UNAVAILABLE.value, RobotsStatus.RATE_LIMITED.value)


@dataclass
class ProbeSettings:
    fetch: FetchSettings
    default_rate: float
    max_rate: float
    max_connections: int
    respect_robots: bool
    probe_candidates: int = PROBE_CANDIDATES
    max_probe_wait: float = PROBE_MAX_WAIT
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    # Called with (server, url, body, headers) for a probe answered 200, (server, url, None, headers,
    # status) for one answered with a permanent HTTP error (404, 410...): the download keeps it as the
    # URL's row (the probe is the first request of the download, not an extra one). None: nothing kept.
    keep_probe: Callable[..., None] | None = field(default=None, repr=False)


def probe_server(
    name: str, sample_urls: str | Sequence[str], batches: int, urls: int, settings: ProbeSettings
) -> tuple[ServerProfile, RobotsFetch | None]:
    """Profile one server; never raises. Returns the profile and the robots.txt answer (None: not asked).

    ``sample_urls``: the first URLs of the server's first partition (or one URL).
    """
    candidates = [sample_urls] if isinstance(sample_urls, str) else list(sample_urls)
    candidates = candidates[: max(1, settings.probe_candidates)]
    profile = ServerProfile(
        server_name=name,
        total_batches=batches,
        total_urls=urls,
        rate_limit=settings.default_rate,
        max_rate=settings.max_rate,
        max_connections=settings.max_connections,
        latency_ms=0.0,
        probe_status=0,
        robots_found=False,
        crawl_delay=0.0,
        advertised_rate=0.0,
        reachable=False,
    )
    fetcher = ServerFetcher(settings.fetch, pool_size=1)
    robots: RobotsFetch | None = None
    try:
        probe_url: str | None = candidates[0]
        robots_done = 0.0  # time.monotonic() when the robots.txt answer arrived
        if settings.respect_robots:
            robots = fetch_robots(fetcher, candidates[0])
            robots_done = time.monotonic()
            profile.robots_status = robots.status.value
            profile.robots_fetched_at = robots.fetched_at
            profile.last_request_at = time.time()
            profile.latency_ms = round(robots.elapsed * 1000, 1)
            profile.reachable = robots.http_status > 0
            rules = robots.rules(settings.fetch.robots_token)
            if rules is None:
                # Unavailable / rate limited: disallow everything for now, without a verdict.
                log.info("%s: %s", name, robots.reason)
                return profile, robots
            profile.robots_found = robots.status is RobotsStatus.RULES
            robots_rate = rules.request_rate()
            if robots_rate:
                profile.crawl_delay = round(1.0 / robots_rate, 3)
                profile.max_rate = min(profile.max_rate, robots_rate)
                profile.rate_limit = min(profile.rate_limit, robots_rate)
            probe_url = next((url for url in candidates if rules.allowed(url)), None)
            if probe_url is None:
                return profile, robots  # none of the first URLs may be fetched: the robots answer must do
            gap = 1.0 / profile.rate_limit if profile.rate_limit > 0 else 0.0
            if gap > settings.max_probe_wait:
                return profile, robots  # a Crawl-delay too long to wait here: the download stage keeps it
            wait = robots_done + gap - time.monotonic()
            if wait > 0:
                settings.sleep(wait)
        assert probe_url is not None
        allowed = [url for url in candidates if url == probe_url or rules_allow(robots, settings, url)]
        result_headers, elapsed, body = _probe(fetcher, allowed, profile, reachable=profile.reachable)
        headers = result_headers
        refused = None if body is not None else profile.probe_status  # an HTTP status, or 200 (an answer)
        # A 404 not kept was requested again by the download: one request over new + sample (issue #18).
        permanent = refused is not None and 400 <= refused < 600 and refused != 403 and not is_transient(refused)
        if settings.keep_probe is not None and (body is not None or permanent):
            try:
                if body is not None:
                    settings.keep_probe(name, profile.probe_url, body, headers)
                else:
                    settings.keep_probe(name, profile.probe_url, None, headers, refused)
            except Exception:  # the download fetches it again: nothing is lost
                log.exception("%s: the probe's answer could not be kept", name)
        profile.reachable = True
        profile.latency_ms = round(elapsed * 1000, 1)
        announced = advertised_rate(headers)
        if announced:
            profile.advertised_rate = announced
            profile.max_rate = min(profile.max_rate, announced)
            profile.rate_limit = min(max(profile.rate_limit, announced * 0.9), profile.max_rate)
    except DownloadError as exc:
        profile.reason = f"probe failed: {exc.message}"
        # Unreachable now is not unreachable for good: its URLs are transient rows this round, and
        # the next round's lanes try the server again (their first requests are the new probe).
        private = exc.code == ErrorCode.PRIVATE_ADDRESS
        profile.error_code = int(exc.code) if private else int(ErrorCode.SERVER_UNREACHABLE)
    except Exception as exc:  # a probe must never take the stage down
        profile.reason = f"probe failed: {type(exc).__name__}: {exc}"
        profile.error_code = int(ErrorCode.SERVER_UNREACHABLE)
    finally:
        fetcher.close()
    return profile, robots


def not_probed(name: str, batches: int, urls: int, settings: ProbeSettings) -> ServerProfile:
    """The profile of a server with nothing to download: the defaults, no request sent."""
    return ServerProfile(
        server_name=name,
        total_batches=batches,
        total_urls=urls,
        rate_limit=settings.default_rate,
        max_rate=settings.max_rate,
        max_connections=settings.max_connections,
        latency_ms=0.0,
        probe_status=0,
        robots_found=False,
        crawl_delay=0.0,
        advertised_rate=0.0,
        reachable=True,
        reason="not probed: nothing to download (every row reused from the previous dataset)",
    )


def rules_allow(robots: RobotsFetch | None, settings: ProbeSettings, url: str) -> bool:
    rules = robots.rules(settings.fetch.robots_token) if robots is not None else None
    return rules is None or rules.allowed(url)


PROBE_TRIES = 3  # URLs tried before a server that never answered is judged unreachable
_ANSWERED = frozenset({ErrorCode.X_ROBOTS_TAG, ErrorCode.TDM_RESERVED, ErrorCode.TOO_LARGE, ErrorCode.REDIRECT})


def _probe(
    fetcher: ServerFetcher, allowed: Sequence[str], profile: ServerProfile, reachable: bool
) -> tuple[Mapping[str, str], float, bytes | None]:
    """GET allowed URLs until one gets an answer: one broken URL never judges a whole server.

    A server that answered robots.txt is reachable whatever its URLs do; one that answered nothing
    is tried on up to PROBE_TRIES URLs (stopping at once when the connection is refused, and after
    two timeouts). Raises the last DownloadError when every try failed on a server not known to answer.
    """
    last: DownloadError | None = None
    timeouts = 0
    for url in allowed[:PROBE_TRIES]:
        profile.probe_url = url
        try:
            result = fetcher.get(url)
            profile.probe_status = 200
            return result.headers, result.elapsed, result.body
        except HttpStatusError as exc:
            profile.probe_status = exc.code
            return exc.headers, exc.elapsed, None
        except DownloadError as exc:
            if exc.code in _ANSWERED:  # the server answered (an opt-out, a body over the cap): it is up
                profile.probe_status = 200
                return {}, profile.latency_ms / 1000, None
            last = exc
            if exc.code == ErrorCode.PRIVATE_ADDRESS or "refused" in exc.message or "DNS" in exc.message:
                break
            timeouts += exc.code == ErrorCode.TIMEOUT
            if timeouts >= 2:
                break
        finally:
            profile.last_request_at = time.time()
    assert last is not None
    if reachable:  # robots.txt answered: the server is up, its probed URLs are just broken
        profile.reason = f"probe URLs failed ({last.message}); the server answered robots.txt"
        return {}, profile.latency_ms / 1000, None
    raise last


def first_urls(urls_folder: Path, server: str, count: int = PROBE_CANDIDATES) -> list[str]:
    """The first ``count`` URLs of a server's first partition."""
    handle = pq.ParquetFile(urls_folder / batch_folder(server, 0) / "urls.parquet")
    out: list[str] = []
    for batch in handle.iter_batches(batch_size=max(1, count), columns=["identifier"]):
        out.extend(batch.column(0).to_pylist())
        if len(out) >= count:
            break
    return out[:count]


def first_url(urls_folder: Path, server: str) -> str:
    return first_urls(urls_folder, server, 1)[0]


def read_ignored_list(path: str) -> set[str]:
    """The user's ignored_servers CSV (a server_name column)."""
    if not path:
        return set()
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "server_name" not in [f.strip() for f in reader.fieldnames]:
            raise ValueError(f"ignored_servers file {path} needs a 'server_name' column")
        return {row["server_name"].strip().lower() for row in reader if row.get("server_name", "").strip()}


def profile_all(
    manifest: Mapping,
    urls_folder: Path,
    settings: ProbeSettings,
    user_ignored: set[str],
    threads: int = 32,
    samples: Callable[[str, int], list[str] | None] | None = None,
) -> list[tuple[ServerProfile, RobotsFetch | None]]:
    """Profile every server. ``samples(server, count)``: the probe's candidate URLs when they are not
    the first of partition 0 (a monthly snapshot's URLs to download; [] when it downloads none)."""
    servers = manifest["servers"]
    jobs = []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(servers) or 1))) as pool:
        for name in sorted(servers):
            info = servers[name]
            batches, urls = len(info["fingerprints"]), info["urls"]
            if name in user_ignored:
                profile = ServerProfile(
                    name,
                    batches,
                    urls,
                    0,
                    0,
                    0,
                    0,
                    0,
                    False,
                    0,
                    0,
                    False,
                    "in the user's ignored_servers list",
                    int(ErrorCode.SERVER_IGNORED),
                )
                jobs.append(((profile, None), None))
                continue
            candidates = samples(name, settings.probe_candidates) if samples is not None else None
            if candidates is None:
                candidates = first_urls(urls_folder, name, settings.probe_candidates)
            elif not candidates:  # nothing to download (every row reused): nothing to ask the server
                jobs.append(((not_probed(name, batches, urls, settings), None), None))
                continue
            future = pool.submit(probe_server, name, candidates, batches, urls, settings)
            jobs.append((None, future))
        return [done if future is None else future.result() for done, future in jobs]


def write_tables(
    results: Sequence[tuple[ServerProfile, RobotsFetch | str | None]],
    profiles_table: Path,
    ignored_table: Path,
    robots_dir: Path,
) -> None:
    """The profiles and ignored tables, and each server's robots.txt answer into the robots cache.

    The second item of a result: a RobotsFetch (stored in the cache: ``<server>.txt`` + ``.json``),
    a robots.txt text (stored as found now), or None (robots.txt not consulted: the cache entry goes).
    """
    columns = [f.name for f in fields(ServerProfile)]
    profiles = io.StringIO()
    writer = csv.DictWriter(profiles, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    ignored = io.StringIO()
    ignored_writer = csv.DictWriter(ignored, fieldnames=["server_name", "reason", "error_code"], lineterminator="\n")
    ignored_writer.writeheader()
    robots_dir.mkdir(parents=True, exist_ok=True)
    cache = RobotsCache(robots_dir, token="*")
    for profile, robots in results:
        writer.writerow(asdict(profile))
        if profile.error_code:
            ignored_writer.writerow(
                {
                    "server_name": profile.server_name,
                    "reason": profile.reason,
                    "error_code": profile.error_code,
                }
            )
        if isinstance(robots, str):
            now = time.time()
            robots = RobotsFetch(RobotsStatus.RULES, robots, "robots.txt found", now, checked_at=now)
        if robots is not None:
            cache.store(profile.server_name, robots)
        else:
            for suffix in (".txt", ".json"):
                (robots_dir / f"{profile.server_name}{suffix}").unlink(missing_ok=True)
    atomic_write_text(ignored_table, ignored.getvalue())
    atomic_write_text(profiles_table, profiles.getvalue())


def read_profiles(profiles_table: Path) -> dict[str, ServerProfile]:
    """The profiles table; columns an older table lacks take their defaults, unknown columns are skipped."""
    kinds = {f.name: f.type for f in fields(ServerProfile)}
    out: dict[str, ServerProfile] = {}
    with open(profiles_table, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {}
            for key, text in row.items():
                kind = kinds.get(key) if key is not None else None
                if kind is None:
                    continue
                if kind in ("int", int):
                    values[key] = int(float(text or 0))
                elif kind in ("float", float):
                    values[key] = float(text or 0)
                elif kind in ("bool", bool):
                    values[key] = text == "True"
                else:
                    values[key] = text or ""
            out[row["server_name"]] = ServerProfile(**values)
    return out
