"""The run step without MPI: built-in runners on every image format, crash safety, idempotence."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from distributed_downloader import config as config_mod
from distributed_downloader.imaging.process import IMAGE_FORMATS, decode_stored_image, target_size
from distributed_downloader.store.files import SUCCESSES_FILE
from distributed_downloader.tools import (
    BatchResult,
    FilterRegister,
    MPIRunnerTool,
    PythonFilterToolBase,
    RunnerRegister,
    resolve,
)
from distributed_downloader.tools import dataset as dataset_mod
from distributed_downloader.tools import runner as runner_mod
from distributed_downloader.tools.dataset import Partition, ToolPaths
from distributed_downloader.tools.dataset import file_fingerprint as fingerprint
from distributed_downloader.tools.runner import load_filter_rows, process_partition, run_partitions, summarize
from tests.unit.test_tools import (  # noqa: F401 - fixture
    clean_registry,
    dedupe_expectation,
    make_config,
    read_dataset,
    success_row,
    write_partition,
)


def apply_in_process(config: dict, tool: str) -> dict:
    """filter -> schedule -> every rank's share in this process -> summary (what the three rules do)."""
    classes = resolve(tool, config)
    classes.filter(config, tool).run()
    schedule = classes.scheduler(config, tool).run()
    schedule = json.loads(json.dumps(schedule))
    runner = classes.runner(config, tool)
    stats = run_partitions(runner, schedule, schedule["partitions"])
    assert stats["failed"] == 0
    return summarize(schedule, runner)


def read_removed(config: dict, tool: str) -> list[dict]:
    folder = ToolPaths.of(config_mod.paths(config), tool).removed
    rows = []
    for path in sorted(folder.glob("server_name=*/partition_id=*/*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def build(config: dict, image_format: str = "jpeg") -> dict[str, dict]:
    # sizes (w, h): stored at 96 on the longer side; small ones stay small
    specs = {
        ("a.org", 0): [("a0", 300, 200), ("a1", 40, 30), ("a2", 60, 120), ("a3", 96, 20)],
        ("a.org", 1): [("a4", 500, 500), ("a5", 20, 90)],
        ("b.org", 0): [("b0", 30, 30), ("b1", 200, 150), ("b2", 70, 52)],
    }
    for (server, pid), items in specs.items():
        write_partition(config, server, pid, [success_row(u, w, h, image_format) for u, w, h in items])
    return read_dataset(config)


def test_size_and_duplicates_in_process(tmp_path: Path) -> None:
    config = make_config(tmp_path, threshold_size=50)
    before = build(config)
    write_partition(
        config, "c.org", 0, [{**stored(before["a0"]), "uuid": "dup-a0"}, {**stored(before["b1"]), "uuid": "dup-b1"}]
    )
    before = read_dataset(config)
    summary = apply_in_process(config, "size_based")
    after = read_dataset(config)
    small = {u for u, r in before.items() if min(r["original_size"]) < 50}
    assert small == {"a1", "a3", "a5", "b0"}
    assert set(after) == set(before) - small
    assert all(after[u] == before[u] for u in after)  # untouched rows byte-identical
    removed = read_removed(config, "size_based")
    assert sorted(r["uuid"] for r in removed) == sorted(small)
    assert all(r["reason"].startswith("shorter original side") and r["tool"] == "size_based" for r in removed)
    assert "image" not in removed[0]
    assert summary["rows_removed"] == 4 and summary["ok"]

    summary = apply_in_process(config, "duplication_based")
    final = read_dataset(config)
    assert set(final) == dedupe_expectation(after) == set(after) - {"dup-a0", "dup-b1"}
    assert sorted(r["uuid"] for r in read_removed(config, "duplication_based")) == ["dup-a0", "dup-b1"]
    assert summary["rows_removed"] == 2 and summary["partitions"] == 1


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_resize_every_format(tmp_path: Path, image_format: str) -> None:
    config = make_config(tmp_path, image_format=image_format, new_resize_size=48)
    before = build(config, image_format)
    summary = apply_in_process(config, "resize")
    after = read_dataset(config)
    assert set(after) == set(before)
    big = {u for u, r in before.items() if max(r["resized_size"]) > 48}
    assert big == {"a0", "a2", "a4", "a5", "b1", "b2", "a3"}
    assert summary["rows_changed"] == len(big) and summary["rows_removed"] == 0
    for uuid, row in after.items():
        assert max(row["resized_size"]) <= 48
        assert row["hashsum_resized"] == hashlib.md5(row["image"]).hexdigest()
        img = decode_stored_image(row["image"], row["resized_size"], image_format)
        assert [img.height, img.width] == row["resized_size"]
        old = before[uuid]
        if uuid in big:
            h, w = old["resized_size"]
            assert tuple(row["resized_size"]) == target_size(h, w, 48)  # aspect kept, longer side 48
        else:
            assert row == old
        assert {k: v for k, v in row.items() if k not in ("image", "resized_size", "hashsum_resized")} == {
            k: v for k, v in old.items() if k not in ("image", "resized_size", "hashsum_resized")
        }
    # Nothing left to do: a second filter finds no row, the run changes nothing.
    assert apply_in_process(config, "resize")["filter_rows"] == 0
    assert read_dataset(config) == after


def stored(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("server_name", "partition_id")}


def corrupt(row: dict, keep_hash_consistent: bool) -> dict:
    data = row["image"][: len(row["image"]) // 2]  # truncated (raw_bgr: the wrong length)
    new = {**row, "image": data}
    if keep_hash_consistent:  # only decoding can tell
        new["hashsum_resized"] = hashlib.md5(data).hexdigest()
    return new


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_image_verification_every_format(tmp_path: Path, image_format: str) -> None:
    config = make_config(tmp_path, image_format=image_format)
    before = build(config, image_format)
    rows = [before[u] for u in ("a4", "a5")]
    bad_rows = [corrupt(rows[0], True), rows[1]]
    write_partition(config, "a.org", 1, [stored(r) for r in bad_rows])
    b_rows = [before[u] for u in ("b0", "b1", "b2")]
    b_rows[2] = corrupt(b_rows[2], False)
    write_partition(config, "b.org", 0, [stored(r) for r in b_rows])
    clean = dataset_mod.successes_path(config_mod.paths(config), Partition("a.org", 0))
    clean_bytes = clean.read_bytes()
    summary = apply_in_process(config, "image_verification")
    after = read_dataset(config)
    assert clean.read_bytes() == clean_bytes  # nothing to change: the file is not rewritten
    assert set(before) - set(after) == {"a4", "b2"}
    removed = {r["uuid"]: r["reason"] for r in read_removed(config, "image_verification")}
    assert set(removed) == {"a4", "b2"}
    assert removed["b2"] == "corrupt: md5 of the image bytes differs from hashsum_resized"
    assert removed["a4"].startswith("corrupt: ") and "md5" not in removed["a4"]
    assert summary["rows_seen"] == len(before) and summary["rows_removed"] == 2


# --------------------------------------------------------------------------- crash safety


class Tagger(MPIRunnerTool):
    """Not idempotent: appends to the title each time it runs; drops uuids ending in an even digit."""

    def apply_batch(self, batch: pa.Table, part) -> BatchResult:  # noqa: ANN001
        uuids = batch.column("uuid").to_pylist()
        drop = np.array([u[-1].isdigit() and int(u[-1]) % 2 == 0 for u in uuids], dtype=bool)
        titles = pc.binary_join_element_wise(batch.column("title"), " [tagged]", "")
        batch = batch.set_column(batch.schema.get_field_index("title"), "title", titles)
        return BatchResult(
            kept=batch.filter(pa.array(~drop)),
            removed=batch.filter(pa.array(drop)),
            reasons="even",
            changed=int((~drop).sum()),
        )


@pytest.fixture
def tagger(clean_registry):  # noqa: F811
    @FilterRegister("tagger")
    class Everything(PythonFilterToolBase):
        pass

    RunnerRegister("tagger")(Tagger)
    return "tagger"


def check_applied_once(config: dict, before: dict[str, dict], tool: str = "tagger") -> None:
    after = read_dataset(config)
    removed = read_removed(config, tool)
    removed_ids = [r["uuid"] for r in removed]
    assert len(removed_ids) == len(set(removed_ids)), "a row reported twice"
    assert set(after).isdisjoint(removed_ids)
    assert set(after) | set(removed_ids) == set(before), "a row lost"
    for uuid, row in after.items():
        assert row["title"] == before[uuid]["title"] + " [tagged]", row["title"]


def schedule_and_runner(config: dict, tool: str):  # noqa: ANN201
    classes = resolve(tool, config)
    classes.filter(config, tool).run()
    schedule = json.loads(json.dumps(classes.scheduler(config, tool).run()))
    return schedule, classes.runner(config, tool)


def test_rerun_never_applies_twice(tmp_path: Path, tagger: str) -> None:
    config = make_config(tmp_path, allow_unregistered_tools=True)
    before = build(config)
    schedule, runner = schedule_and_runner(config, tagger)
    first = run_partitions(runner, schedule, schedule["partitions"])
    assert first["processed"] == 3 and first["done_before"] == 0
    second = run_partitions(runner, schedule, schedule["partitions"])
    assert second["processed"] == 0 and second["done_before"] == 3
    check_applied_once(config, before)
    assert summarize(schedule, runner)["ok"]


def test_kill_during_a_batch_leaves_the_partition_untouched(tmp_path: Path, tagger: str, monkeypatch) -> None:
    config = make_config(tmp_path, allow_unregistered_tools=True)
    before = build(config)
    schedule, runner = schedule_and_runner(config, tagger)
    part = Partition("a.org", 0)
    path = dataset_mod.successes_path(config_mod.paths(config), part)
    original = path.read_bytes()
    calls = {"n": 0}
    real = Tagger.apply_batch

    def dies_on_second_batch(self, batch, ctx):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill mid-partition
        return real(self, batch, ctx)

    monkeypatch.setattr(Tagger, "apply_batch", dies_on_second_batch)
    monkeypatch.setattr(runner_mod, "ROW_GROUP_ROWS", 2)  # two batches of two rows
    rows = load_filter_rows(schedule["filter_table"], [part], None)[part]
    with pytest.raises(KeyboardInterrupt):
        process_partition(runner, schedule["application"], part, rows)
    assert path.read_bytes() == original
    assert not list(path.parent.glob(".*.tmp"))
    assert not runner.tool_paths.marker(part).exists()
    monkeypatch.setattr(Tagger, "apply_batch", real)
    run_partitions(runner, schedule, schedule["partitions"])
    check_applied_once(config, before)


def test_kill_between_marker_and_rename_redoes_once(tmp_path: Path, tagger: str, monkeypatch) -> None:
    config = make_config(tmp_path, allow_unregistered_tools=True)
    before = build(config)
    schedule, runner = schedule_and_runner(config, tagger)
    part = Partition("a.org", 0)
    path = dataset_mod.successes_path(config_mod.paths(config), part)
    source = fingerprint(path)
    real_commit = dataset_mod.ParquetRewrite.commit

    def killed_before_rename(self):  # noqa: ANN001, ANN202
        if self.path.name == SUCCESSES_FILE:
            self.close()  # the temp file is complete; the process dies before os.replace
            raise KeyboardInterrupt
        return real_commit(self)

    monkeypatch.setattr(dataset_mod.ParquetRewrite, "commit", killed_before_rename)
    rows = load_filter_rows(schedule["filter_table"], [part], None)[part]
    with pytest.raises(KeyboardInterrupt):
        process_partition(runner, schedule["application"], part, rows)
    marker = json.loads(runner.tool_paths.marker(part).read_text())
    assert marker["state"] == "pending" and marker["source"] == source == fingerprint(path)
    assert len(read_removed(config, "tagger")) == 2  # the report was committed first (a0, a2)
    monkeypatch.setattr(dataset_mod.ParquetRewrite, "commit", real_commit)
    run_partitions(runner, schedule, schedule["partitions"])
    assert not list(path.parent.glob(".*.tmp")), "leftover temp of the killed attempt"
    check_applied_once(config, before)


def test_kill_after_rename_finishes_without_reapplying(tmp_path: Path, tagger: str) -> None:
    config = make_config(tmp_path, allow_unregistered_tools=True)
    before = build(config)
    schedule, runner = schedule_and_runner(config, tagger)
    part = Partition("b.org", 0)
    rows = load_filter_rows(schedule["filter_table"], [part], None)[part]
    marker = process_partition(runner, schedule["application"], part, rows)
    # As if killed after the rename, before the marker said done:
    marker_path = runner.tool_paths.marker(part)
    atomic = {**marker, "state": "pending"}
    marker_path.write_text(json.dumps(atomic))
    stats = run_partitions(runner, schedule, schedule["partitions"])
    assert stats["processed"] == 3  # b.org/0 only finished, the other two applied
    assert json.loads(marker_path.read_text())["state"] == "done"
    check_applied_once(config, before)


def test_a_failing_partition_is_reported_and_others_go_on(tmp_path: Path, clean_registry) -> None:  # noqa: F811
    @RunnerRegister("broken")
    class Broken(MPIRunnerTool):
        def apply_batch(self, batch: pa.Table, part) -> BatchResult:  # noqa: ANN001
            if part.server_name == "b.org":
                return BatchResult(kept=batch.drop_columns(["title"]))
            return BatchResult(kept=batch)

    config = make_config(tmp_path, allow_unregistered_tools=True)
    build(config)
    path = dataset_mod.successes_path(config_mod.paths(config), Partition("b.org", 0))
    original = path.read_bytes()
    classes = resolve("broken", config)
    classes.filter(config, "broken").run()
    schedule = json.loads(json.dumps(classes.scheduler(config, "broken").run()))
    runner = classes.runner(config, "broken")
    stats = run_partitions(runner, schedule, schedule["partitions"])
    assert stats["failed"] == 1 and stats["processed"] == 2
    assert path.read_bytes() == original
    summary = summarize(schedule, runner)
    assert not summary["ok"] and summary["missing"] == ["b.org/0"]


def test_load_filter_rows_groups_by_partition(tmp_path: Path) -> None:
    table_path = tmp_path / "table.parquet"
    pq.write_table(
        pa.table(
            {
                "server_name": ["a", "b", "a", "a", "c"],
                "partition_id": [1, 1, 10, 1, 1],
                "uuid": ["x", "y", "z", "w", "v"],
                "reason": ["r1", "r2", "r3", "r4", "r5"],
            }
        ),
        table_path,
        row_group_size=2,
    )
    rows = load_filter_rows(table_path, [Partition("a", 1), Partition("a", 10), Partition("d", 0)], ("uuid",))
    assert rows[Partition("a", 1)].column("uuid").to_pylist() == ["x", "w"]
    assert rows[Partition("a", 10)].column_names == ["server_name", "partition_id", "uuid"]
    assert rows[Partition("d", 0)].num_rows == 0
