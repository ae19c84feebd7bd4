"""The same workflow through profiles/slurm on a real Slurm cluster (2 nodes on this machine):
sbatch per stage, `srun --mpi=pmi2` over the mpi4py worker, sacct for job status."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from distributed_downloader.demo import scenario as demo
from distributed_downloader.demo.testserver import HostSpec, ImageFarm
from tests.conftest import kill_group, run, snakemake_cmd
from tests.e2e.helpers import check_dataset, completed_batches, ranks_of, slow_farm_config

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "1"]


def slurm_cmd(config: Path, workdir: Path, *extra: str) -> list[str]:
    return snakemake_cmd(config, workdir, *FAST_POLL, *extra, profile="slurm")


def _squeue_jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_slurm_two_nodes(tmp_path: Path, farm: ImageFarm, slurm_cluster: Path) -> None:
    """Download and one tool, each one srun step over 2 nodes x 2 ranks."""
    rows = demo.demo_rows(farm, per_host=30)
    config = demo.write_config(tmp_path, demo.write_input(rows, tmp_path / "urls.csv"), max_nodes=2, workers_per_node=2)
    settings = yaml.safe_load(config.read_text())
    settings["tools"] = ["size_based"]
    settings["tools_parameters"] = {"max_nodes": 2, "workers_per_node": 2, "threshold_size": 100}
    config.write_text(yaml.safe_dump(settings))
    started = time.monotonic()
    run(slurm_cmd(config, tmp_path), timeout=900)
    print(f"slurm e2e (2 nodes x 2 ranks): {time.monotonic() - started:.1f}s")
    output = tmp_path / "output"
    ranks = ranks_of(output)
    assert [r["size"] for r in ranks] == [4] * 4, ranks
    nodes = {r["node"] for r in ranks}
    assert nodes == {"node1", "node2"}, f"ranks should span both nodes, got {ranks}"
    print("rank placement:", [(r["rank"], r["node"]) for r in ranks])
    tool = json.loads((output / "tools" / "size_based" / "_done.json").read_text())
    assert tool["ranks"] == 4 and {p["node"] for p in tool["placement"]} == {"node1", "node2"}, tool["placement"]
    print("tool rank placement:", [(p["rank"], p["node"]) for p in tool["placement"]])
    # Every image in the demo is at least 480 px on its shorter side: size_based keeps them all.
    result = check_dataset(output, rows)
    assert result["successes"] == 90 and result["errors"] == 9


def test_slurm_kill_and_resume(tmp_path: Path, slurm_cluster: Path) -> None:
    """Kill Snakemake and scancel its jobs mid-download; the same command finishes the rest."""
    hosts = [HostSpec(f"h{i}", latency=0.02) for i in range(3)]
    with ImageFarm(hosts) as farm:
        rows, config = slow_farm_config(farm, tmp_path, rate=6)
        output = tmp_path / "output"
        proc = subprocess.Popen(
            slurm_cmd(config, tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        try:
            while completed_batches(output) < 3 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.2)
        finally:
            kill_group(proc)
            subprocess.run(["scancel", "--user", "root"], check=False)
        done_at_kill = completed_batches(output)
        assert 0 < done_at_kill < 18, done_at_kill
        for _ in range(100):  # the cancelled job's ranks are gone before we resume
            if not _squeue_jobs():
                break
            time.sleep(0.2)
        run(slurm_cmd(config, tmp_path, "--unlock"))
        run(slurm_cmd(config, tmp_path), timeout=900)
        check_dataset(output, rows)
        print(f"slurm kill at {done_at_kill}/18 batches; resumed and completed")


def _pids_on_node(node: str, output: Path) -> list[int]:
    """This run's ranks whose environment says they run on Slurm node `node`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ours = b"download_worker.py" in cmdline and str(output).encode() in cmdline
        if f"SLURMD_NODENAME={node}".encode() in environ and ours:
            pids.append(int(entry.name))
    return pids


def test_slurm_node_failure_mid_download(tmp_path: Path, slurm_cluster: Path) -> None:
    """node2 dies (its slurmd and our ranks on it) mid-download: the step fails cleanly, and the
    same command, once the node is back, finishes with nothing lost or duplicated."""
    import os
    import signal

    hosts = [HostSpec(f"h{i}", latency=0.02) for i in range(4)]
    with ImageFarm(hosts) as farm:
        rows, config = slow_farm_config(farm, tmp_path, rate=6, max_nodes=2, workers_per_node=2)
        output = tmp_path / "output"
        cmd = slurm_cmd(config, tmp_path, "--retries", "0")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        victims: list[int] = []
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                victims = _pids_on_node("node2", output)
                if victims and completed_batches(output) >= 2:
                    break
                time.sleep(0.2)
            assert victims, "no rank ever ran on node2"
            slurmd_pid = int(
                (Path(os.environ.get("SLURM_CI_DIR", "/tmp/slurm-ci")) / "run" / "slurmd-node2.pid").read_text()
            )
            for pid in [slurmd_pid, *victims]:
                os.kill(pid, signal.SIGKILL)
            killed_at = completed_batches(output)
            proc.wait(timeout=240)  # the step must end (kill-on-bad-exit), not hang
        finally:
            if proc.poll() is None:
                kill_group(proc)
        assert proc.returncode != 0, "the round should fail when a node dies mid-download"
        subprocess.run(["slurmd", "-N", "node2"], check=True)  # the node comes back
        for _ in range(150):
            idle = subprocess.run(
                ["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], capture_output=True, text=True
            ).stdout
            if "node2" in idle:
                break
            time.sleep(0.2)
        run(slurm_cmd(config, tmp_path), timeout=900)
        check_dataset(output, rows)
        print(f"node2 killed at {killed_at}/24 batches ({len(victims)} ranks); rerun completed")
