"""Command line: the classic `distributed_downloader CONFIG [...]` plus `demo`, `status`, `install-profiles`."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from distributed_downloader import config as config_mod
from distributed_downloader.front import api, invoke

SUBCOMMANDS = ("demo", "status", "install-profiles")


def classic(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="distributed_downloader",
        description="Download every URL of the config's input into a hive-partitioned parquet dataset "
        "(runs the Snakemake workflow). Other commands: " + ", ".join(SUBCOMMANDS),
    )
    parser.add_argument("config", help="YAML config (see config/config.yaml)")
    resets = parser.add_mutually_exclusive_group()
    resets.add_argument("--reset_batched", action="store_true", help="redo initialization (= --forcerun initialize)")
    resets.add_argument("--reset_profiled", action="store_true", help="redo profiling (= --forcerun profile_servers)")
    parser.add_argument("--profile", default="local", help="Snakemake profile: local (default), slurm, or a path")
    parser.add_argument("-n", "--dry-run", action="store_true", help="show the plan: which stages are left")
    args = parser.parse_args(argv)
    try:
        api.download_images(
            args.config,
            reset_batched=args.reset_batched,
            reset_profiled=args.reset_profiled,
            profile=args.profile,
            dryrun=args.dry_run,
        )
    except config_mod.ConfigError as exc:
        print(f"distributed_downloader: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except config_mod.IncompleteInstall as exc:
        print(f"distributed_downloader: {exc}", file=sys.stderr)
        return 2
    except api.WorkflowFailed as exc:
        print(f"distributed_downloader: {exc}", file=sys.stderr)
        return 1
    return 0


def status_main(argv: list[str]) -> int:
    from distributed_downloader.report import status

    parser = argparse.ArgumentParser(
        prog="distributed_downloader status", description="Progress of a run, from its output folder alone"
    )
    parser.add_argument("config")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    config = config_mod.validate(invoke.resolved_config(args.config))
    result = status.collect(config_mod.paths(config))
    if args.json:
        import json

        print(json.dumps(result, indent=1))
    else:
        print(status.render(result))
    return 0


def install_profiles(argv: list[str]) -> int:
    """Copy the bundled profiles where `snakemake --profile NAME` finds them."""
    import platformdirs

    parser = argparse.ArgumentParser(prog="distributed_downloader install-profiles")
    parser.add_argument(
        "--dest", default=platformdirs.user_config_dir("snakemake"), help="Snakemake's user profile dir"
    )
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    for source in sorted(config_mod.workflow_file("profiles").iterdir()):
        if source.is_dir():
            target = dest / source.name
            shutil.copytree(source, target, dirs_exist_ok=True)
            print(f"installed profile '{source.name}' -> {target}")
    return 0


def demo(argv: list[str]) -> int:
    """Start a loopback image farm, write a demo input and config, run the whole workflow."""
    from distributed_downloader.demo import scenario as demo_mod
    from distributed_downloader.demo.testserver import ImageFarm
    from distributed_downloader.report import status

    parser = argparse.ArgumentParser(prog="distributed_downloader demo", description=demo.__doc__)
    parser.add_argument("--dir", default="demo", help="folder for the demo input, config and output (default ./demo)")
    parser.add_argument("--hosts", type=int, default=4, help="loopback image servers")
    parser.add_argument("--per-host", type=int, default=60, help="images per server")
    parser.add_argument("--profile", default="local")
    args = parser.parse_args(argv)
    folder = Path(args.dir).absolute()
    if (folder / "output").exists():
        shutil.rmtree(folder / "output")  # the farm's ports change each run, so old batches are stale
    with ImageFarm(args.hosts) as farm:
        rows = demo_mod.demo_rows(farm, args.per_host)
        input_path = demo_mod.write_input(rows, folder / "urls.csv")
        config_path = demo_mod.write_config(folder, input_path)
        print(f"demo: {len(rows)} URLs on {args.hosts} loopback servers {', '.join(farm.base_urls)}")
        started = time.monotonic()
        ok = invoke.run_workflow(config_path, args.profile)
        elapsed = time.monotonic() - started
    if not ok:
        print("demo: the workflow failed", file=sys.stderr)
        return 1
    config = config_mod.load(config_path)
    print(f"\ndemo finished in {elapsed:.1f}s; output in {config['path_to_output']}")
    print(status.render(status.collect(config_mod.paths(config))))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        command = {"demo": demo, "status": status_main, "install-profiles": install_profiles}[argv[0]]
        return command(argv[1:])
    return classic(argv)


if __name__ == "__main__":
    sys.exit(main())
