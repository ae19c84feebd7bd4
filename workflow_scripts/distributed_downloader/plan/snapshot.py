"""Monthly snapshots (issue #18): which of this run's URLs an earlier dataset already holds.

Every month ~200M URLs come back, nearly all of them downloaded last month. At initialization,
after the URL lists are cut into batches, each new row is matched against the previous dataset(s):

- **by URL**: the new ``identifier`` equals a previous success's ``identifier``;
- **by source_id** (``match_by_source_id``): the new URL is in no previous success, a previous
  success whose URL left the input has the same ``source_id`` and the same URL path and query
  (only the scheme, host or port changed: a server that moved), that (source_id, path) pair being
  unique among this run's unmatched rows and among the previous rows that left;
- a new URL still unmatched that **failed** before keeps its error row when the failure is
  permanent and younger than ``retry_permanent_errors_after`` days; otherwise it is downloaded.

A matched success is planned as ``reuse`` (copied without a request, reuse.py) or, for a
deterministic sample (``revalidate_fraction``: a hash of the URL salted with this snapshot's URL
lists) and for rows not checked for ``revalidate_older_than`` days, ``revalidate`` (a conditional
GET through the lanes). When a URL succeeded in several previous rows the first listed dataset,
then the lowest file and row, wins.

Bounded memory at 200M rows: the match is one DuckDB full outer join over the parquet files
(``memory_mb``, spilling beside the output), written partitioned by batch; a second, small join
handles the rows left unmatched (source_id, errors); then each batch's plan is finished in Arrow,
one batch at a time. No Python structure holds all URLs.

Files, under ``<output>/snapshot/plan/`` (swapped in whole): ``server_name=S/partition_id=N/plan.parquet``
(PLAN_SCHEMA, sorted by the row's place in the batch's urls.parquet; its metadata names the batch's
fingerprint), ``_previous_files.parquet`` (file ids) and ``_plan.json`` (counts per server and batch,
rows gone since the previous dataset, problems). An unreadable previous dataset or a match that
fails is a logged problem: nothing is reused from it and its URLs are downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid as uuid_mod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.config import Paths, batch_folder
from distributed_downloader.errors import TRANSIENT_CODES, TRANSIENT_HTTP, ErrorCode
from distributed_downloader.plan import partition
from distributed_downloader.plan import previous as previous_mod
from distributed_downloader.store.files import atomic_write_json, atomic_write_table

log = logging.getLogger(__name__)
PLAN_DIR = "plan"
PLAN_FILE = "plan.parquet"
PLAN_JSON = "_plan.json"
FILES_TABLE = "_previous_files.parquet"
PLAN_KEY = b"distributed_downloader.snapshot"  # parquet metadata: {"fingerprint", "plan"}
REUSE, REVALIDATE, KEEP_ERROR, RETRY_ERROR = "reuse", "revalidate", "keep_error", "retry_error"
NOT_DOWNLOADED = (REUSE, KEEP_ERROR)  # planned rows the download sends no request for
BY_URL, BY_SOURCE_ID = "url", "source_id"
# Error codes that say something about that run, not the URL: tried again at once.
RETRIED_NOW = frozenset({int(ErrorCode.SERVER_IGNORED), int(ErrorCode.RETRIES_EXHAUSTED)})
_transient = functools.cache(lambda: pa.array(sorted({*map(int, TRANSIENT_CODES), *TRANSIENT_HTTP, *RETRIED_NOW})))
DAY = 86_400.0
UNMATCHED_PART, GONE_PART = -1, -2  # stage-1 partitions of new rows without a match / previous rows that left
# Stage partitions hold the rows of several batches (about this many URLs): DuckDB keeps a bounded number
# of partition writers open, and one partition per batch (20,000 at 200M rows) would scatter each
# batch over many small files; a bucket is read back whole, which this bounds.
BUCKET_URLS = 500_000
JOIN_ROWS_PER_GB = 4_000_000  # URLs of each side one join slice may hold per GB of memory_mb
_TIMESTAMP = pa.timestamp("ms", tz="UTC")

PLAN_SCHEMA = pa.schema(
    [
        ("uuid", pa.string()),
        ("new_row", pa.int64()),  # the row's index in the batch's urls.parquet
        ("action", pa.string()),  # reuse | revalidate | keep_error | retry_error
        ("match", pa.string()),  # url | source_id (successes); url (errors)
        ("file_id", pa.int32()),  # the previous file (FILES_TABLE)
        ("prev_row", pa.int64()),  # the row in that file
        # When the server last gave or confirmed the image, or when the URL last failed (the previous
        # file's time for stores without checked_at). The image, hashes and validators are read from
        # the previous row itself when it is copied: the match carries only what it must decide on.
        ("checked_at", _TIMESTAMP),
        ("error_code", pa.int64()),
        ("error_msg", pa.string()),
        ("retry_count", pa.int64()),
    ]
)
FILES_SCHEMA = pa.schema(
    [
        ("file_id", pa.int32()),
        ("dataset", pa.int32()),
        ("kind", pa.string()),
        ("path", pa.string()),
        ("server_name", pa.string()),
        ("partition_id", pa.int64()),
        ("mtime", _TIMESTAMP),
    ]
)
COUNT_KEYS = ("urls", "new", "reuse", "revalidate", "by_source_id", "keep_error", "retry_error")


@dataclass(frozen=True)
class Settings:
    revalidate_fraction: float
    revalidate_older_than: float | None  # days
    retry_permanent_errors_after: float  # days
    match_by_source_id: bool
    memory_mb: int

    @classmethod
    def from_config(cls, config: Mapping) -> Settings:
        params = config["snapshot_parameters"]
        return cls(
            float(params["revalidate_fraction"]),
            None if params["revalidate_older_than"] is None else float(params["revalidate_older_than"]),
            float(params["retry_permanent_errors_after"]),
            bool(params["match_by_source_id"]),
            int(params["memory_mb"]),
        )


# ---------------------------------------------------------------- the revalidation sample


def plan_salt(manifest: Mapping) -> str:
    """Salt of the sample: the batches' fingerprints, so a rerun gives the same sample and a new
    snapshot (another URL list) another one."""
    digest = hashlib.sha256()
    for server in sorted(manifest["servers"]):
        digest.update(server.encode() + b"\0" + "".join(manifest["servers"][server]["fingerprints"]).encode())
    return digest.hexdigest()[:16]


SAMPLE_BITS = 31


def sample_keys(salt: str, identifiers: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 31-bit key per URL: the initializer's vectorised string hash (partition.string_buckets) of
    ``salt + identifier``. Computed per batch in Arrow: DuckDB's md5() cost 4x its whole join."""
    if isinstance(identifiers, pa.ChunkedArray):
        identifiers = identifiers.combine_chunks()
    salted = pc.binary_join_element_wise(pa.scalar(salt), identifiers.cast(pa.string()), "")
    return partition.string_buckets(salted, 1 << SAMPLE_BITS)


def sampled(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Which keys fall in a sample of ``fraction``."""
    return np.ones(len(keys), bool) if fraction >= 1.0 else keys < int(fraction * (1 << SAMPLE_BITS))


def in_sample(salt: str, identifier: str, fraction: float) -> bool:
    """Whether a reused URL is in the revalidation sample of the snapshot with this salt."""
    return bool(sampled(sample_keys(salt, pa.array([identifier])), fraction)[0])


# ---------------------------------------------------------------- reading a plan


def plan_root(paths: Paths) -> Path:
    return paths.snapshot / PLAN_DIR


def batch_plan_path(paths: Paths, server: str, partition_id: int) -> Path:
    return plan_root(paths) / batch_folder(server, partition_id) / PLAN_FILE


def read_batch_plan(paths: Paths, server: str, partition_id: int, fingerprint: str) -> tuple[pa.Table, str] | None:
    """(the batch's plan rows, the plan's id), or None: nothing planned, or a plan of another URL list."""
    path = batch_plan_path(paths, server, partition_id)
    try:
        handle = pq.ParquetFile(path)
        meta = json.loads((handle.schema_arrow.metadata or {}).get(PLAN_KEY, b"{}"))
        if meta.get("fingerprint") != fingerprint:
            log.warning("%s: planned for another URL list; nothing reused in this batch", path)
            return None
        return handle.read(), str(meta.get("plan", ""))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, pa.ArrowException) as exc:
        log.warning("%s unreadable (%s): the batch is downloaded without reuse", path, exc)
        return None


@functools.lru_cache(maxsize=4)
def _cached_json(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text())


def read_summary(paths: Paths) -> dict | None:
    """``_plan.json`` (cached while the file is unchanged), or None when this run reuses nothing."""
    path = plan_root(paths) / PLAN_JSON
    try:
        return _cached_json(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=4)
def _cached_files(path: str, mtime_ns: int) -> dict[int, str]:
    table = pq.read_table(path, columns=["file_id", "path"])
    return dict(zip(table.column("file_id").to_pylist(), table.column("path").to_pylist(), strict=True))


def previous_files(paths: Paths) -> dict[int, str]:
    """file_id -> path of the previous files the plan refers to."""
    path = plan_root(paths) / FILES_TABLE
    try:
        return _cached_files(str(path), path.stat().st_mtime_ns)
    except (OSError, pa.ArrowException):
        return {}


def not_downloaded(paths: Paths, server: str, partition_id: int) -> int:
    """Rows of a batch planned without a request (reused, or a permanent error kept): for estimates."""
    summary = read_summary(paths)
    if not summary:
        return 0
    counts = summary["servers"].get(server, {}).get("batches", {}).get(str(partition_id), {})
    return sum(int(counts.get(action, 0)) for action in NOT_DOWNLOADED)


def download_sample(paths: Paths, server: str, batches: int, count: int) -> list[str] | None:
    """The first ``count`` URLs of a server the download will request (profiling's probe candidates).

    None when no plan exists (the first URLs of the first batch will do); [] when every row of the
    server is planned without a request: it is not probed at all.
    """
    summary = read_summary(paths)
    if not summary:
        return None
    planned = summary["servers"].get(server, {}).get("batches", {})
    out: list[str] = []
    for partition_id in range(batches):
        counts = planned.get(str(partition_id), {})
        skipped = sum(int(counts.get(action, 0)) for action in NOT_DOWNLOADED)
        if skipped and skipped >= int(counts.get("urls", 0)):
            continue
        urls = pq.read_table(paths.batch_urls(server, partition_id), columns=["uuid", "identifier"])
        if skipped:
            plan = pq.read_table(batch_plan_path(paths, server, partition_id), columns=["uuid", "action"])
            skip = plan.filter(pc.is_in(plan.column("action"), pa.array(NOT_DOWNLOADED))).column("uuid")
            urls = urls.filter(pc.invert(pc.is_in(urls.column("uuid"), value_set=skip.combine_chunks())))
        out.extend(urls.column("identifier").to_pylist()[: count - len(out)])
        if len(out) >= count:
            break
    return out


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Batch:
    key: int  # position in (server name, partition id) order: the stage partitions' name
    server: str
    partition_id: int
    fingerprint: str
    urls: int
    path: Path


def _batches(manifest: Mapping, paths: Paths) -> list[_Batch]:
    out: list[_Batch] = []
    batch_size = int(manifest["batch_size"])
    for server in sorted(manifest["servers"]):
        info = manifest["servers"][server]
        for partition_id, fp in enumerate(info["fingerprints"]):
            rows = min(batch_size, int(info["urls"]) - partition_id * batch_size)
            out.append(_Batch(len(out), server, partition_id, fp, rows, paths.batch_urls(server, partition_id)))
    return out


def remove_plan(paths: Paths) -> None:
    """A run without previous_dataset (or re-initialized) must not follow an older plan."""
    shutil.rmtree(plan_root(paths), ignore_errors=True)


def plan(config: Mapping, paths: Paths, manifest: Mapping, now: float | None = None) -> dict | None:
    """Match this run's batches against ``previous_dataset`` and write the plan; its summary.

    None when no previous dataset is configured. Never raises for a problem of the previous data:
    whatever cannot be matched is downloaded, and the summary lists why.
    """
    remove_plan(paths)
    if not config["previous_dataset"]:
        return None
    started = time.monotonic()
    now = time.time() if now is None else now
    settings = Settings.from_config(config)
    datasets = previous_mod.load_all(
        config["previous_dataset"], config["output_structure"]["images_folder"], paths.images
    )
    timings = {"footers": round(time.monotonic() - started, 3)}
    files = [f for dataset in datasets for f in dataset.files]
    problems = [problem for dataset in datasets for problem in dataset.problems]
    batches = _batches(manifest, paths)
    salt = plan_salt(manifest)
    work = paths.snapshot / ".work"
    incoming = paths.snapshot / (PLAN_DIR + ".incoming")
    for folder in (work, incoming):
        shutil.rmtree(folder, ignore_errors=True)
    incoming.mkdir(parents=True)
    plan_id = uuid_mod.uuid4().hex
    gone: dict[str, int] = {}
    per_batch: dict[int, dict[str, int]] = {}
    for attempt in range(2):
        try:
            if files and batches:
                per_bucket = max(1, BUCKET_URLS // max(1, int(manifest["batch_size"])))
                mark = time.monotonic()
                timings["join_slices"] = _match(work, batches, files, settings, salt, per_bucket)
                gone = _gone_counts(work, files, settings.memory_mb)
                timings["match"] = round(time.monotonic() - mark, 3)
                mark = time.monotonic()
                per_batch = _finish_batches(work, incoming, batches, files, settings, per_bucket, salt, plan_id, now)
                timings["plan_files"] = round(time.monotonic() - mark, 3)
            break
        except Exception as exc:  # a previous file the match cannot read
            shutil.rmtree(incoming, ignore_errors=True)
            incoming.mkdir(parents=True)
            per_batch, gone = {}, {}
            # A file whose footer reads but whose pages do not (a damaged copy) failed the whole match:
            # 20 rows of one file left the other 200M to be downloaded again. Leave such files out, once.
            bad = _unreadable(files) if attempt == 0 else []
            if bad:
                for path in bad:
                    message = f"{path}: unreadable rows; its URLs are downloaded again"
                    log.warning("%s", message)
                    problems.append(message)
                files = [f for f in files if f.path not in bad]
                for dataset in datasets:
                    dataset.files = [f for f in dataset.files if f.path not in bad]
                continue
            message = f"matching the previous dataset(s) failed ({type(exc).__name__}: {exc}); nothing is reused"
            log.error("%s", message, exc_info=exc)
            problems.append(message)
            break
        finally:
            shutil.rmtree(work, ignore_errors=True)
    summary = _summary(batches, per_batch, gone, datasets, problems, settings, salt, plan_id, now, started)
    summary["timings"] = timings  # seconds: the previous footers, the DuckDB match (in join_slices), the plan files
    _write_files_table(incoming / FILES_TABLE, files)
    atomic_write_json(incoming / PLAN_JSON, summary)
    final = plan_root(paths)
    shutil.rmtree(final, ignore_errors=True)
    incoming.rename(final)
    totals = summary["totals"]
    log.info(
        "snapshot plan: %d URLs: %d reused without a request (%d by source_id), %d revalidated, %d new, "
        "%d previous errors kept, %d retried, %d gone since the previous dataset (%.1f s)",
        totals["urls"],
        totals["reuse"],
        totals["by_source_id"],
        totals["revalidate"],
        totals["new"],
        totals["keep_error"],
        totals["retry_error"],
        sum(gone.values()),
        summary["seconds"],
    )
    return summary


def _unreadable(files: list[previous_mod.PreviousFile]) -> set[Path]:
    """The previous files whose columns the match reads cannot be read whole (one file at a time)."""
    bad = set()
    for file in files:
        needs = previous_mod.SUCCESS_NEEDS if file.kind == "success" else previous_mod.ERROR_NEEDS
        optional = ("checked_at",) if file.kind == "success" else ("checked_at", "error_msg", "retry_count")
        try:
            pq.ParquetFile(file.path).read(columns=[*needs, *(c for c in optional if c in file.columns)])
        except (OSError, pa.ArrowException):
            bad.add(file.path)
    return bad


def _connect(work: Path, memory_mb: int):  # noqa: ANN202 - duckdb is imported lazily
    import duckdb

    (work / "duckdb_tmp").mkdir(parents=True, exist_ok=True)
    try:
        threads = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        threads = os.cpu_count() or 1
    return duckdb.connect(
        config={
            "memory_limit": f"{memory_mb}MB",
            "temp_directory": str(work / "duckdb_tmp"),
            "preserve_insertion_order": False,
            "threads": max(1, threads),
        }
    )


def _files_arrow(files: list[previous_mod.PreviousFile]) -> pa.Table:
    return pa.table(
        {
            "file_id": pa.array(range(len(files)), pa.int32()),
            "dataset": pa.array([f.dataset for f in files], pa.int32()),
            "kind": pa.array([f.kind for f in files], pa.string()),
            "path": pa.array([str(f.path) for f in files], pa.string()),
            "server_name": pa.array([f.server_name for f in files], pa.string()),
            "partition_id": pa.array([f.partition_id for f in files], pa.int64()),
            "mtime": pa.array([int(f.mtime * 1000) for f in files], _TIMESTAMP),
        },
        schema=FILES_SCHEMA,
    )


def _write_files_table(path: Path, files: list[previous_mod.PreviousFile]) -> None:
    atomic_write_table(path, _files_arrow(files))


def _optional(columns: frozenset[str], column: str, sql_type: str) -> str:
    """The column when the files have it, else a typed null (a store written before it existed)."""
    return f"s.{column}" if column in columns else f"NULL::{sql_type}"


def _join_slices(new_rows: int, previous_rows: int, memory_mb: int) -> int:
    """How many hash slices the join runs in: each slice's join must fit ``memory_mb``.

    DuckDB spills a hash join, but not without bound: a full outer join of 60M x 57M URLs failed
    with 1 GB ("failed to pin block"). Sliced by a hash of the URL, each slice joins at most
    JOIN_ROWS_PER_GB rows of each side per GB (measured to pass with room to spare: 20M x 19M in
    2 GB peaked at 2.3 GB RSS).
    """
    per_slice = max(1, int(JOIN_ROWS_PER_GB * memory_mb / 1024))
    return max(1, -(-max(new_rows, previous_rows) // per_slice))


def _match(
    work: Path,
    batches: list[_Batch],
    files: list[previous_mod.PreviousFile],
    settings: Settings,
    salt: str,
    per_bucket: int,
) -> int:
    """Stage 1 (the big join) and stage 2 (the unmatched rows), written under ``work`` by bucket of batches;
    the number of join slices.

    With more URLs than one slice holds, both sides are first written hash-partitioned by URL
    (a streaming copy), then joined one slice at a time (a Grace hash join done in the open).
    """
    con = _connect(work, settings.memory_mb)
    try:
        table = _files_arrow(files)
        con.register("files_arrow", table)
        con.execute("CREATE TEMP TABLE prev_files AS SELECT file_id, path, mtime FROM files_arrow")
        url_files = pa.table(
            {"batch": pa.array([b.key for b in batches], pa.int64()), "path": [str(b.path) for b in batches]}
        )
        con.register("url_files_arrow", url_files)
        con.execute("CREATE TEMP TABLE url_files AS SELECT * FROM url_files_arrow")
        con.read_parquet([str(b.path) for b in batches], filename=True, file_row_number=True).create_view("u")
        successes = [f for f in files if f.kind == "success"]
        errors = [f for f in files if f.kind == "error"]
        new_select = """
            SELECT f.batch, u.identifier, u.source_id, u.file_row_number AS new_row
            FROM u JOIN url_files f ON u.filename = f.path"""
        ok_select = _previous_select(con, successes, "ok_src", "success")
        slices = _join_slices(sum(b.urls for b in batches), sum(f.rows for f in successes), settings.memory_mb)
        if slices == 1:
            _join(con, new_select, ok_select, work / "stage1" / "slice=0", per_bucket)
        else:
            for side, select in (("new", new_select), ("ok", ok_select)):
                con.execute(
                    f"COPY (SELECT *, hash({'identifier' if side == 'new' else 'prev_identifier'}) % {slices} AS slice"
                    f" FROM ({select})) TO '{work / side}' (FORMAT parquet, PARTITION_BY (slice), COMPRESSION zstd)"
                )
            for number in range(slices):
                sides = [work / side / f"slice={number}" for side in ("new", "ok")]
                if not any(sides[0].glob("*.parquet")) and not any(sides[1].glob("*.parquet")):
                    continue
                selects = [
                    f"SELECT * FROM read_parquet('{folder}/*.parquet')"
                    if any(folder.glob("*.parquet"))
                    else f"SELECT * FROM ({select}) WHERE false"
                    for folder, select in zip(sides, (new_select, ok_select), strict=True)
                ]
                _join(con, selects[0], selects[1], work / "stage1" / f"slice={number}", per_bucket)
            for side in ("new", "ok"):
                shutil.rmtree(work / side, ignore_errors=True)
        _stage2(con, work, errors, settings, salt, per_bucket)
        return slices
    finally:
        con.close()


def _join(con, new_select: str, ok_select: str, target: Path, per_bucket: int) -> None:  # noqa: ANN001
    """The full outer join of this run's URLs with the previous successes, by bucket of batches."""
    target.parent.mkdir(parents=True, exist_ok=True)  # DuckDB makes the last folder only
    con.execute(
        f"""
        COPY (
          WITH new AS ({new_select}), ok AS ({ok_select})
          SELECT
            CASE WHEN new.batch IS NULL THEN {GONE_PART} WHEN ok.file_id IS NULL THEN {UNMATCHED_PART}
                 ELSE new.batch // {per_bucket} END AS part,
            new.batch, new.new_row,
            CASE WHEN ok.file_id IS NULL THEN new.identifier END AS identifier,
            CASE WHEN ok.file_id IS NULL THEN new.source_id END AS source_id,
            ok.file_id, ok.prev_row, ok.checked_at,
            CASE WHEN new.batch IS NULL THEN ok.prev_identifier END AS prev_identifier,
            CASE WHEN new.batch IS NULL THEN ok.prev_source_id END AS prev_source_id
          FROM new FULL OUTER JOIN ok ON new.identifier = ok.prev_identifier
        ) TO '{target}' (FORMAT parquet, PARTITION_BY (part), COMPRESSION zstd)
        """
    )


def _stage1_files(work: Path, part: int) -> list[Path]:
    """A stage-1 partition's files over every join slice."""
    return sorted((work / "stage1").glob(f"slice=*/part={part}/*.parquet"))


def _previous_select(con, files: list[previous_mod.PreviousFile], view: str, kind: str) -> str:  # noqa: ANN001
    """The SELECT of previous success (or error) rows with their file id and row number.

    One DuckDB view per set of columns (stores of older versions lack the optional ones), joined by
    UNION ALL: ``union_by_name`` would read and hold every file's footer at once (1.2 GB for 2,259
    files of 40 row groups each: not bounded at 200M rows).
    """
    if kind == "success" and not files:
        return (
            "SELECT NULL::INTEGER AS file_id, NULL::BIGINT AS prev_row, NULL::VARCHAR AS prev_identifier,"
            " NULL::VARCHAR AS prev_source_id, NULL::TIMESTAMPTZ AS checked_at WHERE false"
        )
    groups: dict[frozenset[str], list[previous_mod.PreviousFile]] = {}
    for file in files:
        groups.setdefault(file.columns, []).append(file)
    selects = []
    for number, (columns, group) in enumerate(sorted(groups.items(), key=lambda item: sorted(item[0]))):
        name = f"{view}_{number}"
        con.read_parquet([str(f.path) for f in group], filename=True, file_row_number=True).create_view(name)
        checked = f"coalesce({_optional(columns, 'checked_at', 'TIMESTAMPTZ')}, p.mtime) AS checked_at"
        if kind == "success":
            selects.append(
                f"""SELECT p.file_id, s.file_row_number AS prev_row, s.identifier AS prev_identifier,
                       s.source_id AS prev_source_id, {checked}
                FROM {name} s JOIN prev_files p ON s.filename = p.path"""
            )
        else:
            selects.append(
                f"""SELECT p.file_id, s.file_row_number AS prev_row, s.identifier,
                       s.error_code::BIGINT AS error_code,
                       {_optional(columns, "error_msg", "VARCHAR")} AS error_msg,
                       {_optional(columns, "retry_count", "BIGINT")}::BIGINT AS retry_count, {checked}
                FROM {name} s JOIN prev_files p ON s.filename = p.path"""
            )
    return "\nUNION ALL\n".join(selects)


def _stage_table(con, work: Path, part: int, name: str, columns: str) -> None:  # noqa: ANN001
    """A stage-1 partition as a temp table (empty, with the same columns, when DuckDB wrote none).

    Every stage-1 partition has the same columns: any file of another one gives the empty table's types.
    """
    files = _stage1_files(work, part)
    where = ""
    if not files:
        files, where = [next((work / "stage1").glob("slice=*/part=*/*.parquet"))], " WHERE false"
    listed = ", ".join(f"'{f}'" for f in files)
    con.execute(f"CREATE TEMP TABLE {name} AS SELECT {columns} FROM read_parquet([{listed}]){where}")


def _stage2(  # noqa: ANN001
    con, work: Path, errors: list[previous_mod.PreviousFile], settings: Settings, salt: str, per_bucket: int
) -> None:
    """The rows stage 1 left unmatched: matches by source_id, then previous errors by URL."""
    _stage_table(con, work, UNMATCHED_PART, "unmatched", "batch, new_row, identifier, source_id")
    _stage_table(
        con,
        work,
        GONE_PART,
        "gone",
        "file_id, prev_row, prev_identifier, prev_source_id, checked_at",
    )
    path_of = "regexp_replace({}, '^[^:/?#]+://[^/?#]*', '')"  # the URL without scheme and authority
    if settings.match_by_source_id:
        con.execute(
            f"""
            CREATE TEMP TABLE by_source AS
            WITH n AS (
              SELECT source_id, {path_of.format("identifier")} AS path, count(*) AS rows,
                     any_value(batch) AS batch, any_value(new_row) AS new_row
              FROM unmatched WHERE source_id <> '' GROUP BY ALL HAVING count(*) = 1
            ),
            g AS (
              SELECT prev_source_id, {path_of.format("prev_identifier")} AS path,
                     count(DISTINCT prev_identifier) AS urls,
                     arg_min(struct_pack(file_id, prev_row, prev_identifier, checked_at),
                             file_id::BIGINT * 4294967296 + prev_row) AS p
              FROM gone WHERE prev_source_id <> '' GROUP BY ALL HAVING count(DISTINCT prev_identifier) = 1
            )
            SELECT n.batch, n.new_row, p.file_id, p.prev_row, p.prev_identifier, p.checked_at
            FROM n JOIN g ON n.source_id = g.prev_source_id AND n.path = g.path
            WHERE n.path NOT IN ('', '/')
            """
        )
    else:
        con.execute(
            "CREATE TEMP TABLE by_source AS SELECT NULL::BIGINT AS batch,"
            " NULL::BIGINT AS new_row, NULL::INTEGER AS file_id, NULL::BIGINT AS prev_row,"
            " NULL::VARCHAR AS prev_identifier, NULL::TIMESTAMPTZ AS checked_at WHERE false"
        )
    union = f"""
        SELECT batch // {per_bucket} AS part, batch, 'source_id' AS kind, new_row, file_id, prev_row,
               checked_at, NULL::BIGINT AS error_code, NULL::VARCHAR AS error_msg,
               NULL::BIGINT AS retry_count
        FROM by_source"""
    if errors:
        error_select = _previous_select(con, errors, "err_src", "error")
        field = "struct_extract(err, '{}')".format
        union += f"""
        UNION ALL
        SELECT batch // {per_bucket} AS part, batch, 'error' AS kind, new_row, {field("file_id")},
               {field("prev_row")}, {field("checked_at")}, {field("error_code")}, {field("error_msg")},
               {field("retry_count")}
        FROM (
          SELECT m.batch, m.new_row,
                 arg_min(struct_pack(e.file_id, e.prev_row, e.error_code, e.error_msg, e.retry_count, e.checked_at),
                         e.file_id::BIGINT * 4294967296 + e.prev_row) AS err
          FROM unmatched m JOIN ({error_select}) e ON m.identifier = e.identifier
          WHERE (m.batch, m.new_row) NOT IN (SELECT (batch, new_row) FROM by_source)
          GROUP BY ALL
        ) matched_errors"""
    con.execute(f"COPY ({union}) TO '{work / 'stage2'}' (FORMAT parquet, PARTITION_BY (part), COMPRESSION zstd)")
    con.execute(
        f"""
        COPY (SELECT DISTINCT prev_identifier FROM by_source) TO '{work / "moved.parquet"}' (FORMAT parquet)
        """
    )


def _gone_counts(work: Path, files: list[previous_mod.PreviousFile], memory_mb: int) -> dict[str, int]:
    """Distinct previous URLs (successes) that left the input, by the server they were on."""
    gone = _stage1_files(work, GONE_PART)
    if not gone:
        return {}
    con = _connect(work / "gone", memory_mb)
    try:
        servers = pa.table(
            {"file_id": pa.array(range(len(files)), pa.int32()), "server_name": [f.server_name for f in files]}
        )
        con.register("servers_arrow", servers)
        listed = ", ".join(f"'{f}'" for f in gone)
        rows = con.execute(
            f"""
            SELECT s.server_name, count(DISTINCT g.prev_identifier)
            FROM read_parquet([{listed}]) g JOIN servers_arrow s USING (file_id)
            WHERE g.prev_identifier NOT IN (SELECT prev_identifier FROM read_parquet('{work / "moved.parquet"}'))
            GROUP BY ALL ORDER BY 1
            """
        ).fetchall()
    finally:
        con.close()
    return {server: int(count) for server, count in rows}


def _read_part(paths: list[Path]) -> pa.Table | None:
    if not paths:
        return None
    return pa.concat_tables([pq.ParquetFile(p).read() for p in paths], promote_options="permissive")


def _by_batch(table: pa.Table | None) -> dict[int, pa.Table]:
    """A bucket's stage rows split by batch."""
    if table is None or not table.num_rows:
        return {}
    table = table.take(pc.sort_indices(table, [("batch", "ascending")]))
    keys = table.column("batch").to_numpy()
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    ends = np.concatenate([starts[1:], [len(keys)]])
    return {int(keys[a]): table.slice(int(a), int(b - a)) for a, b in zip(starts, ends, strict=True)}


def _finish_batches(
    work: Path,
    out: Path,
    batches: list[_Batch],
    files: list[previous_mod.PreviousFile],
    settings: Settings,
    per_bucket: int,
    salt: str,
    plan_id: str,
    now: float,
) -> dict[int, dict[str, int]]:
    """Each batch's plan file from its stage rows, one bucket of batches in memory at a time."""
    mtimes = np.array([f.mtime for f in files], np.float64)
    counts: dict[int, dict[str, int]] = {}
    for first in range(0, len(batches), per_bucket):
        bucket = first // per_bucket
        stage1 = _by_batch(_read_part(_stage1_files(work, bucket)))
        stage2 = _by_batch(_read_part(sorted((work / "stage2" / f"part={bucket}").glob("*.parquet"))))
        for batch in batches[first : first + per_bucket]:
            rows1, rows2 = stage1.pop(batch.key, None), stage2.pop(batch.key, None)
            if rows1 is None and rows2 is None:
                continue
            urls = pq.ParquetFile(batch.path).read(columns=["uuid", "identifier"])
            table = finish_batch(rows1, rows2, urls, mtimes, settings, salt, now)
            target = out / batch_folder(batch.server, batch.partition_id) / PLAN_FILE
            meta = {PLAN_KEY: json.dumps({"fingerprint": batch.fingerprint, "plan": plan_id}).encode()}
            # No temp + fsync per file (a third of this step): plan.incoming is swapped in whole once complete.
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.replace_schema_metadata(meta), target, compression="zstd")
            actions = dict(zip(*_value_counts(table.column("action")), strict=True))
            # Reused rows matched by source_id (a sampled one is counted with the revalidated).
            reused_by_source = pc.and_(
                pc.equal(table.column("match"), BY_SOURCE_ID), pc.equal(table.column("action"), REUSE)
            )
            by_source = int(pc.sum(reused_by_source).as_py() or 0)
            counts[batch.key] = {
                **{key: int(actions.get(key, 0)) for key in (REUSE, REVALIDATE, KEEP_ERROR, RETRY_ERROR)},
                "by_source_id": by_source,
                "new": batch.urls - table.num_rows,
                "urls": batch.urls,
            }
    return counts


def _value_counts(column: pa.ChunkedArray) -> tuple[list, list]:
    counts = pc.value_counts(column)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


def _timestamps(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Epoch seconds (float, NaN for null) of a timestamp column of any unit."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    array = pc.cast(array, pa.timestamp("ms", tz="UTC"), safe=False)
    values = pc.cast(array, pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64) / 1000.0
    values[~pc.is_valid(array).to_numpy(zero_copy_only=False)] = np.nan
    return values


def finish_batch(
    stage1: pa.Table | None,
    stage2: pa.Table | None,
    urls: pa.Table,
    mtimes: np.ndarray,
    settings: Settings,
    salt: str,
    now: float,
) -> pa.Table | None:
    """One batch's plan rows (PLAN_SCHEMA, by new_row) from its stage rows, or None when nothing matched.

    ``urls``: the batch's urls.parquet (uuid, identifier), which the stage rows point into by row.
    Successes matched by URL (stage 1) or source_id (stage 2) are deduplicated per new row (lowest
    file id, then row, wins), then sampled for revalidation; previous errors are kept or retried by
    permanence and age.
    """
    pieces = []
    columns = ["new_row", "file_id", "prev_row", "checked_at"]
    if stage1 is not None and stage1.num_rows:
        pieces.append(_with_match(stage1.select(columns), BY_URL))
    errors = None
    if stage2 is not None and stage2.num_rows:
        kind = stage2.column("kind")
        sources = stage2.filter(pc.equal(kind, "source_id"))
        if sources.num_rows:
            pieces.append(_with_match(sources.select(columns), BY_SOURCE_ID))
        errors = stage2.filter(pc.equal(kind, "error"))
    out = []
    if pieces:
        out.append(_plan_successes(_concat(pieces), urls, mtimes, settings, salt, now))
    if errors is not None and errors.num_rows:
        out.append(_plan_errors(errors, urls, mtimes, settings, now))
    if not out:
        return None
    table = pa.concat_tables(out)
    return table.take(pc.sort_indices(table, [("new_row", "ascending")]))


def _concat(tables: list[pa.Table]) -> pa.Table:
    target = tables[0].schema
    return pa.concat_tables([t.cast(target) for t in tables])


def _with_match(table: pa.Table, match: str) -> pa.Table:
    table = table.cast(  # safe=False: DuckDB's microseconds back to the store's milliseconds
        pa.schema(
            [
                ("new_row", pa.int64()),
                ("file_id", pa.int32()),
                ("prev_row", pa.int64()),
                ("checked_at", _TIMESTAMP),
            ]
        ),
        safe=False,
    )
    return table.append_column("match", pa.array([match] * table.num_rows, pa.string()))


def _plan_successes(
    table: pa.Table, urls: pa.Table, mtimes: np.ndarray, settings: Settings, salt: str, now: float
) -> pa.Table:
    new_row = table.column("new_row").to_numpy()
    file_id = table.column("file_id").to_numpy()
    prev_row = table.column("prev_row").to_numpy()
    order = np.lexsort((prev_row, file_id, new_row))
    first = np.ones(len(order), bool)
    first[1:] = new_row[order][1:] != new_row[order][:-1]
    table = table.take(pa.array(order[first]))
    checked = _timestamps(table.column("checked_at"))
    missing = np.isnan(checked)
    checked[missing] = mtimes[table.column("file_id").to_numpy()[missing]]
    rows = table.column("new_row").combine_chunks()
    revalidate = sampled(sample_keys(salt, urls.column("identifier").take(rows)), settings.revalidate_fraction)
    if settings.revalidate_older_than is not None:
        revalidate |= (now - checked) > settings.revalidate_older_than * DAY
    n = table.num_rows
    return pa.table(
        {
            "uuid": urls.column("uuid").take(rows),
            "new_row": table.column("new_row"),
            "action": pa.array(np.where(revalidate, REVALIDATE, REUSE).tolist(), pa.string()),
            "match": table.column("match"),
            "file_id": table.column("file_id"),
            "prev_row": table.column("prev_row"),
            "checked_at": pa.array((checked * 1000).astype(np.int64), _TIMESTAMP),
            "error_code": pa.nulls(n, pa.int64()),
            "error_msg": pa.nulls(n, pa.string()),
            "retry_count": pa.nulls(n, pa.int64()),
        },
        schema=PLAN_SCHEMA,
    )


def _plan_errors(table: pa.Table, urls: pa.Table, mtimes: np.ndarray, settings: Settings, now: float) -> pa.Table:
    codes = pc.cast(table.column("error_code"), pa.int64())
    checked = _timestamps(table.column("checked_at"))
    file_id = pc.cast(table.column("file_id"), pa.int32())
    missing = np.isnan(checked)
    checked[missing] = mtimes[file_id.to_numpy()[missing]]
    # A row without a code says nothing permanent: retried (kept, it failed its batch's open every round).
    permanent = pc.and_(pc.is_valid(codes), pc.invert(pc.is_in(codes, value_set=_transient())))
    permanent = permanent.to_numpy(zero_copy_only=False)
    young = (now - checked) < settings.retry_permanent_errors_after * DAY
    keep = permanent & young
    n = table.num_rows
    return pa.table(
        {
            "uuid": urls.column("uuid").take(pc.cast(table.column("new_row"), pa.int64())),
            "new_row": pc.cast(table.column("new_row"), pa.int64()),
            "action": pa.array(np.where(keep, KEEP_ERROR, RETRY_ERROR).tolist(), pa.string()),
            "match": pa.array([BY_URL] * n, pa.string()),
            "file_id": file_id,
            "prev_row": pc.cast(table.column("prev_row"), pa.int64()),
            "checked_at": pa.array((checked * 1000).astype(np.int64), _TIMESTAMP),
            "error_code": codes,
            "error_msg": pc.cast(table.column("error_msg"), pa.string()),
            "retry_count": pc.cast(table.column("retry_count"), pa.int64()),
        },
        schema=PLAN_SCHEMA,
    )


def _summary(
    batches: list[_Batch],
    per_batch: Mapping[int, Mapping[str, int]],
    gone: Mapping[str, int],
    datasets: list[previous_mod.PreviousDataset],
    problems: list[str],
    settings: Settings,
    salt: str,
    plan_id: str,
    now: float,
    started: float,
) -> dict:
    servers: dict[str, dict] = {}
    for batch in batches:
        counts = per_batch.get(batch.key) or {"urls": batch.urls, "new": batch.urls}
        server = servers.setdefault(batch.server, {key: 0 for key in COUNT_KEYS} | {"batches": {}})
        for key in COUNT_KEYS:
            server[key] += int(counts.get(key, 0))
        if batch.key in per_batch:
            server["batches"][str(batch.partition_id)] = {k: int(v) for k, v in counts.items()}
    totals = {key: sum(s[key] for s in servers.values()) for key in COUNT_KEYS}
    return {
        "plan": plan_id,
        "salt": salt,
        "created_at": now,
        "seconds": round(time.monotonic() - started, 3),
        "settings": settings.__dict__,
        "previous": [
            {
                "given": d.given,
                "images": str(d.images) if d.images else None,
                "success_files": len(d.successes),
                "error_files": len(d.errors),
                "success_rows": sum(f.rows for f in d.successes),
                "error_rows": sum(f.rows for f in d.errors),
            }
            for d in datasets
        ],
        "problems": problems[:1000],
        "totals": totals,
        "gone": dict(gone),
        "servers": servers,
    }


def iter_plans(paths: Paths) -> Iterator[tuple[str, int, Path]]:
    """(server, partition_id, plan file) of every batch with planned rows."""
    summary = read_summary(paths) or {"servers": {}}
    for server, info in sorted(summary["servers"].items()):
        for partition_id in sorted(int(p) for p in info.get("batches", {})):
            yield server, partition_id, batch_plan_path(paths, server, partition_id)
