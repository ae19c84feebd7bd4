"""Ending a download round that has nothing to do, without MPI and without the worker's imports.

A round after a clean one usually has nothing left to retry. Starting MPI ranks for it cost
seconds, and so did importing the worker (requests, Pillow, the snapshot planner's pandas and
DuckDB: ~2.5 s here), paid between two rounds on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

from distributed_downloader.store.files import atomic_write_json


def finish_if_empty(schedule_path: Path, done_path: Path) -> bool:
    """Write the round's done file when its schedule has no batch left; False when there is work."""
    schedule = json.loads(schedule_path.read_text())
    if schedule.get("servers"):
        # Batches are listed: a resumed round may have finished them all already (markers on disk).
        from distributed_downloader import config as config_mod
        from distributed_downloader.engine.worker import remaining_work

        if remaining_work(schedule, config_mod.paths(schedule["config"]))["servers"]:
            return False
    atomic_write_json(done_path, {"round": schedule["round"], "ranks": 0, "progress": {}})
    print(f"[download] round {schedule['round']}: nothing to do", flush=True)
    return True
