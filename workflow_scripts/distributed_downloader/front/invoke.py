"""The Snakemake invocation shared by the classic API (api.py) and the command line (cli.py, tools_cli.py).

A run's config is validated and written with absolute paths under its output folder (``.run/``), one
classic run per output at a time (an flock), a lock a killed run left is removed, and this project's
Snakemake workflow runs in-process through Snakemake's own argument parser and API, so profiles,
``--forcerun`` and dry-runs behave exactly as on the ``snakemake`` command line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from distributed_downloader import config as config_mod

WORKFLOW_ROOT = config_mod.WORKFLOW_ROOT  # the checkout, or the workflow a wheel bundles
PATH_KEYS = ("path_to_input", "path_to_output", "path_to_output_folder", "path_to_occurrences")


class WorkflowFailed(RuntimeError):
    """A stage itself failed (error rows for URLs are not failures)."""


def profile_dir(profile: str) -> str:
    """A bundled profile by name (local, slurm), else the path or name as given."""
    bundled = WORKFLOW_ROOT / "profiles" / profile
    return str(bundled) if bundled.is_dir() else profile


def resolved_config(config_path: str | os.PathLike, base: Path | None = None) -> dict:
    """The user's config, validated, with relative paths made absolute against `base` (cwd)."""
    base = Path.cwd() if base is None else base
    with open(config_path) as handle:
        raw = yaml.safe_load(handle) or {}
    for key in PATH_KEYS:
        if raw.get(key):
            raw[key] = str((base / raw[key]).absolute())
    params = raw.get("downloader_parameters") or {}
    if params.get("ignored_servers"):
        params["ignored_servers"] = str((base / params["ignored_servers"]).absolute())
    config_mod.validate(raw)  # fail early, naming the key, before Snakemake starts
    return raw


def output_folder(config: dict) -> Path:
    """A run's output folder: where its data, its run config and Snakemake's state (.snakemake/) live."""
    return Path(config.get("path_to_output") or config["path_to_output_folder"]).absolute()


def write_run_config(config_path: str | os.PathLike) -> Path:
    raw = resolved_config(config_path)
    target = output_folder(raw) / ".run" / "config.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    from distributed_downloader.store.files import atomic_write_text

    atomic_write_text(target, yaml.safe_dump(raw, sort_keys=False))
    return target


@contextlib.contextmanager
def run_lock(output: Path) -> Iterator[bool]:
    """An flock held for the whole run: tells whether another classic run is alive."""
    (output / ".run").mkdir(parents=True, exist_ok=True)
    with open(output / ".run" / "lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _other_snakemake_alive(workdir: Path) -> bool:
    """Whether some other snakemake process works in `workdir` (its lock is then not stale)."""
    import psutil

    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] != me and "snakemake" in cmdline and proc.info["cwd"] == str(workdir):
                return True
        except (psutil.Error, TypeError):
            continue
    return False


def snakemake_args(
    run_config: Path,
    profile: str = "local",
    forcerun: Sequence[str] = (),
    targets: Sequence[str] = (),
    dryrun: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    # Targets first: --configfile and --forcerun take several values and would swallow them.
    # The working directory is the output folder: Snakemake's state (locks, metadata, logs) of a run
    # lives with its data, so runs on different outputs never share it, whatever the checkout.
    workdir = output_folder(yaml.safe_load(Path(run_config).read_text()) or {})
    snakefile = config_mod.workflow_file("Snakefile")
    args = [*targets, "--snakefile", str(snakefile), "--directory", str(workdir)]
    args += ["--profile", profile_dir(profile)]
    args += ["--configfile", str(run_config)]
    if forcerun:
        args += ["--forcerun", *forcerun]
    if dryrun:
        args.append("--dry-run")
    args += account_resources(run_config, profile)
    args += list(extra)
    return args


def account_resources(run_config: Path, profile: str) -> list[str]:
    """The original's `account` key as the Slurm executor's `slurm_account`.

    `--default-resources` on the command line replaces the profile's list, so the profile's own
    defaults are carried over with the account added.
    """
    with open(run_config) as handle:
        account = (yaml.safe_load(handle) or {}).get("account", "")
    profile_file = Path(profile_dir(profile)) / "config.yaml"
    if not account or not profile_file.is_file():
        return []
    with open(profile_file) as handle:
        settings = yaml.safe_load(handle) or {}
    if settings.get("executor") != "slurm":
        return []
    defaults = settings.get("default-resources") or {}
    pairs = list(defaults.items()) if isinstance(defaults, dict) else [tuple(d.split("=", 1)) for d in defaults]
    resources = [f"{key}={value}" for key, value in pairs if key != "slurm_account"]
    return ["--default-resources", *resources, f"slurm_account={str(account)!r}"]  # quoted: values are Python


def run_snakemake(args: Sequence[str]) -> bool:
    """Snakemake's own CLI path, in-process; returns success."""
    from snakemake.cli import args_to_api, parse_args

    cwd = os.getcwd()
    try:
        parser, parsed = parse_args(list(args))
        return bool(args_to_api(parsed, parser))
    finally:
        os.chdir(cwd)


def unlock_if_stale(workdir: Path) -> None:
    """Remove the Snakemake lock a killed run left in ``workdir`` (a run's output folder), if nobody runs there."""
    locks = workdir / ".snakemake" / "locks"
    if locks.is_dir() and any(locks.iterdir()) and not _other_snakemake_alive(workdir):
        print("removing a stale Snakemake lock left by a killed run (snakemake --unlock)", file=sys.stderr)
        snakefile = config_mod.workflow_file("Snakefile")
        run_snakemake(["--snakefile", str(snakefile), "--directory", str(workdir), "--unlock"])


def run_workflow(
    config_path: str | os.PathLike,
    profile: str = "local",
    forcerun: Sequence[str] = (),
    targets: Sequence[str] = (),
    dryrun: bool = False,
    extra: Sequence[str] = (),
) -> bool:
    run_config = write_run_config(config_path)
    output = run_config.parent.parent
    with run_lock(output) as alone:
        if alone and not dryrun:
            unlock_if_stale(output)
        os.environ["CONFIG_PATH"] = str(Path(config_path).absolute())
        return run_snakemake(snakemake_args(run_config, profile, forcerun, targets, dryrun, extra))
