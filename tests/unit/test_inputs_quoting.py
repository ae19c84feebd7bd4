"""Quoted TSV (what CSV writers produce) versus GBIF's unquoted TSV, and the URL length limit.

Every file is written to disk and read back through the real `initialize` stage (inputs.rows +
partition.write_partitions), then through the partitions and the rejected table it wrote.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from distributed_downloader import config as config_mod
from distributed_downloader import inputs, stages
from distributed_downloader.inputs import MAX_URL_LENGTH, NOT_PROVIDED
from distributed_downloader.plan import partition

COLUMNS = ["uuid", "identifier", "source_id", "license", "source", "title"]

# Titles a CSV writer must quote (tabs, line breaks, quotes), and some that merely look quoted.
HOSTILE_TITLES = [
    "two\nlines",
    "crlf\r\ninside",
    "a\ttab, then\ta second",
    'He said "hi"',
    '"wrapped in quotes"',
    '"starts with a quote',
    'ends with a quote"',
    '"',
    '""',
    '5" tall\tand\nwide',
    '"\'mixed\' ""quotes"""',
    "Ödön's 日本の蝶 😀\nsecond line",
    "back\\slash\\t not a tab",
    "plain",
]


def hostile_rows(copies: int = 1) -> list[dict[str, str]]:
    rows = []
    for copy in range(copies):
        for i, title in enumerate(HOSTILE_TITLES):
            n = copy * len(HOSTILE_TITLES) + i
            rows.append(
                {
                    "uuid": f"u{n}",
                    "identifier": f"http://ok{n % 7}.org/{n}.jpg",
                    "source_id": f"s{n}",
                    "license": "CC-BY\t4.0" if i % 3 == 0 else "CC0",
                    "source": 'museum "A"' if i % 4 == 0 else "",
                    "title": title,
                }
            )
    return rows


def initialize(tmp_path: Path, source: Path, initializer: str = "generic") -> dict:
    """Run the initialize stage on `source`; return the good rows (from the partitions) and the rejected rows."""
    out = tmp_path / "out"
    cfg = config_mod.validate({"path_to_input": str(source), "path_to_output": str(out), "initializer": initializer})
    paths = config_mod.paths(cfg)
    summary = stages.initialize(cfg, paths.urls_manifest)
    good = []
    for partition_file in sorted(paths.urls.rglob("urls.parquet")):
        good += pq.read_table(partition_file).to_pylist()
    rejected = pq.read_table(paths.rejected_table)
    assert rejected.schema == partition.REJECTED_SCHEMA
    assert summary["input_rows"] == len(good) + rejected.num_rows  # every row accounted for, once
    return {"good": good, "rejected": rejected.to_pylist()}


def expected_text(value: str) -> str:
    """What the reader keeps of a text column: trimmed, "Not provided" when empty."""
    return value.strip() or NOT_PROVIDED


def write_pandas(path: Path, rows: list[dict[str, str]], **options: object) -> None:
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path, sep="\t", index=False, **options)


def write_csv_module(path: Path, rows: list[dict[str, str]], **options: object) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", **options)
    writer.writerow(COLUMNS)
    writer.writerows([row[c] for c in COLUMNS] for row in rows)
    data = buffer.getvalue().encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


WRITERS = {
    "pandas": (write_pandas, {}),
    "pandas-quote-all": (write_pandas, {"quoting": csv.QUOTE_ALL}),
    "csv-writer": (write_csv_module, {}),  # '\r\n' line ends
    "csv-writer-lf-quote-all": (write_csv_module, {"lineterminator": "\n", "quoting": csv.QUOTE_ALL}),
}


@pytest.mark.parametrize("name", ["in.tsv", "in.txt", "in.tsv.gz"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_quoted_tsv_keeps_every_row_and_its_fields(tmp_path: Path, writer: str, name: str) -> None:
    write, options = WRITERS[writer]
    if name.endswith(".gz") and write is write_pandas:
        options = {**options, "compression": "gzip"}
    rows = hostile_rows()
    source = tmp_path / name
    write(source, rows, **options)
    assert inputs.dialect(source) == ("\t", True)
    out = initialize(tmp_path, source)
    assert out["rejected"] == []  # no row, and no neighbour of a multi-line title, is lost
    got = {row["uuid"]: row for row in out["good"]}
    assert sorted(got) == sorted(row["uuid"] for row in rows)
    for row in rows:
        kept = got[row["uuid"]]
        assert (kept["identifier"], kept["source_id"]) == (row["identifier"], row["source_id"])
        for column in ("license", "source", "title"):
            assert kept[column] == expected_text(row[column]), (row["uuid"], column)


def filler(n: int) -> dict[str, str]:
    # fixed width: every filler line has the same length
    return {"uuid": f"f{n:06d}", "identifier": f"http://fill.org/{n:06d}.jpg", "source_id": "f", "title": "x" * 200}


def test_quoted_tsv_larger_than_the_sample(tmp_path: Path) -> None:
    """Past the sampled head the file is read the same way; the sample ends inside a long multi-line title."""
    head_bytes = len(pd.DataFrame(hostile_rows(), columns=COLUMNS).to_csv(sep="\t", index=False).encode())
    line_bytes = len(pd.DataFrame([filler(0)], columns=COLUMNS).to_csv(sep="\t", index=False, header=False))
    before_cut = (inputs.HEADER_BYTES - 2000 - head_bytes) // line_bytes  # up to just before the sample's end
    straddling = {**filler(-1), "uuid": "long", "title": 'a "long" title\n\tover the cut\n' * 500}
    rows = hostile_rows() + [filler(i) for i in range(before_cut)] + [straddling]
    rows += hostile_rows(copies=3)[len(HOSTILE_TITLES) :] + [filler(i) for i in range(before_cut, before_cut + 3000)]
    source = tmp_path / "big.tsv"
    write_pandas(source, rows)
    start = source.read_bytes().index(b'"a ""long""')
    assert start < inputs.HEADER_BYTES < start + len(straddling["title"])
    assert inputs.dialect(source) == ("\t", True)
    out = initialize(tmp_path, source)
    assert out["rejected"] == []
    got = {row["uuid"]: row["title"] for row in out["good"]}
    assert got == {row["uuid"]: expected_text(row["title"]) for row in rows}


GBIF_HEADER = ["gbifID", "type", "format", "identifier", "references", "title", "source", "publisher", "license"]


def gbif_line(gbif_id: int, title: str, identifier: str = "") -> str:
    identifier = identifier or f"https://images.example.org/{gbif_id}.jpg"
    values = [str(gbif_id), "StillImage", "image/jpeg", identifier, "", title, "", "Museum", "CC0"]
    return "\t".join(values) + "\n"


@pytest.mark.parametrize(
    "titles",
    [
        pytest.param(['5" tall', '"Holotype', 'He said "hi', "plain", '"x, y"'], id="stray-quotes"),
        pytest.param(['"Holotype"', "plain", '"x, y"', '""'], id="only-wrapped-quotes"),
        # a '"' opening one title and one closing a later one: read as CSV they would merge lines
        pytest.param(['"starts here', "plain", 'ends here"', "after"], id="quotes-pair-across-lines"),
        pytest.param(['"a ""b"" c"', '"Holotype', "plain"], id="doubled-quotes-then-stray"),
    ],
)
def test_gbif_unquoted_tsv_with_quotes_in_titles_is_read_literally(tmp_path: Path, titles: list[str]) -> None:
    source = tmp_path / "multimedia.txt"
    source.write_text("\t".join(GBIF_HEADER) + "\n" + "".join(gbif_line(i, t) for i, t in enumerate(titles, 1)))
    assert inputs.dialect(source) == ("\t", False)
    out = initialize(tmp_path, source, "gbif")
    assert out["rejected"] == []
    assert sorted((row["source_id"], row["title"]) for row in out["good"]) == sorted(
        (str(i), expected_text(t)) for i, t in enumerate(titles, 1)
    )


def test_url_length_limit(tmp_path: Path) -> None:
    prefix = "http://ok.org/"
    urls = {
        "u4k": prefix + "a" * (4096 - len(prefix)),
        "u8k": prefix + "b" * (MAX_URL_LENGTH - len(prefix)),  # exactly at the limit
        "u8k1": prefix + "c" * (MAX_URL_LENGTH + 1 - len(prefix)),
        "u100k": prefix + "d" * 100_000,
    }
    assert MAX_URL_LENGTH == 8192
    assert [len(u) for u in urls.values()] == [4096, 8192, 8193, 100_000 + len(prefix)]
    source = tmp_path / "in.csv"
    source.write_text("uuid,identifier,source_id\n" + "".join(f"{k},{u},s\n" for k, u in urls.items()))
    out = initialize(tmp_path, source)
    assert sorted((row["uuid"], row["identifier"]) for row in out["good"]) == [
        ("u4k", urls["u4k"]),
        ("u8k", urls["u8k"]),
    ]
    reasons = {row["uuid"]: (row["identifier"], row["reason"]) for row in out["rejected"]}
    assert reasons == {
        "u8k1": (urls["u8k1"], "URL longer than 8192 characters"),
        "u100k": (urls["u100k"], "URL longer than 8192 characters"),
    }


# ---------------------------------------------------------------- the detection rule on its own


@pytest.mark.parametrize(
    ("head", "complete", "quoted"),
    [
        pytest.param(b"a\tb\n1\t2\n", True, False, id="no-quotes"),
        pytest.param(b'a\tb\n1\t"x\ny"\n', True, True, id="newline-in-a-quoted-field"),
        pytest.param(b'a\tb\n1\t"x\ty"\n', True, True, id="tab-in-a-quoted-field"),
        pytest.param(b'a\tb\n1\t"say ""hi"""\n', True, True, id="doubled-quote"),
        pytest.param(b'"a"\t"b"\r\n"1"\t"2"\r\n', True, True, id="quote-all"),
        pytest.param(b'a\tb\n1\t"x"\n', True, False, id="wrapped-but-never-needed"),
        pytest.param(b'a\tb\n1\t"x\ny"\n2\t5" tall\n', True, False, id="stray-quote-in-an-unquoted-field"),
        pytest.param(b'a\tb\n1\t"x\ty" z\n', True, False, id="text-after-a-closing-quote"),
        pytest.param(b'a\tb\n1\t"x\n2\ty"\n', True, False, id="field-count-mismatch"),
        pytest.param(b'a\tb\n1\t"x\ny"\n2\t"never closed\n', True, False, id="unclosed-in-a-whole-file"),
        pytest.param(b'a\tb\n1\t"x\ny"\n2\t"cut ""by the', False, True, id="cut-inside-a-quoted-field"),
        pytest.param(b'a\tb\n1\t"x\ny"\n2\t"cut ""', False, True, id="cut-after-a-doubled-quote"),
        pytest.param(b'a\tb\n1\t"x\ny"\n2\t"cut "', False, True, id="cut-inside-a-doubled-quote"),
        pytest.param(b'\xef\xbb\xbf"a"\t"b"\n\n"1"\t"2"', True, True, id="bom-blank-line-no-final-newline"),
    ],
)
def test_tsv_is_quoted_rule(head: bytes, complete: bool, quoted: bool) -> None:
    assert inputs.tsv_is_quoted(head, complete) is quoted


def test_a_rewritten_file_is_judged_again(tmp_path: Path) -> None:
    source = tmp_path / "in.tsv"
    source.write_text('identifier\tsource_id\ttitle\nhttp://a.org/1.jpg\t1\t5" tall\n')
    assert inputs.dialect(source) == ("\t", False)
    write_pandas(source, hostile_rows()[:2])
    assert inputs.dialect(source) == ("\t", True)
