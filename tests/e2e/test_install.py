"""Installs as users have them: the venv's `snakemake` run without activating the venv (its `mpiexec`
is not on PATH), a launcher missing from the machine, and a wheel (`pip install .`, not -e)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from distributed_downloader import demo
from distributed_downloader.testserver import ImageFarm
from tests.conftest import REPO, run
from tests.e2e.helpers import check_dataset, ranks_of

pytestmark = pytest.mark.e2e
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin/, where the mpich wheel put mpiexec


def unactivated_env() -> dict[str, str]:
    """This environment as a shell without `. .venv/bin/activate` has it: no venv bin/ on PATH."""
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and Path(entry) != VENV_BIN
    )
    return env


def venv_snakemake(config: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        str(VENV_BIN / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--profile",
        str(REPO / "profiles" / "local"),
        "--configfile",
        str(config),
        *extra,
    ]


def test_venv_snakemake_without_activation_runs_the_mpi_job(tmp_path: Path) -> None:
    env = unactivated_env()
    assert not any((Path(entry) / "mpiexec").exists() for entry in env["PATH"].split(os.pathsep) if entry), (
        "an mpiexec on PATH outside the venv would hide what this test checks"
    )
    with ImageFarm(1) as farm:
        rows = demo.demo_rows(farm, per_host=6, faults=False)
        config = demo.write_config(tmp_path, demo.write_input(rows, tmp_path / "urls.csv"), num_downloads=1)
        run(venv_snakemake(config, tmp_path), timeout=400, env=env, cwd=tmp_path)
    output = tmp_path / "output"
    check_dataset(output, rows)
    ranks = ranks_of(output)
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["size"] for r in ranks} == {2}  # the ranks met


def test_a_missing_launcher_stops_the_workflow_before_any_work(tmp_path: Path) -> None:
    config = demo.write_config(tmp_path, demo.write_input([], tmp_path / "urls.csv"))
    result = run(
        venv_snakemake(config, tmp_path, "--set-resources", "download:mpi='no-such-mpiexec -v'"),
        timeout=200,
        check=False,
        env=unactivated_env(),
        cwd=tmp_path,
    )
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "rule download: MPI launcher 'no-such-mpiexec' not found" in message, message[-3000:]
    assert str(VENV_BIN) in message  # where the mpich wheel's launcher belongs
    assert not (tmp_path / "output").exists()  # stopped before initialization
