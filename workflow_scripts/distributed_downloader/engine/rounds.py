"""Where the download rounds end: a round with nothing to do, and whether a round leaves any.

A round after a clean one usually has nothing left to retry. Its done file says so
(``leaves_work``, from ``worker.leaves_work``), and the workflow then goes on to verification
without the next rounds (``rules/download.smk`` is a checkpoint): each cost a Snakemake job for its
schedule and one for its download, on Slurm a queued allocation (1.4 s on this machine's local
profile). A round that runs with nothing to do (its done file predates ``leaves_work``, or a
resumed round finished every batch) ends without MPI and without the worker's imports (requests,
Pillow, the snapshot planner's pandas and DuckDB: ~2.5 s here).
"""

from __future__ import annotations

import json
from pathlib import Path

from distributed_downloader.store.files import atomic_write_json


def finish_if_empty(schedule_path: Path, done_path: Path) -> bool:
    """Write the round's done file when its schedule has no batch left; False when there is work."""
    schedule = json.loads(schedule_path.read_text())
    more = False
    if schedule.get("servers"):
        # Batches are listed: a resumed round may have finished them all already (markers on disk).
        from distributed_downloader import config as config_mod
        from distributed_downloader.engine.worker import leaves_work, remaining_work

        paths = config_mod.paths(schedule["config"])
        if remaining_work(schedule, paths)["servers"]:
            return False
        more = leaves_work(schedule, paths)
    atomic_write_json(done_path, {"round": schedule["round"], "ranks": 0, "progress": {}, "leaves_work": more})
    print(f"[download] round {schedule['round']}: nothing to do", flush=True)
    return True


def more_rounds(done_path: Path) -> bool:
    """Whether the workflow runs the round after this one (see the module docstring). A done file
    written before ``leaves_work`` existed, or unreadable, says yes: every round runs, as it did."""
    try:
        data = json.loads(Path(done_path).read_text())
    except (OSError, ValueError):
        return True
    return not isinstance(data, dict) or data.get("leaves_work") is not False
