"""The whole workflow on a REAL GBIF multimedia.txt (`initializer: gbif`), its two hosts moved to loopback.

The sample is shared/data/gbif-multimedia-sample.txt beside the repository (CI clones the repo with
shared/ next to it). Its two real hosts (iNaturalist's S3 bucket and static host) are rewritten to two
ImageFarm hosts; paths and query strings are kept, and the farm serves every `.jpeg/.jpg/.png` path
with deterministic bytes, so each success can be checked against the exact body served.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
import yaml

from distributed_downloader.demo.scenario import Expected
from distributed_downloader.demo.testserver import ImageFarm
from distributed_downloader.inputs import GBIF_UUID_NAMESPACE, NOT_PROVIDED
from tests.conftest import run, skip_or_fail, snakemake_cmd
from tests.e2e.helpers import check_dataset, read_all

pytestmark = pytest.mark.e2e

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "gbif-multimedia-sample.txt"
HOSTS = ("inaturalist-open-data.s3.amazonaws.com", "static.inaturalist.org")
ROWS_PER_HOST = (300, 100)  # a subset of the 4,776 rows that still covers both hosts


def subset_with_loopback_hosts(farm: ImageFarm, target: Path) -> list[dict]:
    """The first rows of each real host, in file order, `identifier` moved to the farm; the records."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    column = header.index("identifier")
    wanted = dict(zip(HOSTS, ROWS_PER_HOST, strict=True))
    taken = dict.fromkeys(HOSTS, 0)
    out, records = [lines[0]], []
    for line in lines[1:]:
        fields = line.split("\t")
        parts = urlsplit(fields[column])
        if parts.hostname not in wanted or taken[parts.hostname] >= wanted[parts.hostname]:
            continue
        taken[parts.hostname] += 1
        farm_host = HOSTS.index(parts.hostname)
        fields[column] = farm.url(farm_host, parts.path + (f"?{parts.query}" if parts.query else ""))
        out.append("\t".join(fields))
        records.append(
            {**dict(zip(header, fields, strict=True)), "_path": fields[column][len(farm.base_urls[farm_host]) :]}
        )
    assert taken == wanted, taken
    target.write_text("\n".join(out) + "\n", encoding="utf-8")
    return records


def test_gbif_sample_end_to_end(tmp_path: Path) -> None:
    if not SAMPLE.exists():
        skip_or_fail(f"the real GBIF sample is not at {SAMPLE}")
    with ImageFarm(2) as farm:
        records = subset_with_loopback_hosts(farm, tmp_path / "multimedia.txt")
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "path_to_input": str(tmp_path / "multimedia.txt"),
                    "path_to_output": str(tmp_path / "output"),
                    "initializer": "gbif",
                    "downloader_parameters": {
                        "num_downloads": 1,
                        "workers_per_node": 2,
                        "batch_size": 60,
                        "default_rate_limit": 40,
                        "max_rate_limit": 100,
                        "allow_private_addresses": True,  # the farm lives on loopback
                        "timeout": {"connect": 5, "read": 10, "total": 30},
                    },
                }
            )
        )
        run(snakemake_cmd(config, tmp_path))
        requests = [farm.stats(i).by_status.get(200, 0) for i in range(2)]

    output = tmp_path / "output"
    expected_uuid = {str(uuid.uuid5(GBIF_UUID_NAMESPACE, f"{r['gbifID']}\x1f{r['identifier']}")): r for r in records}
    assert len(expected_uuid) == len(records) == sum(ROWS_PER_HOST)
    # Exactly once, with the MD5 of the very bytes the farm served for that path and query.
    expected = [
        Expected(u, r["identifier"], hashlib.md5(farm.expected_bytes(r["_path"])).hexdigest(), None)
        for u, r in expected_uuid.items()
    ]
    result = check_dataset(output, expected)
    assert result["successes"] == len(records) and result["errors"] == 0
    assert requests[0] >= ROWS_PER_HOST[0] and requests[1] >= ROWS_PER_HOST[1]

    # Every stored row: source_id = gbifID, uuid = UUID5(gbifID, identifier), GBIF's licence/publisher/title.
    successes = read_all(output / "downloaded_images", "successes.parquet")
    for row in successes:
        record = expected_uuid[row["uuid"]]
        assert row["source_id"] == record["gbifID"]
        assert row["identifier"] == record["identifier"]
        assert uuid.UUID(row["uuid"]).version == 5
        assert row["license"] == (record["license"] or NOT_PROVIDED)
        assert row["source"] == (record["source"] or record["publisher"] or NOT_PROVIDED)
        assert row["title"] == (record["title"] or NOT_PROVIDED)
    assert {row["source_id"] for row in successes} == {r["gbifID"] for r in records}
    assert len({row["source_id"] for row in successes}) < len(successes)  # several images per occurrence

    manifest = json.loads((output / "servers_batched" / "_manifest.json").read_text())
    assert manifest["input_rows"] == len(records) and manifest["rejected_rows"] == 0
    assert len(manifest["servers"]) == 2
    assert pq.read_table(output / "rejected_rows.parquet").num_rows == 0
    verification = json.loads((output / "reports" / "verification.json").read_text())
    assert verification["ok"] and verification["totals"]["successes"] == len(records)
