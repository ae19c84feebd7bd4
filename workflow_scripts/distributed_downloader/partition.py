"""Initialization: stream the input, group URLs by server, cut each server into batches.

Pass 1 streams input batches, sorts each by server (stably, so input order is kept within a
server) and buffers the rows per server; when the buffers exceed a row budget the largest is
spilled to an Arrow IPC segment on disk. Pass 2 walks servers in name order and cuts their rows,
in input order, into batches of `batch_size`. Memory is bounded by the budget, not the input.
The result is deterministic: the same input gives byte-identical partitions and manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from distributed_downloader import inputs
from distributed_downloader.store import atomic_write_json

URL_SCHEMA = pa.schema([(name, pa.string()) for name in inputs.URL_COLUMNS])
REJECTED_SCHEMA = pa.schema([(name, pa.string()) for name in (*inputs.URL_COLUMNS, "reason")])
MANIFEST_NAME = "_manifest.json"
URLS_FILE = "urls.parquet"
DEFAULT_SPILL_ROWS = 1_000_000


def fingerprint(table: pa.Table) -> str:
    """sha256 over the (uuid, identifier) sequence: ties a completion marker to its exact URL list."""
    digest = hashlib.sha256()
    for name in ("uuid", "identifier"):
        column = table.column(name).combine_chunks()
        offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset : column.offset + len(column) + 1]
        start, end = int(offsets[0]), int(offsets[-1])
        digest.update((offsets - start).astype("<i8").tobytes())
        digest.update(column.buffers()[2].to_pybytes()[start:end] if len(column) else b"")
    return digest.hexdigest()[:32]


@dataclass
class _ServerRows:
    """One server's rows so far: spilled segments (in order) then in-memory batches."""

    segments: list[Path] = field(default_factory=list)
    memory: list[pa.RecordBatch] = field(default_factory=list)
    memory_rows: int = 0
    total: int = 0


class ServerGrouper:
    """Pass 1: per-server buffers within a row budget, spilling the largest to disk."""

    def __init__(self, spill_dir: Path, spill_rows: int = DEFAULT_SPILL_ROWS) -> None:
        self.spill_dir = spill_dir
        self.spill_rows = spill_rows
        self.servers: dict[str, _ServerRows] = defaultdict(_ServerRows)
        self.buffered = 0
        self._segments = 0

    def add(self, batch: pa.RecordBatch) -> None:
        """Add valid rows (URL columns + server_name)."""
        if not batch.num_rows:
            return
        order = pc.sort_indices(batch, sort_keys=[("server_name", "ascending")])  # stable
        batch = batch.take(order)
        names = batch.column("server_name")
        values, counts = _run_lengths(names)
        start = 0
        urls = batch.select(list(inputs.URL_COLUMNS))
        for name, count in zip(values, counts, strict=True):
            rows = self.servers[name]
            rows.memory.append(urls.slice(start, count))
            rows.memory_rows += count
            rows.total += count
            self.buffered += count
            start += count
        while self.buffered > self.spill_rows:
            self._spill_largest()

    def _spill_largest(self) -> None:
        name = max(self.servers, key=lambda n: self.servers[n].memory_rows)
        rows = self.servers[name]
        self._segments += 1
        path = self.spill_dir / f"{self._segments:08d}.arrow"
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        with ipc.new_file(path, URL_SCHEMA) as writer:
            for batch in rows.memory:
                writer.write_batch(batch)
        rows.segments.append(path)
        self.buffered -= rows.memory_rows
        rows.memory, rows.memory_rows = [], 0

    def rows_of(self, name: str) -> Iterator[pa.RecordBatch]:
        """A server's rows in input order: segments first, then what is still in memory."""
        rows = self.servers[name]
        for path in rows.segments:
            with ipc.open_file(path) as reader:
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
            path.unlink()
        yield from rows.memory


def _run_lengths(names: pa.Array) -> tuple[list[str], list[int]]:
    encoded = pc.run_end_encode(names)
    ends = encoded.run_ends.to_numpy()
    counts = np.diff(np.concatenate([[0], ends]))
    return encoded.values.to_pylist(), counts.tolist()


def _cut(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Regroup a stream of record batches into tables of exactly `size` rows (the last may be short)."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for batch in batches:
        while batch.num_rows:
            take = min(size - pending_rows, batch.num_rows)
            pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == size:
                yield pa.Table.from_batches(pending, URL_SCHEMA)
                pending, pending_rows = [], 0
    if pending_rows:
        yield pa.Table.from_batches(pending, URL_SCHEMA)


@dataclass
class InitializeResult:
    manifest: dict
    input_rows: int
    rejected_rows: int


def write_partitions(
    rows: Iterator[pa.RecordBatch],
    urls_folder: Path,
    rejected_table: Path,
    batch_size: int,
    spill_rows: int = DEFAULT_SPILL_ROWS,
) -> InitializeResult:
    """Run both passes; swap the finished URL folder into place; return the manifest."""
    work = urls_folder.with_name(urls_folder.name + ".incoming")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    grouper = ServerGrouper(work / "_spill", spill_rows)
    rejected_writer: pq.ParquetWriter | None = None
    rejected_temp = rejected_table.with_name("." + rejected_table.name + ".tmp")
    input_rows = rejected = 0
    seen_uuids: dict[str, None] = {}
    try:
        for batch in rows:
            input_rows += batch.num_rows
            batch = _reject_duplicates_within(batch, seen_uuids)
            bad = pc.not_equal(batch.column("_reject"), "")
            if pc.any(bad).as_py():
                bad_rows = batch.filter(bad)
                table = pa.Table.from_arrays(
                    [bad_rows.column(n) for n in inputs.URL_COLUMNS] + [bad_rows.column("_reject")],
                    schema=REJECTED_SCHEMA,
                )
                if rejected_writer is None:
                    rejected_table.parent.mkdir(parents=True, exist_ok=True)
                    rejected_writer = pq.ParquetWriter(rejected_temp, REJECTED_SCHEMA, compression="zstd")
                rejected_writer.write_table(table)
                rejected += bad_rows.num_rows
            grouper.add(batch.filter(pc.invert(bad)))
        if rejected_writer is None:
            pq.write_table(REJECTED_SCHEMA.empty_table(), rejected_temp)
        else:
            rejected_writer.close()
            rejected_writer = None
        servers: dict[str, dict] = {}
        for name in sorted(grouper.servers):
            prints = []
            for partition_id, table in enumerate(_cut(grouper.rows_of(name), batch_size)):
                target = work / f"server_name={name}" / f"partition_id={partition_id}" / URLS_FILE
                target.parent.mkdir(parents=True)
                pq.write_table(table, target, compression="zstd")
                prints.append(fingerprint(table))
            servers[name] = {"urls": grouper.servers[name].total, "fingerprints": prints}
        shutil.rmtree(work / "_spill", ignore_errors=True)
        manifest = {
            "batch_size": batch_size,
            "input_rows": input_rows,
            "rejected_rows": rejected,
            "total_urls": input_rows - rejected,
            "servers": servers,
        }
        (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _swap_in(work, urls_folder)
        rejected_temp.replace(rejected_table)
        return InitializeResult(manifest, input_rows, rejected)
    except BaseException:
        if rejected_writer is not None:
            rejected_writer.close()
        rejected_temp.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        raise


def _reject_duplicates_within(batch: pa.RecordBatch, seen: dict[str, None], limit: int = 2_000_000) -> pa.RecordBatch:
    """Mark a uuid already seen as rejected. Exact up to `limit` distinct ids held in memory;
    past that, only duplicates within the recent window are caught (the verify stage still
    checks every uuid ends exactly once)."""
    ids = batch.column("uuid").to_pylist()
    reasons = batch.column("_reject").to_pylist()
    changed = False
    for i, value in enumerate(ids):
        if reasons[i]:
            continue
        if value in seen:
            reasons[i] = "duplicate uuid"
            changed = True
        else:
            seen[value] = None
            if len(seen) > limit:
                seen.pop(next(iter(seen)))
    if not changed:
        return batch
    return batch.set_column(batch.schema.get_field_index("_reject"), "_reject", pa.array(reasons, pa.string()))


def _swap_in(work: Path, final: Path) -> None:
    """Replace the URL folder by the freshly written one with two renames."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(urls_folder: Path) -> dict:
    return json.loads((urls_folder / MANIFEST_NAME).read_text())


def write_manifest_copy(manifest: dict, path: Path) -> None:
    atomic_write_json(path, manifest)
