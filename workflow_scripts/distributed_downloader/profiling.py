"""Profiling: probe every server for real before scheduling it.

Per server (servers probed in parallel, each with at most two requests): robots.txt (rules and
Crawl-delay), then one GET of its first URL for reachability, latency and rate-limit headers.
Writes the profiles table, the ignored table and each server's robots.txt for the workers.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.parquet as pq

from distributed_downloader.errors import DownloadError, ErrorCode
from distributed_downloader.fetch import FetchSettings, HttpStatusError, ServerFetcher
from distributed_downloader.politeness import RobotsRules, advertised_rate
from distributed_downloader.store import atomic_write_text

log = logging.getLogger(__name__)
ROBOTS_MAX_BYTES = 512 * 1024


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


@dataclass
class ProbeSettings:
    fetch: FetchSettings
    default_rate: float
    max_rate: float
    max_connections: int
    respect_robots: bool


def robots_url(sample_url: str) -> str:
    parts = urlsplit(sample_url)
    return urlunsplit((parts.scheme, parts.netloc, "/robots.txt", "", ""))


def fetch_robots(fetcher: ServerFetcher, sample_url: str) -> tuple[str | None, str]:
    """(robots.txt text or None, reason to skip the server or '').

    RFC 9309: 4xx means no rules; a 5xx or an unreachable robots.txt means disallow everything,
    which we report as a reason to leave the server alone this time.
    """
    try:
        result = fetcher.get(robots_url(sample_url))
    except HttpStatusError as exc:
        if 400 <= exc.code < 500:
            return None, ""
        return None, f"robots.txt answered HTTP {exc.code}: treated as disallow-all (RFC 9309)"
    except DownloadError as exc:
        if exc.code in (ErrorCode.TOO_LARGE, ErrorCode.REDIRECT, ErrorCode.X_ROBOTS_TAG):
            return None, ""
        raise
    return result.body.decode("utf-8", errors="replace"), ""


def probe_server(
    name: str, sample_url: str, batches: int, urls: int, settings: ProbeSettings
) -> tuple[ServerProfile, str | None]:
    """Profile one server; never raises. Returns the profile and its robots.txt text."""
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
    robots_fetch = replace(settings.fetch, max_bytes=ROBOTS_MAX_BYTES)
    fetcher = ServerFetcher(robots_fetch, pool_size=1)
    robots_text: str | None = None
    try:
        if settings.respect_robots:
            robots_text, reason = fetch_robots(fetcher, sample_url)
            if reason:
                return replace(
                    profile, reachable=True, reason=reason, error_code=int(ErrorCode.ROBOTS_DISALLOWED)
                ), None
            rules = RobotsRules(robots_text, settings.fetch.robots_token)
            profile.robots_found = robots_text is not None
            robots_rate = rules.request_rate()
            if robots_rate:
                profile.crawl_delay = round(1.0 / robots_rate, 3)
                profile.max_rate = min(profile.max_rate, robots_rate)
                profile.rate_limit = min(profile.rate_limit, robots_rate)
        fetcher.settings = settings.fetch
        try:
            result = fetcher.get(sample_url)
            profile.probe_status, headers, elapsed = 200, result.headers, result.elapsed
        except HttpStatusError as exc:
            profile.probe_status, headers, elapsed = exc.code, exc.headers, exc.elapsed
        profile.reachable = True
        profile.latency_ms = round(elapsed * 1000, 1)
        announced = advertised_rate(headers)
        if announced:
            profile.advertised_rate = announced
            profile.max_rate = min(profile.max_rate, announced)
            profile.rate_limit = min(max(profile.rate_limit, announced * 0.9), profile.max_rate)
    except DownloadError as exc:
        profile.reason = f"probe failed: {exc.message}"
        profile.error_code = int(exc.code) if exc.code == ErrorCode.PRIVATE_ADDRESS else int(ErrorCode.SERVER_IGNORED)
    except Exception as exc:  # a probe must never take the stage down
        profile.reason = f"probe failed: {type(exc).__name__}: {exc}"
        profile.error_code = int(ErrorCode.SERVER_IGNORED)
    finally:
        fetcher.close()
    return profile, robots_text


def first_url(urls_folder: Path, server: str) -> str:
    table = pq.read_table(
        urls_folder / f"server_name={server}" / "partition_id=0" / "urls.parquet", columns=["identifier"]
    )
    return table.column("identifier")[0].as_py()


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
) -> list[tuple[ServerProfile, str | None]]:
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
            future = pool.submit(probe_server, name, first_url(urls_folder, name), batches, urls, settings)
            jobs.append((None, future))
        return [done if future is None else future.result() for done, future in jobs]


def write_tables(
    results: list[tuple[ServerProfile, str | None]],
    profiles_table: Path,
    ignored_table: Path,
    robots_dir: Path,
) -> None:
    columns = [f.name for f in fields(ServerProfile)]
    profiles = io.StringIO()
    writer = csv.DictWriter(profiles, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    ignored = io.StringIO()
    ignored_writer = csv.DictWriter(ignored, fieldnames=["server_name", "reason", "error_code"], lineterminator="\n")
    ignored_writer.writeheader()
    robots_dir.mkdir(parents=True, exist_ok=True)
    for profile, robots_text in results:
        writer.writerow(asdict(profile))
        if profile.error_code:
            ignored_writer.writerow(
                {
                    "server_name": profile.server_name,
                    "reason": profile.reason,
                    "error_code": profile.error_code,
                }
            )
        robots_path = robots_dir / f"{profile.server_name}.txt"
        if robots_text is not None:
            atomic_write_text(robots_path, robots_text)
        else:
            robots_path.unlink(missing_ok=True)
    atomic_write_text(ignored_table, ignored.getvalue())
    atomic_write_text(profiles_table, profiles.getvalue())


def read_profiles(profiles_table: Path) -> dict[str, ServerProfile]:
    kinds = {f.name: f.type for f in fields(ServerProfile)}
    out: dict[str, ServerProfile] = {}
    with open(profiles_table, newline="") as handle:
        for row in csv.DictReader(handle):
            values = {}
            for key, text in row.items():
                kind = kinds[key]
                if kind in ("int", int):
                    values[key] = int(float(text or 0))
                elif kind in ("float", float):
                    values[key] = float(text or 0)
                elif kind in ("bool", bool):
                    values[key] = text == "True"
                else:
                    values[key] = text
            out[row["server_name"]] = ServerProfile(**values)
    return out
