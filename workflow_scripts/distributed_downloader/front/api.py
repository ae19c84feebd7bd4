"""The classic Python API: ``download_images()`` and ``apply_tools()``, the original tool's entry points.

Both run this project's Snakemake workflow in-process (invoke.py). The original's tool resets map to
Snakemake's ``--forcerun``: ``reset_filtering`` -> ``tool_filter``, ``reset_scheduling`` -> ``tool_schedule``,
``reset_runners`` -> ``tool_run``; a tool's target is its ``<tools_folder>/<tool>/_done.json``.
``distributed_downloader.apply_tools`` and ``distributed_downloader.tools.apply_tools`` are the one below.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from distributed_downloader import config as config_mod
from distributed_downloader.front import invoke
from distributed_downloader.front.invoke import WorkflowFailed
from distributed_downloader.store.files import atomic_write_text

__all__ = ["WorkflowFailed", "apply_tool", "apply_tools", "download_images", "forcerun_rules"]


def download_images(
    config_path: str | os.PathLike,
    *,
    reset_batched: bool = False,
    reset_profiled: bool = False,
    profile: str = "local",
    dryrun: bool = False,
) -> None:
    """Run initialize -> profile -> schedule/download rounds -> verify. Raises WorkflowFailed."""
    forcerun = [r for r, on in (("initialize", reset_batched), ("profile_servers", reset_profiled)) if on]
    if not invoke.run_workflow(config_path, profile, forcerun=forcerun, dryrun=dryrun):
        raise WorkflowFailed("the download workflow failed; see the Snakemake output and logs_folder")


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
    config and ``WorkflowFailed`` when a stage fails.
    """
    # The tools (and the libraries they load) only when a tool runs: the CLI's other commands start fast.
    from distributed_downloader.tools import registry
    from distributed_downloader.tools.dataset import ToolPaths

    run_config = invoke.write_run_config(config_path)
    _patch_run_config(run_config, tool_name_override)
    config = config_mod.load(run_config)
    os.environ["CONFIG_PATH"] = str(Path(config_path).absolute())
    registry.resolve(tool, config)  # an unknown tool is an error before any work
    paths = config_mod.paths(config)
    target = ToolPaths.of(paths, tool).done
    forcerun = forcerun_rules(reset_filtering, reset_scheduling, reset_runners)
    with invoke.run_lock(paths.output) as alone:
        if alone and not dryrun:
            invoke.unlock_if_stale(paths.output)
        # The target goes first: after --configfile / --forcerun (nargs '+' / '*') it would be taken as
        # one more config file or rule name.
        ok = invoke.run_snakemake([str(target), *invoke.snakemake_args(run_config, profile, forcerun, (), dryrun)])
    if not ok:
        raise invoke.WorkflowFailed(f"tool {tool} failed; see the Snakemake output and {paths.logs / 'tools' / tool}")
    return target


def apply_tools(config_path: str | os.PathLike, tool: str | Sequence[str], **flags: bool | str) -> list[Path]:
    """``apply_tool`` for one tool name or for several, in order."""
    tools = [tool] if isinstance(tool, str) else list(tool)
    return [apply_tool(config_path, name, **flags) for name in tools]  # type: ignore[arg-type]
