"""The export's optional row filters: a minimum stored-image side, and a full license.

They run where each file is first surveyed (the runner's plan), on small columns only, so the image
bytes of a row left out are never read.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distributed_downloader.tools.export.settings import ExportSettings

EXCLUDED_MIN_SIDE = "min_side"
EXCLUDED_LICENSE = "license_not_full"


def columns_for(settings: ExportSettings) -> list[str]:
    """The successes columns the filters read (none when no filter is set)."""
    columns = []
    if settings.min_side > 0:
        columns.append("resized_size")
    if settings.license_full:
        columns.append("is_license_full")
    return columns


def shorter_sides(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The shorter side of each list<int> ``[height, width]``; a null or malformed size counts as 0."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False) if n else np.zeros(0)
    if n and (lengths == 2).all() and pc.list_flatten(column).null_count == 0:
        pairs = np.asarray(pc.list_flatten(column).to_numpy(zero_copy_only=False), dtype=np.int64).reshape(n, 2)
        return pairs.min(axis=1)
    out = np.zeros(n, dtype=np.int64)
    for i, value in enumerate(column.to_pylist()):
        if value is not None and len(value) == 2 and None not in value:
            out[i] = min(value)
    return out


def select(table: pa.Table, rows: int, settings: ExportSettings) -> tuple[np.ndarray, dict[str, int]]:
    """The rows to export (a bool mask over ``rows``) and how many each filter left out.

    A row failing both filters is counted under the first (``min_side``), so the counts add up.
    """
    keep = np.ones(rows, dtype=bool)
    excluded: dict[str, int] = {}
    if settings.min_side > 0:
        small = shorter_sides(table.column("resized_size")) < settings.min_side
        excluded[EXCLUDED_MIN_SIDE] = int((small & keep).sum())
        keep &= ~small
    if settings.license_full:
        full = pc.fill_null(table.column("is_license_full"), False).to_numpy(zero_copy_only=False).astype(bool)
        excluded[EXCLUDED_LICENSE] = int((~full & keep).sum())
        keep &= full
    return keep, excluded
