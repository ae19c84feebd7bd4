"""The WebDataset export's parts without Snakemake or MPI: shard writer, samples, plan, streams, resume.

Stores are fabricated with the project's own writers (tests.unit.test_tools); shards are read back
with the ``webdataset`` package, the way a trainer reads them.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distributed_downloader import config as config_mod
from distributed_downloader.imaging.process import IMAGE_FORMATS
from distributed_downloader.store.files import SUCCESS_SCHEMA, atomic_write_table
from distributed_downloader.tools.dataset import Partition, list_partitions
from distributed_downloader.tools.export.plan import Unit, build_plan, survey
from distributed_downloader.tools.export.samples import (
    make_sample,
    metadata_json,
    raw_bgr_to_png,
    sample_key,
    stored_encoding,
)
from distributed_downloader.tools.export.settings import ExportSettings, export_folder
from distributed_downloader.tools.export.shard import ShardWriter, remove_temps
from distributed_downloader.tools.export.state import INDEX_FILE, StreamProgress, progress_path
from distributed_downloader.tools.export.stream import StreamJob, export_stream
from tests.unit.test_tools import make_config, success_row, write_partition

# --------------------------------------------------------------------------- helpers shared with the e2e tests


def read_shards(folder: Path, decode: bool = True) -> list[dict]:
    """Every sample of every ``shard-*.tar`` in ``folder``, read with the webdataset package.

    Each sample: ``key``, ``ext`` (the image member's), ``image`` (bytes), ``meta`` (the JSON member,
    parsed), ``shard``; with ``decode`` the image is also decoded by webdataset's own PIL decoder.
    """
    import webdataset as wds

    urls = [str(p) for p in sorted(folder.glob("shard-*.tar"))]
    if not urls:
        return []
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        exts = [k for k in sample if not k.startswith("__") and k != "json"]
        assert len(exts) == 1, f"{sample['__key__']}: members {sorted(sample)}"
        samples.append(
            {
                "key": sample["__key__"],
                "ext": exts[0],
                "image": sample[exts[0]],
                "meta": json.loads(sample["json"]),
                "shard": Path(sample["__url__"]).name,
            }
        )
    if decode:
        decoded = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
        count = 0
        for sample, plain in zip(decoded, samples, strict=True):
            image = sample[plain["ext"]]
            assert isinstance(image, Image.Image), f"{plain['key']} did not decode"
            h, w = plain["meta"]["resized_size"]
            assert image.size == (w, h)
            count += 1
        assert count == len(samples)
    return samples


def check_index(folder: Path) -> dict:
    """``shards.json`` lists exactly the shard files, with their real sizes and SHA-256."""
    index = json.loads((folder / INDEX_FILE).read_text())
    on_disk = sorted(p.name for p in folder.glob("shard-*.tar"))
    assert sorted(s["file"] for s in index["shards"]) == on_disk
    for shard in index["shards"]:
        data = (folder / shard["file"]).read_bytes()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
        with tarfile.open(folder / shard["file"]) as tar:
            assert len(tar.getnames()) == 2 * shard["samples"]
    assert not list(folder.glob(".*.tmp"))
    return index


def check_samples_match_store(samples: list[dict], store: dict[str, dict], image_format: str) -> None:
    """Every store row is in exactly one sample, with its bytes (its MD5) and its columns."""
    counts = Counter(s["meta"]["uuid"] for s in samples)
    assert counts == Counter(list(store)), "a row missing or exported twice"
    for sample in samples:
        row = store[sample["meta"]["uuid"]]
        assert sample["key"] == sample_key(row["uuid"])
        if image_format == "raw_bgr":
            assert sample["ext"] == "png"
            pixels = np.asarray(Image.open(io.BytesIO(sample["image"])).convert("RGB"))[:, :, ::-1]
            assert hashlib.md5(pixels.tobytes()).hexdigest() == row["hashsum_resized"]
        else:
            assert sample["ext"] == {"jpeg": "jpg", "png": "png", "webp": "webp"}[image_format]
            assert hashlib.md5(sample["image"]).hexdigest() == row["hashsum_resized"]
        expected = {k: v for k, v in row.items() if k != "image"}
        meta = dict(sample["meta"])
        if meta.get("checked_at") is not None:
            meta["checked_at"] = datetime.datetime.fromisoformat(meta["checked_at"])
        assert meta == expected


# --------------------------------------------------------------------------- fabricated stores


def read_store(config: dict) -> dict[str, dict]:
    """uuid -> row (with server_name, partition_id) over every success file of every partition."""
    paths = config_mod.paths(config)
    rows: dict[str, dict] = {}
    for part in list_partitions(paths.images):
        for unit in part.files(paths):
            path = paths.batch_images(part.server_name, part.partition_id) / unit.file
            for row in pq.read_table(path).to_pylist():
                assert row["uuid"] not in rows
                rows[row["uuid"]] = {**row, "server_name": part.server_name, "partition_id": part.partition_id}
    return rows


def build_store(config: dict, image_format: str = "jpeg", retry_file: bool = True) -> dict[str, dict]:
    """3 partitions on 2 servers, one with a retry round's ``successes-r2.parquet``; odd sizes and licenses."""
    specs = {
        ("a.org", 0): [(f"a0-{i}", 40 + 23 * i, 30 + 11 * i) for i in range(9)],
        ("a.org", 3): [(f"a3-{i}", 120, 20 + 9 * i) for i in range(5)],
        ("b.org", 1): [(f"b1-{i}", 25 + 7 * i, 90) for i in range(6)],
    }
    for (server, pid), items in specs.items():
        rows = [success_row(u, w, h, image_format) for u, w, h in items]
        for i, row in enumerate(rows):
            row["is_license_full"] = i % 3 != 0
        write_partition(config, server, pid, rows)
    if retry_file:
        folder = config_mod.paths(config).batch_images("a.org", 0)
        rows = [success_row(f"a0-retry-{i}", 60, 50 + i, image_format) for i in range(3)]
        rows[0]["checked_at"] = datetime.datetime(2026, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
        atomic_write_table(
            folder / "successes-r2.parquet", pa.Table.from_pylist(rows, schema=SUCCESS_SCHEMA), row_group_size=2
        )
    return read_store(config)


def units_of(config: dict) -> list[Unit]:
    paths = config_mod.paths(config)
    units = []
    for part in list_partitions(paths.images):
        for unit in part.files(paths):
            folder = paths.batch_images(part.server_name, part.partition_id)
            units.append(Unit(part.server_name, part.partition_id, folder / unit.file))
    return units


def job(config: dict, settings: ExportSettings, stream: int = 0, application: str = "app", **kw) -> StreamJob:
    return StreamJob(
        stream=stream,
        units=units_of(config),
        folder=export_folder(config_mod.paths(config)),
        application=application,
        settings=settings,
        image_format=config["downloader_parameters"]["image_format"],
        **kw,
    )


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.tar"))}


# --------------------------------------------------------------------------- shard writer


def test_shard_writer_is_atomic_hashed_and_deterministic(tmp_path: Path) -> None:
    members = [[(f"k{i}.jpg", bytes([i]) * (100 + 700 * i)), (f"k{i}.json", b'{"i":%d}' % i)] for i in range(5)]

    def write(name: str):
        writer = ShardWriter(tmp_path / name)
        for sample in members:
            writer.add(ShardWriter.encode(sample))
            assert not (tmp_path / name).exists()  # only the temp file while writing
        return writer.commit()

    info = write("a.tar")
    data = (tmp_path / "a.tar").read_bytes()
    assert info.file == "a.tar" and info.samples == 5
    assert info.bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    assert len(data) % 10240 == 0
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == [name for sample in members for name, _ in sample]
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in tar.getmembers())
        assert tar.extractfile("k3.jpg").read() == members[3][0][1]
    assert write("b.tar").sha256 == info.sha256  # same samples, same bytes
    assert not list(tmp_path.glob(".*.tmp"))

    aborted = ShardWriter(tmp_path / "c.tar")
    aborted.add(ShardWriter.encode(members[0]))
    aborted.abort()
    assert not list(tmp_path.glob("*c.tar*"))
    left = ShardWriter(tmp_path / "shard-0-000001.tar")  # a kill mid-write leaves this temp
    left.add(ShardWriter.encode(members[0]))
    assert remove_temps(tmp_path, "shard-0-*") == 1 and not list(tmp_path.glob(".*"))


def test_shard_writer_limits(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "x.tar")
    assert writer.fits(10**12, 1, 1)  # an empty shard takes any sample
    writer.add(ShardWriter.encode([("a.bin", b"x" * 4000)]))
    assert writer.bytes == 512 + 4096
    # closed, 4608 + 2000 bytes of members + 1024 end blocks round up to one 10240-byte record
    assert writer.fits(2000, 2, 10240) and not writer.fits(2000, 1, 10**9) and not writer.fits(2000, 2, 10239)
    assert not writer.fits(6000, 2, 10240) and writer.fits(6000, 2, 20480)
    writer.abort()


# --------------------------------------------------------------------------- samples


def test_sample_keys_are_safe_and_distinct() -> None:
    assert sample_key("t-0-01_AB") == "t-0-01_AB"
    unsafe = ["a.b", "a/b", "a%2Eb", "a b", "é", "", "x.tar"]
    keys = [sample_key(u) for u in unsafe]
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k and k for k in keys)
    assert sample_key("a.b") == "a%2Eb" and sample_key("é") == "%C3%A9"


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_samples_keep_the_stored_encoding(image_format: str) -> None:
    row = success_row("u-1", 90, 60, image_format)
    sample = make_sample(row, "a.org", 4, image_format)
    assert not isinstance(sample, str)
    if image_format == "raw_bgr":
        assert sample.ext == "png"
        decoded = Image.open(io.BytesIO(sample.image))
        assert decoded.format == "PNG" and decoded.size == (90, 60)
        assert np.asarray(decoded.convert("RGB"))[:, :, ::-1].tobytes() == row["image"]  # lossless
    else:
        assert sample.image is row["image"]  # byte for byte, no copy
        assert sample.ext == {"jpeg": "jpg", "png": "png", "webp": "webp"}[image_format]
    meta = json.loads(sample.meta)
    assert list(meta) == [k for k in row if k != "image"] + ["server_name", "partition_id"]
    assert meta["server_name"] == "a.org" and meta["partition_id"] == 4 and meta["resized_size"] == [60, 90]


def test_raw_buffers_that_look_like_jpeg_stay_raw() -> None:
    pink = bytes([0xFF, 0xD8, 0xFF]) * 4  # a 2x2 raw BGR buffer of pink pixels starts like a JPEG
    assert stored_encoding(pink, [2, 2], "raw_bgr") == "raw"
    assert stored_encoding(pink, [2, 2], "jpeg") == "jpg"
    assert stored_encoding(b"\x00" * 12, [2, 2], "jpeg") == "raw"  # no signature, the raw length
    assert stored_encoding(b"\x00" * 11, [2, 2], "raw_bgr") is None
    png = raw_bgr_to_png(pink, [2, 2])
    assert Image.open(io.BytesIO(png)).getpixel((1, 1)) == (0xFF, 0xD8, 0xFF)[::-1]


def test_bad_rows_are_reasons_not_crashes() -> None:
    row = success_row("u", 30, 30, "jpeg")
    assert "no image bytes" in make_sample({**row, "image": None}, "s", 0, "jpeg")
    assert "neither JPEG" in make_sample({**row, "image": b"<html>"}, "s", 0, "jpeg")
    assert "no uuid" in make_sample({**row, "uuid": None}, "s", 0, "jpeg")
    meta = json.loads(
        metadata_json({"uuid": "u", "checked_at": datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc)}, "s", 1)
    )
    assert meta == {"uuid": "u", "checked_at": "2026-01-02T00:00:00+00:00", "server_name": "s", "partition_id": 1}


# --------------------------------------------------------------------------- plan


def test_plan_order_is_deterministic_and_shuffle_is_a_seeded_permutation(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = build_store(config)
    units = units_of(config)
    surveys = [survey(u, ExportSettings()) for u in units]
    plain = build_plan(surveys, ExportSettings(), 0)
    order = [(plain.units[u].name, g, r) for u, g, r in zip(plain.unit, plain.group, plain.row, strict=True)]
    assert plain.total == len(store) == len(set(order))
    # partitions by (server, id), successes.parquet before successes-r2.parquet, rows in file order
    names = [plain.units[u].name for u in plain.unit]
    assert names == sorted(names, key=lambda n: (n.split("/")[0], int(n.split("/")[1].split("=")[1]), "-r" in n))
    assert build_plan(surveys, ExportSettings(), 0).digest == plain.digest

    settings = ExportSettings(shuffle=True, seed=7, shuffle_window=8)
    shuffled = build_plan(surveys, settings, 0)
    triples = list(zip(shuffled.unit.tolist(), shuffled.group.tolist(), shuffled.row.tolist(), strict=True))
    assert sorted(triples) == sorted(zip(plain.unit.tolist(), plain.group.tolist(), plain.row.tolist(), strict=True))
    assert triples != list(zip(plain.unit.tolist(), plain.group.tolist(), plain.row.tolist(), strict=True))
    again = build_plan(surveys, settings, 0)
    assert again.digest == shuffled.digest and (again.row == shuffled.row).all()
    assert build_plan(surveys, ExportSettings(shuffle=True, seed=8, shuffle_window=8), 0).digest != shuffled.digest
    assert build_plan(surveys, settings, 1).digest != shuffled.digest  # each rank its own order
    sizes = np.diff(shuffled.windows)
    assert (sizes[:-1] >= 8).all() and sizes.sum() == plain.total
    assert shuffled.window_at(0) == 0 and shuffled.window_at(shuffled.total) == shuffled.window_count


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_stream_exports_every_row_once(tmp_path: Path, image_format: str) -> None:
    config = make_config(tmp_path, image_format=image_format)
    store = build_store(config, image_format)
    committed = []
    progress = export_stream(job(config, ExportSettings(max_samples=4), on_shard=committed.append))
    folder = export_folder(config_mod.paths(config))
    assert progress.complete and progress.accounted() and progress.skipped_rows == 0
    assert progress.samples == len(store) == 23
    assert [s["file"] for s in progress.shards] == [f"shard-0-{n:06d}.tar" for n in range(6)]
    assert [c.samples for c in committed] == [4, 4, 4, 4, 4, 3]
    samples = read_shards(folder)
    check_samples_match_store(samples, store, image_format)
    assert [s["meta"]["uuid"] for s in samples] == list(store)  # partitions, files, rows in order
    # a finished stream has nothing left to do: the same call writes nothing
    before = shard_hashes(folder)
    again = export_stream(job(config, ExportSettings(max_samples=4), on_shard=committed.append))
    assert len(committed) == 6 and shard_hashes(folder) == before and again.shards == progress.shards


def test_shard_byte_limit(tmp_path: Path) -> None:
    config = make_config(tmp_path, image_format="png")
    store = build_store(config, "png", retry_file=False)
    limit = 40_000
    progress = export_stream(job(config, ExportSettings(max_bytes=limit)))
    biggest = max(len(r["image"]) for r in store.values()) + 3 * 512 + 10240
    assert len(progress.shards) > 1
    assert all(s["bytes"] <= limit + biggest for s in progress.shards)
    assert all(s["bytes"] <= limit for s in progress.shards[:-1] if s["samples"] > 1)
    check_samples_match_store(read_shards(export_folder(config_mod.paths(config)), decode=False), store, "png")


def test_filters_leave_rows_out_and_count_them(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = build_store(config)
    settings = ExportSettings(min_side=40, license_full=True)
    progress = export_stream(job(config, settings))
    small = {u for u, r in store.items() if min(r["resized_size"]) < 40}
    unlicensed = {u for u, r in store.items() if not r["is_license_full"]} - small
    assert small and unlicensed
    assert progress.excluded == {"min_side": len(small), "license_not_full": len(unlicensed)}
    wanted = {u: r for u, r in store.items() if u not in small | unlicensed}
    check_samples_match_store(read_shards(export_folder(config_mod.paths(config))), wanted, "jpeg")


def test_unreadable_files_and_rows_are_reported_and_the_rest_goes_on(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = build_store(config)
    paths = config_mod.paths(config)
    broken = paths.batch_images("a.org", 0) / "successes-r2.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    # a row whose bytes are no image at all (e.g. an HTML page stored by an old version)
    path = paths.batch_images("b.org", 1) / "successes.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[2]["image"] = b"<html>not an image</html>"
    atomic_write_table(path, pa.Table.from_pylist(rows, schema=SUCCESS_SCHEMA), row_group_size=4)
    progress = export_stream(job(config, ExportSettings(max_samples=5)))
    assert [u["file"] for u in progress.unreadable] == ["server_name=a.org/partition_id=0/successes-r2.parquet"]
    assert progress.skipped_rows == 1
    (detail,) = progress.skipped_details()
    assert detail["uuid"] == "b1-2" and "neither JPEG" in detail["reason"]
    assert progress.complete and progress.accounted()
    wanted = {u: r for u, r in store.items() if not u.startswith("a0-retry") and u != "b1-2"}
    check_samples_match_store(read_shards(export_folder(paths)), wanted, "jpeg")


# --------------------------------------------------------------------------- resume


class Killed(Exception):
    """Stands for a SIGKILL at a chosen point (the e2e test kills the real MPI job)."""


def _kill_after(shards: int):
    seen = []

    def on_shard(info) -> None:
        seen.append(info)
        if len(seen) == shards:
            raise Killed

    return on_shard


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_after_a_kill_gives_the_same_shards(tmp_path: Path, shuffle: bool) -> None:
    settings = ExportSettings(max_samples=3, shuffle=shuffle, seed=3, shuffle_window=5)
    reference = make_config(tmp_path / "ref")
    store = build_store(reference)
    export_stream(job(reference, settings))
    expected = shard_hashes(export_folder(config_mod.paths(reference)))
    assert len(expected) == 8

    config = make_config(tmp_path / "run")
    assert build_store(config).keys() == store.keys()
    folder = export_folder(config_mod.paths(config))
    with pytest.raises(Killed):
        export_stream(job(config, settings, on_shard=_kill_after(3)))
    assert len(StreamProgress.load(progress_path(folder, 0)).shards) == 3
    # a kill mid-shard leaves a temp file; one between a rename and the progress write, an unlisted shard
    (folder / ".shard-0-000003.tar.export.0123456789ab.tmp").write_bytes(b"partial")
    (folder / "shard-0-000003.tar").write_bytes(b"renamed, not yet recorded")
    resumed = []
    progress = export_stream(job(config, settings, on_shard=resumed.append))
    assert len(resumed) == 5 and progress.complete and progress.accounted()
    assert shard_hashes(folder) == expected
    check_samples_match_store(read_shards(folder, decode=False), store, "jpeg")

    # a listed shard deleted (or replaced) is written again, with every shard after it
    (folder / "shard-0-000005.tar").unlink()
    (folder / "shard-0-000002.tar").write_bytes(b"x")
    rewritten = []
    export_stream(job(config, settings, on_shard=rewritten.append))
    assert [i.file for i in rewritten] == [f"shard-0-{n:06d}.tar" for n in range(2, 8)]
    assert shard_hashes(folder) == expected


def test_changed_settings_or_store_start_the_stream_over(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = build_store(config)
    folder = export_folder(config_mod.paths(config))
    export_stream(job(config, ExportSettings(max_samples=4)))
    assert len(shard_hashes(folder)) == 6
    written = []
    export_stream(job(config, ExportSettings(max_samples=10), application="other", on_shard=written.append))
    assert [i.samples for i in written] == [10, 10, 3] and len(shard_hashes(folder)) == 3
    # a success file rewritten (another tool) changes the plan: the stream is exported again
    write_partition(config, "b.org", 1, [success_row("b1-new", 50, 50, "jpeg")])
    store = read_store(config)
    written.clear()
    export_stream(job(config, ExportSettings(max_samples=10), application="other", on_shard=written.append))
    assert sum(i.samples for i in written) == len(store)
    check_samples_match_store(read_shards(folder, decode=False), store, "jpeg")


def test_progress_of_another_version_is_ignored(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    build_store(config, retry_file=False)
    folder = export_folder(config_mod.paths(config))
    progress_path(folder, 0).parent.mkdir(parents=True)
    progress_path(folder, 0).write_text(json.dumps({"stream": 0, "unknown": 1}))
    assert export_stream(job(config, ExportSettings())).samples == 20
    assert Partition("a.org", 0).files(config_mod.paths(config))  # the store is untouched


# --------------------------------------------------------------------------- the tool, in process


def export_in_process(config: dict) -> dict:
    """filter -> schedule -> every scheduled rank's run_rank in this process -> rank 0's summarize."""
    from distributed_downloader.tools import resolve

    classes = resolve("export_webdataset", config)
    classes.filter(config, "export_webdataset").run()
    schedule = json.loads(json.dumps(classes.scheduler(config, "export_webdataset").run()))
    runner = classes.runner(config, "export_webdataset")
    for rank in range(schedule["ranks"]):
        runner.rank = rank
        stats = runner.run_rank(schedule, [p for p in schedule["partitions"] if p["rank"] == rank])
        assert stats["failed"] == 0
    return runner.summarize(schedule)


def test_tool_in_process_writes_the_index_and_drops_stale_shards(tmp_path: Path) -> None:
    config = make_config(tmp_path, workers_per_node=2, export_shard_max_samples=4)
    store = build_store(config)
    folder = export_folder(config_mod.paths(config))
    broken = config_mod.paths(config).batch_images("a.org", 3) / "successes-r2.parquet"
    broken.write_bytes(b"not parquet")
    summary = export_in_process(config)
    assert summary["ok"] and summary["streams"] == 2 and summary["samples"] == len(store)
    assert summary["unreadable"][0]["file"] == "server_name=a.org/partition_id=3/successes-r2.parquet"
    index = check_index(folder)
    assert index["totals"]["samples"] == len(store) and index["unreadable"] == summary["unreadable"]
    assert {s["file"].split("-")[1] for s in index["shards"]} == {"0", "1"}
    check_samples_match_store(read_shards(folder, decode=False), store, "jpeg")

    # One rank now: another application; stream 1's shards (an earlier export's) are removed.
    broken.unlink()
    config = make_config(tmp_path, workers_per_node=1, export_shard_max_samples=4)
    summary = export_in_process(config)
    index = check_index(folder)
    assert {s["file"].split("-")[1] for s in index["shards"]} == {"0"} and not summary["unreadable"]
    assert sorted(p.name for p in (folder / "_progress").iterdir()) == ["rank-0.json"]
    check_samples_match_store(read_shards(folder, decode=False), store, "jpeg")


def test_fast_member_headers_are_what_tarfile_writes() -> None:
    from distributed_downloader.tools.export.shard import _tarinfo_header, member_header

    for name, size in [("a.jpg", 0), ("t-0-01.json", 123_456), ("x" * 100, 5), ("x" * 101, 5), ("é.jpg", 3)]:
        assert member_header(name, size) == _tarinfo_header(name, size), name
    assert member_header("k.png", 8**11) == _tarinfo_header("k.png", 8**11)  # past ustar's size field


# --------------------------------------------------------------------------- the README's Hugging Face recipe


def test_datasets_load_dataset_reads_the_store_itself(tmp_path: Path, monkeypatch) -> None:
    """``datasets.load_dataset("parquet", data_files=...)`` over successes*.parquet, as the README says:
    every successes column loads (the hive folders' server_name / partition_id do not), ``image`` as
    binary that ``datasets.Image()`` decodes, nothing fetched from the network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    config = make_config(tmp_path)
    store = build_store(config)
    images = config_mod.paths(config).images
    loaded = datasets.load_dataset(
        "parquet",
        data_files=str(images / "**" / "successes*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert loaded.column_names == SUCCESS_SCHEMA.names
    assert sorted(loaded["uuid"]) == sorted(store)
    for row in loaded:
        assert hashlib.md5(row["image"]).hexdigest() == store[row["uuid"]]["hashsum_resized"]
    decoded = loaded.cast_column("image", datasets.Image())
    first = decoded[0]
    assert first["image"].size == tuple(reversed(first["resized_size"]))
    streamed = datasets.load_dataset(
        "parquet", data_files=str(images / "**" / "successes*.parquet"), split="train", streaming=True
    )
    assert sum(1 for _ in streamed) == len(store)
    # A file of an older version, without the snapshot columns: the README's columns=[...] loads both.
    older = [{k: v for k, v in row.items() if k in SUCCESS_SCHEMA.names[:12]} for row in list(store.values())[:2]]
    older_schema = pa.schema(list(SUCCESS_SCHEMA)[:12])
    folder = config_mod.paths(config).batch_images("c.org", 0)
    folder.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([{**r, "uuid": "old-" + r["uuid"]} for r in older], older_schema),
        folder / "successes.parquet",
    )
    mixed = datasets.load_dataset(
        "parquet",
        data_files=str(images / "**" / "successes*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf-cache-2"),
        columns=older_schema.names,
    )
    assert mixed.num_rows == len(store) + 2 and mixed.column_names == older_schema.names


# --------------------------------------------------------------------------- memory


def test_a_stream_does_not_keep_the_row_groups_of_files_it_read(tmp_path: Path) -> None:
    """An open ``pq.ParquetFile`` keeps the buffers of the last row group it read, even after ``close()``:
    keeping files open held one row group of images per file read (16 of them: ~1 GB per rank for
    64 MB row groups). Arrow memory at each shard commit stays about one row group, however many files."""
    config = make_config(tmp_path)
    rng = np.random.default_rng(0)
    group_bytes = 8 * 256_000
    for pid in range(8):
        rows = [success_row(f"p{pid}-{i}", 40, 40, "jpeg") for i in range(8)]
        for row in rows:
            row["image"] = b"\xff\xd8\xff" + rng.bytes(256_000)  # incompressible: the file holds every byte
        atomic_write_table(
            config_mod.paths(config).batch_images("m.org", pid) / "successes.parquet",
            pa.Table.from_pylist(rows, schema=SUCCESS_SCHEMA),
            row_group_size=8,
        )
    held = []
    progress = export_stream(
        job(config, ExportSettings(max_samples=8), on_shard=lambda info: held.append(pa.total_allocated_bytes()))
    )
    assert progress.samples == 64 and len(held) == 8
    assert max(held) < 1.5 * group_bytes, [h // 1_000_000 for h in held]


def test_another_shard_size_under_the_same_application_cuts_the_shards_again(tmp_path: Path) -> None:
    """The runner's settings come from the schedule, the application id from the filter summary: after
    ``--forcerun tool_schedule`` with another shard size they differ. The shards must follow the
    settings that ``shards.json`` reports, not stay cut at the old size."""
    config = make_config(tmp_path)
    store = build_store(config)
    folder = export_folder(config_mod.paths(config))
    export_stream(job(config, ExportSettings(max_samples=4)))
    written = []
    progress = export_stream(job(config, ExportSettings(max_samples=10), on_shard=written.append))
    assert [i.samples for i in written] == [10, 10, 3] and len(shard_hashes(folder)) == 3
    written.clear()
    export_stream(job(config, ExportSettings(max_samples=10, max_bytes=60_000), on_shard=written.append))
    assert written and all(i.bytes <= 60_000 for i in written if i.samples > 1)
    assert progress.samples == len(store)
    check_samples_match_store(read_shards(folder, decode=False), store, "jpeg")


def test_json_members_are_strict_json_for_non_finite_floats(tmp_path: Path) -> None:
    """A float column a later version adds may hold NaN or an infinity: Python writes them as the bare
    tokens NaN / Infinity, which no strict JSON parser reads. They are written as null."""

    def strict(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    config = make_config(tmp_path)
    rows = [success_row(f"f-{i}", 40, 40, "jpeg") for i in range(3)]
    scores = [float("nan"), float("inf"), 0.5]
    schema = SUCCESS_SCHEMA.append(pa.field("score", pa.float64())).append(pa.field("scores", pa.list_(pa.float64())))
    table = pa.Table.from_pylist(
        [{**r, "score": s, "scores": [s, 1.0]} for r, s in zip(rows, scores, strict=True)], schema=schema
    )
    atomic_write_table(config_mod.paths(config).batch_images("f.org", 0) / "successes.parquet", table)
    export_stream(job(config, ExportSettings()))
    samples = read_shards(export_folder(config_mod.paths(config)), decode=False)
    with tarfile.open(export_folder(config_mod.paths(config)) / "shard-0-000000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read(), parse_constant=strict) for m in tar if m.name.endswith(".json")]
    assert [m["score"] for m in metas] == [None, None, 0.5]
    assert [m["scores"] for m in metas] == [[None, 1.0], [None, 1.0], [0.5, 1.0]]
    assert len(samples) == 3


def test_temps_of_a_killed_index_or_progress_write_are_removed(tmp_path: Path) -> None:
    """A kill inside ``atomic_write_json`` (shards.json on rank 0, a rank's progress file) leaves its
    mkstemp temp (``.shards.json.<random>.tmp``); the rerun that completes the export removes them."""
    config = make_config(tmp_path, workers_per_node=2, export_shard_max_samples=4)
    store = build_store(config)
    folder = export_folder(config_mod.paths(config))
    export_in_process(config)
    for directory, name in [
        (folder, INDEX_FILE),
        (folder / "_progress", "rank-0.json"),
        (folder / "_progress", "rank-1.json"),
    ]:
        fd, _ = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)  # as store._temp_beside names it
        os.close(fd)
    assert export_in_process(config)["samples"] == len(store)
    assert not list(folder.rglob(".*.tmp"))
    check_index(folder)


def test_a_partial_shard_of_a_stream_the_new_export_lacks_is_removed(tmp_path: Path) -> None:
    """A kill mid-shard leaves a temp shard (up to a shard's size) that only its own stream removed when
    resuming: after an export with fewer ranks that stream is gone, and its temp stayed for good."""
    config = make_config(tmp_path, workers_per_node=3, export_shard_max_samples=4)
    store = build_store(config)
    folder = export_folder(config_mod.paths(config))
    export_in_process(config)
    partial = ShardWriter(folder / "shard-2-000003.tar")  # stream 2 killed while writing a shard
    partial.add(ShardWriter.encode([("k.jpg", b"x" * 1000)]))
    fd, _ = tempfile.mkstemp(prefix=".rank-2.json.", suffix=".tmp", dir=folder / "_progress")
    os.close(fd)
    summary = export_in_process(make_config(tmp_path, workers_per_node=2, export_shard_max_samples=4))
    assert summary["streams"] == 2 and summary["samples"] == len(store)
    assert not list(folder.rglob(".*.tmp"))
    check_index(folder)
