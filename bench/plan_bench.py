"""Planning overhead at scale: `snakemake -n` and a no-op rerun over ~20k batches.

    python bench/plan_bench.py                  # 20,000 batches on 545 servers
    python bench/plan_bench.py --batches 5000

It fabricates an initialized output (manifest, tiny urls.parquet per batch, profiles table; half of
the batches with successes/errors files and a completion marker), then, with the real Snakefile
and profiles/local, times:
  1. `snakemake -n` on the half-done output (goal <= 10 s);
  2. a real run after the other half is marked done: what a rerun does when every batch is already
     downloaded but the rounds were never recorded (schedule x rounds, an MPI download job per round
     that finds nothing to do, verify, report plots), with each job's duration;
  3. `snakemake -n` and a real rerun once everything is done: "Nothing to be done" (goal <= 10 s).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss_util import cache_dir, snakemake_local_cmd  # noqa: E402

from distributed_downloader import config as config_mod  # noqa: E402
from distributed_downloader.plan import partition, profiling  # noqa: E402
from distributed_downloader.store.files import (
    ERROR_SCHEMA,
    ERRORS_FILE,
    SUCCESS_SCHEMA,
    SUCCESSES_FILE,
    Marker,
    atomic_write_json,
    write_marker,
)

ROWS_PER_BATCH = 2
N_SERVERS = 545
GOAL_SECONDS = 10.0


def batches_per_server(total: int) -> list[int]:
    """Zipf-like split of `total` batches over N_SERVERS servers, each with at least one."""
    weights = 1.0 / np.arange(1, N_SERVERS + 1) ** 1.1
    counts = np.maximum(1, np.floor(weights / weights.sum() * total)).astype(int)
    counts[0] += total - counts.sum()
    return counts.tolist()


def _urls(server: str, pid: int) -> pa.Table:
    ids = [f"{server}-{pid}-{k}" for k in range(ROWS_PER_BATCH)]
    return pa.table(
        {
            "uuid": ids,
            "source_id": ids,
            "identifier": [f"https://{server}/img/{pid}/{k}.jpg" for k in range(ROWS_PER_BATCH)],
            "license": ["CC0"] * ROWS_PER_BATCH,
            "source": ["bench"] * ROWS_PER_BATCH,
            "title": ["t"] * ROWS_PER_BATCH,
        },
        schema=partition.URL_SCHEMA,
    )


def mark_done(paths: config_mod.Paths, server: str, pid: int, fingerprint: str) -> None:
    urls = _urls(server, pid).to_pylist()
    folder = paths.batch_images(server, pid)
    folder.mkdir(parents=True, exist_ok=True)
    successes = [
        {
            **{k: row[k] for k in ("uuid", "source_id", "identifier", "license", "source", "title")},
            "is_license_full": True,
            "hashsum_original": "0" * 32,
            "hashsum_resized": "1" * 32,
            "original_size": [10, 10],
            "resized_size": [10, 10],
            "image": b"x",
        }
        for row in urls
    ]
    pq.write_table(pa.Table.from_pylist(successes, schema=SUCCESS_SCHEMA), folder / SUCCESSES_FILE)
    pq.write_table(ERROR_SCHEMA.empty_table(), folder / ERRORS_FILE)
    write_marker(folder, Marker(fingerprint, 1, ROWS_PER_BATCH, 0, 0))


def fabricate(root: Path, total_batches: int) -> tuple[Path, config_mod.Paths, dict]:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    source = root / "urls.csv"
    source.write_text("uuid,identifier,source_id\nx,https://example.org/x.jpg,x\n")
    time.sleep(0.05)  # the input must be older than the manifest
    config_path = root / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "path_to_input": str(source),
                "path_to_output": str(root / "output"),
                "downloader_parameters": {"batch_size": ROWS_PER_BATCH, "workers_per_node": 2, "num_downloads": 2},
            }
        )
    )
    cfg = config_mod.load(config_path)
    paths = config_mod.paths(cfg)
    servers = {}
    counts = batches_per_server(total_batches)
    names = [f"images{i}.museum-{i % 17}.org" for i in range(N_SERVERS)]
    done = 0
    for name, count in zip(names, counts, strict=True):
        prints = []
        for pid in range(count):
            table = _urls(name, pid)
            target = paths.batch_urls(name, pid)
            target.parent.mkdir(parents=True)
            pq.write_table(table, target, compression="zstd")
            prints.append(partition.fingerprint(table))
            if (done + pid) % 2 == 0:
                mark_done(paths, name, pid, prints[-1])
        done += count
        servers[name] = {"urls": count * ROWS_PER_BATCH, "fingerprints": prints}
    manifest = {
        "batch_size": ROWS_PER_BATCH,
        "input_rows": done * ROWS_PER_BATCH,
        "rejected_rows": 0,
        "total_urls": done * ROWS_PER_BATCH,
        "servers": servers,
    }
    pq.write_table(partition.REJECTED_SCHEMA.empty_table(), paths.rejected_table)
    atomic_write_json(paths.urls_manifest, manifest)
    time.sleep(0.05)
    profiles = [
        (
            profiling.ServerProfile(
                server_name=name,
                total_batches=len(info["fingerprints"]),
                total_urls=info["urls"],
                rate_limit=3.0,
                max_rate=50.0,
                max_connections=8,
                latency_ms=20.0,
                probe_status=200,
                robots_found=False,
                crawl_delay=0.0,
                advertised_rate=0.0,
                reachable=True,
            ),
            None,
        )
        for name, info in servers.items()
    ]
    profiling.write_tables(profiles, paths.profiles_table, paths.ignored_table, paths.robots)
    return config_path, paths, manifest


def snakemake(config: Path, workdir: Path, *extra: str) -> tuple[float, str]:
    cmd = snakemake_local_cmd(config, workdir, *extra)
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - started
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(extra)} failed ({result.returncode}):\n{text[-5000:]}")
    return seconds, text


_STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]")
_START = re.compile(r"^(?:local)?rule (\w+):")
_JOBID = re.compile(r"^\s+jobid: (\d+)")
_WILDCARDS = re.compile(r"^\s+wildcards: (.*)")
_FINISHED = re.compile(r"^Finished jobid: (\d+)")


def job_durations(text: str) -> list[tuple[str, float]]:
    """(rule[wildcards], seconds) per job, from the timestamps of Snakemake's own log."""
    stamp: datetime | None = None
    started: dict[str, list] = {}  # jobid -> [rule, wildcards, start]
    current: list | None = None
    out = []
    for line in text.splitlines():
        if m := _STAMP.match(line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := _START.match(line):
            current = [m.group(1), "", stamp]
        elif (m := _JOBID.match(line)) and current is not None:
            started[m.group(1)] = current
        elif (m := _WILDCARDS.match(line)) and current is not None:
            current[1] = m.group(1)
        elif (m := _FINISHED.match(line)) and m.group(1) in started and stamp is not None:
            rule, wildcards, begin = started.pop(m.group(1))
            out.append((f"{rule}[{wildcards}]" if wildcards else rule, (stamp - begin).total_seconds()))
    return out


def verdict(seconds: float) -> str:
    return "met" if seconds <= GOAL_SECONDS else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20_000)
    args = parser.parse_args(argv)
    root = cache_dir("plan") / "run"
    started = time.monotonic()
    config, paths, manifest = fabricate(root, args.batches)
    total = sum(len(s["fingerprints"]) for s in manifest["servers"].values())
    print(
        f"plan bench: {total:,} batches on {len(manifest['servers'])} servers, fabricated in "
        f"{time.monotonic() - started:.1f}s under {root}"
    )

    seconds, text = snakemake(config, root, "-n")
    jobs = re.findall(r"^(?:local)?rule (\w+):", text, re.M)
    print(
        f"  snakemake -n, half of the batches done:   {seconds:5.1f}s ({len(jobs)} jobs planned)  goal <= 10 s: "
        f"{verdict(seconds)}"
    )

    for name, info in manifest["servers"].items():  # now every batch is downloaded
        for pid, fp in enumerate(info["fingerprints"]):
            if not (paths.batch_images(name, pid) / "_completed").exists():
                mark_done(paths, name, pid, fp)
    seconds, text = snakemake(config, root)
    print(f"  run with every batch already downloaded:  {seconds:5.1f}s  (rounds recorded, verified, plotted)")
    for name, job_seconds in job_durations(text):
        print(f"      {name:28s} {job_seconds:5.0f}s")

    seconds, text = snakemake(config, root, "-n")
    nothing = "Nothing to be done" in text
    print(
        f"  snakemake -n, all done:                   {seconds:5.1f}s  nothing to do: {nothing}  goal <= 10 s: "
        f"{verdict(seconds)}"
    )
    seconds, text = snakemake(config, root)
    nothing = "Nothing to be done" in text
    print(
        f"  no-op rerun, all done:                    {seconds:5.1f}s  nothing to do: {nothing}  goal <= 10 s: "
        f"{verdict(seconds)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
