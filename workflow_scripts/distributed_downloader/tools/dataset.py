"""The image dataset as the tools see it: partitions, file fingerprints, streaming rewrites, tool folders.

Every file a tool writes goes to a temp file beside its destination and is renamed into place, so a
killed tool leaves each file either as it was or fully rewritten. A rewritten ``successes.parquet``
carries a random write id in its parquet key-value metadata: the per-partition completion marker
records that id, which proves whether the file on disk is the one the tool produced.
"""

from __future__ import annotations

import json
import os
import uuid as uuid_mod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader.config import Paths, batch_folder
from distributed_downloader.store.batch_parts import success_files
from distributed_downloader.store.files import PARQUET_COMPRESSION, SUCCESSES_FILE, fsync_and_rename
from distributed_downloader.store.jsonfiles import read_json as read_json  # re-exported: tools import it from here

WRITE_ID_KEY = b"distributed_downloader.write_id"
FILTER_SCHEMA = pa.schema(
    [
        ("server_name", pa.string()),
        ("partition_id", pa.int64()),
        ("uuid", pa.string()),  # null: the whole partition
        ("reason", pa.string()),  # null: the tool's default reason
    ]
)
REPORT_FIELDS = [
    pa.field("server_name", pa.string()),
    pa.field("partition_id", pa.int64()),
    pa.field("tool", pa.string()),
    pa.field("reason", pa.string()),
]


@dataclass(frozen=True, order=True)
class Partition:
    """One batch folder of the image store: ``server_name=S/partition_id=N``.

    ``file`` names one of its success files: a retry round appends ``successes-r{R}.parquet``
    beside ``successes.parquet`` (batch_parts.py); runners rewrite each file on its own (``files``).
    """

    server_name: str
    partition_id: int
    file: str = SUCCESSES_FILE

    @property
    def key(self) -> str:
        return f"{self.server_name}/{self.partition_id}"

    @property
    def suffix(self) -> str:
        """'' for the main file, '-r2' for ``successes-r2.parquet``: tells apart per-file markers and reports."""
        return "" if self.file == SUCCESSES_FILE else self.file.removeprefix("successes").removesuffix(".parquet")

    def folder(self, paths: Paths) -> Path:
        return paths.batch_images(self.server_name, self.partition_id)

    def files(self, paths: Paths) -> list[Partition]:
        """One unit per success file of the folder (the main file alone when there is none)."""
        names = [path.name for path in success_files(self.folder(paths))]
        return [Partition(self.server_name, self.partition_id, name) for name in names or [SUCCESSES_FILE]]

    def to_json(self) -> dict:
        return {"server_name": self.server_name, "partition_id": self.partition_id}


@dataclass(frozen=True)
class ToolPaths:
    """Where one tool keeps its files, under ``<tools_folder>/<tool>/``."""

    root: Path
    logs: Path

    @classmethod
    def of(cls, paths: Paths, tool: str) -> ToolPaths:
        return cls(paths.tools / tool, paths.logs / "tools" / tool)

    @property
    def filter_dir(self) -> Path:
        return self.root / "filter"

    @property
    def filter_table(self) -> Path:
        return self.filter_dir / "table.parquet"

    @property
    def filter_summary(self) -> Path:
        return self.filter_dir / "_summary.json"

    @property
    def schedule(self) -> Path:
        return self.root / "schedule.json"

    @property
    def done(self) -> Path:
        return self.root / "_done.json"

    @property
    def markers(self) -> Path:
        return self.root / "done"

    @property
    def removed(self) -> Path:
        return self.root / "removed"

    def marker(self, part: Partition) -> Path:
        return self.markers / batch_folder(part.server_name, f"{part.partition_id}{part.suffix}.json")

    def removed_report(self, part: Partition, application: str) -> Path:
        folder = self.removed / batch_folder(part.server_name, part.partition_id)
        return folder / f"removed-{application[:16]}{part.suffix}.parquet"


def successes_path(paths: Paths, part: Partition) -> Path:
    return paths.batch_images(part.server_name, part.partition_id) / part.file


def _hive_value(name: str, prefix: str) -> str | None:
    return name[len(prefix) :] if name.startswith(prefix) else None


def list_partitions(images: Path) -> list[Partition]:
    """Every partition folder holding a success file, sorted by (server_name, partition_id)."""
    found: list[Partition] = []
    if not images.is_dir():
        return found
    with os.scandir(images) as servers:
        for server in servers:
            server_name = _hive_value(server.name, "server_name=")
            if server_name is None or not server.is_dir():
                continue
            with os.scandir(server.path) as partitions:
                for entry in partitions:
                    value = _hive_value(entry.name, "partition_id=")
                    if value is None or not value.isdigit() or not entry.is_dir():
                        continue
                    if success_files(Path(entry.path)):
                        found.append(Partition(server_name, int(value)))
    return sorted(found)


def file_fingerprint(path: Path) -> str:
    """Identity of a parquet file: the write id a tool stamped into it, else its size and mtime."""
    metadata = pq.read_schema(path).metadata or {}
    if WRITE_ID_KEY in metadata:
        return "write:" + metadata[WRITE_ID_KEY].decode()
    stat = path.stat()
    return f"stat:{stat.st_size}:{stat.st_mtime_ns}"


def new_write_id() -> str:
    return uuid_mod.uuid4().hex


def with_write_id(schema: pa.Schema, write_id: str) -> pa.Schema:
    metadata = dict(schema.metadata or {})
    metadata[WRITE_ID_KEY] = write_id.encode()
    return schema.with_metadata(metadata)


class ParquetRewrite:
    """A parquet file written row group by row group to a temp file beside ``path``; ``commit`` renames it.

    The temp name carries ``tag`` so a rerun can remove the leftovers of a killed attempt of the same tool.
    """

    def __init__(self, path: Path, schema: pa.Schema, tag: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.schema = schema
        self.temp = path.parent / temp_name(path.name, tag)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.temp, schema, compression=PARQUET_COMPRESSION)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            assert self._writer is not None
            self._writer.write_table(table.cast(self.schema) if table.schema != self.schema else table)
            self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def commit(self) -> None:
        self.close()
        fsync_and_rename(self.temp, self.path)

    def abort(self) -> None:
        try:
            self.close()
        finally:
            self.temp.unlink(missing_ok=True)


def temp_name(final: str, tag: str) -> str:
    """``.<final>.<tag>.<random>.tmp``: a temp file beside ``final`` that `remove_stale_temps` finds by its tag."""
    return f".{final}.{tag}.{uuid_mod.uuid4().hex[:12]}.tmp"


def remove_stale_temps(folder: Path, name: str, tag: str) -> int:
    """Delete temp files a killed attempt of this tool left beside ``folder/name``."""
    removed = 0
    if folder.is_dir():
        for temp in folder.glob(f".{name}.{tag}.*.tmp"):
            temp.unlink(missing_ok=True)
            removed += 1
    return removed


def parameters_digest(data: Mapping) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]
