"""The classic front door: CLI flags (checked through Snakemake's own plan), the Python API,
`status` mid-run and after, exit codes, and the report with its plots."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distributed_downloader import download_images
from distributed_downloader.demo import scenario as demo
from distributed_downloader.demo.testserver import HostSpec, ImageFarm
from tests.conftest import REPO, kill_group, run, snakemake_cmd
from tests.e2e.helpers import check_dataset, read_all

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "distributed_downloader.front.cli"]
STAGES = ("initialize", "profile_servers", "schedule", "download", "verify")


def planned_rules(output: str) -> set[str]:
    """Rule names in a dry-run's job table."""
    rules = set()
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            rules.add(parts[0])
    return rules


def output_of(cmd: list[str]) -> str:
    result = run(cmd)
    return result.stdout + result.stderr


def test_cli_flags_api_status_and_report(tmp_path: Path, farm: ImageFarm) -> None:
    rows = demo.demo_rows(farm, per_host=12)
    config = demo.write_config(tmp_path, demo.write_input(rows, tmp_path / "urls.csv"))

    fresh = run([*CLI, str(config), "-n"])
    assert set(STAGES) <= planned_rules(fresh.stdout + fresh.stderr)

    download_images(config)  # the Python API runs the real workflow in-process
    check_dataset(tmp_path / "output", rows)

    done = run([*CLI, str(config), "-n"])
    assert "Nothing to be done" in done.stdout + done.stderr
    batched = planned_rules(output_of([*CLI, str(config), "--reset_batched", "-n"]))
    assert {"initialize", "profile_servers", "download", "verify"} <= batched
    profiled = planned_rules(output_of([*CLI, str(config), "--reset_profiled", "-n"]))
    assert "profile_servers" in profiled and "initialize" not in profiled

    status = json.loads(run([*CLI, "status", str(config), "--json"]).stdout)
    assert status["stage"] == "verified" and status["verification_ok"] is True
    assert status["batches_done"] == status["batches_total"]
    assert status["successes"] + status["errors"] == len(rows)
    text = run([*CLI, "status", str(config)]).stdout
    assert "every URL accounted for exactly once" in text

    report = tmp_path / "report.html"  # from the run's state, which lies in its output folder
    run(snakemake_cmd(config, tmp_path / "output", "--report", str(report)))
    html = report.read_text(errors="replace")
    for figure in ("throughput.svg", "errors_by_server.svg", "rate_over_time.svg", "server_summary.csv"):
        assert figure in html, figure


def test_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"path_to_input": "x.csv", "path_to_output": "out", "downloader_parameters": {"batchsize": 5}})
    )
    result = run([*CLI, str(bad)], check=False)
    assert result.returncode == 2 and "batchsize" in result.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        yaml.safe_dump({"path_to_input": str(tmp_path / "nope.csv"), "path_to_output": str(tmp_path / "o")})
    )
    result = run([*CLI, str(missing)], check=False)
    assert result.returncode == 1 and "workflow failed" in result.stderr


def test_status_mid_run(tmp_path: Path) -> None:
    with ImageFarm([HostSpec("slow", latency=0.05), HostSpec("slow2", latency=0.05)]) as farm:
        rows = demo.demo_rows(farm, per_host=40, faults=False)
        config = demo.write_config(
            tmp_path,
            demo.write_input(rows, tmp_path / "urls.csv"),
            batch_size=8,
            default_rate_limit=5,
            max_rate_limit=5,
        )
        proc = subprocess.Popen(
            [*CLI, str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        seen_mid = None
        deadline = time.monotonic() + 180
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                status = json.loads(run([*CLI, "status", str(config), "--json"]).stdout)
                if status.get("batches_total") and 0 < status["batches_done"] < status["batches_total"]:
                    seen_mid = status
                    break
                time.sleep(0.3)
            assert seen_mid is not None, "never saw the run half-way"
            assert seen_mid["stage"] == "downloading" and seen_mid["urls"] == len(rows)
            out, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                kill_group(proc)
        assert proc.returncode == 0
        # Live progress reached the terminal as plain lines.
        progress = [line for line in out.decode().splitlines() if line.startswith("[download] batches")]
        assert progress and all("\x1b" not in line and "\r" not in line for line in progress)
        final = json.loads(run([*CLI, "status", str(config), "--json"]).stdout)
        assert final["batches_done"] == final["batches_total"] and final["successes"] == len(rows)


def test_readme_demo_command(tmp_path: Path) -> None:
    """The README's first command (after the install): `distributed_downloader demo`."""
    result = run([*CLI, "demo", "--dir", str(tmp_path / "demo"), "--hosts", "2", "--per-host", "12"])
    assert "every URL accounted for exactly once" in result.stdout
    assert "successes 24" in result.stdout and "errors 6" in result.stdout


def _state_files_under(folder: Path, root: Path) -> list[str]:
    """Output files under ``root`` whose Snakemake metadata lies in ``folder``/.snakemake/metadata."""
    found = []
    for entry in (folder / ".snakemake" / "metadata").rglob("*"):
        if entry.is_file():  # the name is the output's path, urlsafe base64 (long ones split into folders)
            encoded = "".join(entry.relative_to(folder / ".snakemake" / "metadata").parts)
            with contextlib.suppress(ValueError):
                path = base64.urlsafe_b64decode(encoded).decode()
                if path.startswith(str(root)):
                    found.append(path)
    return found


def test_two_outputs_two_run_states(tmp_path: Path) -> None:
    """Two classic runs at once on two outputs: each keeps its Snakemake state (locks, metadata) in its own
    output folder, none in the checkout, and neither waits for or unlocks the other."""
    with ImageFarm([HostSpec("a", latency=0.05), HostSpec("b", latency=0.05)]) as farm:
        configs, rows = [], []
        for host, name in enumerate("ab"):
            folder = tmp_path / name
            mine = [r for r in demo.demo_rows(farm, per_host=8, faults=False) if f"demo-{host}-" in r.uuid]
            rate = {"default_rate_limit": 2, "max_rate_limit": 2}  # a few seconds of download each
            configs.append(
                demo.write_config(folder, demo.write_input(mine, folder / "urls.csv"), num_downloads=1, **rate)
            )
            rows.append(mine)
        logs = [tmp_path / f"{name}.log" for name in "ab"]
        procs = []
        for config, log in zip(configs, logs, strict=True):
            with open(log, "wb") as handle:  # a file, not a pipe nobody reads while both run
                procs.append(
                    subprocess.Popen(
                        [*CLI, str(config)], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        locks = [tmp_path / name / "output" / ".snakemake" / "locks" for name in "ab"]
        both_locked = False
        try:
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                both_locked = both_locked or all(d.is_dir() and any(d.iterdir()) for d in locks)
                time.sleep(0.2)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    kill_group(proc)
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    assert both_locked, "the runs never held their locks at the same time"
    for name, mine, lock in zip("ab", rows, locks, strict=True):
        output = tmp_path / name / "output"
        check_dataset(output, mine)
        assert not lock.exists() or not any(lock.iterdir())  # released
        assert _state_files_under(output, output)  # this run's metadata, in its own output
    assert not _state_files_under(tmp_path / "a" / "output", tmp_path / "b")  # and not the other's
    assert not _state_files_under(REPO, tmp_path)  # nothing in the checkout


HALF_TOOL = '''
import pyarrow as pa
import pyarrow.compute as pc

from distributed_downloader.tools import FilterRegister, PythonFilterToolBase


@FilterRegister("half_tool")
class EvenRows(PythonFilterToolBase):
    """Lists the rows whose uuid ends with an even number (the default runner then removes them)."""

    columns = ("uuid",)

    def filter_partition(self, table, server_name, partition_id):
        even = [u for u in table.column("uuid").to_pylist() if int(u.rsplit("-", 1)[1]) % 2 == 0]
        return table.filter(pc.is_in(table.column("uuid"), value_set=pa.array(even, pa.string())))
'''


def test_apply_tools_python_api_real_run(tmp_path: Path) -> None:
    """The classic tools API for real (not with run_snakemake replaced): a user module's filter, named by a
    path relative to where the command runs, with the default scheduler and runner (tool_name_override);
    one call downloads the dataset first (the tool needs the verified store), then applies the tool."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "half.py").write_text(HALF_TOOL)
    with ImageFarm(1) as farm:
        rows = demo.demo_rows(farm, per_host=6, faults=False)
        config = demo.write_config(tmp_path, demo.write_input(rows, tmp_path / "urls.csv"), num_downloads=1)
        raw = yaml.safe_load(config.read_text())
        raw["tools_parameters"] = {"tools_module": "mods/half.py"}
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        script = tmp_path / "apply.py"  # its own process: the tool registers in that one, not in pytest's
        script.write_text(
            "import sys\nfrom distributed_downloader import apply_tools\n"
            "apply_tools(sys.argv[1], 'half_tool', tool_name_override=True)\n"
        )
        run([sys.executable, str(script), "config.yaml"], cwd=tmp_path, timeout=600)
    output = tmp_path / "output"
    summary = json.loads((output / "tools" / "half_tool" / "_done.json").read_text())
    assert summary["ok"] and summary["rows_seen"] == 6 and summary["rows_removed"] == 3
    kept = {r["uuid"] for r in read_all(output / "downloaded_images", "successes.parquet", columns=["uuid"])}
    assert kept == {r.uuid for r in rows if int(r.uuid.rsplit("-", 1)[1]) % 2 == 1}
