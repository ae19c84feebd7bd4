"""Monthly snapshots, download side: a batch's rows reused from a previous dataset (issue #18).

When a lane first opens a batch (no completion marker yet), ``open_batch`` follows the batch's
plan (snapshot.py):

- ``reuse`` rows are copied, image and hashes, from the previous dataset's file into
  ``successes-reuse.parquet`` beside the batch's other success files (temp + rename), with their
  ``uuid``, ``source_id``, ``identifier`` and attribution taken from this run's input, and no
  request. Verification and the tools read it through the ``successes*.parquet`` glob like any
  success file; the batch's commits keep it.
- ``revalidate`` rows get the same copy, staged in ``.reuse/<fingerprint>.parquet`` (hidden from
  dataset readers), and go to the lane as downloads carrying conditional headers
  (``If-None-Match``: the stored etag, ``If-Modified-Since``: the stored last_modified): a 304 makes
  the staged copy the row (``confirmed_row``), a 200 is a new download like any other.
- ``keep_error`` rows keep the previous error row (no request); everything else is downloaded.

Only the rows of the batch's plan are read from the previous files: one previous row group at a
time, so a lane's memory stays at about one row group of images. A previous row that cannot be read,
or is not the one planned (its file was rewritten since: another hash or URL), is downloaded
instead. Rows an earlier attempt of this batch already wrote (its parts, profiling's probe) are
left to the download's carry-over. A reopened batch finds its copy in place (``.reuse/<fingerprint>.done.json``,
written after the copies, names the plan) and does not copy again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.config import Paths
from distributed_downloader.inputs import NOT_PROVIDED
from distributed_downloader.plan import snapshot
from distributed_downloader.store.batch_parts import REUSE_SUCCESSES, BatchParts, utc_now
from distributed_downloader.store.files import (
    PARQUET_COMPRESSION,
    ROW_GROUP_ROWS,
    SUCCESS_SCHEMA,
    atomic_write_json,
    fsync_and_rename,
    temp_beside,
)
from distributed_downloader.store.jsonfiles import read_json as _read_json
from distributed_downloader.store.rows import is_license_full

log = logging.getLogger(__name__)
STAGED_DIR = ".reuse"  # in the batch folder: previous copies of the revalidation sample
STAGED_ROW_GROUP = 16  # a 304 reads one row group of the staged file: keep it small
CONDITIONAL = "_conditional"  # row dict key: the headers of the row's conditional GET
STAGED = "_staged"  # row dict key: (staged file, row index) of the copy a 304 confirms
META_KEY = b"distributed_downloader.reuse"  # parquet metadata of the copies: {"fingerprint", "plan"}
COPY_BYTES = 32 << 20  # image bytes buffered before a row group of the copy is written
_ATTRIBUTION = ("license", "source", "title")


@dataclass
class OpenedBatch:
    """What the lane downloads after the reuse step, and what the step wrote or keeps."""

    download: list[dict]
    copied: int = 0  # rows in successes-reuse.parquet
    kept_errors: list[dict] = field(default_factory=list)


def conditional_headers(row: Mapping) -> dict[str, str]:
    """The conditional GET's headers of a revalidation row ({} for any other row)."""
    return dict(row.get(CONDITIONAL) or {})


def confirmed_row(row: Mapping, headers: Mapping[str, str]) -> dict:
    """The success row of a revalidation answered 304: the staged copy, checked now.

    The server's 304 may carry newer validators (RFC 9110 §15.4.5): they replace the stored ones.
    """
    path, index = row[STAGED]
    handle = pq.ParquetFile(path)
    start = 0
    for group in range(handle.metadata.num_row_groups):
        rows = handle.metadata.row_group(group).num_rows
        if index < start + rows:
            found = handle.read_row_group(group).slice(index - start, 1).to_pylist()[0]
            break
        start += rows
    else:
        raise LookupError(f"row {index} not in {path}")
    if found["uuid"] != row["uuid"]:
        raise LookupError(f"{path} row {index} holds {found['uuid']}, not {row['uuid']}")
    found["etag"] = headers.get("ETag") or found.get("etag")
    found["last_modified"] = headers.get("Last-Modified") or found.get("last_modified")
    found["checked_at"] = utc_now()
    return found


def open_batch(
    paths: Paths,
    server: str,
    partition_id: int,
    fingerprint: str,
    urls: list[dict],
    first: bool,
    parts: BatchParts,
) -> OpenedBatch:
    """The reuse step of a batch (see the module doc); ``first``: the batch has no marker yet.

    Returns the rows to download: all of ``urls`` when nothing is planned, or once the batch was
    committed (a retry round: its copies are in place; revalidation rows still to try get their
    conditional headers again).
    """
    folder = paths.batch_images(server, partition_id)
    staged = folder / STAGED_DIR / f"{fingerprint[:32]}.parquet"
    planned = snapshot.read_batch_plan(paths, server, partition_id, fingerprint)
    if planned is None:
        if first:  # a copy of an older plan must not stand beside this download
            (folder / REUSE_SUCCESSES).unlink(missing_ok=True)
            shutil.rmtree(folder / STAGED_DIR, ignore_errors=True)
        return OpenedBatch(urls)
    plan, plan_id = planned
    meta = {"fingerprint": fingerprint, "plan": plan_id}
    done = folder / STAGED_DIR / f"{fingerprint[:32]}.done.json"
    if not first:
        if _read_json(done) == meta:
            _attach(urls, staged, _validators(staged))
        return OpenedBatch(urls)
    _drop_other_staged(folder / STAGED_DIR, {staged, done})
    taken = parts.carried_successes() | {row["uuid"] for _, row in parts.carried_errors()}
    plan = plan.filter(pc.invert(pc.is_in(plan.column("uuid"), value_set=pa.array(sorted(taken), pa.string()))))
    by_uuid = {row["uuid"]: row for row in urls}
    actions = plan.column("action")
    if _read_json(done) == meta:  # an earlier attempt copied them: they are in place
        copied, staged_copies = _ids(folder / REUSE_SUCCESSES), _validators(staged)
    else:
        done.unlink(missing_ok=True)
        copies = plan.filter(pc.is_in(actions, value_set=pa.array([snapshot.REUSE, snapshot.REVALIDATE])))
        copied, staged_copies = _copy(paths, folder, staged, copies, by_uuid, meta)
        atomic_write_json(done, meta)
    kept = [
        _kept_error(by_uuid[row["uuid"]], row)
        for row in plan.filter(pc.equal(actions, snapshot.KEEP_ERROR)).to_pylist()
        if row["uuid"] in by_uuid
    ]
    skip = set(copied) | {row["uuid"] for row in kept}
    download = [row for row in urls if row["uuid"] not in skip]
    _attach(download, staged, staged_copies)
    return OpenedBatch(download, len(copied), kept)


def _drop_other_staged(folder: Path, keep: set[Path]) -> None:
    """Staged copies of another URL list of this folder (a re-initialized batch)."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path not in keep:
                path.unlink(missing_ok=True)


def _ids(path: Path) -> list[str]:
    """uuids of a copy in place ([] when there is none: a batch without such rows)."""
    try:
        return pq.ParquetFile(path).read(columns=["uuid"]).column("uuid").to_pylist()
    except FileNotFoundError:
        return []


def _validators(path: Path) -> list[dict]:
    """(uuid, etag, last_modified) of each staged copy, in file order ([] when none were staged)."""
    try:
        return pq.ParquetFile(path).read(columns=["uuid", "etag", "last_modified"]).to_pylist()
    except FileNotFoundError:
        return []


def _attach(rows: list[dict], staged: Path, copies: list[dict]) -> None:
    """Give each revalidation row with a staged copy its conditional headers and the copy's place."""
    place = {copy["uuid"]: (index, copy) for index, copy in enumerate(copies)}
    for row in rows:
        found = place.get(row["uuid"])
        if found is None:
            continue
        index, copy = found
        headers = {}
        if copy["etag"]:
            headers["If-None-Match"] = copy["etag"]
        if copy["last_modified"]:
            headers["If-Modified-Since"] = copy["last_modified"]
        if headers:  # without validators the server cannot answer 304: a plain download
            row[CONDITIONAL] = headers
            row[STAGED] = (str(staged), index)


def _kept_error(new: Mapping, planned: Mapping) -> dict:
    return {
        "uuid": new["uuid"],
        "identifier": new["identifier"],
        "retry_count": int(planned["retry_count"] or 0),
        "error_code": int(planned["error_code"]),
        "error_msg": planned["error_msg"] or "",
        "checked_at": planned["checked_at"],  # its age decides when a later snapshot tries it again
    }


class _CopyWriter:
    """Copied rows streamed to a temp file with the batch's metadata, renamed into place at the end."""

    def __init__(self, target: Path, meta: Mapping, row_group_rows: int) -> None:
        self.target = target
        self.schema = SUCCESS_SCHEMA.with_metadata({META_KEY: json.dumps(dict(meta)).encode()})  # provenance
        self.row_group_rows = row_group_rows
        self.temp: Path | None = None
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.pending_bytes = 0
        self.ids: list[str] = []
        self.validators: list[dict] = []  # uuid, etag, last_modified of each row, in file order

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.pending_bytes += table.column("image").nbytes
        self.ids.extend(table.column("uuid").to_pylist())
        self.validators.extend(table.select(["uuid", "etag", "last_modified"]).to_pylist())
        if self.pending_rows >= self.row_group_rows or self.pending_bytes >= COPY_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        if self.writer is None:
            self.temp = temp_beside(self.target)
            self.writer = pq.ParquetWriter(self.temp, self.schema, compression=PARQUET_COMPRESSION)
        table = pa.concat_tables(self.pending).replace_schema_metadata(self.schema.metadata)
        self.writer.write_table(table, row_group_size=self.row_group_rows)
        self.pending, self.pending_rows, self.pending_bytes = [], 0, 0

    def commit(self) -> None:
        self._flush()
        if self.writer is None:
            self.target.unlink(missing_ok=True)
            return
        self.writer.close()
        assert self.temp is not None
        fsync_and_rename(self.temp, self.target)

    def abort(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)


def _copy(
    paths: Paths,
    folder: Path,
    staged: Path,
    copies: pa.Table,
    by_uuid: Mapping[str, dict],
    meta: Mapping,
) -> tuple[list[str], list[str]]:
    """Copy the planned rows: reuse rows into the batch's reuse file, revalidation rows into the
    staged file. Returns the reused uuids and the staged copies' (uuid, etag, last_modified); a row
    that could not be copied is in neither."""
    files = snapshot.previous_files(paths)
    reused = _CopyWriter(folder / REUSE_SUCCESSES, meta, ROW_GROUP_ROWS)
    sample = _CopyWriter(staged, meta, STAGED_ROW_GROUP)
    try:
        by_file: dict[int, list[dict]] = defaultdict(list)
        for row in copies.to_pylist():
            if row["uuid"] in by_uuid:
                by_file[row["file_id"]].append(row)
        for file_id in sorted(by_file):
            for planned, table in _previous_rows(files.get(file_id), by_file[file_id], by_uuid):
                revalidate = pc.equal(pa.array([p["action"] for p in planned]), snapshot.REVALIDATE)
                sample.add(table.filter(revalidate))
                reused.add(table.filter(pc.invert(revalidate)))
        reused.commit()
        sample.commit()
        return reused.ids, sample.validators
    except BaseException:
        reused.abort()
        sample.abort()
        raise


def _previous_rows(path: str | None, planned: list[dict], by_uuid: Mapping[str, dict]):  # noqa: ANN202
    """(plan rows, their copies as SUCCESS_SCHEMA rows) for one previous file, a row group at a time.

    Rows that cannot be read or are not the planned ones are left out (downloaded instead).
    """
    if path is None:
        log.warning("previous file of %d planned rows unknown: they are downloaded", len(planned))
        return
    try:
        handle = pq.ParquetFile(path)
        bounds = np.cumsum([0] + [handle.metadata.row_group(g).num_rows for g in range(handle.metadata.num_row_groups)])
        groups: dict[int, list[dict]] = defaultdict(list)
        for row in planned:
            group = int(np.searchsorted(bounds, row["prev_row"], side="right")) - 1
            if 0 <= group < len(bounds) - 1:
                groups[group].append(row)
        present = set(handle.schema_arrow.names)
        columns = [name for name in SUCCESS_SCHEMA.names if name in present]
        for group in sorted(groups):
            table = handle.read_row_group(group, columns=columns)
            rows = groups[group]
            picked = table.take(pa.array([row["prev_row"] - int(bounds[group]) for row in rows], pa.int64()))
            yield _checked(picked, rows, by_uuid, path)
    except (OSError, pa.ArrowException) as exc:
        log.warning("previous file %s unreadable (%s): its planned rows are downloaded", path, exc)


def _checked(picked: pa.Table, rows: list[dict], by_uuid: Mapping[str, dict], path: str) -> tuple[list[dict], pa.Table]:
    """The copies whose previous row is the one the match saw: the same URL (a URL match) or the
    same source_id (a source_id match); a file rewritten since (a tool ran) moved its rows."""
    urls = picked.column("identifier").to_pylist()
    sources = picked.column("source_id").to_pylist()
    good = [
        url == by_uuid[row["uuid"]]["identifier"]
        if row["match"] == snapshot.BY_URL
        else source == by_uuid[row["uuid"]]["source_id"]
        for url, source, row in zip(urls, sources, rows, strict=True)
    ]
    if not all(good):
        log.warning("%s: %d planned rows changed since the match: downloaded instead", path, good.count(False))
    keep = [row for row, ok in zip(rows, good, strict=True) if ok]
    picked = picked.filter(pa.array(good))
    return keep, _as_success_rows(picked, keep, by_uuid)


def _as_success_rows(picked: pa.Table, planned: list[dict], by_uuid: Mapping[str, dict]) -> pa.Table:
    """The previous image columns with this run's uuid, source_id, URL and attribution."""
    new = [by_uuid[row["uuid"]] for row in planned]
    columns: dict[str, pa.Array | list] = {
        "uuid": [row["uuid"] for row in new],
        "source_id": [row["source_id"] for row in new],
        "identifier": [row["identifier"] for row in new],
        "is_license_full": [is_license_full(row) for row in new],
        **{name: [row[name] or NOT_PROVIDED for row in new] for name in _ATTRIBUTION},
    }
    for name in ("hashsum_original", "hashsum_resized", "original_size", "resized_size", "image"):
        columns[name] = picked.column(name).cast(SUCCESS_SCHEMA.field(name).type)
    for name in ("etag", "last_modified"):  # absent from stores written before them
        present = name in picked.column_names
        columns[name] = picked.column(name).cast(pa.string()) if present else pa.nulls(len(planned), pa.string())
    columns["checked_at"] = pa.array([row["checked_at"] for row in planned], SUCCESS_SCHEMA.field("checked_at").type)
    return pa.table(columns, schema=SUCCESS_SCHEMA)


def remove_staged(paths: Paths, manifest: Mapping) -> int:
    """After the last round: the staged revalidation copies are no longer needed. Returns folders cleaned."""
    removed = 0
    for server, info in manifest["servers"].items():
        for partition_id in range(len(info["fingerprints"])):
            folder = paths.batch_images(server, partition_id) / STAGED_DIR
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
    return removed
