"""Monthly snapshots: the match and the plan (snapshot.py) on small previous datasets written here."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_downloader import config as config_mod
from distributed_downloader.plan import partition, snapshot
from distributed_downloader.store.files import ERROR_SCHEMA, SUCCESS_SCHEMA

DAY = 86_400


def _success(identifier: str, source_id: str = "", image: bytes = b"", checked_at: float | None = None) -> dict:
    return {
        "uuid": "old-" + identifier,
        "source_id": source_id,
        "identifier": identifier,
        "is_license_full": False,
        "license": "Not provided",
        "source": "Not provided",
        "title": "Not provided",
        "hashsum_original": "h-" + identifier,
        "hashsum_resized": "r",
        "original_size": [2, 3],
        "resized_size": [2, 3],
        "image": image or identifier.encode(),
        "etag": f'"{identifier[-6:]}"',
        "last_modified": "Tue, 14 Nov 2023 22:13:20 GMT",
        "checked_at": None if checked_at is None else int(checked_at * 1000),
    }


def _error(identifier: str, code: int, checked_at: float | None = None) -> dict:
    return {
        "uuid": "olderr-" + identifier,
        "identifier": identifier,
        "retry_count": 1,
        "error_code": code,
        "error_msg": f"HTTP {code}",
        "checked_at": None if checked_at is None else int(checked_at * 1000),
    }


def write_previous(
    root: Path, server: str, successes: list[dict], errors: list[dict] = (), schema=SUCCESS_SCHEMA
) -> Path:  # noqa: ANN001
    folder = root / "downloaded_images" / f"server_name={server}" / "partition_id=0"
    folder.mkdir(parents=True, exist_ok=True)
    if schema is SUCCESS_SCHEMA:
        table = pa.Table.from_pylist(successes, schema=schema)
    else:
        table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in successes], schema=schema)
    pq.write_table(table, folder / "successes.parquet")
    if errors:
        pq.write_table(pa.Table.from_pylist(list(errors), schema=ERROR_SCHEMA), folder / "errors.parquet")
    return folder


def initialize(tmp_path: Path, rows: list[tuple[str, str, str]], previous: list[Path] | Path, **params: object):  # noqa: ANN201
    """Cut (uuid, source_id, url) rows into batches of 4 and plan them against ``previous``."""
    config = config_mod.validate(
        {
            "path_to_input": "unused",
            "path_to_output": str(tmp_path / "out"),
            "previous_dataset": [str(p) for p in previous] if isinstance(previous, list) else str(previous),
            "snapshot_parameters": {"revalidate_fraction": 0.0, **params},
            "downloader_parameters": {"batch_size": 4},
        }
    )
    paths = config_mod.paths(config)
    table = pa.table(
        {
            "uuid": [r[0] for r in rows],
            "source_id": [r[1] for r in rows],
            "identifier": [r[2] for r in rows],
            "license": ["cc"] * len(rows),
            "source": ["s"] * len(rows),
            "title": ["t"] * len(rows),
            "server_name": [r[2].split("/")[2] for r in rows],
            "_reject": [""] * len(rows),
        }
    )
    result = partition.write_partitions(iter(table.to_batches()), paths.urls, paths.rejected_table, 4)
    summary = snapshot.plan(config, paths, result.manifest)
    return config, paths, result.manifest, summary


def planned(paths: config_mod.Paths) -> dict[str, dict]:
    """uuid -> plan row, over every batch."""
    out = {}
    for _, _, path in snapshot.iter_plans(paths):
        out.update({row["uuid"]: row for row in pq.read_table(path).to_pylist()})
    return out


@pytest.mark.parametrize(
    ("bucket_urls", "join_rows"),
    [
        (snapshot.BUCKET_URLS, snapshot.JOIN_ROWS_PER_GB),  # one stage bucket, one join
        (8, 2),  # two batches of 4 per stage bucket; the join in 20 hash slices of at most ~2 URLs a side
    ],
)
def test_urls_that_succeeded_are_reused_and_a_salted_sample_is_revalidated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bucket_urls: int, join_rows: int
) -> None:
    monkeypatch.setattr(snapshot, "BUCKET_URLS", bucket_urls)
    monkeypatch.setattr(snapshot, "JOIN_ROWS_PER_GB", join_rows * 1024 / 2048)  # memory_mb is 2048
    urls = [f"http://a.org/img/{i}.jpg" for i in range(40)]
    previous = tmp_path / "prev"
    write_previous(previous, "a.org", [_success(u) for u in urls[:30]])
    rows = [(f"n{i}", f"s{i}", u) for i, u in enumerate(urls)]
    _, paths, manifest, summary = initialize(tmp_path, rows, previous, revalidate_fraction=0.3)
    plan = planned(paths)
    assert set(plan) == {f"n{i}" for i in range(30)}
    assert all(row["match"] == snapshot.BY_URL and row["prev_row"] == int(uuid[1:]) for uuid, row in plan.items())
    salt = snapshot.plan_salt(manifest)
    assert summary["salt"] == salt
    assert summary["timings"]["join_slices"] == (1 if join_rows > 100 else 20)
    sample = {uuid for uuid, row in plan.items() if row["action"] == snapshot.REVALIDATE}
    assert sample == {f"n{i}" for i in range(30) if snapshot.in_sample(salt, urls[i], 0.3)}
    assert 0 < len(sample) < 30
    totals = summary["totals"]
    assert (totals["reuse"], totals["revalidate"], totals["new"], totals["urls"]) == (
        30 - len(sample),
        len(sample),
        10,
        40,
    )
    # Profiling probes a URL the download requests: never a reused one.
    candidates = snapshot.download_sample(paths, "a.org", len(manifest["servers"]["a.org"]["fingerprints"]), 50)
    assert set(candidates) == {urls[i] for i in range(40) if i >= 30 or f"n{i}" in sample}
    # Another snapshot (another URL list) draws another sample; the same list, the same one.
    assert snapshot.plan_salt(manifest) == salt
    assert snapshot.plan_salt({"servers": {"a.org": {"fingerprints": ["x"]}}}) != salt


def test_a_moved_image_is_reused_by_source_id_only_when_the_path_is_the_same_and_unique(tmp_path: Path) -> None:
    previous = tmp_path / "prev"
    write_previous(
        previous,
        "old.org",
        [
            _success("http://old.org/media/1.jpg", "rec1"),  # moved to https://new.org/media/1.jpg
            _success("http://old.org/media/2.jpg", "rec2"),  # rec2's new URL has another path: a new image
            _success("http://old.org/media/3.jpg", "rec3"),  # two new rows with rec3 and the same path: ambiguous
            _success("http://old.org/media/4.jpg", "rec4"),  # still in the input: matched by URL, not moved
        ],
    )
    rows = [
        ("n1", "rec1", "https://new.org/media/1.jpg"),
        ("n2", "rec2", "https://new.org/other/2.jpg"),
        ("n3a", "rec3", "https://new.org/media/3.jpg"),
        ("n3b", "rec3", "https://cdn.org/media/3.jpg"),
        ("n4", "rec4", "http://old.org/media/4.jpg"),
        ("n4b", "rec4", "https://new.org/media/4.jpg"),
    ]
    _, paths, _, summary = initialize(tmp_path, rows, previous)
    plan = planned(paths)
    assert plan["n1"]["match"] == snapshot.BY_SOURCE_ID and plan["n1"]["prev_row"] == 0
    assert plan["n4"]["match"] == snapshot.BY_URL
    assert set(plan) == {"n1", "n4"}
    assert summary["totals"]["by_source_id"] == 1
    assert summary["gone"] == {"old.org": 2}  # rec2's and rec3's old URLs left the input
    # Turned off, the moved image is downloaded.
    _, paths, _, summary = initialize(tmp_path / "off", rows, previous, match_by_source_id=False)
    assert set(planned(paths)) == {"n4"}


def test_previous_errors_permanent_ones_kept_until_old_transient_ones_retried(tmp_path: Path) -> None:
    now = time.time()
    previous = tmp_path / "prev"
    urls = [f"http://a.org/e/{i}.jpg" for i in range(6)]
    write_previous(
        previous,
        "a.org",
        [_success("http://a.org/ok.jpg")],
        [
            _error(urls[0], 404, now - 3 * DAY),  # permanent, recent: kept
            _error(urls[1], 404, now - 200 * DAY),  # permanent, old: tried again
            _error(urls[2], -6, now - DAY),  # robots.txt: kept
            _error(urls[3], 503, now),  # transient: tried again
            _error(urls[4], -10, now),  # ignored by that run's settings: tried again
            _error(urls[5], 410, None),  # no checked_at (an older store): the file's age, recent
        ],
    )
    rows = [(f"n{i}", "", u) for i, u in enumerate(urls)]
    _, paths, _, summary = initialize(tmp_path, rows, previous, retry_permanent_errors_after=90)
    plan = planned(paths)
    actions = {uuid: row["action"] for uuid, row in plan.items()}
    assert actions == {
        "n0": snapshot.KEEP_ERROR,
        "n1": snapshot.RETRY_ERROR,
        "n2": snapshot.KEEP_ERROR,
        "n3": snapshot.RETRY_ERROR,
        "n4": snapshot.RETRY_ERROR,
        "n5": snapshot.KEEP_ERROR,
    }
    assert plan["n0"]["error_code"] == 404 and plan["n0"]["retry_count"] == 1
    assert (summary["totals"]["keep_error"], summary["totals"]["retry_error"], summary["totals"]["new"]) == (3, 3, 0)
    # The file's age stands in for a missing checked_at: an old file makes the 410 old too.
    errors = previous / "downloaded_images" / "server_name=a.org" / "partition_id=0" / "errors.parquet"
    os.utime(errors, (now - 100 * DAY, now - 100 * DAY))
    _, paths, _, _ = initialize(tmp_path / "again", rows, previous, retry_permanent_errors_after=90)
    assert planned(paths)["n5"]["action"] == snapshot.RETRY_ERROR


def test_a_previous_error_row_without_a_code_is_retried_not_kept(tmp_path: Path) -> None:
    """Kept, its null code failed the lane's open of the batch (int(None)) in every round."""
    previous = tmp_path / "prev"
    folder = write_previous(previous, "a.org", [_success("http://a.org/1.jpg")])
    nullable = pa.schema([field.with_nullable(True) for field in ERROR_SCHEMA])
    errors = [{**_error("http://a.org/2.jpg", 404), "error_code": None}, _error("http://a.org/3.jpg", 404)]
    pq.write_table(pa.Table.from_pylist(errors, schema=nullable), folder / "errors.parquet")
    rows = [(f"n{i}", "", f"http://a.org/{i}.jpg") for i in (1, 2, 3)]
    _, paths, _, _ = initialize(tmp_path, rows, previous)
    assert {uuid: row["action"] for uuid, row in planned(paths).items()} == {
        "n1": snapshot.REUSE,
        "n2": snapshot.RETRY_ERROR,
        "n3": snapshot.KEEP_ERROR,
    }


def test_old_rows_are_revalidated_and_the_first_listed_dataset_wins(tmp_path: Path) -> None:
    now = time.time()
    newer, older = tmp_path / "newer", tmp_path / "older"
    write_previous(newer, "a.org", [_success("http://a.org/1.jpg", checked_at=now - 400 * DAY)])
    write_previous(
        older, "a.org", [_success("http://a.org/1.jpg", image=b"other"), _success("http://a.org/2.jpg", checked_at=now)]
    )
    rows = [("n1", "", "http://a.org/1.jpg"), ("n2", "", "http://a.org/2.jpg")]
    _, paths, _, summary = initialize(tmp_path, rows, [newer, older], revalidate_older_than=365)
    plan = planned(paths)
    files = snapshot.previous_files(paths)
    assert "newer" in files[plan["n1"]["file_id"]] and "older" in files[plan["n2"]["file_id"]]
    assert (plan["n1"]["action"], plan["n2"]["action"]) == (snapshot.REVALIDATE, snapshot.REUSE)


def test_a_store_written_before_the_new_columns_is_matched(tmp_path: Path) -> None:
    old_schema = pa.schema([f for f in SUCCESS_SCHEMA if f.name not in ("etag", "last_modified", "checked_at")])
    previous = tmp_path / "prev"
    folder = write_previous(previous, "a.org", [_success("http://a.org/1.jpg")], schema=old_schema)
    write_previous(previous, "b.org", [_success("http://b.org/2.jpg", checked_at=time.time())])  # a newer one
    mtime = time.time() - 10 * DAY
    os.utime(folder / "successes.parquet", (mtime, mtime))
    rows = [("n1", "", "http://a.org/1.jpg"), ("n2", "", "http://b.org/2.jpg")]
    _, paths, manifest, summary = initialize(tmp_path, rows, previous)
    assert planned(paths)["n2"]["action"] == snapshot.REUSE  # both kinds of files in one match
    row = planned(paths)["n1"]
    assert row["action"] == snapshot.REUSE
    assert abs(row["checked_at"].timestamp() - mtime) < 1  # the file's time: the row's age keeps growing
    # Copied into this run's store with the new columns: no validators, the file's time as checked_at.
    from distributed_downloader.engine import reuse
    from distributed_downloader.store.batch_parts import BatchParts

    fingerprint = manifest["servers"]["a.org"]["fingerprints"][0]
    urls = pq.read_table(paths.batch_urls("a.org", 0)).to_pylist()
    folder = paths.batch_images("a.org", 0)
    opened = reuse.open_batch(paths, "a.org", 0, fingerprint, urls, True, BatchParts(folder, fingerprint, 1))
    copy = pq.read_table(folder / "successes-reuse.parquet").to_pylist()
    assert opened.copied == 1 and copy[0]["etag"] is None and copy[0]["image"] == b"http://a.org/1.jpg"
    assert abs(copy[0]["checked_at"].timestamp() - mtime) < 1


def test_an_unreadable_previous_dataset_is_reported_and_everything_downloaded(tmp_path: Path) -> None:
    rows = [("n1", "", "http://a.org/1.jpg"), ("n2", "", "http://a.org/2.jpg")]
    _, paths, _, summary = initialize(tmp_path / "missing", rows, tmp_path / "nowhere")
    assert summary["totals"]["reuse"] == 0 and summary["totals"]["new"] == 2
    assert any("does not exist" in problem for problem in summary["problems"])
    assert snapshot.read_summary(paths) is not None and not list(snapshot.iter_plans(paths))
    # A corrupt file is left out with a message; the readable ones are used.
    previous = tmp_path / "prev"
    write_previous(previous, "a.org", [_success("http://a.org/1.jpg")])
    bad = previous / "downloaded_images" / "server_name=b.org" / "partition_id=0"
    bad.mkdir(parents=True)
    (bad / "successes.parquet").write_bytes(b"not parquet at all")
    _, paths, _, summary = initialize(tmp_path / "partly", rows, previous)
    assert set(planned(paths)) == {"n1"}
    assert any("unreadable" in problem for problem in summary["problems"])
    # This run's own output is no previous dataset.
    write_previous(tmp_path / "own" / "out", "a.org", [_success("http://a.org/1.jpg")])
    _, paths, _, summary = initialize(tmp_path / "own", rows, tmp_path / "own" / "out")
    assert not list(snapshot.iter_plans(paths))
    assert any("this run's own output" in problem for problem in summary["problems"])


def test_a_file_with_a_good_footer_but_damaged_pages_is_left_out_not_the_whole_match(tmp_path: Path) -> None:
    """Its footer reads (previous.load keeps it), its pages do not: DuckDB failed the whole join and
    nothing at all was reused (20 damaged rows sent 40 URLs to be downloaded again)."""
    good = [f"http://a.org/img/{i}.jpg" for i in range(20)]
    damaged = [f"http://b.org/img/{i}.jpg" for i in range(20)]
    write_previous(tmp_path / "p1", "a.org", [_success(u) for u in good])
    path = write_previous(tmp_path / "p2", "b.org", [_success(u) for u in damaged]) / "successes.parquet"
    column = pq.ParquetFile(path).metadata.row_group(0).column(SUCCESS_SCHEMA.names.index("identifier"))
    data = bytearray(path.read_bytes())
    for k in range(column.data_page_offset + 20, column.data_page_offset + column.total_compressed_size - 4):
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))
    assert pq.ParquetFile(path).metadata.num_rows == 20
    rows = [(f"n{i}", "", u) for i, u in enumerate(good + damaged)]
    _, paths, _, summary = initialize(tmp_path, rows, [tmp_path / "p1", tmp_path / "p2"])
    assert set(planned(paths)) == {f"n{i}" for i in range(20)}
    assert (summary["totals"]["reuse"], summary["totals"]["new"]) == (20, 20)
    assert any(str(path) in problem for problem in summary["problems"])
    assert summary["previous"][1]["success_files"] == 0


def test_a_plan_is_removed_when_the_run_has_no_previous_dataset(tmp_path: Path) -> None:
    previous = tmp_path / "prev"
    write_previous(previous, "a.org", [_success("http://a.org/1.jpg")])
    config, paths, manifest, _ = initialize(tmp_path, [("n1", "", "http://a.org/1.jpg")], previous)
    assert list(snapshot.iter_plans(paths))
    assert snapshot.plan({**config, "previous_dataset": []}, paths, manifest) is None
    assert not snapshot.plan_root(paths).exists()


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.5, 1.0])
def test_the_sample_is_a_deterministic_salted_share_of_the_urls(fraction: float) -> None:
    identifiers = [f"https://x.org/media/{i}/original.jpg" for i in range(4000)]
    keys = snapshot.sample_keys("salt", pa.array(identifiers))
    assert list(keys) == list(snapshot.sample_keys("salt", pa.array(identifiers)))  # the same every time
    chosen = snapshot.sampled(keys, fraction)
    assert [snapshot.in_sample("salt", s, fraction) for s in identifiers[:100]] == list(chosen[:100])
    assert chosen.sum() == pytest.approx(fraction * len(identifiers), abs=4 * (len(identifiers) * 0.25) ** 0.5)
    other = snapshot.sampled(snapshot.sample_keys("pepper", pa.array(identifiers)), 0.5)
    assert list(other) != list(snapshot.sampled(keys, 0.5))  # another snapshot, another sample
