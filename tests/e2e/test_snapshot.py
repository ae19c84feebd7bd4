"""Monthly snapshots (issue #18) end to end: two runs of the real workflow against one loopback farm.

Snapshot 1 is downloaded. Snapshot 2 keeps most URLs (new uuids, some new source_ids and licenses),
drops some, adds some, moves one image to another host (same record, same path); between the runs
some images change on the server and some disappear. The second run must send the server only the
new URLs and the revalidation sample (the server's own request log says so), store byte-identical
copies for reused rows, replace exactly the changed images it revalidated, keep the old 404s without
asking, and verification must account for every row once.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from distributed_downloader import config as config_mod
from distributed_downloader import stages
from distributed_downloader.demo.testserver import ImageFarm
from distributed_downloader.plan import snapshot
from tests.conftest import run, snakemake_cmd

pytestmark = pytest.mark.e2e
PER_HOST = 36  # images per host in snapshot 1
HOSTS = 2


def _path(host: int, i: int) -> str:
    return f"/img/s-{host}-{i}.jpg?w=96&h=64"


def _write(folder: Path, rows: list[dict], previous: Path | None, **snapshot_parameters: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "urls.csv"
    lines = ["uuid,identifier,source_id,license,source,title"]
    lines += [f"{r['uuid']},{r['url']},{r['source_id']},{r['license']},farm,t" for r in rows]
    table.write_text("\n".join(lines) + "\n")
    config = {
        "path_to_input": str(table),
        "path_to_output": str(folder / "output"),
        "downloader_parameters": {
            "num_downloads": 1,
            "workers_per_node": 2,
            "batch_size": 10,
            "default_rate_limit": 40,
            "max_rate_limit": 100,
            "allow_private_addresses": True,
            "max_retries": 1,
            "timeout": {"connect": 5, "read": 5, "total": 20},
        },
    }
    if previous is not None:
        config["previous_dataset"] = str(previous)
        config["snapshot_parameters"] = snapshot_parameters
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _rows(output: Path, pattern: str, columns: list[str]) -> list[dict]:
    out = []
    for path in sorted(glob.glob(str(output / "downloaded_images" / "server_name=*" / "partition_id=*" / pattern))):
        out.extend(pq.read_table(path, columns=columns).to_pylist())
    return out


def _image_requests(farm: ImageFarm) -> list[tuple[int, str, int]]:
    return [
        (host, entry.path, entry.status)
        for host in range(HOSTS)
        for entry in farm.request_log(host)
        if entry.path != "/robots.txt"
    ]


def test_second_snapshot_requests_only_new_urls_and_the_sample(tmp_path: Path) -> None:
    with ImageFarm(HOSTS, seed=7) as farm:
        first = [
            {"uuid": f"a-{h}-{i}", "url": farm.url(h, _path(h, i)), "source_id": f"rec-{h}-{i}", "license": "cc0"}
            for h in range(HOSTS)
            for i in range(PER_HOST)
        ]
        first += [
            {"uuid": f"a-{h}-404", "url": farm.url(h, "/status/404"), "source_id": f"rec-{h}-404", "license": ""}
            for h in range(HOSTS)
        ]
        first.append(
            {"uuid": "a-mv", "url": farm.url(0, "/img/moved.jpg?w=96&h=64"), "source_id": "rec-mv", "license": ""}
        )
        config1 = _write(tmp_path / "s1", first, None)
        run(snakemake_cmd(config1, tmp_path / "s1"))
        out1 = tmp_path / "s1" / "output"
        before = {
            r["identifier"]: r
            for r in _rows(out1, "successes*.parquet", ["identifier", "image", "hashsum_original", "etag"])
        }
        assert len(before) == HOSTS * PER_HOST + 1
        assert all(r["etag"] for r in before.values())  # validators stored on every new success

        # Snapshot 2: i < 4 left the input, 4 new per host, new uuids; one record's image moved host.
        second = [
            {"uuid": f"b-{h}-{i}", "url": farm.url(h, _path(h, i)), "source_id": f"rec-{h}-{i}", "license": "by"}
            for h in range(HOSTS)
            for i in range(4, PER_HOST + 4)
        ]
        second += [
            {"uuid": f"b-{h}-404", "url": farm.url(h, "/status/404"), "source_id": f"rec-{h}-404", "license": ""}
            for h in range(HOSTS)
        ]
        second.append(
            {"uuid": "b-mv", "url": farm.url(1, "/img/moved.jpg?w=96&h=64"), "source_id": "rec-mv", "license": ""}
        )
        config2 = _write(tmp_path / "s2", second, out1, revalidate_fraction=0.25)
        # Which URLs the run will revalidate: the plan is a function of the URL lists, so initializing the
        # same input elsewhere (in this process) gives the same sample, before any image changes.
        scratch = {**config_mod.load(config2), "path_to_output": str(tmp_path / "scratch")}
        paths = config_mod.paths(scratch)
        stages.initialize(scratch, paths.urls_manifest)
        sample = set()
        for server, partition_id, plan_path in snapshot.iter_plans(paths):
            plan = pq.read_table(plan_path).to_pylist()
            urls = pq.read_table(paths.batch_urls(server, partition_id)).column("identifier").to_pylist()
            sample |= {urls[p["new_row"]] for p in plan if p["action"] == snapshot.REVALIDATE}
        summary = snapshot.read_summary(paths)
        salt = summary["salt"]
        # Matched rows are sampled whichever way they matched: the moved image (by source_id) too.
        matched = set(before) | {farm.url(1, "/img/moved.jpg?w=96&h=64")}
        assert sample == {r["url"] for r in second if r["url"] in matched and snapshot.in_sample(salt, r["url"], 0.25)}
        kept = [r["url"] for r in second if r["url"] in before and r["url"] not in sample]
        sample_list = sorted(sample & set(before))
        assert len(sample_list) >= 6 and len(kept) >= 6, (len(sample_list), len(kept))
        changed_seen, removed_seen = sample_list[:3], sample_list[3:4]  # revalidated: replaced / an error now
        changed_unseen = kept[:2]  # not in the sample: reused as they were (until sampled or too old)
        for url in changed_seen + changed_unseen:
            farm.change_image(url)
        for url in removed_seen:
            farm.remove_image(url)
        new_urls = {r["url"] for r in second if "/img/s-" in r["url"] and r["url"] not in before}
        assert len(new_urls) == 4 * HOSTS
        farm.reset_stats()

        run(snakemake_cmd(config2, tmp_path / "s2"))
        out2 = tmp_path / "s2" / "output"

        # At the server: exactly the new URLs and the sample, each once; nothing else (robots.txt aside).
        requested = _image_requests(farm)
        asked = [farm.base_urls[h] + p for h, p, _ in requested]
        assert sorted(asked) == sorted(new_urls | sample), (
            sorted(set(asked) - (new_urls | sample)),
            sorted((new_urls | sample) - set(asked)),
        )
        statuses = {farm.base_urls[h] + p: s for h, p, s in requested}
        with open(out2 / "servers_profiles.csv") as handle:  # profiling's probe: a plain GET, kept as the row
            probes = {row["probe_url"] for row in csv.DictReader(handle) if row["probe_url"]}
        for url in sample:
            want = 200 if url in changed_seen else 404 if url in removed_seen else 304
            assert statuses[url] == want or (url in probes and statuses[url] == 200), (url, statuses[url])

        # The dataset: every row once, verified.
        verification = json.loads((out2 / "reports" / "verification.json").read_text())
        assert verification["ok"], verification["problems"]
        assert verification["totals"]["urls"] == len(second)
        now = {
            r["uuid"]: r
            for r in _rows(
                out2,
                "successes*.parquet",
                ["uuid", "source_id", "identifier", "license", "image", "hashsum_original", "hashsum_resized"],
            )
        }
        errors = {r["uuid"]: r for r in _rows(out2, "errors.parquet", ["uuid", "error_code", "error_msg"])}
        assert not set(now) & set(errors) and len(now) + len(errors) == len(second)
        by_url = {r["url"]: r for r in second}
        for row in now.values():
            want = by_url[row["identifier"]]
            assert (row["uuid"], row["source_id"]) == (want["uuid"], want["source_id"])  # from the new input
            assert row["license"] == (want["license"] or "Not provided")
            url = row["identifier"]
            if url in new_urls or url in changed_seen:  # downloaded now: the server's current bytes
                assert row["hashsum_original"] == hashlib.md5(farm.expected_bytes(url)).hexdigest()
            if url in changed_seen:
                assert row["hashsum_original"] != before[url]["hashsum_original"]
            elif url in before:  # reused (or confirmed by a 304): byte-identical to snapshot 1
                assert (
                    row["image"] == before[url]["image"] and row["hashsum_original"] == before[url]["hashsum_original"]
                )
        moved = now["b-mv"]
        assert moved["image"] == before[farm.url(0, "/img/moved.jpg?w=96&h=64")]["image"]  # by source_id, no request
        assert errors["b-0-404"]["error_code"] == 404 and errors["b-1-404"]["error_code"] == 404  # kept, not asked
        assert all(errors[f"b-{h}-404"] for h in range(HOSTS))
        assert [errors[by_url[u]["uuid"]]["error_code"] for u in removed_seen] == [404]

        # The change report.
        report = json.loads((out2 / "reports" / "snapshot_changes.json").read_text())
        totals = report["totals"]
        assert totals["new"] == len(new_urls)
        assert totals["revalidated"] == len(sample)
        assert totals["changed"] == len(changed_seen) and totals["revalidation_failed"] == len(removed_seen)
        assert totals["unchanged"] == len(sample) - len(changed_seen) - len(removed_seen)
        assert totals["not_modified"] == sum(1 for u in sample if statuses[u] == 304)
        moved_reused = int(farm.url(1, "/img/moved.jpg?w=96&h=64") not in sample)  # else revalidated (a 304)
        assert totals["reused"] == len(kept) + moved_reused and totals["reused_by_source_id"] == moved_reused
        assert totals["errors_kept"] == HOSTS and totals["gone"] == 4 * HOSTS
        assert totals["requests"] == len(requested) - len(probes)  # the probes are profiling's, not a round's
        assert not list((out2 / "downloaded_images").glob("*/*/.reuse"))  # staged copies removed
        print(
            f"snapshot 2: {len(requested)} image requests for {len(new_urls)} new + {len(sample)} revalidated;"
            f" report {totals}"
        )
