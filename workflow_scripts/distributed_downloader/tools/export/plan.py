"""The deterministic order in which one stream (one scheduled rank) exports its rows.

Resuming without duplicating or losing a sample needs one thing: the rerun must walk the very same
sequence of rows, so that "the first N positions are in committed shards" means the same rows both
times. The plan is that sequence, computed before any image is read from the files' metadata and a
few small columns: ``(file, row group, row)`` per position, cut into *windows* (the rows read and
shuffled together). Its digest (files and their fingerprints, every setting including the shard
sizes, the positions) is stored with the progress; a rerun whose plan differs (the store or the
settings changed) starts the stream over.

Order without shuffle: partitions by (server_name, partition_id), success files in their order
(``successes.parquet`` first, then by round), rows in file order; one window per row group. With
``shuffle``: the row groups of the whole stream in a seeded random order, then the rows of each
window of ``shuffle_window`` rows in a seeded random order. A full row-level shuffle would read a
whole row group per sample; this one reads each row group once and still spreads every shard over
many partitions (servers). Trainers shuffle again at load time (``WebDataset(...).shuffle(n)``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader.tools.dataset import file_fingerprint
from distributed_downloader.tools.export.selection import columns_for, select
from distributed_downloader.tools.export.settings import ExportSettings


@dataclass(frozen=True)
class Unit:
    """One success file of a partition: what a plan reads."""

    server_name: str
    partition_id: int
    path: Path

    @property
    def name(self) -> str:
        """How reports name it: ``server_name=S/partition_id=N/<file>``."""
        return f"server_name={self.server_name}/partition_id={self.partition_id}/{self.path.name}"


@dataclass
class Survey:
    """What the plan needs of one file: rows per row group and which rows pass the filters."""

    unit: Unit
    fingerprint: str
    group_rows: np.ndarray
    selected: np.ndarray
    excluded: dict[str, int] = field(default_factory=dict)


def survey(unit: Unit, settings: ExportSettings) -> Survey:
    """Read a file's metadata and filter columns (no image bytes). Raises if the file is unreadable."""
    parquet = pq.ParquetFile(unit.path)
    try:
        metadata = parquet.metadata
        group_rows = np.array([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)], np.int64)
        rows = int(group_rows.sum())
        columns = columns_for(settings)
        table = parquet.read(columns=columns) if columns else pa.table({})
        if columns and table.num_rows != rows:
            raise ValueError(f"read {table.num_rows} rows of {rows}")
    finally:
        parquet.close()
    selected, excluded = select(table, rows, settings)
    return Survey(unit, file_fingerprint(unit.path), group_rows, selected, excluded)


@dataclass
class StreamPlan:
    """Positions ``0..total-1`` of a stream: file index, row group and row of each, and the windows."""

    units: list[Unit]
    unit: np.ndarray  # int32 index into units, per position
    group: np.ndarray  # int32 row group, per position
    row: np.ndarray  # int32 row within the row group, per position
    windows: np.ndarray  # int64 start position of each window, then total
    digest: str

    @property
    def total(self) -> int:
        return int(self.windows[-1])

    @property
    def window_count(self) -> int:
        return len(self.windows) - 1

    def window_at(self, position: int) -> int:
        """The window holding ``position`` (``window_count`` at or past the end)."""
        return min(int(np.searchsorted(self.windows, position, side="right")) - 1, self.window_count)


def _blocks(surveys: Sequence[Survey]) -> list[tuple[int, int, np.ndarray]]:
    """(file, row group, selected rows of it) for every row group with a selected row, in file order."""
    blocks = []
    for index, item in enumerate(surveys):
        start = 0
        for group, rows in enumerate(item.group_rows.tolist()):
            chosen = np.flatnonzero(item.selected[start : start + rows])
            if len(chosen):
                blocks.append((index, group, chosen.astype(np.int32)))
            start += rows
    return blocks


def build_plan(surveys: Sequence[Survey], settings: ExportSettings, stream: int) -> StreamPlan:
    """The stream's order (see the module doc); the same surveys and settings give the same plan."""
    blocks = _blocks(surveys)
    units, groups, rows, windows = [], [], [], [0]
    if settings.shuffle:
        rng = np.random.default_rng([settings.seed, stream])
        order = rng.permutation(len(blocks)) if blocks else np.zeros(0, np.int64)
        window: list[tuple[int, int, np.ndarray]] = []
        size = 0

        def close() -> None:
            u = np.concatenate([np.full(len(r), i, np.int32) for i, _, r in window])
            g = np.concatenate([np.full(len(r), k, np.int32) for _, k, r in window])
            r = np.concatenate([r for _, _, r in window])
            perm = rng.permutation(len(r))
            units.append(u[perm])
            groups.append(g[perm])
            rows.append(r[perm])
            windows.append(windows[-1] + len(r))

        for b in order.tolist():
            window.append(blocks[b])
            size += len(blocks[b][2])
            if size >= settings.shuffle_window:
                close()
                window, size = [], 0
        if window:
            close()
    else:
        for index, group, chosen in blocks:
            units.append(np.full(len(chosen), index, np.int32))
            groups.append(np.full(len(chosen), group, np.int32))
            rows.append(chosen)
            windows.append(windows[-1] + len(chosen))
    unit = np.concatenate(units) if units else np.zeros(0, np.int32)
    group = np.concatenate(groups) if groups else np.zeros(0, np.int32)
    row = np.concatenate(rows) if rows else np.zeros(0, np.int32)
    starts = np.array(windows, np.int64)
    digest = _digest(surveys, settings, stream, unit, group, row, starts)
    return StreamPlan([s.unit for s in surveys], unit, group, row, starts, digest)


def _digest(
    surveys: Sequence[Survey],
    settings: ExportSettings,
    stream: int,
    *arrays: np.ndarray,
) -> str:
    head = {
        "stream": stream,
        "settings": asdict(settings),  # the shard sizes too: they decide which rows a committed shard holds
        "files": [[s.unit.name, s.fingerprint] for s in surveys],
    }
    sha = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for array in arrays:
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()[:32]
