"""Monthly snapshots through a real Lane against a real loopback farm (no workflow around it).

Snapshot 1 is one batch downloaded by a Lane (so the stored validators are the farm's). Snapshot 2
is planned against it with every reused row revalidated: the Lane sends conditional GETs, a 304
makes the stored copy the row, a changed image is downloaded again, a removed one is an error row;
then with no revalidation at all, only the new URLs are requested.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_downloader import config as config_mod
from distributed_downloader.demo.testserver import ImageFarm
from distributed_downloader.engine.lane import Lane, LaneSpec
from distributed_downloader.plan import partition, snapshot
from distributed_downloader.report.verify import verify_batch
from tests.e2e.helpers import lane_test_config, read_all, write_batch_urls

pytestmark = pytest.mark.e2e
OLD = 8  # URLs of snapshot 1, all kept in snapshot 2
NEW = 2


def _lane(config: dict, paths: config_mod.Paths, server: str) -> Lane:
    spec = LaneSpec(server, 0, 1, start_rate=100.0, max_rate=100.0, max_connections=2, decrease=0.3)
    return Lane(spec, config, paths, round_no=1)


def _snapshot2(folder: Path, previous: Path, farm: ImageFarm, urls: list[str], **params: object) -> tuple:
    config = lane_test_config(folder)
    config["previous_dataset"] = [str(previous)]
    config["snapshot_parameters"].update(params)
    paths = config_mod.paths(config)
    table = pa.table(
        {
            "uuid": [f"new-{i}" for i in range(len(urls))],
            "source_id": [f"rec-{i}" for i in range(len(urls))],
            "identifier": urls,
            "license": ["cc-by"] * len(urls),
            "source": ["farm"] * len(urls),
            "title": ["t"] * len(urls),
            "server_name": [farm.base_urls[0].split("//", 1)[1]] * len(urls),
            "_reject": [""] * len(urls),
        }
    )
    result = partition.write_partitions(iter(table.to_batches()), paths.urls, paths.rejected_table, 100)
    snapshot.plan(config, paths, result.manifest)
    return config, paths, result.manifest


def test_conditional_gets_confirm_replace_or_drop_and_reuse_sends_nothing(tmp_path: Path) -> None:
    with ImageFarm(1, seed=11) as farm:
        server = farm.base_urls[0].split("//", 1)[1]
        urls = [farm.url(0, f"/img/r{i}.jpg?w=40&h=30") for i in range(OLD + NEW)]
        config1 = lane_test_config(tmp_path / "s1")
        paths1 = config_mod.paths(config1)
        write_batch_urls(paths1.batch_urls(server, 0), urls[:OLD])
        lane = _lane(config1, paths1, server)
        try:
            lane.run_batch(0, "f" * 32, "full")
        finally:
            lane.close()
        before = {r["identifier"]: r for r in read_all(paths1.images, "successes.parquet")}
        assert len(before) == OLD and all(r["etag"] and r["last_modified"] for r in before.values())

        # Every reused row revalidated: one changed on the server, one removed.
        config, paths, manifest = _snapshot2(tmp_path / "all", paths1.output, farm, urls, revalidate_older_than=0)
        farm.change_image(urls[1])
        farm.remove_image(urls[2])
        farm.reset_stats()
        lane = _lane(config, paths, server)
        try:
            stats = lane.run_batch(0, manifest["servers"][server]["fingerprints"][0], "full")
        finally:
            lane.close()
        log = {entry.path: entry.status for entry in farm.request_log(0)}
        assert len(farm.request_log(0)) == OLD + NEW  # one request per URL: conditional for the old ones
        want = {urls[1]: 200, urls[2]: 404, **{u: 200 for u in urls[OLD:]}}
        assert {farm.base_urls[0] + p: s for p, s in log.items()} == {u: want.get(u, 304) for u in urls}
        assert stats.statuses[304] == OLD - 2
        rows = {r["identifier"]: r for r in read_all(paths.images, "successes.parquet")}
        for url in urls[:OLD]:
            if url == urls[2]:
                assert url not in rows
            elif url == urls[1]:
                assert rows[url]["hashsum_original"] != before[url]["hashsum_original"]
                assert rows[url]["etag"] != before[url]["etag"]
            else:  # confirmed: the stored bytes, this run's ids
                assert rows[url]["image"] == before[url]["image"] and rows[url]["uuid"].startswith("new-")
        errors = read_all(paths.images, "errors.parquet")
        assert [(e["identifier"], e["error_code"]) for e in errors] == [(urls[2], 404)]
        fingerprint = manifest["servers"][server]["fingerprints"][0]
        assert verify_batch(paths, server, 0, fingerprint)["problems"] == []

        # No revalidation: the old URLs are copied, only the new ones are asked for.
        config, paths, manifest = _snapshot2(tmp_path / "none", paths1.output, farm, urls, revalidate_fraction=0.0)
        farm.reset_stats()
        lane = _lane(config, paths, server)
        try:
            stats = lane.run_batch(0, manifest["servers"][server]["fingerprints"][0], "full")
        finally:
            lane.close()
        assert sorted(farm.base_urls[0] + e.path for e in farm.request_log(0)) == sorted(urls[OLD:])
        assert stats.successes == OLD + NEW and stats.requests == NEW
        folder = paths.batch_images(server, 0)
        reused = pq.read_table(folder / "successes-reuse.parquet").to_pylist()
        assert {r["identifier"]: r["image"] for r in reused} == {u: before[u]["image"] for u in urls[:OLD]}
        assert verify_batch(paths, server, 0, manifest["servers"][server]["fingerprints"][0])["problems"] == []
