"""After a re-initialization: move aside the image partitions that no longer match a batch.

``--forcerun initialize`` (or a new input) can drop servers or batches, or give a batch another URL
list. Their old image folders would stay in the dataset and the tools would read them. Each
``server_name=S/partition_id=N`` folder that has no batch in the new manifest, or whose completion
marker belongs to another URL list (fingerprint), is moved whole under
``<output>/stale_images/<UTC time>/`` (moved, not deleted: a user may want them back) and reported.
A folder of a batch in progress for the same URL list (parts, no marker yet) is kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from distributed_downloader.store.files import read_marker

STALE_DIR = "stale_images"


def _value(name: str, prefix: str) -> str | None:
    return name[len(prefix) :] if name.startswith(prefix) else None


def stale_partitions(manifest: Mapping, images: Path) -> list[tuple[Path, str]]:
    """(folder, why) of every image partition that does not belong to the manifest's batches."""
    found: list[tuple[Path, str]] = []
    if not images.is_dir():
        return found
    servers = manifest["servers"]
    for server_dir in sorted(images.iterdir()):
        server = _value(server_dir.name, "server_name=")
        if server is None or not server_dir.is_dir():
            continue
        fingerprints = servers.get(server, {}).get("fingerprints", [])
        for folder in sorted(server_dir.iterdir()):
            value = _value(folder.name, "partition_id=")
            if value is None or not value.isdigit() or not folder.is_dir():
                continue
            partition_id = int(value)
            if server not in servers:
                found.append((folder, "its server is no longer in the input"))
            elif partition_id >= len(fingerprints):
                found.append((folder, f"the server has {len(fingerprints)} batches now"))
            else:
                marker = read_marker(folder)
                if marker is not None and marker.fingerprint != fingerprints[partition_id]:
                    found.append((folder, "the batch has another URL list now"))
    return found


def move_aside(manifest: Mapping, images: Path, output: Path) -> list[dict]:
    """Move every stale partition under ``output/stale_images/<time>/``; what moved, and why."""
    moved: list[dict] = []
    stale = stale_partitions(manifest, images)
    if not stale:
        return moved
    target_root = output / STALE_DIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for folder, why in stale:
        target = target_root / folder.parent.name / folder.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, target)  # same filesystem: one rename, the folder is either here or there
        moved.append({"from": str(folder), "to": str(target), "reason": why})
    for server_dir in {folder.parent for folder, _ in stale}:
        if server_dir.is_dir() and not any(server_dir.iterdir()):
            server_dir.rmdir()
    return moved
