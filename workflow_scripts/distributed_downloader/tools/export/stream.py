"""One stream's export: plan its rows, pick up after its committed shards, cut the rest into shards.

A stream is the partitions the schedule gave one rank; its shards are ``shard-{rank}-{n:06d}.tar``,
numbered in plan order. The plan and the progress file (plan.py, state.py) make a rerun continue at
the first position no committed shard holds, so a killed export neither repeats nor drops a row.

A file that cannot be read is data, not a crash: a file unreadable when planned is left out and
listed (``unreadable``); a row group unreadable when exported, or a row that cannot be a sample, is
counted and listed as skipped with its reason; the rest of the stream goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from distributed_downloader.tools.export.plan import StreamPlan, Survey, Unit, build_plan, survey
from distributed_downloader.tools.export.samples import Sample, make_sample
from distributed_downloader.tools.export.settings import ExportSettings
from distributed_downloader.tools.export.shard import ShardInfo, ShardWriter, remove_temps
from distributed_downloader.tools.export.state import (
    Skips,
    StreamProgress,
    progress_path,
    shard_name,
    stream_shards,
    valid_prefix,
)

log = logging.getLogger("distributed_downloader.tools.export")

Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], list[Any]]


def _serial_map(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    return [fn(item) for item in items]


@dataclass
class StreamJob:
    """Everything one stream's export needs."""

    stream: int
    units: Sequence[Unit]
    folder: Path
    application: str
    settings: ExportSettings
    image_format: str
    map: Mapper = _serial_map  # spreads raw_bgr -> PNG encoding over the rank's threads
    on_shard: Callable[[ShardInfo], None] | None = None  # after each shard is committed and recorded


class _Files:
    """The parquet files of a stream, each opened for one row group read and dropped; a failed open is
    remembered.

    An open ``pq.ParquetFile`` holds the buffers of the last row group it read until it is dropped
    (``close()`` does not free them): 16 files kept open held 16 row groups of images. Opening a file
    again costs its footer (~1 ms), nothing next to a row group of images.
    """

    def __init__(self, units: Sequence[Unit]) -> None:
        self.units = units
        self._failed: dict[int, str] = {}

    def read_rows(self, unit: int, group: int, rows: list[int]) -> list[dict] | str:
        """The rows (as dicts) of one row group, or why they cannot be read."""
        if unit in self._failed:
            return self._failed[unit]
        try:
            parquet = pq.ParquetFile(self.units[unit].path)
        except Exception as exc:
            self._failed[unit] = f"cannot open {self.units[unit].name}: {type(exc).__name__}: {exc}"
            return self._failed[unit]
        try:
            table = parquet.read_row_group(group)
            if len(rows) != table.num_rows:  # (rows are sorted and distinct: all of them means in order)
                table = table.take(rows)  # a copy of the images: only when a filter left rows out
            return table.to_pylist()
        except Exception as exc:
            return f"cannot read row group {group} of {self.units[unit].name}: {type(exc).__name__}: {exc}"
        finally:
            parquet.close()

    def close(self) -> None:
        """Nothing stays open between reads (kept for the stream loop's ``finally``)."""


def read_window(plan: StreamPlan, window: int, files: _Files) -> list[dict | str]:
    """The rows of a window in plan order: a row dict, or the reason that row cannot be read."""
    start, end = int(plan.windows[window]), int(plan.windows[window + 1])
    units, groups, rows = plan.unit[start:end], plan.group[start:end], plan.row[start:end]
    wanted: dict[tuple[int, int], list[int]] = {}
    for u, g, r in zip(units.tolist(), groups.tolist(), rows.tolist(), strict=True):
        wanted.setdefault((u, g), []).append(r)
    read: dict[tuple[int, int], dict[int, dict] | str] = {}
    for (u, g), needed in wanted.items():
        needed = sorted(set(needed))
        result = files.read_rows(u, g, needed)
        read[(u, g)] = result if isinstance(result, str) else dict(zip(needed, result, strict=True))
    out: list[dict | str] = []
    for u, g, r in zip(units.tolist(), groups.tolist(), rows.tolist(), strict=True):
        block = read[(u, g)]
        out.append(block if isinstance(block, str) else block[r])
    return out


def survey_units(units: Sequence[Unit], settings: ExportSettings) -> tuple[list[Survey], list[dict]]:
    """The surveys of the readable files, and the unreadable ones with the reason."""
    surveys, unreadable = [], []
    for unit in units:
        try:
            surveys.append(survey(unit, settings))
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.error("export: cannot read %s (%s): its rows are not exported; the rest goes on", unit.name, reason)
            unreadable.append({"file": unit.name, "reason": reason})
    return surveys, unreadable


def _resume(job: StreamJob, plan: StreamPlan, surveys: Sequence[Survey], unreadable: list[dict]) -> StreamProgress:
    """The committed prefix to continue from, after removing whatever no progress entry vouches for."""
    path = progress_path(job.folder, job.stream)
    progress = StreamProgress.load(path)
    if progress is not None and (progress.application, progress.plan) != (job.application, plan.digest):
        log.info("export stream %d: the dataset or the settings changed; writing its shards again", job.stream)
        progress = None
    if progress is None:
        progress = StreamProgress(job.stream, job.application, plan.digest, plan.total)
    keep = valid_prefix(progress, job.folder)
    if keep < len(progress.shards):
        log.warning(
            "export stream %d: %s is missing or not as recorded; writing it and the %d shards after it again",
            job.stream,
            progress.shards[keep]["file"],
            len(progress.shards) - keep - 1,
        )
        progress.truncate(keep)
    excluded: dict[str, int] = {}
    for item in surveys:
        for reason, count in item.excluded.items():
            excluded[reason] = excluded.get(reason, 0) + count
    progress.excluded, progress.unreadable = excluded, unreadable
    progress.save(path)  # before removing the files it no longer lists
    remove_temps(job.folder, f"shard-{job.stream}-*")
    for temp in path.parent.glob(f".{path.name}.*.tmp"):  # a progress write killed before its rename
        temp.unlink(missing_ok=True)
    for number, shard in stream_shards(job.folder, job.stream).items():
        if number >= len(progress.shards):
            shard.unlink(missing_ok=True)
    return progress


def export_stream(job: StreamJob) -> StreamProgress:
    """Export one stream (resuming its committed prefix). Returns its progress, complete."""
    surveys, unreadable = survey_units(job.units, job.settings)
    plan = build_plan(surveys, job.settings, job.stream)
    progress = _resume(job, plan, surveys, unreadable)
    if progress.complete:
        return progress
    path = progress_path(job.folder, job.stream)
    settings = job.settings
    files = _Files(plan.units)
    writer: ShardWriter | None = None
    skips = Skips()
    shard_start = progress.position

    def commit(end: int) -> None:
        nonlocal writer, skips, shard_start
        assert writer is not None
        info = writer.commit()
        progress.add_shard(info.to_json(), shard_start, end, skips)
        progress.save(path)
        writer, skips, shard_start = None, Skips(), end
        if job.on_shard is not None:
            job.on_shard(info)

    def to_sample(item: tuple[int, dict | str]) -> Sample | str:
        position, row = item
        if isinstance(row, str):
            return row
        unit = plan.units[int(plan.unit[position])]
        return make_sample(row, unit.server_name, unit.partition_id, job.image_format)

    try:
        for window in range(plan.window_at(progress.position), plan.window_count):
            first = int(plan.windows[window])
            items = [(first + i, row) for i, row in enumerate(read_window(plan, window, files))]
            items = [item for item in items if item[0] >= progress.position]
            for (position, row), sample in zip(items, job.map(to_sample, items), strict=True):
                if isinstance(sample, str):
                    unit = plan.units[int(plan.unit[position])]
                    uuid = row.get("uuid") if isinstance(row, dict) else None
                    skips.add(1, sample, file=unit.name, uuid=uuid)
                    continue
                chunks = ShardWriter.encode(sample.members)
                size = sum(len(chunk) for chunk in chunks)
                if writer is not None and not writer.fits(size, settings.max_samples, settings.max_bytes):
                    commit(position)
                if writer is None:
                    writer = ShardWriter(job.folder / shard_name(job.stream, len(progress.shards)))
                writer.add(chunks)
        if writer is not None:
            commit(plan.total)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        files.close()
    if skips.rows:
        log.warning("export stream %d: %d rows after its last shard skipped", job.stream, skips.rows)
    progress.finish(skips)
    progress.save(path)
    if progress.skipped_rows:
        log.warning(
            "export stream %d: %d rows skipped (unreadable or not an image), e.g. %s",
            job.stream,
            progress.skipped_rows,
            progress.skipped_details()[:3],
        )
    return progress
