"""Tests for verification (every URL exactly once) and the read-only status report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_downloader import config as config_mod
from distributed_downloader import inputs
from distributed_downloader.plan import partition
from distributed_downloader.report import status, verify
from distributed_downloader.store.files import (
    ERROR_SCHEMA,
    ERRORS_FILE,
    MARKER_FILE,
    SUCCESS_SCHEMA,
    SUCCESSES_FILE,
    Marker,
    atomic_write_json,
    atomic_write_table,
    write_marker,
)

COUNTS = {"a.org": 7, "b.org": 3}  # batch_size 4: a.org -> batches of 4 and 3, b.org -> one of 3


@pytest.fixture
def run(tmp_path: Path):
    """An initialized run: (paths, manifest). Nothing downloaded yet."""
    lines = ["uuid,identifier,source_id"]
    for server, count in COUNTS.items():
        lines += [f"{server}-{i},http://{server}/{i}.jpg,s{i}" for i in range(count)]
    lines.append("bad,not a url,s")
    source = tmp_path / "in.csv"
    source.write_text("\n".join(lines) + "\n")
    cfg = config_mod.validate({"path_to_input": str(source), "path_to_output": str(tmp_path / "out")})
    paths = config_mod.paths(cfg)
    manifest = partition.write_partitions(inputs.rows(source), paths.urls, paths.rejected_table, 4).manifest
    return paths, manifest


def success(row: dict) -> dict:
    return {
        "uuid": row["uuid"],
        "source_id": row["source_id"],
        "identifier": row["identifier"],
        "is_license_full": False,
        "license": row["license"],
        "source": row["source"],
        "title": row["title"],
        "hashsum_original": "0" * 32,
        "hashsum_resized": "1" * 32,
        "original_size": [10, 10],
        "resized_size": [10, 10],
        "image": b"img",
    }


def error(row: dict, code: int) -> dict:
    return {
        "uuid": row["uuid"],
        "identifier": row["identifier"],
        "retry_count": 0,
        "error_code": code,
        "error_msg": f"code {code}",
    }


def complete_batch(
    paths,
    manifest: dict,
    server: str,
    pid: int,
    round_no: int = 1,
    extra_errors: list[dict] | None = None,
    drop: int = 0,
) -> tuple[int, int]:
    """Write a consistent batch: even rows succeed, odd rows fail (-1 = transient, then 404, alternating)."""
    urls = pq.read_table(paths.batch_urls(server, pid)).to_pylist()
    kept = urls[drop:]
    ok = [success(r) for i, r in enumerate(kept) if i % 2 == 0]
    bad = [error(r, -1 if i % 4 == 1 else 404) for i, r in enumerate(kept) if i % 2 == 1]
    bad += extra_errors or []
    folder = paths.batch_images(server, pid)
    atomic_write_table(folder / SUCCESSES_FILE, pa.Table.from_pylist(ok, schema=SUCCESS_SCHEMA))
    atomic_write_table(folder / ERRORS_FILE, pa.Table.from_pylist(bad, schema=ERROR_SCHEMA))
    transient = sum(1 for e in bad if e["error_code"] == -1)
    fp = manifest["servers"][server]["fingerprints"][pid]
    write_marker(folder, Marker(fp, round_no, successes=len(ok), errors=len(bad), transient=transient))
    return len(ok), len(bad)


def complete_all(paths, manifest: dict) -> None:
    for server, info in manifest["servers"].items():
        for pid in range(len(info["fingerprints"])):
            complete_batch(paths, manifest, server, pid)


# ---------------------------------------------------------------- verify


def test_verify_all_ok_on_a_consistent_run(run, tmp_path: Path) -> None:
    paths, manifest = run
    complete_all(paths, manifest)
    result = verify.verify_all(manifest, paths)
    assert result["ok"], result["problems"]
    assert result["problems"] == []
    assert result["input_rows"] == 11 and result["rejected_rows"] == 1
    assert result["totals"] == {"batches": 3, "urls": 10, "successes": 6, "errors": 4}
    assert result["error_codes"] == {"-1": 3, "404": 1}
    a = result["servers"]["a.org"]
    assert (a["batches"], a["urls"], a["successes"], a["errors"]) == (2, 7, 4, 3)
    assert a["success_rate"] == round(4 / 7, 4)
    verify.write_reports(result, tmp_path / "r" / "verification.json", tmp_path / "r" / "servers.csv")
    assert json.loads((tmp_path / "r" / "verification.json").read_text())["ok"] is True
    with open(tmp_path / "r" / "servers.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["server_name"], r["urls"]) for r in rows] == [("a.org", "7"), ("b.org", "3")]


def test_verify_detects_missing_rows(run) -> None:
    paths, manifest = run
    complete_all(paths, manifest)
    complete_batch(paths, manifest, "a.org", 1, drop=2)
    result = verify.verify_all(manifest, paths)
    assert not result["ok"]
    assert result["problems"] == ["a.org/partition_id=1: 2 URLs missing"]


def test_verify_detects_duplicated_rows(run) -> None:
    paths, manifest = run
    complete_all(paths, manifest)
    first = pq.read_table(paths.batch_urls("b.org", 0)).to_pylist()[0]  # row 0 already succeeded
    complete_batch(paths, manifest, "b.org", 0, extra_errors=[error(first, 500)])
    result = verify.verify_all(manifest, paths)
    assert not result["ok"]
    assert result["problems"] == ["b.org/partition_id=0: 1 URLs written more than once"]


def test_verify_detects_unknown_rows(run) -> None:
    paths, manifest = run
    complete_all(paths, manifest)
    stranger = {"uuid": "stranger", "identifier": "http://a.org/x.jpg"}
    complete_batch(paths, manifest, "a.org", 1, extra_errors=[error(stranger, 404)])
    result = verify.verify_all(manifest, paths)
    assert result["problems"] == ["a.org/partition_id=1: 1 rows not in the batch's URL list"]


def test_verify_detects_missing_and_stale_markers(run) -> None:
    paths, manifest = run
    complete_all(paths, manifest)
    (paths.batch_images("a.org", 0) / MARKER_FILE).unlink()
    write_marker(paths.batch_images("b.org", 0), Marker("0" * 32, 1, 0, 0, 0))  # another URL list's marker
    result = verify.verify_all(manifest, paths)
    assert not result["ok"]
    assert sorted(result["problems"]) == [
        "a.org/partition_id=0: no completion marker",
        "b.org/partition_id=0: no completion marker",
    ]


def test_verify_nothing_downloaded(run) -> None:
    paths, manifest = run
    result = verify.verify_all(manifest, paths)
    assert not result["ok"]
    assert "a.org/partition_id=0: no completion marker" in result["problems"]
    assert "a.org/partition_id=0: 4 URLs missing" in result["problems"]
    assert result["totals"] == {"batches": 3, "urls": 10, "successes": 0, "errors": 0}


# ---------------------------------------------------------------- status


def test_status_not_initialized(tmp_path: Path) -> None:
    paths = config_mod.paths(config_mod.validate({"path_to_input": "x", "path_to_output": str(tmp_path)}))
    assert status.collect(paths) == {"stage": "not initialized"}
    assert status.render(status.collect(paths)).startswith("not initialized")


def test_status_initialized(run) -> None:
    paths, _ = run
    got = status.collect(paths)
    assert got["stage"] == "initialized"
    assert (got["input_rows"], got["rejected_rows"], got["urls"], got["servers"]) == (11, 1, 10, 2)
    assert (got["batches_total"], got["batches_done"], got["successes"], got["errors"]) == (3, 0, 0, 0)
    assert got["rounds_done"] == [] and got["progress"] == {} and got["verification_ok"] is None
    assert got["per_server"]["a.org"] == {"batches": 2, "done": 0, "successes": 0, "errors": 0}


def test_status_counts_valid_markers_only(run) -> None:
    paths, manifest = run
    ok0, bad0 = complete_batch(paths, manifest, "a.org", 0)
    ok1, bad1 = complete_batch(paths, manifest, "b.org", 0)
    write_marker(paths.batch_images("a.org", 1), Marker("0" * 32, 1, 50, 50, 50))  # stale: not counted
    paths.state.mkdir(parents=True)
    atomic_write_json(paths.state / "download_round_1.done", {"round": 1})
    atomic_write_json(paths.state / "download_round_10.done", {"round": 10})
    atomic_write_json(paths.state / "download_round_2.done", {"round": 2})
    atomic_write_json(paths.state / "round_2_progress.json", {"batches_done": 2})
    atomic_write_json(paths.state / "round_2_ranks.json", [{"rank": 0}])
    got = status.collect(paths)
    assert got["stage"] == "downloading"
    assert got["batches_done"] == 2
    assert got["successes"] == ok0 + ok1
    assert got["errors"] == bad0 + bad1
    # one transient (-1) error in a.org/0 and one in b.org/0
    assert got["errors_retryable"] == 2
    assert got["per_server"]["a.org"] == {"batches": 2, "done": 1, "successes": ok0, "errors": bad0}
    assert got["rounds_done"] == [1, 2, 10]
    assert got["progress"] == {"2": {"batches_done": 2}}

    text = status.render(got)
    assert "stage: downloading" in text
    assert "rounds done: [1, 2, 10]" in text
    assert "input rows 11  rejected 1  URLs 10 on 2 servers" in text
    assert f"batches 2/3 done   successes {ok0 + ok1}  errors {bad0 + bad1} (2 retryable)" in text
    assert "verification" not in text
    lines = text.splitlines()
    server_lines = [line for line in lines if line.startswith(("a.org", "b.org"))]
    assert server_lines[0].startswith("a.org")  # the server with most batches left comes first
    assert server_lines[0].split() == ["a.org", "2", "1", str(ok0), str(bad0)]


def test_status_verified_and_render_limit(run) -> None:
    paths, manifest = run
    complete_all(paths, manifest)
    paths.state.mkdir(parents=True)
    atomic_write_json(paths.reports / "verification.json", {"ok": True})
    got = status.collect(paths)
    assert got["stage"] == "verified"
    assert got["verification_ok"] is True
    assert got["batches_done"] == got["batches_total"] == 3
    text = status.render(got, servers=1)
    assert "verification: OK" in text
    assert sum(1 for line in text.splitlines() if line.startswith(("a.org", "b.org"))) == 1
    atomic_write_json(paths.reports / "verification.json", {"ok": False})
    assert "PROBLEMS" in status.render(status.collect(paths))


def test_rows_a_tool_removed_stay_accounted_for(run) -> None:
    """After a tool moved rows out of successes into its removal report, a rerun of verify still passes."""
    paths, manifest = run
    complete_all(paths, manifest)
    folder = paths.batch_images("a.org", 0)
    table = pq.read_table(folder / SUCCESSES_FILE)
    moved, kept = table.slice(0, 1), table.slice(1)
    atomic_write_table(folder / SUCCESSES_FILE, kept)
    report = paths.tools / "size_based" / "removed" / "server_name=a.org" / "partition_id=0" / "removed-x.parquet"
    atomic_write_table(report, moved.drop_columns(["image"]).append_column("reason", pa.array(["too small"])))
    result = verify.verify_all(manifest, paths)
    assert result["ok"], result["problems"]
    # ...but a row both kept and reported removed is written twice.
    atomic_write_table(folder / SUCCESSES_FILE, table)
    result = verify.verify_all(manifest, paths)
    assert result["problems"] == ["a.org/partition_id=0: 1 URLs written more than once"]
