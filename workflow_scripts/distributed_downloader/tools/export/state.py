"""What makes an export resumable: one progress file per stream, and the ``shards.json`` index.

A stream (the rows of one scheduled rank) writes its shards one after another, each committed as a
whole before the next starts, so its finished work is always a prefix: shards ``0..k-1`` covering
plan positions ``0..position-1``. ``_progress/rank-K.json`` records that prefix (file, samples, bytes,
SHA-256, the positions each shard covers, the rows it had to skip) under the plan's digest and the
tool's application id. It is rewritten (atomically) right after each shard's rename, so:

* a kill while a shard is being written leaves a temp file, removed by the rerun;
* a kill between the rename and the progress write leaves a shard the progress does not list: the
  rerun writes that shard again under the same name (the same rows, byte-identical), replacing it;
* a listed shard whose file is gone or has another size is written again, with every shard after it.

Every plan position is thus in exactly one listed shard or listed as skipped, whatever was killed
when. ``shards.json`` is written by rank 0 once every stream is complete, so its presence means the
export is whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distributed_downloader.store.files import atomic_write_json
from distributed_downloader.tools.dataset import read_json

PROGRESS_DIR = "_progress"
INDEX_FILE = "shards.json"
DETAIL_LIMIT = 100  # skipped rows listed one by one per shard; the count is always exact
SHARD_NAME = re.compile(r"^shard-(\d+)-(\d+)\.tar$")


def shard_name(stream: int, number: int) -> str:
    return f"shard-{stream}-{number:06d}.tar"


def progress_path(folder: Path, stream: int) -> Path:
    return folder / PROGRESS_DIR / f"rank-{stream}.json"


@dataclass
class Skips:
    """Rows of a stretch of the plan that could not become samples: an exact count, the first few in detail."""

    rows: int = 0
    details: list[dict] = field(default_factory=list)

    def add(self, rows: int, reason: str, **where: object) -> None:
        self.rows += rows
        if len(self.details) < DETAIL_LIMIT:
            self.details.append({**where, "rows": rows, "reason": reason})


@dataclass
class StreamProgress:
    """One stream's committed prefix (see the module doc)."""

    stream: int
    application: str
    plan: str
    total: int  # plan positions
    position: int = 0  # positions before it are in a listed shard or skipped
    shards: list[dict] = field(default_factory=list)
    tail_skipped: dict = field(default_factory=lambda: {"rows": 0, "details": []})  # after the last shard
    complete: bool = False
    excluded: dict[str, int] = field(default_factory=dict)  # rows the filters left out (not in the plan)
    unreadable: list[dict] = field(default_factory=list)  # files that could not be planned

    @classmethod
    def load(cls, path: Path) -> StreamProgress | None:
        data = read_json(path)
        if not isinstance(data, dict):
            return None
        try:
            return cls(**data)
        except TypeError:  # a progress file of another version: start over
            return None

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    def add_shard(self, info: dict, start: int, end: int, skipped: Skips) -> None:
        self.shards.append({**info, "start": start, "end": end, "skipped": asdict(skipped)})
        self.position = end

    def finish(self, skipped: Skips) -> None:
        self.tail_skipped = asdict(skipped)
        self.position = self.total
        self.complete = True

    def truncate(self, keep: int) -> None:
        """Keep the first ``keep`` shards only: the rest of the stream is to be written again."""
        self.shards = self.shards[:keep]
        self.position = self.shards[-1]["end"] if self.shards else 0
        self.tail_skipped = {"rows": 0, "details": []}
        self.complete = False

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    @property
    def skipped_rows(self) -> int:
        return sum(s["skipped"]["rows"] for s in self.shards) + self.tail_skipped["rows"]

    def skipped_details(self) -> list[dict]:
        return [d for s in self.shards for d in s["skipped"]["details"]] + list(self.tail_skipped["details"])

    def accounted(self) -> bool:
        """Every position up to ``position`` is a sample of a listed shard or a skipped row."""
        return self.samples + self.skipped_rows == self.position


def valid_prefix(progress: StreamProgress, folder: Path) -> int:
    """How many listed shards are on disk as listed (name and size); the first that is not ends it."""
    for index, shard in enumerate(progress.shards):
        try:
            if (folder / shard["file"]).stat().st_size != shard["bytes"]:
                return index
        except OSError:
            return index
    return len(progress.shards)


def stream_shards(folder: Path, stream: int) -> dict[int, Path]:
    """The shard files of a stream on disk, by number."""
    found = {}
    if folder.is_dir():
        for path in folder.glob(f"shard-{stream}-*.tar"):
            match = SHARD_NAME.match(path.name)
            if match and int(match.group(1)) == stream:
                found[int(match.group(2))] = path
    return found


def index_entries(progresses: Iterable[StreamProgress]) -> list[dict]:
    """The index's shard list: every stream's shards, by (stream, number)."""
    entries = []
    for progress in sorted(progresses, key=lambda p: p.stream):
        for shard in progress.shards:
            entries.append({k: shard[k] for k in ("file", "samples", "bytes", "sha256")})
    return entries
