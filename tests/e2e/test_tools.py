"""Tools on a real downloaded dataset: the workflow on the local profile, MPI ranks, a loopback farm.

One dataset is downloaded per module (duplicates under /alias/ URLs and a cache-buster, small and large
images of several formats); each test works on its own copy of it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from distributed_downloader.demo import scenario as demo
from distributed_downloader.demo.testserver import ImageFarm
from distributed_downloader.imaging.process import decode_stored_image
from distributed_downloader.store.files import SUCCESS_SCHEMA
from tests.conftest import kill_group, run, snakemake_cmd

pytestmark = pytest.mark.e2e

SIZES = [(900, 600), (150, 400), (300, 240), (100, 80), (640, 480), (260, 700)]  # (w, h)
EXTS = ["jpg", "png", "webp", "gif", "jpg", "bmp"]
PER_HOST = 24
THRESHOLD = 200
NEW_SIZE = 160
SUCCESS_COLUMNS = SUCCESS_SCHEMA.names


def _image_path(host: int, i: int, prefix: str = "img", extra: str = "") -> str:
    w, h = SIZES[(i // 2) % len(SIZES)]
    return f"/{prefix}/h{host}-{i}.{EXTS[i % len(EXTS)]}?w={w}&h={h}{extra}"


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The whole download pipeline once: 90 URLs on 3 hosts, 18 of them duplicate content."""
    base = tmp_path_factory.mktemp("tools-dataset")
    with ImageFarm(3) as farm:
        rows = []
        for host in range(3):
            for i in range(PER_HOST):
                path = _image_path(host, i)
                rows.append(demo.Expected(f"t-{host}-{i:02d}", farm.url(host, path), _md5(farm, path), None))
        duplicates = {}
        for host in (1, 2):
            for i in range(0, PER_HOST, 3):  # the bytes of host 0's image i under another URL and server
                path = _image_path(0, i, prefix="alias")
                rows.append(demo.Expected(f"alias-{host}-{i:02d}", farm.url(host, path), _md5(farm, path), None))
                duplicates[rows[-1].uuid] = f"t-0-{i:02d}"
        for i in (1, 4):  # same server, same bytes, a cache buster in the URL
            path = _image_path(0, i, extra="&cb=1")
            rows.append(demo.Expected(f"cb-0-{i:02d}", farm.url(0, path), _md5(farm, path), None))
            duplicates[rows[-1].uuid] = f"t-0-{i:02d}"
        config = demo.write_config(
            base, demo.write_input(rows, base / "urls.csv"), num_downloads=1, batch_size=5, image_size=400
        )
        started = time.monotonic()
        run(snakemake_cmd(config, base))
        wall = time.monotonic() - started
    images = base / "output" / "downloaded_images"
    print(f"\ntools dataset: {len(rows)} URLs downloaded in {wall:.1f}s")
    return {
        "base": base,
        "rows": rows,
        "duplicates": duplicates,
        "md5": {r.uuid: r.md5 for r in rows},
        "images": images,
    }


def _md5(farm: ImageFarm, path: str) -> str:
    return hashlib.md5(farm.expected_bytes(path)).hexdigest()


def prepare(tmp_path: Path, downloaded: dict, tools: list[str] | None = None, **tools_parameters: object) -> Path:
    """A copy of the downloaded run (its config pointing at the copy), with these tool settings."""
    work = tmp_path / "run"
    shutil.copytree(downloaded["base"], work, ignore=shutil.ignore_patterns(".snakemake"))
    config_path = work / "config.yaml"
    raw = yaml.safe_load(config_path.read_text())
    raw["path_to_input"] = str(work / "urls.csv")
    raw["path_to_output"] = str(work / "output")
    raw["tools_parameters"] = {"threshold_size": THRESHOLD, "new_resize_size": NEW_SIZE, **tools_parameters}
    if tools is not None:
        raw["tools"] = tools
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config_path


def dataset(output: Path) -> dict[str, dict]:
    """uuid -> row with server_name, partition_id; the schema must be exactly the successes schema."""
    rows: dict[str, dict] = {}
    for path in sorted(
        glob.glob(str(output / "downloaded_images" / "server_name=*" / "partition_id=*" / "successes*.parquet"))
    ):
        table = pq.read_table(path)
        assert table.schema.names == SUCCESS_COLUMNS
        server = Path(path).parent.parent.name.split("=", 1)[1]
        partition = int(Path(path).parent.name.split("=", 1)[1])
        for row in table.to_pylist():
            assert row["uuid"] not in rows, f"{row['uuid']} twice in the dataset"
            rows[row["uuid"]] = {**row, "server_name": server, "partition_id": partition}
    return rows


def removed(output: Path, tool: str) -> list[dict]:
    rows = []
    for path in sorted((output / "tools" / tool / "removed").glob("server_name=*/partition_id=*/*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def done(output: Path, tool: str) -> dict:
    return json.loads((output / "tools" / tool / "_done.json").read_text())


def target_cmd(config: Path, workdir: Path, target: str, *extra: str) -> list[str]:
    """snakemake_cmd for one target (put first: --configfile would swallow a target after it)."""
    cmd = snakemake_cmd(config, workdir, *extra)
    return [*cmd[:3], target, *cmd[3:]]


def timed(cmd: list[str], **kwargs) -> float:
    started = time.monotonic()
    run(cmd, **kwargs)
    return time.monotonic() - started


def test_size_based_then_duplication_based(tmp_path: Path, downloaded: dict) -> None:
    """config tools: [size_based, duplication_based] runs both, in order, on the dataset each leaves."""
    config = prepare(tmp_path, downloaded, tools=["size_based", "duplication_based"])
    output = tmp_path / "run" / "output"
    before = dataset(output)
    assert set(before) == {r.uuid for r in downloaded["rows"]}  # every URL downloaded
    assert all(before[u]["hashsum_original"] == downloaded["md5"][u] for u in before)
    wall = timed(snakemake_cmd(config, tmp_path / "run"))

    # size_based: exactly the rows whose shorter original side is below the threshold, reported.
    small = {u for u, r in before.items() if min(r["original_size"]) < THRESHOLD}
    assert len(small) == 32
    size_report = removed(output, "size_based")
    assert sorted(r["uuid"] for r in size_report) == sorted(small)
    assert all("< threshold_size 200" in r["reason"] for r in size_report)
    after_size = {u: r for u, r in before.items() if u not in small}

    # duplication_based (on what size_based left): one row per hashsum_original, the smallest
    # (server_name, partition_id, uuid) kept.
    final = dataset(output)
    assert all(min(r["original_size"]) >= THRESHOLD for r in final.values())
    counts = Counter(r["hashsum_original"] for r in final.values())
    assert max(counts.values()) == 1
    best: dict[str, tuple] = {}
    for r in after_size.values():
        key = (r["server_name"], r["partition_id"], r["uuid"])
        best[r["hashsum_original"]] = min(best.get(r["hashsum_original"], key), key)
    assert set(final) == {key[2] for key in best.values()}
    dup_report = removed(output, "duplication_based")
    expected_dups = {
        u for u, original in downloaded["duplicates"].items() if u in after_size and original in after_size
    }
    assert {r["uuid"] for r in dup_report} == set(after_size) - set(final) == expected_dups
    for r in dup_report:
        assert r["reason"] == (
            f"duplicate of uuid {downloaded['duplicates'][r['uuid']]} "
            f"(server_name={before[downloaded['duplicates'][r['uuid']]]['server_name']}, "
            f"partition_id={before[downloaded['duplicates'][r['uuid']]]['partition_id']})"
        )
    # nothing lost: every row is kept once or reported once
    assert Counter(list(final) + [r["uuid"] for r in size_report + dup_report]) == Counter(list(before))
    assert done(output, "size_based")["rows_removed"] == len(small)
    assert done(output, "duplication_based")["rows_removed"] == len(expected_dups)
    print(
        f"\nsize_based removed {len(small)}, duplication_based removed {len(expected_dups)} of {len(before)} rows;"
        f" both tools in {wall:.1f}s"
    )
    plan = run(snakemake_cmd(config, tmp_path / "run", "-n"))
    assert "Nothing to be done" in plan.stdout + plan.stderr


def test_resize(tmp_path: Path, downloaded: dict) -> None:
    config = prepare(tmp_path, downloaded)
    output = tmp_path / "run" / "output"
    before = dataset(output)
    target = str(output / "tools" / "resize" / "_done.json")
    wall = timed(target_cmd(config, tmp_path / "run", target))
    after = dataset(output)
    assert set(after) == set(before)
    big = {u for u, r in before.items() if max(r["resized_size"]) > NEW_SIZE}
    assert len(big) == 74
    for uuid, row in after.items():
        assert max(row["resized_size"]) <= NEW_SIZE
        assert row["hashsum_resized"] == hashlib.md5(row["image"]).hexdigest()
        img = decode_stored_image(row["image"], row["resized_size"], "jpeg")
        assert [img.height, img.width] == row["resized_size"]
        if uuid not in big:
            assert row == before[uuid]
        assert row["hashsum_original"] == before[uuid]["hashsum_original"]
    summary = done(output, "resize")
    assert summary["rows_changed"] == len(big) and summary["rows_removed"] == 0 and summary["ranks"] == 2
    print(f"\nresize changed {len(big)} of {len(before)} rows in {wall:.1f}s")

    # --forcerun tool_run (the old --reset_runners): the run step again, but no partition twice.
    run(target_cmd(config, tmp_path / "run", target, "--forcerun", "tool_run"))
    assert dataset(output) == after and done(output, "resize")["rows_changed"] == len(big)
    # --forcerun tool_filter (the old --reset_filtering): the resized dataset has nothing left to resize.
    run(target_cmd(config, tmp_path / "run", target, "--forcerun", "tool_filter"))
    assert dataset(output) == after
    assert done(output, "resize")["filter_rows"] == 0 and done(output, "resize")["partitions"] == 0


def test_tools_on_raw_bgr_images(tmp_path: Path, farm: ImageFarm) -> None:
    """The original's format (uint8 BGR pixels): verification and resize, chained by config."""
    rows = [
        demo.Expected(f"raw-{i}", farm.url(i % 3, _image_path(i % 3, i)), _md5(farm, _image_path(i % 3, i)), None)
        for i in range(12)
    ]
    config = demo.write_config(
        tmp_path, demo.write_input(rows, tmp_path / "urls.csv"), num_downloads=1, image_format="raw_bgr"
    )
    raw = yaml.safe_load(config.read_text())
    raw["tools"] = ["image_verification", "resize"]
    raw["tools_parameters"] = {"new_resize_size": 100}
    config.write_text(yaml.safe_dump(raw))
    wall = timed(snakemake_cmd(config, tmp_path))
    output = tmp_path / "output"
    after = dataset(output)
    assert set(after) == {r.uuid for r in rows}
    assert done(output, "image_verification")["rows_removed"] == 0
    for row in after.values():
        h, w = row["resized_size"]
        assert max(h, w) <= 100 and len(row["image"]) == h * w * 3
        assert row["hashsum_resized"] == hashlib.md5(row["image"]).hexdigest()
    assert done(output, "resize")["rows_changed"] == sum(1 for r in after.values() if max(r["original_size"]) > 100)
    print(f"\nraw_bgr: download + image_verification + resize of {len(rows)} URLs in {wall:.1f}s")


def test_image_verification_through_the_classic_cli(tmp_path: Path, downloaded: dict) -> None:
    config = prepare(tmp_path, downloaded)
    output = tmp_path / "run" / "output"
    partitions = sorted(glob.glob(str(output / "downloaded_images" / "*" / "*" / "successes.parquet")))
    corrupted = set()
    for path, rows_to_break in ((partitions[0], (0, 2)), (partitions[7], (1,))):
        table = pq.read_table(path)
        rows = table.to_pylist()
        for i in rows_to_break:
            data = rows[i]["image"]
            rows[i]["image"] = data[: len(data) // 3] + b"\x00" * 64  # broken JPEG
            if i == 2:  # consistent hash: only decoding can tell
                rows[i]["hashsum_resized"] = hashlib.md5(rows[i]["image"]).hexdigest()
            corrupted.add(rows[i]["uuid"])
        pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    before = dataset(output)

    started = time.monotonic()
    result = run(
        [sys.executable, "-m", "distributed_downloader.front.tools_cli", str(config), "image_verification"],
        cwd=tmp_path,
    )
    wall = time.monotonic() - started
    assert "image_verification done" in result.stdout
    after = dataset(output)
    assert set(before) - set(after) == corrupted
    report = removed(output, "image_verification")
    assert {r["uuid"] for r in report} == corrupted and len(report) == len(corrupted)
    assert all(r["reason"].startswith("corrupt") for r in report)
    for row in after.values():
        decode_stored_image(row["image"], row["resized_size"], "jpeg")
    summary = done(output, "image_verification")
    assert summary["rows_seen"] == len(before) and summary["rows_removed"] == len(corrupted)
    print(f"\nimage_verification removed {len(corrupted)} corrupt of {len(before)} rows in {wall:.1f}s (CLI)")


CUSTOM_TOOLS = '''
import hashlib
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distributed_downloader.tools import (
    BatchResult, DefaultScheduler, FilterRegister, MPIRunnerTool, PythonFilterToolBase, RunnerRegister,
    SchedulerRegister,
)


def tagged(batch, mask, tag):
    titles = batch.column("title").to_pylist()
    titles = [t + tag if m else t for t, m in zip(titles, mask)]
    return batch.set_column(batch.schema.get_field_index("title"), "title", pa.array(titles, pa.string()))


@FilterRegister("tag_alias")
class AliasFilter(PythonFilterToolBase):
    columns = ("uuid", "identifier")

    def filter_partition(self, table, server_name, partition_id):
        return table.filter(pc.match_substring(table.column("identifier"), "/alias/")).select(["uuid"])


@SchedulerRegister("tag_alias")
class LastRankScheduler(DefaultScheduler):
    def assign(self, partitions, workers):
        return [workers - 1] * len(partitions)


@RunnerRegister("tag_alias")
class AliasTagger(MPIRunnerTool):
    def apply_batch(self, batch, part):
        mask = part.selected(batch)
        return BatchResult(kept=tagged(batch, mask, " [alias]"), changed=int(mask.sum()))


# slow_tag: filter and runner only (the scheduler defaults with allow_unregistered_tools).
@FilterRegister("slow_tag")
class Everything(PythonFilterToolBase):
    pass


@RunnerRegister("slow_tag")
class SlowTagger(MPIRunnerTool):
    """Not idempotent (appends to the title), and slow: a rerun must not apply it twice."""

    def apply_batch(self, batch, part):
        time.sleep(0.5)
        uuids = batch.column("uuid").to_pylist()
        drop = np.array([int(hashlib.md5(u.encode()).hexdigest(), 16) % 3 == 0 for u in uuids], dtype=bool)
        batch = tagged(batch, ~drop, " [slow]")
        return BatchResult(kept=batch.filter(pa.array(~drop)), removed=batch.filter(pa.array(drop)),
                           reasons="slow_tag drops a third", changed=int((~drop).sum()))
'''


def test_custom_tool_from_a_user_module(tmp_path: Path, downloaded: dict) -> None:
    module = tmp_path / "my_tools.py"
    module.write_text(CUSTOM_TOOLS)
    config = prepare(tmp_path, downloaded, tools_module=str(module))
    output = tmp_path / "run" / "output"
    before = dataset(output)
    wall = timed(target_cmd(config, tmp_path / "run", str(output / "tools" / "tag_alias" / "_done.json")))
    after = dataset(output)
    aliases = {u for u, r in before.items() if "/alias/" in r["identifier"]}
    assert len(aliases) == 16
    for uuid, row in after.items():
        assert row["title"] == before[uuid]["title"] + (" [alias]" if uuid in aliases else "")
    schedule = json.loads((output / "tools" / "tag_alias" / "schedule.json").read_text())
    assert {p["rank"] for p in schedule["partitions"]} == {1}  # the custom scheduler's choice
    assert done(output, "tag_alias")["rows_changed"] == 16
    print(f"\ncustom tool tag_alias changed {len(aliases)} rows in {wall:.1f}s")

    # A tool with parts missing is refused before any work without allow_unregistered_tools.
    result = run(
        target_cmd(config, tmp_path / "run", str(output / "tools" / "slow_tag" / "_done.json"), "-n"), check=False
    )
    assert result.returncode != 0 and "without a registered scheduler" in result.stdout + result.stderr


def _tool_workers(output: Path) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "tool_worker.py" in cmdline and str(output) in cmdline:
            found.append(proc.info["pid"])
    return found


def test_tool_killed_mid_run_and_rerun(tmp_path: Path, downloaded: dict) -> None:
    """SIGKILL of the whole workflow while the MPI run rewrites partitions; the rerun finishes it:
    every row is kept once (tagged exactly once) or reported once."""
    module = tmp_path / "my_tools.py"
    module.write_text(CUSTOM_TOOLS)
    config = prepare(tmp_path, downloaded, tools_module=str(module), allow_unregistered_tools=True)
    work = tmp_path / "run"
    output = work / "output"
    before = dataset(output)
    target = str(output / "tools" / "slow_tag" / "_done.json")
    markers = output / "tools" / "slow_tag" / "done"
    total = len(glob.glob(str(output / "downloaded_images" / "*" / "*" / "successes.parquet")))
    assert total == 20
    proc = subprocess.Popen(
        target_cmd(config, work, target),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        while len(list(markers.glob("*/*.json"))) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        kill_group(proc)
    at_kill = len(list(markers.glob("*/*.json")))
    assert not _tool_workers(output), "MPI ranks outlived the kill"
    assert 4 <= at_kill < total, f"kill landed at {at_kill}/{total} partitions"
    assert not Path(target).exists()

    run(snakemake_cmd(config, work, "--unlock"))
    started = time.monotonic()
    run(target_cmd(config, work, target))
    wall = time.monotonic() - started
    after = dataset(output)
    report = removed(output, "slow_tag")
    reported = [r["uuid"] for r in report]
    assert Counter(list(after) + reported) == Counter(list(before)), "a row lost or doubled"
    assert reported and all(r["reason"] == "slow_tag drops a third" for r in report)
    for uuid, row in after.items():
        assert row["title"] == before[uuid]["title"] + " [slow]", f"applied {row['title'].count('[slow]')} times"
    summary = done(output, "slow_tag")
    assert summary["partitions"] == total and summary["rows_removed"] == len(reported)
    assert not glob.glob(str(output / "downloaded_images" / "*" / "*" / ".*.tmp"))
    print(f"\nkilled slow_tag at {at_kill}/{total} partitions; rerun finished in {wall:.1f}s, {len(reported)} removed")


# --------------------------------------------------------------------------- export_webdataset (issue #19)


def test_export_webdataset(tmp_path: Path, downloaded: dict) -> None:
    """The real tool (2 MPI ranks) over the downloaded store: every success row in exactly one shard,
    every sample read back and decoded by the webdataset package, each image's MD5 the store's
    hashsum_resized, the index listing exactly the shards; the store itself untouched."""
    from tests.unit.test_export_webdataset import check_index, check_samples_match_store, read_shards

    config = prepare(tmp_path, downloaded, export_shard_max_samples=16)
    output = tmp_path / "run" / "output"
    before = dataset(output)
    target = str(output / "tools" / "export_webdataset" / "_done.json")
    wall = timed(target_cmd(config, tmp_path / "run", target))
    folder = output / "exports" / "webdataset"
    samples = read_shards(folder)
    check_samples_match_store(samples, before, "jpeg")
    index = check_index(folder)
    summary = done(output, "export_webdataset")
    assert summary["samples"] == len(before) == index["totals"]["samples"] and summary["ranks"] == 2
    assert {s["file"].split("-")[1] for s in index["shards"]} == {"0", "1"}  # one stream per rank
    assert all(s["samples"] <= 16 for s in index["shards"])
    assert dataset(output) == before
    print(f"\nexport_webdataset: {len(samples)} samples in {len(index['shards'])} shards in {wall:.1f}s")


SLOW_EXPORT = """
import time

from distributed_downloader.tools import DefaultScheduler, FilterRegister, RunnerRegister, SchedulerRegister
from distributed_downloader.tools.export.tool import WebDatasetExportFilter, WebDatasetExportRunner

FilterRegister("slow_export")(WebDatasetExportFilter)
SchedulerRegister("slow_export")(DefaultScheduler)


@RunnerRegister("slow_export")
class SlowExport(WebDatasetExportRunner):
    \"\"\"The real export, slowed after each shard so that a kill lands mid-export.\"\"\"

    def shard_committed(self, info):
        time.sleep(0.25)
"""


def _committed_shards(folder: Path) -> dict[str, int]:
    """Shard file -> mtime_ns of every shard the progress files list."""
    found = {}
    for path in (folder / "_progress").glob("rank-*.json"):
        progress = json.loads(path.read_text())
        for shard in progress["shards"]:
            found[shard["file"]] = (folder / shard["file"]).stat().st_mtime_ns
    return found


def test_export_webdataset_killed_and_resumed(tmp_path: Path, downloaded: dict) -> None:
    """SIGKILL of the whole workflow while the MPI ranks write shards; the same command resumes: every
    success row in exactly one shard, and the shards committed before the kill are not written again."""
    from tests.unit.test_export_webdataset import check_index, check_samples_match_store, read_shards

    module = tmp_path / "slow_export.py"
    module.write_text(SLOW_EXPORT)
    config = prepare(tmp_path, downloaded, tools_module=str(module), export_shard_max_samples=4)
    work = tmp_path / "run"
    output = work / "output"
    folder = output / "exports" / "webdataset"
    before = dataset(output)
    target = str(output / "tools" / "slow_export" / "_done.json")
    proc = subprocess.Popen(
        target_cmd(config, work, target), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if folder.is_dir() and len(_committed_shards(folder)) >= 4:
                break
            time.sleep(0.05)
    finally:
        kill_group(proc)
    at_kill = _committed_shards(folder)
    assert not _tool_workers(output), "MPI ranks outlived the kill"
    assert len(at_kill) >= 4, f"kill landed at {len(at_kill)} shards"
    assert not Path(target).exists() and not (folder / "shards.json").exists()

    run(snakemake_cmd(config, work, "--unlock"))
    wall = timed(target_cmd(config, work, target))
    samples = read_shards(folder)
    check_samples_match_store(samples, before, "jpeg")
    index = check_index(folder)
    total = len(index["shards"])
    assert len(at_kill) < total, f"the kill landed after the last of {total} shards"
    assert done(output, "slow_export")["samples"] == len(before)
    after = _committed_shards(folder)
    assert {name: after[name] for name in at_kill} == at_kill, "a shard committed before the kill was rewritten"
    print(f"\nexport killed after {len(at_kill)}/{total} shards; the rerun wrote the rest in {wall:.1f}s")
