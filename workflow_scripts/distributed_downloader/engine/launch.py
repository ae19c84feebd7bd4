"""The MPI launch of the download and tool jobs: which launcher starts the ranks, and whether they met.

The worker runs under ``sys.executable``, whose mpi4py is linked against one MPI library (the
``mpich`` wheel, or a conda env's MPICH). Only that library's own launcher starts ranks that find each
other: another launcher (a system OpenMPI ``mpiexec``, as Slurm's Debian packages bring) starts N
singletons, each rank 0 of a world of 1, each its own coordinator over the same schedule. So

- a bare ``mpiexec``/``mpirun`` in the ``mpi`` resource means the launcher beside the interpreter when
  there is one (`resolve`): the venv's, even when the venv is not activated;
- at workflow start, a launcher that cannot be found stops the run before any work (`problem`);
- each rank compares COMM_WORLD's size with the number of tasks the job was launched for
  (``--tasks``, from the rule) and stops with a clear message on a mismatch (`world_size_problem`).
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

# Launchers that belong to the Python's own MPI: a bare name is resolved beside the interpreter.
OWN_LAUNCHERS = ("mpiexec", "mpirun", "mpiexec.hydra")


def beside_interpreter(name: str, interpreter: str | None = None) -> Path | None:
    """``name`` in the folder of the interpreter (not resolved: a venv's bin/), if it is executable there."""
    candidate = Path(interpreter or sys.executable).parent / name
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def resolve(command: str, interpreter: str | None = None) -> str:
    """The launcher command with a bare ``mpiexec``/``mpirun`` made the one beside the interpreter.

    Anything else (``srun --mpi=pmi2 ...``, an absolute path, a launcher the interpreter's folder
    lacks) is returned as given.
    """
    words = shlex.split(command)
    if words and words[0] in OWN_LAUNCHERS and (own := beside_interpreter(words[0], interpreter)) is not None:
        return shlex.join([str(own), *words[1:]])
    return command


def literal(raw: object) -> str | None:
    """A resource's raw value as Snakemake reads it: a string, or a quoted Python string literal.

    None for anything computed (an expression of wildcards, input...): only the job can evaluate it.
    """
    if not isinstance(raw, str):
        return None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    return value if isinstance(value, str) else None


def problem(command: str, rule: str, interpreter: str | None = None) -> str | None:
    """Why ``command`` cannot launch the ranks of ``rule`` on this machine, or None when it can."""
    words = shlex.split(resolve(command, interpreter))
    if not words:
        return f"rule {rule}: the MPI launcher (resources.mpi) is empty"
    program = words[0]
    found = (os.path.isfile(program) and os.access(program, os.X_OK)) if "/" in program else shutil.which(program)
    if found:
        return None
    python = interpreter or sys.executable
    hint = (
        f"the mpich wheel (a dependency of this package) puts its mpiexec beside the Python that runs "
        f"Snakemake ({Path(python).parent}); install the package into that environment (pip install -e . "
        f"or pip install .), or set the launcher, e.g. --set-resources {rule}:mpi='srun --mpi=pmi2' on Slurm"
    )
    return f"rule {rule}: MPI launcher '{program}' not found (resources.mpi = {command!r}); {hint}"


def world_size_problem(expected: int | None, size: int, rank: int, program: str) -> str | None:
    """A message when COMM_WORLD does not have the ``expected`` ranks (None when it does, or unknown)."""
    if expected is None or expected == size:
        return None
    own = beside_interpreter("mpiexec")
    launcher = f"the mpiexec beside this Python ({own})" if own else "the launcher of mpi4py's own MPI library"
    singleton = (
        f" each of the {expected} processes is a singleton (rank {rank} of 1), so each would run the whole job"
        if size == 1
        else ""
    )
    return (
        f"{program}: launched for {expected} MPI tasks, but COMM_WORLD has {size} rank(s):{singleton}. The MPI "
        "launcher does not match the MPI library mpi4py uses (e.g. a system OpenMPI mpiexec over the mpich "
        f"wheel). Start the job with {launcher}, or on Slurm with srun --mpi=pmi2."
    )


def parse_worker_args(program: str, done_name: str, argv: list[str] | None = None) -> argparse.Namespace:
    """``PROGRAM [--tasks N] SCHEDULE.json DONE``: the arguments of an MPI job's entry script."""
    parser = argparse.ArgumentParser(prog=program)
    parser.add_argument("--tasks", type=int, default=None, help="MPI tasks the job was launched for (checked)")
    parser.add_argument("schedule", type=Path, metavar="SCHEDULE.json")
    parser.add_argument("done", type=Path, metavar=done_name)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.tasks is not None and args.tasks < 1:
        parser.error("--tasks must be at least 1")
    return args


def join_world(program: str, done_name: str, argv: list[str] | None = None) -> tuple[argparse.Namespace, Any]:
    """An MPI job's start: its arguments (`parse_worker_args`) and ``MPI.COMM_WORLD``, or None for the
    communicator when the world is not the size the job was launched for (rank 0 has printed why)."""
    args = parse_worker_args(program, done_name, argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if mismatch := world_size_problem(args.tasks, size, rank, program):
        if rank == 0:
            print(mismatch, file=sys.stderr, flush=True)
        return args, None
    return args, comm
