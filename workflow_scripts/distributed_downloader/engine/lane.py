"""One lane: a rank's exclusive share of one server, downloading that server's batches.

The lane thread is the server's dispatcher: it takes a start slot from the lane's RateController
at the moment it sends (no reservations ahead, so a pause or a decrease reaches the very next
request), keeps at most ``concurrency_limit()`` requests in flight, and hands each to a fetch
thread. Every redirect hop takes a slot of the host it goes to (hosts.py). Failed URLs wait in a
backoff queue while the server's other URLs proceed. Results stream to the batch's parquet
writers (bounded memory), committed atomically at the end of the batch.

Retries within a round: a refusal (429/503) says nothing about the URL, so it is retried after
the controller slowed down (up to ``MAX_REFUSALS``); a network failure or a 5xx is retried with
backoff up to ``max_retries`` times; a timeout is not retried in the round (each try costs a
whole read timeout; the next round tries again). A URL that failed the same way in every try of
a round gets a single try in the next one, not the whole ladder again.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from distributed_downloader.config import Paths
from distributed_downloader.engine import reuse
from distributed_downloader.errors import DownloadError, ErrorCode, internal_error_message, is_transient
from distributed_downloader.imaging import process as imaging
from distributed_downloader.net.fetch import FetchSettings, HopGate, HttpStatusError, ServerFetcher
from distributed_downloader.net.hosts import HostRegistry, server_of
from distributed_downloader.net.politeness import LaneLimits, RateController, lane_connections
from distributed_downloader.net.robots import RobotsCache, RobotsFetch, RobotsRules
from distributed_downloader.store.batch_parts import (
    REUSE_SUCCESSES,
    BatchParts,
    read_success_column,
    retry_successes_name,
    round_of_success_file,
    success_files,
)
from distributed_downloader.store.files import (
    ERROR_SCHEMA,
    ERRORS_FILE,
    SUCCESSES_FILE,
    Marker,
    read_table,
    valid_marker,
    write_marker,
)
from distributed_downloader.store.rows import success_row

log = logging.getLogger(__name__)
RATE_SAMPLE_SECONDS = 5.0
MAX_REFUSALS = 10  # 429/503 answers one URL may get in a round before it waits for the next
RETRY_BASE_SECONDS = 0.5  # backoff of the n-th retry: base x 4^(n-1), jittered
HEDGE_AFTER_SECONDS = 2.0  # at a lane's tail, a request silent this long (and 8x the usual latency) is hedged
SAME_FAILURE_NOTE = "same failure in all"  # error_msg note: the next round gives the URL one try
# Fetch threads beyond the lane's connections: a thread decoding an image has given its connection
# back, so the server's next request need not wait for our CPU (that would tie the lane's rate to
# our decode time, not to the server).
DECODE_SLOTS = 2
MAX_BATCH_FAILURES = 3  # batches of a server failing in a row (not one URL: the batch) before it is set aside
PROCESS_STARTED = time.time()  # one download job per round: when this round's worker started


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
    memory: dict | None = None  # the whole server's learned state (rate, level, connection_cap, paused_until)
    not_before: float = 0.0  # epoch: profiling's last request + one interval (no back-to-back requests)

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
    failed: str = ""  # why the batch was not committed (it is downloaded again next round)

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["statuses"] = {str(k): v for k, v in self.statuses.items()}
        data["error_codes"] = {str(k): v for k, v in self.error_codes.items()}
        return data


@dataclass(eq=False)
class _Item:
    row: dict
    attempt: int = 0  # failed tries in this round (refusals not counted: they say nothing of the URL)
    prior_retries: int = 0  # retry_count carried from earlier rounds
    max_attempts: int | None = None  # retries allowed in this round (None: max_retries)
    refusals: int = 0
    codes: list[int] = field(default_factory=list)  # failure codes of this round's tries
    run: _BatchRun | None = None  # the batch the item belongs to
    copies: int = 0  # requests for this URL in flight now (2 while hedged)
    sent_at: float = 0.0  # when the oldest copy in flight was sent
    hedged: bool = False  # a second copy was sent for a stalled first one (once per round)
    settled: bool = False  # its row is written: any later answer is dropped
    gates: list = field(default_factory=list)  # the gates of its copies in flight (to cancel a loser)


@dataclass
class _Outcome:
    item: _Item
    success: dict | None = None
    code: int = 0
    message: str = ""
    nbytes: int = 0
    status: int = 0  # HTTP status of the final answer; -1 network failure/timeout; 0 no request
    cancelled: bool = False  # we ended the request ourselves (a stalled copy, resent)


@dataclass(eq=False)
class _BatchRun:
    """One batch in progress: its writers, its URLs still to send, waiting to retry, or in flight."""

    partition_id: int
    fingerprint: str
    mode: str
    stats: BatchStats
    final_dir: Path
    parts: BatchParts  # rows made durable every few seconds (a kill costs seconds, not the batch)
    appending: bool  # a retry: new successes go in a file of their own beside the committed ones
    kept_errors: list = field(default_factory=list)  # earlier error rows that stand (no retry)
    ready: deque = field(default_factory=deque)  # items to send now
    backoff: list = field(default_factory=list)  # heap of (due, order, item): failed items waiting to retry
    in_flight: int = 0
    flying: set = field(default_factory=set)  # items with a request in flight
    suspects: int = 0  # 403s held until we know whether they were a ban
    started: float = 0.0
    next_sample: float = 0.0
    failed: str = ""  # set when the batch broke: answers still in flight for it are dropped

    @property
    def waiting(self) -> bool:
        """Work left besides what is in flight."""
        return bool(self.ready or self.backoff)

    @property
    def idle(self) -> bool:
        return not self.ready and not self.backoff and self.in_flight == 0


class _NoRobotsSlot(Exception):
    """A robots.txt fetch found no rate slot of its host within the wait allowed (a long pause)."""


END_OF_BATCHES = None  # what a lane's inbox carries when the coordinator has no more batches for it


class Lane:
    """Runs batches of one server for one rank; keeps its rate controller across batches."""

    def __init__(
        self,
        spec: LaneSpec,
        config: Mapping,
        paths: Paths,
        round_no: int,
        hosts: HostRegistry | None = None,
        robots_cache: RobotsCache | None = None,
    ) -> None:
        params = config["downloader_parameters"]
        self.spec = spec
        self.paths = paths
        self.round_no = round_no
        self.fetch_settings = FetchSettings.from_config(params)
        self.image_settings = imaging.ImageSettings.from_config(params)
        self.max_retries = params["max_retries"]
        self.failure_threshold = params["server_failure_threshold"]
        self.max_pause = float(params.get("max_pause_seconds", 600))
        self.checkpoint_seconds = float(params["checkpoint_seconds"])
        self.controller = lane_controller(spec)
        self.hosts = hosts or HostRegistry(params["default_rate_limit"], 1, spec.decrease)
        self.hosts.register_lane(spec.server_name, self.controller)
        self.robots_cache: RobotsCache | None = None
        if params["respect_robots_txt"]:
            self.robots_cache = robots_cache or RobotsCache(paths.robots, self.fetch_settings.robots_token)
        self.robots = RobotsRules(None, self.fetch_settings.robots_token)
        self.robots_unavailable: str = ""  # why robots.txt forbids everything for now ('' when it does not)
        self._robots_checked = -1e9
        self._robots_round_checked = False
        self._robots_known = False  # rules obtained from the cache at least once
        self._sample_url = ""
        if spec.not_before:
            self.controller.not_before(spec.not_before)
        self.fetcher: ServerFetcher | None = None
        self.pool: ThreadPoolExecutor | None = None
        if not spec.ignored_code:
            connections = self.controller.limits.max_connections
            self.fetcher = ServerFetcher(self.fetch_settings, pool_size=connections)
            self.pool = ThreadPoolExecutor(
                max_workers=connections + DECODE_SLOTS, thread_name_prefix=f"fetch-{spec.server_name}"
            )
        self.consecutive_failures = 0
        self.server_failed = False
        self.batch_failures = 0  # batches failed in a row
        self.set_aside = ""  # why the server's batches are not downloaded this round ('' while they are)
        self._pending_failed: list[BatchStats] = []  # batches that broke in the dispatcher, to report
        self.current: BatchStats | None = None
        self._suspects: list[_Outcome] = []  # 403s that may turn out to be a ban
        self._bans_seen = 0

    def _robots_fetcher(self, server: str) -> Callable[[], ServerFetcher]:
        """What the cache calls only when it must fetch: a robots.txt request takes a rate slot of its
        host like any request (raises _NoRobotsSlot while the host pauses us beyond what we may wait)."""
        own = server == self.spec.server_name
        controller = self.controller if own else self.hosts.controller_for(server)
        max_wait = self.max_pause if own else min(self.max_pause, 60.0)

        def make() -> ServerFetcher:
            if not controller.acquire(max_wait=max_wait):
                raise _NoRobotsSlot(f"{server} is pausing us: its robots.txt is not fetched now")
            return ServerFetcher(self.fetch_settings, pool_size=1)

        return make

    def rules_for(self, server: str, url: str) -> RobotsRules | RobotsFetch:
        """robots.txt rules of any host (fetched on first need, cached on disk for every rank)."""
        if self.robots_cache is None:
            return self.robots
        return self.robots_cache.get(server, url, self._robots_fetcher(server), _RobotsGate(self))

    def _refresh_robots(self, force: bool = False) -> None:
        """Look at the server's robots.txt again (a dict lookup until the cached copy is 24 h old).

        A cache that breaks (disk full, read-only, a parser raising) leaves the rules known so far
        in force; with none known yet, nothing is fetched this round (robots.txt unavailable, -15).
        """
        try:
            self._refresh_robots_now(force)
        except Exception as exc:
            log.warning("%s: robots.txt could not be read or cached: %s", self.spec.key, exc, exc_info=exc)
            if not self._robots_known:
                self.robots_unavailable = internal_error_message(exc, "reading robots.txt")

    def _refresh_robots_now(self, force: bool) -> None:
        now = time.monotonic()
        if self.robots_cache is None or not self._sample_url or (not force and now - self._robots_checked < 30):
            return
        self._robots_checked = now
        if not self._robots_round_checked:
            self._robots_round_checked = True
            # RFC 9309: an unavailable robots.txt forbids everything *for now*; a later round asks again.
            held = self.robots_cache.status(self.spec.server_name)
            stale = held is not None and (held.checked_at or held.fetched_at) < PROCESS_STARTED
            if held is not None and held.transient and self.round_no > 1 and stale:
                with contextlib.suppress(_NoRobotsSlot):  # then the cache's answer below stands
                    self.robots_cache.refresh(
                        self.spec.server_name,
                        self._sample_url,
                        self._robots_fetcher(self.spec.server_name),
                        _RobotsGate(self),
                    )
        try:
            got = self.rules_for(self.spec.server_name, self._sample_url)
        except _NoRobotsSlot as exc:  # paused beyond max_pause: the rules known so far stand, if any
            if not self._robots_known:
                self.robots_unavailable = str(exc)
            return
        if isinstance(got, RobotsFetch):
            self.robots_unavailable = got.reason or "robots.txt unavailable"
            return
        self.robots_unavailable = ""
        self._robots_known = True
        if got is not self.robots:
            self.robots = got
            rate = got.request_rate()
            self.controller.cap_rate(None if rate is None else rate * self.controller.share)

    def close(self) -> None:
        self.hosts.unregister_lane(self.spec.server_name, self.controller)
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
            "rate": round(self.controller.rate, 3),
            # What the server memory keeps: the low end of a level read through a pause.
            "level": None if (level := self.controller.remembered_level()) is None else round(level, 3),
            "level_guessed": self.controller.level_guessed,
            # The level it runs at: above "level" when read through a pause (the next run probes up to it).
            "level_reading": None if self.controller.level is None else round(self.controller.level, 3),
            "connection_cap": self.controller.connection_cap,
            "paused_until": round(self.controller.paused_until_epoch(), 3),
            "share": self.controller.share,
            "connection_share": self.controller.connection_share,
            "paused_for": round(self.controller.paused_for(), 1),
            "congestion": self.controller.events["congestion"],
            "answers": self.controller.answers,
            "peak": round(self.controller.peak, 3),  # the most it saw the server accept per second
            "done": 0 if batch is None else batch.processed,
            "successes": 0 if batch is None else batch.new_successes,
            "bytes": 0 if batch is None else batch.bytes,
            "failed": self.server_failed,
        }

    def run_batch(self, partition_id: int, fingerprint: str, mode: str) -> BatchStats:
        """Download one batch and commit it (no pipelining: tests and one-off use)."""
        done: list[BatchStats] = []
        inbox: queue.Queue = queue.Queue()
        inbox.put({"partition_id": partition_id, "fingerprint": fingerprint, "mode": mode})
        inbox.put(END_OF_BATCHES)
        self.run_lane(inbox, ask_more=lambda: None, finished=done.append)
        return done[0]

    def run_lane(
        self, inbox: queue.Queue, ask_more: Callable[[], None], finished: Callable[[BatchStats], None]
    ) -> None:
        """Download the batches the inbox brings, pipelined, until it brings END_OF_BATCHES.

        The next batch is asked for (``ask_more``) as soon as every URL of the current ones has been
        sent, so the lane keeps the server busy while the last requests of a batch (a stall waiting
        for its timeout, a retry waiting for its backoff) finish; each batch is committed on its own
        the moment its last URL has a row (``finished``).
        """
        runs: list[_BatchRun] = []
        results: queue.Queue[_Outcome] = queue.Queue()
        order = itertools.count()
        asked, ended = True, False  # the first batch comes with the lane
        try:
            while True:
                while not ended:  # batches that arrived
                    try:
                        batch = inbox.get(block=not runs, timeout=0.25)
                    except queue.Empty:
                        break
                    asked = False
                    if batch is END_OF_BATCHES:
                        ended = True
                        break
                    run = self._open_guarded(batch, finished)
                    if run is not None:
                        runs.append(run)
                while self._pending_failed:
                    finished(self._pending_failed.pop(0))
                if not ended and not asked and not any(run.waiting for run in runs):
                    asked = True  # everything sent: the next batch, while the last answers come back
                    ask_more()
                for run in [run for run in runs if run.idle]:
                    if run.suspects:
                        if any(other.in_flight for other in runs):
                            continue  # a 403 burst may still turn out to be a ban
                        self._flush_suspects(runs, banned=False)
                        if run not in runs:  # its error rows could not be written: reported failed
                            continue
                    runs.remove(run)
                    try:
                        stats = self._commit(run)
                        self.batch_failures = 0
                    except Exception as exc:  # disk full, a writer that broke: this batch, not the job
                        stats = self._fail_batch(run, exc, "committing it")
                    finished(stats)
                if not runs:
                    if ended:
                        return
                    continue
                self._pump(runs, results, order)
        except BaseException:
            for run in runs:  # the parts on disk stay: the next attempt carries them over
                run.parts.discard_buffer()
            raise

    def _open_guarded(self, batch: Mapping, finished: Callable[[BatchStats], None]) -> _BatchRun | None:
        """Open a batch; a batch that cannot be opened is reported failed (the next round redoes it)."""
        partition_id, fingerprint, mode = batch["partition_id"], batch["fingerprint"], batch["mode"]
        if self.set_aside:
            stats = BatchStats(self.spec.server_name, partition_id, mode, started_at=round(time.time(), 3))
            stats.failed, stats.server_failed = self.set_aside, True
            finished(stats)
            return None
        try:
            return self._open(partition_id, fingerprint, mode)
        except Exception as exc:  # an unreadable URL list, a library raising on a row...
            stats = BatchStats(self.spec.server_name, partition_id, mode, started_at=round(time.time(), 3))
            finished(self._note_batch_failure(stats, exc, "opening it"))
            return None

    def _fail_batch(self, run: _BatchRun, exc: BaseException, where: str) -> BatchStats:
        """Drop a batch that broke: rows not yet in a part go, committed files and parts stay as they were."""
        run.failed = str(exc) or type(exc).__name__
        run.parts.discard_buffer()
        run.stats.seconds = round(time.monotonic() - run.started, 3)
        return self._note_batch_failure(run.stats, exc, where)

    def _note_batch_failure(self, stats: BatchStats, exc: BaseException, where: str) -> BatchStats:
        stats.failed = internal_error_message(exc, f"{where}: batch not written, downloaded again next round")
        log.error("%s batch %s failed: %s", self.spec.key, stats.partition_id, stats.failed, exc_info=exc)
        self.batch_failures += 1
        if self.batch_failures >= MAX_BATCH_FAILURES and not self.set_aside:
            self.set_aside = f"set aside for this round after {self.batch_failures} failed batches: {stats.failed}"
            log.error("%s: %s", self.spec.server_name, self.set_aside)
        stats.server_failed = bool(self.set_aside)
        return stats

    def _open(self, partition_id: int, fingerprint: str, mode: str) -> _BatchRun:
        """Stage a batch: its writers, the rows kept from earlier rounds, the items to try."""
        started = time.monotonic()
        stats = BatchStats(self.spec.server_name, partition_id, mode, started_at=round(time.time(), 3))
        self.current = stats
        final_dir = self.paths.batch_images(self.spec.server_name, partition_id)
        for leftover in final_dir.glob(".*.tmp"):  # a temp file of a write cut short by a kill
            leftover.unlink(missing_ok=True)
        marker = valid_marker(final_dir, fingerprint)
        appending = mode == "retry" or (mode == "ignored" and marker is not None)
        parts = BatchParts(final_dir, fingerprint, self.round_no, self.checkpoint_seconds)
        if marker is not None:
            # A kill between a commit's marker and the removal of its parts: they are in the files.
            parts.drop_committed(marker.round)
            # A success file of a later round than the marker's is a commit cut short (its rows are
            # still in the parts, or will be downloaded again).
            for path in success_files(final_dir):
                if round_of_success_file(path) > marker.round:
                    path.unlink()
        run = _BatchRun(
            partition_id,
            fingerprint,
            mode,
            stats,
            final_dir,
            parts,
            appending,
            started=started,
            next_sample=started,
        )
        urls = pq.read_table(self.paths.batch_urls(self.spec.server_name, partition_id)).to_pylist()
        stats.urls = len(urls)
        # Issue #18 hook (reuse.py): on a batch's first open, rows of a previous dataset are copied (or keep
        # their error) without a request; a revalidation row comes back with its conditional headers.
        opened = reuse.open_batch(
            self.paths, self.spec.server_name, partition_id, fingerprint, urls, marker is None, parts
        )
        urls = opened.download
        stats.successes += opened.copied
        for error in opened.kept_errors:
            run.kept_errors.append(error)
            self._count_error(stats, error["error_code"])
        if urls and mode != "ignored" and not self.spec.ignored_code:  # an ignored server hears nothing
            self._sample_url = urls[0]["identifier"]
            self._refresh_robots(force=True)
        todo = self._carry_over(run, urls)
        stats.todo = len(todo)
        for item in todo:
            item.run = run
        if mode == "ignored" or self.spec.ignored_code:
            for item in todo:
                code = self.spec.ignored_code or int(ErrorCode.SERVER_IGNORED)
                self._write_error(item, code, self.spec.ignored_reason or "server ignored")
        else:
            run.ready.extend(todo)
        return run

    def _commit(self, run: _BatchRun) -> BatchStats:
        """Merge the batch's parts into its files, then write its marker: the batch is done.

        A retry appends ``successes-r{round}.parquet`` beside the images already stored (never
        rewriting them); a full download replaces every success file. ``errors.parquet`` (small) is
        rewritten whole. Until the marker is written the parts stay, so a kill anywhere in here
        leaves a batch the next attempt commits again.
        """
        stats = run.stats
        target = run.final_dir / (retry_successes_name(self.round_no) if run.appending else SUCCESSES_FILE)
        try:
            run.final_dir.mkdir(parents=True, exist_ok=True)
            run.parts.write_successes(target)
            if not run.appending:  # files of an older URL list of this folder
                for path in success_files(run.final_dir):
                    if path != target and path.name != REUSE_SUCCESSES:  # issue #18: reused rows, kept
                        path.unlink()
            run.parts.write_errors(run.kept_errors)
            marker = Marker(run.fingerprint, self.round_no, stats.successes, stats.errors, stats.transient)
            write_marker(run.final_dir, marker)
        except OSError as exc:
            committed = valid_marker(run.final_dir, run.fingerprint)
            if committed is None or committed.round != self.round_no:
                run.parts.discard_buffer()
                if run.appending:  # a retry's own file without its marker would count its rows twice
                    with contextlib.suppress(OSError):
                        target.unlink(missing_ok=True)
                raise OSError(
                    exc.errno,
                    f"batch {self.spec.server_name}/partition_id={run.partition_id} not written: {exc.strerror}",
                    str(run.final_dir),
                ) from exc
            log.warning("%s batch %s: committed, but then: %s", self.spec.key, run.partition_id, exc)
        run.parts.remove()
        stats.seconds = round(time.monotonic() - run.started, 3)
        stats.rate_end = self.controller.rate
        stats.server_failed = self.server_failed
        return stats

    def _carry_over(self, run: _BatchRun, urls: list[dict]) -> list[_Item]:
        """Rows earlier attempts and rounds left, and the items this attempt must (re)try.

        What counts as done: successes in the batch's committed files (a retry: only their uuid
        column is read, never the images) and in the parts of an attempt that did not commit;
        error rows of this round's parts; permanent error rows of earlier rounds. Transient error
        rows of earlier rounds are tried again. A uuid found among successes wins over an error row.
        """
        stats = run.stats
        expected = {row["uuid"] for row in urls}
        done_ids = run.parts.carried_successes() & expected
        from_parts = len(done_ids)  # rows an earlier attempt (or profiling's probe) made: done this round
        if run.appending:  # (success files newer than the marker were removed in _open)
            done_ids |= set(read_success_column(run.final_dir, "uuid").to_pylist()) & expected
            old_errors = read_table(run.final_dir / ERRORS_FILE, ERROR_SCHEMA).to_pylist()
        else:
            old_errors = []
        stats.successes += len(done_ids)
        earlier: dict[str, tuple[dict, bool]] = {}  # uuid -> (its latest error row of an earlier round, from parts)
        current: dict[str, dict] = {}  # uuid -> its error row of this round (final for this round)
        for error in old_errors:
            earlier[error["uuid"]] = (error, False)
        for round_no, error in run.parts.carried_errors():
            if round_no == self.round_no:
                current[error["uuid"]] = error
            else:
                earlier[error["uuid"]] = (error, True)
        by_uuid = {row["uuid"]: row for row in urls}
        todo: list[_Item] = []
        for uuid, error in current.items():
            if uuid in by_uuid and uuid not in done_ids:
                done_ids.add(uuid)
                from_parts += 1
                self._count_error(stats, error["error_code"])
        for uuid, (error, in_parts) in earlier.items():
            if uuid not in by_uuid or uuid in done_ids:
                continue
            done_ids.add(uuid)
            if is_transient(error["error_code"]) or run.mode == "ignored":
                # A URL that failed the same way in every try of its last round: one try, no ladder.
                single = SAME_FAILURE_NOTE in (error["error_msg"] or "")
                todo.append(
                    _Item(by_uuid[uuid], prior_retries=error["retry_count"] + 1, max_attempts=0 if single else None)
                )
            else:
                run.kept_errors.append(error)
                from_parts += in_parts
                self._count_error(stats, error["error_code"])
        # URLs in no file (a first attempt, or a batch whose files were lost) are downloaded.
        todo.extend(_Item(row) for row in urls if row["uuid"] not in done_ids)
        stats.processed += from_parts  # progress counts them with this round's work (worker._todo)
        return todo

    @staticmethod
    def _count_error(stats: BatchStats, code: int) -> None:
        stats.errors += 1
        stats.error_codes[int(code)] += 1
        if is_transient(code):
            stats.transient += 1

    # ------------------------------------------------------------------ the download loop

    def _pump(self, runs: list[_BatchRun], results: queue.Queue[_Outcome], order: itertools.count) -> None:
        """One step of the dispatcher: send what is due, or wait a little for answers and handle them."""
        assert self.pool is not None
        now = time.monotonic()
        for run in runs:
            if now >= run.next_sample:  # the rate's trajectory, for the report
                run.stats.rate_samples.append([round(now - run.started, 1), round(self.controller.rate, 3)])
                run.next_sample = now + RATE_SAMPLE_SECONDS
            while run.backoff and run.backoff[0][0] <= now:
                run.ready.append(heapq.heappop(run.backoff)[2])
        for run in list(runs):
            try:
                run.parts.flush_if_due(now)
            except Exception as exc:  # a part that cannot be written: the batch, not the lane
                self._break_run(run, exc, "writing a part of it", runs)
        if any(run.waiting for run in runs):
            stop = self._stop_reason()
            if stop is not None:  # the rest waits for the next round
                for run in list(runs):
                    for item in [*run.ready, *(entry[2] for entry in run.backoff)]:
                        if not item.settled and not item.copies and not run.failed:  # a hedge's first is out
                            self._write_error_or_break(item, *stop, runs=runs)
                    run.ready.clear()
                    run.backoff.clear()
        tail = not any(run.ready for run in runs)
        # Connections are the server's requests not yet answered (the controller's tickets); an item
        # still counts in `in_flight` while its image is decoded, which only DECODE_SLOTS may add.
        connections = self.controller.concurrency_limit()
        # A stall mid-batch is cut too (resent later): waiting out its read timeout kept a batch,
        # and on a small server the round, open ~20 s for one URL (measured on the heavy farm).
        self._hedge_stalled(runs, now, resend=not tail)
        in_flight = sum(run.in_flight for run in runs)
        wait = 0.25
        sender = next((run for run in runs if run.ready), None)  # the oldest batch first
        if (
            sender is not None
            and self.controller.in_flight < connections
            and in_flight < self.controller.limits.max_connections + DECODE_SLOTS
        ):
            item = sender.ready[0]
            if item.settled:  # a hedge whose first copy answered meanwhile
                sender.ready.popleft()
                return
            try:
                allowed = self.robots.allowed(item.row["identifier"])
            except Exception as exc:  # a parser raising on one odd URL: that URL's error row
                sender.ready.popleft()
                self._item_failed(item, exc, "checking robots.txt", runs)
                return
            if not allowed:
                sender.ready.popleft()
                self._write_error_or_break(item, int(ErrorCode.ROBOTS_DISALLOWED), "disallowed by robots.txt", runs)
                return
            wait = self.controller.try_take()
            if wait <= 0:
                sender.ready.popleft()
                ticket, concurrency = self.controller.started()
                sender.in_flight += 1
                if not item.copies:
                    item.sent_at = time.monotonic()
                item.copies += 1
                sender.flying.add(item)
                self.pool.submit(self._fetch_one, item, time.monotonic(), concurrency, ticket, results)
                return
        due = [run.backoff[0][0] for run in runs if run.backoff]
        if due:
            wait = min(wait, min(due) - now)
        wait = max(0.001, min(wait, 0.25))
        if not in_flight:
            time.sleep(wait)
            return
        try:
            outcome = results.get(timeout=wait)
        except queue.Empty:
            return
        while True:
            item = outcome.item
            assert item.run is not None
            item.run.in_flight -= 1
            item.copies -= 1
            for gate in [gate for gate in item.gates if gate.finished]:
                item.gates.remove(gate)
            if not item.copies:
                item.run.flying.discard(item)
            if not item.run.failed:  # a batch that broke meanwhile takes no more rows
                try:
                    self._handle(outcome, runs, order)
                except Exception as exc:
                    self._item_failed(item, exc, "handling its answer", runs)
            try:
                outcome = results.get_nowait()
            except queue.Empty:
                return

    def _hedge_stalled(self, runs: list[_BatchRun], now: float, resend: bool) -> None:
        """Send a second copy of a request stuck far beyond the usual latency (once per URL and round).

        A one-off stall would otherwise hold a connection, its batch and at a lane's tail the end
        of the run, until its read timeout. At the tail the stuck request keeps running beside its
        copy (the first answer wins, the other is cancelled); before the tail it is cancelled at
        once (``resend``), which frees the server's connection too, and its URL goes back to the
        front of the queue. The copy takes a rate slot like any request.
        """
        after = max(HEDGE_AFTER_SECONDS, 8 * self.controller.latency)
        for run in runs:
            for item in list(run.flying):
                gates = list(item.gates)
                if item.hedged or item.settled or any(gate.waiting or gate.finished for gate in gates):
                    continue  # queued for a redirect target's slot, or answered: a copy would not help
                # Silence: since the last hop was sent or the last byte came (a big file streaming is no stall).
                if now - max([item.sent_at, *(max(gate.sent_at, gate.progress) for gate in gates)]) > after:
                    item.hedged = True
                    run.ready.appendleft(item)
                    if resend:
                        for gate in list(item.gates):
                            gate.cancel()

    def _stop_reason(self) -> tuple[int, str] | None:
        """Why the lane sends nothing more this round, or None."""
        self._refresh_robots()
        if self.robots_unavailable:
            return (
                int(ErrorCode.ROBOTS_UNAVAILABLE),
                f"{self.robots_unavailable}: nothing may be fetched for now (RFC 9309), tried again next round",
            )
        if self.server_failed:
            return (
                int(ErrorCode.NETWORK),
                f"server given up after {self.failure_threshold} consecutive network failures",
            )
        paused = self.controller.paused_for()
        if paused > self.max_pause:
            code = ErrorCode.BANNED if self.controller.is_banned() else ErrorCode.SERVER_PAUSED
            return (
                int(code),
                f"server asked us to wait {paused:.0f}s (Retry-After, quota or ban), more than"
                f" max_pause_seconds={self.max_pause:g}: tried again next round",
            )
        return None

    def _fetch_one(
        self, item: _Item, sent_at: float, concurrency: int, ticket: int, results: queue.Queue[_Outcome]
    ) -> None:
        outcome = _Outcome(item, code=int(ErrorCode.INTERNAL), message="internal error while fetching or decoding it")
        try:
            outcome = self._fetch_and_process(item, sent_at, concurrency, ticket)
        except BaseException as exc:  # never lose an item, whatever a library raised
            with contextlib.suppress(BaseException):  # even an exception whose str() raises
                outcome.message = internal_error_message(exc, "fetching or decoding it")
                log.warning("%s: %s: %s", self.spec.key, item.row["identifier"][:200], outcome.message)
        finally:
            results.put(outcome)  # the lane thread counts every request back, or the batch never ends

    def _fetch_and_process(self, item: _Item, sent_at: float, concurrency: int, ticket: int) -> _Outcome:
        assert self.fetcher is not None
        url = item.row["identifier"]
        gate = _LaneGate(self, sent_at, concurrency)
        item.gates.append(gate)
        if item.settled:  # settled between dispatch and now
            gate.cancel()
        conditional = reuse.conditional_headers(item.row)  # issue #18 hook: a revalidation's conditional GET
        try:
            result = self.fetcher.get(url, gate, headers=conditional)
        except HttpStatusError as exc:
            if exc.code == 304 and conditional:  # issue #18 hook: not modified, the staged copy is the row
                return _Outcome(item, success=reuse.confirmed_row(item.row, exc.headers), status=304)
            return _Outcome(item, code=exc.code, message=exc.message, status=exc.code, cancelled=gate.cancelled)
        except DownloadError as exc:
            network = exc.code in (ErrorCode.NETWORK, ErrorCode.TIMEOUT)
            status = -1 if network else (0 if exc.code in _NOT_SENT else 200)
            return _Outcome(item, code=exc.code, message=exc.message, status=status, cancelled=gate.cancelled)
        finally:
            self.controller.finished(ticket)
            gate.close()
            gate.finished = True  # the lane thread drops it with the outcome (until then: no stall to hedge)
        nbytes = len(result.body)
        try:
            # On the rank's decode threads (one per core it may use), with the MD5 the fetch took while reading.
            image = imaging.process_image_pooled(result.body, self.image_settings, result.md5 or None)
        except DownloadError as exc:
            return _Outcome(item, code=exc.code, message=exc.message, nbytes=nbytes, status=200)
        success = success_row(item.row, image, result.headers)
        return _Outcome(item, success=success, nbytes=nbytes, status=200)

    def _handle(self, outcome: _Outcome, runs: list[_BatchRun], order: itertools.count) -> None:
        item = outcome.item
        run = item.run
        assert run is not None
        stats = run.stats
        if outcome.status:
            stats.requests += 1
            stats.statuses[outcome.status] += 1
        stats.bytes += outcome.nbytes
        if item.settled or (outcome.success is None and item.copies):
            return  # a hedged URL: the other copy's answer won, or may still win
        if outcome.cancelled and outcome.success is None:
            if item not in run.ready:  # its resend was flushed meanwhile: send (or flush) it again
                run.ready.appendleft(item)
            return
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
        if self.controller.bans > self._bans_seen:  # a 403 burst turned out to be a ban
            self._bans_seen = self.controller.bans
            self._flush_suspects(runs, banned=True)
        if outcome.status == 403:
            if self.controller.is_banned():
                self._write_error(item, int(ErrorCode.BANNED), _BAN_MESSAGE)
            else:
                self._suspects.append(outcome)  # a forbidden file, or the start of a ban: decided later
                run.suspects += 1
            return
        if outcome.status:
            self._flush_suspects(runs, banned=False)
        if outcome.success is not None:
            self._settle(item)
            run.parts.append_success(outcome.success)
            stats.successes += 1
            stats.new_successes += 1
            stats.processed += 1
            return
        now = time.monotonic()
        if outcome.status in (429, 503):
            item.refusals += 1
            if item.refusals <= MAX_REFUSALS:
                heapq.heappush(run.backoff, (now, next(order), item))  # the controller already slowed down
                return
        elif is_transient(outcome.code) and outcome.code != ErrorCode.TIMEOUT and not self.server_failed:
            item.codes.append(outcome.code)
            allowed = self.max_retries if item.max_attempts is None else item.max_attempts
            if item.attempt < allowed:
                item.attempt += 1
                delay = RETRY_BASE_SECONDS * 4 ** (item.attempt - 1) * random.uniform(0.5, 1.5)
                heapq.heappush(run.backoff, (now + delay, next(order), item))
                return
        else:
            item.codes.append(outcome.code)
        message = outcome.message
        if is_transient(outcome.code) and len(item.codes) > 1 and len(set(item.codes)) == 1:
            message = f"{message} ({SAME_FAILURE_NOTE} {len(item.codes)} tries of round {self.round_no})"
        self._write_error(item, outcome.code, message)

    def _item_failed(self, item: _Item, exc: BaseException, where: str, runs: list[_BatchRun]) -> None:
        """An exception while handling one URL: that URL's error row; a batch whose writer broke fails."""
        run = item.run
        assert run is not None
        log.warning("%s: %s: error while %s", self.spec.key, item.row.get("identifier", "")[:200], where, exc_info=exc)
        if run.failed:
            return
        if not item.settled:
            try:
                self._write_error(item, int(ErrorCode.INTERNAL), internal_error_message(exc, where))
                return
            except Exception as write_exc:
                exc = write_exc
        # The row may be half-written (settled): only dropping the whole batch keeps it exactly-once.
        self._break_run(run, exc, "writing a row", runs)

    def _break_run(self, run: _BatchRun, exc: BaseException, where: str, runs: list[_BatchRun]) -> None:
        """A batch that cannot go on: it stops here (reported failed), the lane's other batches go on."""
        runs.remove(run)
        for other in [*run.ready, *(entry[2] for entry in run.backoff), *run.flying]:
            self._settle(other)  # copies in flight are cancelled: nobody wants their answer now
        self._suspects = [s for s in self._suspects if s.item.run is not run]
        self._pending_failed.append(self._fail_batch(run, exc, where))

    def _flush_suspects(self, runs: list[_BatchRun], banned: bool) -> None:
        while self._suspects:
            suspect = self._suspects.pop(0)  # popped first: a write that fails is never repeated
            run = suspect.item.run
            assert run is not None
            run.suspects -= 1
            if run.failed:
                continue
            if banned:
                self._write_error_or_break(suspect.item, int(ErrorCode.BANNED), _BAN_MESSAGE, runs)
            else:
                self._write_error_or_break(suspect.item, suspect.code, suspect.message, runs)

    def _write_error_or_break(self, item: _Item, code: int, message: str, runs: list[_BatchRun]) -> None:
        """An error row; if its batch cannot take it, that batch (not the lane, not another batch) fails."""
        try:
            self._write_error(item, code, message)
        except Exception as exc:
            assert item.run is not None
            if item.run in runs:
                self._break_run(item.run, exc, "writing a row", runs)

    def _settle(self, item: _Item) -> None:
        """The URL's row is being written: a hedged copy still out is no longer wanted."""
        item.settled = True
        for gate in list(item.gates):
            gate.cancel()

    def _write_error(self, item: _Item, code: int, message: str) -> None:
        run = item.run
        assert run is not None
        self._settle(item)
        run.parts.append_error(
            {
                "uuid": item.row["uuid"],
                "identifier": item.row["identifier"],
                "retry_count": item.prior_retries + item.attempt,
                "error_code": int(code),
                # Valid UTF-8 whatever an exception's text held (a lone surrogate would break the writer).
                "error_msg": message.encode("utf-8", "replace").decode("utf-8"),
            }
        )
        stats = run.stats
        stats.processed += 1
        self._count_error(stats, code)


_BAN_MESSAGE = "HTTP 403 during a burst of 403s (a temporary ban, likely): tried again next round"
_NOT_SENT = frozenset(
    {ErrorCode.SERVER_PAUSED, ErrorCode.ROBOTS_DISALLOWED, ErrorCode.ROBOTS_UNAVAILABLE, ErrorCode.PRIVATE_ADDRESS}
)


WIDE_READING = 1.1  # a remembered level this far below what its lane ran at is probed like a guess


def lane_controller(spec: LaneSpec) -> RateController:
    """The lane's controller: its share of the server's budget, started from the server's memory."""
    share = 1.0 / max(1, spec.lanes)
    memory = spec.memory or {}
    ceiling = spec.max_rate * share
    start = memory.get("rate") or spec.start_rate
    level = memory.get("level")
    if level:  # just below the level it measured: a remembered rate above it (a probe) forgot it at once
        start = min(start, level * (1.0 - RateController.HEADROOM))
    controller = RateController(
        LaneLimits(
            start_rate=min(start * share, ceiling),
            ceiling=ceiling,
            max_connections=lane_connections(spec.max_connections, spec.lanes, spec.lane_index),
            decrease=spec.decrease,
            floor=share / 30,
            level=None if level is None else min(level * share, ceiling),
        ),
        share=share,
        name=spec.key,
    )
    reading = memory.get("level_reading")
    if level and reading and reading > level * WIDE_READING:
        # The level is the low end of a reading through a long pause (Retry-After of seconds, a
        # small burst): it may lie at half the limit. Held there, a next run sat at 0.4-0.5 of it
        # for LEVEL_HOLD (300 s); probed like a guess (5% a second), one refusal measures it.
        controller.level_guessed = True
    cap = memory.get("connection_cap")
    if cap:
        controller.connection_cap = max(1, int(cap * share))
    if memory.get("paused_until"):
        controller.pause_until(float(memory["paused_until"]))
    return controller


class _LaneGate(HopGate):
    """Politeness for each hop of one fetch: slots, robots and feedback go to the hop's own host."""

    def __init__(self, lane: Lane, sent_at: float, concurrency: int) -> None:
        self.lane = lane
        self.controller = lane.controller
        self.sent_at = sent_at
        self.concurrency = concurrency
        self.tickets: list[tuple[RateController, int]] = []
        self.wire_at: float | None = None  # when this hop's request was written (after our spacing)
        self.waiting = False  # in before_hop, waiting for robots.txt or a slot (silent, but not stalled)
        self.finished = False  # the fetch is over: its answer is being decoded or waits for the lane thread

    def before_hop(self, url: str) -> None:
        server = server_of(url)
        if not server:
            raise DownloadError(ErrorCode.REDIRECT, f"redirect to a URL without a usable host: {url[:200]}")
        own = server == self.lane.spec.server_name
        self.waiting = True
        try:
            self._sleep(0)
            try:
                rules = self.lane.robots if own else self.lane.rules_for(server, url)
            except _NoRobotsSlot as exc:
                raise DownloadError(ErrorCode.SERVER_PAUSED, f"redirect target {exc}: tried next round") from exc
            if isinstance(rules, RobotsFetch):
                raise DownloadError(
                    ErrorCode.ROBOTS_UNAVAILABLE, f"redirect target {server}: {rules.reason}; tried again next round"
                )
            if not rules.allowed(url):
                raise DownloadError(ErrorCode.ROBOTS_DISALLOWED, f"redirect target disallowed by {server}'s robots.txt")
            controller = self.lane.controller if own else self.lane.hosts.controller_for(server)
            if not own:
                self.lane.hosts.cap_budget(server, rules.request_rate())
            self.close()  # the earlier hops' answers are read: their connections are free
            # Another host's budget (or lane) counts its connections in its tickets: wait for one of them.
            wait = min(self.lane.max_pause, 60.0)
            if not controller.acquire(max_wait=wait, sleep=self._sleep, connection=not own):
                raise DownloadError(
                    ErrorCode.SERVER_PAUSED, f"redirect target {server} is pausing us: tried next round"
                )
        finally:
            self.waiting = False
        ticket, concurrency = controller.started()
        self.tickets.append((controller, ticket))
        self.controller, self.sent_at, self.concurrency = controller, time.monotonic(), concurrency
        self.wire_at = None

    def on_wire(self) -> None:
        self.controller.space_send()  # waits out our spacing and any pause of up to 5 s
        if self.controller.paused_for() > 0:
            # A longer pause came after this request took its slot (another answer's Retry-After):
            # nothing is written; as a cancelled copy it goes back to the queue, which waits it out.
            self.cancelled = True
            raise DownloadError(ErrorCode.SERVER_PAUSED, "the server asked for a pause before this request was sent")
        self.wire_at = time.monotonic()

    def wrote(self) -> None:
        if self.wire_at is not None:
            now = time.monotonic()
            self.controller.wrote(now - self.wire_at)
            self.wire_at = now  # the answer's lateness counts from the real write

    def _sleep(self, seconds: float) -> None:
        if self.cancelled:  # a copy no longer wanted leaves the queue without spending a slot
            raise DownloadError(ErrorCode.TIMEOUT, "cancelled while waiting for a redirect target's slot")
        time.sleep(seconds)

    def on_response(self, url: str, status: int, headers: Mapping[str, str], elapsed: float) -> None:
        now = time.monotonic()
        wire_latency = now - self.wire_at if self.wire_at is not None else None
        self.controller.on_response(status, headers, now - self.sent_at, self.sent_at, self.concurrency, wire_latency)

    def on_network_error(self, url: str) -> None:
        if not self.cancelled:  # a hedge we ended ourselves says nothing about the server
            self.controller.on_network_error(self.sent_at)

    def close(self) -> None:
        for controller, ticket in self.tickets:
            controller.finished(ticket)
        self.tickets.clear()


class _RobotsGate(HopGate):
    """A robots.txt fetch's later requests (a redirect hop, the second read of a long file) take a
    rate slot of their host too; the first took one in Lane._robots_fetcher."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane

    def before_hop(self, url: str) -> None:
        server = server_of(url)
        if not server:
            raise DownloadError(ErrorCode.REDIRECT, f"redirect to a URL without a usable host: {url[:200]}")
        own = server == self.lane.spec.server_name
        controller = self.lane.controller if own else self.lane.hosts.controller_for(server)
        if not controller.acquire(max_wait=min(self.lane.max_pause, 60.0)):
            raise DownloadError(ErrorCode.SERVER_PAUSED, f"{server} is pausing us: robots.txt not fetched now")
