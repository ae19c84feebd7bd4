"""Tests for the input readers (generic CSV/TSV/parquet, gbif) and URL -> server name normalisation."""

from __future__ import annotations

import gzip
import shutil
import uuid
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from distributed_downloader import inputs
from distributed_downloader.inputs import NOT_PROVIDED, InputError, add_server_names, server_name_of
from distributed_downloader.plan import partition
from tests.conftest import skip_or_fail

# The real GBIF sample lives in shared/ beside the repository (CI clones the repo with shared/ next to it).
GBIF_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "gbif-multimedia-sample.txt"


@pytest.fixture
def gbif_sample() -> Path:
    if not GBIF_SAMPLE.exists():
        skip_or_fail(f"the real GBIF sample is not at {GBIF_SAMPLE}")
    return GBIF_SAMPLE


CSV_TEXT = (
    "uuid,identifier,source_id,license,source,title\n"
    "u1,http://Alpha.example.org/1.jpg,s1,CC0,museum,one\n"
    'u2,https://beta.example.org:8443/2.png,s2,,,"two, with a comma"\n'
    'u3,http://alpha.example.org/3.jpg,s3,CC-BY,,"three\nlines"\n'
    "u4,https://gamma.example.org/4.jpg?x=1,s4,CC-BY-NC,src,\n"
)


def read_rows(path: Path | str, initializer: str = "generic", occurrences: str = "") -> list[dict]:
    return [row for batch in inputs.rows(path, initializer, occurrences) for row in batch.to_pylist()]


def write_csv(path: Path, text: str = CSV_TEXT) -> Path:
    path.write_text(text)
    return path


def url_batch(urls: list[str]) -> pa.RecordBatch:
    n = len(urls)
    columns = {
        "uuid": [f"u{i}" for i in range(n)],
        "source_id": [f"s{i}" for i in range(n)],
        "identifier": urls,
        "license": ["l"] * n,
        "source": ["s"] * n,
        "title": ["t"] * n,
        "_reject": [""] * n,
    }
    return pa.RecordBatch.from_pydict({k: pa.array(v, pa.string()) for k, v in columns.items()})


# ---------------------------------------------------------------- server_name_of


@pytest.mark.parametrize(
    ("scheme", "authority", "expected"),
    [
        ("http", "Example.COM", "example.com"),
        ("HTTPS", "example.com", "example.com"),
        ("http", "example.com:80", "example.com"),
        ("https", "example.com:443", "example.com"),
        ("http", "example.com:0080", "example.com"),
        ("http", "example.com:443", "example.com:443"),
        ("https", "example.com:80", "example.com:80"),
        ("http", "example.com:8080", "example.com:8080"),
        ("https", "Example.com:8443", "example.com:8443"),
        ("http", "example.com.", "example.com"),
        ("http", "[::1]:8080", "[::1]:8080"),
        ("https", "[2001:DB8::1]", "[2001:db8::1]"),
        ("http", "[::1]:80", "[::1]"),
        ("http", "user:secret@Example.com", "example.com"),
        ("https", "user@example.com:8443", "example.com:8443"),
        ("http", "bücher.de", "xn--bcher-kva.de"),
        ("http", "BÜCHER.de", "xn--bcher-kva.de"),
        ("http", "under_score.example.org", "under_score.example.org"),
        ("http", "127.0.0.2:5000", "127.0.0.2:5000"),
    ],
)
def test_server_name_of_accepts_and_normalises(scheme: str, authority: str, expected: str) -> None:
    assert server_name_of(scheme, authority) == (expected, "")


@pytest.mark.parametrize(
    ("scheme", "authority", "reason_part"),
    [
        ("http", "..", "no host"),
        ("http", ".", "no host"),
        ("http", "", "no host"),
        ("http", "user@", "no host"),
        ("http", ".example.com", "invalid characters"),
        ("http", "exa mple.com", "invalid characters"),
        ("http", "%2e%2e", "invalid characters"),
        ("http", "ex*ample.com", "invalid characters"),
        ("http", "ex\\ample.com", "ambiguous host"),
        ("http", "example.com:99999", "invalid port"),
        ("http", "example.com:0", "invalid port"),
        ("http", "example.com:8o", "invalid port"),
        ("http", "[::1", "malformed IPv6"),
        ("http", "[::1]x", "malformed host"),
        ("http", "[fe80::1%25eth0]", "malformed IPv6"),
        ("http", "[zz::1]", "malformed IPv6"),
        ("file", "", "unsupported scheme 'file'"),
        ("ftp", "example.com", "unsupported scheme 'ftp'"),
        ("data", "", "unsupported scheme 'data'"),
        ("javascript", "", "unsupported scheme 'javascript'"),
    ],
)
def test_server_name_of_rejects_with_reason(scheme: str, authority: str, reason_part: str) -> None:
    name, reason = server_name_of(scheme, authority)
    assert name == ""
    assert reason_part in reason


def test_server_name_of_rejects_unicode_digit_port_instead_of_crashing() -> None:
    name, reason = server_name_of("http", "example.com:²")
    assert name == ""
    assert "invalid port" in reason


def test_unicode_digit_port_rejects_only_its_row() -> None:
    out = add_server_names(url_batch(["http://example.com/ok.jpg", "http://example.com:²/x.jpg"])).to_pylist()
    assert out[0]["server_name"] == "example.com"
    assert out[1]["server_name"] == ""
    assert out[1]["_reject"]


def test_server_name_of_rejects_empty_ipv6_literal() -> None:
    name, reason = server_name_of("http", "[]")
    assert name == ""
    assert reason


# ---------------------------------------------------------------- add_server_names


def test_add_server_names_rejections_with_reasons() -> None:
    longest_ok = "http://ex.com/" + "a" * (inputs.MAX_URL_LENGTH - len("http://ex.com/"))
    urls = [
        "http://Ex.com/a.jpg",
        "",
        "not a url",
        "ex.com/a.jpg",
        "http://ex.com/" + "a" * inputs.MAX_URL_LENGTH,
        longest_ok,
        "http://ex.com/a\x01b.jpg",
        "http://ex.com/a\x7fb.jpg",
        "http://ex.com/a\nb.jpg",
        "file:///etc/passwd",
        "ftp://ex.com/a.jpg",
        "data:image/png;base64,AAAA",
        "javascript:alert(1)",
        "https://ex.com:443/b.jpg",
    ]
    out = add_server_names(url_batch(urls)).to_pylist()
    by_url = {row["identifier"]: row for row in out}
    assert [row["identifier"] for row in out] == urls  # order and rows kept; nothing dropped
    assert by_url["http://Ex.com/a.jpg"]["server_name"] == "ex.com"
    assert by_url["http://Ex.com/a.jpg"]["_reject"] == ""
    assert by_url[""]["_reject"] == "empty URL"
    assert by_url["not a url"]["_reject"] == "malformed URL"
    assert by_url["ex.com/a.jpg"]["_reject"] == "malformed URL"
    assert by_url[urls[4]]["_reject"] == f"URL longer than {inputs.MAX_URL_LENGTH} characters"
    assert len(longest_ok) == inputs.MAX_URL_LENGTH
    assert by_url[longest_ok]["_reject"] == ""
    for url in urls[6:9]:
        assert by_url[url]["_reject"] == "control characters in URL"
    assert "unsupported scheme 'file'" in by_url["file:///etc/passwd"]["_reject"]
    assert "unsupported scheme 'ftp'" in by_url["ftp://ex.com/a.jpg"]["_reject"]
    assert "unsupported scheme 'data'" in by_url["data:image/png;base64,AAAA"]["_reject"]
    assert "unsupported scheme 'javascript'" in by_url["javascript:alert(1)"]["_reject"]
    assert by_url["https://ex.com:443/b.jpg"]["server_name"] == "ex.com"
    for row in out:
        assert (row["server_name"] == "") == (row["_reject"] != "")


def test_add_server_names_keeps_an_earlier_rejection() -> None:
    batch = url_batch(["http://ex.com/a.jpg", ""])
    batch = batch.set_column(6, "_reject", pa.array(["empty uuid", "empty uuid"]))
    out = add_server_names(batch).to_pylist()
    assert [r["_reject"] for r in out] == ["empty uuid", "empty uuid"]
    assert [r["server_name"] for r in out] == ["", ""]


# ---------------------------------------------------------------- generic reader


def test_generic_csv_rows_and_defaults(tmp_path: Path) -> None:
    rows = read_rows(write_csv(tmp_path / "in.csv"))
    assert [r["uuid"] for r in rows] == ["u1", "u2", "u3", "u4"]
    assert [r["server_name"] for r in rows] == [
        "alpha.example.org",
        "beta.example.org:8443",
        "alpha.example.org",
        "gamma.example.org",
    ]
    assert rows[1]["title"] == "two, with a comma"
    assert rows[2]["title"] == "three\nlines"
    assert rows[1]["license"] == NOT_PROVIDED
    assert rows[1]["source"] == NOT_PROVIDED
    assert rows[3]["title"] == NOT_PROVIDED
    assert rows[0]["identifier"] == "http://Alpha.example.org/1.jpg"  # URL itself untouched
    assert all(r["_reject"] == "" for r in rows)


def test_generic_tsv_by_extension_keeps_quotes_as_data(tmp_path: Path) -> None:
    path = tmp_path / "in.tsv"
    path.write_text('identifier\tsource_id\ttitle\nhttp://a.org/1.jpg\t1\tHe said "hi\nhttp://a.org/2.jpg\t2\t"x, y"\n')
    rows = read_rows(path)
    assert [r["title"] for r in rows] == ['He said "hi', '"x, y"']
    assert [r["source_id"] for r in rows] == ["1", "2"]


@pytest.mark.parametrize(("delimiter", "expected"), [("\t", "\t"), (",", ",")])
def test_txt_delimiter_is_sniffed(tmp_path: Path, delimiter: str, expected: str) -> None:
    path = tmp_path / "urls.txt"
    header = delimiter.join(["identifier", "source_id", "title"])
    path.write_text(header + "\n" + delimiter.join(["http://a.org/1.jpg", "9", "t"]) + "\n")
    assert inputs.sniff_delimiter(path) == expected
    rows = read_rows(path)
    assert [(r["identifier"], r["source_id"], r["title"]) for r in rows] == [("http://a.org/1.jpg", "9", "t")]


def test_column_names_are_case_insensitive_in_any_order_with_extra_columns(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("TITLE,Extra,Source_ID,IDENTIFIER,License,UUID,SOURCE\nt1,ignored,s1,http://a.org/1.jpg,L1,u1,S1\n")
    rows = read_rows(path)
    assert rows == [
        {
            "uuid": "u1",
            "source_id": "s1",
            "identifier": "http://a.org/1.jpg",
            "license": "L1",
            "source": "S1",
            "title": "t1",
            "server_name": "a.org",
            "_reject": "",
        }
    ]


def test_bom_and_crlf_line_endings(tmp_path: Path) -> None:
    plain = read_rows(write_csv(tmp_path / "plain.csv"))
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + CSV_TEXT.replace("\n", "\r\n").encode())
    rows = read_rows(path)
    assert [r["uuid"] for r in rows] == ["u1", "u2", "u3", "u4"]  # BOM not glued to the 'uuid' column
    assert [r["identifier"] for r in rows] == [r["identifier"] for r in plain]
    assert [r["title"] for r in rows][:2] == ["one", "two, with a comma"]
    assert rows[3]["title"] == NOT_PROVIDED


def test_whitespace_only_fields_count_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("identifier,source_id,license,title\n  http://a.org/1.jpg  ,s1,   ,  \n")
    (row,) = read_rows(path)
    assert row["identifier"] == "http://a.org/1.jpg"
    assert row["license"] == NOT_PROVIDED
    assert row["title"] == NOT_PROVIDED


@pytest.mark.parametrize("missing", ["identifier", "source_id"])
def test_missing_required_column_is_an_input_error_naming_it(tmp_path: Path, missing: str) -> None:
    names = [n for n in ("uuid", "identifier", "source_id") if n != missing]
    path = tmp_path / "in.csv"
    path.write_text(",".join(names) + "\n" + ",".join("x" for _ in names) + "\n")
    with pytest.raises(InputError, match=missing):
        read_rows(path)


def test_missing_input_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_rows(tmp_path / "nope.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden.csv").write_text("identifier,source_id\n")
    with pytest.raises(InputError, match="no data files"):
        read_rows(empty)


def test_missing_uuid_column_gives_deterministic_uuids(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("identifier,source_id\nhttp://a.org/1.jpg,s1\nhttp://a.org/2.jpg,s1\nhttp://a.org/1.jpg,s2\n")
    first = [r["uuid"] for r in read_rows(path)]
    second = [r["uuid"] for r in read_rows(path)]
    assert first == second
    assert len(set(first)) == 3
    assert all(uuid.UUID(u).version == 5 for u in first)
    # The same row in another file (another order) gets the same id: it depends on the row only.
    other = tmp_path / "other.csv"
    other.write_text("source_id,identifier\ns2,http://a.org/1.jpg\n")
    assert read_rows(other)[0]["uuid"] == first[2]


def test_empty_uuid_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("uuid,identifier,source_id\n,http://a.org/1.jpg,s1\nu2,http://a.org/2.jpg,s2\n")
    rows = read_rows(path)
    assert rows[0]["_reject"] == "empty uuid"
    assert rows[0]["server_name"] == ""
    assert rows[1]["_reject"] == ""


def _compare_key(rows: list[dict]) -> list[tuple]:
    return [tuple(sorted(r.items())) for r in rows]


def test_compressed_directory_and_parquet_inputs_match_plain_csv(tmp_path: Path) -> None:
    plain_path = write_csv(tmp_path / "plain.csv")
    expected = _compare_key(read_rows(plain_path))
    assert len(expected) == 4

    gz = tmp_path / "in.csv.gz"
    with gzip.open(gz, "wb") as handle:
        handle.write(CSV_TEXT.encode())

    zipped = tmp_path / "in.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("data/in.csv", CSV_TEXT)
        archive.writestr("__MACOSX/data/._in.csv", "junk")

    parts = tmp_path / "parts"
    parts.mkdir()
    lines = CSV_TEXT.splitlines(keepends=True)
    header, records = lines[0], lines[1:]
    # records[2:4] are the two physical lines of one quoted row: keep them together
    (parts / "part-0.csv").write_text(header + "".join(records[:2]))
    (parts / "part-1.csv").write_text(header + "".join(records[2:]))
    (parts / "_SUCCESS").write_text("")
    (parts / ".part-1.csv.crc").write_text("junk")

    parquet = tmp_path / "in.parquet"
    # the parquet holds the raw values (empty text columns empty, not "Not provided")
    types = {n: pa.string() for n in inputs.URL_COLUMNS}
    convert = pacsv.ConvertOptions(strings_can_be_null=False, column_types=types)
    raw = pacsv.read_csv(plain_path, convert_options=convert)
    assert raw.num_rows == 4
    pq.write_table(raw, parquet)

    noext_parquet = tmp_path / "in.data"
    shutil.copy(parquet, noext_parquet)  # recognised by its magic bytes

    for source in (gz, zipped, parts, parquet, noext_parquet):
        assert _compare_key(read_rows(source)) == expected, source


def test_vectorised_uuids_equal_the_per_row_definition() -> None:
    firsts = ["1", "", "ü日本", "x" * 5000, "a\x1fb", "42"]
    seconds = ["http://a.org/b.jpg", "", "\x1f", "", "c", "https://b.org/ä?q=1"]
    got = inputs.deterministic_uuids(inputs.UUID_NAMESPACE, pa.array(firsts), pa.array(seconds)).to_pylist()
    assert got == [inputs.deterministic_uuid(inputs.UUID_NAMESPACE, a, b) for a, b in zip(firsts, seconds, strict=True)]
    assert got[0] == str(uuid.uuid5(inputs.UUID_NAMESPACE, "1\x1fhttp://a.org/b.jpg"))
    sliced = inputs.deterministic_uuids(
        inputs.UUID_NAMESPACE, pa.array(firsts).slice(2, 3), pa.array(seconds).slice(2, 3)
    )
    assert sliced.to_pylist() == got[2:5]
    assert inputs.deterministic_uuids(inputs.UUID_NAMESPACE, pa.array([], pa.string()), pa.array([], pa.string())) == (
        pa.array([], pa.string())
    )


def _initialize(source: Path, out: Path, initializer: str = "generic") -> dict[str, bytes]:
    """Run initialization; every file it wrote (URL partitions, manifest), by relative path, as bytes."""
    partition.write_partitions(inputs.rows(source, initializer), out / "urls", out / "rejected.parquet", 2)
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_every_input_form_gives_byte_identical_partitions(tmp_path: Path) -> None:
    """Plain, gz, zip, directory of parts and parquet: the same urls.parquet bytes, twice over."""
    text = CSV_TEXT + "u5,http://alpha.example.org/5.jpg,s5,CC0,museum,five\nu6,not a url,s6,,,\n"
    plain = tmp_path / "plain.csv"
    plain.write_text(text)
    gz = tmp_path / "in.csv.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    zipped = tmp_path / "in.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("in.csv", text)
    parts = tmp_path / "parts"
    parts.mkdir()
    lines = text.splitlines(keepends=True)
    (parts / "part-0.csv.gz").write_bytes(gzip.compress((lines[0] + "".join(lines[1:3])).encode()))
    (parts / "part-1.csv").write_text(lines[0] + "".join(lines[3:]))
    parquet = tmp_path / "in.parquet"
    convert = pacsv.ConvertOptions(strings_can_be_null=False, column_types={n: pa.string() for n in inputs.URL_COLUMNS})
    pq.write_table(pacsv.read_csv(plain, convert_options=convert), parquet, row_group_size=2)

    expected = _initialize(plain, tmp_path / "out-plain")
    assert any(name.endswith("urls.parquet") for name in expected) and "urls/_manifest.json" in expected
    assert _initialize(plain, tmp_path / "out-again") == expected
    for source in (gz, zipped, parts, parquet):
        assert _initialize(source, tmp_path / f"out-{source.name}") == expected, source


def test_gbif_forms_give_byte_identical_partitions(tmp_path: Path, gbif_sample: Path) -> None:
    head = "".join(gbif_sample.read_text().splitlines(keepends=True)[:201])
    plain = tmp_path / "multimedia.txt"
    plain.write_text(head)
    gz = tmp_path / "multimedia.txt.gz"
    gz.write_bytes(gzip.compress(head.encode()))
    expected = _initialize(plain, tmp_path / "a", "gbif")
    assert _initialize(gz, tmp_path / "b", "gbif") == expected
    assert _initialize(plain, tmp_path / "c", "gbif") == expected


def test_parquet_non_string_columns_are_read_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "ids.parquet"
    table = pa.table({"identifier": ["http://a.org/1.jpg"], "source_id": pa.array([42], pa.int64())})
    pq.write_table(table, path)
    (row,) = read_rows(path)
    assert row["source_id"] == "42"
    assert row["server_name"] == "a.org"


def test_zip_with_several_data_files_is_an_input_error(tmp_path: Path) -> None:
    zipped = tmp_path / "two.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("a.csv", CSV_TEXT)
        archive.writestr("b.csv", CSV_TEXT)
    with pytest.raises(InputError, match="exactly one"):
        read_rows(zipped)


# ---------------------------------------------------------------- gbif reader


def test_gbif_sample_rows_servers_and_ids(gbif_sample: Path) -> None:
    rows = read_rows(gbif_sample, "gbif")
    assert len(rows) == 4776
    assert all(r["_reject"] == "" for r in rows)
    assert Counter(r["server_name"] for r in rows).keys() == {
        "inaturalist-open-data.s3.amazonaws.com",
        "static.inaturalist.org",
    }
    per_id = Counter(r["source_id"] for r in rows)
    assert len(per_id) == 3675
    assert max(per_id.values()) > 1  # several images per occurrence
    assert len({r["uuid"] for r in rows}) == 4776
    assert all(uuid.UUID(r["uuid"]).version == 5 for r in rows[:50])
    # source_id is the gbifID column, row by row
    with open(gbif_sample) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        first = dict(zip(header, handle.readline().rstrip("\n").split("\t"), strict=True))
    assert rows[0]["source_id"] == first["gbifID"]
    assert rows[0]["identifier"] == first["identifier"]
    assert rows[0]["license"] == first["license"]
    assert rows[0]["source"] == first["publisher"]  # empty `source` falls back to the publisher
    assert "?" in rows[0]["identifier"]  # query strings kept


def test_gbif_sample_uuids_are_deterministic(gbif_sample: Path) -> None:
    first = [r["uuid"] for r in read_rows(gbif_sample, "gbif")]
    second = [r["uuid"] for r in read_rows(gbif_sample, "gbif")]
    assert first == second


def test_gbif_sample_every_row_by_header_name(gbif_sample: Path) -> None:
    """Every row: source_id = gbifID, uuid = UUID5(namespace, gbifID + US + identifier), as in the file."""
    with open(gbif_sample, newline="") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        records = [dict(zip(header, line.rstrip("\n").split("\t"), strict=True)) for line in handle]
    rows = read_rows(gbif_sample, "gbif")
    still = [r for r in records if r["type"] == "StillImage"]
    assert len(rows) == len(still) == 4776
    for row, record in zip(rows, still, strict=True):
        assert row["source_id"] == record["gbifID"]
        assert row["identifier"] == record["identifier"]
        expected = uuid.uuid5(inputs.GBIF_UUID_NAMESPACE, f"{record['gbifID']}\x1f{record['identifier']}")
        assert row["uuid"] == str(expected)
        assert row["license"] == (record["license"] or NOT_PROVIDED)
        assert row["source"] == (record["source"] or record["publisher"] or NOT_PROVIDED)
        assert row["title"] == (record["title"] or NOT_PROVIDED)


def test_gbif_sample_in_any_column_order_and_compressed(tmp_path: Path, gbif_sample: Path) -> None:
    """GBIF reorders columns between versions; readers find them by name, also in .gz and .zip."""
    lines = gbif_sample.read_text().splitlines()
    header = lines[0].split("\t")
    order = list(reversed(range(len(header))))
    shuffled = "\n".join("\t".join(line.split("\t")[i] for i in order) for line in lines[:301]) + "\n"
    path = tmp_path / "multimedia.txt"
    path.write_text(shuffled)
    gz = tmp_path / "multimedia.txt.gz"
    gz.write_bytes(gzip.compress(gbif_sample.read_bytes()))
    zipped = tmp_path / "export.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.write(gbif_sample, "multimedia.txt")
    plain = read_rows(gbif_sample, "gbif")
    assert read_rows(path, "gbif") == plain[: len(read_rows(path, "gbif"))]
    assert read_rows(gz, "gbif") == plain
    assert read_rows(zipped, "gbif") == plain


def test_gbif_occurrences_streamed_from_a_compressed_file(tmp_path: Path, gbif_sample: Path) -> None:
    """occurrence.txt (.gz, many columns, any order) drops the MATERIAL_CITATION gbifIDs, and only them."""
    rows = read_rows(gbif_sample, "gbif")
    ids = sorted({r["source_id"] for r in rows})
    cited = set(ids[::7])
    lines = ["occurrenceID\tbasisOfRecord\tscientificName\tgbifID"]
    lines += [
        f"o{i}\t{'MATERIAL_CITATION' if g in cited else 'HUMAN_OBSERVATION'}\tLycorma\t{g}" for i, g in enumerate(ids)
    ]
    lines.append("junk\tMATERIAL_CITATION\tX\tnot-a-number")
    occurrences = tmp_path / "occurrence.txt.gz"
    occurrences.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    kept = read_rows(gbif_sample, "gbif", str(occurrences))
    assert [r for r in rows if r["source_id"] not in cited] == kept
    assert len(kept) < len(rows)


def test_gbif_missing_occurrence_columns_fail_before_reading(tmp_path: Path, gbif_sample: Path) -> None:
    occurrences = tmp_path / "occurrence.txt"
    occurrences.write_text("gbifID\tscientificName\n1\tX\n")
    with pytest.raises(InputError, match="basisofrecord"):
        inputs.rows(gbif_sample, "gbif", str(occurrences))  # raised by the call, not on iteration


GBIF_SYNTHETIC = (
    "identifier\tformat\tlicense\tgbifID\tpublisher\ttype\tsource\ttitle\n"
    "http://img.org/1.jpg\timage/jpeg\tCC0\t100\tPub\tStillImage\t\tA\n"
    "http://img.org/2.png\timage/png\tCC0\t100\tPub\t\t\t\n"
    "http://img.org/3.mp3\taudio/mpeg\tCC0\t101\tPub\tSound\t\t\n"
    "http://img.org/4.mp4\tvideo/mp4\tCC0\t101\tPub\tMovingImage\t\t\n"
    "\timage/jpeg\tCC0\t102\tPub\tStillImage\t\t\n"
    "http://img.org/6.jpg\timage/jpeg\tCC0\t\tPub\tStillImage\t\t\n"
    "http://img.org/7.jpg\timage/jpeg\tCC0\t103\tPub\tstillimage\tOwnSource\t\n"
    "http://img.org/8.html\ttext/html\tCC0\t104\tPub\t\t\t\n"
    "http://img.org/9.jpg\timage/jpeg\tCC0\t105\tPub\tStillImage\t\t\n"
)


def test_gbif_synthetic_column_order_types_and_rejections(tmp_path: Path) -> None:
    path = tmp_path / "multimedia.txt"
    path.write_text(GBIF_SYNTHETIC)
    rows = read_rows(path, "gbif")
    by_url = {r["identifier"]: r for r in rows}
    assert set(by_url) == {
        "http://img.org/1.jpg",
        "http://img.org/2.png",  # empty type, image/* format: kept
        "",  # empty identifier: kept by the reader, rejected as a URL
        "http://img.org/6.jpg",
        "http://img.org/7.jpg",
        "http://img.org/9.jpg",
    }
    assert by_url["http://img.org/1.jpg"]["source_id"] == "100"
    assert by_url["http://img.org/1.jpg"]["title"] == "A"
    assert by_url["http://img.org/1.jpg"]["source"] == "Pub"
    assert by_url["http://img.org/7.jpg"]["source"] == "OwnSource"
    assert by_url["http://img.org/2.png"]["_reject"] == ""
    assert by_url[""]["_reject"] == "empty URL"
    assert by_url["http://img.org/6.jpg"]["_reject"] == "empty gbifID"
    assert by_url["http://img.org/9.jpg"]["_reject"] == ""
    expected = str(uuid.uuid5(inputs.GBIF_UUID_NAMESPACE, "100\x1fhttp://img.org/1.jpg"))
    assert by_url["http://img.org/1.jpg"]["uuid"] == expected


def test_gbif_missing_required_column(tmp_path: Path) -> None:
    path = tmp_path / "multimedia.txt"
    path.write_text("identifier\ttype\nhttp://a.org/1.jpg\tStillImage\n")
    with pytest.raises(InputError, match="gbifid"):
        read_rows(path, "gbif")


def test_gbif_material_citations_dropped_via_occurrences(tmp_path: Path) -> None:
    media = tmp_path / "multimedia.txt"
    media.write_text(GBIF_SYNTHETIC)
    occurrences = tmp_path / "occurrence.txt"
    occurrences.write_text(
        "gbifID\tscientificName\tbasisOfRecord\n"
        "100\tLycorma delicatula\tHUMAN_OBSERVATION\n"
        "103\tLycorma delicatula\tMATERIAL_CITATION\n"
        "105\tLycorma delicatula\tmaterial_citation\n"
    )
    without = {r["identifier"] for r in read_rows(media, "gbif")}
    with_occ = {r["identifier"] for r in read_rows(media, "gbif", str(occurrences))}
    assert without - with_occ == {"http://img.org/7.jpg", "http://img.org/9.jpg"}
    assert "http://img.org/1.jpg" in with_occ


def test_gbif_occurrences_need_basis_of_record(tmp_path: Path) -> None:
    media = tmp_path / "multimedia.txt"
    media.write_text(GBIF_SYNTHETIC)
    occurrences = tmp_path / "occurrence.txt"
    occurrences.write_text("gbifID\tscientificName\n100\tX\n")
    with pytest.raises(InputError, match="basisofrecord"):
        read_rows(media, "gbif", str(occurrences))
