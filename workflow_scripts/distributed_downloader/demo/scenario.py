"""A self-contained demo: URLs over a loopback ImageFarm, with the outcome each should have.

Used by `distributed_downloader demo` (the README's first command) and the end-to-end tests.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from distributed_downloader.demo.testserver import ImageFarm

FORMATS = [
    ("jpg", ""),
    ("jpg", "progressive"),
    ("jpg", "cmyk"),
    ("jpg", "exif6"),
    ("png", ""),
    ("png", "rgba"),
    ("png", "i16"),
    ("png", "palette"),
    ("gif", "anim"),
    ("bmp", ""),
    ("tif", ""),
    ("webp", ""),
]


@dataclass(frozen=True)
class Expected:
    uuid: str
    identifier: str
    md5: str | None  # md5 of the bytes served, for a URL that must succeed
    error_code: int | None  # for a URL that must fail


def demo_rows(farm: ImageFarm, per_host: int = 40, faults: bool = True) -> list[Expected]:
    """Per host: images of every format and size, plus (with faults) a 404, a 500 and a truncated image."""
    rows: list[Expected] = []
    for host in range(len(farm.base_urls)):
        for i in range(per_host):
            ext, mode = FORMATS[i % len(FORMATS)]
            size = "w=1600&h=1200" if i % 5 == 0 else "w=640&h=480"
            query = f"?{size}" + (f"&mode={mode}" if mode else "")
            path = f"/img/h{host}-{i}.{ext}{query}"
            url = farm.url(host, path)
            rows.append(Expected(f"demo-{host}-{i}", url, hashlib.md5(farm.expected_bytes(path)).hexdigest(), None))
        if faults:
            rows.append(Expected(f"demo-{host}-404", farm.url(host, "/status/404"), None, 404))
            rows.append(Expected(f"demo-{host}-500", farm.url(host, "/status/500"), None, 500))
            rows.append(Expected(f"demo-{host}-trunc", farm.url(host, f"/truncated/h{host}-t.jpg"), None, -2))
    return rows


def write_input(rows: list[Expected], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uuid", "identifier", "source_id", "license", "source", "title"])
        for i, row in enumerate(rows):
            licensed = i % 3 != 0
            writer.writerow(
                [
                    row.uuid,
                    row.identifier,
                    f"src-{i // 2}",
                    "CC-BY-4.0" if licensed else "",
                    "demo farm" if licensed else "",
                    f"demo image {i}" if licensed else "",
                ]
            )
    return path


def write_config(folder: Path, input_path: Path, **downloader: object) -> Path:
    params = {
        "num_downloads": 2,
        "max_nodes": 1,
        "workers_per_node": 2,
        "batch_size": 25,
        "default_rate_limit": 20,
        "max_rate_limit": 100,
        "allow_private_addresses": True,  # the demo farm lives on loopback
        "max_retries": 1,
        "timeout": {"connect": 5, "read": 5, "total": 20},
        **downloader,
    }
    config = {
        "path_to_input": str(input_path),
        "path_to_output": str(folder / "output"),
        "downloader_parameters": params,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
