"""The reader registry: the config's ``initializer`` names the reader of the input (as the original's
initializer table did); every reader's batches then get their server names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from distributed_downloader.inputs.columns import InputError
from distributed_downloader.inputs.gbif import gbif_rows
from distributed_downloader.inputs.generic import generic_rows
from distributed_downloader.inputs.servers import add_server_names

Reader = Callable[[str | Path, str], Iterator[pa.RecordBatch]]  # (input path, occurrences path) -> batches
READERS: dict[str, Reader] = {
    "generic": lambda path, occurrences: generic_rows(path),
    "gbif": gbif_rows,
}


def rows(path: str | Path, initializer: str = "generic", occurrences: str = "") -> Iterator[pa.RecordBatch]:
    """Normalised batches (URL_COLUMNS + server_name + _reject) from the chosen reader.

    The input's columns are checked before this returns (InputError naming what is missing);
    the rows themselves are read lazily, as the caller iterates.
    """
    reader = READERS.get(initializer)
    if reader is None:
        expected = " or ".join(repr(name) for name in READERS)
        raise InputError(f"unknown initializer {initializer!r} (expected {expected})")
    source = reader(path, occurrences)
    return (add_server_names(batch) for batch in source if batch.num_rows)
