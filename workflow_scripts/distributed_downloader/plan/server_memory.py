"""Server memory: what the runs learned of each server's limits (rate, level, connection cap, pauses).

Rank 0 keeps it while a round runs and writes it to ``<output>/state/server_memory.json``; the
next round, a resumed run and the next monthly snapshot (``previous_dataset``) start from it.
Levels are the whole server's requests per second (a lane's level divided by its share).
"""

from __future__ import annotations

import math
from pathlib import Path

from distributed_downloader.plan import previous
from distributed_downloader.store.jsonfiles import read_json

MEMORY_FILE = "server_memory.json"


def read_memory(path: Path, previous_outputs: list[str] | None = None) -> dict[str, dict]:
    """The servers' memory of earlier rounds and attempts ({} when there is none or it is unreadable),
    completed with what earlier runs (a monthly snapshot's ``previous_dataset``) learned of servers
    this run has not met yet."""
    data = read_json(path)
    memory = {str(server): _usable(entry) for server, entry in (data if isinstance(data, dict) else {}).items()}
    for server, learned in previous.learned_limits(previous_outputs or []).items():
        memory.setdefault(server, _usable(learned))
    return memory


def _usable(entry: object) -> dict:
    """The entry's figures that can be used: finite numbers, above 0 (a pause at 0 or later).

    An edited or damaged file must not end the job: a non-dict entry failed the coordinator, a
    NaN or infinite connection cap or a string failed the lane's controller (and with it the rank),
    and an infinite rate or level started the lane at its ceiling, above what the server showed.
    """
    if not isinstance(entry, dict):
        return {}
    return {
        key: float(value) if key != "connection_cap" else int(value)
        for key in ("rate", "level", "level_reading", "connection_cap", "paused_until")
        if isinstance(value := entry.get(key), (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 if key != "paused_until" else value >= 0)
    }


def known_rate(entry: object) -> float | None:
    """The requests/s a server was seen to accept (its level), if the memory holds one."""
    if not isinstance(entry, dict):
        return None
    level = entry.get("level")
    if isinstance(level, (int, float)) and not isinstance(level, bool) and level > 0:
        return float(level)
    return None
