"""Reading the output as one dataset: all successes.parquet, hive partitions (server_name, partition_id).

    python bench/read_bench.py                        # a fabricated output (120 partitions x 1,000 rows)
    python bench/read_bench.py --images OUT/downloaded_images   # a real run's image store

Prints rows/s of a full read (every column, images included) and of a metadata read (no `image`),
with pyarrow.dataset and DuckDB, and checks that both detect the partition columns. The
fabricated store has the real schema, zstd like the worker writes, 256-row row groups, a
`_completed` marker and an errors.parquet beside every successes.parquet (readers must skip them).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss_util import cache_dir  # noqa: E402

from distributed_downloader.store.files import ERROR_SCHEMA, MARKER_FILE, ROW_GROUP_ROWS, SUCCESS_SCHEMA  # noqa: E402


def fabricate(root: Path, servers: int, partitions: int, rows: int, image_bytes: int) -> None:
    stamp = root / "_fabricated.json"
    spec = {"servers": servers, "partitions": partitions, "rows": rows, "image_bytes": image_bytes}
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, size=image_bytes * rows, dtype=np.uint8).tobytes()
    for s in range(servers):
        for p in range(partitions):
            folder = root / f"server_name=images{s}.example.org" / f"partition_id={p}"
            folder.mkdir(parents=True)
            ids = [f"{s}-{p}-{i}" for i in range(rows)]
            offsets = np.arange(0, image_bytes * (rows + 1), image_bytes, dtype=np.int32)
            images = pa.BinaryArray.from_buffers(pa.binary(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(blob)])
            table = pa.table(
                {
                    "uuid": ids,
                    "source_id": ids,
                    "identifier": [f"https://images{s}.example.org/photos/{i}/original.jpg" for i in range(rows)],
                    "is_license_full": [True] * rows,
                    "license": ["http://creativecommons.org/licenses/by/4.0/"] * rows,
                    "source": ["bench"] * rows,
                    "title": [f"image {i}" for i in range(rows)],
                    "hashsum_original": ["0" * 32] * rows,
                    "hashsum_resized": ["1" * 32] * rows,
                    "original_size": [[1200, 1600]] * rows,
                    "resized_size": [[540, 720]] * rows,
                    "image": images,
                },
                schema=SUCCESS_SCHEMA,
            )
            pq.write_table(table, folder / "successes.parquet", compression="zstd", row_group_size=ROW_GROUP_ROWS)
            pq.write_table(ERROR_SCHEMA.empty_table(), folder / "errors.parquet", compression="zstd")
            (folder / MARKER_FILE).write_text("{}\n")
    stamp.write_text(json.dumps(spec))


def timed(label: str, rows_fn, nbytes: int = 0) -> tuple[int, float]:  # noqa: ANN001
    started = time.perf_counter()
    rows = rows_fn()
    seconds = time.perf_counter() - started
    rate = f" ({nbytes / seconds / 1e9:.2f} GB/s of parquet)" if nbytes else ""
    print(f"  {label:52s} {rows:>9,} rows in {seconds:6.2f}s = {rows / seconds:>10,.0f} rows/s{rate}", flush=True)
    return rows, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="an images_folder (downloaded_images) to read instead")
    parser.add_argument("--servers", type=int, default=30)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--image-bytes", type=int, default=20_000, help="stored image size (incompressible)")
    args = parser.parse_args(argv)
    root = args.images
    if root is None:
        root = cache_dir("read") / "downloaded_images"
        fabricate(root, args.servers, args.partitions, args.rows, args.image_bytes)
    files = sorted(glob.glob(str(root / "server_name=*" / "partition_id=*" / "successes.parquet")))
    size = sum(Path(f).stat().st_size for f in files)
    print(f"read bench: {len(files)} successes.parquet files, {size / 1e9:.2f} GB, under {root}")

    dataset = ds.dataset(
        files, format="parquet", partitioning=ds.HivePartitioning.discover(), partition_base_dir=str(root)
    )
    names = dataset.schema.names
    detected = {"server_name", "partition_id"} <= set(names)
    print(
        f"  pyarrow partition columns detected: {detected} ({names[-2:]}, {dataset.schema.field('partition_id').type})"
    )
    metadata = [n for n in names if n != "image"]
    timed("pyarrow: all columns, images included", lambda: dataset.to_table().num_rows, size)
    timed("pyarrow: all but image", lambda: dataset.to_table(columns=metadata).num_rows)
    table = dataset.to_table(columns=["server_name", "partition_id"])
    servers = len(set(table.column("server_name").to_pylist()))
    print(f"    {servers} servers, partition ids up to {max(table.column('partition_id').to_pylist())}")

    try:
        import duckdb
    except ImportError:
        print("  duckdb is not installed (pip install duckdb): skipped")
        return 0
    pattern = str(root / "*" / "*" / "successes.parquet")
    con = duckdb.connect()
    source = f"read_parquet('{pattern}', hive_partitioning = true)"
    columns = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]
    print(
        f"  duckdb partition columns detected: {{'server_name', 'partition_id'}} <= columns: "
        f"{ {'server_name', 'partition_id'} <= set(columns) }"
    )
    timed(
        "duckdb: every row incl. image bytes (sum of lengths)",
        lambda: con.execute(f"SELECT count(*), sum(octet_length(image)) FROM {source}").fetchone()[0],
        size,
    )
    timed(
        "duckdb: metadata to Arrow (all but image)",
        lambda: con.sql(f"SELECT * EXCLUDE (image) FROM {source}").to_arrow_table().num_rows,
    )
    by_server = con.execute(f"SELECT server_name, count(*) FROM {source} GROUP BY 1").fetchall()
    print(f"    {len(by_server)} servers by GROUP BY server_name")
    return 0


if __name__ == "__main__":
    sys.exit(main())
