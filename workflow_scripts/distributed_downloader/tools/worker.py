"""The MPI job of a tool's run step: ``mpiexec|srun -n N python tool_worker.py --tasks N SCHEDULE DONE``.

Every rank runs its share of the schedule (``runner.run_rank``: by default it rewrites the partitions
the schedule gave it; rank ``r`` of a run with ``size`` ranks takes the scheduled ranks ``k`` with
``k % size == r``), logs to ``logs/tools/<tool>/rank_K.log`` and prints its progress. The ranks meet
once at the end through a polled non-blocking barrier (MPICH's blocking waits spin a core); rank 0
then asks the runner for the summary (``runner.summarize``: by default it checks every scheduled
partition's marker) and writes it to ``_done.json``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import traceback

from distributed_downloader.engine import launch
from distributed_downloader.logs import log_to
from distributed_downloader.store.files import atomic_write_json
from distributed_downloader.tools import registry

POLL_SECONDS = 0.05
PROGRESS_SECONDS = 5.0

log = logging.getLogger("distributed_downloader.tools.worker")


def _wait_all(comm) -> None:  # noqa: ANN001 - mpi4py communicator
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    args, comm = launch.join_world("tool_worker.py", "DONE.json", argv)
    if comm is None:
        return 2
    schedule_path, done_path = args.schedule, args.done
    rank, size = comm.Get_rank(), comm.Get_size()
    # Where each rank ran (tells nodes apart under Slurm, where every fake node shares a hostname).
    placement = comm.gather({"rank": rank, "host": socket.gethostname(), "node": os.environ.get("SLURMD_NODENAME", "")})
    schedule = json.loads(schedule_path.read_text())
    config = schedule["config"]
    tool = schedule["tool"]
    classes = registry.resolve(tool, config)
    runner = classes.runner(config, tool)
    runner.rank, runner.size = rank, size
    log_to(runner.tool_paths.logs / f"rank_{rank}.log", config["downloader_parameters"]["logger_level"])
    mine = [p for p in schedule["partitions"] if int(p["rank"]) % size == rank]
    started = time.monotonic()
    last = [started]

    def progress(stats: dict, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - last[0] >= PROGRESS_SECONDS:
            last[0] = now
            print(f"[{tool} rank {rank}/{size}] {runner.progress_text(stats)} | {now - started:.0f}s", flush=True)

    log.info("rank %d/%d: %d partitions of %s (application %s)", rank, size, len(mine), tool, schedule["application"])
    try:
        stats = runner.run_rank(schedule, mine, progress)
    except BaseException:
        log.exception("rank %d failed", rank)
        traceback.print_exc()
        comm.Abort(1)
        raise
    progress(stats, force=True)
    _wait_all(comm)
    if rank != 0:
        return 1 if stats["failed"] else 0
    summary = runner.summarize(schedule)
    summary["ranks"] = size
    summary["placement"] = placement
    summary["seconds"] = round(time.monotonic() - started, 3)
    if not summary["ok"]:
        print(
            f"[{tool}] {len(summary['missing'])} partitions not done, e.g. {summary['missing'][:5]}; "
            "rerun to resume (see logs/tools/<tool>/rank_*.log)",
            file=sys.stderr,
        )
        return 1
    atomic_write_json(done_path, summary)
    print(f"[{tool}] done: {runner.done_text(summary)} in {summary['seconds']}s", flush=True)
    return 1 if stats["failed"] else 0
