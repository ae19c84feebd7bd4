"""Profiling's probe is the first row of the download, not an extra request.

A probe answered 200 has downloaded one image of the server's first batch already: ``ProbeKeeper``
turns it into that URL's row and makes it durable as a part of the batch (batch_parts.py), which
the download carries over like the parts of an attempt cut short. Nothing is kept for a batch
already committed (a profiling rerun) or a URL a part already holds.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import pyarrow.parquet as pq

from distributed_downloader import imaging
from distributed_downloader.batch_parts import BatchParts
from distributed_downloader.config import Paths
from distributed_downloader.errors import DownloadError
from distributed_downloader.lane import success_row
from distributed_downloader.store import valid_marker

FIRST_BATCH = 0  # profiling probes the first URLs of a server's first batch


class ProbeKeeper:
    """``ProbeSettings.keep_probe``: (server, url, body) -> the URL's row in its batch's parts."""

    def __init__(self, paths: Paths, manifest: Mapping, params: Mapping) -> None:
        self.paths = paths
        self.manifest = manifest
        self.image_settings = imaging.ImageSettings.from_config(params)
        self.kept = 0
        self._lock = threading.Lock()  # profiling probes servers from a thread pool

    def __call__(self, server: str, url: str, body: bytes) -> None:
        fingerprint = self.manifest["servers"][server]["fingerprints"][FIRST_BATCH]
        folder = self.paths.batch_images(server, FIRST_BATCH)
        if valid_marker(folder, fingerprint) is not None:
            return  # committed already: its rows are in place
        table = pq.read_table(self.paths.batch_urls(server, FIRST_BATCH))
        row = next((r for r in table.to_pylist() if r["identifier"] == url), None)
        if row is None:
            return
        parts = BatchParts(folder, fingerprint, round_no=1)
        if row["uuid"] in parts.carried_successes():
            return
        try:
            image = imaging.process_image(body, self.image_settings)
        except DownloadError:
            return  # not an image: the download writes its error row with the usual ladder
        parts.append_success(success_row(row, image))
        parts.flush()
        with self._lock:
            self.kept += 1
