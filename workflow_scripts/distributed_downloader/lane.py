"""One lane: a rank's exclusive share of one server, downloading that server's batches.

The lane thread walks a batch's URLs, keeps at most `concurrency_limit()` requests in flight,
and each fetch thread claims its start slot from the lane's RateController right before sending,
so requests reach the server paced and never bunched. Results stream to the batch's parquet
writers (bounded memory), which are committed atomically at the end of the batch.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import time
from collections import Counter, deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from distributed_downloader import imaging
from distributed_downloader.config import Paths
from distributed_downloader.errors import DownloadError, ErrorCode, is_transient
from distributed_downloader.fetch import FetchSettings, HttpStatusError, ServerFetcher
from distributed_downloader.inputs import NOT_PROVIDED
from distributed_downloader.politeness import LaneLimits, RateController, RobotsRules
from distributed_downloader.store import (
    ERROR_SCHEMA,
    ERRORS_FILE,
    SUCCESS_SCHEMA,
    SUCCESSES_FILE,
    Marker,
    StreamingParquet,
    read_table,
    write_marker,
)

log = logging.getLogger(__name__)
RATE_SAMPLE_SECONDS = 5.0


@dataclass
class LaneSpec:
    server_name: str
    lane_index: int
    lanes: int
    start_rate: float  # whole server
    max_rate: float  # whole server
    max_connections: int  # whole server
    decrease: float
    ignored_code: int = 0
    ignored_reason: str = ""

    @property
    def key(self) -> str:
        return f"{self.server_name}#{self.lane_index}"


@dataclass
class BatchStats:
    server_name: str
    partition_id: int
    mode: str
    urls: int = 0
    todo: int = 0  # URLs this round tries (the whole batch, or a retry's transient errors)
    processed: int = 0  # of those, finished this round
    new_successes: int = 0
    successes: int = 0
    errors: int = 0
    transient: int = 0
    requests: int = 0
    bytes: int = 0
    statuses: Counter = field(default_factory=Counter)
    error_codes: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    rate_end: float = 0.0
    server_failed: bool = False
    started_at: float = 0.0  # wall-clock epoch seconds
    rate_samples: list = field(default_factory=list)  # [seconds since batch start, requests/s of this lane]

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["statuses"] = {str(k): v for k, v in self.statuses.items()}
        data["error_codes"] = {str(k): v for k, v in self.error_codes.items()}
        return data


@dataclass
class _Item:
    row: dict
    attempt: int = 0  # tries made in this round
    prior_retries: int = 0  # retry_count carried from earlier rounds


@dataclass
class _Outcome:
    item: _Item
    success: dict | None = None
    code: int = 0
    message: str = ""
    nbytes: int = 0
    status: int = 0


def is_license_full(row: Mapping) -> bool:
    return all(row.get(k) not in (None, "", NOT_PROVIDED) for k in ("license", "source", "title"))


class Lane:
    """Runs batches of one server for one rank; keeps its rate controller across batches."""

    def __init__(self, spec: LaneSpec, config: Mapping, paths: Paths, round_no: int) -> None:
        params = config["downloader_parameters"]
        self.spec = spec
        self.paths = paths
        self.round_no = round_no
        self.fetch_settings = FetchSettings.from_config(params)
        self.image_settings = imaging.ImageSettings(
            image_size=params["image_size"],
            image_format=params["image_format"],
            jpeg_quality=params["jpeg_quality"],
            max_image_pixels=params["max_image_pixels"],
        )
        self.max_retries = params["max_retries"]
        self.failure_threshold = params["server_failure_threshold"]
        share = 1.0 / spec.lanes
        connections = max(1, spec.max_connections // spec.lanes)
        self.controller = RateController(
            LaneLimits(
                start_rate=spec.start_rate * share,
                ceiling=spec.max_rate * share,
                max_connections=connections,
                decrease=spec.decrease,
            ),
            share=share,
        )
        self.robots = RobotsRules(
            self._robots_text() if params["respect_robots_txt"] else None, self.fetch_settings.robots_token
        )
        self.fetcher: ServerFetcher | None = None
        self.pool: ThreadPoolExecutor | None = None
        if not spec.ignored_code:
            self.fetcher = ServerFetcher(self.fetch_settings, pool_size=connections)
            self.pool = ThreadPoolExecutor(max_workers=connections, thread_name_prefix=f"fetch-{spec.server_name}")
        self.consecutive_failures = 0
        self.server_failed = False
        self.current: BatchStats | None = None

    def _robots_text(self) -> str | None:
        path = self.paths.robots / f"{self.spec.server_name}.txt"
        try:
            return path.read_text()
        except OSError:
            return None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.fetcher is not None:
            self.fetcher.close()

    # ------------------------------------------------------------------ one batch

    def snapshot(self) -> dict:
        """Live state for progress reports (read without locks: a slightly stale view is fine)."""
        batch = self.current
        return {
            "server": self.spec.server_name,
            "lane": self.spec.lane_index,
            "rate": round(self.controller.rate, 2),
            "paused_for": round(max(0.0, self.controller.paused_until - time.monotonic()), 1),
            "congestion": self.controller.events["congestion"],
            "done": 0 if batch is None else batch.processed,
            "successes": 0 if batch is None else batch.new_successes,
            "bytes": 0 if batch is None else batch.bytes,
            "failed": self.server_failed,
        }

    def run_batch(self, partition_id: int, fingerprint: str, mode: str) -> BatchStats:
        started = time.monotonic()
        stats = BatchStats(self.spec.server_name, partition_id, mode, started_at=round(time.time(), 3))
        self.current = stats
        final_dir = self.paths.batch_images(self.spec.server_name, partition_id)
        for leftover in final_dir.glob(".*.tmp"):  # a temp file of a write cut short by a kill
            leftover.unlink(missing_ok=True)
        staging = (
            self.paths.staging / f"round_{self.round_no}" / f"{self.spec.server_name}" / f"{partition_id}.{os.getpid()}"
        )
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        successes = StreamingParquet(staging / SUCCESSES_FILE, SUCCESS_SCHEMA)
        errors = StreamingParquet(staging / ERRORS_FILE, ERROR_SCHEMA)
        try:
            urls = pq.read_table(self.paths.batch_urls(self.spec.server_name, partition_id)).to_pylist()
            stats.urls = len(urls)
            todo = self._carry_over(final_dir, urls, mode, successes, errors, stats)
            stats.todo = len(todo)
            if mode == "ignored" or self.spec.ignored_code:
                for item in todo:
                    self._write_error(
                        errors,
                        stats,
                        item,
                        self.spec.ignored_code or int(ErrorCode.SERVER_IGNORED),
                        self.spec.ignored_reason or "server ignored",
                    )
            else:
                self._download(todo, successes, errors, stats)
            successes.commit()
            errors.commit()
            final_dir.mkdir(parents=True, exist_ok=True)
            os.replace(staging / SUCCESSES_FILE, final_dir / SUCCESSES_FILE)
            os.replace(staging / ERRORS_FILE, final_dir / ERRORS_FILE)
            write_marker(final_dir, Marker(fingerprint, self.round_no, stats.successes, stats.errors, stats.transient))
        except OSError as exc:
            successes.abort()
            errors.abort()
            raise OSError(
                exc.errno,
                f"batch {self.spec.server_name}/partition_id={partition_id} not written: {exc.strerror}",
                str(staging),
            ) from exc
        except BaseException:
            successes.abort()
            errors.abort()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        stats.seconds = round(time.monotonic() - started, 3)
        stats.rate_end = self.controller.rate
        self.current = None
        stats.server_failed = self.server_failed
        return stats

    def _carry_over(
        self,
        final_dir: Path,
        urls: list[dict],
        mode: str,
        successes: StreamingParquet,
        errors: StreamingParquet,
        stats: BatchStats,
    ) -> list[_Item]:
        """Rows kept from earlier rounds, and the items this round must (re)try.

        In a retry, a uuid found in successes wins over its error row, so a batch whose earlier
        commit was interrupted between its two renames is repaired instead of duplicated.
        """
        if mode == "full":
            return [_Item(row) for row in urls]
        done = read_table(final_dir / SUCCESSES_FILE, SUCCESS_SCHEMA)
        old_errors = read_table(final_dir / ERRORS_FILE, ERROR_SCHEMA).to_pylist()
        expected = {row["uuid"] for row in urls}
        done_ids: set[str] = set()
        for offset in range(0, done.num_rows, 256):  # stream old image rows across in slices
            for row in done.slice(offset, 256).to_pylist():
                if row["uuid"] in expected and row["uuid"] not in done_ids:
                    done_ids.add(row["uuid"])
                    successes.append(row)
                    stats.successes += 1
        by_uuid = {row["uuid"]: row for row in urls}
        todo: list[_Item] = []
        errored: set[str] = set()
        for error in old_errors:
            uuid = error["uuid"]
            if uuid in done_ids or uuid in errored or uuid not in by_uuid:
                continue
            errored.add(uuid)
            if is_transient(error["error_code"]) or mode == "ignored":
                todo.append(_Item(by_uuid[uuid], prior_retries=error["retry_count"] + 1))
            else:
                errors.append(error)
                stats.errors += 1
                stats.error_codes[error["error_code"]] += 1
        # URLs in neither file (a batch whose files were lost) are simply downloaded again.
        todo.extend(_Item(row) for row in urls if row["uuid"] not in done_ids and row["uuid"] not in errored)
        return todo

    # ------------------------------------------------------------------ the download loop

    def _download(
        self, todo: list[_Item], successes: StreamingParquet, errors: StreamingParquet, stats: BatchStats
    ) -> None:
        assert self.pool is not None
        pending: deque[_Item] = deque(todo)
        results: queue.Queue[_Outcome] = queue.Queue()
        in_flight = 0
        started = time.monotonic()
        next_sample = started
        while pending or in_flight:
            now = time.monotonic()
            if now >= next_sample:  # the rate's trajectory, for the report
                stats.rate_samples.append([round(now - started, 1), round(self.controller.rate, 3)])
                next_sample = now + RATE_SAMPLE_SECONDS
            while pending and in_flight < self.controller.concurrency_limit():
                item = pending.popleft()
                if not self.robots.allowed(item.row["identifier"]):
                    self._write_error(errors, stats, item, int(ErrorCode.ROBOTS_DISALLOWED), "disallowed by robots.txt")
                    continue
                if self.server_failed:
                    self._write_error(
                        errors,
                        stats,
                        item,
                        int(ErrorCode.NETWORK),
                        f"server given up after {self.failure_threshold} consecutive network failures",
                    )
                    continue
                self.pool.submit(self._fetch_one, item, results)
                in_flight += 1
            if not in_flight:
                continue
            outcome = results.get()
            in_flight -= 1
            self._handle(outcome, pending, successes, errors, stats)

    def _fetch_one(self, item: _Item, results: queue.Queue[_Outcome]) -> None:
        try:
            results.put(self._fetch_and_process(item))
        except BaseException as exc:  # never lose an item, whatever happened
            results.put(
                _Outcome(item, code=int(ErrorCode.NETWORK), message=f"internal error: {type(exc).__name__}: {exc}")
            )

    def _fetch_and_process(self, item: _Item) -> _Outcome:
        assert self.fetcher is not None
        wait = self.controller.reserve()
        if wait > 0:
            time.sleep(wait)
        url = item.row["identifier"]
        self.controller.started()
        try:
            result = self.fetcher.get(url)
        except HttpStatusError as exc:
            self.controller.on_status(exc.code, exc.headers, exc.elapsed)
            return _Outcome(item, code=exc.code, message=exc.message, status=exc.code)
        except DownloadError as exc:
            if exc.code in (ErrorCode.NETWORK, ErrorCode.TIMEOUT):
                self.controller.on_network_error()
            return _Outcome(
                item,
                code=exc.code,
                message=exc.message,
                status=-1 if exc.code in (ErrorCode.NETWORK, ErrorCode.TIMEOUT) else 200,
            )
        finally:
            self.controller.finished()
        self.controller.on_success(result.elapsed, result.headers)
        try:
            image = imaging.process_image(result.body, self.image_settings)
        except DownloadError as exc:
            return _Outcome(item, code=exc.code, message=exc.message, nbytes=len(result.body), status=200)
        row = item.row
        success = {
            "uuid": row["uuid"],
            "source_id": row["source_id"],
            "identifier": row["identifier"],
            "is_license_full": is_license_full(row),
            "license": row["license"] or NOT_PROVIDED,
            "source": row["source"] or NOT_PROVIDED,
            "title": row["title"] or NOT_PROVIDED,
            "hashsum_original": image.hashsum_original,
            "hashsum_resized": image.hashsum_resized,
            "original_size": list(image.original_size),
            "resized_size": list(image.resized_size),
            "image": image.image,
        }
        return _Outcome(item, success=success, nbytes=len(result.body), status=200)

    def _handle(
        self,
        outcome: _Outcome,
        pending: deque[_Item],
        successes: StreamingParquet,
        errors: StreamingParquet,
        stats: BatchStats,
    ) -> None:
        item = outcome.item
        if outcome.status:
            stats.requests += 1
            stats.statuses[outcome.status] += 1
        stats.bytes += outcome.nbytes
        if outcome.status == -1:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.failure_threshold and not self.server_failed:
                self.server_failed = True
                log.warning(
                    "giving up on %s for this round after %d consecutive network failures",
                    self.spec.server_name,
                    self.consecutive_failures,
                )
        elif outcome.status:
            self.consecutive_failures = 0
        if outcome.success is not None:
            successes.append(outcome.success)
            stats.successes += 1
            stats.new_successes += 1
            stats.processed += 1
            return
        if is_transient(outcome.code) and item.attempt < self.max_retries and not self.server_failed:
            item.attempt += 1
            pending.append(item)  # retried after the rest; the controller already slowed down
            return
        self._write_error(errors, stats, item, outcome.code, outcome.message)

    def _write_error(self, errors: StreamingParquet, stats: BatchStats, item: _Item, code: int, message: str) -> None:
        errors.append(
            {
                "uuid": item.row["uuid"],
                "identifier": item.row["identifier"],
                "retry_count": item.prior_retries + item.attempt,
                "error_code": int(code),
                "error_msg": message,
            }
        )
        stats.errors += 1
        stats.processed += 1
        stats.error_codes[int(code)] += 1
        if is_transient(code):
            stats.transient += 1
