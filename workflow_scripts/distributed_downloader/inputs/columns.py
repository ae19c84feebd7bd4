"""The URL table's columns: names found by header (any case, any order), text normalised, stable ids.

Every reader (generic.py, gbif.py) builds its batches here: ``string_column`` reads a column as trimmed
UTF-8 strings (bytes that are not UTF-8 become a reason to reject the row), ``deterministic_uuids`` gives
rows without a uuid the same id on every rerun, and ``assemble`` puts the ``URL_COLUMNS`` (+ ``_reject``)
batch together.
"""

from __future__ import annotations

import hashlib
import uuid as uuidlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

URL_COLUMNS = ("uuid", "source_id", "identifier", "license", "source", "title")
REQUIRED_COLUMNS = ("identifier", "source_id")
NOT_PROVIDED = "Not provided"
# Longer URLs are rejected at initialization. 8 KB is what servers take in a request line:
# nginx's default large_client_header_buffers (8k), Apache's LimitRequestLine (8190).
MAX_URL_LENGTH = 8192
# Deterministic ids: uuid5 in a namespace of our own, so reruns give the same ids.
UUID_NAMESPACE = uuidlib.UUID("6f1d3a2e-5b7c-4e8a-9d0f-2c4b6a8e1f3d")
GBIF_UUID_NAMESPACE = uuidlib.uuid5(uuidlib.NAMESPACE_URL, "https://www.gbif.org/multimedia")


INVALID_COLUMN = "__invalid_row__"  # raw batches: why a line could not be parsed ('' if it could)


class InputError(ValueError):
    """The input as a whole cannot be read (missing columns, unreadable file)."""


def empty_strings(n: int) -> pa.Array:
    return pa.repeat(pa.scalar("", pa.string()), n)


def column_map(names: list[str]) -> dict[str, str]:
    """lower-cased logical name -> actual column name (first wins)."""
    mapping: dict[str, str] = {}
    for name in names:
        mapping.setdefault(name.strip().lstrip("\ufeff").lower(), name)
    return mapping


def check_columns(names: list[str], required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    missing = [c for c in required if c not in column_map(names)]
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


def string_column(batch: pa.RecordBatch, mapping: dict[str, str], name: str) -> pa.Array:
    actual = mapping.get(name)
    if actual is None:
        return empty_strings(batch.num_rows)
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
    utf8 = utf8_reasons(batch, column_map(batch.schema.names), text_columns)
    if utf8 is not None:
        reject = pc.if_else(pc.not_equal(utf8, ""), utf8, reject)
    invalid = batch.column(INVALID_COLUMN)
    return pc.if_else(pc.not_equal(invalid, ""), invalid, reject)


def _fill_missing_text(column: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(column, ""), NOT_PROVIDED, column)


def assemble(
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
            _fill_missing_text(string_column(batch, mapping, "license")),
            _fill_missing_text(string_column(batch, mapping, source_column)),
            _fill_missing_text(string_column(batch, mapping, "title")),
            reject,
        ],
        names=[*URL_COLUMNS, "_reject"],
    )
