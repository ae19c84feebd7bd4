"""Helpers shared by the benchmark scripts: cache folder, peak-RSS measurement of a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def snakemake_local_cmd(config: Path, workdir: Path, *extra: str) -> list[str]:
    """The real workflow on the local profile, as a user runs it."""
    return [
        sys.executable,
        "-m",
        "snakemake",
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


def cache_dir(name: str) -> Path:
    """A folder under the temp dir that survives between bench runs (inputs are generated once)."""
    root = Path(os.environ.get("DD_BENCH_CACHE", Path(tempfile.gettempdir()) / "dd-bench")) / name
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass
class Measured:
    seconds: float
    returncode: int
    peak_rss_mb: float  # peak over the polled process tree, summed per sample
    peak_rss_per_process_mb: dict[int, float] = field(default_factory=dict)  # pid -> its own peak (VmHWM)
    names: dict[int, str] = field(default_factory=dict)  # pid -> command line
    root_pid: int = 0
    stdout: str = ""
    stderr: str = ""


def _hwm_mb(pid: int) -> float | None:
    """The kernel's own peak resident set of a live process (VmHWM), in MB."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_measured(cmd: list[str], poll: float = 0.1, env: dict | None = None, timeout: float = 1800) -> Measured:
    """Run `cmd`, poll its process tree with psutil: summed RSS, and each process's own VmHWM."""
    import psutil

    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out: dict[str, str] = {}

    def drain(name: str, stream) -> None:  # noqa: ANN001 - a text pipe
        out[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for reader in readers:
        reader.start()
    root = psutil.Process(proc.pid)
    peak_total = 0.0
    per_process: dict[int, float] = {}
    names: dict[int, str] = {}
    while proc.poll() is None:
        if time.monotonic() - started > timeout:
            proc.kill()
            break
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0.0
        for member in family:
            try:
                rss = member.memory_info().rss / 2**20
                if member.pid not in names:
                    names[member.pid] = " ".join(member.cmdline())[:160]
            except psutil.Error:
                continue
            total += rss
            hwm = _hwm_mb(member.pid)
            per_process[member.pid] = max(per_process.get(member.pid, 0.0), rss, hwm or 0.0)
        peak_total = max(peak_total, total)
        time.sleep(poll)
    proc.wait()
    for reader in readers:
        reader.join()
    return Measured(
        time.monotonic() - started,
        proc.returncode,
        peak_total,
        per_process,
        names,
        proc.pid,
        out.get("out", ""),
        out.get("err", ""),
    )


def child_python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def fmt_rate(n: float) -> str:
    return f"{n:,.0f}"
