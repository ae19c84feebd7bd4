"""Tools without Snakemake or MPI: registry, user modules, scheduler, filters, workflow helpers, CLI."""

from __future__ import annotations

import copy
import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distributed_downloader import config as config_mod
from distributed_downloader.imaging.process import ImageSettings, encode_image, resize_image
from distributed_downloader.store.files import SUCCESS_SCHEMA, SUCCESSES_FILE, atomic_write_table
from distributed_downloader.tools import (
    DefaultScheduler,
    FilterRegister,
    MPIRunnerTool,
    PythonFilterToolBase,
    RunnerRegister,
    SchedulerRegister,
    ToolError,
    registry,
    resolve,
)
from distributed_downloader.tools.builtins import (
    DuplicatesBasedFiltering,
    ImageVerificationToolFilter,
    ResizeToolFilter,
    SizeBasedFiltering,
)
from distributed_downloader.tools.dataset import Partition, ToolPaths, list_partitions

# --------------------------------------------------------------------------- synthetic datasets


def make_config(tmp: Path, image_format: str = "jpeg", **tools_parameters: object) -> dict:
    return config_mod.validate(
        {
            "path_to_input": str(tmp / "urls.csv"),
            "path_to_output": str(tmp / "out"),
            "downloader_parameters": {"image_format": image_format, "image_size": 96, "workers_per_node": 2},
            "tools_parameters": tools_parameters,
        }
    )


def picture(width: int, height: int, key: int) -> Image.Image:
    """A deterministic smooth RGB picture (compresses like a photo, differs per key)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), np.full_like(x, key * 37 % 256)])
    return Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8), "RGB")


def success_row(uuid: str, width: int, height: int, image_format: str, key: int | None = None) -> dict:
    """A successes row as the downloader writes it: original -> resized to 96 -> encoded."""
    key = int(hashlib.md5(uuid.encode()).hexdigest()[:6], 16) % 1000 if key is None else key
    original = picture(width, height, key)
    buf = io.BytesIO()
    original.save(buf, "PNG")
    stored = resize_image(original, 96)
    data = encode_image(stored, ImageSettings(image_size=96, image_format=image_format))
    return {
        "uuid": uuid,
        "source_id": f"src-{uuid}",
        "identifier": f"http://example.org/{uuid}.png",
        "is_license_full": True,
        "license": "CC0",
        "source": "test",
        "title": f"title {uuid}",
        "hashsum_original": hashlib.md5(buf.getvalue()).hexdigest(),
        "hashsum_resized": hashlib.md5(data).hexdigest(),
        "original_size": [height, width],
        "resized_size": [stored.height, stored.width],
        "image": data,
    }


def write_partition(config: dict, server: str, partition_id: int, rows: list[dict]) -> Path:
    folder = config_mod.paths(config).batch_images(server, partition_id)
    path = folder / SUCCESSES_FILE
    atomic_write_table(path, pa.Table.from_pylist(rows, schema=SUCCESS_SCHEMA), row_group_size=4)
    return path


def read_dataset(config: dict) -> dict[str, dict]:
    """uuid -> row (with server_name, partition_id) of the whole dataset; a uuid twice is an error."""
    paths = config_mod.paths(config)
    rows: dict[str, dict] = {}
    for part in list_partitions(paths.images):
        for row in pq.read_table(paths.batch_images(part.server_name, part.partition_id) / SUCCESSES_FILE).to_pylist():
            assert row["uuid"] not in rows, f"{row['uuid']} twice"
            rows[row["uuid"]] = {**row, "server_name": part.server_name, "partition_id": part.partition_id}
    return rows


def read_filter(config: dict, tool: str) -> list[dict]:
    return pq.read_table(ToolPaths.of(config_mod.paths(config), tool).filter_table).to_pylist()


@pytest.fixture
def clean_registry():
    saved = copy.deepcopy(registry.TOOLS_REGISTRY)
    yield registry.TOOLS_REGISTRY
    registry.TOOLS_REGISTRY.clear()
    registry.TOOLS_REGISTRY.update(saved)


# --------------------------------------------------------------------------- registry


def test_builtins_are_registered_with_all_parts() -> None:
    tools = registry.registered_tools()
    for name in ("size_based", "duplication_based", "resize", "image_verification"):
        assert tools[name] == ["filter", "runner", "scheduler"]


def test_decorators_register_and_resolve(clean_registry, tmp_path: Path) -> None:
    @FilterRegister("my_tool")
    class MyFilter(PythonFilterToolBase):
        pass

    @SchedulerRegister("my_tool")
    class MyScheduler(DefaultScheduler):
        pass

    @RunnerRegister("my_tool")
    class MyRunner(MPIRunnerTool):
        pass

    classes = resolve("my_tool", make_config(tmp_path))
    assert (classes.filter, classes.scheduler, classes.runner) == (MyFilter, MyScheduler, MyRunner)
    assert classes.defaulted == ()
    # The same class again is fine (a module imported twice); another class under the same name is not.
    FilterRegister("my_tool")(MyFilter)
    with pytest.raises(ToolError, match="already has a filter"):

        @FilterRegister("my_tool")
        class Other(PythonFilterToolBase):
            pass


def test_register_checks_base_class_and_name(clean_registry) -> None:
    with pytest.raises(TypeError, match="must subclass MPIRunnerTool"):
        RunnerRegister("bad")(PythonFilterToolBase)
    with pytest.raises(ToolError, match="must match"):
        FilterRegister("../escape")


def test_unknown_and_partial_tools(clean_registry, tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="unknown tool 'nope'.*registered tools: duplication_based"):
        resolve("nope", make_config(tmp_path))

    @FilterRegister("half")
    class Half(PythonFilterToolBase):
        pass

    with pytest.raises(ToolError, match="without a registered scheduler/runner"):
        resolve("half", make_config(tmp_path))
    # allow_unregistered_tools (the CLI's --tool_name_override): the missing parts default.
    classes = resolve("half", make_config(tmp_path, allow_unregistered_tools=True))
    assert (classes.filter, classes.scheduler, classes.runner) == (Half, DefaultScheduler, MPIRunnerTool)
    assert classes.defaulted == ("scheduler", "runner")
    anything = resolve("anything", make_config(tmp_path, allow_unregistered_tools=True))
    assert anything.filter is PythonFilterToolBase


USER_MODULE = """
from distributed_downloader.tools import FilterRegister, RunnerRegister, SchedulerRegister
from distributed_downloader.tools import DefaultScheduler, MPIRunnerTool, PythonFilterToolBase

@FilterRegister("{name}")
class F(PythonFilterToolBase):
    pass

@SchedulerRegister("{name}")
class S(DefaultScheduler):
    pass

@RunnerRegister("{name}")
class R(MPIRunnerTool):
    pass
"""


def test_tools_module_by_path_and_by_name(clean_registry, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "user_tools.py"
    path.write_text(USER_MODULE.format(name="from_path"))
    classes = resolve("from_path", make_config(tmp_path, tools_module=str(path)))
    assert classes.runner.__name__ == "R"
    resolve("from_path", make_config(tmp_path, tools_module=str(path)))  # imported once per process

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "dd_named_tools.py").write_text(USER_MODULE.format(name="from_name"))
    monkeypatch.syspath_prepend(str(package))
    assert resolve("from_name", make_config(tmp_path, tools_module="dd_named_tools")).filter.__name__ == "F"

    # A relative .py path is also looked up beside the config file (CONFIG_PATH).
    monkeypatch.setenv("CONFIG_PATH", str(package / "config.yaml"))
    (package / "rel_tools.py").write_text(USER_MODULE.format(name="from_rel"))
    monkeypatch.chdir(tmp_path)
    assert resolve("from_rel", make_config(tmp_path, tools_module="rel_tools.py")).scheduler.__name__ == "S"


def test_broken_tools_module_is_a_clear_error(clean_registry, tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="no such file"):
        resolve("size_based", make_config(tmp_path, tools_module=str(tmp_path / "missing.py")))
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ToolError, match="failed to import: RuntimeError: boom"):
        resolve("size_based", make_config(tmp_path, tools_module=str(broken)))
    with pytest.raises(ToolError, match="failed to import"):
        resolve("size_based", make_config(tmp_path, tools_module="no_such_module_xyz"))


# --------------------------------------------------------------------------- scheduler


def test_default_scheduler_balances_rows(tmp_path: Path) -> None:
    scheduler = DefaultScheduler(make_config(tmp_path), "size_based")
    rows = [100, 90, 50, 40, 30, 30, 20, 10, 5, 5]
    parts = [{"server_name": f"s{i % 3}", "partition_id": i, "rows": r} for i, r in enumerate(rows)]
    ranks = scheduler.assign(parts, 3)
    loads = [sum(p["rows"] for p, r in zip(parts, ranks, strict=True) if r == k) for k in range(3)]
    assert sorted(loads) == [125, 125, 130]
    assert ranks == scheduler.assign(parts, 3)  # deterministic
    assert scheduler.assign(parts, 1) == [0] * len(parts)
    assert scheduler.assign([], 4) == []


def test_scheduler_writes_the_plan(tmp_path: Path) -> None:
    config = make_config(tmp_path, threshold_size=50, workers_per_node=3)
    for pid in range(4):
        write_partition(
            config, "a.org", pid, [success_row(f"a{pid}-{i}", 40 + 10 * i, 80, "jpeg") for i in range(pid + 1)]
        )
    SizeBasedFiltering(config, "size_based").run()
    plan = DefaultScheduler(config, "size_based").run()
    saved = json.loads(ToolPaths.of(config_mod.paths(config), "size_based").schedule.read_text())
    assert saved == json.loads(json.dumps(plan))
    assert plan["ranks"] == 3 and plan["config"]["tools_parameters"]["threshold_size"] == 50
    assert [(p["partition_id"], p["filter_rows"]) for p in plan["partitions"]] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    assert {p["rank"] for p in plan["partitions"]} == {0, 1, 2}
    assert plan["totals"]["dataset"] == {"partitions": 4, "rows": 10}


# --------------------------------------------------------------------------- filters


def test_size_based_filter(tmp_path: Path) -> None:
    config = make_config(tmp_path, threshold_size=100)
    write_partition(config, "a.org", 0, [success_row("big", 300, 200, "jpeg"), success_row("thin", 400, 99, "jpeg")])
    write_partition(config, "b.org", 0, [success_row("edge", 100, 100, "jpeg")])
    summary = SizeBasedFiltering(config, "size_based").run()
    rows = read_filter(config, "size_based")
    assert [(r["server_name"], r["partition_id"], r["uuid"]) for r in rows] == [("a.org", 0, "thin")]
    assert rows[0]["reason"] == "shorter original side 99 < threshold_size 100"
    assert summary["filter_rows"] == 1 and summary["dataset"] == {"partitions": 2, "rows": 3}
    assert summary["partitions"] == [{"server_name": "a.org", "partition_id": 0, "rows": 2, "filter_rows": 1}]


def test_resize_and_verification_filters(tmp_path: Path) -> None:
    config = make_config(tmp_path, new_resize_size=50)
    write_partition(config, "a.org", 0, [success_row("r1", 300, 200, "jpeg"), success_row("r2", 40, 30, "jpeg")])
    write_partition(config, "a.org", 1, [success_row("r3", 30, 60, "jpeg")])
    ResizeToolFilter(config, "resize").run()
    assert [(r["uuid"], r["reason"]) for r in read_filter(config, "resize")] == [
        ("r1", "longer side 96 > new_resize_size 50"),
        ("r3", "longer side 60 > new_resize_size 50"),
    ]
    summary = ImageVerificationToolFilter(config, "image_verification").run()
    whole = read_filter(config, "image_verification")
    assert [(r["partition_id"], r["uuid"]) for r in whole] == [(0, None), (1, None)]
    assert summary["affected_partitions"] == 2


def dedupe_expectation(dataset: dict[str, dict]) -> set[str]:
    """The uuids duplication_based keeps: per hashsum_original the smallest (server_name, partition_id, uuid)."""
    best: dict[str, tuple] = {}
    for row in dataset.values():
        key = (row["server_name"], row["partition_id"], row["uuid"])
        best[row["hashsum_original"]] = min(best.get(row["hashsum_original"], key), key)
    return {key[2] for key in best.values()}


@pytest.mark.parametrize("rows_in_memory", [2_000_000, 7])  # in memory, and spilled to hash buckets
def test_duplication_based_filter(tmp_path: Path, monkeypatch, rows_in_memory: int) -> None:
    monkeypatch.setattr(DuplicatesBasedFiltering, "rows_in_memory", rows_in_memory)
    config = make_config(tmp_path)
    # key k -> same original bytes; spread over servers and partitions, in non-sorted order.
    layout = {
        ("b.org", 0): [("b0", 1), ("b1", 2), ("b2", 3)],
        ("a.org", 1): [("a10", 1), ("a11", 4), ("a12", 2)],
        ("a.org", 0): [("a02", 5), ("a01", 1), ("a00", 6)],
        ("c.org", 2): [("c0", 2), ("c1", 2), ("c2", 7)],
        ("a.org", 10): [("z", 3), ("y", 3)],
        ("a.org", 2): [("w", 3)],  # partition ids compare as numbers: a.org/2 < a.org/10
    }
    for (server, pid), items in layout.items():
        write_partition(config, server, pid, [success_row(u, 20, 20, "jpeg", key=k) for u, k in items])
    dataset = read_dataset(config)
    summary = DuplicatesBasedFiltering(config, "duplication_based").run()
    removed = {r["uuid"]: r for r in read_filter(config, "duplication_based")}
    assert set(dataset) - set(removed) == dedupe_expectation(dataset) == {"a01", "a11", "a12", "a02", "a00", "w", "c2"}
    assert removed["z"]["kept_uuid"] == removed["y"]["kept_uuid"] == removed["b2"]["kept_uuid"] == "w"
    assert removed["y"]["kept_partition_id"] == 2
    assert removed["b0"]["reason"] == "duplicate of uuid a01 (server_name=a.org, partition_id=0)"
    assert summary["filter_rows"] == len(removed) == 8
    assert not (tmp_path / "out" / "tools" / "duplication_based" / "filter" / ".spill").exists()


def test_filters_read_only_the_columns_they_need(tmp_path: Path, monkeypatch) -> None:
    config = make_config(tmp_path)
    write_partition(config, "a.org", 0, [success_row("x", 30, 30, "jpeg")])
    seen: list[list[str]] = []
    real = pq.read_table

    def spy(path, columns=None, **kwargs):  # noqa: ANN001, ANN003
        seen.append(columns)
        return real(path, columns=columns, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    SizeBasedFiltering(config, "size_based").run()
    DuplicatesBasedFiltering(config, "duplication_based").run()
    ResizeToolFilter(config, "resize").run()
    assert seen and all(cols is not None and "image" not in cols for cols in seen)


def test_list_partitions_ignores_other_files(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write_partition(config, "b.org", 2, [])
    write_partition(config, "b.org", 10, [])
    write_partition(config, "a.org", 0, [])
    images = config_mod.paths(config).images
    (images / "server_name=a.org" / "partition_id=5").mkdir()  # no successes file
    (images / "_stray").mkdir()
    assert list_partitions(images) == [Partition("a.org", 0), Partition("b.org", 2), Partition("b.org", 10)]


# --------------------------------------------------------------------------- workflow helpers and CLI


def test_tool_rules_inputs_and_checks(tmp_path: Path) -> None:
    from snakemake.exceptions import WorkflowError

    from distributed_downloader.front.tool_rules import ToolRules

    config = make_config(tmp_path)
    config["tools"] = ["size_based", "duplication_based"]
    rules = ToolRules(config, config_mod.paths(config), "/v.json")
    rules.check_configured()
    assert rules.filter_inputs(SimpleNamespace(tool="size_based")) == {"verification": "/v.json"}
    assert rules.filter_inputs(SimpleNamespace(tool="duplication_based"))["previous"].endswith(
        "tools/size_based/_done.json"
    )
    assert rules.filter_inputs(SimpleNamespace(tool="resize")) == {"verification": "/v.json"}
    assert rules.tasks() == 2
    with pytest.raises(WorkflowError, match="unknown tool 'nope'"):
        rules.filter_inputs(SimpleNamespace(tool="nope"))
    config["tools"] = ["resize", "resize"]
    with pytest.raises(WorkflowError, match="listed twice"):
        rules.check_configured()
    config["tools"] = ["resize", "nope"]
    with pytest.raises(WorkflowError, match="tool 'nope'"):
        rules.check_configured()


def test_cli_unknown_tool_fails_before_any_work(tmp_path: Path, capsys) -> None:
    from distributed_downloader.front import tools_cli

    config = tmp_path / "config.yaml"
    config.write_text(f"path_to_input: {tmp_path / 'urls.csv'}\npath_to_output: {tmp_path / 'out'}\n")
    assert tools_cli.main([str(config), "no_such_tool"]) == 2
    err = capsys.readouterr().err
    assert "unknown tool 'no_such_tool'" in err and "--tool_name_override" in err
    assert not (tmp_path / "out" / "tools").exists()
    config.write_text(f"path_to_input: x\npath_to_output: {tmp_path / 'out'}\nbogus_key: 1\n")
    assert tools_cli.main([str(config), "resize"]) == 2
    assert "bogus_key" in capsys.readouterr().err


def test_reset_flags_map_to_forcerun() -> None:
    from distributed_downloader.front.api import forcerun_rules

    assert forcerun_rules() == []
    assert forcerun_rules(reset_filtering=True) == ["tool_filter"]
    assert forcerun_rules(reset_scheduling=True) == ["tool_schedule"]
    assert forcerun_rules(reset_runners=True) == ["tool_run"]


def test_apply_tool_builds_the_snakemake_call(tmp_path: Path, monkeypatch, clean_registry) -> None:
    from distributed_downloader.front import api as tools_api
    from distributed_downloader.front import invoke as api

    module = tmp_path / "mods" / "half.py"
    module.parent.mkdir()
    module.write_text(
        "from distributed_downloader.tools import FilterRegister, PythonFilterToolBase\n"
        "@FilterRegister('half_tool')\nclass F(PythonFilterToolBase):\n    pass\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        f"path_to_input: {tmp_path / 'urls.csv'}\npath_to_output: {tmp_path / 'out'}\n"
        "tools_parameters: {tools_module: mods/half.py}\n"
    )
    calls: list[list[str]] = []
    monkeypatch.setattr(api, "run_snakemake", lambda args: calls.append(list(args)) or True)
    monkeypatch.setattr(api, "unlock_if_stale", lambda workdir: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ToolError, match="without a registered scheduler/runner"):
        tools_api.apply_tool(config, "half_tool")
    assert not calls
    done = tools_api.apply_tool(config, "half_tool", reset_scheduling=True, tool_name_override=True)
    assert done == tmp_path / "out" / "tools" / "half_tool" / "_done.json"
    args = calls[0]
    assert args[0] == str(done) and args[args.index("--forcerun") + 1] == "tool_schedule"
    from snakemake.cli import parse_args

    parsed = parse_args(args)[1]
    assert parsed.targets == [str(done)] and set(parsed.forcerun) == {"tool_schedule"}
    run_config = config_mod.load(args[args.index("--configfile") + 1])
    assert run_config["tools_parameters"]["allow_unregistered_tools"] is True
    assert run_config["tools_parameters"]["tools_module"] == str(module)  # made absolute, like other paths
