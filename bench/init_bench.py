"""Initializer throughput and memory: rows/s and peak RSS at 1M, 3M and 10M rows, two engines.

    python bench/init_bench.py                   # 1M, 3M, 10M rows; pyarrow streaming path and DuckDB
    python bench/init_bench.py --sizes 1000000   # one size
    python bench/init_bench.py --engines ours    # only our initializer

The synthetic input (uuid, identifier, source_id, license, source, title) has ~545 servers with a
Zipf-like skew (the largest holds ~19% of the rows), URLs of 70-120 characters, quoted titles, and
a few bad rows (duplicate uuids, malformed URLs). It is generated with numpy/pyarrow, written as
CSV once and cached under $DD_BENCH_CACHE (default: <tmp>/dd-bench/init).

Each measurement runs in a fresh child process pinned to one CPU (pyarrow and DuckDB limited to
one thread); the parent polls its RSS with psutil and the child reports its own ru_maxrss.
  ours:   inputs.rows + partition.write_partitions(batch_size=10000), exactly what `initialize` runs
  duckdb: the same grouping in SQL: window row_number per server in input order, partition_id =
          (n-1) // batch_size, COPY ... PARTITION_BY (server_name, partition_id); duplicate uuids and
          URLs without a host are written to a rejected table. Its URL check is a regex only (no IDNA,
          no port or character validation), so it does less work than ours.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss_util import cache_dir, run_measured  # noqa: E402

N_SERVERS = 545
ZIPF_EXPONENT = 1.1
CHUNK_ROWS = 1_000_000
BATCH_SIZE = 10_000
SIZES = (1_000_000, 3_000_000, 10_000_000)
GOAL_ROWS_PER_S = 150_000
GOAL_RSS_MB = 1024
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


# ---------------------------------------------------------------- synthetic input


def server_names() -> list[str]:
    words = ["images", "media", "static", "cdn", "data", "photos", "api", "bs", "collections", "herbarium"]
    words += ["sweetgum", "files", "repository", "portal"]
    tlds = ["org", "com", "edu", "net", "de", "fr", "org.uk", "ac.uk", "gov", "nl", "br", "se", "fi", "museum"]
    names = []
    for i in range(N_SERVERS):
        a, b, tld = words[i % len(words)], words[(i * 7 + 3) % len(words)], tlds[(i * 5) % len(tlds)]
        names.append(f"{a}-{i}.s3.amazonaws.com" if i % 4 == 0 else f"{a}{i}.{b}-{'x' * (i % 9)}.{tld}")
    return names


def _uuid4_strings(rng: np.random.Generator, n: int) -> pa.Array:
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    nibbles = np.empty((n, 32), np.uint8)
    nibbles[:, 0::2] = _HEX[raw >> 4]
    nibbles[:, 1::2] = _HEX[raw & 15]
    text = np.full((n, 36), ord("-"), np.uint8)
    for start, end, at in ((0, 8, 0), (8, 12, 9), (12, 16, 14), (16, 20, 19), (20, 32, 24)):
        text[:, at : at + end - start] = nibbles[:, start:end]
    return pa.array(text.view("S36").ravel()).cast(pa.string())


def _pick(rng: np.random.Generator, values: list[str], n: int) -> pa.Array:
    return pa.array(values, pa.string()).take(pa.array(rng.integers(0, len(values), size=n)))


def synthetic_chunk(chunk_no: int, n: int) -> pa.Table:
    """Rows of chunk `chunk_no` (its own seed, so a 1M input is the first chunk of the 10M one)."""
    rng = np.random.default_rng(1000 + chunk_no)
    weights = 1.0 / np.arange(1, N_SERVERS + 1) ** ZIPF_EXPONENT
    server = rng.choice(N_SERVERS, size=n, p=weights / weights.sum())
    prefix = pa.array([f"https://{h}/" for h in server_names()]).take(pa.array(server))
    kind = _pick(rng, ["photos/", "media/original/", "images/large/", "fileadmin/user_upload/collection/"], n)
    photo = pa.array(rng.integers(10**6, 10**9, size=n)).cast(pa.string())
    tail = _pick(rng, ["/original.jpeg?", "/large.jpg?v=", ".JPG?t=", "/full/max/0/default.jpg?"], n)
    stamp = pa.array(rng.integers(1_500_000_000, 1_700_000_000, size=n)).cast(pa.string())
    identifier = pc.binary_join_element_wise(prefix, kind, photo, tail, stamp, "")
    source_id = pa.array(rng.integers(10**9, 5 * 10**9, size=n)).cast(pa.string())
    licence = ["http://creativecommons.org/licenses/by-nc/4.0/", "http://creativecommons.org/licenses/by/4.0/"]
    publisher = ["iNaturalist", "Naturalis Biodiversity Center", "Museum of Comparative Zoology, Harvard University"]
    label = _pick(rng, ["Photo of ", "Specimen ", "Herbarium sheet, ", ""], n)
    uuids = _uuid4_strings(rng, n)
    # A few bad rows: 1 in 5000 repeats an earlier uuid, 1 in 10000 has a malformed URL.
    dup = np.flatnonzero(rng.random(n) < 2e-4)
    dup = dup[dup > 0]
    if len(dup):
        ids = np.asarray(uuids.to_pylist(), dtype=object)
        ids[dup] = ids[rng.integers(0, dup)]
        uuids = pa.array(ids.tolist(), pa.string())
    bad = rng.random(n) < 1e-4
    identifier = pc.if_else(pa.array(bad), "not a url", identifier)
    return pa.table(
        {
            "uuid": uuids,
            "identifier": identifier,
            "source_id": source_id,
            "license": _pick(rng, [*licence, "CC0_1_0", ""], n),
            "source": _pick(rng, [*publisher, ""], n),
            "title": pc.binary_join_element_wise(label, source_id, ""),
        }
    )


def synthetic_csv(rows: int, with_uuid: bool = True) -> Path:
    """The cached CSV of `rows` rows (generated on first use); without `uuid` the reader derives UUID5s."""
    path = cache_dir("init") / f"urls_{rows}{'' if with_uuid else '_nouuid'}.csv"
    if path.exists():
        return path
    started = time.monotonic()
    temp = path.with_suffix(".tmp")
    schema = synthetic_chunk(0, 1).schema
    if not with_uuid:
        schema = schema.remove(schema.get_field_index("uuid"))
    with pacsv.CSVWriter(temp, schema) as writer:
        done = 0
        for chunk_no in range((rows + CHUNK_ROWS - 1) // CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - done)
            chunk = synthetic_chunk(chunk_no, n)
            writer.write_table(chunk if with_uuid else chunk.drop_columns(["uuid"]))
            done += n
    temp.rename(path)
    print(
        f"  generated {rows:,} rows ({path.stat().st_size / 1e6:,.0f} MB) in {time.monotonic() - started:.1f}s: {path}"
    )
    return path


# ---------------------------------------------------------------- engines (run in the child)


def _one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def run_ours(source: Path, out: Path) -> dict:
    from distributed_downloader import inputs
    from distributed_downloader.plan import partition

    result = partition.write_partitions(inputs.rows(source), out / "urls", out / "rejected.parquet", BATCH_SIZE)
    servers = result.manifest["servers"]
    return {
        "rows": result.input_rows,
        "rejected": result.rejected_rows,
        "servers": len(servers),
        "batches": sum(len(s["fingerprints"]) for s in servers.values()),
        "per_server": {name: s["urls"] for name, s in servers.items()},
    }


def run_duckdb(source: Path, out: Path) -> dict:
    import duckdb

    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(out / "work.duckdb"))
    con.execute("SET threads = 1")
    con.execute("SET memory_limit = '1GB'")
    con.execute(f"SET temp_directory = '{out / 'tmp'}'")
    con.execute("SET preserve_insertion_order = true")
    # One scan of the CSV into a table (row numbers = input order; threads=1 keeps it deterministic).
    con.execute(
        f"""
        CREATE TABLE rows AS
        SELECT row_number() OVER () AS rn, *,
               regexp_replace(lower(regexp_extract(identifier, '^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)', 1)),
                              '^.*@|:(80|443)$', '', 'g') AS server_name
        FROM read_csv('{source}', header = true, all_varchar = true)
        """
    )
    con.execute(
        """
        CREATE TABLE numbered AS
        SELECT *, row_number() OVER (PARTITION BY uuid ORDER BY rn) > 1 AS duplicate FROM rows
        """
    )
    con.execute(
        f"""
        COPY (
            SELECT uuid, source_id, identifier, license, source, title, server_name,
                   (row_number() OVER (PARTITION BY server_name ORDER BY rn) - 1) // {BATCH_SIZE} AS partition_id
            FROM numbered WHERE server_name <> '' AND NOT duplicate
            ORDER BY server_name, rn
        ) TO '{out / "urls"}' (FORMAT parquet, COMPRESSION zstd, PARTITION_BY (server_name, partition_id))
        """
    )
    con.execute(
        f"""
        COPY (
            SELECT uuid, source_id, identifier, license, source, title,
                   CASE WHEN server_name = '' THEN 'malformed URL' ELSE 'duplicate uuid' END AS reason
            FROM numbered WHERE server_name = '' OR duplicate ORDER BY rn
        ) TO '{out / "rejected.parquet"}' (FORMAT parquet, COMPRESSION zstd)
        """
    )
    rows = con.execute("SELECT count(*) FROM rows").fetchone()[0]
    rejected = con.execute("SELECT count(*) FROM numbered WHERE server_name = '' OR duplicate").fetchone()[0]
    per_server = dict(
        con.execute(
            "SELECT server_name, count(*) FROM numbered WHERE server_name <> '' AND NOT duplicate GROUP BY 1"
        ).fetchall()
    )
    con.close()
    batches = sum((n + BATCH_SIZE - 1) // BATCH_SIZE for n in per_server.values())
    return {
        "rows": rows,
        "rejected": rejected,
        "servers": len(per_server),
        "batches": batches,
        "per_server": per_server,
    }


def child(engine: str, source: str, out: str) -> None:
    _one_core()
    out_path = Path(out)
    shutil.rmtree(out_path, ignore_errors=True)
    out_path.mkdir(parents=True)
    wall, cpu = time.monotonic(), time.process_time()
    result = (run_ours if engine == "ours" else run_duckdb)(Path(source), out_path)
    result["seconds"] = time.monotonic() - wall
    result["cpu_seconds"] = time.process_time() - cpu
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


# ---------------------------------------------------------------- parent


def measure(engine: str, rows: int, with_uuid: bool = True) -> dict:
    source = synthetic_csv(rows, with_uuid)
    out = cache_dir("init") / f"out_{engine}_{rows}"
    measured = run_measured([sys.executable, __file__, "--child", engine, str(source), str(out)], poll=0.05)
    if measured.returncode != 0:
        raise SystemExit(f"{engine} at {rows:,} rows failed:\n{measured.stderr[-3000:]}")
    result = json.loads(measured.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = max(measured.peak_rss_mb, result["ru_maxrss_mb"])
    result["engine"] = engine if with_uuid else f"{engine}*"
    result["input_rows"] = rows
    shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--engines", nargs="+", default=["ours", "duckdb"], choices=["ours", "duckdb"])
    parser.add_argument(
        "--derived-uuid-rows",
        type=int,
        default=1_000_000,
        help="also run ours on an input without a uuid column (UUID5 derived per row); 0 to skip",
    )
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "INPUT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if "duckdb" in args.engines:
        try:
            import duckdb  # noqa: F401
        except ImportError:
            print("duckdb is not installed (pip install duckdb, or pip install -e '.[dev]'): skipping it")
            args.engines = [e for e in args.engines if e != "duckdb"]
    print(f"initializer bench: batch_size {BATCH_SIZE}, {N_SERVERS} servers (Zipf {ZIPF_EXPONENT}), one core each")
    results = []
    for rows in args.sizes:
        for engine in args.engines:
            result = measure(engine, rows)
            results.append(result)
            rate = result["rows"] / result["seconds"]
            print(
                f"  {engine:6s} {rows:>11,} rows: {result['seconds']:6.1f}s wall, {result['cpu_seconds']:6.1f}s cpu, "
                f"{rate:>9,.0f} rows/s, peak RSS {result['peak_rss_mb']:6.0f} MB | "
                f"{result['servers']} servers, {result['batches']} batches, {result['rejected']} rejected",
                flush=True,
            )
        by_engine = {r["engine"]: r for r in results if r["input_rows"] == rows}
        if len(by_engine) == 2:
            same = by_engine["ours"]["per_server"] == by_engine["duckdb"]["per_server"]
            print(f"  same rows per server in both engines: {same}")
    if args.derived_uuid_rows and "ours" in args.engines:
        result = measure("ours", args.derived_uuid_rows, with_uuid=False)
        results.append(result)
        print(
            f"  ours* {args.derived_uuid_rows:>11,} rows without a uuid column (UUID5 derived): "
            f"{result['rows'] / result['seconds']:,.0f} rows/s, peak RSS {result['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    print("\nsummary (goal: >= 150,000 rows/s on one core, peak RSS <= 1024 MB and flat)")
    print(f"  {'engine':6s} {'rows':>11s} {'rows/s':>9s} {'RSS MB':>7s}  goal")
    for r in results:
        rate = r["rows"] / r["seconds"]
        verdict = "met" if rate >= GOAL_ROWS_PER_S and r["peak_rss_mb"] <= GOAL_RSS_MB else "MISSED"
        print(f"  {r['engine']:6s} {r['input_rows']:>11,} {rate:>9,.0f} {r['peak_rss_mb']:>7.0f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
