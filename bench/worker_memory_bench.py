"""Peak RSS per MPI rank of the real download job, at two batch sizes.

    python bench/worker_memory_bench.py                       # 2 hosts x 5,000 URLs, batch_size 1,000 and 10,000
    python bench/worker_memory_bench.py --urls-per-host 10000 # a full 10,000-row batch per host (~2x longer)

A loopback ImageFarm serves 1600x1200 JPEGs (~240 kB, photo-like noise). Every URL is distinct
(`/img/k<j>.jpg?w=1600&h=1200&n=<i>`: the farm ignores the unknown `n`), over `--keys` distinct
images, rendered once before the run so the farm's generation CPU does not compete with the ranks.
The whole workflow runs with the real Snakefile and profiles/local (2 MPI ranks under mpiexec);
this process polls the process tree with psutil and reads each process's own peak (VmHWM) from
/proc, so nothing is added to the worker. The claim to check: a rank's memory does not grow with
the batch size (rows are streamed to the parquet writers in small row groups).

Each server gets one lane (schedule_rules {1: 1}) and each rank holds one lane at a time
(threads_per_worker 2), so both batch sizes run the same concurrency: only the rows per batch change.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss_util import cache_dir, run_measured, snakemake_local_cmd  # noqa: E402

from distributed_downloader.demo.testserver import HostSpec, ImageFarm  # noqa: E402

SIZE = "w=1600&h=1200"


def write_input(farm: ImageFarm, path: Path, urls_per_host: int, keys: int) -> int:
    rows = 0
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uuid", "identifier", "source_id", "license", "source", "title"])
        for host in range(len(farm.base_urls)):
            for i in range(urls_per_host):
                url = farm.url(host, f"/img/k{i % keys}.jpg?{SIZE}&n={i}")
                writer.writerow([f"h{host}-{i}", url, f"src-{i}", "CC0", "bench farm", f"image {i}"])
                rows += 1
    return rows


def write_config(folder: Path, source: Path, batch_size: int) -> Path:
    config = {
        "path_to_input": str(source),
        "path_to_output": str(folder / "output"),
        "schedule_rules": {1: 1},  # one lane per server
        "downloader_parameters": {
            "threads_per_worker": 2,  # one lane per rank
            "num_downloads": 1,
            "max_nodes": 1,
            "workers_per_node": 2,
            "batch_size": batch_size,
            "default_rate_limit": 200,
            "max_rate_limit": 400,
            "max_connections_per_server": 8,
            "allow_private_addresses": True,  # the farm lives on loopback
            "respect_robots_txt": False,
            "image_size": 720,
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_once(farm: ImageFarm, batch_size: int, urls_per_host: int, keys: int) -> dict:
    folder = cache_dir("worker-memory") / f"batch_{batch_size}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rows = write_input(farm, folder / "urls.csv", urls_per_host, keys)
    config = write_config(folder, folder / "urls.csv", batch_size)
    cmd = snakemake_local_cmd(config, folder)
    measured = run_measured(cmd, poll=0.1)
    if measured.returncode != 0:
        raise SystemExit(f"workflow failed at batch_size {batch_size}:\n{measured.stderr[-4000:]}")
    output = folder / "output"
    verification = json.loads((output / "reports" / "verification.json").read_text())
    done = json.loads((output / "state" / "download_round_1.done").read_text())
    pythons = {
        pid: peak
        for pid, peak in measured.peak_rss_per_process_mb.items()
        if Path(measured.names.get(pid, " ").split()[0]).name.startswith("python")
    }
    ranks = {pid: peak for pid, peak in pythons.items() if "download_worker.py" in measured.names[pid]}
    stages = {pid: peak for pid, peak in pythons.items() if pid not in ranks and pid != measured.root_pid}
    result = {
        "batch_size": batch_size,
        "rows": rows,
        "batches": verification["totals"]["batches"],
        "successes": verification["totals"]["successes"],
        "errors": verification["totals"]["errors"],
        "ok": verification["ok"],
        "wall_s": measured.seconds,
        "download_s": done["progress"].get("elapsed_s", 0.0),
        "images_per_s": done["progress"].get("images_per_s", 0.0),
        "rank_peaks_mb": sorted(ranks.values(), reverse=True),
        "other_python_peak_mb": max(stages.values(), default=0.0),
    }
    shutil.rmtree(output / "downloaded_images", ignore_errors=True)  # keep the cache small
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--urls-per-host", type=int, default=5000)
    parser.add_argument("--keys", type=int, default=256, help="distinct images (the farm caches 512)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1000, 10000])
    args = parser.parse_args(argv)
    with ImageFarm([HostSpec(f"h{i}") for i in range(args.hosts)]) as farm:
        started = time.monotonic()
        sizes = [len(farm.expected_bytes(f"/img/k{k}.jpg?{SIZE}")) for k in range(args.keys)]
        print(
            f"worker memory bench: {args.hosts} hosts x {args.urls_per_host:,} URLs of 1600x1200 JPEGs "
            f"({args.keys} distinct images, mean {sum(sizes) / len(sizes) / 1e3:.0f} kB, rendered in "
            f"{time.monotonic() - started:.0f}s), 2 ranks, image_size 720, profiles/local"
        )
        results = []
        for batch_size in args.batch_sizes:
            result = run_once(farm, batch_size, args.urls_per_host, args.keys)
            results.append(result)
            peaks = ", ".join(f"{p:.0f}" for p in result["rank_peaks_mb"])
            print(
                f"  batch_size {batch_size:>6,}: {result['batches']} batches, {result['successes']:,} images "
                f"({result['errors']} errors, verified {result['ok']}) in {result['download_s']:.0f}s "
                f"({result['images_per_s']}/s); peak RSS per rank: {peaks} MB; "
                f"largest other stage: {result['other_python_peak_mb']:.0f} MB; workflow {result['wall_s']:.0f}s",
                flush=True,
            )
    if len(results) >= 2:
        low, high = results[0], results[-1]
        ratio = max(high["rank_peaks_mb"]) / max(low["rank_peaks_mb"])
        print(
            f"\n  rows per batch x{high['rows'] / high['batches'] / (low['rows'] / low['batches']):.0f}"
            f" -> max rank peak x{ratio:.2f} ({max(low['rank_peaks_mb']):.0f} -> {max(high['rank_peaks_mb']):.0f} MB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
