"""The built-in tools: size_based, duplication_based, resize, image_verification (README "Tools"), and
export_webdataset (tools/export/: training-ready shards, issue #19)."""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distributed_downloader.errors import ImageError
from distributed_downloader.imaging.process import ImageSettings, _md5, decode_stored_image, encode_image, resize_image
from distributed_downloader.tools.base import (
    DefaultScheduler,
    FilterTableWriter,
    FilterToolBase,
    MPIRunnerTool,
    PythonFilterToolBase,
)
from distributed_downloader.tools.batch import BatchResult, PartitionContext
from distributed_downloader.tools.dataset import ParquetRewrite
from distributed_downloader.tools.registry import FilterRegister, RunnerRegister, SchedulerRegister

BUILTIN_TOOLS = ("size_based", "duplication_based", "resize", "image_verification", "export_webdataset")


def size_pairs(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<int64> ``[height, width]`` column as an (n, 2) int64 array; malformed rows become (0, 0)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    if (lengths == 2).all():
        return np.asarray(pc.list_flatten(column).to_numpy(zero_copy_only=False), dtype=np.int64).reshape(n, 2)
    out = np.zeros((n, 2), dtype=np.int64)
    for i, value in enumerate(column.to_pylist()):
        if value is not None and len(value) == 2 and None not in value:
            out[i] = value
    return out


# --------------------------------------------------------------------------- size_based


@FilterRegister("size_based")
class SizeBasedFiltering(PythonFilterToolBase):
    """Rows whose shorter original side is below ``threshold_size``."""

    columns = ("uuid", "original_size")

    def filter_partition(self, table: pa.Table | None, server_name: str, partition_id: int) -> pa.Table | None:
        assert table is not None
        threshold = int(self.parameters["threshold_size"])
        shorter = size_pairs(table.column("original_size")).min(axis=1)
        small = shorter < threshold
        if not small.any():
            return table.schema.empty_table().select(["uuid"])
        reasons = [f"shorter original side {int(s)} < threshold_size {threshold}" for s in shorter[small]]
        return pa.table({"uuid": table.column("uuid").filter(pa.array(small)), "reason": pa.array(reasons)})


# --------------------------------------------------------------------------- duplication_based


@functools.cache
def _hex2() -> pa.Array:
    """The 256 two-digit hex prefixes, built on first use (a module-level pa.array imports pandas)."""
    return pa.array([f"{i:02x}" for i in range(256)])


class _BucketSpill:
    """Rows hash-partitioned by the first byte of ``hashsum_original`` into parquet spill files.

    With one bucket everything stays in memory; with more, memory is bounded by ``flush_rows``.
    """

    def __init__(self, folder: Path, buckets: int, schema: pa.Schema, flush_rows: int) -> None:
        self.folder = folder
        self.buckets = buckets
        self.schema = schema
        self.flush_rows = flush_rows
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writers: dict[int, ParquetRewrite] = {}
        if buckets > 1:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)

    def add(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self.buckets > 1 and self._pending_rows >= self.flush_rows:
            self._flush()

    def _bucket_of(self, table: pa.Table) -> np.ndarray:
        prefix = pc.utf8_slice_codeunits(pc.utf8_lower(table.column("hashsum_original")), 0, 2)
        index = pc.fill_null(pc.index_in(prefix, value_set=_hex2()), 0).to_numpy(zero_copy_only=False)
        return np.asarray(index, dtype=np.int64) % self.buckets

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        bucket = self._bucket_of(table)
        order = np.argsort(bucket, kind="stable")
        table, bucket = table.take(pa.array(order)), bucket[order]
        starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        ends = np.r_[starts[1:], len(bucket)]
        for start, end in zip(starts, ends, strict=True):
            b = int(bucket[start])
            if b not in self._writers:
                self._writers[b] = ParquetRewrite(self.folder / f"bucket_{b:03d}.parquet", self.schema, "spill")
            self._writers[b].write(table.slice(start, end - start))

    def tables(self) -> Iterator[pa.Table]:
        if self.buckets == 1:
            table = pa.concat_tables(self._pending) if self._pending else self.schema.empty_table()
            self._pending = []
            yield table
            return
        self._flush()
        for writer in self._writers.values():
            writer.commit()
        for b in sorted(self._writers):
            yield pq.read_table(self._writers[b].path)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.abort()
        if self.buckets > 1:
            shutil.rmtree(self.folder, ignore_errors=True)


@FilterRegister("duplication_based")
class DuplicatesBasedFiltering(FilterToolBase):
    """Every row but one per ``hashsum_original`` across the whole dataset.

    The row kept is the smallest (server_name, partition_id, uuid), so the choice is deterministic.
    Memory is bounded: above ``rows_in_memory`` rows the key columns are hash-partitioned to disk first.
    """

    rows_in_memory: ClassVar[int] = 2_000_000
    extra_fields = (
        pa.field("kept_uuid", pa.string()),
        pa.field("kept_server_name", pa.string()),
        pa.field("kept_partition_id", pa.int64()),
    )
    _KEYS = pa.schema(
        [
            ("hashsum_original", pa.string()),
            ("server_name", pa.string()),
            ("partition_id", pa.int64()),
            ("uuid", pa.string()),
        ]
    )

    def duplicates(self, table: pa.Table) -> pa.Table:
        """The non-kept rows of ``table`` (key columns) with the kept row of their group and a reason."""
        table = table.sort_by([(name, "ascending") for name in self._KEYS.names])
        n = table.num_rows
        if n < 2:
            return self.filter_schema.empty_table()
        hashes = table.column("hashsum_original").to_numpy(zero_copy_only=False)
        first_of_group = np.r_[True, hashes[1:] != hashes[:-1]]
        group_start = np.maximum.accumulate(np.where(first_of_group, np.arange(n), 0))
        dup = ~first_of_group
        if not dup.any():
            return self.filter_schema.empty_table()
        removed = table.filter(pa.array(dup))
        kept = table.take(pa.array(group_start[dup]))
        kept_pid = pc.cast(kept.column("partition_id"), pa.string())
        reason = pc.binary_join_element_wise(
            "duplicate of uuid ",
            kept.column("uuid"),
            " (server_name=",
            kept.column("server_name"),
            ", partition_id=",
            kept_pid,
            ")",
            "",
        )
        return pa.table(
            {
                "server_name": removed.column("server_name"),
                "partition_id": removed.column("partition_id"),
                "uuid": removed.column("uuid"),
                "reason": reason,
                "kept_uuid": kept.column("uuid"),
                "kept_server_name": kept.column("server_name"),
                "kept_partition_id": kept.column("partition_id"),
            },
            schema=self.filter_schema,
        )

    def run(self) -> dict:
        parts = self.partitions()
        rows_by_partition = {part: self.partition_rows(part) for part in parts}
        total = sum(rows_by_partition.values())
        buckets = max(1, min(256, math.ceil(total / self.rows_in_memory)))
        spill = _BucketSpill(self.tool_paths.filter_dir / ".spill", buckets, self._KEYS, self.rows_in_memory // 2)
        writer: FilterTableWriter = self.table_writer()
        try:
            for part in parts:
                table = self.read_partition(part, ["uuid", "hashsum_original"])
                table = table.filter(pc.is_valid(table.column("hashsum_original")))
                n = table.num_rows
                spill.add(
                    pa.table(
                        {
                            "hashsum_original": table.column("hashsum_original"),
                            "server_name": pa.array([part.server_name] * n, pa.string()),
                            "partition_id": pa.array([part.partition_id] * n, pa.int64()),
                            "uuid": table.column("uuid"),
                        },
                        schema=self._KEYS,
                    )
                )
            for bucket in spill.tables():
                writer.add_table(self.duplicates(bucket))
        except BaseException:
            writer.abort()
            raise
        finally:
            spill.close()
        self.logger.info("duplication_based: %d rows in %d hash buckets", total, buckets)
        return self.finish(writer, rows_by_partition)


# --------------------------------------------------------------------------- resize


@FilterRegister("resize")
class ResizeToolFilter(PythonFilterToolBase):
    """Rows whose stored image's longer side exceeds ``new_resize_size`` (read from ``resized_size``)."""

    columns = ("uuid", "resized_size")

    def filter_partition(self, table: pa.Table | None, server_name: str, partition_id: int) -> pa.Table | None:
        assert table is not None
        limit = int(self.parameters["new_resize_size"])
        longer = size_pairs(table.column("resized_size")).max(axis=1)
        big = longer > limit
        if not big.any():
            return table.schema.empty_table().select(["uuid"])
        reasons = [f"longer side {int(s)} > new_resize_size {limit}" for s in longer[big]]
        return pa.table({"uuid": table.column("uuid").filter(pa.array(big)), "reason": pa.array(reasons)})


# --------------------------------------------------------------------------- image_verification


@FilterRegister("image_verification")
class ImageVerificationToolFilter(PythonFilterToolBase):
    """Every partition as a whole: the runner decodes every stored image."""


# --------------------------------------------------------------------------- runners


def _set_columns(batch: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    for name, values in columns.items():
        index = batch.schema.get_field_index(name)
        batch = batch.set_column(index, batch.schema.field(index), values.cast(batch.schema.field(index).type))
    return batch


def _finish(batch: pa.Table, bad: dict[int, str], changed: int) -> BatchResult:
    if not bad:
        return BatchResult(kept=batch, changed=changed)
    drop = np.zeros(batch.num_rows, dtype=bool)
    drop[list(bad)] = True
    order = sorted(bad)
    return BatchResult(
        kept=batch.filter(pa.array(~drop)),
        removed=batch.take(pa.array(order)),
        reasons=[bad[i] for i in order],
        changed=changed,
    )


@RunnerRegister("size_based")
@RunnerRegister("duplication_based")
class FilterRunnerTool(MPIRunnerTool):
    """Removes the rows the filter listed (the default runner behaviour), with the filter's reason."""


@RunnerRegister("resize")
class ResizeRunnerTool(MPIRunnerTool):
    """Re-resizes stored images whose longer side exceeds ``new_resize_size``; updates size and hash.

    Re-encodes per the run's ``downloader_parameters.image_format``. A stored image that cannot be
    decoded cannot be resized: it is removed into the report with the reason.
    """

    filter_columns = ("uuid",)

    def __init__(self, config, tool_name: str) -> None:  # noqa: ANN001 - Mapping
        super().__init__(config, tool_name)
        params = config["downloader_parameters"]
        self.new_size = int(self.parameters["new_resize_size"])
        self.settings = ImageSettings(
            image_size=self.new_size, image_format=self.image_format, jpeg_quality=params["jpeg_quality"]
        )

    def resize_one(self, image: bytes | None, size: np.ndarray) -> tuple[bytes, list[int]] | str:
        if image is None:
            return "resize: the row has no image bytes"
        try:
            img = decode_stored_image(image, size.tolist(), self.image_format)
        except ImageError as exc:
            return f"resize: stored image is corrupt: {exc.message}"
        out = resize_image(img, self.new_size)
        return encode_image(out, self.settings), [out.height, out.width]

    def apply_batch(self, batch: pa.Table, part: PartitionContext) -> BatchResult:
        sizes = size_pairs(batch.column("resized_size"))
        todo = np.flatnonzero(part.selected(batch) & (sizes.max(axis=1) > self.new_size)).tolist()
        if not todo:
            return BatchResult(kept=batch)
        images = batch.column("image")
        results = self.map(lambda i: self.resize_one(images[i].as_py(), sizes[i]), todo)
        new_images = images.to_pylist()
        new_sizes = [list(map(int, s)) for s in sizes]
        new_hashes = batch.column("hashsum_resized").to_pylist()
        bad: dict[int, str] = {}
        changed = 0
        for i, result in zip(todo, results, strict=True):
            if isinstance(result, str):
                bad[i] = result
                continue
            new_images[i], new_sizes[i] = result
            new_hashes[i] = _md5(result[0])
            changed += 1
        batch = _set_columns(
            batch,
            {
                "image": pa.array(new_images, pa.binary()),
                "resized_size": pa.array(new_sizes, pa.list_(pa.int64())),
                "hashsum_resized": pa.array(new_hashes, pa.string()),
            },
        )
        return _finish(batch, bad, changed)


@RunnerRegister("image_verification")
class ImageVerificationRunnerTool(MPIRunnerTool):
    """Decodes every stored image (and checks ``hashsum_resized``); corrupt rows go to the report."""

    filter_columns = ("uuid",)

    def check_one(self, image: bytes | None, hashsum: str | None, size: np.ndarray) -> str | None:
        if image is None:
            return "corrupt: the row has no image bytes"
        if hashsum is not None and _md5(image) != hashsum:
            return "corrupt: md5 of the image bytes differs from hashsum_resized"
        try:
            decode_stored_image(image, size.tolist(), self.image_format)
        except ImageError as exc:
            return f"corrupt: {exc.message}"
        return None

    def apply_batch(self, batch: pa.Table, part: PartitionContext) -> BatchResult:
        todo = np.flatnonzero(part.selected(batch)).tolist()
        if not todo:
            return BatchResult(kept=batch)
        sizes = size_pairs(batch.column("resized_size"))
        images = batch.column("image")
        hashes = batch.column("hashsum_resized")
        results = self.map(lambda i: self.check_one(images[i].as_py(), hashes[i].as_py(), sizes[i]), todo)
        bad = {i: reason for i, reason in zip(todo, results, strict=True) if reason is not None}
        return _finish(batch, bad, 0)


# export_webdataset's filter and runner register on import (after the classes above: no cycle).
from distributed_downloader.tools.export import tool as _export_tool  # noqa: E402, F401

for _name in BUILTIN_TOOLS:
    SchedulerRegister(_name)(DefaultScheduler)

__all__ = [
    "BUILTIN_TOOLS",
    "DuplicatesBasedFiltering",
    "FilterRunnerTool",
    "ImageVerificationRunnerTool",
    "ImageVerificationToolFilter",
    "ResizeRunnerTool",
    "ResizeToolFilter",
    "SizeBasedFiltering",
]
