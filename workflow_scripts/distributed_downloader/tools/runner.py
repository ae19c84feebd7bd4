"""Applying a runner to its partitions: crash-safe rewrites, completion markers and the summary.

Per partition, in this order:

1. stream ``successes.parquet`` row group by row group through ``runner.apply_batch`` into a temp file
   (stamped with a fresh write id) and the removed rows into a temp report; when ``apply_batch``
   returned every batch unchanged (the same table object), the temp file is dropped and the marker
   written *done* at once: the partition is left as it was;
2. rename the report into ``removed/server_name=S/partition_id=N/removed-<application>.parquet``;
3. write the marker ``done/server_name=S/partition_id=N.json`` as *pending*, naming the fingerprint of
   the file it started from (``source``) and of the file it is about to put in place (``produced``);
4. rename the temp file over ``successes.parquet``;
5. mark the marker *done*.

A rerun of the same application (same filter result) skips *done* partitions, finishes *pending* ones
whose file already is the produced one, and redoes the others from their untouched source: a tool is
never applied twice to a partition, and every removed row is in exactly one report.

A partition folder may hold several success files (a retry round appends ``successes-r{R}.parquet``):
each is a unit of its own here (``Partition.files``), with its own marker and report, so a rewrite
never has to replace several files at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.store.files import ROW_GROUP_ROWS, SUCCESS_SCHEMA, atomic_write_json
from distributed_downloader.tools.batch import BatchResult, PartitionContext
from distributed_downloader.tools.dataset import (
    REPORT_FIELDS,
    ParquetRewrite,
    Partition,
    file_fingerprint,
    new_write_id,
    read_json,
    remove_stale_temps,
    successes_path,
    with_write_id,
)

if TYPE_CHECKING:  # annotations only: base.py's MPIRunnerTool calls this module
    from distributed_downloader.tools.base import MPIRunnerTool

log = logging.getLogger("distributed_downloader.tools.runner")
FILTER_ROWS_PER_SCAN = 1_000_000  # filter rows a rank holds in memory at once


class RunnerError(RuntimeError):
    pass


def report_schema(keep_images: bool) -> pa.Schema:
    fields = [f for f in SUCCESS_SCHEMA if keep_images or f.name != "image"]
    return pa.schema(fields + REPORT_FIELDS)


def _report_rows(
    removed: pa.Table,
    reasons: str | Sequence[str] | None,
    part: Partition,
    tool: str,
    schema: pa.Schema,
    default_reason: str,
) -> pa.Table:
    n = removed.num_rows
    if reasons is None:
        reasons = [default_reason] * n
    elif isinstance(reasons, str):
        reasons = [reasons] * n
    elif len(reasons) != n:
        raise RunnerError(f"{tool}: apply_batch returned {len(reasons)} reasons for {n} removed rows")
    columns = {}
    for fld in schema:
        if fld.name == "server_name":
            columns[fld.name] = pa.array([part.server_name] * n, pa.string())
        elif fld.name == "partition_id":
            columns[fld.name] = pa.array([part.partition_id] * n, pa.int64())
        elif fld.name == "tool":
            columns[fld.name] = pa.array([tool] * n, pa.string())
        elif fld.name == "reason":
            columns[fld.name] = pa.array(list(reasons), pa.string())
        elif fld.name in removed.column_names:
            columns[fld.name] = removed.column(fld.name).cast(fld.type)
        else:
            columns[fld.name] = pa.nulls(n, fld.type)
    return pa.table(columns, schema=schema)


def _check_result(result: BatchResult, batch: pa.Table, tool: str) -> None:
    if not isinstance(result, BatchResult):
        raise RunnerError(f"{tool}: apply_batch must return a BatchResult, got {type(result).__name__}")
    if result.kept.column_names != batch.column_names:
        raise RunnerError(
            f"{tool}: apply_batch kept rows with columns {result.kept.column_names}, expected {batch.column_names}"
        )
    removed = result.removed.num_rows if result.removed is not None else 0
    if result.kept.num_rows + removed != batch.num_rows:
        raise RunnerError(
            f"{tool}: apply_batch got {batch.num_rows} rows but kept {result.kept.num_rows} and removed {removed}"
        )


def partition_state(runner: MPIRunnerTool, application: str, part: Partition) -> str:
    """``done``, ``finish`` (the produced file is in place, the marker still says pending) or ``todo``."""
    marker = read_json(runner.tool_paths.marker(part))
    if not isinstance(marker, dict) or marker.get("application") != application:
        return "todo"
    if marker.get("state") == "done":
        return "done"
    path = successes_path(runner.paths, part)
    if marker.get("produced") and path.exists() and file_fingerprint(path) == marker["produced"]:
        return "finish"
    return "todo"


def _finish_marker(runner: MPIRunnerTool, part: Partition) -> dict:
    path = runner.tool_paths.marker(part)
    marker = read_json(path)
    marker["state"] = "done"
    atomic_write_json(path, marker)
    return marker


def process_partition(runner: MPIRunnerTool, application: str, part: Partition, filter_rows: pa.Table) -> dict:
    """Apply the runner to one partition (crash-safe, see the module doc). Returns its marker."""
    state = partition_state(runner, application, part)
    if state == "done":
        return read_json(runner.tool_paths.marker(part))
    if state == "finish":
        return _finish_marker(runner, part)
    started = time.monotonic()
    tool = runner.tool_name
    tag = f"tool-{tool}"
    path = successes_path(runner.paths, part)
    marker_path = runner.tool_paths.marker(part)
    report_path = runner.tool_paths.removed_report(part, application)
    remove_stale_temps(path.parent, path.name, tag)
    remove_stale_temps(report_path.parent, report_path.name, tag)
    if not path.exists():
        log.warning("%s: %s has no %s any more; nothing to apply", tool, part.key, part.file)
        marker = {
            "application": application,
            "state": "done",
            "source": None,
            "produced": None,
            "missing": True,
            "rows_in": 0,
            "rows_out": 0,
            "removed": 0,
            "changed": 0,
            "seconds": 0.0,
            "rank": runner.rank,
        }
        atomic_write_json(marker_path, marker)
        return marker

    source = file_fingerprint(path)
    write_id = new_write_id()
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    out = ParquetRewrite(path, with_write_id(schema, write_id), tag)
    rschema = report_schema(runner.keep_removed_images)
    report: ParquetRewrite | None = None
    context = PartitionContext(part.server_name, part.partition_id, path, filter_rows, tool)
    counts = {"rows_in": 0, "rows_out": 0, "removed": 0, "changed": 0}
    untouched = True  # every batch came back as the very same table: no need to rewrite the file
    try:
        for record_batch in parquet.iter_batches(batch_size=ROW_GROUP_ROWS):
            batch = pa.Table.from_batches([record_batch]).replace_schema_metadata(None)
            result = runner.apply_batch(batch, context)
            _check_result(result, batch, tool)
            out.write(result.kept)
            untouched = untouched and result.kept is batch and not result.changed
            counts["rows_in"] += batch.num_rows
            counts["rows_out"] += result.kept.num_rows
            counts["changed"] += int(result.changed)
            if result.removed is not None and result.removed.num_rows:
                if report is None:
                    report = ParquetRewrite(report_path, rschema, tag)
                report.write(_report_rows(result.removed, result.reasons, part, tool, rschema, runner.default_reason()))
                counts["removed"] += result.removed.num_rows
        parquet.close()
        if untouched:
            out.abort()
            report_path.unlink(missing_ok=True)
            marker = {
                "application": application,
                "state": "done",
                "source": source,
                "produced": source,
                **counts,
                "report": None,
                "rank": runner.rank,
                "rewritten": False,
            }
            marker["seconds"] = round(time.monotonic() - started, 3)
            atomic_write_json(marker_path, marker)
            return marker
        out.close()
        if report is not None:
            report.commit()
        else:
            report_path.unlink(missing_ok=True)
        marker = {
            "application": application,
            "state": "pending",
            "source": source,
            "produced": "write:" + write_id,
            **counts,
            "report": str(report_path) if report is not None else None,
            "rank": runner.rank,
        }
        atomic_write_json(marker_path, marker)
        out.commit()
    except BaseException:
        parquet.close()
        out.abort()
        if report is not None:
            report.abort()
        raise
    marker["state"] = "done"
    marker["rewritten"] = True
    marker["seconds"] = round(time.monotonic() - started, 3)
    atomic_write_json(marker_path, marker)
    return marker


def load_filter_rows(
    table_path, parts: Iterable[Partition], columns: Sequence[str] | None
) -> dict[Partition, pa.Table]:  # noqa: ANN001
    """The filter-table rows of ``parts``, grouped per partition, in one scan of the table."""
    wanted = {part.key: part for part in parts}
    empty_schema = pq.read_schema(table_path)
    if columns is not None:
        keep = ["server_name", "partition_id", "uuid"] + [c for c in columns if c in empty_schema.names]
        keep = list(dict.fromkeys(keep))
    else:
        keep = empty_schema.names
    result: dict[Partition, list[pa.Table]] = {}
    if wanted:
        value_set = pa.array(sorted(wanted))
        parquet = pq.ParquetFile(table_path)
        try:
            for record_batch in parquet.iter_batches(batch_size=65536, columns=keep):
                batch = pa.Table.from_batches([record_batch])
                key = pc.binary_join_element_wise(
                    batch.column("server_name"), pc.cast(batch.column("partition_id"), pa.string()), "/"
                )
                mask = pc.is_in(key, value_set=value_set)
                if not pc.any(mask).as_py():
                    continue
                selected = batch.filter(mask)
                keys = pc.filter(key, mask).to_numpy(zero_copy_only=False)
                order = np.argsort(keys, kind="stable")
                keys = keys[order]
                selected = selected.take(pa.array(order))
                starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
                ends = np.r_[starts[1:], len(keys)]
                for start, end in zip(starts, ends, strict=True):
                    result.setdefault(wanted[keys[start]], []).append(selected.slice(start, end - start))
        finally:
            parquet.close()
    schema = pa.schema([empty_schema.field(name) for name in keep])
    return {
        part: pa.concat_tables(result[part]) if part in result else schema.empty_table() for part in wanted.values()
    }


def _chunks(parts: Sequence[Mapping], limit: int) -> Iterable[list[Mapping]]:
    chunk: list[Mapping] = []
    rows = 0
    for item in parts:
        if chunk and rows + item["filter_rows"] > limit:
            yield chunk
            chunk, rows = [], 0
        chunk.append(item)
        rows += item["filter_rows"]
    if chunk:
        yield chunk


def run_partitions(
    runner: MPIRunnerTool,
    schedule: Mapping,
    mine: Sequence[Mapping],
    report: Callable[[dict], None] | None = None,
) -> dict:
    """Apply the runner to this rank's partitions; failures are logged and counted, never fatal."""
    application = schedule["application"]
    stats = {
        "partitions": len(mine),
        "done_before": 0,
        "processed": 0,
        "failed": 0,
        "rows_in": 0,
        "removed": 0,
        "changed": 0,
    }
    todo = []
    for item in mine:
        part = Partition(item["server_name"], int(item["partition_id"]))
        if all(partition_state(runner, application, unit) == "done" for unit in part.files(runner.paths)):
            stats["done_before"] += 1
        else:
            todo.append(item)
    runner.begin()
    try:
        for chunk in _chunks(todo, FILTER_ROWS_PER_SCAN):
            parts = [Partition(item["server_name"], int(item["partition_id"])) for item in chunk]
            rows = load_filter_rows(schedule["filter_table"], parts, runner.filter_columns)
            for part in parts:
                part_rows = rows.pop(part)
                try:
                    markers = [
                        process_partition(runner, application, unit, part_rows) for unit in part.files(runner.paths)
                    ]
                except Exception:
                    log.exception("%s failed on %s", runner.tool_name, part.key)
                    stats["failed"] += 1
                    continue
                stats["processed"] += 1
                marker = {key: sum(m.get(key, 0) for m in markers) for key in ("rows_in", "removed", "changed")}
                for key in ("rows_in", "removed", "changed"):
                    stats[key] += marker.get(key, 0)
                log.info(
                    "%s %s: %d rows in, %d removed, %d changed",
                    runner.tool_name,
                    part.key,
                    marker.get("rows_in", 0),
                    marker.get("removed", 0),
                    marker.get("changed", 0),
                )
                if report is not None:
                    report(stats)
    finally:
        runner.end()
    return stats


def summary_head(schedule: Mapping, missing: list[str]) -> dict:
    """The fields every tool's run summary (``_done.json``) starts with: tool, application, done or not, sizes."""
    return {
        "tool": schedule["tool"],
        "application": schedule["application"],
        "ok": not missing,
        "missing": missing[:100],
        "partitions": len(schedule["partitions"]),
        "dataset": schedule["totals"]["dataset"],
        "filter_rows": schedule["totals"]["filter_rows"],
    }


def summarize(schedule: Mapping, runner: MPIRunnerTool) -> dict:
    """Totals over every scheduled partition's marker; ``missing`` lists partitions not done."""
    application = schedule["application"]
    totals = {"rows_seen": 0, "rows_kept": 0, "rows_removed": 0, "rows_changed": 0}
    missing = []
    for item in schedule["partitions"]:
        part = Partition(item["server_name"], int(item["partition_id"]))
        markers = [read_json(runner.tool_paths.marker(unit)) for unit in part.files(runner.paths)]
        if not all(
            isinstance(m, dict) and m.get("application") == application and m.get("state") == "done" for m in markers
        ):
            missing.append(part.key)
            continue
        for marker in markers:
            totals["rows_seen"] += marker.get("rows_in", 0)
            totals["rows_kept"] += marker.get("rows_out", 0)
            totals["rows_removed"] += marker.get("removed", 0)
            totals["rows_changed"] += marker.get("changed", 0)
    return {
        **summary_head(schedule, missing),
        **totals,
        "removed_reports": str(runner.tool_paths.removed),
    }
