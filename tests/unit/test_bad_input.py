"""Bad input rows: each goes to rejected_rows.parquet with its reason; good rows proceed; nothing is lost.

Runs the real initialization (inputs.rows + partition.write_partitions, as the `initialize` stage does)
and reads back the files it wrote.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distributed_downloader import config as config_mod
from distributed_downloader import inputs, stages
from distributed_downloader.inputs import MAX_URL_LENGTH, NOT_PROVIDED, InputError
from distributed_downloader.plan import partition

HEADER = b"uuid,identifier,source_id,license,source,title\n"


def initialize(tmp_path: Path, data: bytes, name: str = "in.csv", batch_size: int = 100) -> dict:
    """Initialize `data`; return the good rows (from the partitions), rejected rows and the manifest."""
    source = tmp_path / name
    source.write_bytes(data)
    out = tmp_path / "out"
    result = partition.write_partitions(inputs.rows(source), out / "urls", out / "rejected_rows.parquet", batch_size)
    good = []
    for server, info in sorted(result.manifest["servers"].items()):
        for pid in range(len(info["fingerprints"])):
            table = pq.read_table(out / "urls" / f"server_name={server}" / f"partition_id={pid}" / "urls.parquet")
            good += [{**row, "server_name": server} for row in table.to_pylist()]
    rejected = pq.read_table(out / "rejected_rows.parquet")
    assert rejected.schema == partition.REJECTED_SCHEMA
    rows = rejected.to_pylist()
    assert result.input_rows == len(good) + len(rows)  # every input row accounted for, once
    assert result.manifest["total_urls"] == len(good)
    return {"good": good, "rejected": rows, "manifest": result.manifest}


def by_uuid(rows: list[dict]) -> dict[str, dict]:
    return {row["uuid"]: row for row in rows}


def test_bad_rows_are_rejected_with_reasons_and_good_rows_proceed(tmp_path: Path) -> None:
    long_url = "http://ok.org/" + "a" * (MAX_URL_LENGTH + 1 - len("http://ok.org/"))  # one over the limit
    lines = [
        "g1,http://ok.org/1.jpg,s1,CC0,museum,plain",
        "e1,,s2,CC0,museum,empty URL",
        "e2,   ,s3,CC0,museum,blank URL",
        "m1,not a url,s4,,,",
        "m2,ok.org/no-scheme.jpg,s5,,,",
        "m3,http//ok.org/missing-colon.jpg,s6,,,",
        "h1,http:///no-host.jpg,s7,,,",
        "x1,ftp://ok.org/a.jpg,s8,,,",
        "x2,file:///etc/passwd,s9,,,",
        "x3,data:image/png;base64,AAAA,s10,,,",  # an unquoted comma: one field too many
        '"x4","data:image/png;base64,AAAA",s11,,,',
        "x5,javascript:alert(1),s12,,,",
        "x6,mailto:someone@ok.org,s13,,,",
        f"l1,{long_url},s14,,,",
        "c1,http://ok.org/a\tb.jpg,s15,,,",
        "g2,https://OK.org:443/2.jpg,s16,,,",
        "g1,http://other.org/dup.jpg,s17,,,dup uuid of the first row",
        ",http://ok.org/no-uuid.jpg,s18,,,",
        "p1,http://ok.org:99999/port.jpg,s19,,,",
        "g3,http://other.org/3.jpg,s20,CC-BY,src,last good",
    ]
    out = initialize(tmp_path, HEADER + ("\n".join(lines) + "\n").encode())
    good = out["good"]
    assert sorted(r["uuid"] for r in good) == ["g1", "g2", "g3"]
    assert by_uuid(good)["g1"]["identifier"] == "http://ok.org/1.jpg"  # the first holder keeps its uuid
    assert by_uuid(good)["g2"]["server_name"] == "ok.org"
    rejected = out["rejected"]
    reasons = {(r["uuid"], r["identifier"]): r["reason"] for r in rejected}
    assert reasons[("e1", "")] == "empty URL"
    assert reasons[("e2", "")] == "empty URL"  # whitespace-only is empty
    assert reasons[("m1", "not a url")] == "malformed URL"
    assert reasons[("m2", "ok.org/no-scheme.jpg")] == "malformed URL"
    assert reasons[("m3", "http//ok.org/missing-colon.jpg")] == "malformed URL"
    assert reasons[("h1", "http:///no-host.jpg")] == "URL has no host"
    assert reasons[("x1", "ftp://ok.org/a.jpg")] == "unsupported scheme 'ftp'"
    assert reasons[("x2", "file:///etc/passwd")] == "unsupported scheme 'file'"
    assert reasons[("x4", "data:image/png;base64,AAAA")] == "unsupported scheme 'data'"
    assert reasons[("x5", "javascript:alert(1)")] == "unsupported scheme 'javascript'"
    assert reasons[("x6", "mailto:someone@ok.org")] == "unsupported scheme 'mailto'"
    assert reasons[("l1", long_url)] == f"URL longer than {MAX_URL_LENGTH} characters"
    assert reasons[("c1", "http://ok.org/a\tb.jpg")] == "control characters in URL"
    assert reasons[("g1", "http://other.org/dup.jpg")] == "duplicate uuid"
    assert reasons[("", "http://ok.org/no-uuid.jpg")] == "empty uuid"
    assert reasons[("p1", "http://ok.org:99999/port.jpg")] == "invalid port '99999'"
    # the line with one field too many is kept as a rejected row, its text in `identifier`
    (extra,) = [r for r in rejected if r["reason"].startswith("line ")]
    assert extra["reason"] == "line 11: expected 6 fields, found 7"
    assert extra["identifier"].startswith("x3,data:image/png")
    assert len(rejected) == 17
    assert out["manifest"]["rejected_rows"] == 17 and out["manifest"]["input_rows"] == 20


def test_unicode_and_newlines_in_titles_are_kept_exactly(tmp_path: Path) -> None:
    title = 'Ödön\'s 日本の蝶 😀, "quoted"\nsecond line\r\nthird'
    escaped = title.replace('"', '""')
    data = HEADER + f'u1,http://ok.org/ü/1.jpg,s1,CC0,Muséum,"{escaped}"\nu2,http://ok.org/2.jpg,s2,,,\n'.encode()
    out = initialize(tmp_path, data)
    rows = by_uuid(out["good"])
    assert rows["u1"]["title"] == title
    assert rows["u1"]["source"] == "Muséum"
    assert rows["u1"]["identifier"] == "http://ok.org/ü/1.jpg"
    assert rows["u2"]["title"] == NOT_PROVIDED
    assert out["rejected"] == []


def test_bom_and_mixed_line_endings(tmp_path: Path) -> None:
    data = (
        b"\xef\xbb\xbfuuid,identifier,source_id\r\n"
        b"u1,http://ok.org/1.jpg,s1\r\n"
        b"u2,http://ok.org/2.jpg,s2\n"
        b"u3,http://ok.org/3.jpg,s3\r"  # a lone CR (old Mac files)
        b"u4,http://ok.org/4.jpg,s4"  # no newline at the end
    )
    out = initialize(tmp_path, data)
    assert [r["uuid"] for r in out["good"]] == ["u1", "u2", "u3", "u4"]  # the BOM is not part of 'uuid'
    assert [r["identifier"] for r in out["good"]] == [f"http://ok.org/{i}.jpg" for i in range(1, 5)]
    assert out["rejected"] == []


def test_lone_cr_header_in_a_sniffed_file(tmp_path: Path) -> None:
    out = initialize(tmp_path, b"identifier\tsource_id\rhttp://ok.org/1.jpg\ts1\rhttp://ok.org/2.jpg\ts2\r", "in.txt")
    assert [r["source_id"] for r in out["good"]] == ["s1", "s2"]


def test_unclosed_quote_swallowing_the_rest_of_the_file_is_rejected(tmp_path: Path) -> None:
    data = HEADER + (
        b'u1,http://ok.org/1.jpg,s1,,,"fine"\n'
        b'u2,http://ok.org/2.jpg,s2,,,"never closed\n'
        b"u3,http://ok.org/3.jpg,s3,,,would be lost\n"
        b"u4,http://ok.org/4.jpg,s4,,,would be lost too\n"
    )
    out = initialize(tmp_path, data)
    assert [r["uuid"] for r in out["good"]] == ["u1"]
    (row,) = out["rejected"]
    assert row["uuid"] == "u2"
    assert row["reason"] == "unclosed quote at the end of the file: it swallowed 2 more line(s)"
    assert "u3,http://ok.org/3.jpg" in row["title"] and "u4," in row["title"]  # nothing silently lost


def test_unclosed_quote_in_the_middle_rejects_the_garbled_line(tmp_path: Path) -> None:
    data = HEADER + (
        b"u1,http://ok.org/1.jpg,s1,,,a\n"
        b'u2,"http://ok.org/2.jpg,s2,,,b\n'
        b'u3,http://ok.org/3.jpg,s3,,,"closes the quote", here\n'
        b"u4,http://ok.org/4.jpg,s4,,,d\n"
    )
    out = initialize(tmp_path, data)
    assert sorted(r["uuid"] for r in out["good"]) == ["u1", "u4"]
    (row,) = out["rejected"]
    assert row["reason"].startswith("line 3: expected 6 fields")


def test_a_stray_quote_inside_a_field_is_data_not_an_error(tmp_path: Path) -> None:
    data = HEADER + b'u1,http://ok.org/1.jpg,s1,,,5" tall\nu2,http://ok.org/2.jpg,s2,,,"two\nlines"\n'
    out = initialize(tmp_path, data)
    assert [r["title"] for r in out["good"]] == ['5" tall', "two\nlines"]
    assert out["rejected"] == []


def test_bytes_that_are_not_utf8_cost_only_their_row(tmp_path: Path) -> None:
    data = (
        b"uuid,identifier,source_id,title,notes\n"
        b"u1,http://ok.org/1.jpg,s1,caf\xe9,\n"  # Latin-1 in a title
        b"u2,http://ok.org/2.jpg,s2,ok,\xff\xfe unused column\n"  # a column we do not read
        b"u3,http://ok.org/\xff.jpg,s3,ok,\n"
        b"u4,http://ok.org/4.jpg,s4,ok,\n"
    )
    out = initialize(tmp_path, data)
    assert sorted(r["uuid"] for r in out["good"]) == ["u2", "u4"]
    reasons = {r["uuid"]: r for r in out["rejected"]}
    assert reasons["u1"]["reason"] == "invalid UTF-8 in column 'title'"
    assert reasons["u1"]["title"] == "caf\ufffd"  # shown with a replacement character
    assert reasons["u3"]["reason"] == "invalid UTF-8 in column 'identifier'"


def test_duplicate_uuids_across_files_of_a_directory(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.csv").write_text("uuid,identifier,source_id\nu1,http://a.org/1.jpg,s\nu2,http://a.org/2.jpg,s\n")
    (parts / "b.csv.gz").write_bytes(gzip.compress(b"uuid,identifier,source_id\nu2,http://b.org/2.jpg,s\n"))
    out = tmp_path / "out"
    result = partition.write_partitions(inputs.rows(parts), out / "urls", out / "rejected.parquet", 10)
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    assert [(r["uuid"], r["identifier"], r["reason"]) for r in rejected] == [
        ("u2", "http://b.org/2.jpg", "duplicate uuid")
    ]
    assert result.manifest["total_urls"] == 2


@pytest.mark.parametrize(
    ("header", "missing"),
    [
        (b"uuid,url,source_id\n", "identifier"),
        (b"uuid,identifier,sourceid\n", "source_id"),
        (b"uuid,title\n", "identifier, source_id"),
    ],
)
def test_missing_columns_fail_before_any_work(tmp_path: Path, header: bytes, missing: str) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(header + b"a,b,c\n")
    cfg = config_mod.validate({"path_to_input": str(source), "path_to_output": str(tmp_path / "out")})
    with pytest.raises(InputError, match=f"missing required column\\(s\\): {missing}"):
        stages.initialize(cfg, config_mod.paths(cfg).urls_manifest)
    assert not (tmp_path / "out").exists()  # nothing written, nothing half-done


def test_a_later_part_missing_a_column_fails_before_any_work(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "1.csv").write_text("identifier,source_id\nhttp://a.org/1.jpg,s\n")
    (parts / "2.csv").write_text("identifier,id\nhttp://a.org/2.jpg,s\n")
    with pytest.raises(InputError, match=r"2\.csv: input is missing required column\(s\): source_id"):
        inputs.rows(parts)  # the call itself raises: no row has been read


@pytest.mark.parametrize("data", [b"", b"\n", b"\xef\xbb\xbf"])
def test_empty_file_is_a_clear_error(tmp_path: Path, data: bytes) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(data)
    with pytest.raises(InputError, match="empty file or no header line"):
        inputs.rows(source)


def test_header_only_gives_an_empty_run(tmp_path: Path) -> None:
    out = initialize(tmp_path, HEADER)
    assert out["good"] == [] and out["rejected"] == []
    assert out["manifest"]["servers"] == {} and out["manifest"]["input_rows"] == 0


def test_unknown_initializer_is_an_input_error(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_bytes(HEADER)
    with pytest.raises(InputError, match="unknown initializer 'darwin'"):
        inputs.rows(source, "darwin")


def test_unclosed_quote_after_a_malformed_line_in_the_same_block(tmp_path: Path) -> None:
    data = HEADER + (
        b"u1,http://ok.org/1.jpg,s1,,,a,EXTRA\n"
        b"u2,http://ok.org/2.jpg,s2,,,b\n"
        b'u3,http://ok.org/3.jpg,s3,,,"never closed\n'
        b"u4,http://ok.org/4.jpg,s4,,,swallowed\n"
    )
    out = initialize(tmp_path, data)
    assert [r["uuid"] for r in out["good"]] == ["u2"]
    reasons = sorted(r["reason"] for r in out["rejected"])
    assert reasons == [
        "line 2: expected 6 fields, found 7",
        "unclosed quote at the end of the file: it swallowed 1 more line(s)",
    ]
