"""Shared fixtures: a loopback image farm, and running the real workflow as a user would."""

from __future__ import annotations

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
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--profile", str(REPO / "profiles" / profile),
        "--configfile", str(config),
        *extra,
    ]


def run(cmd: list[str], timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture
def farm():
    from distributed_downloader.testserver import ImageFarm

    with ImageFarm(3) as started:
        yield started
