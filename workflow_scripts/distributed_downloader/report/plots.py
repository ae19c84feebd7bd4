"""Figures for `snakemake --report`: throughput, errors by server and code, rate over time."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from distributed_downloader.config import Paths  # noqa: E402

MOST_SERVERS = 25  # beyond this a bar chart is unreadable; the CSV has them all


def load_batch_stats(paths: Paths) -> list[dict]:
    stats: list[dict] = []
    for round_no, path in paths.round_states("batches").items():
        stats.extend({**s, "round": round_no} for s in json.loads(path.read_text()))
    return stats


def _top_servers(verification: Mapping, key: str = "urls") -> list[str]:
    servers = verification["servers"]
    return sorted(servers, key=lambda n: (-servers[n][key], n))[:MOST_SERVERS]


def throughput(verification: Mapping, stats: list[dict], out: Path) -> None:
    seconds: dict[str, float] = defaultdict(float)
    images: dict[str, int] = defaultdict(int)
    for s in stats:
        seconds[s["server_name"]] += s["seconds"]
        images[s["server_name"]] += s["successes"]
    names = _top_servers(verification)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(3, 0.35 * len(names) + 1.5)), sharey=True)
    left.barh(names, [images[n] / seconds[n] if seconds[n] else 0 for n in names], color="#4477aa")
    left.set_xlabel("images per second (per lane-second of downloading)")
    right.barh(names, [verification["servers"][n]["success_rate"] for n in names], color="#228833")
    right.set_xlabel("success rate")
    right.set_xlim(0, 1)
    left.invert_yaxis()
    fig.suptitle("Throughput and success by server")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def errors_by_server(paths_images: Path, verification: Mapping, out: Path) -> None:
    import duckdb

    files = str(paths_images / "*" / "*" / "errors.parquet")
    names = _top_servers(verification, "errors")
    fig, ax = plt.subplots(figsize=(12, max(3, 0.35 * len(names) + 1.5)))
    if any(paths_images.glob("*/*/errors.parquet")):
        query = "select server_name, error_code, count(*) from read_parquet(?, hive_partitioning=true) group by 1, 2"
        rows = duckdb.execute(query, [files]).fetchall()  # a bound parameter: any path is safe
    else:
        rows = []
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    for server, code, count in rows:
        counts[int(code)][server] = count
    left = [0] * len(names)
    for code in sorted(counts):
        values = [counts[code].get(n, 0) for n in names]
        ax.barh(names, values, left=left, label=str(code))
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("error rows")
    if counts:
        ax.legend(title="error code", loc="lower right")
    ax.set_title("Errors by server and code (HTTP status, or negative: see README)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def rate_over_time(stats: list[dict], out: Path) -> None:
    """Each server's paced request rate (sum over its lanes) as the run went."""
    if stats:
        origin = min(s.get("started_at", 0.0) for s in stats)
    by_server: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in stats:
        for t, rate in s.get("rate_samples", []):
            by_server[s["server_name"]].append((s.get("started_at", 0.0) - origin + t, rate))
    busiest = sorted(by_server, key=lambda n: -len(by_server[n]))[:12]
    fig, ax = plt.subplots(figsize=(12, 5))
    for name in busiest:
        points = sorted(by_server[name])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1, label=name)
    ax.set_xlabel("seconds since the first batch started")
    ax.set_ylabel("requests/s (per lane)")
    ax.set_title("Adaptive rate over time (the 12 longest-running servers)")
    if busiest:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def make_all(verification_path: Path, paths: Paths, outputs: Mapping[str, Path]) -> None:
    verification = json.loads(Path(verification_path).read_text())
    stats = load_batch_stats(paths)
    for path in outputs.values():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    throughput(verification, stats, Path(outputs["throughput"]))
    errors_by_server(paths.images, verification, Path(outputs["errors"]))
    rate_over_time(stats, Path(outputs["rates"]))
