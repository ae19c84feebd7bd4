"""Input files and formats: a folder or a file, plain or compressed (gzip, zip), CSV/TSV (delimiter and
quoting sniffed) or Parquet, streamed as raw record batches; a line that cannot be parsed is kept with
the reason (``INVALID_COLUMN``), never dropped silently. Nothing reads a whole file into memory.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from distributed_downloader.inputs.columns import (
    INVALID_COLUMN,
    MAX_URL_LENGTH,
    REQUIRED_COLUMNS,
    InputError,
    check_columns,
    empty_strings,
)

READ_BLOCK_BYTES = 4 << 20
HEADER_BYTES = 1 << 20  # a header line longer than this is not a header


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
            held = _with_invalid(batch, empty_strings(batch.num_rows))
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
        yield _with_invalid(pa.RecordBatch.from_arrays(columns, names=batch.schema.names), empty_strings(len(batch)))


def raw_batches(path: str | Path) -> Iterator[pa.RecordBatch]:
    """Record batches of the raw columns (string or binary: decode with string_column) of every input file."""
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
