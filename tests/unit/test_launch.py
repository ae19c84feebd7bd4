"""The MPI launch: each rank checks that COMM_WORLD has the ranks the job was launched for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distributed_downloader.engine import launch
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


def test_a_bare_launcher_is_the_one_beside_the_interpreter(tmp_path: Path) -> None:
    python = tmp_path / "venv" / "bin" / "python"  # never run: only its folder matters
    python.parent.mkdir(parents=True)
    assert launch.resolve("mpiexec", str(python)) == "mpiexec"  # none there: as given (PATH decides)
    own = python.parent / "mpiexec"
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    assert launch.resolve("mpiexec", str(python)) == str(own)
    assert launch.resolve("mpiexec -genv A 'x y'", str(python)) == f"{own} -genv A 'x y'"
    for kept in ("srun --mpi=pmi2 --kill-on-bad-exit=1", "/opt/mpi/bin/mpiexec -n 2", "mpirun"):
        assert launch.resolve(kept, str(python)) == kept
    # The running interpreter's own launcher (the venv's mpich wheel): what the rules use.
    assert launch.resolve("mpiexec") == str(MPIEXEC) and launch.problem("mpiexec", "download") is None


def test_a_launcher_missing_from_the_machine_is_named(tmp_path: Path) -> None:
    python = str(tmp_path / "bin" / "python")
    message = launch.problem("no-such-mpiexec -v", "tool_run", python)
    assert message is not None
    assert message.startswith("rule tool_run: MPI launcher 'no-such-mpiexec' not found")
    assert str(tmp_path / "bin") in message and "--set-resources tool_run:mpi=" in message
    assert launch.problem(str(tmp_path / "absent" / "mpiexec"), "download", python) is not None
    assert launch.problem("", "download") == "rule download: the MPI launcher (resources.mpi) is empty"
    assert launch.problem("sh -c true", "download") is None  # on PATH


def test_resource_values_as_snakemake_reads_them() -> None:
    assert launch.literal("srun --mpi=pmi2") == "srun --mpi=pmi2"  # a profile's plain string
    assert launch.literal("'mpiexec -v'") == "mpiexec -v"  # --set-resources download:mpi="'mpiexec -v'"
    assert launch.literal("2") is None and launch.literal(None) is None
