"""Monthly snapshots: the reuse step of a batch (reuse.py) on small previous datasets written here."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_downloader.engine import reuse
from distributed_downloader.plan import snapshot
from distributed_downloader.store.batch_parts import REUSE_SUCCESSES, BatchParts, success_files
from distributed_downloader.store.files import SUCCESS_SCHEMA
from tests.unit.test_snapshot import _error, _success, initialize, write_previous

URLS = [f"http://a.org/img/{i}.jpg" for i in range(8)]


def _setup(tmp_path: Path, **params: object):  # noqa: ANN202
    previous = tmp_path / "prev"
    write_previous(
        previous,
        "a.org",
        [_success(u, image=b"IMAGE-%d" % i) for i, u in enumerate(URLS[:6])],
        [_error(URLS[6], 404, time.time())],
    )
    rows = [(f"n{i}", f"src{i}", u) for i, u in enumerate(URLS)]
    config, paths, manifest, _ = initialize(tmp_path, rows, previous, **params)
    return previous, paths, manifest


def _open(paths, manifest, partition_id: int, first: bool = True, parts: BatchParts | None = None):  # noqa: ANN001, ANN202
    fingerprint = manifest["servers"]["a.org"]["fingerprints"][partition_id]
    urls = pq.read_table(paths.batch_urls("a.org", partition_id)).to_pylist()
    folder = paths.batch_images("a.org", partition_id)
    parts = parts or BatchParts(folder, fingerprint, 1)
    return reuse.open_batch(paths, "a.org", partition_id, fingerprint, urls, first, parts), folder


def test_reused_rows_are_copied_byte_identical_with_this_runs_ids_and_attribution(tmp_path: Path) -> None:
    _, paths, manifest = _setup(tmp_path)
    opened, folder = _open(paths, manifest, 0)
    assert opened.download == [] and opened.copied == 4 and opened.kept_errors == []
    assert success_files(folder) == [folder / REUSE_SUCCESSES]
    table = pq.read_table(folder / REUSE_SUCCESSES)
    assert table.schema.remove_metadata() == SUCCESS_SCHEMA
    for row in table.to_pylist():
        i = int(row["uuid"][1:])
        assert (row["source_id"], row["identifier"], row["license"]) == (f"src{i}", URLS[i], "cc")
        assert row["is_license_full"] is True  # license, source and title of the new input
        assert row["image"] == b"IMAGE-%d" % i and row["hashsum_original"] == "h-" + URLS[i]
        assert row["etag"] == f'"{URLS[i][-6:]}"' and row["checked_at"] is not None
    # Batch 1: two reused, a kept 404, one new URL to download.
    opened, folder = _open(paths, manifest, 1)
    assert [r["uuid"] for r in opened.download] == ["n7"] and opened.copied == 2
    assert [(e["uuid"], e["error_code"], e["identifier"]) for e in opened.kept_errors] == [("n6", 404, URLS[6])]


def test_a_reopened_batch_does_not_copy_again_and_rows_already_written_are_left_to_the_download(
    tmp_path: Path,
) -> None:
    _, paths, manifest = _setup(tmp_path)
    fingerprint = manifest["servers"]["a.org"]["fingerprints"][0]
    folder = paths.batch_images("a.org", 0)
    parts = BatchParts(folder, fingerprint, 1)  # an earlier attempt (or profiling's probe) wrote n1 already
    parts.append_success({**_success(URLS[1]), "uuid": "n1", "checked_at": None})
    parts.flush()
    opened, _ = _open(paths, manifest, 0, parts=parts)
    assert [r["uuid"] for r in opened.download] == ["n1"] and opened.copied == 3
    written = (folder / REUSE_SUCCESSES).stat().st_mtime_ns
    time.sleep(0.01)
    again, _ = _open(paths, manifest, 0, parts=parts)
    assert (folder / REUSE_SUCCESSES).stat().st_mtime_ns == written  # found in place, not copied twice
    assert again.copied == 3 and [r["uuid"] for r in again.download] == ["n1"]


def test_revalidation_rows_are_staged_and_carry_their_conditional_headers(tmp_path: Path) -> None:
    _, paths, manifest = _setup(tmp_path, revalidate_fraction=1.0)
    opened, folder = _open(paths, manifest, 0)
    assert opened.copied == 0 and not (folder / REUSE_SUCCESSES).exists()
    assert [r["uuid"] for r in opened.download] == ["n0", "n1", "n2", "n3"]
    row = opened.download[2]
    assert reuse.conditional_headers(row) == {
        "If-None-Match": f'"{URLS[2][-6:]}"',
        "If-Modified-Since": "Tue, 14 Nov 2023 22:13:20 GMT",
    }
    confirmed = reuse.confirmed_row(row, {"ETag": '"v2"'})
    assert confirmed["image"] == b"IMAGE-2" and confirmed["uuid"] == "n2" and confirmed["etag"] == '"v2"'
    assert confirmed["last_modified"] == "Tue, 14 Nov 2023 22:13:20 GMT"
    # A retry round (the batch committed) finds the staged copies again for rows it retries.
    urls = pq.read_table(paths.batch_urls("a.org", 0)).to_pylist()
    fingerprint = manifest["servers"]["a.org"]["fingerprints"][0]
    retried = reuse.open_batch(paths, "a.org", 0, fingerprint, urls, False, BatchParts(folder, fingerprint, 2))
    assert len(retried.download) == 4 and all(reuse.conditional_headers(r) for r in retried.download)
    assert reuse.remove_staged(paths, manifest) == 1 and not (folder / reuse.STAGED_DIR).exists()


def test_a_previous_row_that_changed_since_the_match_is_downloaded_instead(tmp_path: Path) -> None:
    previous, paths, manifest = _setup(tmp_path)
    target = previous / "downloaded_images" / "server_name=a.org" / "partition_id=0" / "successes.parquet"
    table = pq.read_table(target)
    pq.write_table(table.take(pa.array([1, 0, 2, 3, 4, 5])), target)  # a tool rewrote it: rows 0 and 1 swapped
    opened, folder = _open(paths, manifest, 0)
    assert sorted(r["uuid"] for r in opened.download) == ["n0", "n1"] and opened.copied == 2
    os.remove(target)  # gone altogether: every planned row of it is downloaded
    opened, _ = _open(paths, manifest, 1)
    assert sorted(r["uuid"] for r in opened.download) == ["n4", "n5", "n7"]


def test_a_batch_without_a_plan_drops_an_older_copy(tmp_path: Path) -> None:
    _, paths, manifest = _setup(tmp_path)
    opened, folder = _open(paths, manifest, 0)
    assert (folder / REUSE_SUCCESSES).exists()
    snapshot.remove_plan(paths)  # re-initialized without previous_dataset
    opened, _ = _open(paths, manifest, 0)
    assert len(opened.download) == 4 and not (folder / REUSE_SUCCESSES).exists()
