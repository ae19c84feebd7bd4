"""Files on disk: atomic writes, the image store's schemas, batch writers and completion markers.

A batch is committed by renaming its finished parquet files into place and then writing the
`completed` marker; a batch without a valid marker is not done, whatever else lies in its folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SUCCESS_SCHEMA = pa.schema(
    [
        ("uuid", pa.string()),
        ("source_id", pa.string()),
        ("identifier", pa.string()),
        ("is_license_full", pa.bool_()),
        ("license", pa.string()),
        ("source", pa.string()),
        ("title", pa.string()),
        ("hashsum_original", pa.string()),
        ("hashsum_resized", pa.string()),
        ("original_size", pa.list_(pa.int64())),
        ("resized_size", pa.list_(pa.int64())),
        ("image", pa.binary()),
        # Added for monthly snapshots (issue #18), optional: stores written before them read these as
        # null. ``etag``/``last_modified``: the server's validators of the image, as sent, for a later
        # conditional GET; ``checked_at``: when the server last gave us this image or confirmed it
        # (304). A row carried over to a new snapshot keeps all three, so its age keeps growing.
        ("etag", pa.string()),
        ("last_modified", pa.string()),
        ("checked_at", pa.timestamp("ms", tz="UTC")),
    ]
)
ERROR_SCHEMA = pa.schema(
    [
        ("uuid", pa.string()),
        ("identifier", pa.string()),
        ("retry_count", pa.int64()),
        ("error_code", pa.int64()),
        ("error_msg", pa.string()),
        ("checked_at", pa.timestamp("ms", tz="UTC")),  # when the URL last failed so (null in older stores)
    ]
)
SNAPSHOT_COLUMNS = ("etag", "last_modified", "checked_at")  # optional: absent from stores of older versions
SUCCESSES_FILE = "successes.parquet"
ERRORS_FILE = "errors.parquet"
MARKER_FILE = "_completed"  # leading "_": dataset readers skip it
PARQUET_COMPRESSION = "zstd"
ROW_GROUP_ROWS = 256  # image rows are large: small row groups keep writer memory bounded


def temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def fsync_and_rename(temp: Path, path: Path) -> None:
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    temp = temp_beside(path)
    try:
        temp.write_bytes(data)
        fsync_and_rename(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def atomic_write_table(path: Path, table: pa.Table, **kwargs: Any) -> None:
    temp = temp_beside(path)
    try:
        pq.write_table(table, temp, compression=PARQUET_COMPRESSION, **kwargs)
        fsync_and_rename(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class StreamingParquet:
    """Rows appended in small row groups to a temp file; `commit` renames it into place.

    Memory stays bounded by one row group whatever the batch size.
    """

    def __init__(self, path: Path, schema: pa.Schema, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.path = path
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.temp = temp_beside(path)
        self._writer = pq.ParquetWriter(self.temp, schema, compression=PARQUET_COMPRESSION)
        self._pending: list[dict] = []
        self.rows = 0

    def append(self, row: Mapping[str, Any]) -> None:
        self._pending.append(dict(row))
        self.rows += 1
        if len(self._pending) >= self.row_group_rows:
            self._flush()

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.append(row)

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_pylist(self._pending, schema=self.schema))
            self._pending = []

    def commit(self) -> None:
        self._flush()
        self._writer.close()
        fsync_and_rename(self.temp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.temp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Marker:
    """Proof that a batch's files are complete for the URL list with `fingerprint`."""

    fingerprint: str
    round: int
    successes: int
    errors: int
    transient: int  # error rows that a later round may retry

    def to_json(self) -> dict:
        return asdict(self)


def read_marker(batch_dir: Path) -> Marker | None:
    try:
        data = json.loads((batch_dir / MARKER_FILE).read_text())
        return Marker(**{k: data[k] for k in Marker.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_marker(batch_dir: Path, marker: Marker) -> None:
    atomic_write_json(batch_dir / MARKER_FILE, marker.to_json())


def valid_marker(batch_dir: Path, fingerprint: str) -> Marker | None:
    """The marker if it exists and belongs to this exact URL list."""
    marker = read_marker(batch_dir)
    return marker if marker is not None and marker.fingerprint == fingerprint else None


def read_table(path: Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """A parquet file, or an empty table of the schema when it does not exist."""
    if not path.exists():
        table = schema.empty_table()
        return table.select(columns) if columns else table
    return pq.read_table(path, columns=columns, schema=schema)
