"""The classic tools command: ``distributed_downloader_tools CONFIG TOOL [--reset_*] [--tool_name_override]``.

A thin wrapper over the Snakemake workflow: the target is ``<tools_folder>/<TOOL>/_done.json`` and the
original's resets become ``--forcerun``: ``--reset_filtering`` -> ``tool_filter``, ``--reset_scheduling``
-> ``tool_schedule``, ``--reset_runners`` -> ``tool_run``.
"""

from __future__ import annotations

import argparse
import sys

from distributed_downloader import config as config_mod
from distributed_downloader.front import api


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="distributed_downloader_tools",
        description="Apply a tool (filter -> schedule -> MPI run) to a downloaded dataset "
        "(runs the Snakemake workflow up to <tools_folder>/<TOOL>/_done.json).",
    )
    parser.add_argument("config", help="YAML config of the download run")
    parser.add_argument("tool_name", help="size_based, duplication_based, resize, image_verification, or a custom tool")
    resets = parser.add_mutually_exclusive_group()
    resets.add_argument(
        "--reset_filtering", action="store_true", help="redo filtering, scheduling and run (= --forcerun tool_filter)"
    )
    resets.add_argument(
        "--reset_scheduling", action="store_true", help="redo scheduling and run (= --forcerun tool_schedule)"
    )
    resets.add_argument(
        "--reset_runners",
        action="store_true",
        help="rerun the run step (= --forcerun tool_run); partitions this filter result was already applied "
        "to are skipped, so a tool is never applied twice",
    )
    parser.add_argument(
        "--tool_name_override",
        action="store_true",
        help="allow a tool without all three parts registered; missing parts use the defaults",
    )
    parser.add_argument("--profile", default="local", help="Snakemake profile: local (default), slurm, or a path")
    parser.add_argument("-n", "--dry-run", action="store_true", help="show the plan without running it")
    args = parser.parse_args(argv)

    from distributed_downloader.tools import ToolError

    try:
        done = api.apply_tool(
            args.config,
            args.tool_name,
            reset_filtering=args.reset_filtering,
            reset_scheduling=args.reset_scheduling,
            reset_runners=args.reset_runners,
            tool_name_override=args.tool_name_override,
            profile=args.profile,
            dryrun=args.dry_run,
        )
    except config_mod.ConfigError as exc:
        print(f"distributed_downloader_tools: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except ToolError as exc:
        print(f"distributed_downloader_tools: {exc}", file=sys.stderr)
        return 2
    except api.WorkflowFailed as exc:
        print(f"distributed_downloader_tools: {exc}", file=sys.stderr)
        return 1
    if not args.dry_run:
        print(f"distributed_downloader_tools: {args.tool_name} done; summary in {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
