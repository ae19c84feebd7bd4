"""How the classic front door builds Snakemake's command line (no Snakemake run here)."""

from __future__ import annotations

from pathlib import Path

import yaml
from snakemake.cli import parse_args

from distributed_downloader.front import invoke as api


def write_config(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"path_to_input": "in.csv", "path_to_output": str(tmp_path / "out"), **extra}))
    return path


def test_targets_come_first_and_flags_map(tmp_path: Path) -> None:
    args = api.snakemake_args(write_config(tmp_path), "local", ["initialize"], ["some/target.json"], dryrun=True)
    assert args[0] == "some/target.json"
    assert args[args.index("--forcerun") + 1] == "initialize" and "--dry-run" in args
    _, parsed = parse_args(args)  # Snakemake's own parser reads them as meant
    assert list(parsed.targets) == ["some/target.json"] and list(parsed.forcerun) == ["initialize"]


def test_account_becomes_slurm_account_on_the_slurm_profile_only(tmp_path: Path) -> None:
    config = write_config(tmp_path, account="proj123")
    assert api.account_resources(config, "local") == []
    resources = api.account_resources(config, "slurm")
    assert resources[0] == "--default-resources" and "slurm_account='proj123'" in resources
    assert "runtime=120" in resources and "mem_mb=4000" in resources  # the profile's defaults are kept
    _, parsed = parse_args(api.snakemake_args(config, "slurm"))
    names = set(parsed.default_resources.keys())
    assert {"slurm_account", "runtime", "mem_mb"} <= names
    assert api.account_resources(write_config(tmp_path), "slurm") == []  # no account: the profile as is


def test_snakemake_works_in_the_output_folder(tmp_path: Path) -> None:
    """Snakemake's state (.snakemake/: locks, metadata) of a run lives with its output, not in the checkout."""
    run_config = api.write_run_config(write_config(tmp_path))
    assert run_config == tmp_path / "out" / ".run" / "config.yaml"
    _, parsed = parse_args(api.snakemake_args(run_config))
    assert Path(parsed.directory) == tmp_path / "out"
    assert str(parsed.snakefile) == str(api.WORKFLOW_ROOT / "Snakefile")
