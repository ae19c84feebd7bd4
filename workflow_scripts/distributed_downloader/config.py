"""Load, validate and complete a run's configuration; derive paths; export the original's env vars."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

PACKAGE_DIR = Path(__file__).resolve().parent


def _workflow_root() -> Path:
    """Where the Snakefile, rules/, config/, profiles/ and envs/ are.

    The checkout this package sits in (a source tree, an editable install), else the copy a built
    wheel bundles as ``_workflow/`` (setup.py).
    """
    checkout = PACKAGE_DIR.parents[1]
    if (checkout / "Snakefile").is_file() and (checkout / "workflow_scripts" / PACKAGE_DIR.name).is_dir():
        return checkout
    return PACKAGE_DIR / "_workflow"


WORKFLOW_ROOT = _workflow_root()


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key."""


class IncompleteInstall(RuntimeError):
    """The workflow files are neither in a checkout around the package nor bundled in it."""


def workflow_file(*parts: str) -> Path:
    """A file of the workflow (``workflow_file("Snakefile")``); IncompleteInstall when it is missing."""
    path = WORKFLOW_ROOT.joinpath(*parts)
    if not path.exists():
        raise IncompleteInstall(
            f"{path} is missing: this install of distributed_downloader has neither a checkout around "
            f"{PACKAGE_DIR} nor the workflow bundled in it. Install from the project's checkout: "
            "`pip install -e .` (editable) or `pip install .` (a wheel built by the project's setup.py)."
        )
    return path


def _with_defaults(validator_class: type) -> type:
    """A validator that fills in `default` values while it walks the instance."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: Mapping, instance: Any, schema: Mapping) -> Any:
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def load_schema() -> dict:
    with open(workflow_file("config", "config.schema.yaml")) as handle:
        return yaml.safe_load(handle)


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        return f"unknown key under '{key}': {error.message}"
    if error.validator == "required":
        return f"missing key under '{key}': {error.message}"
    return f"config key '{key}': {error.message}"


def _nan_keys(value: object, key: str = "") -> Iterator[str]:
    if isinstance(value, float) and math.isnan(value):
        yield key or "<top level>"
    elif isinstance(value, Mapping):
        for name, item in value.items():
            yield from _nan_keys(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nan_keys(item, f"{key}.{index}")


def validate(raw: Mapping) -> dict:
    """Validate a config mapping, fill defaults, resolve aliases. Raises ConfigError naming the key."""
    config = copy.deepcopy(dict(raw))
    if "path_to_output" not in config and "path_to_output_folder" in config:
        config["path_to_output"] = config["path_to_output_folder"]
    errors = sorted(_Validator(load_schema()).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("; ".join(_describe(e) for e in errors))
    # YAML's .nan passes every minimum and maximum: revalidate_fraction: .nan failed the snapshot match
    # (nothing reused, every URL downloaded again), retry_permanent_errors_after: .nan retried them all.
    for key in _nan_keys(config):
        raise ConfigError(f"config key '{key}': NaN is not a number this setting can take")
    if "path_to_output" not in config:
        raise ConfigError("missing key 'path_to_output' (or 'path_to_output_folder')")
    previous = config["previous_dataset"]
    config["previous_dataset"] = [previous] if isinstance(previous, str) else list(previous)
    config["previous_dataset"] = [p for p in config["previous_dataset"] if p.strip()]
    params = config["downloader_parameters"]
    timeout = params["timeout"]
    if not isinstance(timeout, dict):
        timeout = {"connect": timeout, "read": timeout, "total": timeout * 3}
    params["timeout"] = {"connect": 10.0, "read": 20.0, "total": 60.0, **timeout}
    if params["max_rate_limit"] < params["default_rate_limit"]:
        raise ConfigError("config key 'downloader_parameters.max_rate_limit' must be >= default_rate_limit")
    return config


def load(path: str | os.PathLike) -> dict:
    """Read a YAML config file and validate it."""
    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return validate(raw)


def batch_folder(server: str, partition: int | str) -> Path:
    """A batch's folder below any hive-partitioned root (URLs, images, plans, tool markers and reports)."""
    return Path(f"server_name={server}") / f"partition_id={partition}"


@dataclass(frozen=True)
class Paths:
    """Every location a run reads or writes, derived from the config."""

    output: Path
    urls: Path
    images: Path
    schedules: Path
    logs: Path
    profiles_table: Path
    ignored_table: Path
    rejected_table: Path
    tools: Path
    reports: Path
    staging: Path  # same filesystem as images: temp files renamed into place

    @property
    def urls_manifest(self) -> Path:
        return self.urls / "_manifest.json"

    @property
    def robots(self) -> Path:
        return self.output / "robots"

    @property
    def snapshot(self) -> Path:
        """The reuse plan of a run with ``previous_dataset`` (snapshot.py)."""
        return self.output / "snapshot"

    @property
    def state(self) -> Path:
        """Small files Snakemake tracks (round markers)."""
        return self.output / "state"

    def batch_urls(self, server: str, partition: int) -> Path:
        return self.urls / batch_folder(server, partition) / "urls.parquet"

    def batch_images(self, server: str, partition: int) -> Path:
        return self.images / batch_folder(server, partition)

    # A download round's files. ``round_no`` may be a wildcard ("{round}") in the rules.
    def round_schedule(self, round_no: int | str) -> Path:
        """The round's plan (rule ``schedule``)."""
        return self.schedules / f"round_{round_no}.json"

    def round_done(self, round_no: int | str) -> Path:
        """The round's end marker (rule ``download``): the only declared output of the MPI job."""
        return self.state / f"download_round_{round_no}.done"

    def round_state(self, round_no: int | str, what: str) -> Path:
        """What the round's rank 0 writes as it goes: ``progress``, ``batches`` (statistics), ``ranks``."""
        return self.state / f"round_{round_no}_{what}.json"

    def round_states(self, what: str) -> dict[int, Path]:
        """Every round's ``round_state(r, what)`` file that exists, by round."""
        found = sorted(self.state.glob(f"round_*_{what}.json")) if self.state.is_dir() else []
        return {int(path.name.split("_")[1]): path for path in found}

    def done_rounds(self) -> list[int]:
        """The rounds whose end marker exists."""
        found = self.state.glob("download_round_*.done") if self.state.is_dir() else []
        return sorted(int(path.stem.split("_")[-1]) for path in found)


def paths(config: Mapping) -> Paths:
    out = Path(config["path_to_output"]).absolute()
    structure = config["output_structure"]
    return Paths(
        output=out,
        urls=out / structure["urls_folder"],
        images=out / structure["images_folder"],
        schedules=out / structure["schedules_folder"],
        logs=out / structure["logs_folder"],
        profiles_table=out / structure["profiles_table"],
        ignored_table=out / structure["ignored_table"],
        rejected_table=out / structure["rejected_table"],
        tools=out / structure["tools_folder"],
        reports=out / structure["reports_folder"],
        staging=out / ".staging",
    )


def environment(config: Mapping, config_path: str | None = None) -> dict[str, str]:
    """The original tool's environment variables, for user scripts run inside jobs."""
    env: dict[str, str] = {
        "PATH_TO_INPUT": str(config["path_to_input"]),
        "PATH_TO_OUTPUT": str(config["path_to_output"]),
    }
    if config_path:
        env["CONFIG_PATH"] = str(config_path)
    for key, value in config["output_structure"].items():
        env[f"OUTPUT_{key.upper()}"] = str(value)
    for section, prefix in (("downloader_parameters", "DOWNLOADER_"), ("tools_parameters", "TOOLS_")):
        for key, value in config[section].items():
            if isinstance(value, dict):
                for sub, subvalue in value.items():
                    env[f"{prefix}{key.upper()}_{sub.upper()}"] = str(subvalue)
            else:
                env[f"{prefix}{key.upper()}"] = str(value)
    return env


def export_environment(config: Mapping, scripts_dir: Path) -> None:
    """Set, in this process (and so in every job it starts), PYTHONPATH and the original's variables."""
    current = os.environ.get("PYTHONPATH", "")
    if str(scripts_dir) not in current.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(scripts_dir), current) if p)
    os.environ.update(environment(config, os.environ.get("CONFIG_PATH")))
