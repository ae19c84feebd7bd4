"""Base classes of a tool's three parts: filter (one process), scheduler (one process), runner (MPI ranks).

A tool named ``T`` works in ``<tools_folder>/T/``:

* the **filter** reads the current dataset (only the columns it needs) and writes the *filter table*
  ``filter/table.parquet`` (``server_name, partition_id, uuid, reason`` plus any ``extra_fields``: the
  rows to act on; a null ``uuid`` means the whole partition) and ``filter/_summary.json`` (the affected
  partitions with their row counts);
* the **scheduler** assigns the affected partitions to ranks -> ``schedule.json``;
* the **runner** rewrites each of its partitions' ``successes.parquet`` row group by row group through
  ``apply_batch`` (see ``runner.py`` for the files, markers and crash safety).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader import config as config_mod
from distributed_downloader.store.files import SUCCESSES_FILE, atomic_write_json
from distributed_downloader.tools import runner
from distributed_downloader.tools.batch import BatchResult, PartitionContext
from distributed_downloader.tools.dataset import (
    FILTER_SCHEMA,
    ParquetRewrite,
    Partition,
    ToolPaths,
    list_partitions,
    parameters_digest,
    read_json,
    remove_stale_temps,
    successes_path,
)

T = TypeVar("T")
R = TypeVar("R")


class ToolBase:
    """What every part of a tool knows: the validated config, its tool name, paths and rank count."""

    family: ClassVar[str] = ""

    def __init__(self, config: Mapping, tool_name: str) -> None:
        self.config = config
        self.tool_name = tool_name
        self.filter_name = tool_name  # the original's attribute name
        self.paths = config_mod.paths(config)
        self.tool_paths = ToolPaths.of(self.paths, tool_name)
        self.parameters: Mapping[str, Any] = config["tools_parameters"]
        self.total_workers = self.parameters["max_nodes"] * self.parameters["workers_per_node"]
        self.logger = logging.getLogger(f"distributed_downloader.tools.{tool_name}")

    def run(self) -> Any:
        raise NotImplementedError


# --------------------------------------------------------------------------- filters


class FilterTableWriter:
    """Streams filter rows into ``filter/table.parquet`` and counts them per partition."""

    def __init__(self, tool: FilterToolBase) -> None:
        self.tool = tool
        self.schema = tool.filter_schema
        remove_stale_temps(tool.tool_paths.filter_dir, tool.tool_paths.filter_table.name, "filter")
        self.out = ParquetRewrite(tool.tool_paths.filter_table, self.schema, "filter")
        self.counts: dict[Partition, int] = {}
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, part: Partition, rows: pa.Table | None) -> None:
        """``rows``: a table with ``uuid`` (and optionally ``reason`` / extra fields); None: the whole partition."""
        if rows is None:
            rows = pa.table({"uuid": pa.nulls(1, pa.string())})
        if rows.num_rows == 0:
            return
        columns = {}
        for fld in self.schema:
            if fld.name == "server_name":
                columns[fld.name] = pa.array([part.server_name] * rows.num_rows, pa.string())
            elif fld.name == "partition_id":
                columns[fld.name] = pa.array([part.partition_id] * rows.num_rows, pa.int64())
            elif fld.name in rows.column_names:
                columns[fld.name] = rows.column(fld.name).cast(fld.type)
            else:
                columns[fld.name] = pa.nulls(rows.num_rows, fld.type)
        self._pending.append(pa.table(columns, schema=self.schema))
        self._pending_rows += rows.num_rows
        self.counts[part] = self.counts.get(part, 0) + rows.num_rows
        if self._pending_rows >= 65536:
            self.flush()

    def add_table(self, table: pa.Table) -> None:
        """Rows of any partitions, with ``server_name`` and ``partition_id`` columns, in the filter schema."""
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        counts = table.group_by(["server_name", "partition_id"]).aggregate([([], "count_all")]).to_pydict()
        for server, pid, count in zip(counts["server_name"], counts["partition_id"], counts["count_all"], strict=True):
            part = Partition(server, pid)
            self.counts[part] = self.counts.get(part, 0) + count
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= 65536:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.out.write(pa.concat_tables(self._pending))
            self._pending, self._pending_rows = [], 0

    def commit(self) -> None:
        self.flush()
        self.out.commit()

    def abort(self) -> None:
        self.out.abort()


class FilterToolBase(ToolBase):
    """A tool's filter: decides which rows (or whole partitions) the runner acts on.

    Subclass ``PythonFilterToolBase`` for a per-partition filter. To filter across partitions, override
    ``run()``: stream rows into ``writer = self.table_writer()`` (``add(part, rows)`` or ``add_table``)
    and ``return self.finish(writer, rows_by_partition)`` (the row count of every dataset partition).
    """

    family = "filter"
    extra_fields: ClassVar[Sequence[pa.Field]] = ()  # extra filter-table columns the runner reads

    @property
    def filter_schema(self) -> pa.Schema:
        return pa.schema(list(FILTER_SCHEMA) + list(self.extra_fields))

    def partitions(self) -> list[Partition]:
        return list_partitions(self.paths.images)

    def successes_path(self, part: Partition) -> Path:
        return successes_path(self.paths, part)

    def partition_rows(self, part: Partition) -> int:
        """Rows over every success file of the partition folder."""
        return sum(pq.read_metadata(self.successes_path(unit)).num_rows for unit in self._units(part))

    def read_partition(self, part: Partition, columns: Sequence[str]) -> pa.Table:
        """``columns`` of every success file of the partition folder, as one table."""
        tables = [pq.read_table(self.successes_path(unit), columns=list(columns)) for unit in self._units(part)]
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def _units(self, part: Partition) -> list[Partition]:
        return [part] if part.file != SUCCESSES_FILE else part.files(self.paths)

    def table_writer(self) -> FilterTableWriter:
        return FilterTableWriter(self)

    def finish(self, writer: FilterTableWriter, rows_by_partition: Mapping[Partition, int]) -> dict:
        """Commit the filter table, then write the summary (the filter rule's declared output)."""
        writer.commit()
        affected = [
            {**part.to_json(), "rows": rows_by_partition.get(part, 0), "filter_rows": count}
            for part, count in sorted(writer.counts.items())
        ]
        summary = {
            "tool": self.tool_name,
            "dataset": {"partitions": len(rows_by_partition), "rows": sum(rows_by_partition.values())},
            "filter_rows": sum(writer.counts.values()),
            "affected_partitions": len(affected),
            "parameters": dict(self.parameters),
            "image_format": self.config["downloader_parameters"]["image_format"],
            "partitions": affected,
        }
        # The application id: same filter result on the same dataset -> same id (a rerun never re-applies).
        summary["id"] = parameters_digest(summary)
        atomic_write_json(self.tool_paths.filter_summary, summary)
        self.logger.info(
            "%s filter: %d rows in %d of %d partitions (%d dataset rows)",
            self.tool_name,
            summary["filter_rows"],
            len(affected),
            len(rows_by_partition),
            summary["dataset"]["rows"],
        )
        return summary


class PythonFilterToolBase(FilterToolBase):
    """A filter that looks at one partition at a time (bounded memory).

    Override ``filter_partition``; ``columns`` are the successes columns it receives. The default
    selects every partition as a whole, as the original's ``PythonFilterToolBase`` did.
    """

    columns: ClassVar[Sequence[str]] = ()

    def filter_partition(self, table: pa.Table | None, server_name: str, partition_id: int) -> pa.Table | None:
        """The rows to act on (a table with ``uuid`` and optionally ``reason``/extra fields), an empty
        table for none, or None for the whole partition. ``table`` is None when ``columns`` is empty."""
        return None

    def run(self) -> dict:
        writer = self.table_writer()
        rows_by_partition: dict[Partition, int] = {}
        parts = self.partitions()
        last = time.monotonic()
        try:
            for done, part in enumerate(parts):
                if time.monotonic() - last > 30:
                    self.logger.info("%s filter: %d/%d partitions read", self.tool_name, done, len(parts))
                    last = time.monotonic()
                rows_by_partition[part] = self.partition_rows(part)
                table = self.read_partition(part, self.columns) if self.columns else None
                writer.add(part, self.filter_partition(table, part.server_name, part.partition_id))
        except BaseException:
            writer.abort()
            raise
        return self.finish(writer, rows_by_partition)


# --------------------------------------------------------------------------- schedulers


class SchedulerToolBase(ToolBase):
    family = "scheduler"


class DefaultScheduler(SchedulerToolBase):
    """Assigns the affected partitions to ranks, balanced by their row counts (largest first)."""

    def assign(self, partitions: Sequence[Mapping], workers: int) -> list[int]:
        """The rank of each partition: longest-processing-time-first over the partitions' rows."""
        order = sorted(
            range(len(partitions)),
            key=lambda i: (-partitions[i]["rows"], partitions[i]["server_name"], partitions[i]["partition_id"]),
        )
        loads = [(0, rank) for rank in range(workers)]
        ranks = [0] * len(partitions)
        for i in order:
            load, rank = heapq.heappop(loads)
            ranks[i] = rank
            heapq.heappush(loads, (load + max(1, partitions[i]["rows"]), rank))
        return ranks

    def run(self, out: Path | None = None) -> dict:
        summary = read_json(self.tool_paths.filter_summary)
        if summary is None:
            raise FileNotFoundError(f"no filter summary at {self.tool_paths.filter_summary}: run the filter first")
        workers = max(1, self.total_workers)
        partitions = summary["partitions"]
        ranks = self.assign(partitions, workers)
        scheduled = [{**p, "rank": int(r)} for p, r in zip(partitions, ranks, strict=True)]
        per_rank = [0] * workers
        for p in scheduled:
            per_rank[p["rank"] % workers] += p["rows"]
        plan = {
            "tool": self.tool_name,
            "application": summary["id"],
            "ranks": workers,
            "config": dict(self.config),
            "filter_table": str(self.tool_paths.filter_table),
            "totals": {
                "partitions": len(scheduled),
                "rows": sum(p["rows"] for p in scheduled),
                "filter_rows": summary["filter_rows"],
                "dataset": summary["dataset"],
                "rows_per_rank": per_rank,
            },
            "partitions": scheduled,
        }
        atomic_write_json(out or self.tool_paths.schedule, plan)
        self.logger.info(
            "%s schedule: %d partitions over %d ranks, rows per rank %s",
            self.tool_name,
            len(scheduled),
            workers,
            per_rank,
        )
        return plan


# --------------------------------------------------------------------------- runners


class MPIRunnerTool(ToolBase):
    """A tool's runner: one instance per MPI rank; the framework feeds it row groups of its partitions.

    The default ``apply_batch`` removes the rows the filter listed (the original's filter runners);
    override it to change rows. ``threads`` (= ``tools_parameters.cpu_per_worker``) sizes ``map``.
    """

    family = "runner"
    keep_removed_images: ClassVar[bool] = False  # copy the image bytes of removed rows into the report
    filter_columns: ClassVar[Sequence[str] | None] = None  # filter-table columns loaded per partition (None: all)

    def __init__(self, config: Mapping, tool_name: str) -> None:
        super().__init__(config, tool_name)
        self.threads = max(1, int(self.parameters["cpu_per_worker"]))
        self.image_format: str = config["downloader_parameters"]["image_format"]
        self._pool: ThreadPoolExecutor | None = None
        self.rank = 0
        self.size = 1

    def begin(self) -> None:
        """Called once per rank before its first partition."""

    def end(self) -> None:
        """Called once per rank after its last partition."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(x) for x in items]`` on ``threads`` threads (Pillow releases the GIL while it decodes)."""
        items = list(items)
        if self.threads <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"{self.tool_name}-worker")
        return list(self._pool.map(fn, items))

    def default_reason(self) -> str:
        return f"removed by {self.tool_name}"

    def apply_batch(self, batch: pa.Table, part: PartitionContext) -> BatchResult:
        mask = part.selected(batch)
        if part.whole or not mask.any():
            return BatchResult(kept=batch)
        keep = pa.array(~mask)
        removed = batch.filter(pa.array(mask))
        default = self.default_reason()
        reasons = [part.reason_for(u, default) for u in removed.column("uuid").to_pylist()]
        return BatchResult(kept=batch.filter(keep), removed=removed, reasons=reasons)

    def run_rank(
        self, schedule: Mapping, mine: Sequence[Mapping], report: Callable[[dict], None] | None = None
    ) -> dict:
        """This rank's share of the run step (``mine``: its scheduled partitions); returns its stats.

        The default rewrites each partition's success files in place through ``apply_batch``
        (``runner.run_partitions``). A runner whose output is not the store (an export) overrides
        this, ``summarize`` and the two texts. ``stats["failed"]`` non-zero makes the rank exit 1.
        """
        return runner.run_partitions(self, schedule, mine, report)

    def summarize(self, schedule: Mapping) -> dict:
        """On rank 0 once every rank is done: the run's summary (``_done.json``); ``ok`` False = unfinished
        (``missing`` names what), which fails the job so that the same command resumes it."""
        return runner.summarize(schedule, self)

    def progress_text(self, stats: Mapping) -> str:
        """One progress line of this rank (printed every few seconds)."""
        return (
            f"partitions {stats['done_before'] + stats['processed']}/{stats['partitions']} (failed {stats['failed']})"
            f" | rows {stats['rows_in']} in, {stats['removed']} removed, {stats['changed']} changed"
        )

    def done_text(self, summary: Mapping) -> str:
        """The closing line of a finished run."""
        return (
            f"{summary['partitions']} partitions, {summary['rows_seen']} rows seen,"
            f" {summary['rows_removed']} removed, {summary['rows_changed']} changed"
        )

    def run(self) -> Any:  # the MPI loop lives in tools/worker.py
        raise NotImplementedError("runners are driven by distributed_downloader.tools.worker (run_rank)")
