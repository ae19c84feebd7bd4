"""Nothing one URL or one batch does ends a lane: a real Lane against a real loopback farm.

A library raising on one URL (the image decoder, the robots.txt matcher) makes that URL an
INTERNAL (-17, transient) error row; a batch that cannot be committed (a disk error, a writer that
broke) is reported failed and left as it was for the next round while the lane goes on; a server
whose batches keep failing is set aside without another request. The faults are injected into
the library calls with monkeypatch: everything else (HTTP, decoding, parquet) is real.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest

from distributed_downloader import config as config_mod
from distributed_downloader.demo.testserver import HostSpec, ImageFarm
from distributed_downloader.engine import lane as lane_module
from distributed_downloader.engine.lane import END_OF_BATCHES, MAX_BATCH_FAILURES, BatchStats, Lane, LaneSpec
from distributed_downloader.errors import ErrorCode, is_transient
from distributed_downloader.imaging import process as imaging
from distributed_downloader.net import robots as robots_module
from distributed_downloader.store.batch_parts import BatchParts
from distributed_downloader.store.files import MARKER_FILE
from tests.e2e.helpers import lane_test_config, read_all, write_batch_urls

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def farm() -> ImageFarm:
    with ImageFarm([HostSpec("iso", latency=0.002)], seed=9) as running:
        yield running


def _lane(tmp_path: Path, farm: ImageFarm, batches: dict[int, list[str]]) -> tuple[Lane, config_mod.Paths]:
    config = lane_test_config(tmp_path)
    paths = config_mod.paths(config)
    server = farm.base_urls[0].split("//", 1)[1]
    for partition_id, urls in batches.items():
        write_batch_urls(paths.batch_urls(server, partition_id), urls)
    spec = LaneSpec(server, 0, 1, start_rate=200.0, max_rate=200.0, max_connections=4, decrease=0.3)
    return Lane(spec, config, paths, round_no=1), paths


def _run(lane: Lane, partitions: list[int]) -> list[BatchStats]:
    """The lane's batches, handed out one at a time when it asks (as the coordinator does)."""
    inbox: queue.Queue = queue.Queue()
    todo = [{"partition_id": p, "fingerprint": "f" * 32, "mode": "full"} for p in partitions]

    def ask_more() -> None:
        inbox.put(todo.pop(0) if todo else END_OF_BATCHES)

    ask_more()
    done: list[BatchStats] = []
    try:
        lane.run_lane(inbox, ask_more=ask_more, finished=done.append)
    finally:
        lane.close()
    return done


def _urls(farm: ImageFarm, prefix: str, count: int) -> list[str]:
    return [farm.url(0, f"/img/{prefix}{i}.jpg?w=24&h=16") for i in range(count)]


def test_a_library_raising_on_one_url_is_that_urls_error_row(
    tmp_path: Path, farm: ImageFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = _urls(farm, "a", 20)
    decoder_breaks, matcher_breaks = urls[3], urls[11]
    real_process = imaging.process_image
    real_allowed = robots_module.RobotsRules.allowed

    def process(data: bytes, settings: imaging.ImageSettings, *args: object) -> imaging.ProcessedImage:
        if data == farm_bytes[decoder_breaks]:
            raise IndexError("tuple index out of range")  # what a codec plugin might raise
        return real_process(data, settings, *args)  # type: ignore[arg-type]  # (budget, original_md5)

    def allowed(self: robots_module.RobotsRules, url: str) -> bool:
        if url == matcher_breaks:
            raise ValueError("Invalid IPv6 URL")
        return real_allowed(self, url)

    import requests

    farm_bytes = {url: requests.get(url, timeout=5).content for url in (decoder_breaks,)}
    monkeypatch.setattr(lane_module.imaging, "process_image", process)
    monkeypatch.setattr(robots_module.RobotsRules, "allowed", allowed)
    lane, paths = _lane(tmp_path, farm, {0: urls})
    (stats,) = _run(lane, [0])

    successes = read_all(paths.images, "successes.parquet")
    errors = read_all(paths.images, "errors.parquet")
    assert not stats.failed
    assert len(successes) == len(urls) - 2
    by_url = {row["identifier"]: row for row in errors}
    assert set(by_url) == {decoder_breaks, matcher_breaks}
    for url, kind in ((decoder_breaks, "IndexError"), (matcher_breaks, "ValueError")):
        row = by_url[url]
        assert row["error_code"] == ErrorCode.INTERNAL and is_transient(row["error_code"])
        assert kind in row["error_msg"] and "internal error" in row["error_msg"]
    assert (paths.batch_images(lane.spec.server_name, 0) / MARKER_FILE).exists()


def test_a_batch_that_cannot_be_committed_fails_alone_and_the_lane_goes_on(
    tmp_path: Path, farm: ImageFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_commit = Lane._commit

    def commit(self: Lane, run: lane_module._BatchRun) -> BatchStats:
        if run.partition_id == 0:
            raise OSError(28, "No space left on device")
        return real_commit(self, run)

    monkeypatch.setattr(Lane, "_commit", commit)
    lane, paths = _lane(tmp_path, farm, {0: _urls(farm, "b", 6), 1: _urls(farm, "c", 6)})
    stats = {s.partition_id: s for s in _run(lane, [0, 1])}
    assert "No space left" in stats[0].failed and "next round" in stats[0].failed
    assert not stats[1].failed and stats[1].successes == 6
    server = lane.spec.server_name
    assert not (paths.batch_images(server, 0) / MARKER_FILE).exists()  # redone next round
    assert (paths.batch_images(server, 1) / MARKER_FILE).exists()
    assert not list(paths.staging.rglob("*.parquet*"))  # nothing left half-written


def test_a_writer_that_breaks_fails_its_batch_not_the_lane(
    tmp_path: Path, farm: ImageFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_append = BatchParts.append_success
    broken = {"rows": 0}

    def append(self: BatchParts, row: dict) -> None:
        if row["identifier"].endswith("d2.jpg?w=24&h=16"):
            broken["rows"] += 1
            raise OSError(5, "Input/output error")
        real_append(self, row)

    monkeypatch.setattr(BatchParts, "append_success", append)
    lane, paths = _lane(tmp_path, farm, {0: _urls(farm, "d", 8), 1: _urls(farm, "e", 8)})
    stats = {s.partition_id: s for s in _run(lane, [0, 1])}
    assert broken["rows"] == 1
    assert "Input/output error" in stats[0].failed
    assert not stats[1].failed and stats[1].successes == 8
    assert not (paths.batch_images(lane.spec.server_name, 0) / MARKER_FILE).exists()


def test_a_server_whose_batches_keep_failing_is_set_aside(
    tmp_path: Path, farm: ImageFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    def commit(self: Lane, run: lane_module._BatchRun) -> BatchStats:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Lane, "_commit", commit)
    batches = {i: _urls(farm, f"s{i}-", 3) for i in range(MAX_BATCH_FAILURES + 2)}
    lane, _ = _lane(tmp_path, farm, batches)
    before = len(farm.request_log(0))
    done = _run(lane, list(batches))
    assert len(done) == len(batches) and all(s.failed for s in done)
    last = max(done, key=lambda s: s.partition_id)
    assert "set aside" in last.failed and last.server_failed and last.requests == 0
    # Batches opened after the server was set aside send nothing (one may have been opened, pipelined,
    # before the last failure).
    assert len(farm.request_log(0)) - before <= 3 * (MAX_BATCH_FAILURES + 1)


def test_an_exception_that_cannot_even_be_printed_still_ends_as_a_row(
    tmp_path: Path, farm: ImageFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("str() fails too")

    urls = _urls(farm, "x", 4)
    real_process = imaging.process_image
    raised: list[bool] = []

    def process(data: bytes, settings: imaging.ImageSettings, *args: object) -> imaging.ProcessedImage:
        if not raised:
            raised.append(True)
            raise Unprintable
        return real_process(data, settings, *args)  # type: ignore[arg-type]  # (budget, original_md5)

    monkeypatch.setattr(lane_module.imaging, "process_image", process)
    lane, paths = _lane(tmp_path, farm, {0: urls})
    done: list[list[BatchStats]] = []
    runner = threading.Thread(target=lambda: done.append(_run(lane, [0])), daemon=True)
    runner.start()
    runner.join(30)  # the lane used to wait for this answer forever
    assert done, "the lane never finished its batch"
    (stats,) = done[0]
    assert stats.processed == len(urls) and stats.error_codes == {int(ErrorCode.INTERNAL): 1}


@pytest.mark.parametrize("code", [int(ErrorCode.ROBOTS_DISALLOWED), 403])
def test_an_error_row_that_cannot_be_written_fails_its_batch_not_the_lane(
    tmp_path: Path, farm: ImageFarm, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A robots.txt refusal and a held 403 (a ban suspect) write their rows outside a fetch: same rule."""
    real_append = BatchParts.append_error

    def append_error(self: BatchParts, row: dict) -> None:
        if row["error_code"] == code:
            raise OSError(5, "Input/output error")
        real_append(self, row)

    monkeypatch.setattr(BatchParts, "append_error", append_error)
    real_allowed = robots_module.RobotsRules.allowed
    monkeypatch.setattr(
        robots_module.RobotsRules, "allowed", lambda self, url: "/no/" not in url and real_allowed(self, url)
    )
    bad = farm.url(0, "/no/a.jpg") if code != 403 else farm.url(0, "/status/403")
    lane, paths = _lane(tmp_path, farm, {0: [bad, *_urls(farm, "y", 4)], 1: _urls(farm, "z", 4)})
    stats = {s.partition_id: s for s in _run(lane, [0, 1])}
    assert "Input/output error" in stats[0].failed
    assert not stats[1].failed and stats[1].successes == 4
    assert not (paths.batch_images(lane.spec.server_name, 0) / MARKER_FILE).exists()
