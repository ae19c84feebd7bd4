"""What a tool's runner is given and gives back for each row group: the partition it works on
(``PartitionContext``, with the filter's rows for it) and the result of ``apply_batch`` (``BatchResult``).

Kept apart from base.py (the runner base class) and runner.py (the rewriting loop), which both use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class BatchResult:
    """What ``apply_batch`` returns for one row group.

    ``kept``: the rows written back (same columns as the input); ``removed``: rows dropped, with
    ``reasons`` (one string for all, or one per removed row); ``changed``: how many kept rows it modified.
    """

    kept: pa.Table
    removed: pa.Table | None = None
    reasons: str | Sequence[str] | None = None
    changed: int = 0


@dataclass
class PartitionContext:
    """The partition a runner works on, with its filter rows."""

    server_name: str
    partition_id: int
    path: Path
    filter_rows: pa.Table
    tool_name: str
    extra: dict = field(default_factory=dict)  # free for a runner's per-partition state

    @cached_property
    def whole(self) -> bool:
        """The filter selected the whole partition (a row with a null uuid)."""
        return "uuid" not in self.filter_rows.column_names or self.filter_rows.column("uuid").null_count > 0

    @cached_property
    def uuids(self) -> pa.Array:
        if "uuid" not in self.filter_rows.column_names:
            return pa.array([], pa.string())
        return pc.drop_null(self.filter_rows.column("uuid")).combine_chunks()

    @cached_property
    def reasons(self) -> dict[str, str]:
        if "reason" not in self.filter_rows.column_names:
            return {}
        table = self.filter_rows.select(["uuid", "reason"]).to_pydict()
        return {u: r for u, r in zip(table["uuid"], table["reason"], strict=True) if u is not None and r is not None}

    def selected(self, batch: pa.Table) -> np.ndarray:
        """Boolean mask of the batch rows the filter selected."""
        if self.whole:
            return np.ones(batch.num_rows, dtype=bool)
        mask = pc.is_in(batch.column("uuid"), value_set=self.uuids)
        return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)

    def reason_for(self, uuid: str, default: str) -> str:
        return self.reasons.get(uuid, default)
