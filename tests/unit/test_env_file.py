"""envs/environment.yaml (conda, also each rule's `conda:` env) holds every package pyproject.toml installs."""

from __future__ import annotations

import re

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: black's (snakefmt's, dev extra) backport
    import tomli as tomllib

from tests.conftest import REPO

CONDA_NAMES = {"snakemake": "snakemake-minimal"}  # pip name -> conda-forge/bioconda name where they differ


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def test_the_env_file_has_every_dependency_and_dev_tool() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]}
    env = yaml.safe_load((REPO / "envs" / "environment.yaml").read_text())
    entries = [entry for entry in env["dependencies"] if isinstance(entry, str)]
    pinned = {_name(entry) for entry in entries}
    missing = sorted({CONDA_NAMES.get(name, name) for name in wanted} - pinned)
    assert not missing, f"envs/environment.yaml lacks {missing}"
    assert all("=" in entry for entry in entries), "every package pinned"
    assert "python=3.11" in entries  # within requires-python
    assert project["requires-python"] == ">=3.10"
