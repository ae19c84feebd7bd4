"""Tests for initialization: grouping URLs by server, cutting batches, spills, manifest, swap-in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from distributed_downloader import inputs
from distributed_downloader.plan import partition
from distributed_downloader.plan.partition import REJECTED_SCHEMA, URL_SCHEMA, ServerGrouper, fingerprint
from distributed_downloader.store.files import atomic_write_json

SERVERS = ["alpha.org", "beta.org", "gamma.org:8080"]


def make_csv(path: Path, n: int = 40, extra: str = "", change: dict[int, str] | None = None) -> Path:
    """n rows spread unevenly over three servers, interleaved; optional extra raw lines."""
    lines = ["uuid,identifier,source_id,title"]
    for i in range(n):
        server = SERVERS[0] if i % 5 in (0, 1, 2) else SERVERS[(i % 5) - 2]
        url = (change or {}).get(i, f"http://{server}/img/{i}.jpg")
        lines.append(f"id-{i:03d},{url},src-{i},title {i}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def small_batches(path: Path, size: int = 3) -> Iterator[pa.RecordBatch]:
    """The reader's batches re-cut into tiny slices, as a long input would stream in."""
    for batch in inputs.rows(path):
        for start in range(0, batch.num_rows, size):
            yield batch.slice(start, size)


def run(
    tmp: Path,
    source: Path,
    batch_size: int = 4,
    spill_rows: int = partition.DEFAULT_SPILL_ROWS,
    out: str = "out",
) -> tuple[partition.InitializeResult, Path, Path]:
    urls = tmp / out / "urls"
    rejected = tmp / out / "rejected.parquet"
    result = partition.write_partitions(small_batches(source), urls, rejected, batch_size, spill_rows)
    return result, urls, rejected


def partitions(urls: Path, manifest: dict) -> dict[tuple[str, int], pa.Table]:
    out = {}
    for name, info in manifest["servers"].items():
        for pid in range(len(info["fingerprints"])):
            folder = urls / f"server_name={name}" / f"partition_id={pid}"
            out[(name, pid)] = pq.read_table(folder / "urls.parquet")
    return out


def test_batches_bounded_ordered_and_complete(tmp_path: Path) -> None:
    source = make_csv(tmp_path / "in.csv")
    result, urls, _ = run(tmp_path, source, batch_size=4)
    manifest = result.manifest
    assert manifest == partition.read_manifest(urls)
    assert manifest["batch_size"] == 4
    assert manifest["input_rows"] == 40 and manifest["rejected_rows"] == 0 and manifest["total_urls"] == 40
    assert sorted(manifest["servers"]) == sorted(SERVERS)
    expected = {name: [] for name in SERVERS}
    for row in (r for b in inputs.rows(source) for r in b.to_pylist()):
        expected[row["server_name"]].append(row["uuid"])
    tables = partitions(urls, manifest)
    for name in SERVERS:
        info = manifest["servers"][name]
        assert info["urls"] == len(expected[name])
        sizes = [tables[(name, pid)].num_rows for pid in range(len(info["fingerprints"]))]
        assert all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4
        got = [u for pid in range(len(sizes)) for u in tables[(name, pid)].column("uuid").to_pylist()]
        assert got == expected[name]  # every URL once, in input order
        for pid, fp in enumerate(info["fingerprints"]):
            assert tables[(name, pid)].schema == URL_SCHEMA
            assert fingerprint(tables[(name, pid)]) == fp
    assert not (tmp_path / "out" / "urls.incoming").exists()


def test_spilling_gives_the_same_partitions(tmp_path: Path) -> None:
    source = make_csv(tmp_path / "in.csv")
    plain, plain_urls, _ = run(tmp_path, source, batch_size=4, out="plain")
    spilled, spilled_urls, _ = run(tmp_path, source, batch_size=4, spill_rows=2, out="spilled")
    assert spilled.manifest == plain.manifest
    a, b = partitions(plain_urls, plain.manifest), partitions(spilled_urls, spilled.manifest)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equals(b[key]), key
    assert not (spilled_urls / "_spill").exists()


def test_grouper_spills_and_replays_in_input_order(tmp_path: Path) -> None:
    source = make_csv(tmp_path / "in.csv")
    grouper = ServerGrouper(tmp_path / "spill", spill_rows=2)
    for batch in small_batches(source):
        grouper.add(batch)
    assert grouper.buffered <= 2
    assert len(grouper.runs) >= 10 and all(p.exists() for p in grouper.spill_files)
    grouper.finish()
    expected = [r for b in inputs.rows(source) for r in b.to_pylist() if r["server_name"] == "alpha.org"]
    replay = pa.Table.from_batches(list(grouper.rows_of("alpha.org")), URL_SCHEMA).to_pylist()
    assert [r["uuid"] for r in replay] == [r["uuid"] for r in expected]
    assert replay[0].keys() == set(inputs.URL_COLUMNS)
    files = grouper.spill_files
    grouper.cleanup()
    assert files and not any(p.exists() for p in files)  # spill files removed at the end


def test_grouper_without_spill_keeps_one_run_in_memory(tmp_path: Path) -> None:
    grouper = ServerGrouper(tmp_path / "spill")
    for batch in small_batches(make_csv(tmp_path / "in.csv")):
        grouper.add(batch)
    grouper.finish()
    assert len(grouper.runs) == 1 and grouper.spill_files == [] and not (tmp_path / "spill").exists()
    assert grouper.servers == sorted(SERVERS)
    assert sum(b.num_rows for name in grouper.servers for b in grouper.rows_of(name)) == 40


def test_grouper_byte_budget_also_spills(tmp_path: Path) -> None:
    grouper = ServerGrouper(tmp_path / "spill", spill_rows=10**9, spill_bytes=1)
    for batch in small_batches(make_csv(tmp_path / "in.csv")):
        grouper.add(batch)
    assert grouper.buffered == 0 and len(grouper.runs) == 14  # every 3-row slice became a run


@pytest.mark.parametrize("spill_rows", [1, 2, 7, partition.DEFAULT_SPILL_ROWS])
def test_duplicates_are_exact_across_runs_and_servers(tmp_path: Path, spill_rows: int) -> None:
    """The first holder of a uuid keeps it wherever the repeats are: same or other server, run or bucket."""
    lines = ["uuid,identifier,source_id"]
    expected_kept: list[str] = []
    expected_dups: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i in range(60):
        uid = f"id-{(i * 7) % 23}"  # repeats spread over the whole input
        url = f"http://{SERVERS[i % 3]}/{i}.jpg"
        lines.append(f"{uid},{url},s{i}")
        if uid in seen:
            expected_dups.append((uid, url))
        else:
            seen.add(uid)
            expected_kept.append(url)
    source = tmp_path / "dups.csv"
    source.write_text("\n".join(lines) + "\n")
    result, urls, rejected = run(tmp_path, source, batch_size=5, spill_rows=spill_rows)
    kept = pa.concat_tables(partitions(urls, result.manifest).values())
    assert sorted(kept.column("identifier").to_pylist()) == sorted(expected_kept)
    assert len(set(kept.column("uuid").to_pylist())) == kept.num_rows == 23
    table = pq.read_table(rejected).to_pylist()
    assert sorted((r["uuid"], r["identifier"]) for r in table) == sorted(expected_dups)
    assert {r["reason"] for r in table} == {"duplicate uuid"}
    assert result.rejected_rows == 37 and result.manifest["total_urls"] == 23
    assert sum(s["urls"] for s in result.manifest["servers"].values()) == 23


def test_duplicate_detection_compares_strings_not_hashes(tmp_path: Path) -> None:
    """Distinct uuids sharing a hash bucket stay distinct; equal ones in different batches are caught."""
    ids = [f"u{i}" for i in range(2000)]
    buckets = partition.string_buckets(pa.array(ids))
    assert buckets.min() >= 0 and buckets.max() < partition.UUID_BUCKETS
    assert len(set(buckets.tolist())) > 200  # spread over (nearly) all buckets
    assert (partition.string_buckets(pa.array(ids[::-1]))[::-1] == buckets).all()  # a function of the string
    lines = (
        ["uuid,identifier,source_id"] + [f"{u},http://alpha.org/{u}.jpg,s" for u in ids] + ["u7,http://beta.org/x,s"]
    )
    source = tmp_path / "many.csv"
    source.write_text("\n".join(lines) + "\n")
    result, _, rejected = run(tmp_path, source, batch_size=1000, spill_rows=300)
    assert result.manifest["total_urls"] == 2000
    assert pq.read_table(rejected).to_pylist() == [
        {
            "uuid": "u7",
            "source_id": "s",
            "identifier": "http://beta.org/x",
            "license": "Not provided",
            "source": "Not provided",
            "title": "Not provided",
            "reason": "duplicate uuid",
        }
    ]


def test_string_buckets_handles_empty_sliced_and_unicode_strings() -> None:
    values = pa.array(["", "a", "ä", "a" * 300, "", "b"])
    whole = partition.string_buckets(values)
    assert (partition.string_buckets(values.slice(2, 3)) == whole[2:5]).all()
    assert whole[0] == whole[4]
    assert len(partition.string_buckets(pa.array([], pa.string()))) == 0


def test_two_runs_are_byte_identical(tmp_path: Path) -> None:
    source = make_csv(tmp_path / "in.csv", extra="dup,http://alpha.org/x.jpg,s,t\ndup,http://beta.org/y.jpg,s,t\n")
    first, urls1, rejected1 = run(tmp_path, source, batch_size=3, out="one")
    second, urls2, rejected2 = run(tmp_path, source, batch_size=3, spill_rows=5, out="two")
    assert (urls1 / "_manifest.json").read_bytes() == (urls2 / "_manifest.json").read_bytes()
    files1 = sorted(p.relative_to(urls1) for p in urls1.rglob("*") if p.is_file())
    files2 = sorted(p.relative_to(urls2) for p in urls2.rglob("*") if p.is_file())
    assert files1 == files2
    assert any(f.name == "urls.parquet" for f in files1)
    for rel in files1:
        assert (urls1 / rel).read_bytes() == (urls2 / rel).read_bytes(), rel
    assert pq.read_table(rejected1).equals(pq.read_table(rejected2))
    assert first.manifest == second.manifest


def test_fingerprints_change_only_where_a_url_changed(tmp_path: Path) -> None:
    base_result, _, _ = run(tmp_path, make_csv(tmp_path / "a.csv"), batch_size=4, out="a")
    # row 5 is on alpha.org: the 4th alpha row (rows 0, 1, 2, 5), so alpha's partition 0
    changed = make_csv(tmp_path / "b.csv", change={5: "http://alpha.org/img/5-other.jpg"})
    changed_result, _, _ = run(tmp_path, changed, batch_size=4, out="b")
    before = base_result.manifest["servers"]
    after = changed_result.manifest["servers"]
    assert before["alpha.org"]["fingerprints"][0] != after["alpha.org"]["fingerprints"][0]
    assert before["alpha.org"]["fingerprints"][1:] == after["alpha.org"]["fingerprints"][1:]
    for name in SERVERS[1:]:
        assert before[name] == after[name]


def test_rejected_rows_written_with_reasons(tmp_path: Path) -> None:
    extra = (
        "bad-1,not a url,s,t\n"
        "bad-2,ftp://alpha.org/x.jpg,s,t\n"
        ",http://alpha.org/no-uuid.jpg,s,t\n"
        "id-000,http://beta.org/dup.jpg,s,t\n"  # uuid of the first row again
    )
    result, urls, rejected = run(tmp_path, make_csv(tmp_path / "in.csv", extra=extra), batch_size=4)
    table = pq.read_table(rejected)
    assert table.schema == REJECTED_SCHEMA
    reasons = {row["identifier"]: row["reason"] for row in table.to_pylist()}
    assert reasons["not a url"] == "malformed URL"
    assert "unsupported scheme 'ftp'" in reasons["ftp://alpha.org/x.jpg"]
    assert reasons["http://alpha.org/no-uuid.jpg"] == "empty uuid"
    assert reasons["http://beta.org/dup.jpg"] == "duplicate uuid"
    assert result.input_rows == 44 and result.rejected_rows == 4
    assert result.manifest["total_urls"] == 40
    # the first holder of the duplicated uuid keeps it
    kept = pa.concat_tables(partitions(urls, result.manifest).values())
    holder = kept.filter(pc.equal(kept.column("uuid"), "id-000"))
    assert holder.column("identifier").to_pylist() == ["http://alpha.org/img/0.jpg"]
    assert kept.num_rows == 40


def test_no_rejections_still_writes_an_empty_rejected_table(tmp_path: Path) -> None:
    _, _, rejected = run(tmp_path, make_csv(tmp_path / "in.csv", n=6))
    table = pq.read_table(rejected)
    assert table.num_rows == 0 and table.schema == REJECTED_SCHEMA
    assert [p.name for p in rejected.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_reinitializing_replaces_stale_server_folders(tmp_path: Path) -> None:
    first, urls, _ = run(tmp_path, make_csv(tmp_path / "a.csv"), batch_size=4)
    assert (urls / "server_name=beta.org").is_dir()
    only_alpha = tmp_path / "b.csv"
    only_alpha.write_text("uuid,identifier,source_id\nz1,http://alpha.org/new.jpg,s\n")
    second, urls_again, _ = run(tmp_path, only_alpha, batch_size=4)
    assert urls_again == urls
    assert sorted(p.name for p in urls.iterdir()) == ["_manifest.json", "server_name=alpha.org"]
    assert sorted(p.name for p in (urls / "server_name=alpha.org").iterdir()) == ["partition_id=0"]
    assert partition.read_manifest(urls) == second.manifest
    assert pq.read_table(urls / "server_name=alpha.org" / "partition_id=0" / "urls.parquet").num_rows == 1
    siblings = sorted(p.name for p in urls.parent.iterdir())
    assert siblings == ["rejected.parquet", "urls"]  # no .incoming / .old left behind


def test_failed_initialize_leaves_previous_result_intact(tmp_path: Path) -> None:
    first, urls, rejected = run(tmp_path, make_csv(tmp_path / "a.csv"), batch_size=4)
    before = (urls / "_manifest.json").read_bytes()
    rejected_before = rejected.read_bytes()

    def broken() -> Iterator[pa.RecordBatch]:
        yield from list(small_batches(make_csv(tmp_path / "b.csv", n=5)))[:1]
        raise RuntimeError("input went away")

    with pytest.raises(RuntimeError, match="went away"):
        partition.write_partitions(broken(), urls, rejected, 4)
    assert (urls / "_manifest.json").read_bytes() == before
    assert rejected.read_bytes() == rejected_before
    assert sorted(p.name for p in urls.parent.iterdir()) == ["rejected.parquet", "urls"]


def test_fingerprint_is_stable_for_sliced_and_chunked_tables() -> None:
    uuids = [f"u{i}" for i in range(10)]
    urls = [f"http://a.org/{i}.jpg" for i in range(10)]
    whole = pa.table({"uuid": uuids, "identifier": urls})
    fresh = pa.table({"uuid": uuids[3:8], "identifier": urls[3:8]})
    batch = whole.to_batches()[0]
    chunked = pa.Table.from_batches([batch.slice(0, 5), batch.slice(5)])
    assert chunked.column("uuid").num_chunks == 2
    assert fingerprint(whole.slice(3, 5)) == fingerprint(fresh)
    assert fingerprint(chunked.slice(3, 5)) == fingerprint(fresh)
    assert fingerprint(chunked) == fingerprint(whole)
    # other columns do not matter; order and the uuid/identifier boundary do
    assert fingerprint(whole.append_column("title", pa.array(["x"] * 10))) == fingerprint(whole)
    assert fingerprint(pa.table({"uuid": ["ab"], "identifier": ["c"]})) != fingerprint(
        pa.table({"uuid": ["a"], "identifier": ["bc"]})
    )
    assert fingerprint(pa.table({"uuid": ["a", "b"], "identifier": ["x", "y"]})) != fingerprint(
        pa.table({"uuid": ["b", "a"], "identifier": ["y", "x"]})
    )
    assert len(fingerprint(whole)) == 32


def test_manifest_copy_is_written_atomically(tmp_path: Path) -> None:
    result, _, _ = run(tmp_path, make_csv(tmp_path / "in.csv", n=6))
    target = tmp_path / "state" / "manifest.json"
    atomic_write_json(target, result.manifest)  # a copy of the manifest: store's writer (no partition helper)
    assert json.loads(target.read_text()) == result.manifest
    assert [p.name for p in target.parent.iterdir()] == ["manifest.json"]


def test_malformed_csv_lines_are_accounted_for(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text(
        "uuid,identifier,source_id\nu1,http://a.org/1.jpg,s1\nu2,http://a.org/2.jpg,s2,EXTRA\nu3,http://a.org/3.jpg\n"
    )
    result, _, rejected = run(tmp_path, source)
    assert result.input_rows == 3
    assert result.rejected_rows == 2
    assert pq.read_table(rejected).num_rows == 2
