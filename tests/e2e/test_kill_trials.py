"""Fault injection: kill the workflow at random moments (the whole Snakemake process group, or
one MPI rank), resume with the same command each time, and check the invariants after every kill:
nothing lost, nothing duplicated, every batch complete or absent, re-downloads bounded."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distributed_downloader.demo import scenario as demo
from distributed_downloader.demo.testserver import HostSpec, ImageFarm
from distributed_downloader.plan import partition
from distributed_downloader.store.batch_parts import read_success_column
from distributed_downloader.store.files import read_marker
from tests.conftest import kill_group, run, snakemake_cmd
from tests.e2e.helpers import check_dataset

pytestmark = pytest.mark.e2e
TRIALS = 4
BATCH_SIZE = 60  # ~6 s of a host's budget at 10 req/s: longer than a checkpoint, so parts matter
RATE = 10.0
CHECKPOINT_SECONDS = 1.0


def _worker_pids(output: Path) -> list[int]:
    """This run's ranks (never another workflow's on the same machine)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # the rank itself: python .../download_worker.py (not the shell or mpiexec around it)
            if (
                len(argv) > 1
                and b"python" in Path(argv[0].decode()).name.encode()
                and argv[1].endswith(b"download_worker.py")
                and any(str(output).encode() in arg for arg in argv[2:])  # its schedule lies under output
            ):
                pids.append(int(entry.name))
    return pids


def check_batches(output: Path) -> int:
    """Every batch folder with a marker has both files, readable and matching the marker's counts."""
    complete = 0
    for folder in (output / "downloaded_images").glob("server_name=*/partition_id=*"):
        marker = read_marker(folder)
        if marker is None:
            continue
        successes = len(read_success_column(folder, "uuid"))
        errors = pq.read_table(folder / "errors.parquet", columns=["uuid"]).num_rows
        assert (successes, errors) == (marker.successes, marker.errors), folder
        complete += 1
    return complete


def test_random_kills_then_resume(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    hosts = [HostSpec(f"h{i}", latency=0.01, fault_rate=0.03) for i in range(3)]
    with ImageFarm(hosts) as farm:
        rows = demo.demo_rows(farm, per_host=150, faults=False)
        config = demo.write_config(
            tmp_path,
            demo.write_input(rows, tmp_path / "urls.csv"),
            batch_size=BATCH_SIZE,
            default_rate_limit=RATE,
            max_rate_limit=RATE,
            checkpoint_seconds=CHECKPOINT_SECONDS,
            num_downloads=3,  # a one-off 500 or a timeout on a loaded machine still gets its retries
            timeout={"connect": 5, "read": 15, "total": 30},
        )
        output = tmp_path / "output"
        kinds = []
        starts: list[float] = []  # monotonic start of each attempt: re-downloads in attempt k+1 are kill k's
        for trial in range(TRIALS):
            starts.append(time.monotonic())
            run(snakemake_cmd(config, tmp_path, "--unlock"))
            proc = subprocess.Popen(
                snakemake_cmd(config, tmp_path),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            kind = "rank" if trial % 2 else "workflow"
            # Wait for the MPI job, then kill at a random moment of the download itself.
            deadline = time.monotonic() + 60
            while not _worker_pids(output) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            delay = rng.uniform(1.0, 5.0)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            if kind == "rank" and (workers := _worker_pids(output)):
                os.kill(rng.choice(workers), signal.SIGKILL)  # one rank dies; mpiexec ends the job
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    kill_group(proc)
            else:
                kind = "workflow"
                kill_group(proc)
                # Ranks the launcher leaves behind must stop by themselves, not download on.
                deadline = time.monotonic() + 10
                while _worker_pids(output) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert not _worker_pids(output), "orphaned ranks kept running after the workflow was killed"
            complete = check_batches(output)
            # A committed batch stays committed: no kill undoes or damages one (check_batches reads each).
            assert complete >= max((k[2] for k in kinds), default=0), (kinds, complete)
            kinds.append((kind, round(delay, 1), complete))
        run(snakemake_cmd(config, tmp_path, "--unlock"))
        starts.append(time.monotonic())
        run(snakemake_cmd(config, tmp_path))
        check_dataset_with_faults(output, rows)
        manifest = partition.read_manifest(output / "servers_batched")
        assert check_batches(output) == sum(len(s["fingerprints"]) for s in manifest["servers"].values()) == 9
        per_kill = redownloads_per_kill([farm.request_log(i) for i in range(3)], starts)
        ordered = sorted(per_kill)
        print(
            f"kill trials: {kinds}; images downloaded again per kill: {per_kill} "
            f"(median {ordered[len(ordered) // 2]}, max {ordered[-1]}; a batch is {BATCH_SIZE} URLs)"
        )
        # Each of the 3 lanes loses at most the rows since its last part (CHECKPOINT_SECONDS at RATE)
        # plus what it had in flight, and profiling may probe each server again after a kill.
        bound = 3 * (CHECKPOINT_SECONDS * RATE + 4) + 3
        assert max(per_kill) <= bound, per_kill


def redownloads_per_kill(logs: list[list], starts: list[float]) -> list[int]:
    """Per kill, the images served again after it: 200s for a path that had a 200 before that attempt."""
    per_kill = [0] * (len(starts) - 1)
    for log in logs:
        served: set[str] = set()
        for entry in sorted(log, key=lambda e: e.start):
            if entry.status != 200 or "/img/" not in entry.path:
                continue
            if entry.path in served:
                attempt = max(i for i, t in enumerate(starts) if t <= entry.start)
                per_kill[max(0, attempt - 1)] += 1
            served.add(entry.path)
    return per_kill


def check_dataset_with_faults(output: Path, rows: list) -> None:
    """Transient 500s the farm injects may remain after the last round: count them as expected errors."""
    import glob

    errors = []
    for path in glob.glob(str(output / "downloaded_images" / "*" / "*" / "errors.parquet")):
        errors.extend(pq.read_table(path).to_pylist())
    failed = {e["uuid"] for e in errors if e["error_code"] == 500}
    expected = [demo.Expected(r.uuid, r.identifier, None, 500) if r.uuid in failed else r for r in rows]
    check_dataset(output, expected)
    assert len(failed) <= len(rows) * 0.01
