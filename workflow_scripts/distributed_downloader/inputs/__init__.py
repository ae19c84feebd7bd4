"""Input readers: stream a URL table as Arrow record batches of normalised string columns.

Every reader yields batches with the columns of ``URL_COLUMNS`` (strings, never null) plus
``_reject`` (empty string, or why the row is refused). Nothing reads a whole file into memory.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import ipaddress
import re
import uuid as uuidlib
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import idna
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

URL_COLUMNS = ("uuid", "source_id", "identifier", "license", "source", "title")
REQUIRED_COLUMNS = ("identifier", "source_id")
NOT_PROVIDED = "Not provided"
# Longer URLs are rejected at initialization. 8 KB is what servers take in a request line:
# nginx's default large_client_header_buffers (8k), Apache's LimitRequestLine (8190).
MAX_URL_LENGTH = 8192
READ_BLOCK_BYTES = 4 << 20
HEADER_BYTES = 1 << 20  # a header line longer than this is not a header
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


def _head(path: Path) -> bytes:
    """The first HEADER_BYTES of the (decompressed) file."""
    with _open_binary(path) as handle:
        return handle.read(HEADER_BYTES)


def _first_line(path: Path) -> str:
    """The header line: up to the first CR or LF (any line-ending style), BOM removed."""
    head = _head(path)
    end = min((i for i in (head.find(b"\n"), head.find(b"\r")) if i >= 0), default=len(head))
    return head[:end].decode("utf-8", errors="replace").lstrip("\ufeff")


def sniff_delimiter(path: Path) -> str:
    """Tab or comma: by extension, else by the header line."""
    name = _strip_compression(path.name.lower())
    if name.endswith((".tsv", ".tab")):
        return "\t"
    if name.endswith(".csv"):
        return ","
    first = _first_line(path)
    return "\t" if first.count("\t") > first.count(",") else ","


# Pieces of a tab-separated file read with CSV quoting: a quoted field ('""' is an escaped '"'), an
# unquoted one (up to the next tab or line end), a line without any '"' (the fast path), and a quoted
# field that the end of the sample cut off.
_QUOTED_FIELD = re.compile(r'"([^"]*(?:""[^"]*)*)"')
_UNQUOTED_FIELD = re.compile(r"[^\t\r\n]*")
_PLAIN_LINE = re.compile(r'[^"\r\n]*')
_CUT_QUOTED_FIELD = re.compile(r'"[^"]*(?:""[^"]*)*"?\Z')
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def tsv_is_quoted(head: bytes, complete: bool) -> bool:
    """Whether a tab-separated file was written with CSV quoting, judged from its first bytes `head`.

    CSV writers (Python's `csv`, pandas' ``to_csv(sep="\\t")``) wrap a field in '"' when it holds a
    tab, a line break or a '"' (doubled inside), so values may span lines. GBIF's multimedia.txt and
    Darwin Core TSV are written without quoting: a '"' there is data. The rule: read `head` as
    tab-separated CSV with '"' quoting; the file is quoted when all three hold:

    1. every '"' is CSV quoting: it opens a field (its first character), is doubled inside a quoted
       field, or closes a quoted field right before a tab or a line end (a '"' inside an unquoted
       field, or text after a closing quote, is something no CSV writer produces);
    2. every record read that way has as many fields as the header (blank lines skipped);
    3. the quoting is needed: split at tabs and line breaks, some line has another number of fields
       than the header (a quoted tab or line break), or a quoted field holds a doubled '"', or a
       record has every field quoted (``QUOTE_ALL``).

    Otherwise, including when `head` holds no '"' at all, the file is read literally: when both
    readings fit the header, the literal one wins (two stray quotes in one column of two GBIF lines
    would otherwise merge the lines into one field). `complete` says `head` is the whole file; when
    it is not, the record or line it cuts off is not judged.
    """
    if b'"' not in head:
        return False
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    end = len(text)
    width = 0  # fields of the header, once read
    needed = False

    def record(fields: int, quoted: int) -> bool:
        """A whole record was read: does it fit?"""
        nonlocal width, needed
        width = width or fields
        needed = needed or quoted == fields
        return fields == width

    def line_end(at: int) -> int:
        return at + (2 if text.startswith("\r\n", at) else 1)

    fields = quoted = 0  # of the record being read
    pos = 0
    while pos < end:
        if not fields:  # a record starts: most lines hold no '"', count their tabs at once
            plain = _PLAIN_LINE.match(text, pos)
            stop = plain.end()
            if stop == end and not complete:
                break  # a record cut off by the end of the sample
            if stop == end or text[stop] != '"':
                pos = line_end(stop)
                if plain.group() and not record(plain.group().count("\t") + 1, 0):
                    return False
                continue
        start = pos
        if text[pos] == '"':
            match = _QUOTED_FIELD.match(text, pos)
            if match is None:  # no closing quote: a cut-off record, or garbage in a whole file
                if complete:
                    return False
                break
            needed = needed or '""' in match.group(1)
            quoted += 1
        else:
            match = _UNQUOTED_FIELD.match(text, pos)
            if '"' in match.group():
                return False
        pos = match.end()
        fields += 1
        if pos < end and text[pos] == "\t":
            pos += 1
            continue
        if pos < end and text[pos] not in "\r\n":
            if not complete and _CUT_QUOTED_FIELD.match(text, start):
                break  # the sample ends inside this quoted field: what looked closed was a doubled '"'
            return False  # text after a closing quote
        if pos == end and not complete:
            break
        pos = line_end(pos)
        if not record(fields, quoted):
            return False
        fields = quoted = 0
    return needed or _literal_misfit(text, complete)


def _literal_misfit(text: str, complete: bool) -> bool:
    """Some line, split at tabs, has another number of fields than the first (the header)."""
    lines = _LINE_BREAK.split(text)
    if not complete:
        lines.pop()  # cut off by the end of the sample
    counts = [line.count("\t") for line in lines if line]
    return any(count != counts[0] for count in counts)


@lru_cache(maxsize=256)
def _dialect_of(path: Path, _mtime_ns: int, _size: int) -> tuple[str, bool]:
    delimiter = sniff_delimiter(path)
    if delimiter == ",":
        return delimiter, True
    head = _head(path)
    return delimiter, tsv_is_quoted(head, len(head) < HEADER_BYTES)


def dialect(path: Path) -> tuple[str, bool]:
    """(delimiter, quoted): CSV is always read quoted, TSV only when written quoted (see tsv_is_quoted)."""
    stat = path.stat()  # the key: a file rewritten in place is judged again
    return _dialect_of(path, stat.st_mtime_ns, stat.st_size)


def _read_header(path: Path, delimiter: str, quoted: bool) -> list[str]:
    line = _first_line(path)
    if not quoted:  # unquoted TSV: a '"' is part of the name
        return line.split("\t") if line else []
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error as exc:
        raise InputError(f"{path}: unreadable header line: {exc}") from None


class _QuoteCounter(io.RawIOBase):
    """Passes a binary stream through, counting '"' bytes and keeping the last TAIL_BYTES."""

    TAIL_BYTES = 1 << 16

    def __init__(self, raw: io.BufferedIOBase) -> None:
        super().__init__()
        self.raw = raw
        self.quotes = 0
        self.tail = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.quotes += data.count(b'"')
        if data:
            self.tail = (self.tail + data[-self.TAIL_BYTES :])[-self.TAIL_BYTES :]
        return data

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _csv_batches(path: Path) -> Iterator[pa.RecordBatch]:
    # TSV from GBIF / Darwin Core archives is unquoted (a '"' is data); TSV from CSV writers is quoted.
    delimiter, quoted = dialect(path)
    header = _read_header(path, delimiter, quoted)
    if not header:
        raise InputError(f"{path}: empty file or no header line")
    # Binary, not string: a stray non-UTF-8 byte must cost its row (see _utf8), not the whole input.
    convert = pacsv.ConvertOptions(column_types={name: pa.binary() for name in header}, strings_can_be_null=False)
    invalid: list[tuple[str, str]] = []

    def keep_invalid(row: pacsv.InvalidRow) -> str:
        # A malformed line is not dropped silently: it becomes a rejected row with its reason.
        reason = f"line {row.number}: expected {row.expected_columns} fields, found {row.actual_columns}"
        invalid.append((reason, (row.text or "")[:MAX_URL_LENGTH]))
        return "skip"

    parse = pacsv.ParseOptions(
        delimiter=delimiter,
        quote_char='"' if quoted else False,
        newlines_in_values=quoted,
        invalid_row_handler=keep_invalid,
    )
    read = pacsv.ReadOptions(block_size=READ_BLOCK_BYTES, use_threads=False)
    with _open_binary(path) as handle:
        counter = _QuoteCounter(handle)
        stream = pacsv.open_csv(counter, read_options=read, parse_options=parse, convert_options=convert)
        held: pa.RecordBatch | None = None  # the last data batch waits: an unclosed quote shows only at the end
        for batch in stream:
            if held is not None:
                yield held
            held = _with_invalid(batch, _empty_strings(batch.num_rows))
            if invalid:
                yield _invalid_batch(batch.schema, invalid)
                invalid.clear()
        if invalid:
            yield _invalid_batch(stream.schema, invalid)
        if held is not None:
            yield _flag_unclosed_quote(held, counter) if quoted else held


def _flag_unclosed_quote(batch: pa.RecordBatch, counter: _QuoteCounter) -> pa.RecordBatch:
    """An opening quote never closed swallows the rest of the file into the last row's last field.

    That shows as an odd number of '"' in the file and a file that ends with '"' + the (escaped)
    value of the last field, with no closing quote. The row is rejected, its text (with any
    swallowed lines) kept, instead of passing as valid.
    """
    if counter.quotes % 2 == 0 or not batch.num_rows:
        return batch
    names = [name for name in batch.schema.names if name != INVALID_COLUMN]
    value = batch.column(names[-1])[batch.num_rows - 1].as_py()
    if isinstance(value, str):
        value = value.encode()
    if value is None:
        return batch
    escaped = b'"' + value.replace(b'"', b'""')
    if not counter.tail.endswith(escaped[-_QuoteCounter.TAIL_BYTES :]):
        return batch
    lines = len(value.rstrip(b"\r\n").splitlines()) - 1
    reason = "unclosed quote at the end of the file" + (f": it swallowed {lines} more line(s)" if lines > 0 else "")
    reasons = batch.column(INVALID_COLUMN).to_pylist()
    reasons[-1] = reasons[-1] or reason
    index = batch.schema.get_field_index(INVALID_COLUMN)
    return batch.set_column(index, INVALID_COLUMN, pa.array(reasons, pa.string()))


def _empty_strings(n: int) -> pa.Array:
    return pa.repeat(pa.scalar("", pa.string()), n)


def _with_invalid(batch: pa.RecordBatch, reasons: pa.Array | list[str]) -> pa.RecordBatch:
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


def _textual(column: pa.Array) -> pa.Array:
    """Strings and binaries as they are (see _utf8); numbers, dates, ... as their text."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_binary(kind):
        return column
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return pc.cast(column, pa.string())
    if pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind) or pa.types.is_binary_view(kind):
        return pc.cast(column, pa.binary())
    if pa.types.is_dictionary(kind):
        return _textual(pc.cast(column, kind.value_type))
    return pc.cast(column, pa.string())


def _parquet_batches(path: Path) -> Iterator[pa.RecordBatch]:
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=65536):
        columns = [_textual(col) for col in batch.columns]
        yield _with_invalid(pa.RecordBatch.from_arrays(columns, names=batch.schema.names), _empty_strings(len(batch)))


def raw_batches(path: str | Path) -> Iterator[pa.RecordBatch]:
    """Record batches of the raw columns (string or binary: decode with _string_column) of every input file."""
    for file in input_files(path):
        yield from (_parquet_batches(file) if _is_parquet(file) else _csv_batches(file))


def _columns_of_file(file: Path) -> list[str]:
    if _is_parquet(file):
        return list(pq.ParquetFile(file).schema_arrow.names)
    return _read_header(file, *dialect(file))


def check_input(path: str | Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    """Every input file has the required columns: an InputError naming what is missing, before any work."""
    for file in input_files(path):
        try:
            names = _columns_of_file(file)
        except InputError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, pa.ArrowException) as exc:
            raise InputError(f"{file}: cannot read the input: {exc}") from exc
        if not names or names == [""]:
            raise InputError(f"{file}: empty file or no header line (required columns: {', '.join(required)})")
        try:
            check_columns(names, required)
        except InputError as exc:
            raise InputError(f"{file}: {exc}") from None


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


def _utf8(column: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """(strings, rows that were not valid UTF-8 or None); those rows get U+FFFD for the bad bytes."""
    if pa.types.is_string(column.type):
        return column, None
    try:
        return pc.cast(column, pa.string()), None  # validates: the fast path
    except pa.ArrowInvalid:
        pass
    values, bad = [], np.zeros(len(column), bool)
    for i, value in enumerate(column.to_pylist()):
        if value is None:
            values.append(None)
            continue
        try:
            values.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(value.decode("utf-8", errors="replace"))
            bad[i] = True
    return pa.array(values, pa.string()), bad


def _string_column(batch: pa.RecordBatch, mapping: dict[str, str], name: str) -> pa.Array:
    actual = mapping.get(name)
    if actual is None:
        return _empty_strings(batch.num_rows)
    column, _ = _utf8(batch.column(actual))
    return pc.utf8_trim_whitespace(pc.fill_null(column, ""))


def utf8_reasons(batch: pa.RecordBatch, mapping: dict[str, str], names: tuple[str, ...]) -> pa.Array | None:
    """Per row, which of the columns `names` held bytes that are not UTF-8 ('' when none); None if no row did."""
    reasons: np.ndarray | None = None
    for name in names:
        actual = mapping.get(name)
        if actual is None:
            continue
        _, bad = _utf8(batch.column(actual))
        if bad is None or not bad.any():
            continue
        if reasons is None:
            reasons = np.full(batch.num_rows, "", dtype=object)
        reasons[bad & (reasons == "")] = f"invalid UTF-8 in column '{actual}'"
    return None if reasons is None else pa.array(reasons.tolist(), pa.string())


def deterministic_uuid(namespace: uuidlib.UUID, *parts: str) -> str:
    return str(uuidlib.uuid5(namespace, "\x1f".join(parts)))


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
_UUID_GROUPS = ((0, 8, 0), (8, 12, 9), (12, 16, 14), (16, 20, 19), (20, 32, 24))  # nibbles -> text columns


def deterministic_uuids(namespace: uuidlib.UUID, first: pa.Array, second: pa.Array) -> pa.Array:
    """``deterministic_uuid(namespace, a, b)`` for every row, as one Arrow array.

    The same UUID5 strings, built with one SHA-1 call per row and numpy for the rest.
    """
    n = len(first)
    if not n:
        return pa.array([], pa.string())
    names = pc.cast(pc.binary_join_element_wise(first, second, "\x1f"), pa.binary()).to_pylist()
    prefix = namespace.bytes
    sha1 = hashlib.sha1
    digests = np.frombuffer(b"".join([sha1(prefix + name).digest() for name in names]), np.uint8)
    raw = digests.reshape(n, 20)[:, :16].copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x50  # version 5
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    nibbles = np.empty((n, 32), np.uint8)
    nibbles[:, 0::2] = _HEX_DIGITS[raw >> 4]
    nibbles[:, 1::2] = _HEX_DIGITS[raw & 0x0F]
    text = np.full((n, 36), ord("-"), np.uint8)
    for start, end, at in _UUID_GROUPS:
        text[:, at : at + end - start] = nibbles[:, start:end]
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


def with_invalid_reason(
    batch: pa.RecordBatch, reject: pa.Array, text_columns: tuple[str, ...] = URL_COLUMNS
) -> pa.Array:
    """A parse failure of the line wins over any other reason, then bytes that are not UTF-8."""
    utf8 = utf8_reasons(batch, _column_map(batch.schema.names), text_columns)
    if utf8 is not None:
        reject = pc.if_else(pc.not_equal(utf8, ""), utf8, reject)
    invalid = batch.column(INVALID_COLUMN)
    return pc.if_else(pc.not_equal(invalid, ""), invalid, reject)


def _fill_missing_text(column: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(column, ""), NOT_PROVIDED, column)


def generic_rows(path: str | Path) -> Iterator[pa.RecordBatch]:
    """The generic reader: uuid, identifier, source_id[, license, source, title], any column order/case.

    Checks every file's columns now (an InputError naming the missing ones), reads lazily.
    """
    check_input(path)
    return _generic_rows(path)


def _generic_rows(path: str | Path) -> Iterator[pa.RecordBatch]:
    for batch in raw_batches(path):
        mapping = _column_map(batch.schema.names)
        check_columns(batch.schema.names)
        identifier = _string_column(batch, mapping, "identifier")
        source_id = _string_column(batch, mapping, "source_id")
        if "uuid" in mapping:
            ids = _string_column(batch, mapping, "uuid")
        else:  # no uuid column: derive a stable one so reruns agree
            ids = deterministic_uuids(UUID_NAMESPACE, source_id, identifier)
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
    if "\\" in authority:  # clients disagree on where such a URL goes: it could land on another server
        return "", "ambiguous host (backslash in the authority)"
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
    host = host.lower()
    if port and (not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536):
        return "", f"invalid port '{port}'"
    if not host.isascii():
        # IDNA 2008 with UTS 46 mapping, as requests/urllib3 encode it: the name must be the host
        # the client really contacts (IDNA 2003 would fold straße.de into strasse.de).
        try:
            host = idna.encode(host.rstrip(".\u3002\uff0e\uff61"), uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return "", "host is not a valid internationalised domain name"
    host = host.rstrip(".")
    if not host:
        return "", "URL has no host"
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
    """Normalised batches (URL_COLUMNS + server_name + _reject) from the chosen reader.

    The input's columns are checked before this returns (InputError naming what is missing);
    the rows themselves are read lazily, as the caller iterates.
    """
    if initializer == "gbif":
        from distributed_downloader.inputs.gbif import gbif_rows

        source = gbif_rows(path, occurrences)
    elif initializer == "generic":
        source = generic_rows(path)
    else:
        raise InputError(f"unknown initializer {initializer!r} (expected 'generic' or 'gbif')")
    return (add_server_names(batch) for batch in source if batch.num_rows)
