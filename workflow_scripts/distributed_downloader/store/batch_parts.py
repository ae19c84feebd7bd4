"""A batch's files on disk: committed success files, and the durable parts of a batch in progress.

One batch folder (``server_name=S/partition_id=N/``) holds:

- ``successes.parquet``: the rows of the round that downloaded the whole batch ("full" mode);
- ``successes-r{R}.parquet``: the rows retry round R added. Retry rounds append a file, they never
  rewrite the images already stored;
- ``successes-reuse.parquet``: rows copied from a previous dataset without a request (monthly
  snapshots, reuse.py), written when the batch is first opened; the batch's commits keep it;
- ``errors.parquet``: the batch's error rows (small, no images: rewritten at each commit, so a URL
  retried successfully loses its old error row);
- ``_completed``: the marker (files.Marker), written last: the batch is done for its URL list;
- ``.parts/{fingerprint}/r{R}-{seq}.{successes|errors}.parquet``: rows of an attempt still in
  progress, flushed every few seconds (``PARTS_SECONDS``) or few hundred rows, each part atomic. A
  kill costs the rows since the last part; the next attempt (this round or a later one) carries the
  parts over and downloads only the rest. The parts are merged into the files above at commit and
  removed after the marker.

Dataset readers skip names starting with ``.`` or ``_``, so the folder is always one hive partition;
read it with the glob ``successes*.parquet`` (``success_files``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader.store.files import (
    ERROR_SCHEMA,
    ERRORS_FILE,
    PARQUET_COMPRESSION,
    ROW_GROUP_ROWS,
    SUCCESS_SCHEMA,
    SUCCESSES_FILE,
    atomic_write_table,
    fsync_and_rename,
    temp_beside,
)

log = logging.getLogger(__name__)
PARTS_DIR = ".parts"
PARTS_SECONDS = 5.0  # a kill re-downloads at most this long of a lane's work (config checkpoint_seconds)...
PARTS_ROWS = ROW_GROUP_ROWS  # ...or this many rows...
PARTS_BYTES = 32 * 1024 * 1024  # ...or this many image bytes (bounds the lane's memory)
# A committed file's row groups: parts (a few rows each at checkpoint_seconds) are gathered into
# groups of ROW_GROUP_ROWS rows, or fewer once they hold this many bytes (raw_bgr images are large).
GROUP_BYTES = 64 * 1024 * 1024
_SUCCESS_NAME = re.compile(r"^successes(?:-r(\d+)|-(reuse))?\.parquet$")
REUSE_SUCCESSES = "successes-reuse.parquet"  # rows copied from a previous dataset (reuse.py)
_PART_NAME = re.compile(r"^r(\d+)-(\d+)\.(successes|errors)\.parquet$")


def retry_successes_name(round_no: int) -> str:
    return f"successes-r{round_no}.parquet"


def round_of_success_file(path: Path) -> int:
    """0 for ``successes.parquet`` (a full download) and ``successes-reuse.parquet`` (written before
    any round's commit), R for ``successes-r{R}.parquet``."""
    match = _SUCCESS_NAME.match(path.name)
    return int(match.group(1) or 0) if match else 0


def success_files(folder: Path) -> list[Path]:
    """The batch folder's committed success files: ``successes.parquet`` first, the reused rows'
    ``successes-reuse.parquet`` next, then by round."""
    found: list[tuple[float, Path]] = []
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    for name in names:
        match = _SUCCESS_NAME.match(name)
        if match:
            found.append((0.5 if match.group(2) else int(match.group(1) or 0), folder / name))
    return [path for _, path in sorted(found)]


def utc_now() -> datetime.datetime:
    """The ``checked_at`` of a row written now."""
    return datetime.datetime.now(datetime.timezone.utc)


def read_success_column(folder: Path, column: str) -> pa.ChunkedArray:
    """One column over every success file of a batch folder (``uuid``: no image bytes are read)."""
    chunks = [pq.read_table(path, columns=[column]).column(column) for path in success_files(folder)]
    if not chunks:
        return pa.chunked_array([], SUCCESS_SCHEMA.field(column).type)
    return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], SUCCESS_SCHEMA.field(column).type)


class BatchParts:
    """The rows of one batch attempt, buffered briefly and made durable as parts in its folder."""

    def __init__(self, folder: Path, fingerprint: str, round_no: int, seconds: float = PARTS_SECONDS) -> None:
        self.folder = folder
        self.round_no = round_no
        self.seconds = seconds  # the longest a row waits in memory before it is durable
        root = folder / PARTS_DIR
        self.dir = root / fingerprint[:32]
        if root.is_dir():  # parts of another URL list (a re-initialized batch) are not ours
            for other in root.iterdir():
                if other != self.dir:
                    shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
        if self.dir.is_dir():
            for leftover in self.dir.glob(".*.tmp"):  # a part's write cut short by a kill
                leftover.unlink(missing_ok=True)
        self._successes: list[dict] = []
        self._errors: list[dict] = []
        self._bytes = 0
        self._last_flush = time.monotonic()
        self.flushed_rows = 0
        self._seq = 1 + max((seq for _, seq, _, _ in self._parts()), default=0)

    # ------------------------------------------------------------------ what earlier attempts left

    def _parts(self, kind: str | None = None) -> Iterator[tuple[int, int, str, Path]]:
        """(round, seq, kind, path) of the parts on disk, in write order (round, then seq)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        found = []
        for name in names:
            match = _PART_NAME.match(name)
            if match and (kind is None or match.group(3) == kind):
                found.append((int(match.group(1)), int(match.group(2)), match.group(3), self.dir / name))
        yield from sorted(found)

    def _read(self, path: Path, columns: list[str] | None = None) -> pa.Table | None:
        """A part's rows, or None for a part that cannot be read (moved aside: its URLs are fetched again)."""
        schema = SUCCESS_SCHEMA if path.name.endswith(".successes.parquet") else ERROR_SCHEMA
        try:
            return pq.read_table(path, columns=columns, schema=schema)
        except (OSError, pa.ArrowException) as exc:
            aside = path.with_name(f".unreadable-{path.name}")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            log.warning("part %s unreadable (%s): moved aside to %s, its URLs are downloaded again", path, exc, aside)
            return None

    def drop_committed(self, committed_round: int) -> None:
        """Parts of rounds up to the marker's were merged by that commit (a kill came before their removal)."""
        for round_no, _, _, path in list(self._parts()):
            if round_no <= committed_round:
                path.unlink(missing_ok=True)
        if self.dir.is_dir() and not any(self._parts()):
            self.remove()

    def carried_successes(self) -> set[str]:
        """uuids already downloaded by earlier attempts of this batch (image bytes are not read)."""
        ids: set[str] = set()
        for _, _, _, path in self._parts("successes"):
            table = self._read(path, ["uuid"])
            if table is not None:
                ids.update(table.column("uuid").to_pylist())
        return ids

    def carried_errors(self) -> list[tuple[int, dict]]:
        """(round, row) of the error rows earlier attempts wrote."""
        rows: list[tuple[int, dict]] = []
        for round_no, _, _, path in self._parts("errors"):
            table = self._read(path)
            if table is not None:
                rows.extend((round_no, row) for row in table.to_pylist())
        return rows

    # ------------------------------------------------------------------ this attempt

    def append_success(self, row: dict) -> None:
        row.setdefault("checked_at", utc_now())  # the server gave us the image now (or confirmed it: 304)
        self._successes.append(row)
        self._bytes += len(row.get("image") or b"")
        if len(self._successes) >= PARTS_ROWS or self._bytes >= PARTS_BYTES:
            self.flush()

    def append_error(self, row: dict) -> None:
        row.setdefault("checked_at", utc_now())  # a later snapshot retries a permanent error by its age
        self._errors.append(row)
        if len(self._errors) >= PARTS_ROWS:
            self.flush()

    def flush_if_due(self, now: float) -> None:
        if (self._successes or self._errors) and now - self._last_flush >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Make the buffered rows durable: one part file per kind, each written atomically."""
        self._last_flush = time.monotonic()
        for kind, rows, schema in (
            ("successes", self._successes, SUCCESS_SCHEMA),
            ("errors", self._errors, ERROR_SCHEMA),
        ):
            if not rows:
                continue
            table = pa.Table.from_pylist(rows, schema=schema)
            atomic_write_table(self.dir / f"r{self.round_no}-{self._seq:06d}.{kind}.parquet", table)
            self._seq += 1
            self.flushed_rows += len(rows)
            rows.clear()
        self._bytes = 0

    def discard_buffer(self) -> None:
        """Forget rows not yet flushed (a batch that broke); the parts on disk stay for the next attempt."""
        self._successes.clear()
        self._errors.clear()
        self._bytes = 0

    # ------------------------------------------------------------------ commit

    def write_successes(self, target: Path) -> int:
        """Merge every success part into ``target`` (temp + rename), one part in memory at a time.

        Returns the rows written; with none, ``target`` is written empty only if it is the batch's
        main ``successes.parquet`` (a batch folder always has one), otherwise not at all.
        """
        self.flush()
        parts = [path for _, _, _, path in self._parts("successes")]
        if not parts and target.name != SUCCESSES_FILE:
            target.unlink(missing_ok=True)
            return 0
        temp = temp_beside(target)
        rows = 0
        try:
            with pq.ParquetWriter(temp, SUCCESS_SCHEMA, compression=PARQUET_COMPRESSION) as writer:
                # Parts hold the few rows of one checkpoint each; written one by one, a batch's file
                # had row groups of ~5 rows (slow to read, metadata per group). Gathered instead,
                # with at most one group's worth (plus one part) in memory.
                group: list[pa.Table] = []
                group_rows = group_bytes = 0
                for path in parts:
                    table = pq.read_table(path, schema=SUCCESS_SCHEMA)
                    group.append(table)
                    group_rows += table.num_rows
                    group_bytes += table.nbytes
                    rows += table.num_rows
                    if group_rows >= ROW_GROUP_ROWS or group_bytes >= GROUP_BYTES:
                        writer.write_table(pa.concat_tables(group), row_group_size=group_rows)
                        group, group_rows, group_bytes = [], 0, 0
                if group:
                    writer.write_table(pa.concat_tables(group), row_group_size=max(1, group_rows))
            fsync_and_rename(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return rows

    def write_errors(self, kept: list[dict]) -> int:
        """``errors.parquet`` = ``kept`` (earlier rows that stand) + this round's error parts.

        Error parts of earlier rounds are not copied: the lane decided which of them stand (in
        ``kept``) and which it tried again.
        """
        self.flush()
        succeeded = self.carried_successes()  # a success wins over an error row of the same URL
        rows = [row for row in kept if row["uuid"] not in succeeded]
        seen = {row["uuid"] for row in rows}
        for round_no, _, _, path in self._parts("errors"):
            if round_no == self.round_no:
                for row in pq.read_table(path, schema=ERROR_SCHEMA).to_pylist():
                    if row["uuid"] not in succeeded and row["uuid"] not in seen:
                        seen.add(row["uuid"])
                        rows.append(row)
        atomic_write_table(self.folder / ERRORS_FILE, pa.Table.from_pylist(rows, schema=ERROR_SCHEMA))
        return len(rows)

    def remove(self) -> None:
        """After the marker: the parts live on in the committed files."""
        shutil.rmtree(self.dir, ignore_errors=True)
        with_parts = self.folder / PARTS_DIR
        if with_parts.is_dir() and not any(with_parts.iterdir()):
            with_parts.rmdir()
