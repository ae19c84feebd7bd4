"""The classic tools entry point: ``apply_tools(config_path, tool, ...)`` over the Snakemake workflow.

The original's resets map to Snakemake's ``--forcerun``: ``reset_filtering`` -> ``tool_filter``,
``reset_scheduling`` -> ``tool_schedule``, ``reset_runners`` -> ``tool_run``; the target is the tool's
``<tools_folder>/<tool>/_done.json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from distributed_downloader import config as config_mod
from distributed_downloader.front import api
from distributed_downloader.store.files import atomic_write_text
from distributed_downloader.tools import registry
from distributed_downloader.tools.dataset import ToolPaths


def forcerun_rules(
    reset_filtering: bool = False, reset_scheduling: bool = False, reset_runners: bool = False
) -> list[str]:
    resets = (("tool_filter", reset_filtering), ("tool_schedule", reset_scheduling), ("tool_run", reset_runners))
    return [rule for rule, on in resets if on]


def _patch_run_config(run_config: Path, allow_unregistered: bool) -> None:
    """Resolve a relative tools_module path against the current directory (like the other paths of the
    classic CLI) and, for --tool_name_override, allow tools without all three parts registered."""
    raw = yaml.safe_load(run_config.read_text()) or {}
    params = raw.get("tools_parameters") or {}
    module = params.get("tools_module", "")
    changed = False
    if module and (module.endswith(".py") or "/" in module) and not Path(module).expanduser().is_absolute():
        params["tools_module"] = str(Path(module).expanduser().absolute())
        changed = True
    if allow_unregistered:
        params["allow_unregistered_tools"] = True
        changed = True
    if changed:
        raw["tools_parameters"] = params
        atomic_write_text(run_config, yaml.safe_dump(raw, sort_keys=False))


def apply_tool(
    config_path: str | os.PathLike,
    tool: str,
    *,
    reset_filtering: bool = False,
    reset_scheduling: bool = False,
    reset_runners: bool = False,
    tool_name_override: bool = False,
    profile: str = "local",
    dryrun: bool = False,
) -> Path:
    """Run ``tool`` (filter -> schedule -> run) on the dataset of the config; returns its ``_done.json``.

    Raises ``registry.ToolError`` for an unknown tool (before any work), ``config.ConfigError`` for a bad
    config and ``api.WorkflowFailed`` when a stage fails.
    """
    run_config = api.write_run_config(config_path)
    _patch_run_config(run_config, tool_name_override)
    config = config_mod.load(run_config)
    os.environ["CONFIG_PATH"] = str(Path(config_path).absolute())
    registry.resolve(tool, config)  # an unknown tool is an error before any work
    paths = config_mod.paths(config)
    target = ToolPaths.of(paths, tool).done
    forcerun = forcerun_rules(reset_filtering, reset_scheduling, reset_runners)
    with api.run_lock(paths.output) as alone:
        if alone and not dryrun:
            api.unlock_if_stale(paths.output)
        # The target goes first: after --configfile / --forcerun (nargs '+' / '*') it would be taken as
        # one more config file or rule name.
        ok = api.run_snakemake([str(target), *api.snakemake_args(run_config, profile, forcerun, (), dryrun)])
    if not ok:
        raise api.WorkflowFailed(f"tool {tool} failed; see the Snakemake output and {paths.logs / 'tools' / tool}")
    return target


def apply_tools(config_path: str | os.PathLike, tool: str | Sequence[str], **flags: bool | str) -> list[Path]:
    """``apply_tool`` for one tool name or for several, in order."""
    tools = [tool] if isinstance(tool, str) else list(tool)
    return [apply_tool(config_path, name, **flags) for name in tools]  # type: ignore[arg-type]
