"""The whole workflow on the local profile against a loopback image farm, with real MPI ranks."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from distributed_downloader import config as config_mod
from distributed_downloader.demo import scenario as demo
from distributed_downloader.demo.testserver import HostSpec, ImageFarm
from tests.conftest import kill_group, run, snakemake_cmd
from tests.e2e.helpers import check_dataset, completed_batches, ranks_of, slow_farm_config

pytestmark = pytest.mark.e2e


def test_pipeline_end_to_end(tmp_path: Path, farm: ImageFarm) -> None:
    rows = demo.demo_rows(farm, per_host=30)
    config = demo.write_config(tmp_path, demo.write_input(rows, tmp_path / "urls.csv"), workers_per_node=3)
    started = time.monotonic()
    run(snakemake_cmd(config, tmp_path))
    wall = time.monotonic() - started
    output = tmp_path / "output"

    ranks = ranks_of(output)
    assert ranks[0]["size"] == 3 and sorted(r["rank"] for r in ranks) == [0, 1, 2], ranks
    assert len({r["pid"] for r in ranks}) == 3  # three processes, not singletons

    result = check_dataset(output, rows)
    assert result["successes"] == 90 and result["errors"] == 9
    # The 500s are transient: retried within round 1 and again in round 2.
    retried = [r for r in result["error_rows"] if r["error_code"] == 500]
    assert retried and all(r["retry_count"] >= 2 for r in retried)
    verification = json.loads((output / "reports" / "verification.json").read_text())
    assert verification["ok"] and verification["totals"]["urls"] == len(rows)
    # Every request carried our User-Agent.
    user_agent = config_mod.load(config)["downloader_parameters"]["user_agent"]
    assert all(farm.stats(i).user_agents == {user_agent} for i in range(3))
    print(
        f"e2e: {len(rows)} URLs on 3 hosts in {wall:.1f}s: {result['successes']} successes, {result['errors']} errors"
    )

    # Nothing left: the plan is empty, and a rerun does no work.
    plan = run(snakemake_cmd(config, tmp_path, "-n"))
    assert "Nothing to be done" in plan.stdout + plan.stderr
    requests_before = sum(farm.stats(i).requests for i in range(3))
    run(snakemake_cmd(config, tmp_path))
    assert sum(farm.stats(i).requests for i in range(3)) == requests_before


def test_a_round_that_leaves_nothing_to_retry_is_the_last(tmp_path: Path, farm: ImageFarm) -> None:
    """No URL to try again after round 1 (a 404 is final): rounds 2 and 3 are neither scheduled nor
    started (rules/download.smk is a checkpoint), verification follows round 1, and a rerun of the
    same command has nothing to do."""
    rows = demo.demo_rows(farm, per_host=6, faults=False)
    rows.append(demo.Expected("gone", farm.url(0, "/status/404"), None, 404))
    config = demo.write_config(tmp_path, demo.write_input(rows, tmp_path / "urls.csv"), num_downloads=3)
    log = run(snakemake_cmd(config, tmp_path))
    output = tmp_path / "output"
    assert sorted(p.name for p in (output / "state").glob("download_round_*.done")) == ["download_round_1.done"]
    assert json.loads((output / "state" / "download_round_1.done").read_text())["leaves_work"] is False
    assert not (output / "schedules" / "round_2.json").exists()
    assert "Updating checkpoint dependencies" in log.stdout + log.stderr
    result = check_dataset(output, rows)
    assert result["successes"] == 18 and result["errors"] == 1
    assert json.loads((output / "reports" / "verification.json").read_text())["ok"]
    plan = run(snakemake_cmd(config, tmp_path, "-n"))
    assert "Nothing to be done" in plan.stdout + plan.stderr


def test_kill_and_resume(tmp_path: Path) -> None:
    """kill -9 of the whole workflow mid-download; the same command finishes with nothing lost or doubled."""
    hosts = [HostSpec(f"h{i}", latency=0.02) for i in range(3)]
    with ImageFarm(hosts) as farm:
        rows, config = slow_farm_config(farm, tmp_path, rate=8)
        output = tmp_path / "output"
        proc = subprocess.Popen(
            snakemake_cmd(config, tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        try:
            while completed_batches(output) < 6 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            time.sleep(0.6)  # land mid-batch: about half of each lane's next batch is fetched
        finally:
            kill_group(proc)
        done_at_kill = completed_batches(output)
        total_batches = 18
        assert 0 < done_at_kill < total_batches, f"kill landed at {done_at_kill} batches"
        requests_at_kill = sum(farm.stats(i).requests for i in range(3))

        # The plan now holds only what is left: no initialization or profiling again.
        plan = run(snakemake_cmd(config, tmp_path, "-n", "--unlock"))
        plan = run(snakemake_cmd(config, tmp_path, "-n"))
        text = plan.stdout + plan.stderr
        assert "download" in text and "rule initialize" not in text and "rule profile_servers" not in text, text[-3000:]

        run(snakemake_cmd(config, tmp_path))
        check_dataset(output, rows)
        requests_after = sum(farm.stats(i).requests for i in range(3))
        # Re-downloads are bounded by the batches that were in flight at the kill (<= one per lane).
        profile_requests = 6  # robots.txt and one probe per server
        redownloaded = requests_after - profile_requests - len(rows)
        in_flight_bound = 3 * 10  # one lane per server (its rate is below one lane's) x batch_size
        print(
            f"kill at {done_at_kill}/{total_batches} batches, {requests_at_kill} requests; re-downloaded {redownloaded}"
        )
        assert 0 <= redownloaded <= in_flight_bound
