"""The rows of ``successes*.parquet`` built from an input row (store/files.py holds their schema).

One rule for the attribution columns, whoever writes the row: a lane after a download (engine/lane.py),
profiling's kept probe (engine/probe_rows.py), and a monthly snapshot's copy of a previous row
(engine/reuse.py, which takes ``is_license_full`` from here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from distributed_downloader.inputs import NOT_PROVIDED

if TYPE_CHECKING:  # annotation only: the store does not load the image libraries
    from distributed_downloader.imaging.process import ProcessedImage


def is_license_full(row: Mapping) -> bool:
    return all(row.get(k) not in (None, "", NOT_PROVIDED) for k in ("license", "source", "title"))


def success_row(row: Mapping, image: ProcessedImage, headers: Mapping[str, str] | None = None) -> dict:
    """The successes.parquet row of an input row and its processed image (``headers``: the response's,
    whose validators a later snapshot's conditional GET sends back; issue #18)."""
    headers = headers or {}
    return {
        "uuid": row["uuid"],
        "source_id": row["source_id"],
        "identifier": row["identifier"],
        "is_license_full": is_license_full(row),
        "license": row["license"] or NOT_PROVIDED,
        "source": row["source"] or NOT_PROVIDED,
        "title": row["title"] or NOT_PROVIDED,
        "hashsum_original": image.hashsum_original,
        "hashsum_resized": image.hashsum_resized,
        "original_size": list(image.original_size),
        "resized_size": list(image.resized_size),
        "image": image.image,
        "etag": headers.get("ETag"),
        "last_modified": headers.get("Last-Modified"),
    }
