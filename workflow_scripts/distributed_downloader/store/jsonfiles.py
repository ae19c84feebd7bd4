"""Reading the small JSON files of a run (manifest, progress, markers, summaries) that may not be there yet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any:
    """The file's JSON value, or None when it is missing or unreadable (they are written by atomic rename,
    so a file that parses is whole; None means not written yet, or damaged)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
