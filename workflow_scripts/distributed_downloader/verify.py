"""Verification: every URL of every partition ends exactly once in successes or errors."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Mapping

import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.config import Paths
from distributed_downloader.store import (
    ERROR_SCHEMA,
    ERRORS_FILE,
    SUCCESS_SCHEMA,
    SUCCESSES_FILE,
    atomic_write_json,
    atomic_write_text,
    read_table,
    valid_marker,
)


def verify_batch(paths: Paths, server: str, partition_id: int, fp: str) -> dict:
    """Counts and problems of one batch, reading only the id columns."""
    urls = pq.read_table(paths.batch_urls(server, partition_id), columns=["uuid"]).column("uuid").to_pylist()
    folder = paths.batch_images(server, partition_id)
    marker = valid_marker(folder, fp)
    ok_ids = read_table(folder / SUCCESSES_FILE, SUCCESS_SCHEMA, ["uuid"]).column("uuid").to_pylist()
    errors = read_table(folder / ERRORS_FILE, ERROR_SCHEMA, ["uuid", "error_code"])
    error_ids = errors.column("uuid").to_pylist()
    seen = Counter(ok_ids) + Counter(error_ids)
    expected = set(urls)
    problems = []
    if marker is None:
        problems.append("no completion marker")
    missing = [u for u in urls if u not in seen]
    duplicated = [u for u, n in seen.items() if n > 1]
    unknown = [u for u in seen if u not in expected]
    if missing:
        problems.append(f"{len(missing)} URLs missing")
    if duplicated:
        problems.append(f"{len(duplicated)} URLs written more than once")
    if unknown:
        problems.append(f"{len(unknown)} rows not in the batch's URL list")
    codes = Counter(pc.cast(errors.column("error_code"), "int64").to_pylist())
    return {
        "server_name": server,
        "partition_id": partition_id,
        "urls": len(urls),
        "successes": len(ok_ids),
        "errors": len(error_ids),
        "error_codes": dict(codes),
        "problems": problems,
    }


def verify_all(manifest: Mapping, paths: Paths) -> dict:
    per_server: dict[str, dict] = {}
    problems: list[str] = []
    codes: Counter = Counter()
    for server, info in sorted(manifest["servers"].items()):
        summary = {"server_name": server, "batches": 0, "urls": 0, "successes": 0, "errors": 0}
        for partition_id, fp in enumerate(info["fingerprints"]):
            result = verify_batch(paths, server, partition_id, fp)
            summary["batches"] += 1
            for key in ("urls", "successes", "errors"):
                summary[key] += result[key]
            codes.update(result["error_codes"])
            problems.extend(f"{server}/partition_id={partition_id}: {p}" for p in result["problems"])
        summary["success_rate"] = round(summary["successes"] / summary["urls"], 4) if summary["urls"] else 0.0
        per_server[server] = summary
    totals = {k: sum(s[k] for s in per_server.values()) for k in ("batches", "urls", "successes", "errors")}
    return {
        "ok": not problems,
        "input_rows": manifest["input_rows"],
        "rejected_rows": manifest["rejected_rows"],
        "totals": totals,
        "error_codes": {str(k): v for k, v in sorted(codes.items())},
        "problems": problems[:1000],
        "servers": per_server,
    }


def write_reports(result: Mapping, json_path, csv_path) -> None:  # noqa: ANN001 - paths
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer,
        fieldnames=["server_name", "batches", "urls", "successes", "errors", "success_rate"],
        lineterminator="\n",
    )
    writer.writeheader()
    for summary in result["servers"].values():
        writer.writerow(summary)
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_json(json_path, result)
