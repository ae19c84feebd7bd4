"""Input readers: stream a URL table as Arrow record batches of normalised string columns.

Every reader yields batches with the columns of ``URL_COLUMNS`` (strings, never null) plus
``_reject`` (empty string, or why the row is refused). Nothing reads a whole file into memory.
"""

from __future__ import annotations

import csv
import gzip
import io
import ipaddress
import uuid as uuidlib
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

URL_COLUMNS = ("uuid", "source_id", "identifier", "license", "source", "title")
REQUIRED_COLUMNS = ("identifier", "source_id")
NOT_PROVIDED = "Not provided"
MAX_URL_LENGTH = 2048
READ_BLOCK_BYTES = 8 << 20
# Deterministic ids: uuid5 in a namespace of our own, so reruns give the same ids.
UUID_NAMESPACE = uuidlib.UUID("6f1d3a2e-5b7c-4e8a-9d0f-2c4b6a8e1f3d")
GBIF_UUID_NAMESPACE = uuidlib.uuid5(uuidlib.NAMESPACE_URL, "https://www.gbif.org/multimedia")


INVALID_COLUMN = "__invalid_row__"  # raw batches: why a line could not be parsed ('' if it could)


class InputError(ValueError):
    """The input as a whole cannot be read (missing columns, unreadable file)."""


# ---------------------------------------------------------------- files and formats


def input_files(path: str | Path) -> list[Path]:
    """A file, or the data files of a directory (sorted, hidden files skipped)."""
    root = Path(path)
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)
        )
        if not files:
            raise InputError(f"input directory {root} holds no data files")
        return files
    raise InputError(f"input path {root} does not exist")


def _strip_compression(name: str) -> str:
    for suffix in (".gz", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith(".zip"):
        archive = zipfile.ZipFile(path)
        members = [m for m in archive.namelist() if not m.endswith("/") and not Path(m).name.startswith((".", "_"))]
        if len(members) != 1:
            raise InputError(f"{path}: a zip input must hold exactly one data file, found {len(members)}")
        return archive.open(members[0])  # type: ignore[return-value]
    return open(path, "rb")


def _is_parquet(path: Path) -> bool:
    if _strip_compression(path.name.lower()).endswith(".parquet"):
        return True
    with open(path, "rb") as handle:
        return handle.read(4) == b"PAR1"


def sniff_delimiter(path: Path) -> str:
    """Tab or comma: by extension, else by the header line."""
    name = _strip_compression(path.name.lower())
    if name.endswith((".tsv", ".tab")):
        return "\t"
    if name.endswith(".csv"):
        return ","
    with _open_binary(path) as handle:
        head = handle.read(64 * 1024).decode("utf-8", errors="replace").lstrip("\ufeff")
    first = head.splitlines()[0] if head else ""
    return "\t" if first.count("\t") > first.count(",") else ","


def _read_header(path: Path, delimiter: str) -> list[str]:
    with _open_binary(path) as handle:
        line = handle.readline().decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")
    return next(csv.reader([line], delimiter=delimiter), [])


def _csv_batches(path: Path) -> Iterator[pa.RecordBatch]:
    delimiter = sniff_delimiter(path)
    header = _read_header(path, delimiter)
    if not header:
        raise InputError(f"{path}: empty file or no header line")
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in header}, strings_can_be_null=False)
    # TSV (GBIF, Darwin Core archives) is written without quoting: a '"' is data there.
    invalid: list[tuple[str, str]] = []

    def keep_invalid(row: pacsv.InvalidRow) -> str:
        # A malformed line is not dropped silently: it becomes a rejected row with its reason.
        reason = f"line {row.number}: expected {row.expected_columns} fields, found {row.actual_columns}"
        invalid.append((reason, (row.text or "")[:MAX_URL_LENGTH]))
        return "skip"

    parse = pacsv.ParseOptions(
        delimiter=delimiter,
        quote_char='"' if delimiter == "," else False,
        newlines_in_values=delimiter == ",",
        invalid_row_handler=keep_invalid,
    )
    read = pacsv.ReadOptions(block_size=READ_BLOCK_BYTES, use_threads=False)
    with _open_binary(path) as handle:
        stream = pacsv.open_csv(handle, read_options=read, parse_options=parse, convert_options=convert)
        for batch in stream:
            yield _with_invalid(batch, [""] * batch.num_rows)
            if invalid:
                yield _invalid_batch(batch.schema, invalid)
                invalid.clear()
        if invalid:
            yield _invalid_batch(stream.schema, invalid)


def _with_invalid(batch: pa.RecordBatch, reasons: list[str]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [*batch.columns, pa.array(reasons, pa.string())], names=[*batch.schema.names, INVALID_COLUMN]
    )


def _invalid_batch(schema: pa.Schema, invalid: list[tuple[str, str]]) -> pa.RecordBatch:
    """The unparseable lines as rows: the line's text in `identifier` (if there is one), the reason flagged."""
    columns = []
    for name in schema.names:
        is_identifier = name.strip().lstrip("\ufeff").lower() == "identifier"
        columns.append(pa.array([text if is_identifier else "" for _, text in invalid], pa.string()))
    return _with_invalid(pa.RecordBatch.from_arrays(columns, names=schema.names), [reason for reason, _ in invalid])


def _parquet_batches(path: Path) -> Iterator[pa.RecordBatch]:
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=65536):
        strings = pa.RecordBatch.from_arrays(
            [pc.cast(col, pa.string()) for col in batch.columns], names=batch.schema.names
        )
        yield _with_invalid(strings, [""] * batch.num_rows)


def raw_batches(path: str | Path) -> Iterator[pa.RecordBatch]:
    """Record batches of the raw columns, all strings, across every input file."""
    for file in input_files(path):
        yield from (_parquet_batches(file) if _is_parquet(file) else _csv_batches(file))


def columns_of(path: str | Path) -> list[str]:
    """Column names of the first input file (for early, clear errors)."""
    first = input_files(path)[0]
    if _is_parquet(first):
        return list(pq.ParquetFile(first).schema_arrow.names)
    return _read_header(first, sniff_delimiter(first))


# ---------------------------------------------------------------- normalisation


def _column_map(names: list[str]) -> dict[str, str]:
    """lower-cased logical name -> actual column name (first wins)."""
    mapping: dict[str, str] = {}
    for name in names:
        mapping.setdefault(name.strip().lstrip("\ufeff").lower(), name)
    return mapping


def check_columns(names: list[str], required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    missing = [c for c in required if c not in _column_map(names)]
    if missing:
        raise InputError(f"input is missing required column(s): {', '.join(missing)} (found: {', '.join(names)})")


def _string_column(batch: pa.RecordBatch, mapping: dict[str, str], name: str) -> pa.Array:
    actual = mapping.get(name)
    if actual is None:
        return pa.array([""] * batch.num_rows, pa.string())
    column = batch.column(actual)
    return pc.utf8_trim_whitespace(pc.fill_null(pc.cast(column, pa.string()), ""))


def deterministic_uuid(namespace: uuidlib.UUID, *parts: str) -> str:
    return str(uuidlib.uuid5(namespace, "\x1f".join(parts)))


def with_invalid_reason(batch: pa.RecordBatch, reject: pa.Array) -> pa.Array:
    """A parse failure of the line wins over any other reason."""
    invalid = batch.column(INVALID_COLUMN)
    return pc.if_else(pc.not_equal(invalid, ""), invalid, reject)


def _fill_missing_text(column: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(column, ""), NOT_PROVIDED, column)


def generic_rows(path: str | Path) -> Iterator[pa.RecordBatch]:
    """The generic reader: uuid, identifier, source_id[, license, source, title], any column order/case."""
    check_columns(columns_of(path))
    for batch in raw_batches(path):
        mapping = _column_map(batch.schema.names)
        check_columns(batch.schema.names)
        identifier = _string_column(batch, mapping, "identifier")
        source_id = _string_column(batch, mapping, "source_id")
        if "uuid" in mapping:
            ids = _string_column(batch, mapping, "uuid")
        else:  # no uuid column: derive a stable one so reruns agree
            ids = pa.array(
                [
                    deterministic_uuid(UUID_NAMESPACE, s, u)
                    for s, u in zip(source_id.to_pylist(), identifier.to_pylist(), strict=True)
                ],
                pa.string(),
            )
        reject = pc.if_else(pc.equal(ids, ""), "empty uuid", "")
        yield _assemble(ids, source_id, identifier, batch, mapping, with_invalid_reason(batch, reject))


def _assemble(
    ids: pa.Array,
    source_id: pa.Array,
    identifier: pa.Array,
    batch: pa.RecordBatch,
    mapping: dict[str, str],
    reject: pa.Array,
    source_column: str = "source",
) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [
            ids,
            source_id,
            identifier,
            _fill_missing_text(_string_column(batch, mapping, "license")),
            _fill_missing_text(_string_column(batch, mapping, source_column)),
            _fill_missing_text(_string_column(batch, mapping, "title")),
            reject,
        ],
        names=[*URL_COLUMNS, "_reject"],
    )


# ---------------------------------------------------------------- URLs -> server names

_AUTHORITY = r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):(?://(?P<authority>[^/?#]*))?"
_DEFAULT_PORTS = {"http": "80", "https": "443"}


@lru_cache(maxsize=65536)
def server_name_of(scheme: str, authority: str) -> tuple[str, str]:
    """(server_name, '') or ('', reason). server_name = host[:port], lower-cased, safe as a path segment."""
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return "", f"unsupported scheme '{scheme}'"
    if "@" in authority:
        authority = authority.rsplit("@", 1)[1]  # drop credentials: never part of a server's name
    host, port = authority, ""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return "", "malformed IPv6 host"
        host, rest = authority[: end + 1], authority[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return "", "malformed host"
            port = rest[1:]
    elif ":" in authority:
        host, port = authority.rsplit(":", 1)
    host = host.lower().rstrip(".")
    if not host:
        return "", "URL has no host"
    if port and (not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536):
        return "", f"invalid port '{port}'"
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return "", "host is not a valid internationalised domain name"
    if host.startswith("["):
        try:
            if "%" in host:  # a zone id names a local interface: never a server on the web
                raise ValueError(host)
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "", "malformed IPv6 host"
    elif host.startswith(".") or any(not (c.isalnum() or c in ".-_") for c in host):
        return "", "invalid characters in host"
    if port and port.lstrip("0") != _DEFAULT_PORTS[scheme]:
        return f"{host}:{int(port)}", ""
    return host, ""


def add_server_names(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Append `server_name`; fold URL problems into `_reject`."""
    identifier = batch.column("identifier")
    parts = pc.extract_regex(identifier, _AUTHORITY)
    valid_form = pc.fill_null(pc.is_valid(parts), False)
    scheme = pc.fill_null(pc.struct_field(parts, [0]), "")
    authority = pc.fill_null(pc.struct_field(parts, [1]), "")
    pairs = pc.binary_join_element_wise(scheme, authority, "\x00")
    distinct = pc.unique(pairs)
    looked_up = [server_name_of(*p.split("\x00", 1)) for p in distinct.to_pylist()]
    index = pc.index_in(pairs, distinct)
    names = pc.take(pa.array([n for n, _ in looked_up], pa.string()), index)
    reasons = pc.take(pa.array([r for _, r in looked_up], pa.string()), index)
    reject = batch.column("_reject")
    length = pc.utf8_length(identifier)
    has_control = pc.match_substring_regex(identifier, r"[\x00-\x1f\x7f]")
    reason = pc.if_else(
        pc.not_equal(reject, ""),
        reject,
        pc.if_else(
            pc.equal(identifier, ""),
            "empty URL",
            pc.if_else(
                pc.invert(valid_form),
                "malformed URL",
                pc.if_else(
                    pc.greater(length, MAX_URL_LENGTH),
                    f"URL longer than {MAX_URL_LENGTH} characters",
                    pc.if_else(has_control, "control characters in URL", reasons),
                ),
            ),
        ),
    )
    columns = [batch.column(name) for name in URL_COLUMNS]
    return pa.RecordBatch.from_arrays(
        [*columns, pc.if_else(pc.equal(reason, ""), names, ""), reason],
        names=[*URL_COLUMNS, "server_name", "_reject"],
    )


def rows(path: str | Path, initializer: str = "generic", occurrences: str = "") -> Iterator[pa.RecordBatch]:
    """Normalised batches (URL_COLUMNS + server_name + _reject) from the chosen reader."""
    if initializer == "gbif":
        from distributed_downloader.gbif import gbif_rows

        source = gbif_rows(path, occurrences)
    else:
        source = generic_rows(path)
    for batch in source:
        if batch.num_rows:
            yield add_server_names(batch)
