"""Monthly snapshots (issue #18): what a second snapshot costs, and the match at scale.

    python bench/snapshot_bench.py --part runs                # (a) two snapshots on the loopback farm
    python bench/snapshot_bench.py --part plan --rows 2000000 20000000   # (b) the match alone
    python bench/snapshot_bench.py                            # both, default sizes

(a) Two snapshots through the real workflow (profiles/local, 2 MPI ranks) against one loopback
    ImageFarm whose hosts hold a hidden rate limit (token bucket, like the real servers whose budget
    this issue saves). Snapshot 1: ``--urls`` URLs over ``--hosts`` hosts. Snapshot 2: 90% of them
    (new uuids), 10% new URLs; between the runs 1% of the kept images change on the server and 0.25%
    disappear (404). Figures, from the farm's own request logs: image requests of run 2 (refusals
    included) against new URLs + the revalidation sample, the distinct URLs asked, the replaced and
    byte-identical rows, and run 2's time as a share of run 1's (whole workflow, and download round).
(b) ``snapshot.plan`` alone on synthetic data: a previous dataset of N rows (95% successes with
    validators, 5% errors) in batch folders of 10,000, and a new URL list of N rows cut the same way,
    90% of them the previous URLs; 545 servers, Zipf sizes. Measured in a fresh child process (DuckDB
    on all cores, memory_mb 2048): seconds, rows/s and peak RSS (psutil over the process, and VmHWM).
    Inputs are cached under $DD_BENCH_CACHE/snapshot (default <tmp>/dd-bench).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from farm import zipf_counts  # noqa: E402
from rss_util import cache_dir, run_measured, snakemake_local_cmd  # noqa: E402

from distributed_downloader import config as config_mod  # noqa: E402
from distributed_downloader.demo.testserver import HostSpec, ImageFarm  # noqa: E402
from distributed_downloader.store.files import ERROR_SCHEMA, SUCCESS_SCHEMA  # noqa: E402

BATCH = 10_000
SERVERS = 545
IMAGE = "w=64&h=48"


# ----------------------------------------------------------------------------- (a) two snapshots


def _config(folder: Path, urls_csv: Path, previous: Path | None, rate: float) -> Path:
    config = {
        "path_to_input": str(urls_csv),
        "path_to_output": str(folder / "output"),
        "downloader_parameters": {
            "num_downloads": 2,
            "workers_per_node": 2,
            "batch_size": 1000,
            "default_rate_limit": min(3.0, rate),
            "max_rate_limit": 50,
            "allow_private_addresses": True,
            "timeout": {"connect": 5, "read": 10, "total": 30},
        },
    }
    if previous is not None:
        config["previous_dataset"] = str(previous)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["uuid,identifier,source_id,license,source,title"]
    lines += [f"{u},{url},{s},cc-by,bench farm,image" for u, url, s in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(config: Path, workdir: Path) -> tuple[float, float]:
    """Seconds of the whole workflow, and of its download rounds (from the rounds' done files)."""
    started = time.monotonic()
    result = run_measured(snakemake_local_cmd(config, workdir), timeout=7200)
    if result.returncode:
        raise SystemExit(f"workflow failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    rounds = 0.0
    for done in glob.glob(str(workdir / "output" / "state" / "download_round_*.done")):
        rounds += float((json.loads(Path(done).read_text()).get("progress") or {}).get("elapsed_s", 0.0))
    return time.monotonic() - started, rounds


def _image_log(farm: ImageFarm, hosts: int) -> list[tuple[str, int]]:
    return [
        (farm.base_urls[h] + e.path, e.status)
        for h in range(hosts)
        for e in farm.request_log(h)
        if e.path != "/robots.txt"
    ]


def _stored(output: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for path in glob.glob(str(output / "downloaded_images" / "*" / "*" / "successes*.parquet")):
        for row in pq.read_table(path, columns=["uuid", "identifier", "hashsum_original", "image"]).to_pylist():
            rows[row["identifier"]] = row
    return rows


def bench_runs(urls: int, hosts: int, rate: float) -> dict:
    base = cache_dir("snapshot") / "runs"
    shutil.rmtree(base, ignore_errors=True)
    specs = [HostSpec(f"h{i}", rate_limit=rate, burst=rate) for i in range(hosts)]
    with ImageFarm(specs, seed=18) as farm:
        per_host = urls // hosts
        keep = int(per_host * 0.9)
        first = [
            (f"a{h}-{i}", farm.url(h, f"/img/b{h}-{i}.jpg?{IMAGE}"), f"r{h}-{i}")
            for h in range(hosts)
            for i in range(per_host)
        ]
        second = [
            (f"b{h}-{i}", farm.url(h, f"/img/b{h}-{i}.jpg?{IMAGE}"), f"r{h}-{i}")
            for h in range(hosts)
            for i in range(per_host - keep, 2 * per_host - keep)
        ]
        config1 = _config(base / "s1", _csv(base / "s1" / "urls.csv", first), None, rate)
        seconds1, rounds1 = _run(config1, base / "s1")
        requests1 = len(_image_log(farm, hosts))
        before = _stored(base / "s1" / "output")
        old = sorted({url for _, url, _ in second} & {url for _, url, _ in first})
        changed = set(old[::100])  # 1% of the kept images change on the server
        removed = set(old[50::400])  # 0.25% disappear
        for url in changed:
            farm.change_image(url)
        for url in removed:
            farm.remove_image(url)
        farm.reset_stats()
        config2 = _config(base / "s2", _csv(base / "s2" / "urls.csv", second), base / "s1" / "output", rate)
        seconds2, rounds2 = _run(config2, base / "s2")
        log = _image_log(farm, hosts)
        paths = config_mod.paths(config_mod.load(config2))
        report = json.loads((paths.reports / "snapshot_changes.json").read_text())
        verification = json.loads((paths.reports / "verification.json").read_text())
        after = _stored(base / "s2" / "output")
    totals = report["totals"]
    new_urls = {url for _, url, _ in second} - set(before)
    asked = Counter(url for url, _ in log)
    sample_asked = set(asked) - new_urls
    refusals = sum(1 for _, status in log if status in (429, 503))
    reused = [u for u in old if u in after and u not in asked]
    identical = sum(after[u]["image"] == before[u]["image"] for u in reused)
    replaced = [u for u in changed if u in asked]
    replaced_ok = sum(after[u]["hashsum_original"] != before[u]["hashsum_original"] for u in replaced)
    stale = [u for u in changed if u not in asked]
    return {
        "urls": len(first),
        "hosts": hosts,
        "hidden_rate": rate,
        "run1_seconds": round(seconds1, 1),
        "run1_download_seconds": round(rounds1, 1),
        "run1_image_requests": requests1,
        "run2_seconds": round(seconds2, 1),
        "run2_download_seconds": round(rounds2, 1),
        "run2_share": round(seconds2 / seconds1, 3),
        "run2_download_share": round(rounds2 / rounds1, 3) if rounds1 else None,
        "new_urls": len(new_urls),
        "sample": totals["revalidated"],
        "run2_image_requests": len(log),
        "run2_refusals": refusals,
        "run2_distinct_urls": len(asked),
        "run2_urls_outside_new_and_sample": len(set(asked) - new_urls) - totals["revalidated"],
        "run2_urls_asked_twice_or_more": sum(1 for n in asked.values() if n > 1),
        "sample_asked": len(sample_asked),
        "reused_without_request": len(reused),
        "reused_byte_identical": identical,
        "changed_in_sample_replaced": f"{replaced_ok}/{len(replaced)}",
        "changed_outside_sample_still_old": len(stale),
        "report_totals": totals,
        "verification_ok": verification["ok"],
        "verified_urls": verification["totals"]["urls"],
    }


# ----------------------------------------------------------------------------- (b) the match at scale


def _servers() -> list[str]:
    return [f"media{i}.server-{i % 37}.org" for i in range(SERVERS)]


def _assign(total: int, seed: int = 18) -> np.ndarray:
    """Server of each row id 0..total-1 (Zipf sizes, ids spread over servers)."""
    counts = np.array(zipf_counts(SERVERS, total, 1.1))
    servers = np.repeat(np.arange(SERVERS, dtype=np.int32), counts)
    np.random.default_rng(seed).shuffle(servers)
    return servers


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def _padded(ids: np.ndarray, prefix: str = "") -> pa.Array:
    """``prefix`` + the id, zero-padded to 12 digits, as Arrow strings (vectorised)."""
    digits = pc.utf8_lpad(pc.cast(pa.array(ids), pa.string()), 12, "0")
    return pc.binary_join_element_wise(prefix, digits, "") if prefix else digits


def _hex32(rng: np.random.Generator, n: int) -> pa.Array:
    """n random 32-character hex strings (an MD5's look)."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    text = np.empty((n, 32), np.uint8)
    text[:, 0::2], text[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 15]
    return pa.array(text.view("S32").ravel()).cast(pa.string())


def synthesize(root: Path, rows: int) -> Path:
    """previous/ (an earlier output) and new/ (this run's urls folder + manifest), cached by size."""
    done = root / "_done"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    started = time.monotonic()
    names = _servers()
    total = rows + rows // 9  # ids 0..total-1; previous: the first `rows`, new: the last `rows`
    server_of = _assign(total)
    now_ms = int(time.time() * 1000)
    for side, ids in (("previous", np.arange(0, rows)), ("new", np.arange(total - rows, total))):
        order = np.argsort(server_of[ids], kind="stable")
        ids = ids[order]
        servers = server_of[ids]
        bounds = np.flatnonzero(np.diff(servers)) + 1
        manifest = {"batch_size": BATCH, "input_rows": rows, "rejected_rows": 0, "total_urls": rows, "servers": {}}
        for chunk in np.split(np.arange(len(ids)), bounds):
            server = int(servers[chunk[0]])
            name = names[server]
            prints = []
            for pid, start in enumerate(range(0, len(chunk), BATCH)):
                batch_ids = ids[chunk[start : start + BATCH]]
                n = len(batch_ids)
                identifiers = pc.binary_join_element_wise(
                    f"https://{name}/media/", _padded(batch_ids), "/original.jpg", ""
                )
                source_ids = pc.cast(pa.array(batch_ids), pa.string())
                if side == "new":
                    folder = root / "out" / "servers_batched" / f"server_name={name}" / f"partition_id={pid}"
                    folder.mkdir(parents=True)
                    table = pa.table(
                        {
                            "uuid": _padded(batch_ids, "new-"),
                            "source_id": source_ids,
                            "identifier": identifiers,
                            "license": pa.array(["cc-by"] * n),
                            "source": pa.array(["x"] * n),
                            "title": pa.array(["t"] * n),
                        }
                    )
                    pq.write_table(table, folder / "urls.parquet", compression="zstd")
                    prints.append(hashlib.sha256(f"{name}/{pid}".encode()).hexdigest()[:32])
                    continue
                folder = root / "previous" / "downloaded_images" / f"server_name={name}" / f"partition_id={pid}"
                folder.mkdir(parents=True)
                failed = batch_ids % 20 == 0  # 5% error rows: 404s and a few 500s
                ok = ~failed
                k = int(ok.sum())
                hashes = _hex32(np.random.default_rng(int(batch_ids[0])), k)
                successes = pa.table(
                    {
                        "uuid": _padded(batch_ids[ok], "old-"),
                        "source_id": source_ids.filter(pa.array(ok)),
                        "identifier": identifiers.filter(pa.array(ok)),
                        "is_license_full": pa.array([True] * k),
                        "license": pa.array(["cc-by"] * k),
                        "source": pa.array(["x"] * k),
                        "title": pa.array(["t"] * k),
                        "hashsum_original": hashes,
                        "hashsum_resized": hashes,
                        "original_size": pa.array([[480, 640]] * k, pa.list_(pa.int64())),
                        "resized_size": pa.array([[480, 640]] * k, pa.list_(pa.int64())),
                        "image": pa.array([b""] * k, pa.binary()),
                        "etag": pc.binary_join_element_wise('"', _padded(batch_ids[ok]), '"', ""),
                        "last_modified": pa.array(["Tue, 14 Nov 2023 22:13:20 GMT"] * k),
                        "checked_at": pa.array(np.full(k, now_ms - 30 * 86_400_000), pa.timestamp("ms", tz="UTC")),
                    },
                    schema=SUCCESS_SCHEMA,
                )
                pq.write_table(successes, folder / "successes.parquet", compression="zstd", row_group_size=256)
                m = n - k
                errors = pa.table(
                    {
                        "uuid": _padded(batch_ids[failed], "old-"),
                        "identifier": identifiers.filter(pa.array(failed)),
                        "retry_count": pa.array([0] * m, pa.int64()),
                        "error_code": pa.array(np.where(batch_ids[failed] % 100 == 0, 500, 404), pa.int64()),
                        "error_msg": pa.array(["HTTP 404"] * m),
                        "checked_at": pa.array(np.full(m, now_ms - 30 * 86_400_000), pa.timestamp("ms", tz="UTC")),
                    },
                    schema=ERROR_SCHEMA,
                )
                pq.write_table(errors, folder / "errors.parquet", compression="zstd")
            if side == "new":
                manifest["servers"][name] = {"urls": len(chunk), "fingerprints": prints}
        if side == "new":
            (root / "out" / "servers_batched" / "_manifest.json").write_text(json.dumps(manifest))
    done.write_text(f"{time.monotonic() - started:.1f}\n")
    return root


_CHILD = r"""
import json, sys, time, resource
from pathlib import Path
from distributed_downloader import config as config_mod
from distributed_downloader.plan import partition, snapshot
root, memory = Path(sys.argv[1]), int(sys.argv[2])
config = config_mod.validate({"path_to_input": "unused", "path_to_output": str(root / "out"),
    "previous_dataset": str(root / "previous"), "snapshot_parameters": {"memory_mb": memory}})
paths = config_mod.paths(config)
manifest = partition.read_manifest(paths.urls)
started = time.monotonic()
summary = snapshot.plan(config, paths, manifest)
seconds = time.monotonic() - started
print(json.dumps({"seconds": seconds, "totals": summary["totals"], "gone": sum(summary["gone"].values()),
    "timings": summary["timings"],
    "problems": summary["problems"][:3], "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_plan(rows: int, memory_mb: int) -> dict:
    root = synthesize(cache_dir("snapshot") / f"plan-{rows}", rows)
    shutil.rmtree(root / "out" / "snapshot", ignore_errors=True)
    measured = run_measured([sys.executable, "-c", _CHILD, str(root), str(memory_mb)], poll=0.2, timeout=4 * 3600)
    if measured.returncode:
        raise SystemExit(f"plan failed:\n{measured.stderr[-5000:]}")
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    disk = sum(f.stat().st_size for f in (root / "previous").rglob("*.parquet"))
    disk += sum(f.stat().st_size for f in (root / "out" / "servers_batched").rglob("*.parquet"))
    return {
        "rows": rows,
        "batches": sum(1 for _ in (root / "out" / "servers_batched").glob("*/*")),
        "seconds": round(result["seconds"], 1),
        "new_rows_per_s": round(rows / result["seconds"]),
        "peak_rss_mb": round(max(measured.peak_rss_mb, result["maxrss_mb"])),
        "memory_mb": memory_mb,
        "input_gb": round(disk / 1e9, 2),
        "totals": result["totals"],
        "gone": result["gone"],
        "problems": result["problems"],
        "timings": result["timings"],
        "synthesis_seconds": float((root / "_done").read_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["runs", "plan", "both"], default="both")
    parser.add_argument("--urls", type=int, default=20_000)
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--rate", type=float, default=4.0, help="each host's hidden requests/s")
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 20_000_000])
    parser.add_argument("--memory-mb", type=int, default=2048)
    args = parser.parse_args()
    if args.part in ("runs", "both"):
        print(json.dumps({"runs": bench_runs(args.urls, args.hosts, args.rate)}, indent=1), flush=True)
    if args.part in ("plan", "both"):
        for rows in args.rows:
            print(json.dumps({"plan": bench_plan(rows, args.memory_mb)}, indent=1), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
