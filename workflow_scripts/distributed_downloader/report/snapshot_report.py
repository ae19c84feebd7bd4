"""The change report of a monthly snapshot: what changed since the previous dataset, per server.

Written after the last round (rule ``snapshot_report``) to ``<reports>/snapshot_changes.json`` and
``.csv``. Counts come from three places:

- the plan (snapshot.py, ``_plan.json``): ``urls``, ``new`` (no previous row at all), ``reused``
  (copied without a request; ``reused_by_source_id`` of them matched by source_id), ``errors_kept``
  (permanent previous errors, no request), ``gone`` (previous images whose URL left the input, by the
  server they were on);
- the dataset now, per batch, for the rows that were requested again: the revalidation sample is
  ``unchanged`` (the same original bytes as its staged previous copy: a 304, or a 200 with the same
  MD5), ``changed`` (a 200 with other bytes: the image is replaced) or ``revalidation_failed`` (an
  error row now, e.g. a 404: gone from the server); previous errors tried again are
  ``errors_recovered`` or still errors;
- the download rounds' batch statistics: ``requests`` sent and ``not_modified`` (304 answers).
  A round killed and resumed keeps only its last attempt's statistics: these two may undercount.

Then the staged copies of the revalidation sample (reuse.py) are removed: no round is left to use them.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.config import Paths
from distributed_downloader.engine import reuse
from distributed_downloader.plan import snapshot
from distributed_downloader.store.batch_parts import REUSE_SUCCESSES, success_files
from distributed_downloader.store.files import ERRORS_FILE, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
COLUMNS = (
    "server_name",
    "urls",
    "new",
    "reused",
    "reused_by_source_id",
    "revalidated",
    "not_modified",
    "unchanged",
    "changed",
    "revalidation_failed",
    "errors_kept",
    "errors_retried",
    "errors_recovered",
    "gone",
    "requests",
)
_asked = functools.cache(lambda: pa.array([snapshot.REVALIDATE, snapshot.RETRY_ERROR], pa.string()))  # rows asked again


def _row(server: str) -> dict:
    return {key: (server if key == "server_name" else 0) for key in COLUMNS}


def _outcomes(folder: Path) -> tuple[dict[str, str], dict[str, int]]:
    """uuid -> hashsum_original of the rows downloaded (not copied) in a batch; uuid -> error code."""
    hashes: dict[str, str] = {}
    for path in success_files(folder):
        if path.name == REUSE_SUCCESSES:
            continue
        table = pq.ParquetFile(path).read(columns=["uuid", "hashsum_original"])
        hashes.update(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))
    codes: dict[str, int] = {}
    if (folder / ERRORS_FILE).exists():
        table = pq.ParquetFile(folder / ERRORS_FILE).read(columns=["uuid", "error_code"])
        codes = dict(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))
    return hashes, codes


def _before(folder: Path, sample: list[dict], files: Mapping[int, str]) -> dict[str, str]:
    """uuid -> hashsum_original of the revalidation sample's previous images: from the staged copies
    (reuse.py), else (a row not staged: profiling's probe fetched it) from the previous file's row."""
    out: dict[str, str] = {}
    for path in sorted((folder / reuse.STAGED_DIR).glob("*.parquet")):
        table = pq.ParquetFile(path).read(columns=["uuid", "hashsum_original"])
        out.update(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))
    missing: dict[int, list[dict]] = {}
    for planned in sample:
        if planned["uuid"] not in out and planned["file_id"] in files:
            missing.setdefault(planned["file_id"], []).append(planned)
    for file_id, rows in missing.items():
        try:
            column = pq.ParquetFile(files[file_id]).read(columns=["hashsum_original"]).column(0)
            out.update((r["uuid"], column[r["prev_row"]].as_py()) for r in rows if r["prev_row"] < len(column))
        except (OSError, pa.ArrowException) as exc:  # the previous file is gone: those rows stay unclassified
            log.warning("%s unreadable (%s): %d revalidated rows not classified", files[file_id], exc, len(rows))
    return out


def _round_stats(paths: Paths) -> dict[str, dict[str, int]]:
    """Per server: requests sent and 304 answers, over every round's batch statistics."""
    out: dict[str, dict[str, int]] = {}
    for path in paths.round_states("batches").values():
        try:
            batches = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for stats in batches:
            entry = out.setdefault(stats["server_name"], {"requests": 0, "not_modified": 0})
            entry["requests"] += int(stats.get("requests", 0))
            entry["not_modified"] += int((stats.get("statuses") or {}).get("304", 0))
    return out


def build(paths: Paths) -> dict:
    """The report (see the module doc); ``{"previous_dataset": false}`` for a run that reused nothing."""
    summary = snapshot.read_summary(paths)
    if summary is None:
        return {"previous_dataset": False, "servers": {}, "totals": {}}
    servers: dict[str, dict] = {}
    for name, planned in summary["servers"].items():
        row = servers.setdefault(name, _row(name))
        row["urls"], row["new"] = planned["urls"], planned["new"]
        row["reused"], row["reused_by_source_id"] = planned["reuse"], planned["by_source_id"]
        row["revalidated"], row["errors_kept"] = planned["revalidate"], planned["keep_error"]
        row["errors_retried"] = planned["retry_error"]
    for name, count in summary["gone"].items():
        servers.setdefault(name, _row(name))["gone"] = count
    for name, stats in _round_stats(paths).items():
        row = servers.setdefault(name, _row(name))
        row["requests"], row["not_modified"] = stats["requests"], stats["not_modified"]
    files = snapshot.previous_files(paths)
    for server, partition_id, plan_path in snapshot.iter_plans(paths):
        plan = pq.ParquetFile(plan_path).read(columns=["uuid", "action", "file_id", "prev_row"])
        asked = plan.filter(pc.is_in(plan.column("action"), value_set=_asked())).to_pylist()
        if not asked:
            continue
        folder = paths.batch_images(server, partition_id)
        hashes, codes = _outcomes(folder)
        before = _before(folder, [r for r in asked if r["action"] == snapshot.REVALIDATE], files)
        row = servers[server]
        for planned in asked:
            uuid = planned["uuid"]
            if planned["action"] == snapshot.RETRY_ERROR:
                row["errors_recovered"] += uuid in hashes
            elif uuid in hashes:
                row["changed" if before.get(uuid, hashes[uuid]) != hashes[uuid] else "unchanged"] += 1
            elif uuid in codes:
                row["revalidation_failed"] += 1
    totals = {key: sum(row[key] for row in servers.values()) for key in COLUMNS if key != "server_name"}
    return {
        "previous_dataset": True,
        "plan": summary["plan"],
        "previous": summary["previous"],
        "problems": summary["problems"],
        "settings": summary["settings"],
        "totals": totals,
        "servers": dict(sorted(servers.items())),
    }


def write(paths: Paths, manifest: Mapping, json_path: Path, csv_path: Path) -> dict:
    """Build and write the report, then remove the staged revalidation copies."""
    report = build(paths)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in report["servers"].values():
        writer.writerow(row)
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_json(json_path, report)
    cleaned = reuse.remove_staged(paths, manifest)
    if cleaned:
        log.info("removed the staged revalidation copies of %d batches", cleaned)
    return report
