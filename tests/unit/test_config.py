"""Tests for configuration loading, validation, defaults, aliases, paths and exported environment."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distributed_downloader import config as config_mod
from distributed_downloader.config import ConfigError


def base(**extra) -> dict:
    return {"path_to_input": "/data/in.csv", "path_to_output": "/data/out", **extra}


def test_defaults_are_filled_at_every_level() -> None:
    cfg = config_mod.validate(base())
    assert cfg["initializer"] == "generic"
    assert cfg["schedule_rules"] == {}
    assert cfg["tools"] == []
    assert cfg["output_structure"]["urls_folder"] == "servers_batched"
    assert cfg["output_structure"]["images_folder"] == "downloaded_images"
    params = cfg["downloader_parameters"]
    assert params["batch_size"] == 10000
    assert params["num_downloads"] == 3
    assert params["default_rate_limit"] == 3
    assert params["max_rate_limit"] == 50
    assert params["timeout"] == {"connect": 10, "read": 20, "total": 60}
    assert params["user_agent"].startswith("distributed-downloader/")
    assert cfg["tools_parameters"]["threshold_size"] == 224


def test_partial_nested_section_keeps_given_values_and_fills_the_rest() -> None:
    raw = base(downloader_parameters={"batch_size": 7}, output_structure={"logs_folder": "L"})
    cfg = config_mod.validate(raw)
    assert cfg["downloader_parameters"]["batch_size"] == 7
    assert cfg["downloader_parameters"]["max_retries"] == 2
    assert cfg["output_structure"]["logs_folder"] == "L"
    assert cfg["output_structure"]["reports_folder"] == "reports"


def test_validate_does_not_mutate_its_input() -> None:
    raw = base(downloader_parameters={"batch_size": 7})
    config_mod.validate(raw)
    assert raw == base(downloader_parameters={"batch_size": 7})


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        (base(bogus_top=1), ["bogus_top"]),
        (base(downloader_parameters={"bogus_nested": 1}), ["bogus_nested", "downloader_parameters"]),
        (base(output_structure={"stray_folder": "x"}), ["stray_folder", "output_structure"]),
        (base(tools_parameters={"stray": 1}), ["stray", "tools_parameters"]),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(raw: dict, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.validate(raw)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (base(downloader_parameters={"batch_size": "ten"}), "downloader_parameters.batch_size"),
        (base(downloader_parameters={"batch_size": 0}), "downloader_parameters.batch_size"),
        (base(downloader_parameters={"image_format": "bmp"}), "downloader_parameters.image_format"),
        (base(output_structure={"urls_folder": 3}), "output_structure.urls_folder"),
        (base(initializer="csv"), "initializer"),
        (base(downloader_parameters={"timeout": -1}), "downloader_parameters.timeout"),
        (base(schedule_rules={"10": 0}), "schedule_rules.10"),
        # YAML .nan passes minimum/maximum: a NaN revalidate_fraction failed the whole snapshot match
        (base(snapshot_parameters={"revalidate_fraction": float("nan")}), "snapshot_parameters.revalidate_fraction"),
        (
            base(snapshot_parameters={"retry_permanent_errors_after": float("nan")}),
            "snapshot_parameters.retry_permanent_errors_after",
        ),
    ],
)
def test_wrong_type_or_value_names_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config_mod.validate(raw)


def test_missing_input_and_output_are_errors() -> None:
    with pytest.raises(ConfigError, match="path_to_input"):
        config_mod.validate({"path_to_output": "/x"})
    with pytest.raises(ConfigError, match="path_to_output"):
        config_mod.validate({"path_to_input": "/x"})


def test_path_to_output_folder_is_an_alias() -> None:
    cfg = config_mod.validate({"path_to_input": "/in.csv", "path_to_output_folder": "/somewhere/out"})
    assert cfg["path_to_output"] == "/somewhere/out"
    assert config_mod.paths(cfg).output == Path("/somewhere/out")


def test_path_to_output_wins_over_the_alias() -> None:
    cfg = config_mod.validate(base(path_to_output_folder="/other"))
    assert cfg["path_to_output"] == "/data/out"


def test_timeout_number_expands_to_connect_read_total() -> None:
    params = config_mod.validate(base(downloader_parameters={"timeout": 4}))["downloader_parameters"]
    assert params["timeout"]["connect"] == 4
    assert params["timeout"]["read"] == 4
    # The total budget covers the connect and read phases (and then some): three times the number.
    assert params["timeout"]["total"] == 12


def test_partial_timeout_object_is_completed_with_defaults() -> None:
    cfg = config_mod.validate(base(downloader_parameters={"timeout": {"read": 5}}))
    assert cfg["downloader_parameters"]["timeout"] == {"connect": 10.0, "read": 5, "total": 60.0}


def test_unknown_timeout_subkey_is_rejected() -> None:
    with pytest.raises(ConfigError, match="downloader_parameters.timeout"):
        config_mod.validate(base(downloader_parameters={"timeout": {"connect": 1, "overall": 2}}))


def test_max_rate_below_default_rate_is_rejected() -> None:
    with pytest.raises(ConfigError, match="max_rate_limit"):
        config_mod.validate(base(downloader_parameters={"default_rate_limit": 5, "max_rate_limit": 4}))
    equal = config_mod.validate(base(downloader_parameters={"default_rate_limit": 5, "max_rate_limit": 5}))
    assert equal["downloader_parameters"]["max_rate_limit"] == 5


def test_environment_exports_the_originals_variables() -> None:
    cfg = config_mod.validate(
        base(
            downloader_parameters={"batch_size": 123, "timeout": 2},
            output_structure={"images_folder": "imgs"},
            tools_parameters={"threshold_size": 99},
        )
    )
    env = config_mod.environment(cfg, "/etc/run.yaml")
    assert env["PATH_TO_INPUT"] == "/data/in.csv"
    assert env["PATH_TO_OUTPUT"] == "/data/out"
    assert env["CONFIG_PATH"] == "/etc/run.yaml"
    assert env["OUTPUT_IMAGES_FOLDER"] == "imgs"
    assert env["OUTPUT_URLS_FOLDER"] == "servers_batched"
    assert env["DOWNLOADER_BATCH_SIZE"] == "123"
    assert env["DOWNLOADER_NUM_DOWNLOADS"] == "3"
    assert env["DOWNLOADER_TIMEOUT_CONNECT"] == "2"
    assert env["DOWNLOADER_TIMEOUT_TOTAL"] == "6"
    assert env["TOOLS_THRESHOLD_SIZE"] == "99"
    assert env["TOOLS_WORKERS_PER_NODE"] == "2"
    assert all(isinstance(v, str) for v in env.values())
    assert "CONFIG_PATH" not in config_mod.environment(cfg)


def test_paths_layout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = config_mod.validate(base(path_to_output=str(out), output_structure={"urls_folder": "U"}))
    p = config_mod.paths(cfg)
    assert p.output == out
    assert p.urls == out / "U"
    assert p.images == out / "downloaded_images"
    assert p.schedules == out / "schedules"
    assert p.logs == out / "logs"
    assert p.profiles_table == out / "servers_profiles.csv"
    assert p.ignored_table == out / "ignored_servers.csv"
    assert p.rejected_table == out / "rejected_rows.parquet"
    assert p.tools == out / "tools"
    assert p.reports == out / "reports"
    assert p.urls_manifest == out / "U" / "_manifest.json"
    assert p.robots == out / "robots"
    assert p.state == out / "state"
    batch = out / "U" / "server_name=a.org:8080" / "partition_id=3"
    assert p.batch_urls("a.org:8080", 3) == batch / "urls.parquet"
    assert p.batch_images("a.org", 0) == out / "downloaded_images" / "server_name=a.org" / "partition_id=0"
    # staging shares the images' filesystem: same output root
    assert p.staging.parent == out


def test_round_files_have_one_owner(tmp_path: Path) -> None:
    """The rules, the worker and the report read a round's files from the same Paths methods."""
    p = config_mod.paths(config_mod.validate(base(path_to_output=str(tmp_path / "out"))))
    assert p.round_schedule(2) == p.schedules / "round_2.json"
    assert str(p.round_schedule("{round}")).endswith("/schedules/round_{round}.json")  # a rule's wildcard
    assert p.round_done(3) == p.state / "download_round_3.done"
    assert p.round_state(1, "progress") == p.state / "round_1_progress.json"
    assert p.done_rounds() == [] and p.round_states("batches") == {}
    p.state.mkdir(parents=True)
    for name in ("download_round_10.done", "download_round_2.done", "round_10_batches.json", "round_2_batches.json"):
        (p.state / name).write_text("{}")
    assert p.done_rounds() == [2, 10]
    assert p.round_states("batches") == {10: p.round_state(10, "batches"), 2: p.round_state(2, "batches")}
    assert config_mod.batch_folder("a.org", 3) == Path("server_name=a.org") / "partition_id=3"


def test_relative_output_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    p = config_mod.paths(config_mod.validate({"path_to_input": "in.csv", "path_to_output": "rel"}))
    assert p.output == tmp_path / "rel"
    assert p.output.is_absolute()


def test_load_reads_yaml_and_rejects_non_mapping(tmp_path: Path) -> None:
    good = tmp_path / "c.yaml"
    good.write_text(yaml.safe_dump(base(downloader_parameters={"batch_size": 5})))
    assert config_mod.load(good)["downloader_parameters"]["batch_size"] == 5
    listy = tmp_path / "l.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        config_mod.load(listy)
    with pytest.raises(ConfigError, match="cannot read"):
        config_mod.load(tmp_path / "missing.yaml")


def test_workflow_files_are_found_or_named() -> None:
    assert config_mod.workflow_file("Snakefile") == config_mod.WORKFLOW_ROOT / "Snakefile"
    assert config_mod.workflow_file("config", "config.schema.yaml").is_file()
    with pytest.raises(config_mod.IncompleteInstall, match=r"pip install -e \.") as info:
        config_mod.workflow_file("rules", "no_such.smk")
    assert str(config_mod.WORKFLOW_ROOT / "rules" / "no_such.smk") in str(info.value)
