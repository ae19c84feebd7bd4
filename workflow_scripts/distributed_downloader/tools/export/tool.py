"""The ``export_webdataset`` tool: filter -> schedule -> MPI run like the other tools, but its output
is a folder of WebDataset shards beside the store instead of a rewrite of the store.

* filter: every partition, whole (reading only file footers). The export's own filters (minimum
  side, full license) run in the runner, which reads each file's small columns once anyway to plan;
  a filter table listing every exported uuid would cost a second pass and a table as long as the store.
* schedule: the default one (partitions balanced over the ranks by rows). Scheduled rank ``k`` is
  stream ``k``: its shards are ``shard-{k}-{n:06d}.tar``, whatever number of ranks runs the job.
* run: each rank exports its streams (stream.py); rank 0 then checks that every stream is complete,
  writes ``shards.json`` and removes shards no stream lists (those of an earlier, different export).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import pyarrow.parquet as pq

from distributed_downloader.store.files import atomic_write_json
from distributed_downloader.tools.base import MPIRunnerTool, PythonFilterToolBase
from distributed_downloader.tools.dataset import Partition
from distributed_downloader.tools.export.plan import Unit
from distributed_downloader.tools.export.settings import ExportSettings, export_folder
from distributed_downloader.tools.export.shard import ShardInfo, remove_temps
from distributed_downloader.tools.export.state import (
    INDEX_FILE,
    PROGRESS_DIR,
    SHARD_NAME,
    StreamProgress,
    index_entries,
    progress_path,
    valid_prefix,
)
from distributed_downloader.tools.export.stream import StreamJob, export_stream
from distributed_downloader.tools.registry import FilterRegister, RunnerRegister
from distributed_downloader.tools.runner import summary_head

TOOL = "export_webdataset"
log = logging.getLogger("distributed_downloader.tools.export")


@FilterRegister(TOOL)
class WebDatasetExportFilter(PythonFilterToolBase):
    """Every partition as a whole; a file whose footer cannot be read is logged and counted as 0 rows
    (the runner lists it in the index as unreadable) instead of failing the filter."""

    def partition_rows(self, part: Partition) -> int:
        total = 0
        for unit in part.files(self.paths):
            path = self.successes_path(unit)
            try:
                total += pq.read_metadata(path).num_rows
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                self.logger.error("%s: cannot read %s (%s); the export lists it", TOOL, path, reason)
        return total


def units_of(runner: MPIRunnerTool, items: Sequence[Mapping]) -> list[Unit]:
    """The success files of the scheduled partitions, in export order (see plan.py)."""
    parts = sorted(Partition(item["server_name"], int(item["partition_id"])) for item in items)
    units = []
    for part in parts:
        folder = part.folder(runner.paths)
        units.extend(Unit(part.server_name, part.partition_id, folder / unit.file) for unit in part.files(runner.paths))
    return units


@RunnerRegister(TOOL)
class WebDatasetExportRunner(MPIRunnerTool):
    """Writes the shards of this rank's streams (see the module doc); never changes the store."""

    def __init__(self, config: Mapping, tool_name: str) -> None:
        super().__init__(config, tool_name)
        self.settings = ExportSettings.from_parameters(self.parameters)
        self.folder = export_folder(self.paths)

    def shard_committed(self, info: ShardInfo) -> None:
        """Called after each shard is committed and recorded (a subclass may report or throttle here)."""

    def run_rank(
        self, schedule: Mapping, mine: Sequence[Mapping], report: Callable[[dict], None] | None = None
    ) -> dict:
        application = schedule["application"]
        if self.rank == 0:  # the index exists only for a whole export: this run may change shards
            (self.folder / INDEX_FILE).unlink(missing_ok=True)
        streams: dict[int, list[Mapping]] = {}
        for item in mine:
            streams.setdefault(int(item["rank"]), []).append(item)
        stats = dict.fromkeys(("finished", "failed", "shards", "samples", "bytes", "skipped"), 0)
        stats["streams"] = len(streams)

        def on_shard(info: ShardInfo) -> None:
            stats["shards"] += 1
            stats["samples"] += info.samples
            stats["bytes"] += info.bytes
            self.shard_committed(info)
            if report is not None:
                report(stats)

        self.begin()
        try:
            for stream, items in sorted(streams.items()):
                job = StreamJob(
                    stream,
                    units_of(self, items),
                    self.folder,
                    application,
                    self.settings,
                    self.image_format,
                    map=self.map,
                    on_shard=on_shard,
                )
                try:
                    progress = export_stream(job)
                except Exception:
                    log.exception("%s: stream %d failed; the other streams go on, a rerun resumes it", TOOL, stream)
                    stats["failed"] += 1
                    continue
                stats["finished"] += 1
                stats["skipped"] += progress.skipped_rows
                log.info(
                    "%s stream %d: %d samples in %d shards, %d rows skipped, %d left out by the filters",
                    TOOL,
                    stream,
                    progress.samples,
                    len(progress.shards),
                    progress.skipped_rows,
                    sum(progress.excluded.values()),
                )
                if report is not None:
                    report(stats)
        finally:
            self.end()
        return stats

    def summarize(self, schedule: Mapping) -> dict:
        application = schedule["application"]
        streams = sorted({int(item["rank"]) for item in schedule["partitions"]})
        done: list[StreamProgress] = []
        missing = []
        for stream in streams:
            progress = StreamProgress.load(progress_path(self.folder, stream))
            if (
                progress is None
                or progress.application != application
                or not progress.complete
                or not progress.accounted()
                or valid_prefix(progress, self.folder) < len(progress.shards)
            ):
                missing.append(f"stream {stream} ({progress_path(self.folder, stream).name})")
            else:
                done.append(progress)
        excluded: dict[str, int] = {}
        for progress in done:
            for reason, count in progress.excluded.items():
                excluded[reason] = excluded.get(reason, 0) + count
        shards = index_entries(done)
        summary = {
            **summary_head(schedule, missing),
            "streams": len(streams),
            "shards": len(shards),
            "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "skipped_rows": sum(p.skipped_rows for p in done),
            "excluded": excluded,
            "unreadable": [u for p in done for u in p.unreadable],
            "skipped": [d for p in done for d in p.skipped_details()][:100],
            "index": str(self.folder / INDEX_FILE),
        }
        summary["rows_seen"] = summary["samples"] + summary["skipped_rows"] + sum(excluded.values())
        summary["rows_removed"] = summary["rows_changed"] = 0  # the store is never changed
        if missing:
            return summary
        self._remove_stale(shards, streams)
        index = {
            "format": "webdataset",
            "tool": schedule["tool"],
            "application": application,
            "settings": vars(self.settings),
            "totals": {k: summary[k] for k in ("shards", "samples", "bytes", "skipped_rows")},
            **{k: summary[k] for k in ("excluded", "unreadable", "skipped")},
            "shards": shards,  # last: the list a loader reads
        }
        for temp in self.folder.glob(f".{INDEX_FILE}.*.tmp"):  # an index write killed before its rename
            temp.unlink(missing_ok=True)
        atomic_write_json(self.folder / INDEX_FILE, index)
        return summary

    def _remove_stale(self, shards: list[dict], streams: Sequence[int]) -> None:
        """Shards and progress files of streams this export does not have (an earlier export with more
        ranks), and the temp files of killed attempts (a stream removes its own only when it resumes)."""
        remove_temps(self.folder, "shard-*")  # every stream is complete: a temp is a killed attempt's
        for temp in (self.folder / PROGRESS_DIR).glob(".rank-*.json.*.tmp"):
            temp.unlink(missing_ok=True)
        listed = {s["file"] for s in shards}
        for path in self.folder.glob("shard-*.tar"):
            if SHARD_NAME.match(path.name) and path.name not in listed:
                log.info("%s: removing %s, a shard of an earlier export", TOOL, path.name)
                path.unlink(missing_ok=True)
        keep = {progress_path(self.folder, s).name for s in streams}
        for path in (self.folder / PROGRESS_DIR).glob("rank-*.json"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def progress_text(self, stats: Mapping) -> str:
        return (
            f"streams {stats['finished']}/{stats['streams']} (failed {stats['failed']}) | {stats['shards']} shards,"
            f" {stats['samples']} samples, {stats['bytes'] / 1e6:.0f} MB written, {stats['skipped']} rows skipped"
        )

    def done_text(self, summary: Mapping) -> str:
        text = (
            f"{summary['samples']} samples in {summary['shards']} shards ({summary['bytes'] / 1e6:.1f} MB)"
            f" under {export_folder(self.paths)}"
        )
        if summary["skipped_rows"] or summary["unreadable"]:
            text += (
                f"; WARNING: {summary['skipped_rows']} rows skipped and {len(summary['unreadable'])} files unreadable"
                f" (listed in {INDEX_FILE})"
            )
        return text
