"""Profiling's probe is the first row of the download, not an extra request.

A probe answered 200 has downloaded one image of the server's first batch already: ``ProbeKeeper``
turns it into that URL's row (a probe answered with a permanent HTTP error, 404 or 410: its error
row) and makes it durable as a part of the batch (batch_parts.py), which the download carries over
like the parts of an attempt cut short. Nothing is kept for a batch already committed (a profiling
rerun) or a URL a part already holds.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import pyarrow.parquet as pq

from distributed_downloader.config import Paths
from distributed_downloader.errors import DownloadError
from distributed_downloader.imaging import process as imaging
from distributed_downloader.store.batch_parts import BatchParts
from distributed_downloader.store.files import valid_marker
from distributed_downloader.store.rows import success_row

FIRST_BATCH = 0  # profiling probes the first URLs of a server's first batch (a snapshot: of the first it downloads)


class ProbeKeeper:
    """``ProbeSettings.keep_probe``: (server, url, body, headers) -> the URL's row in its batch's parts."""

    def __init__(self, paths: Paths, manifest: Mapping, params: Mapping) -> None:
        self.paths = paths
        self.manifest = manifest
        self.image_settings = imaging.ImageSettings.from_config(params)
        self.kept = 0
        self._lock = threading.Lock()  # profiling probes servers from a thread pool

    def _find(self, server: str, url: str) -> tuple[int, dict] | None:
        """The probed URL's batch and row: the first batch, or (a monthly snapshot probes the first
        URL it downloads) the first batch holding it."""
        for partition_id in range(len(self.manifest["servers"][server]["fingerprints"])):
            table = pq.read_table(self.paths.batch_urls(server, partition_id))
            row = next((r for r in table.to_pylist() if r["identifier"] == url), None)
            if row is not None:
                return partition_id, row
        return None

    def __call__(
        self, server: str, url: str, body: bytes | None, headers: Mapping[str, str] | None = None, status: int = 200
    ) -> None:
        found = self._find(server, url)
        if found is None:
            return
        partition_id, row = found
        fingerprint = self.manifest["servers"][server]["fingerprints"][partition_id]
        folder = self.paths.batch_images(server, partition_id)
        if valid_marker(folder, fingerprint) is not None:
            return  # committed already: its rows are in place
        parts = BatchParts(folder, fingerprint, round_no=1)
        if row["uuid"] in parts.carried_successes():
            return
        if body is None:  # a permanent HTTP error: the URL's error row, as the download writes it
            if any(error["uuid"] == row["uuid"] for _, error in parts.carried_errors()):
                return
            error = {"uuid": row["uuid"], "identifier": url, "retry_count": 0, "error_code": int(status)}
            parts.append_error({**error, "error_msg": f"HTTP {status}"})
            parts.flush()
            with self._lock:
                self.kept += 1
            return
        try:
            image = imaging.process_image(body, self.image_settings)
        except DownloadError:
            return  # not an image: the download writes its error row with the usual ladder
        parts.append_success(success_row(row, image, headers))  # its validators too (issue #18)
        parts.flush()
        with self._lock:
            self.kept += 1
