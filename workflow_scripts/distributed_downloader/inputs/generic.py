"""The ``generic`` initializer: uuid, identifier, source_id[, license, source, title], any column order or case."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from distributed_downloader.inputs.columns import (
    UUID_NAMESPACE,
    assemble,
    check_columns,
    column_map,
    deterministic_uuids,
    string_column,
    with_invalid_reason,
)
from distributed_downloader.inputs.files import check_input, raw_batches


def generic_rows(path: str | Path) -> Iterator[pa.RecordBatch]:
    """The generic reader: uuid, identifier, source_id[, license, source, title], any column order/case.

    Checks every file's columns now (an InputError naming the missing ones), reads lazily.
    """
    check_input(path)
    return _generic_rows(path)


def _generic_rows(path: str | Path) -> Iterator[pa.RecordBatch]:
    for batch in raw_batches(path):
        mapping = column_map(batch.schema.names)
        check_columns(batch.schema.names)
        identifier = string_column(batch, mapping, "identifier")
        source_id = string_column(batch, mapping, "source_id")
        if "uuid" in mapping:
            ids = string_column(batch, mapping, "uuid")
        else:  # no uuid column: derive a stable one so reruns agree
            ids = deterministic_uuids(UUID_NAMESPACE, source_id, identifier)
        reject = pc.if_else(pc.equal(ids, ""), "empty uuid", "")
        yield assemble(ids, source_id, identifier, batch, mapping, with_invalid_reason(batch, reject))
