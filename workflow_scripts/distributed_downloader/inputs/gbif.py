"""The `gbif` initializer: a GBIF snapshot's multimedia.txt (Darwin Core multimedia extension).

Columns are found by header name, never by position: GBIF has reordered them between versions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distributed_downloader.inputs.columns import (
    GBIF_UUID_NAMESPACE,
    INVALID_COLUMN,
    assemble,
    column_map,
    deterministic_uuids,
    string_column,
    with_invalid_reason,
)
from distributed_downloader.inputs.files import check_input, raw_batches

GBIF_REQUIRED = ("gbifid", "identifier")
OCCURRENCE_REQUIRED = ("gbifid", "basisofrecord")
GBIF_TEXT_COLUMNS = ("gbifid", "identifier", "license", "source", "publisher", "title")  # must be UTF-8
MATERIAL_CITATION = "MATERIAL_CITATION"


def material_citation_ids(occurrences: str | Path) -> np.ndarray:
    """Sorted gbifIDs whose basisOfRecord is MATERIAL_CITATION (streamed; only those ids are kept)."""
    check_input(occurrences, OCCURRENCE_REQUIRED)
    found: list[np.ndarray] = []
    for batch in raw_batches(occurrences):
        mapping = column_map(batch.schema.names)
        basis = string_column(batch, mapping, "basisofrecord")
        ids = string_column(batch, mapping, "gbifid").filter(pc.equal(pc.utf8_upper(basis), MATERIAL_CITATION))
        numeric = _numeric_ids(ids)
        numeric = numeric[numeric >= 0]
        if len(numeric):
            found.append(numeric)
    return np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)


def _is_still_image(kind: pa.Array, media_format: pa.Array) -> pa.Array:
    still = pc.equal(pc.utf8_lower(kind), "stillimage")
    untyped_image = pc.and_(pc.equal(kind, ""), pc.starts_with(pc.utf8_lower(media_format), "image"))
    return pc.or_(still, untyped_image)


def _numeric_ids(gbif_ids: pa.Array) -> np.ndarray:
    """gbifIDs as int64 (at most 18 ASCII digits, so no overflow); -1 for anything else."""
    digits = pc.match_substring_regex(gbif_ids, r"^[0-9]{1,18}$")
    cleaned = pc.if_else(digits, gbif_ids, "-1")
    return pc.cast(cleaned, pa.int64()).to_numpy(zero_copy_only=False)


def _excluded(gbif_ids: pa.Array, excluded: np.ndarray) -> pa.Array:
    if not len(excluded):
        return pa.array(np.zeros(len(gbif_ids), dtype=bool))
    numeric = _numeric_ids(gbif_ids)
    position = np.minimum(np.searchsorted(excluded, numeric), len(excluded) - 1)
    return pa.array((excluded[position] == numeric) & (numeric >= 0))


def gbif_rows(path: str | Path, occurrences: str | Path = "") -> Iterator[pa.RecordBatch]:
    """Still-image rows with source_id = gbifID and uuid = UUID5(gbifID, identifier).

    Both files' columns are checked before this returns (InputError naming what is missing);
    the rows are read lazily, as the caller iterates.
    """
    check_input(path, GBIF_REQUIRED)
    if occurrences:
        check_input(occurrences, OCCURRENCE_REQUIRED)
    return _gbif_rows(path, occurrences)


def _gbif_rows(path: str | Path, occurrences: str | Path) -> Iterator[pa.RecordBatch]:
    excluded = material_citation_ids(occurrences) if occurrences else np.empty(0, dtype=np.int64)
    for batch in raw_batches(path):
        mapping = column_map(batch.schema.names)
        gbif_id = string_column(batch, mapping, "gbifid")
        keep = _is_still_image(string_column(batch, mapping, "type"), string_column(batch, mapping, "format"))
        keep = pc.and_(keep, pc.invert(_excluded(gbif_id, excluded)))
        keep = pc.or_(keep, pc.not_equal(batch.column(INVALID_COLUMN), ""))  # unparseable lines are reported
        batch = batch.filter(keep)
        mapping = column_map(batch.schema.names)
        gbif_id = string_column(batch, mapping, "gbifid")
        identifier = string_column(batch, mapping, "identifier")
        ids = deterministic_uuids(GBIF_UUID_NAMESPACE, gbif_id, identifier)
        reject = with_invalid_reason(batch, pc.if_else(pc.equal(gbif_id, ""), "empty gbifID", ""), GBIF_TEXT_COLUMNS)
        # `source` is usually empty in GBIF exports; the publisher names where the image comes from.
        source = string_column(batch, mapping, "source")
        publisher = string_column(batch, mapping, "publisher")
        with_source = batch.append_column("_source", pc.if_else(pc.equal(source, ""), publisher, source))
        yield assemble(ids, gbif_id, identifier, with_source, column_map(with_source.schema.names), reject, "_source")
