"""Peak memory of a retry round over big batches of large stored images (issue #15).

    python bench/retry_memory_bench.py [--rows 1000 10000] [--image-kb 100] [--retry 50]

For each size: a batch folder as round 1 leaves it (``successes.parquet`` with ``rows`` stored
images of ``image-kb`` KB of incompressible bytes each, ``errors.parquet`` with ``retry`` transient
rows, the marker), then round 2 runs a real Lane in retry mode in a fresh child process against a
loopback farm that now serves the retried URLs. Printed: the bytes of stored images in the batch,
the child's peak RSS (VmHWM) and its RSS before the lane started, and whether the stored file was
left byte-identical (retry rounds append ``successes-r2.parquet``; they never read the images back).
The old retry path loaded the whole ``successes.parquet`` and wrote it back (~2.7x the batch's image
bytes at peak).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            yield line.split()[0].rstrip(":"), int(line.split()[1]) // 1024
from distributed_downloader import config as config_mod
from distributed_downloader.engine.lane import Lane, LaneSpec
args = json.loads(sys.argv[1])
config = config_mod.validate(args["config"])
paths = config_mod.paths(config)
before = dict(hwm())["VmRSS"]
spec = LaneSpec(args["server"], 0, 1, start_rate=200.0, max_rate=200.0, max_connections=4, decrease=0.3)
lane = Lane(spec, config, paths, round_no=2)
started = time.monotonic()
try:
    stats = lane.run_batch(0, args["fingerprint"], "retry")
finally:
    lane.close()
print(json.dumps({"rss_before_mb": before, "peak_mb": dict(hwm())["VmHWM"], "seconds": time.monotonic() - started,
                  "successes": stats.successes, "transient": stats.transient}))
"""


def build(workdir: Path, farm, rows: int, image_kb: int, retry: int) -> tuple[dict, str, str, int]:  # noqa: ANN001
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distributed_downloader import config as config_mod
    from distributed_downloader.store.files import (
        ERROR_SCHEMA,
        ROW_GROUP_ROWS,
        SUCCESS_SCHEMA,
        Marker,
        atomic_write_table,
        write_marker,
    )
    from tests.e2e.helpers import write_batch_urls

    config = {
        "path_to_input": str(workdir / "unused.csv"),
        "path_to_output": str(workdir / "out"),
        "downloader_parameters": {"allow_private_addresses": True, "respect_robots_txt": False},
    }
    paths = config_mod.paths(config_mod.validate(config))
    server = farm.base_urls[0].split("//", 1)[1]
    stored = [f"http://{server}/img/stored{i}.jpg" for i in range(rows)]
    retried = [farm.url(0, f"/img/retry{i}.jpg?w=64&h=48") for i in range(retry)]
    write_batch_urls(paths.batch_urls(server, 0), stored + retried)
    ids = pq.read_table(paths.batch_urls(server, 0)).to_pylist()
    folder = paths.batch_images(server, 0)
    folder.mkdir(parents=True, exist_ok=True)
    image_bytes = 0
    with pq.ParquetWriter(folder / "successes.parquet", SUCCESS_SCHEMA, compression="zstd") as writer:
        for start in range(0, rows, ROW_GROUP_ROWS):
            chunk = []
            for row in ids[start : min(rows, start + ROW_GROUP_ROWS)]:
                image = os.urandom(image_kb * 1024)
                image_bytes += len(image)
                chunk.append(
                    {
                        **{k: row[k] for k in ("uuid", "source_id", "identifier")},
                        "is_license_full": False,
                        "license": "x",
                        "source": "x",
                        "title": "x",
                        "hashsum_original": "0" * 32,
                        "hashsum_resized": hashlib.md5(image).hexdigest(),
                        "original_size": [48, 64],
                        "resized_size": [48, 64],
                        "image": image,
                    }
                )
            writer.write_table(pa.Table.from_pylist(chunk, schema=SUCCESS_SCHEMA))
    errors = [
        {"uuid": r["uuid"], "identifier": r["identifier"], "retry_count": 1, "error_code": 500, "error_msg": "HTTP 500"}
        for r in ids[rows:]
    ]
    atomic_write_table(folder / "errors.parquet", pa.Table.from_pylist(errors, schema=ERROR_SCHEMA))
    fingerprint = "b" * 32
    write_marker(folder, Marker(fingerprint, 1, rows, retry, retry))
    return config, server, fingerprint, image_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--image-kb", type=int, default=100)
    parser.add_argument("--retry", type=int, default=50)
    parser.add_argument("--code", help="workflow_scripts folder of another checkout to run the lane from")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from distributed_downloader.demo.testserver import HostSpec, ImageFarm

    print(f"retry-round memory: batches of N stored {args.image_kb} KB images, {args.retry} URLs retried")
    with ImageFarm([HostSpec("retry", latency=0.002)], seed=2) as farm:
        for rows in args.rows:
            with tempfile.TemporaryDirectory(prefix="retry-bench-") as tmp:
                config, server, fingerprint, image_bytes = build(Path(tmp), farm, rows, args.image_kb, args.retry)
                stored = Path(tmp) / "out" / "downloaded_images" / f"server_name={server}" / "partition_id=0"
                digest = hashlib.sha256((stored / "successes.parquet").read_bytes()).hexdigest()
                payload = json.dumps({"config": config, "server": server, "fingerprint": fingerprint})
                env = {**os.environ, **({"PYTHONPATH": args.code} if args.code else {})}
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, payload], capture_output=True, text=True, check=True, env=env
                ).stdout
                figures = json.loads(out.strip().splitlines()[-1])
                same = hashlib.sha256((stored / "successes.parquet").read_bytes()).hexdigest() == digest
                print(
                    f"  {rows:6,} rows, {image_bytes / 2**20:7.0f} MB of stored images: peak RSS "
                    f"{figures['peak_mb']} MB (before the lane {figures['rss_before_mb']} MB), "
                    f"{figures['seconds']:.1f} s, {figures['successes']:,} successes, {figures['transient']} left; "
                    f"successes.parquet {'untouched' if same else 'REWRITTEN'}; "
                    f"new: {sorted(p.name for p in stored.glob('successes*.parquet'))}"
                )


if __name__ == "__main__":
    main()
