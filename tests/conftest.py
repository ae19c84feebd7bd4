"""Shared fixtures: a loopback image farm, and running the real workflow as a user would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake_cmd(config: Path, workdir: Path, *extra: str, profile: str = "local") -> list[str]:
    return [
        *SNAKEMAKE,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--profile",
        str(REPO / "profiles" / profile),
        "--configfile",
        str(config),
        *extra,
    ]


def run(cmd: list[str], timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def farm():
    from distributed_downloader.demo.testserver import ImageFarm

    with ImageFarm(3) as started:
        yield started


def _must_not_skip() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> None:
    """Skip where a component cannot exist here; under CI=true nothing skips."""
    if _must_not_skip():
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real Slurm cluster of 2 nodes on this machine (tests/slurm/cluster.sh), started by the tests.

    Reuses a cluster that is already up; stops only what it started.
    """
    import shutil

    script = REPO / "tests" / "slurm" / "cluster.sh"
    if os.geteuid() != 0:
        skip_or_fail("a Slurm test cluster needs root (apt packages, munge, slurmctld, slurmd)")
    if shutil.which("sinfo") is None and shutil.which("apt-get") is None:
        skip_or_fail("no Slurm and no apt-get to install it")
    already_up = subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0
    if not already_up:
        run(["bash", str(script), "install"], timeout=900)
    # A no-op when it is up as asked; a cluster someone brought up with 1 node (a bench wanting a fast
    # scontrol) is restarted with 2: reused as it was, the 2-node test's job waited forever.
    run(["bash", str(script), "up", "--nodes", "2"], timeout=300)
    yield script
    if not already_up:
        run(["bash", str(script), "down"], timeout=300, check=False)
