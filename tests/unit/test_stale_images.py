"""Re-initializing moves aside the image partitions that no longer match a batch (stale_images.py).

The real initialize stage, run twice on different inputs, with image folders in between as the
download stage leaves them (files and a completion marker, or parts of a batch in progress).
"""

from __future__ import annotations

from pathlib import Path

from distributed_downloader import config as config_mod
from distributed_downloader import stages
from distributed_downloader.plan import partition
from distributed_downloader.plan.stale_images import STALE_DIR
from distributed_downloader.store.files import Marker, write_marker


def _config(tmp_path: Path, lines: list[str]) -> dict:
    source = tmp_path / "in.csv"
    source.write_text("uuid,identifier,source_id\n" + "\n".join(lines) + "\n")
    return config_mod.validate(
        {
            "path_to_input": str(source),
            "path_to_output": str(tmp_path / "out"),
            "downloader_parameters": {"batch_size": 2},
        }
    )


def _downloaded(paths: config_mod.Paths, server: str, partition_id: int, fingerprint: str) -> Path:
    folder = paths.batch_images(server, partition_id)
    folder.mkdir(parents=True)
    (folder / "successes.parquet").write_bytes(b"stand-in")
    write_marker(folder, Marker(fingerprint, 1, 1, 0, 0))
    return folder


def test_reinitializing_moves_aside_what_no_longer_matches_a_batch(tmp_path: Path) -> None:
    first = [f"a{i},http://a.org/{i}.jpg,s" for i in range(4)] + ["b0,http://b.org/0.jpg,s"]
    config = _config(tmp_path, first)
    paths = config_mod.paths(config)
    stages.initialize(config, paths.urls_manifest)
    manifest = partition.read_manifest(paths.urls)
    fa = manifest["servers"]["a.org"]["fingerprints"]
    kept = _downloaded(paths, "a.org", 0, fa[0])
    changed = _downloaded(paths, "a.org", 1, fa[1])
    vanished_server = _downloaded(paths, "b.org", 0, manifest["servers"]["b.org"]["fingerprints"][0])
    in_progress = paths.batch_images("a.org", 2)
    (in_progress / ".parts" / "x").mkdir(parents=True)  # a batch the new input still has, no marker yet

    # New input: a.org's batch 0 unchanged, batch 1 gets other URLs, a third batch appears; b.org is gone.
    second = first[:2] + ["a9,http://a.org/9.jpg,s", "a8,http://a.org/8.jpg,s", "a7,http://a.org/7.jpg,s"]
    summary = stages.initialize(_config(tmp_path, second), paths.urls_manifest)

    assert summary["stale_partitions_moved"] == 2
    assert kept.exists() and in_progress.exists()
    assert not changed.exists() and not vanished_server.exists() and not vanished_server.parent.exists()
    moved = sorted(p.relative_to(paths.output / STALE_DIR).as_posix() for p in (paths.output / STALE_DIR).glob("*/*/*"))
    assert [m.split("/", 1)[1] for m in moved] == [
        "server_name=a.org/partition_id=1",
        "server_name=b.org/partition_id=0",
    ]
    assert all((paths.output / STALE_DIR / m / "successes.parquet").exists() for m in moved)  # moved, not deleted


def test_a_first_initialization_moves_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path, ["a0,http://a.org/0.jpg,s"])
    summary = stages.initialize(config, config_mod.paths(config).urls_manifest)
    assert summary["stale_partitions_moved"] == 0
    assert not (config_mod.paths(config).output / STALE_DIR).exists()
