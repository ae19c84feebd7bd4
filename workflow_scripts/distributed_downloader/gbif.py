"""The `gbif` initializer: a GBIF snapshot's multimedia.txt (Darwin Core multimedia extension).

Columns are found by header name, never by position: GBIF has reordered them between versions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distributed_downloader.inputs import (
    GBIF_UUID_NAMESPACE,
    INVALID_COLUMN,
    _assemble,
    _column_map,
    _string_column,
    check_columns,
    columns_of,
    deterministic_uuid,
    raw_batches,
    with_invalid_reason,
)

GBIF_REQUIRED = ("gbifid", "identifier")
MATERIAL_CITATION = "MATERIAL_CITATION"


def material_citation_ids(occurrences: str | Path) -> np.ndarray:
    """Sorted gbifIDs whose basisOfRecord is MATERIAL_CITATION (streamed; only those ids are kept)."""
    check_columns(columns_of(occurrences), ("gbifid", "basisofrecord"))
    found: list[np.ndarray] = []
    for batch in raw_batches(occurrences):
        mapping = _column_map(batch.schema.names)
        basis = _string_column(batch, mapping, "basisofrecord")
        ids = _string_column(batch, mapping, "gbifid").filter(pc.equal(pc.utf8_upper(basis), MATERIAL_CITATION))
        numeric = [int(v) for v in ids.to_pylist() if v.isdigit()]
        if numeric:
            found.append(np.asarray(numeric, dtype=np.int64))
    return np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)


def _is_still_image(kind: pa.Array, media_format: pa.Array) -> pa.Array:
    still = pc.equal(pc.utf8_lower(kind), "stillimage")
    untyped_image = pc.and_(pc.equal(kind, ""), pc.starts_with(pc.utf8_lower(media_format), "image"))
    return pc.or_(still, untyped_image)


def _excluded(gbif_ids: pa.Array, excluded: np.ndarray) -> pa.Array:
    if not len(excluded):
        return pa.array(np.zeros(len(gbif_ids), dtype=bool))
    numeric = np.array([int(v) if v.isdigit() else -1 for v in gbif_ids.to_pylist()], dtype=np.int64)
    return pa.array(np.isin(numeric, excluded))


def gbif_rows(path: str | Path, occurrences: str | Path = "") -> Iterator[pa.RecordBatch]:
    """Still-image rows with source_id = gbifID and uuid = UUID5(gbifID, identifier)."""
    check_columns(columns_of(path), GBIF_REQUIRED)
    excluded = material_citation_ids(occurrences) if occurrences else np.empty(0, dtype=np.int64)
    for batch in raw_batches(path):
        mapping = _column_map(batch.schema.names)
        gbif_id = _string_column(batch, mapping, "gbifid")
        keep = _is_still_image(_string_column(batch, mapping, "type"), _string_column(batch, mapping, "format"))
        keep = pc.and_(keep, pc.invert(_excluded(gbif_id, excluded)))
        keep = pc.or_(keep, pc.not_equal(batch.column(INVALID_COLUMN), ""))  # unparseable lines are reported
        batch = batch.filter(keep)
        mapping = _column_map(batch.schema.names)
        gbif_id = _string_column(batch, mapping, "gbifid")
        identifier = _string_column(batch, mapping, "identifier")
        ids = pa.array(
            [
                deterministic_uuid(GBIF_UUID_NAMESPACE, g, u)
                for g, u in zip(gbif_id.to_pylist(), identifier.to_pylist(), strict=True)
            ],
            pa.string(),
        )
        reject = with_invalid_reason(batch, pc.if_else(pc.equal(gbif_id, ""), "empty gbifID", ""))
        # `source` is usually empty in GBIF exports; the publisher names where the image comes from.
        source = _string_column(batch, mapping, "source")
        publisher = _string_column(batch, mapping, "publisher")
        with_source = batch.append_column("_source", pc.if_else(pc.equal(source, ""), publisher, source))
        yield _assemble(ids, gbif_id, identifier, with_source, _column_map(with_source.schema.names), reject, "_source")
