"""Where a job process's log records go: a rule's log file (and stderr), or an MPI rank's own file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"


def log_to(path: str | Path | None, level: str, *, mode: str = "a", stderr: bool = False) -> None:
    """Send the root logger's records of ``level`` and up to ``path`` (its folder made; None: no file) and,
    with ``stderr``, to stderr too. Replaces earlier handlers: a job process configures its logging once."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)] if stderr else []
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode=mode))
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)
