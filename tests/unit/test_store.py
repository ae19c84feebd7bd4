"""Tests for the on-disk store: atomic writes, streaming parquet, completion markers, read_table."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_downloader.store import files as store
from distributed_downloader.store.files import (
    ERROR_SCHEMA,
    SUCCESS_SCHEMA,
    Marker,
    StreamingParquet,
    read_marker,
    read_table,
    valid_marker,
    write_marker,
)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def error_row(i: int) -> dict:
    return {
        "uuid": f"u{i}",
        "identifier": f"http://a.org/{i}.jpg",
        "retry_count": 0,
        "error_code": 404,
        "error_msg": "HTTP 404",
    }


def success_row(i: int) -> dict:
    return {
        "uuid": f"u{i}",
        "source_id": f"s{i}",
        "identifier": f"http://a.org/{i}.jpg",
        "is_license_full": True,
        "license": "CC0",
        "source": "src",
        "title": "t",
        "hashsum_original": "a" * 32,
        "hashsum_resized": "b" * 32,
        "original_size": [480, 640],
        "resized_size": [48, 64],
        "image": bytes([i % 256]) * 10,
    }


def test_atomic_write_bytes_text_json(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "file.bin"
    store.atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    store.atomic_write_text(target, "replaced")
    assert target.read_text() == "replaced"
    store.atomic_write_json(tmp_path / "d.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "d.json").read_text()) == {"a": [1, 2], "b": 1}
    assert leftovers(target.parent) == [] and leftovers(tmp_path) == []


def test_atomic_write_bytes_failure_keeps_old_target(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    store.atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        store.atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_write_table_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "errors.parquet"
    table = pa.Table.from_pylist([error_row(i) for i in range(5)], schema=ERROR_SCHEMA)
    store.atomic_write_table(target, table)
    assert pq.read_table(target).equals(table)
    assert leftovers(tmp_path) == []


def test_atomic_write_table_failure_never_leaves_a_partial_target(tmp_path: Path) -> None:
    # a column type parquet cannot store: the writer fails after the temp file was opened
    bad = pa.table({"uuid": pa.array([(1, 2, 3)], pa.month_day_nano_interval())})
    target = tmp_path / "errors.parquet"
    good = pa.Table.from_pylist([error_row(1)], schema=ERROR_SCHEMA)
    store.atomic_write_table(target, good)
    before = target.read_bytes()
    with pytest.raises(pa.ArrowException):
        store.atomic_write_table(target, bad)
    assert target.read_bytes() == before
    assert pq.read_table(target).equals(good)
    assert leftovers(tmp_path) == []


def test_atomic_write_table_bad_kwargs_leave_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "t.parquet"
    with pytest.raises(TypeError):
        store.atomic_write_table(target, pa.table({"a": [1]}), schema=pa.schema([("a", pa.string())]))
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_streaming_parquet_many_row_groups(tmp_path: Path) -> None:
    target = tmp_path / "successes.parquet"
    writer = StreamingParquet(target, SUCCESS_SCHEMA, row_group_rows=7)
    writer.extend(success_row(i) for i in range(50))
    assert writer.rows == 50
    assert not target.exists()  # nothing visible before commit
    writer.commit()
    meta = pq.ParquetFile(target).metadata
    assert meta.num_row_groups == 8  # 7 full groups of 7 + one of 1
    table = pq.read_table(target)
    assert table.schema == SUCCESS_SCHEMA
    assert table.column("uuid").to_pylist() == [f"u{i}" for i in range(50)]
    assert table.column("original_size").to_pylist()[0] == [480, 640]
    assert table.column("image").to_pylist()[49] == bytes([49]) * 10
    assert leftovers(tmp_path) == []


def test_streaming_parquet_empty_commit_gives_empty_table(tmp_path: Path) -> None:
    target = tmp_path / "errors.parquet"
    writer = StreamingParquet(target, ERROR_SCHEMA)
    writer.commit()
    table = pq.read_table(target)
    assert table.num_rows == 0 and table.schema == ERROR_SCHEMA


def test_streaming_parquet_abort_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "errors.parquet"
    writer = StreamingParquet(target, ERROR_SCHEMA, row_group_rows=2)
    writer.extend(error_row(i) for i in range(5))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_streaming_parquet_bad_row_mid_write_then_abort_keeps_old_target(tmp_path: Path) -> None:
    target = tmp_path / "errors.parquet"
    old = pa.Table.from_pylist([error_row(0)], schema=ERROR_SCHEMA)
    store.atomic_write_table(target, old)
    writer = StreamingParquet(target, ERROR_SCHEMA, row_group_rows=2)
    writer.extend(error_row(i) for i in range(4))  # two row groups already written
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        writer.extend([error_row(5), {**error_row(6), "error_code": "not a number"}])
    writer.abort()
    assert pq.read_table(target).equals(old)
    assert leftovers(tmp_path) == []


def test_markers_round_trip_and_fingerprint_match(tmp_path: Path) -> None:
    batch = tmp_path / "server_name=a.org" / "partition_id=0"
    assert read_marker(batch) is None
    marker = Marker(fingerprint="f" * 32, round=2, successes=7, errors=3, transient=1)
    write_marker(batch, marker)
    assert (batch / store.MARKER_FILE).is_file()
    assert read_marker(batch) == marker
    assert valid_marker(batch, "f" * 32) == marker
    assert valid_marker(batch, "0" * 32) is None
    assert leftovers(batch) == []


@pytest.mark.parametrize(
    "content",
    ["", "{not json", "[]", '{"fingerprint": "x", "round": 1}', "null"],
)
def test_broken_marker_counts_as_missing(tmp_path: Path, content: str) -> None:
    (tmp_path / store.MARKER_FILE).write_text(content)
    assert read_marker(tmp_path) is None
    assert valid_marker(tmp_path, "x") is None


def test_read_table_missing_file_gives_empty_table_of_the_schema(tmp_path: Path) -> None:
    table = read_table(tmp_path / "nope.parquet", SUCCESS_SCHEMA)
    assert table.num_rows == 0 and table.schema == SUCCESS_SCHEMA
    ids = read_table(tmp_path / "nope.parquet", ERROR_SCHEMA, ["uuid", "error_code"])
    assert ids.column_names == ["uuid", "error_code"] and ids.num_rows == 0


def test_read_table_existing_file_with_columns(tmp_path: Path) -> None:
    target = tmp_path / "errors.parquet"
    rows = pa.Table.from_pylist([error_row(i) for i in range(3)], schema=ERROR_SCHEMA)
    store.atomic_write_table(target, rows)
    table = read_table(target, ERROR_SCHEMA, ["uuid"])
    assert table.column_names == ["uuid"]
    assert table.column("uuid").to_pylist() == ["u0", "u1", "u2"]
