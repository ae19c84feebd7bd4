"""Installs as users have them: the venv's `snakemake` run without activating the venv (its `mpiexec`
is not on PATH), a launcher missing from the machine, and a wheel (`pip install .`, not -e)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from distributed_downloader.demo import scenario as demo
from distributed_downloader.demo.testserver import ImageFarm
from tests.conftest import REPO, run
from tests.e2e.helpers import check_dataset, ranks_of

pytestmark = pytest.mark.e2e
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin/, where the mpich wheel put mpiexec


def unactivated_env() -> dict[str, str]:
    """This environment as a shell without `. .venv/bin/activate` has it: no venv bin/ on PATH."""
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and Path(entry) != VENV_BIN
    )
    return env


def venv_snakemake(config: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        str(VENV_BIN / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--profile",
        str(REPO / "profiles" / "local"),
        "--configfile",
        str(config),
        *extra,
    ]


def test_venv_snakemake_without_activation_runs_the_mpi_job(tmp_path: Path) -> None:
    env = unactivated_env()
    assert not any((Path(entry) / "mpiexec").exists() for entry in env["PATH"].split(os.pathsep) if entry), (
        "an mpiexec on PATH outside the venv would hide what this test checks"
    )
    with ImageFarm(1) as farm:
        rows = demo.demo_rows(farm, per_host=6, faults=False)
        config = demo.write_config(tmp_path, demo.write_input(rows, tmp_path / "urls.csv"), num_downloads=1)
        run(venv_snakemake(config, tmp_path), timeout=400, env=env, cwd=tmp_path)
    output = tmp_path / "output"
    check_dataset(output, rows)
    ranks = ranks_of(output)
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["size"] for r in ranks} == {2}  # the ranks met


def test_a_missing_launcher_stops_the_workflow_before_any_work(tmp_path: Path) -> None:
    config = demo.write_config(tmp_path, demo.write_input([], tmp_path / "urls.csv"))
    result = run(
        venv_snakemake(config, tmp_path, "--set-resources", "download:mpi='no-such-mpiexec -v'"),
        timeout=200,
        check=False,
        env=unactivated_env(),
        cwd=tmp_path,
    )
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "rule download: MPI launcher 'no-such-mpiexec' not found" in message, message[-3000:]
    assert str(VENV_BIN) in message  # where the mpich wheel's launcher belongs
    assert not (tmp_path / "output").exists()  # stopped before initialization


SOURCE_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "Snakefile")
SOURCE_DIRS = ("rules", "config", "profiles", "envs", "workflow_scripts")


def clean_env() -> dict[str, str]:
    """os.environ without PYTHONPATH: an in-process run earlier in this session (download_images) exports
    the checkout's workflow_scripts/ there, whose egg-info would make pip take the package as installed."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of a clean copy of the checkout (pip builds in the source folder: not in the checkout)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, source / name)
    ignored = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake", "*.egg-info", "build")
    for name in SOURCE_DIRS:
        shutil.copytree(REPO / name, source / name, ignore=ignored)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    run([*pip, "-w", str(tmp_path / "wheels"), str(source)], cwd=tmp_path, timeout=180, env=clean_env())
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    return wheel


def test_a_wheel_install_finds_its_workflow(tmp_path: Path) -> None:
    """`pip install .` (not -e) into a fresh venv: config schema, Snakefile, rules, scripts and profiles
    come from the wheel. The dependencies are this venv's (a .pth line), so nothing is downloaded."""
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    bundled = "distributed_downloader/_workflow/"
    for name in ("Snakefile", "rules/common.smk", "rules/report/workflow.rst", "config/config.schema.yaml"):
        assert bundled + name in names, name
    for name in ("profiles/local/config.yaml", "envs/environment.yaml", "workflow_scripts/run_stage.py"):
        assert bundled + name in names, name

    env = clean_env()
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120, env=env)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    run([*pip, str(wheel)], timeout=180, env=env)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(run([str(python), "-c", purelib], env=env).stdout.strip())
    deps = Path(run([sys.executable, "-c", purelib], env=env).stdout.strip())
    (site / "dev_venv_dependencies.pth").write_text(f"{deps}\n")  # a path line: the editable .pth there is not read

    work = tmp_path / "work"  # outside the checkout, as a user runs it
    work.mkdir()
    where = "import distributed_downloader.config as c; print(c.__file__); print(c.WORKFLOW_ROOT)"
    module, root = run([str(python), "-c", where], cwd=work, env=env).stdout.split()
    assert Path(module).is_relative_to(site) and Path(root) == site / "distributed_downloader" / "_workflow"

    cli = [str(venv / "bin" / "distributed_downloader")]
    bad = work / "bad.yaml"
    bad.write_text("path_to_input: in.csv\npath_to_output: out\ndownloader_parameters: {batchsize: 5}\n")
    result = run([*cli, str(bad)], cwd=work, env=env, check=False)
    assert result.returncode == 2 and "batchsize" in result.stderr  # the bundled schema

    rows = [demo.Expected(f"u{i}", f"http://127.0.0.2:9/img/{i}.jpg", None, None) for i in range(3)]
    config = demo.write_config(work, demo.write_input(rows, work / "urls.csv"))
    plan = run([*cli, str(config), "-n"], cwd=work, env=env)
    assert "initialize" in plan.stdout + plan.stderr and "download" in plan.stdout + plan.stderr
    # One real stage from the wheel: a script: rule of the bundled rules, run by Snakemake.
    manifest = work / "output" / "servers_batched" / "_manifest.json"
    stage = work / "initialize.py"
    stage.write_text(
        "import sys\nfrom distributed_downloader.front import invoke as api\n"
        "sys.exit(0 if api.run_workflow(sys.argv[1], targets=[sys.argv[2]]) else 1)\n"
    )
    run([str(python), str(stage), str(config), str(manifest)], cwd=work, env=env, timeout=300)
    assert json.loads(manifest.read_text())["servers"]
    installed = run([*cli, "install-profiles", "--dest", str(work / "profiles")], cwd=work, env=env).stdout
    assert "installed profile 'local'" in installed and (work / "profiles" / "slurm" / "config.yaml").is_file()
