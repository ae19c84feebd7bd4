"""WebDataset export throughput (issue #19): the export_webdataset tool vs a plain `tar` of the same bytes.

    python bench/export_bench.py [--images 10000] [--image-kb 100] [--ranks 2]

Fabricates (once, cached under $DD_BENCH_CACHE/export) a store of --images JPEG rows with the
downloader's own writer (store.StreamingParquet: zstd, 256-row row groups) over 8 servers and
250-row partitions. Each image is a real 720x540 JPEG from a pool of 48 followed by random bytes up
to ~--image-kb (+-20%): decoders stop at the JPEG's end marker, and zstd cannot shrink a store of
repeated images below its real size. Then it measures, each on a fresh export folder:

* the export of one stream in this process (one core): plan + read + samples + tar + SHA-256 + fsync;
* the same with the seeded block shuffle;
* the real run step: the tool's filter and schedule in process, then `mpiexec -n RANKS
  tool_worker.py` (the job `tool_run` starts), and a rerun of it once everything is exported;
* that every store row is in exactly one sample of the MPI export (read back with webdataset, each
  image's MD5 = hashsum_resized; not timed);
* `tar -cf` (GNU tar) of the very same members (written out as files first, not timed), alone and
  followed by `sync` of the archive (the export fsyncs every shard).

MB/s is archive bytes written per second of wall time. Everything reads from the page cache (the
store and the tar input were just written), so both sides are measured warm.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss_util import REPO, cache_dir  # noqa: E402

from distributed_downloader import config as config_mod  # noqa: E402
from distributed_downloader.store.files import SUCCESS_SCHEMA, SUCCESSES_FILE, StreamingParquet  # noqa: E402
from distributed_downloader.tools import resolve  # noqa: E402
from distributed_downloader.tools.export.plan import Unit  # noqa: E402
from distributed_downloader.tools.export.settings import ExportSettings, export_folder  # noqa: E402
from distributed_downloader.tools.export.state import INDEX_FILE  # noqa: E402
from distributed_downloader.tools.export.stream import StreamJob, export_stream  # noqa: E402

SERVERS = 8
ROWS_PER_PARTITION = 250
POOL = 48  # distinct JPEGs; rows reuse them (throughput does not depend on the pixels)
TOOL = "export_webdataset"


def _jpeg(rng: np.random.Generator, target_bytes: int) -> tuple[bytes, int, int]:
    """A noisy photo-like JPEG of about ``target_bytes`` (720 px on the longer side)."""
    height, width = 540, 720
    base = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    pixels = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))
    noise = rng.integers(-40, 40, size=pixels.shape)
    img = Image.fromarray(np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8), "RGB")
    lo, hi = 5, 98
    data = b""
    while lo <= hi:  # the quality whose size is closest to the target from below
        quality = (lo + hi) // 2
        out = io.BytesIO()
        img.save(out, "JPEG", quality=quality)
        if out.tell() <= target_bytes:
            data, lo = out.getvalue(), quality + 1
        else:
            hi = quality - 1
    return data or out.getvalue(), height, width


def fabricate(root: Path, images: int, image_kb: int) -> Path:
    """``root/output``: a store of ``images`` rows (cached: the same spec is made once)."""
    output = root / "output"
    stamp = root / "_fabricated.json"
    spec = {"images": images, "image_kb": image_kb, "servers": SERVERS, "rows": ROWS_PER_PARTITION}
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return output
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    pool = [_jpeg(rng, image_kb * 1000 // 2) for _ in range(POOL)]
    started = time.monotonic()
    partitions = -(-images // ROWS_PER_PARTITION)
    row = 0
    for p in range(partitions):
        server = f"images{p % SERVERS}.example.org"
        folder = output / "downloaded_images" / f"server_name={server}" / f"partition_id={p // SERVERS}"
        folder.mkdir(parents=True)
        writer = StreamingParquet(folder / SUCCESSES_FILE, SUCCESS_SCHEMA)
        for _ in range(min(ROWS_PER_PARTITION, images - row)):
            k = int(rng.integers(POOL))
            jpeg, height, width = pool[k]
            tail = int(image_kb * 1000 * rng.uniform(0.8, 1.2)) - len(jpeg)
            data = jpeg + rng.bytes(max(0, tail))  # decoders stop at the JPEG's end marker
            md5 = hashlib.md5(data).hexdigest()
            writer.append(
                {
                    "uuid": f"bench-{row:07d}",
                    "source_id": f"src-{row}",
                    "identifier": f"https://{server}/img/{row}.jpg",
                    "is_license_full": True,
                    "license": "CC-BY",
                    "source": "bench",
                    "title": f"image {row}",
                    "hashsum_original": md5,
                    "hashsum_resized": md5,
                    "original_size": [height * 2, width * 2],
                    "resized_size": [height, width],
                    "image": data,
                }
            )
            row += 1
        writer.commit()
    stamp.write_text(json.dumps(spec))
    size = sum(p.stat().st_size for p in output.rglob("*.parquet"))
    print(f"fabricated {images:,} rows ({size / 1e6:,.0f} MB of parquet) in {time.monotonic() - started:.1f}s")
    return output


def make_config(root: Path, output: Path, ranks: int, **export: object) -> dict:
    return config_mod.validate(
        {
            "path_to_input": str(root / "urls.csv"),
            "path_to_output": str(output),
            "downloader_parameters": {"image_format": "jpeg"},
            "tools_parameters": {"workers_per_node": ranks, **export},
        }
    )


def fresh(config: dict) -> Path:
    paths = config_mod.paths(config)
    shutil.rmtree(export_folder(paths).parent, ignore_errors=True)
    shutil.rmtree(paths.tools / TOOL, ignore_errors=True)
    return export_folder(paths)


def in_process(config: dict, settings: ExportSettings) -> tuple[float, int, int]:
    """One stream over the whole store in this process: seconds, samples, archive bytes."""
    folder = fresh(config)
    paths = config_mod.paths(config)
    units = [
        Unit(p.parent.parent.name.split("=", 1)[1], int(p.parent.name.split("=", 1)[1]), p)
        for p in paths.images.glob("server_name=*/partition_id=*/successes*.parquet")
    ]
    units.sort(key=lambda u: (u.server_name, u.partition_id, u.path.name))
    started = time.monotonic()
    progress = export_stream(StreamJob(0, units, folder, "bench", settings, "jpeg"))
    seconds = time.monotonic() - started
    return seconds, progress.samples, sum(s["bytes"] for s in progress.shards)


def mpi_run(config: dict, ranks: int) -> tuple[float, float, float, dict]:
    """filter + schedule in process, then the MPI job twice (the export, then a no-op rerun)."""
    fresh(config)
    classes = resolve(TOOL, config)
    started = time.monotonic()
    classes.filter(config, TOOL).run()
    classes.scheduler(config, TOOL).run()
    plan_seconds = time.monotonic() - started
    tool_dir = config_mod.paths(config).tools / TOOL
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [
        str(mpiexec),
        "-n",
        str(ranks),
        sys.executable,
        str(REPO / "workflow_scripts" / "tool_worker.py"),
        str(tool_dir / "schedule.json"),
        str(tool_dir / "_done.json"),
    ]
    timings = []
    for _ in range(2):
        started = time.monotonic()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        timings.append(time.monotonic() - started)
    summary = json.loads((tool_dir / "_done.json").read_text())
    return plan_seconds, timings[0], timings[1], summary


def verify(config: dict) -> int:
    """Every store row in exactly one sample of the export, read with webdataset, MD5 = hashsum_resized."""
    import pyarrow.parquet as pq
    import webdataset as wds

    paths = config_mod.paths(config)
    expected = {}
    for path in paths.images.glob("server_name=*/partition_id=*/successes*.parquet"):
        table = pq.read_table(path, columns=["uuid", "hashsum_resized"]).to_pydict()
        expected.update(zip(table["uuid"], table["hashsum_resized"], strict=True))
    folder = export_folder(paths)
    index = json.loads((folder / INDEX_FILE).read_text())
    urls = [str(folder / shard["file"]) for shard in index["shards"]]
    seen: dict[str, int] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        seen[meta["uuid"]] = seen.get(meta["uuid"], 0) + 1
        assert hashlib.md5(sample["jpg"]).hexdigest() == expected[meta["uuid"]], meta["uuid"]
    assert seen.keys() == expected.keys() and set(seen.values()) == {1}, "a row missing or exported twice"
    return len(seen)


def write_members(config: dict, members: Path) -> None:
    """The exported members as plain files (the input of the `tar` baseline; not timed)."""
    shutil.rmtree(members, ignore_errors=True)
    members.mkdir(parents=True)
    for shard in sorted(export_folder(config_mod.paths(config)).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                (members / member.name).write_bytes(tar.extractfile(member).read())


def plain_tar(members: Path, archive: Path, sync: bool) -> tuple[float, int]:
    """`tar -cf` of the member files (then `sync` of the archive): seconds, archive bytes."""
    archive.unlink(missing_ok=True)
    started = time.monotonic()
    subprocess.run(["tar", "-cf", str(archive), "-C", str(members), "."], check=True)
    if sync:
        subprocess.run(["sync", str(archive)], check=True)
    seconds = time.monotonic() - started
    size = archive.stat().st_size
    archive.unlink()
    return seconds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--image-kb", type=int, default=100)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="each figure is the median of this many runs")
    args = parser.parse_args()
    root = cache_dir("export") / f"store-{args.images}-{args.image_kb}kb"
    output = fabricate(root, args.images, args.image_kb)
    config = make_config(root, output, args.ranks)
    load = os.getloadavg()[0]
    names = [
        "export, 1 stream in process (1 core)",
        "export with shuffle (window 2048), 1 stream",
        f"export_webdataset run step, mpiexec -n {args.ranks}",
        "plain `tar -cf` of the same members",
        "plain `tar -cf` + `sync` of the archive",
    ]
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in names}
    members = root / "plain" / "members"
    reruns, plans = [], []
    for repeat in range(args.repeats):
        for name, settings in zip(names[:2], (ExportSettings(), ExportSettings(shuffle=True, seed=1)), strict=True):
            subprocess.run(["sync"], check=True)  # earlier writes are not charged to this run
            seconds, samples, size = in_process(config, settings)
            assert samples == args.images, f"exported {samples} of {args.images}"
            runs[name].append((seconds, size))
        if repeat == 0:
            write_members(config, members)
        subprocess.run(["sync"], check=True)
        plan_seconds, seconds, rerun, summary = mpi_run(config, args.ranks)
        assert summary["samples"] == args.images and (export_folder(config_mod.paths(config)) / INDEX_FILE).exists()
        runs[names[2]].append((seconds, summary["bytes"]))
        if repeat == 0:
            print(f"verified: {verify(config):,} rows, each in exactly one shard, MD5 = hashsum_resized (webdataset)")
        reruns.append(rerun)
        plans.append(plan_seconds)
        for name, sync in zip(names[3:], (False, True), strict=True):
            subprocess.run(["sync"], check=True)
            runs[name].append(plain_tar(members, root / "plain" / "plain.tar", sync))
    shutil.rmtree(root / "plain", ignore_errors=True)

    print(
        f"\n{args.images:,} images of ~{args.image_kb} kB, {summary['shards']} shards (default size);"
        f" median of {args.repeats}; load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"{'what':<50} {'seconds':>8} {'MB':>8} {'MB/s':>8} {'range MB/s':>12}")
    for name in names:
        rates = sorted(size / 1e6 / secs for secs, size in runs[name])
        secs = statistics.median(s for s, _ in runs[name])
        size = runs[name][0][1]
        spread = f"{rates[0]:.0f}-{rates[-1]:.0f}"
        print(f"{name:<50} {secs:>8.2f} {size / 1e6:>8.0f} {statistics.median(rates):>8.0f} {spread:>12}")
    print(
        f"filter + schedule (in process): {statistics.median(plans):.2f}s;"
        f" rerun of the finished run step (plans only, nothing written): {statistics.median(reruns):.2f}s"
    )


if __name__ == "__main__":
    main()
