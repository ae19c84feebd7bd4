"""Politeness benchmark: our workflow vs img2dataset on farms that look like the world (issue #13).

    python bench/politeness_bench.py [--scenario background|heavy|nginx] [--quick] [--skip-peer]
                                     [--servers N] [--urls N] [--seed 3] [--workdir DIR]

Scenarios (bench/farm.py has the details):

- ``background`` (default): 20,000 URLs on 50 loopback hosts, Zipf sizes, hidden token buckets of
  2-66 req/s with small bursts, 429 + Retry-After / bare 429 / bare 503 refusals, some connection
  caps, and 1-3% per-URL faults (404, one-off 500, reset, 30 s stall) on every host.
- ``heavy``: ~1,030 URLs, ~40% faulty (the same faults at a high dose, decompression bombs,
  truncated images, HTML served as an image), hidden rates set so the politeness bound is ~20 s.
- ``nginx``: real nginx hosts (``distributed_downloader.demo.nginxfarm``): limit_req / limit_conn,
  bare 429 or 503, 1-3% permanent faults per host.

For each system (ours: the real workflow, Snakemake local profile, 2 MPI ranks; the peer:
img2dataset in bench/.venv-peer, created on demand), on a freshly started farm with the same
hosts and URLs, it prints, all measured at the servers (their own request logs):

- makespan (ours: mtime(state/download_round_<last>.done) - mtime(state/round_1_ranks.json), i.e.
  every download round that ran (a round that leaves nothing to retry is the last), the later
  rounds' scheduling and MPI start included; the peer: its wall
  time) over the politeness bound = max over hosts of retrievable URLs / hidden rate, and over the
  floor of this machine, timed in the same run: the larger of the CPU floor (decode + resize +
  encode, ``imaging.process_image``, of the same images on all cores, no network) and the machine
  floor (our workflow fetching the same retrievable images from the same farm with every limit and
  fault lifted: what fetch + decode + resize + encode + write cost on cores the farm shares);
- recall over the retrievable URLs (and successes with wrong bytes, successes of URLs that can
  never be retrieved);
- the share of all requests the servers answered 429 or 503;
- the worst host's busiest 1-second window / (rate + burst) and its peak concurrency / cap;
- PASS/FAIL against the scenario's acceptance goals.

``--quick``: a small smoke version (background: 2,000 URLs; heavy: 400; nginx: 1,500), about a
minute. All traffic stays on 127.0.0.0/8. Work files go to --workdir (default: a new /tmp folder).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from farm import (
    ROBOTS,
    SCENARIOS,
    HostPlan,
    Request,
    RunningFarm,
    Scenario,
    UrlPlan,
    lifted,
    nginx_unavailable,
    plan,
)
from rss_util import snakemake_local_cmd

from distributed_downloader import config as config_mod
from distributed_downloader.demo.testserver import max_requests_in_window
from distributed_downloader.engine import rounds as rounds_mod
from distributed_downloader.imaging import process as imaging
from distributed_downloader.store.jsonfiles import read_json as _read_json

REPO = Path(__file__).resolve().parents[1]
PEER_VENV = Path(__file__).resolve().parent / ".venv-peer"
REFUSALS = (429, 503)


@dataclass(frozen=True)
class Goals:
    makespan_ratio: float | None  # makespan <= this x max(bound, floor)
    recall: float
    refusal_share: float | None  # 429 + 503 share of all requests
    window: float | None  # worst 1 s window / (rate + burst)
    makespan_over: str = "max(bound, floor)"


GOALS = {
    "background": Goals(1.15, 0.995, 0.005, 1.0),
    "heavy": Goals(2.0, 0.99, None, None, "bound"),
    "nginx": Goals(None, 0.995, 0.005, 1.0),
}


# ----------------------------------------------------------------------------- server-side figures


@dataclass
class HostFigures:
    plan: HostPlan
    requests: int
    statuses: Counter
    worst_window: int  # most request starts in any 1 s, /robots.txt excluded
    peak_concurrency: int  # most requests in flight at once (refused ones included)
    first: float | None  # s since the run's reference
    last: float | None
    starts: list[float] = field(default_factory=list, repr=False)  # s since the reference
    log: list[Request] = field(default_factory=list, repr=False)  # the host's own log, monotonic times
    reference: float = 0.0

    @property
    def window_ratio(self) -> float:
        return self.worst_window / (self.plan.rate + self.plan.capacity)

    @property
    def concurrency_ratio(self) -> float | None:
        cap = self.plan.max_connections
        return None if cap is None else self.peak_concurrency / cap

    def per_window(self, width: float = 10.0) -> list[int]:
        counts: list[int] = []
        for t in self.starts:
            if t < 0:
                continue
            slot = int(t // width)
            counts.extend([0] * (slot + 1 - len(counts)))
            counts[slot] += 1
        return counts


def peak_concurrency(log: list[Request]) -> int:
    events = sorted([(r.start, 0) for r in log] + [(max(r.end, r.start), 1) for r in log])
    peak = current = 0
    for _, kind in events:
        current += 1 if kind == 0 else -1
        peak = max(peak, current)
    return peak


def host_figures(farm: RunningFarm, reference: float) -> list[HostFigures]:
    out = []
    for host in farm.scenario.hosts:
        log = farm.log(host.index)
        starts = sorted(r.start for r in log if r.path.split("?", 1)[0] != ROBOTS)
        after = [t for t in starts if t >= reference]
        out.append(
            HostFigures(
                plan=host,
                requests=len(log),
                statuses=Counter(r.status for r in log),
                worst_window=max_requests_in_window(starts, 1.0) if starts else 0,
                peak_concurrency=peak_concurrency(log),
                first=after[0] - reference if after else None,
                last=max(r.end for r in log) - reference if log else None,
                starts=[round(t - reference, 4) for t in starts],
                log=log,
                reference=reference,
            )
        )
    return out


@dataclass
class RunFigures:
    name: str
    wall: float  # the tool's whole run
    makespan: float | None
    hosts: list[HostFigures]
    retrievable: int
    retrieved: int  # successes among the retrievable URLs
    wrong_bytes: int  # successes whose bytes differ from the server's
    unexpected: int  # successes of URLs that cannot be retrieved
    missed_by_code: Counter = field(default_factory=Counter)  # retrievable URLs not retrieved, by error
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(h.requests for h in self.hosts)

    @property
    def refusal_share(self) -> float:
        total = self.requests
        return sum(h.statuses.get(s, 0) for h in self.hosts for s in REFUSALS) / total if total else 0.0

    def share(self, status: int) -> float:
        total = self.requests
        return sum(h.statuses.get(status, 0) for h in self.hosts) / total if total else 0.0

    @property
    def recall(self) -> float:
        return self.retrieved / self.retrievable if self.retrievable else 0.0

    @property
    def worst_window(self) -> HostFigures:
        return max(self.hosts, key=lambda h: h.window_ratio)

    @property
    def worst_concurrency(self) -> HostFigures | None:
        capped = [h for h in self.hosts if h.concurrency_ratio is not None]
        return max(capped, key=lambda h: h.concurrency_ratio or 0.0) if capped else None


# ----------------------------------------------------------------------------- the CPU floor


def _process_chunk(chunk: list[bytes]) -> int:
    settings = imaging.ImageSettings()  # the workflow's defaults: 720 px, JPEG q90
    done = 0
    for data in chunk:
        with contextlib.suppress(imaging.ImageError):
            imaging.process_image(data, settings)
            done += 1
    return done


def cpu_floor(images: list[bytes], workers: int) -> tuple[float, int]:
    """Seconds for ``workers`` processes to decode + resize + encode ``images`` (no network); (seconds, ok)."""
    chunks = [images[i : i + 200] for i in range(0, len(images), 200)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_process_chunk, [images[:4]] * workers))  # warm the workers up (imports, first decode)
        started = time.monotonic()
        done = sum(pool.map(_process_chunk, chunks))
        return time.monotonic() - started, done


# ----------------------------------------------------------------------------- running a tool


# --pin-farm: the CPUs every client (ours, the machine floor, img2dataset) runs on; the farm keeps
# the last one to itself, as servers on other machines would.
CLIENT_CPUS: set[int] | None = None


def pin_farm() -> str:
    """Keep this process (the loopback farm's threads start from it) on the last CPU, the clients
    on the others. Sharing the 2 cores, the farm stalled 20-28 times a run for >= 0.1 s and then
    stamped queued requests as arriving together (see bench/README)."""
    global CLIENT_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return f"--pin-farm needs 2 CPUs, this process may use {len(cpus)}: not pinned"
    CLIENT_CPUS = set(cpus[:-1])
    os.sched_setaffinity(0, {cpus[-1]})
    return f"farm pinned to CPU {cpus[-1]}, clients to CPUs {sorted(CLIENT_CPUS)}"


def _client_affinity() -> None:
    if CLIENT_CPUS:
        os.sched_setaffinity(0, CLIENT_CPUS)


def run_logged(
    cmd: list[str], log_path: Path, timeout: float, progress: Callable[[], str], env: dict | None = None
) -> tuple[int, float]:
    """Run `cmd` in its own process group with output to `log_path`; (exit code, seconds)."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            preexec_fn=_client_affinity,  # noqa: PLW1509 - one system call, no locks taken
        )
        next_report = started + 30
        while proc.poll() is None:
            now = time.monotonic()
            if now - started > timeout:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group of the process started just above
                proc.wait()
                print(f"  ... killed after {timeout:.0f} s (timeout)", flush=True)
                return -9, time.monotonic() - started
            if now >= next_report:
                print(f"  ... {now - started:.0f} s: {progress()}", flush=True)
                next_report += 30
            time.sleep(0.5)
    return proc.returncode, time.monotonic() - started


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def shuffled(scenario: Scenario) -> list[UrlPlan]:
    """The same (shuffled, as real lists are mixed) order for both tools."""
    rows = list(scenario.urls)
    random.Random(scenario.seed).shuffle(rows)
    return rows


# ----------------------------------------------------------------------------- ours


def write_config(workdir: Path, input_path: Path, batch_size: int, rounds: int, max_rate: float) -> Path:
    config = {
        "path_to_input": str(input_path),
        "path_to_output": str(workdir / "output"),
        "downloader_parameters": {
            "num_downloads": rounds,
            "max_nodes": 1,
            "workers_per_node": 2,
            "batch_size": batch_size,
            "max_rate_limit": max_rate,  # the fastest hidden rate is 66/s: the ceiling must not hide it
            "allow_private_addresses": True,  # the farm lives on loopback
        },
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def mono_of_mtime(path: Path) -> float | None:
    """A file's mtime on the time.monotonic() scale (the farms' logs are on it)."""
    try:
        return path.stat().st_mtime - (time.time() - time.monotonic())
    except OSError:
        return None


def run_ours(scenario: Scenario, workdir: Path, args: argparse.Namespace) -> RunFigures:
    workdir.mkdir(parents=True, exist_ok=True)
    farm = scenario.start(workdir / "nginx")
    try:
        rows = shuffled(scenario)
        input_path = workdir / "urls.csv"
        with open(input_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["uuid", "identifier", "source_id", "license", "source", "title"])
            for i, row in enumerate(rows):
                writer.writerow([row.uuid, farm.url(row), f"src-{i}", "CC-BY-4.0", "politeness bench", f"image {i}"])
        config_path = write_config(workdir, input_path, args.batch_size, args.rounds, args.max_rate)
        paths = config_mod.paths(config_mod.load(config_path))
        cmd = snakemake_local_cmd(config_path, workdir)
        log_path = workdir / "ours.log"
        print(f"  $ {' '.join(cmd)}\n  (log: {log_path})", flush=True)
        started = time.monotonic()
        timeout = max(900.0, 8 * scenario.bound)
        code, wall = run_logged(cmd, log_path, timeout, lambda: f"{farm.requests()} requests at the servers")
        notes = []
        if code != 0:
            notes.append(f"snakemake exited {code}; log tail:\n{tail(log_path, 30)}")
        round_start = mono_of_mtime(paths.state / "round_1_ranks.json")
        ends = {r: mono_of_mtime(paths.state / f"download_round_{r}.done") for r in range(1, args.rounds + 1)}
        finished = [r for r, end in ends.items() if end is not None]
        last_end = ends[max(finished)] if finished else None
        if finished and max(finished) < args.rounds:
            if code == 0 and not rounds_mod.more_rounds(paths.round_done(max(finished))):
                notes.append(f"round {max(finished)} left nothing to retry: the later rounds were not needed")
            else:
                notes.append(
                    f"only rounds {finished} of {args.rounds} finished: the makespan ends with round {max(finished)}"
                )
        makespan = last_end - round_start if round_start is not None and last_end is not None else None
        reference = round_start if round_start is not None else started
        time.sleep(0.5)  # the servers log a request just after its response left
        hosts = host_figures(farm, reference)
        figures = RunFigures("ours", wall, makespan, hosts, len(scenario.retrievable), 0, 0, 0, notes=notes)
        score_ours(figures, scenario, farm, paths.images)
        figures.extra = {
            "phases": {
                "start -> round 1 ranks up (initialize, profile, schedule, MPI start)": (
                    None if round_start is None else round_start - started
                ),
                **{
                    f"round {r} end (since round 1 ranks up)": None
                    if end is None or round_start is None
                    else end - round_start
                    for r, end in ends.items()
                },
                "last round end -> pipeline end (verify, report)": None
                if last_end is None
                else started + wall - last_end,
            },
            "server_names": {h.index: farm.describe_host(h.index) for h in scenario.hosts},
            "batches": _read_json(paths.state / "round_1_batches.json") or [],
            "lanes": {
                s["server_name"]: s["lanes"]
                for s in ((_read_json(paths.schedules / "round_1.json") or {}).get("servers", []))  # type: ignore[union-attr]
            },
            "logs": str(paths.logs / "download"),
        }
        return figures
    finally:
        farm.stop()


def score_ours(figures: RunFigures, scenario: Scenario, farm: RunningFarm, images: Path) -> None:
    by_uuid = {u.uuid: u for u in scenario.urls}
    retrieved: set[str] = set()
    for path in images.glob("server_name=*/partition_id=*/successes*.parquet"):
        table = pq.read_table(path, columns=["uuid", "hashsum_original"])
        for uuid, md5 in zip(
            table.column("uuid").to_pylist(), table.column("hashsum_original").to_pylist(), strict=True
        ):
            url = by_uuid.get(uuid)
            if url is None or uuid in retrieved:
                continue
            if not url.retrievable:
                figures.unexpected += 1
                continue
            retrieved.add(uuid)
            if md5 != farm.expected_md5(url):
                figures.wrong_bytes += 1
    figures.retrieved = len(retrieved)
    missed = {u.uuid for u in scenario.retrievable} - retrieved
    codes: Counter = Counter()
    for path in images.glob("server_name=*/partition_id=*/errors.parquet"):
        table = pq.read_table(path, columns=["uuid", "error_code"])
        for uuid, code in zip(table.column("uuid").to_pylist(), table.column("error_code").to_pylist(), strict=True):
            if uuid in missed:
                codes[f"{code} ({by_uuid[uuid].kind})"] += 1
                missed.discard(uuid)
    if missed:
        codes["no row at all"] = len(missed)
    figures.missed_by_code = codes


# ----------------------------------------------------------------------------- the peer


def ensure_peer() -> tuple[Path | None, str]:
    """img2dataset in its own venv (its pins may clash with ours); (executable or None, what happened)."""
    exe = PEER_VENV / "bin" / "img2dataset"
    python = PEER_VENV / "bin" / "python"
    started = time.monotonic()
    PEER_VENV.mkdir(parents=True, exist_ok=True)
    # Keeps the venv out of git and out of `ruff check bench` (its bin/ holds other projects' scripts).
    (PEER_VENV / ".gitignore").write_text("# created by bench/politeness_bench.py\n*\n")
    if exe.exists() and python.exists():
        check = subprocess.run([str(python), "-c", "import img2dataset"], capture_output=True, text=True)
        if check.returncode == 0:
            return exe, f"reused {PEER_VENV} (checked in {time.monotonic() - started:.1f} s)"
    steps = [
        [sys.executable, "-m", "venv", str(PEER_VENV)],
        [str(python), "-m", "pip", "install", "--quiet", "img2dataset"],
    ]
    for step in steps:
        try:
            result = subprocess.run(step, capture_output=True, text=True, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"`{' '.join(step)}` failed: {exc}"
        if result.returncode != 0:
            return None, f"`{' '.join(step)}` exited {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}"
    if not exe.exists():
        return None, f"pip installed img2dataset but {exe} is missing"
    return exe, f"created {PEER_VENV} and installed img2dataset in {time.monotonic() - started:.1f} s"


def peer_version() -> str:
    python = PEER_VENV / "bin" / "python"
    result = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('img2dataset'))"],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() or "?"


def run_peer(exe: Path, scenario: Scenario, workdir: Path, args: argparse.Namespace) -> RunFigures:
    workdir.mkdir(parents=True, exist_ok=True)
    farm = scenario.start(workdir / "nginx")
    try:
        rows = shuffled(scenario)
        by_url = {farm.url(row): row for row in rows}
        input_path = workdir / "peer_urls.csv"
        with open(input_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["url"])
            for url in by_url:
                writer.writerow([url])
        output = workdir / "peer_output"
        cmd = [
            str(exe),
            "--url_list",
            str(input_path),
            "--input_format",
            "csv",
            "--url_col",
            "url",
            "--output_format",
            "parquet",
            "--output_folder",
            str(output),
            "--processes_count",
            "2",
            "--thread_count",
            "32",
            "--image_size",
            "720",
            "--resize_mode",
            "keep_ratio",
            # Like ours, never upscale: else each small image is blown up to 720 px and re-encoded.
            "--resize_only_if_bigger",
            "True",
            "--retries",
            str(args.peer_retries),
        ]
        log_path = workdir / "peer.log"
        print(f"  $ {' '.join(cmd)}\n  (log: {log_path})", flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{exe.parent}{os.pathsep}{env.get('PATH', '')}"
        started = time.monotonic()
        code, wall = run_logged(cmd, log_path, 900.0, lambda: f"{farm.requests()} requests at the servers", env=env)
        notes = []
        if code != 0:
            notes.append(f"img2dataset exited {code}; log tail:\n{tail(log_path, 30)}")
        time.sleep(0.5)
        hosts = host_figures(farm, started)
        figures = RunFigures("img2dataset", wall, wall, hosts, len(scenario.retrievable), 0, 0, 0, notes=notes)
        score_peer(figures, scenario, by_url, output)
        figures.extra = {"version": peer_version()}
        return figures
    finally:
        farm.stop()


def score_peer(figures: RunFigures, scenario: Scenario, by_url: dict[str, UrlPlan], output: Path) -> None:
    retrieved: set[str] = set()
    failures: Counter = Counter()
    seen = 0
    for path in sorted(output.glob("*.parquet")):
        schema = pq.read_schema(path)
        columns = [c for c in ("url", "status", "error_message", "sha256") if c in schema.names]
        table = pq.read_table(path, columns=columns).to_pylist()
        for record in table:
            seen += 1
            url = by_url.get(record.get("url", ""))
            if url is None:
                continue
            if record.get("status") != "success":
                if url.retrievable:
                    failures[f"{(record.get('error_message') or '?')[:60]} ({url.kind})"] += 1
                continue
            if not url.retrievable:
                figures.unexpected += 1
                continue
            retrieved.add(url.uuid)
            digest = record.get("sha256")
            if digest and digest != hashlib.sha256(scenario.expected_bytes(url)).hexdigest():
                figures.wrong_bytes += 1
    figures.retrieved = len(retrieved)
    if seen != len(scenario.urls):
        figures.notes.append(f"img2dataset wrote {seen} rows for {len(scenario.urls)} URLs")
    figures.missed_by_code = failures


# ----------------------------------------------------------------------------- reporting


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def check(run: RunFigures, scenario: Scenario, floor: float) -> dict[str, bool]:
    goals = GOALS[scenario.name]
    checks: dict[str, bool] = {}
    if goals.makespan_ratio is not None:
        base = max(scenario.bound, floor) if goals.makespan_over != "bound" else scenario.bound
        label = f"makespan <= {goals.makespan_ratio} x {goals.makespan_over} ({goals.makespan_ratio * base:.1f} s)"
        checks[label] = run.makespan is not None and run.makespan <= goals.makespan_ratio * base
    checks[f"recall >= {goals.recall}"] = run.recall >= goals.recall
    if goals.refusal_share is not None:
        checks[f"429+503 share <= {goals.refusal_share:.1%}"] = run.refusal_share <= goals.refusal_share
    if goals.window is not None:
        checks["no host above rate + burst in any 1 s window"] = run.worst_window.window_ratio <= goals.window
    checks["no wrong bytes, no success of an unretrievable URL"] = not run.wrong_bytes and not run.unexpected
    return checks


def ratio(value: float | None, base: float) -> float | None:
    return None if value is None else value / base


def print_run(run: RunFigures, scenario: Scenario, floor: float) -> None:
    print(f"\n=== {run.name}: figures (measured at the servers) ===")
    bound = scenario.bound
    if run.name == "ours":
        print(
            "makespan, all rounds (round 1 ranks up -> last round's done file): "
            f"{fmt(run.makespan, '.1f', ' s')}; bound {bound:.1f} s; floor {floor:.1f} s; "
            f"makespan / max(bound, floor) {fmt(ratio(run.makespan, max(bound, floor)), '.3f')}"
        )
        print(f"whole pipeline (snakemake start -> exit): {run.wall:.1f} s")
        for phase, seconds in run.extra.get("phases", {}).items():
            print(f"  {phase}: {fmt(seconds, '.1f', ' s')}")
    else:
        print(
            f"wall time (process start -> exit): {run.wall:.1f} s; bound {bound:.1f} s; floor {floor:.1f} s; "
            f"wall / max(bound, floor) {run.wall / max(bound, floor):.3f}"
        )
    print(
        f"recall over retrievable URLs: {run.retrieved}/{run.retrievable} = {run.recall:.4f}; "
        f"wrong bytes {run.wrong_bytes}; successes of unretrievable URLs {run.unexpected}"
    )
    if run.missed_by_code:
        print(
            "  retrievable URLs missed, by error (kind): "
            + ", ".join(f"{k}: {n}" for k, n in run.missed_by_code.most_common(8))
        )
    statuses: Counter = Counter()
    for h in run.hosts:
        statuses.update(h.statuses)
    print(
        f"requests at the servers: {run.requests}; by status {dict(sorted(statuses.items()))}; "
        f"429+503 share {run.refusal_share:.2%} (429 {run.share(429):.2%}, 503 {run.share(503):.2%})"
    )
    refused = sorted(
        (h for h in run.hosts if any(h.statuses.get(s) for s in REFUSALS)),
        key=lambda h: -sum(h.statuses.get(s, 0) for s in REFUSALS),
    )
    if refused:
        print(
            "refusals by host (429/503 count, refusal style, urls@rate): "
            + " ".join(
                f"{h.plan.name}:{h.statuses.get(429, 0)}/{h.statuses.get(503, 0)} {h.plan.refusal}"
                f"{'+cap' if h.plan.max_connections else ''}"
                f" {h.plan.urls}@{h.plan.rate:g}"
                for h in refused[:10]
            )
            + (f" ... ({len(refused)} hosts)" if len(refused) > 10 else "")
        )
    worst = run.worst_window
    print(
        f"worst 1 s window / (rate + burst): {worst.window_ratio:.3f} on {worst.plan.name} "
        f"({worst.worst_window} requests vs {worst.plan.rate:g} + {worst.plan.capacity:g}); "
        f"hosts above: {sum(1 for h in run.hosts if h.window_ratio > 1.0)}/{len(run.hosts)}"
    )
    top = run.worst_concurrency
    if top is not None:
        over = [h for h in run.hosts if (h.concurrency_ratio or 0) > 1.0]
        print(
            f"worst concurrency / cap: {top.peak_concurrency}/{top.plan.max_connections} = {top.concurrency_ratio:.2f} "
            f"on {top.plan.name}; capped hosts above their cap: {len(over)}/"
            f"{sum(1 for h in run.hosts if h.plan.max_connections)}"
        )
    print(f"peak concurrency on any host: {max(h.peak_concurrency for h in run.hosts)}")
    if run.name == "img2dataset":
        print(f"img2dataset {run.extra.get('version', '?')}")
    for note in run.notes:
        print(f"NOTE: {note}")


def print_hosts(run: RunFigures, limit: int, trajectories: int = 5) -> None:
    """Per host, latest finishers first: the evidence for a makespan diagnosis."""
    by_server: dict[str, list[dict]] = defaultdict(list)
    for stats in run.extra.get("batches", []):
        by_server[stats.get("server_name", "")].append(stats)
    names = run.extra.get("server_names", {})
    lanes = run.extra.get("lanes", {})
    since = "round 1 ranks up" if run.name == "ours" else "its start"
    print(f"\n=== {run.name}: per host, latest finish first (s since {since}) ===")
    print(
        f"{'host':>5} {'urls':>5} {'retr':>5} {'rate':>5} {'cap':>3} {'ref':>6} {'bound':>6} {'lanes':>5} {'first':>6}"
        f" {'last':>6} {'last/bnd':>8} {'429':>4} {'503':>4} {'win':>5} {'conc':>5}  rate_end per batch (round 1)"
    )
    rows = sorted(run.hosts, key=lambda h: -(h.last or 0))
    for h in rows[:limit]:
        p = h.plan
        name = names.get(p.index, "")
        rates = " ".join(
            f"{b['rate_end']:.1f}"
            for b in sorted(by_server.get(name, []), key=lambda b: b.get("partition_id", 0))
            if "rate_end" in b
        )
        print(
            f"{p.name:>5} {p.urls:>5} {p.retrievable:>5} {p.rate:>5g} {p.max_connections or '-':>3} {p.refusal:>6}"
            f" {p.bound_seconds:>6.1f} {lanes.get(name, ''):>5} {fmt(h.first):>6} {fmt(h.last):>6}"
            f" {fmt(None if h.last is None else h.last / max(p.bound_seconds, 1e-9), '.2f'):>8}"
            f" {h.statuses.get(429, 0):>4} {h.statuses.get(503, 0):>4} {h.window_ratio:>5.2f}"
            f" {h.peak_concurrency:>2}/{p.max_connections or '-':<2}  {rates}"
        )
    print(f"requests per 10 s (the host allows rate x 10), {trajectories} latest finishers:")
    for h in rows[:trajectories]:
        print(f"  {h.plan.name} (limit {h.plan.rate * 10:g}): {' '.join(map(str, h.per_window(10.0)))}")


def print_comparison(runs: list[RunFigures], scenario: Scenario, floor: float, peer_status: str) -> bool:
    print(f"\n=== {scenario.name}: comparison ===")
    width = 50
    print(f"{'figure':<{width}}" + "".join(f" {r.name:>16}" for r in runs))

    def line(label: str, values: list[str]) -> None:
        print(f"{label:<{width}}" + "".join(f" {v:>16}" for v in values))

    base = max(scenario.bound, floor)
    line("makespan, s (ours: all rounds; peer: wall)", [fmt(r.makespan) for r in runs])
    line("politeness bound max(retrievable/rate), s", [f"{scenario.bound:.1f}" for _ in runs])
    line("floor: max(CPU floor, machine floor), s", [f"{floor:.1f}" for _ in runs])
    line("makespan / bound", [fmt(None if r.makespan is None else r.makespan / scenario.bound, ".3f") for r in runs])
    line(
        "makespan / max(bound, floor)",
        [fmt(None if r.makespan is None else r.makespan / base, ".3f") for r in runs],
    )
    line("recall over retrievable URLs", [f"{r.recall:.4f}" for r in runs])
    line("requests at the servers", [str(r.requests) for r in runs])
    line("429+503 share of requests", [f"{r.refusal_share:.2%}" for r in runs])
    line("worst host 1 s window / (rate + burst)", [f"{r.worst_window.window_ratio:.3f}" for r in runs])
    line(
        "worst concurrency / cap",
        [fmt(None if r.worst_concurrency is None else r.worst_concurrency.concurrency_ratio, ".2f") for r in runs],
    )
    line("whole run wall time, s", [f"{r.wall:.1f}" for r in runs])
    if len(runs) == 1:
        print(f"(img2dataset not run: {peer_status})")
    ours_passed = True
    for run in runs:
        checks = check(run, scenario, floor)
        print(f"\n=== goals, {scenario.name}: {run.name} ===")
        for label, ok in checks.items():
            print(f"  {verdict(ok)}  {label}")
        if run.name == "ours":
            ours_passed = all(checks.values())
    return ours_passed


def save_timelines(run: RunFigures, path: Path) -> None:
    """Every host's limits and request log, for later study."""
    data = {
        h.plan.name: {
            "urls": h.plan.urls,
            "retrievable": h.plan.retrievable,
            "rate": h.plan.rate,
            "capacity": h.plan.capacity,
            "max_connections": h.plan.max_connections,
            "statuses": {str(k): v for k, v in h.statuses.items()},
            "requests": [  # the host's log: [start, end] in s since the reference, status, path, connection
                [round(r.start - h.reference, 4), round(r.end - h.reference, 4), r.status, r.path, r.connection]
                for r in h.log
            ],
        }
        for h in run.hosts
    }
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- main


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="background")
    parser.add_argument("--quick", action="store_true", help="a small smoke version (about a minute)")
    parser.add_argument("--servers", type=int, help="hosts (default: background 50, heavy 8, nginx 20)")
    parser.add_argument(
        "--urls", type=int, help="URLs in total (default: 20000 / 1030 / 20000; --quick: 2000 / 400 / 1500)"
    )
    parser.add_argument("--seed", type=int, default=3, help="farm seed (default 3)")
    parser.add_argument("--image", type=parse_size, default=(64, 48), help="served image size WxH (default 64x48)")
    parser.add_argument("--batch-size", type=int, default=500, help="our batch_size (default 500)")
    parser.add_argument("--rounds", type=int, default=2, help="our num_downloads (default 2)")
    parser.add_argument("--max-rate", type=float, default=80.0, help="our max_rate_limit (default 80)")
    parser.add_argument("--skip-peer", action="store_true", help="do not run img2dataset")
    parser.add_argument(
        "--no-machine-floor", action="store_true", help="do not time the limits-lifted run (floor: CPU only)"
    )
    parser.add_argument(
        "--peer-retries", type=int, default=0, help="img2dataset --retries (default 0, its own default)"
    )
    parser.add_argument("--workdir", type=Path, help="work folder (default: a new one under /tmp)")
    parser.add_argument("--per-host", type=int, default=12, help="rows of the per-host table (default 12)")
    parser.add_argument(
        "--pin-farm",
        action="store_true",
        help="the loopback farm on the last CPU, every client on the others (servers apart from the client)",
    )
    args = parser.parse_args(argv)
    if args.pin_farm:
        print(pin_farm(), flush=True)

    bench_started = time.monotonic()
    if args.scenario == "nginx" and (reason := nginx_unavailable()):
        print(f"cannot run --scenario nginx: {reason}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"politeness_{args.scenario}_"))
    workdir.mkdir(parents=True, exist_ok=True)
    scenario = plan(args.scenario, args.servers, args.urls, args.seed, args.quick, args.image)
    kinds = Counter(u.kind for u in scenario.urls)
    print(
        f"politeness bench, scenario {scenario.name}{' (quick)' if args.quick else ''}: {len(scenario.hosts)} hosts, "
        f"{len(scenario.urls)} URLs, {len(scenario.retrievable)} retrievable, seed {scenario.seed}"
    )
    print(f"URL kinds: {dict(kinds.most_common())}")
    print(f"work folder: {workdir}")
    print("hidden limits, latest-bound first (cap. = bucket capacity, i.e. burst; conns = connection cap):")
    print(scenario.describe())
    print(
        f"politeness bound max(retrievable/rate) = {scenario.bound:.1f} s "
        f"(counting every request a perfect client needs, faulty URLs included: {scenario.requests_bound:.1f} s); "
        f"sum of hidden rates {sum(h.rate for h in scenario.hosts):g}/s"
    )

    workers = os.cpu_count() or 1
    images = [scenario.expected_bytes(u) for u in scenario.retrievable]
    floor, processed = cpu_floor(images, workers)
    print(
        f"CPU floor: process_image over the {len(images)} retrievable images on {workers} processes: "
        f"{floor:.1f} s ({processed} ok)"
    )

    cpu = floor
    if scenario.backend == "testserver" and not args.no_machine_floor:
        print("\n=== machine floor: ours on the same farm with every limit and fault lifted ===", flush=True)
        free = run_ours(lifted(scenario), workdir / "floor", argparse.Namespace(**{**vars(args), "rounds": 1}))
        if free.makespan is not None and free.recall >= 0.99:
            floor = max(cpu, free.makespan)
        print(
            f"machine floor: {fmt(free.makespan, '.1f', ' s')} for {len(scenario.retrievable)} images "
            f"(recall {free.recall:.4f}, {free.requests} requests); floor used: {floor:.1f} s",
            flush=True,
        )

    exe: Path | None = None
    peer_status = "skipped (--skip-peer)"
    if not args.skip_peer:
        print("\n=== peer setup ===", flush=True)
        exe, peer_status = ensure_peer()
        print(peer_status if exe else f"img2dataset cannot be used here: {peer_status}", flush=True)

    runs: list[RunFigures] = []
    print("\n=== ours: the workflow (local profile, 1 node x 2 ranks), fresh farm ===", flush=True)
    ours = run_ours(scenario, workdir / "ours", args)
    runs.append(ours)
    print_run(ours, scenario, floor)
    print_hosts(ours, args.per_host)
    save_timelines(ours, workdir / "timelines_ours.json")
    print(f"per-rank logs: {ours.extra.get('logs')}; request timelines: {workdir / 'timelines_ours.json'}")
    if exe is not None:
        print(f"\n=== img2dataset {peer_version()}, same hosts and URLs, fresh farm ===", flush=True)
        peer = run_peer(exe, scenario, workdir / "peer", args)
        runs.append(peer)
        print_run(peer, scenario, floor)
        print_hosts(peer, 5, trajectories=3)
        save_timelines(peer, workdir / "timelines_peer.json")
    passed = print_comparison(runs, scenario, floor, peer_status)
    summary = {
        "scenario": scenario.name,
        "quick": args.quick,
        "hosts": len(scenario.hosts),
        "urls": len(scenario.urls),
        "retrievable": len(scenario.retrievable),
        "bound_seconds": scenario.bound,
        "cpu_floor_seconds": cpu,
        "floor_seconds": floor,
        "runs": {
            r.name: {
                "wall": r.wall,
                "makespan": r.makespan,
                "recall": r.recall,
                "requests": r.requests,
                "refusal_share": r.refusal_share,
                "worst_window_ratio": r.worst_window.window_ratio,
                "worst_concurrency_ratio": None
                if r.worst_concurrency is None
                else r.worst_concurrency.concurrency_ratio,
                "checks": check(r, scenario, floor),
            }
            for r in runs
        },
        "peer": peer_status,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nbench wall time {time.monotonic() - bench_started:.0f} s; summary: {workdir / 'summary.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
