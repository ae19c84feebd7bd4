"""The MPI launch: each rank checks that COMM_WORLD has the ranks the job was launched for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distributed_downloader import launch
from tests.conftest import REPO

SCRIPTS = REPO / "workflow_scripts"
MPIEXEC = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's launcher, beside the venv's Python


def test_world_size_check() -> None:
    assert launch.world_size_problem(4, 4, 0, "w") is None
    assert launch.world_size_problem(None, 1, 0, "w") is None  # not told: nothing to compare
    singleton = launch.world_size_problem(4, 1, 0, "download_worker.py")
    assert singleton is not None
    assert "launched for 4 MPI tasks, but COMM_WORLD has 1 rank(s)" in singleton
    assert "singleton" in singleton and "mpiexec" in singleton
    fewer = launch.world_size_problem(4, 2, 0, "w")
    assert fewer is not None and "COMM_WORLD has 2 rank(s)" in fewer and "singleton" not in fewer


def test_worker_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    args = launch.parse_worker_args("w", "DONE", ["--tasks", "3", "s.json", "d"])
    assert (args.tasks, args.schedule, args.done) == (3, Path("s.json"), Path("d"))
    assert launch.parse_worker_args("w", "DONE", ["s.json", "d"]).tasks is None  # by hand: unchecked
    for bad in (["s.json"], ["--tasks", "0", "s.json", "d"], ["--tasks", "x", "s.json", "d"]):
        with pytest.raises(SystemExit) as info:
            launch.parse_worker_args("w", "DONE", bad)
        assert info.value.code == 2
    assert "usage: w [-h] [--tasks TASKS] SCHEDULE.json DONE" in capsys.readouterr().err


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("script", ["download_worker.py", "tool_worker.py"])
def test_singleton_ranks_stop_before_any_work(tmp_path: Path, script: str) -> None:
    """What a foreign launcher starts: a process alone in its world, though launched as one of 3."""
    schedule = tmp_path / "schedule.json"  # never read: the check comes first
    result = _run([sys.executable, str(SCRIPTS / script), "--tasks", "3", str(schedule), str(tmp_path / "done")])
    assert result.returncode == 2, result.stderr
    assert f"{script}: launched for 3 MPI tasks, but COMM_WORLD has 1 rank(s)" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


def test_a_world_of_the_wrong_size_stops_and_the_right_one_goes_on(tmp_path: Path) -> None:
    worker = str(SCRIPTS / "download_worker.py")
    schedule, done = str(tmp_path / "schedule.json"), str(tmp_path / "done")
    wrong = _run([str(MPIEXEC), "-n", "2", sys.executable, worker, "--tasks", "3", schedule, done])
    assert wrong.returncode != 0
    assert wrong.stderr.count("launched for 3 MPI tasks, but COMM_WORLD has 2 rank(s)") == 1  # rank 0 says it
    right = _run([str(MPIEXEC), "-n", "2", sys.executable, worker, "--tasks", "2", schedule, done])
    assert right.returncode != 0 and "COMM_WORLD has" not in right.stderr
    assert "schedule.json" in right.stderr  # past the check: the (missing) schedule is read
