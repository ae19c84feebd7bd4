"""The earlier datasets a monthly snapshot reuses (config ``previous_dataset``): found and checked.

A previous dataset is the output of an earlier run of this tool: its images folder holds
``server_name=S/partition_id=N/`` batch folders with ``successes*.parquet`` and ``errors.parquet``.
Each file's parquet footer is read here (row count, columns), so a file that cannot be read is left
out with a message before the match starts, instead of failing the match: its URLs are simply
downloaded again. Nothing here reads rows; the match (snapshot.py) reads only the columns it needs.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from distributed_downloader.store.batch_parts import success_files
from distributed_downloader.store.files import ERRORS_FILE
from distributed_downloader.store.jsonfiles import read_json

log = logging.getLogger(__name__)
DEFAULT_IMAGES_FOLDER = "downloaded_images"
MEMORY_FILE = Path("state") / "server_memory.json"  # what an earlier run learned of each server
LEARNED = ("rate", "level", "level_reading", "connection_cap")  # what carries over to a new run (pauses do not)
_BATCH_DIR = re.compile(r"^partition_id=(\d+)$")
SUCCESS_NEEDS = ("identifier", "source_id", "hashsum_original")  # columns the match cannot do without
ERROR_NEEDS = ("identifier", "error_code")


@dataclass(frozen=True)
class PreviousFile:
    """One success or error file of a previous dataset, as its footer describes it."""

    dataset: int  # index in previous_dataset (0: listed first, preferred)
    kind: str  # "success" | "error"
    path: Path
    server_name: str
    partition_id: int
    rows: int
    mtime: float  # epoch seconds: the age of rows written before checked_at existed
    columns: frozenset[str]


@dataclass
class PreviousDataset:
    index: int
    given: str  # as written in the config
    images: Path | None
    files: list[PreviousFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def successes(self) -> list[PreviousFile]:
        return [f for f in self.files if f.kind == "success"]

    @property
    def errors(self) -> list[PreviousFile]:
        return [f for f in self.files if f.kind == "error"]


def images_folder(given: Path, default_name: str) -> Path | None:
    """The images folder of an earlier output: the folder itself when it holds ``server_name=*``
    batches, else ``<output>/<images_folder>`` as that run's saved config (``.run/config.yaml``), this
    run's config or the default names it."""
    if _has_servers(given):
        return given
    names = []
    saved = given / ".run" / "config.yaml"
    try:
        structure = (yaml.safe_load(saved.read_text()) or {}).get("output_structure") or {}
        if isinstance(structure, dict) and isinstance(structure.get("images_folder"), str):
            names.append(structure["images_folder"])
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    names += [default_name, DEFAULT_IMAGES_FOLDER]
    for name in names:
        if _has_servers(given / name):
            return given / name
    return None


def _has_servers(folder: Path) -> bool:
    try:
        return any(entry.name.startswith("server_name=") and entry.is_dir() for entry in os.scandir(folder))
    except OSError:
        return False


def _batch_folders(images: Path) -> Iterable[tuple[str, int, Path]]:
    for server_entry in sorted(os.scandir(images), key=lambda e: e.name):
        if not server_entry.name.startswith("server_name=") or not server_entry.is_dir():
            continue
        server = server_entry.name[len("server_name=") :]
        for entry in sorted(os.scandir(server_entry.path), key=lambda e: e.name):
            match = _BATCH_DIR.match(entry.name)
            if match and entry.is_dir():
                yield server, int(match.group(1)), Path(entry.path)


def _footer(dataset: int, kind: str, path: Path, server: str, partition_id: int) -> PreviousFile | str:
    """The file's description, or why it cannot be used."""
    needs = SUCCESS_NEEDS if kind == "success" else ERROR_NEEDS
    try:
        handle = pq.ParquetFile(path)
        rows, columns = handle.metadata.num_rows, frozenset(handle.schema_arrow.names)
        handle.close()
        mtime = path.stat().st_mtime
    except (OSError, pa.ArrowException) as exc:
        return f"{path}: unreadable ({exc}); its URLs are downloaded again"
    missing = [name for name in needs if name not in columns]
    if missing:
        return f"{path}: no column {', '.join(missing)}; its URLs are downloaded again"
    return PreviousFile(dataset, kind, path, server, partition_id, rows, mtime, columns)


def load(index: int, given: str, default_images_name: str, own_images: Path) -> PreviousDataset:
    """One configured previous dataset: its files, or the problems that leave it (or parts of it) out."""
    root = Path(given).expanduser().absolute()
    found = images_folder(root, default_images_name)
    dataset = PreviousDataset(index, given, found)
    if found is None:
        why = "does not exist" if not root.exists() else "holds no server_name=*/partition_id=* batches"
        dataset.problems.append(f"previous dataset {given}: {why}; nothing is reused from it")
        return dataset
    if found.resolve() == own_images.resolve():
        dataset.problems.append(f"previous dataset {given} is this run's own output; nothing is reused from it")
        dataset.images = None
        return dataset
    jobs: list[tuple[str, Path, str, int]] = []
    for server, partition_id, folder in _batch_folders(found):
        for path in success_files(folder):
            jobs.append(("success", path, server, partition_id))
        if (folder / ERRORS_FILE).is_file():
            jobs.append(("error", folder / ERRORS_FILE, server, partition_id))
    # One file at a time: as fast here (~0.4 ms a footer), and 8 threads reading footers left glibc's
    # per-thread arenas holding 3.3 GB after 12,600 footers (140 MB read one by one).
    for job in jobs:
        result = _footer(index, *job)
        if isinstance(result, str):
            dataset.problems.append(result)
        elif result.rows:
            dataset.files.append(result)
    if not dataset.successes and not dataset.errors:
        dataset.problems.append(f"previous dataset {given}: no readable rows in {found}; nothing is reused from it")
    return dataset


def load_all(given: Sequence[str], default_images_name: str, own_images: Path) -> list[PreviousDataset]:
    datasets = [load(i, path, default_images_name, own_images) for i, path in enumerate(given)]
    for dataset in datasets:
        for problem in dataset.problems:
            log.warning("%s", problem)
    return datasets


def learned_limits(given: Sequence[str]) -> dict[str, dict]:
    """What the earlier runs (``previous_dataset``: outputs or their images folders) learned of each
    server's limits: rate, level and connection cap, the first listed run's first.

    A monthly snapshot talks to the same servers as last month: starting each from its learned
    level, not from ``default_rate_limit``, saves finding every hidden limit again with refusals.
    Pauses (Retry-After, bans) are not carried: they were about last month.
    """
    out: dict[str, dict] = {}
    for path in given:
        folder = Path(path).expanduser()  # as load() reads it: "~/runs/march" reused rows but lost the limits
        for candidate in (folder / MEMORY_FILE, folder.parent / MEMORY_FILE):
            memory = read_json(candidate)
            if isinstance(memory, dict):
                break
        else:
            continue
        for server, entry in memory.items():
            if server in out or not isinstance(entry, dict):
                continue
            learned = {
                key: entry[key]
                for key in LEARNED
                if isinstance(entry.get(key), (int, float))
                and not isinstance(entry.get(key), bool)
                and math.isfinite(entry[key])  # JSON's Infinity would start a lane at its ceiling
                and entry[key] > 0
            }
            if learned:
                out[server] = learned
    return out
