"""Images per core (issue #16): the whole download pipeline next to the image codec's own cost.

    python bench/images_per_core_bench.py                 # 2,500 URLs on 25 hosts, ~7 GB served
    python bench/images_per_core_bench.py --quick         # 500 URLs on 10 hosts, ~1.5 GB
    python bench/images_per_core_bench.py --systems ours minimal --profile-rank 20

A CPU-bound loopback scenario: generous hosts (no rate limit worth the name, no faults) serving
90% large images (2500x1667 and 4000x3000 JPEGs, 2400x1600 PNGs, a third each) and 10% small
JPEGs (640x427). The images are photo-like (``image_bench.photo_like``: smooth fields, edges,
grain), generated once into the bench cache (``$DD_BENCH_CACHE/images-per-core``) and served by
one real nginx (``nginxfarm``, ``sendfile``: the farm costs ~nothing of the 2 cores) from hard
links, one per URL, so every system downloads exactly the same bytes in the same (shuffled) order.

Systems, run one after another in the same invocation:

- ``ours``: the real workflow (Snakefile, ``profiles/local``, 2 MPI ranks), 720 px JPEG q90.
  images/s over the download round (round 1 ranks up -> ``download_round_1.done``); CPU per image
  = the ranks' CPU (psutil, polled) / images.
- ``img2dataset``: img2dataset in ``bench/.venv-peer`` (``politeness_bench.ensure_peer``), 2
  processes x 32 threads, 720 px keep_ratio, only downscale, parquet output; images/s over its wall
  time; CPU = its whole process tree (RUSAGE_CHILDREN).
- ``naive``: 32 threads in one process: ``urllib.request`` + Pillow ``draft`` + LANCZOS
  ``thumbnail`` + JPEG q90 + MD5 of the body, the results thrown away.
- ``minimal``: no network: ``imaging.process_image`` (what the workflow stores, hashes included)
  over the same bytes, in as many processes as there are cores: the codec's own cost.

It prints images/s and CPU per image per system, ours/img2dataset and ours/minimal, CPU per image
per format (large JPEG, large PNG, small JPEG; ours: the real Lane in one process per format, the
same fetch + hash + decode + resize + encode + parquet parts + commit), checks that every stored
``hashsum_original`` is the MD5 of the served bytes, and prints PSNR/SSIM of our stored images
against a float LANCZOS reference (``image_bench.reference``). ``--profile-rank S`` records one
rank with py-spy for S seconds (``--idle``, raw) and prints where its samples went.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_bench import photo_like, psnr, reference, ssim  # noqa: E402
from politeness_bench import ensure_peer, peer_version, run_logged, tail  # noqa: E402
from rss_util import cache_dir, snakemake_local_cmd  # noqa: E402

from distributed_downloader.demo.nginxfarm import NginxFarm, NginxHost  # noqa: E402
from distributed_downloader.imaging import process as imaging  # noqa: E402

IMAGE_SIZE = 720
QUALITY = 90
PROFILE_RATE = 25  # py-spy samples/s: reading ~280 threads' stacks at 100/s took a quarter of a core
SYSTEMS = ("ours", "img2dataset", "naive", "minimal", "lane")  # lane: only ours' per-format lane runs


@dataclass(frozen=True)
class Kind:
    name: str
    fmt: str  # PIL format
    ext: str
    width: int
    height: int
    share: float  # of the URLs
    group: str  # the per-format report's row


KINDS = (
    Kind("jpeg_2500x1667", "JPEG", "jpg", 2500, 1667, 0.30, "large JPEG"),
    Kind("jpeg_4000x3000", "JPEG", "jpg", 4000, 3000, 0.30, "large JPEG"),
    Kind("png_2400x1600", "PNG", "png", 2400, 1600, 0.30, "large PNG"),
    Kind("jpeg_640x427", "JPEG", "jpg", 640, 427, 0.10, "small JPEG"),
)
GROUPS = ("large JPEG", "large PNG", "small JPEG")
KIND_BY_NAME = {k.name: k for k in KINDS}


# ----------------------------------------------------------------------------- the images


def _render(kind_name: str, seed: int, path: str) -> None:
    from PIL import Image

    kind = KIND_BY_NAME[kind_name]
    img = Image.fromarray(photo_like(kind.width, kind.height, seed))
    buffer = io.BytesIO()
    if kind.fmt == "JPEG":
        img.save(buffer, "JPEG", quality=92)
    else:
        img.save(buffer, "PNG", compress_level=6)
    partial = Path(path + ".part")
    partial.write_bytes(buffer.getvalue())
    partial.replace(path)


def image_pool(per_kind: int) -> dict[str, list[Path]]:
    """``per_kind`` distinct images of each kind in the bench cache (rendered once, in parallel)."""
    folder = cache_dir("images-per-core")
    todo = []
    pool: dict[str, list[Path]] = {}
    for k, kind in enumerate(KINDS):
        pool[kind.name] = []
        for i in range(per_kind):
            path = folder / f"{kind.name}-{i}.{kind.ext}"
            pool[kind.name].append(path)
            if not path.exists():
                todo.append((kind.name, 1000 * k + i, str(path)))
    if todo:
        started = time.monotonic()
        with ProcessPoolExecutor(os.cpu_count() or 1) as executor:
            list(executor.map(_render, *zip(*todo, strict=True)))
        print(f"rendered {len(todo)} images into {folder} in {time.monotonic() - started:.0f} s", flush=True)
    return pool


@dataclass(frozen=True)
class Url:
    uuid: str
    host: int
    path: str
    kind: str
    source: Path  # the pool file it serves


def plan_urls(total: int, hosts: int, pool: dict[str, list[Path]], seed: int) -> list[Url]:
    rng = random.Random(seed)
    kinds: list[str] = []
    for kind in KINDS:
        kinds += [kind.name] * round(total * kind.share)
    kinds = (kinds + [KINDS[0].name] * total)[:total]
    rng.shuffle(kinds)
    urls = []
    for i, name in enumerate(kinds):
        kind = KIND_BY_NAME[name]
        source = pool[name][rng.randrange(len(pool[name]))]
        urls.append(Url(f"u{i:06d}", i % hosts, f"/img/u{i:06d}.{kind.ext}", name, source))
    return urls


class Farm:
    """One nginx, ``hosts`` servers on 127.0.0.N, each URL a hard link to its pool image."""

    def __init__(self, urls: list[Url], hosts: int, workdir: Path) -> None:
        specs = [NginxHost(rate=100_000, burst=100_000) for _ in range(hosts)]  # limits nobody reaches
        self.nginx = NginxFarm(specs, workdir=workdir / "nginx", max_lifetime=6 * 3600)
        for url in urls:
            # Each URL at its host, and every URL at host 0 too: the per-format lane fetches its
            # URLs from one server, as a lane does (a lane fetching all 25 hosts kept 4 hosts'
            # connection pools and opened a new connection for ~9 of 10 requests).
            for host in {url.host, 0}:
                target = self.nginx.hosts[host].docroot / url.path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    try:
                        os.link(url.source, target)
                    except OSError:  # another file system: a symlink (nginx follows it)
                        target.symlink_to(url.source)
        self.nginx.start()
        self.proc_pid = self.nginx._proc.pid if self.nginx._proc else 0

    def url(self, url: Url, host: int | None = None) -> str:
        return self.nginx.url(url.host if host is None else host, url.path)

    def cpu_seconds(self) -> float:
        """CPU nginx (master + worker) spent so far."""
        import psutil

        try:
            root = psutil.Process(self.proc_pid)
            return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return float("nan")

    def stop(self) -> None:
        self.nginx.stop()


# ----------------------------------------------------------------------------- measuring


class TreeCpu:
    """Polls a process tree with psutil: the last CPU seen of every member (user + system)."""

    def __init__(self, pid: int, poll: float = 0.2) -> None:
        self.pid = pid
        self.poll = poll
        self.cpu: dict[int, float] = {}
        self.rss: dict[int, int] = {}  # the largest resident set seen of every member, bytes
        self.faults: dict[int, int] = {}  # minor page faults of every member so far
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                family = [root, *root.children(recursive=True)]
            except psutil.Error:
                family = []
            for member in family:
                try:
                    times = member.cpu_times()
                    rss = member.memory_info().rss
                    if member.pid not in self.names:
                        self.names[member.pid] = " ".join(member.cmdline())[:300]
                except psutil.Error:
                    continue
                self.cpu[member.pid] = times.user + times.system
                self.rss[member.pid] = max(rss, self.rss.get(member.pid, 0))
                with contextlib.suppress(OSError, IndexError, ValueError):  # Linux: minflt, /proc/PID/stat field 10
                    stat = Path(f"/proc/{member.pid}/stat").read_text()
                    self.faults[member.pid] = int(stat.rsplit(")", 1)[1].split()[7])
            self._stop.wait(self.poll)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def matching(self, text: str) -> dict[int, float]:
        """CPU of the Python processes whose command line holds ``text`` (not mpiexec's, which names it too)."""
        return {
            pid: cpu
            for pid, cpu in self.cpu.items()
            if text in self.names.get(pid, "") and "python" in Path(self.names[pid].split(" ", 1)[0]).name
        }


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Result:
    system: str
    images: int
    seconds: float  # the span images/s is measured over
    cpu: float  # CPU seconds of the system (see the module docstring)
    notes: list[str] = field(default_factory=list)
    per_group_cpu_ms: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.images if self.images else float("nan")


def write_input(urls: list[Url], farm: Farm, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uuid", "identifier", "source_id", "license", "source", "title"])
        for i, url in enumerate(urls):
            writer.writerow([url.uuid, farm.url(url), f"src-{i}", "CC-BY-4.0", "images per core bench", f"image {i}"])


# ----------------------------------------------------------------------------- (a) ours


def ours_config(workdir: Path, input_path: Path, batch_size: int) -> Path:
    config = {
        "path_to_input": str(input_path),
        "path_to_output": str(workdir / "output"),
        "downloader_parameters": {
            "num_downloads": 1,
            "max_nodes": 1,
            "workers_per_node": 2,
            "batch_size": batch_size,
            "default_rate_limit": 50,  # generous hosts: the rate never binds, the cores do
            "max_rate_limit": 500,
            "allow_private_addresses": True,  # the farm lives on loopback
            "image_size": IMAGE_SIZE,
            "jpeg_quality": QUALITY,
        },
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def profile_rank(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """py-spy on one rank: samples of the threads on a CPU (not --idle), raw collapsed stacks.

    Without ``--idle`` a sample is a thread the OS saw running, so the shares are where the rank's
    CPU goes; what the cores did not get from the rank is its waiting (printed beside it).
    """
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(PROFILE_RATE)]
    cmd += ["--threads", "--nonblocking", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_ours(urls: list[Url], farm: Farm, workdir: Path, args: argparse.Namespace) -> Result:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    input_path = workdir / "urls.csv"
    write_input(urls, farm, input_path)
    batch_size = max(1, len(urls) // args.hosts)
    config = ours_config(workdir, input_path, batch_size)
    cmd = snakemake_local_cmd(config, workdir)
    log_path = workdir / "ours.log"
    print(f"  $ {' '.join(cmd)}\n  (log: {log_path})", flush=True)
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        tree = TreeCpu(proc.pid)
        spy: subprocess.Popen | None = None
        window: list[tuple[float, float, float]] = []  # (time, profiled rank's CPU, both ranks' CPU)
        profiled = 0
        while proc.poll() is None:
            if args.profile_rank and spy is None:
                ranks = sorted(tree.matching("download_worker.py"))
                if len(ranks) >= 2 and time.time() - started > 1:
                    time.sleep(args.profile_delay)  # past the MPI start, into the steady state
                    # The busier rank (with few servers one rank may hold every lane).
                    cpu = tree.matching("download_worker.py")
                    profiled = max(cpu, key=lambda pid: cpu[pid])
                    spy = profile_rank(profiled, args.profile_rank, workdir / "rank.pyspy.txt")
                    window.append((time.time(), cpu[profiled], sum(cpu.values())))
            elif spy is not None and len(window) == 1 and spy.poll() is not None:
                cpu = tree.matching("download_worker.py")
                window.append((time.time(), cpu.get(profiled, 0.0), sum(cpu.values())))
            time.sleep(0.2)
        tree.stop()
    output = workdir / "output"
    state = output / "state"
    ranks_up, done_at = mtime(state / "round_1_ranks.json"), mtime(state / "download_round_1.done")
    notes = [] if proc.returncode == 0 else [f"snakemake exited {proc.returncode}:\n{tail(log_path, 30)}"]
    ok, wrong = check_ours(urls, output / "downloaded_images")
    if wrong:
        notes.append(f"{wrong} stored rows whose hashsum_original is not the MD5 of the served bytes")
    seconds = (done_at - ranks_up) if ranks_up and done_at else time.time() - started
    rank_cpu = sum(tree.matching("download_worker.py").values())
    result = Result("ours", ok, seconds, rank_cpu, notes)
    result.extra = {
        "workflow_s": time.time() - started,
        "workflow_cpu_s": sum(tree.cpu.values()),
        "ranks": len(tree.matching("download_worker.py")),
        "rank_peak_rss_mb": sorted(tree.rss[pid] / 2**20 for pid in tree.matching("download_worker.py")),
        "rank_faults": sum(tree.faults.get(pid, 0) for pid in tree.matching("download_worker.py")),
    }
    if spy is not None:
        _, err = spy.communicate()
        path = workdir / "rank.pyspy.txt"
        result.extra["profile"] = str(path) if path.exists() else f"py-spy failed: {err[-500:]}"
        if len(window) == 2:
            (t0, mine0, both0), (t1, mine1, both1) = window
            cores = os.cpu_count() or 1
            result.extra["profile_use"] = ((mine1 - mine0) / (t1 - t0) / cores, (both1 - both0) / (t1 - t0) / cores)
    result.extra["quality"] = stored_quality(urls, output / "downloaded_images")
    return result


def check_ours(urls: list[Url], images: Path) -> tuple[int, int]:
    """(successes, successes whose hashsum_original is not the MD5 of what the farm served)."""
    md5_of: dict[Path, str] = {}
    by_uuid = {u.uuid: u for u in urls}
    ok = wrong = 0
    for path in images.glob("server_name=*/partition_id=*/successes*.parquet"):
        table = pq.read_table(path, columns=["uuid", "hashsum_original"])
        for uuid, md5 in zip(*(table.column(c).to_pylist() for c in ("uuid", "hashsum_original")), strict=True):
            url = by_uuid[uuid]
            if url.source not in md5_of:
                md5_of[url.source] = hashlib.md5(url.source.read_bytes()).hexdigest()
            ok += 1
            wrong += md5 != md5_of[url.source]
    return ok, wrong


def stored_quality(urls: list[Url], images: Path) -> dict[str, tuple[float, float]]:
    """PSNR/SSIM of one stored image per kind against a float LANCZOS resize of its original."""
    from PIL import Image

    by_uuid = {u.uuid: u for u in urls}
    found: dict[str, tuple[Url, bytes]] = {}
    for path in sorted(images.glob("server_name=*/partition_id=*/successes*.parquet")):
        table = pq.read_table(path, columns=["uuid", "image"])
        for uuid, image in zip(*(table.column(c).to_pylist() for c in ("uuid", "image")), strict=True):
            url = by_uuid[uuid]
            found.setdefault(url.kind, (url, image))
        if len(found) == len(KINDS):
            break
    out = {}
    for name, (url, image) in sorted(found.items()):
        ref = np.clip(reference(url.source.read_bytes()), 0, 255)
        got = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), np.float32)
        out[name] = (psnr(got, ref), ssim(got, ref))
    return out


# ----------------------------------------------------------------------------- (b) img2dataset


def run_img2dataset(urls: list[Url], farm: Farm, workdir: Path) -> Result:
    exe, status = ensure_peer()
    if exe is None:
        return Result("img2dataset", 0, 0.0, 0.0, [f"img2dataset unavailable: {status}"])
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    input_path = workdir / "peer_urls.csv"
    with open(input_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url"])
        for url in urls:
            writer.writerow([farm.url(url)])
    output = workdir / "peer_output"
    cmd = [str(exe), "--url_list", str(input_path), "--input_format", "csv", "--url_col", "url"]
    cmd += ["--output_format", "parquet", "--output_folder", str(output), "--processes_count", "2"]
    cmd += ["--thread_count", "32", "--image_size", str(IMAGE_SIZE), "--resize_mode", "keep_ratio"]
    cmd += ["--resize_only_if_bigger", "True", "--encode_quality", str(QUALITY), "--retries", "0"]
    # Its default shard is 10,000 URLs, one per process: 2,500 URLs would leave one process idle.
    cmd += ["--number_sample_per_shard", str(max(1, len(urls) // 10))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{exe.parent}{os.pathsep}{env.get('PATH', '')}"
    log_path = workdir / "peer.log"
    print(f"  $ {' '.join(cmd)}\n  (log: {log_path})", flush=True)
    before = children_cpu()
    code, wall = run_logged(cmd, log_path, 1800.0, lambda: "running", env=env)
    cpu = children_cpu() - before
    ok = 0
    for path in output.glob("*.parquet"):
        table = pq.read_table(path, columns=["status"])
        ok += sum(1 for s in table.column("status").to_pylist() if s == "success")
    notes = [] if code == 0 else [f"img2dataset exited {code}:\n{tail(log_path, 30)}"]
    result = Result("img2dataset", ok, wall, cpu, notes)
    result.extra = {"version": peer_version()}
    return result


# ----------------------------------------------------------------------------- (c) naive


def naive_main(url_file: Path, threads: int) -> None:
    """Child process: 32 threads of urllib + Pillow draft + thumbnail + JPEG, results thrown away."""
    import urllib.request

    from PIL import Image

    rows = [line.rstrip("\n").split("\t") for line in url_file.read_text().splitlines() if line]
    cpu: dict[str, list[float]] = defaultdict(list)
    failures = Counter()

    def one(row: list[str]) -> None:
        url, kind = row
        t0 = time.thread_time()
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                body = response.read()
            hashlib.md5(body).hexdigest()
            img = Image.open(io.BytesIO(body))
            img.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))
            img = img.convert("RGB")
            img.thumbnail((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            img.save(out, "JPEG", quality=QUALITY)
        except Exception as exc:  # counted, not fatal
            failures[type(exc).__name__] += 1
            return
        cpu[kind].append(time.thread_time() - t0)

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, rows))
    seconds = time.monotonic() - started
    print(json.dumps({"seconds": seconds, "cpu": cpu, "failures": failures}))


def run_naive(urls: list[Url], farm: Farm, workdir: Path, threads: int) -> Result:
    workdir.mkdir(parents=True, exist_ok=True)
    url_file = workdir / "naive_urls.tsv"
    url_file.write_text("".join(f"{farm.url(u)}\t{u.kind}\n" for u in urls))
    before = children_cpu()
    proc = subprocess.run(
        [sys.executable, __file__, "--naive-worker", str(url_file), "--threads", str(threads)],
        capture_output=True,
        text=True,
    )
    cpu = children_cpu() - before
    if proc.returncode != 0:
        return Result("naive", 0, 0.0, cpu, [f"naive loop exited {proc.returncode}: {proc.stderr[-2000:]}"])
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    images = sum(len(v) for v in data["cpu"].values())
    notes = [f"failures: {data['failures']}"] if data["failures"] else []
    result = Result(f"naive {threads}-thread urllib + Pillow", images, data["seconds"], cpu, notes)
    result.per_group_cpu_ms = per_group({k: v for k, v in data["cpu"].items()})
    return result


def per_group(cpu_by_kind: dict[str, list[float]]) -> dict[str, float]:
    """ms of CPU per image by report group (large JPEG, large PNG, small JPEG)."""
    grouped: dict[str, list[float]] = defaultdict(list)
    for kind, values in cpu_by_kind.items():
        grouped[KIND_BY_NAME[kind].group] += values
    return {g: 1000 * float(np.mean(v)) for g, v in grouped.items() if v}


# ----------------------------------------------------------------------------- (d) minimal


_POOL_BYTES: dict[str, bytes] = {}


def _load_pool(paths: list[str]) -> None:
    for path in paths:
        _POOL_BYTES[path] = Path(path).read_bytes()


def _minimal_chunk(chunk: list[tuple[str, str]]) -> dict[str, list[float]]:
    settings = imaging.ImageSettings(image_size=IMAGE_SIZE, jpeg_quality=QUALITY)
    cpu: dict[str, list[float]] = defaultdict(list)
    for path, kind in chunk:
        t0 = time.thread_time()
        imaging.process_image(_POOL_BYTES[path], settings)
        cpu[kind].append(time.thread_time() - t0)
    return cpu


def run_minimal(urls: list[Url], workers: int) -> Result:
    paths = sorted({str(u.source) for u in urls})
    items = [(str(u.source), u.kind) for u in urls]
    chunks = [items[i : i + 20] for i in range(0, len(items), 20)]
    cpu: dict[str, list[float]] = defaultdict(list)
    with ProcessPoolExecutor(workers, initializer=_load_pool, initargs=(paths,)) as pool:
        list(pool.map(_minimal_chunk, [items[:2]] * workers))  # warm-up: imports, first decode
        started = time.monotonic()
        for part in pool.map(_minimal_chunk, chunks):
            for kind, values in part.items():
                cpu[kind] += values
        seconds = time.monotonic() - started
    images = sum(len(v) for v in cpu.values())
    result = Result(f"minimal loop ({workers} processes, no network)", images, seconds, sum(map(sum, cpu.values())))
    result.per_group_cpu_ms = per_group(cpu)
    return result


# ----------------------------------------------------------------------------- ours per format


LANE_CHILD = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])
from distributed_downloader import config as config_mod
from distributed_downloader.engine.lane import Lane, LaneSpec
config = config_mod.validate(args["config"])
paths = config_mod.paths(config)
spec = LaneSpec(args["server"], 0, 1, start_rate=500.0, max_rate=500.0, max_connections=8, decrease=0.3)
lane = Lane(spec, config, paths, round_no=1)
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime
spy = None
if args.get("profile"):  # py-spy on this process while the batch runs (--lane-profile)
    import subprocess
    spy = subprocess.Popen([args["pyspy"], "record", "--pid", str(__import__("os").getpid()), "--rate", "50",
                            "--threads", "--nonblocking", "--format", "raw", "--output", args["profile"]],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
usage0 = resource.getrusage(resource.RUSAGE_SELF)
before, started = cpu(), time.monotonic()
stats = lane.run_batch(0, "bench", "full")
if spy is not None:
    spy.send_signal(2)
    spy.wait()
usage1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu": cpu() - before, "seconds": time.monotonic() - started,
                  "successes": stats.new_successes, "errors": stats.errors,
                  "user": usage1.ru_utime - usage0.ru_utime, "system": usage1.ru_stime - usage0.ru_stime,
                  "minor_faults": usage1.ru_minflt - usage0.ru_minflt}))
lane.close()
"""


def run_ours_per_format(
    urls: list[Url], farm: Farm, workdir: Path, per_group_urls: int, profile: bool = False
) -> dict[str, float]:
    """CPU per image of the real Lane (fetch ... commit), one process and one format at a time."""
    from distributed_downloader import config as config_mod
    from distributed_downloader.net.hosts import server_of

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
    from helpers import write_batch_urls

    out = {}
    for group in GROUPS:
        # URLs of every host, all fetched from host 0 (one server, as a lane fetches in the workflow).
        chosen = [u for u in urls if KIND_BY_NAME[u.kind].group == group][:per_group_urls]
        if not chosen:
            continue
        folder = workdir / group.replace(" ", "_")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        config = {
            "path_to_input": str(folder / "unused.csv"),
            "path_to_output": str(folder / "output"),
            "downloader_parameters": {
                "allow_private_addresses": True,
                "respect_robots_txt": False,
                "image_size": IMAGE_SIZE,
                "jpeg_quality": QUALITY,
            },
        }
        config = config_mod.validate(config)
        server = server_of(farm.url(chosen[0], host=0))
        write_batch_urls(config_mod.paths(config).batch_urls(server, 0), [farm.url(u, host=0) for u in chosen])
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        stacks = str(folder / "lane.pyspy.txt") if profile else ""
        payload = json.dumps({"config": config, "server": server, "profile": stacks, "pyspy": spy})
        proc = subprocess.run([sys.executable, "-c", LANE_CHILD, payload], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  lane child for {group} failed: {proc.stderr[-1500:]}", flush=True)
            continue
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        if data["successes"]:
            out[group] = 1000 * data["cpu"] / data["successes"]
            n = data["successes"]
            print(
                f"  lane, {group}: {1000 * data['user'] / n:.1f} ms user + {1000 * data['system'] / n:.1f} ms system"
                f" per image, {data['minor_faults'] / n:,.0f} page faults per image",
                flush=True,
            )
        if stacks and Path(stacks).exists():
            counts, total, _ = summarize_profile(Path(stacks))
            counts.pop("blocked", None)
            busy = max(1, sum(counts.values()))
            print(f"  lane, {group}: " + ", ".join(f"{k} {100 * n / busy:.0f}%" for k, n in counts.most_common()))
    return out


# ----------------------------------------------------------------------------- py-spy breakdown


CATEGORIES = (  # (category, markers in a frame), first match from the leaf up wins
    ("hash", ("md5", "_md5", "update (hashlib", "hexdigest")),
    ("encode", ("encode_image", "_save (PIL/JpegImagePlugin", "save (PIL/Image.py")),
    ("resize", ("_downscale", "resize (PIL/Image.py", "reduce (PIL/Image.py", "_normalise", "transpose")),
    ("decode", ("load (PIL/ImageFile.py", "_prepare", "_open (", "draft (", "open (PIL/Image.py")),
    ("write", ("batch_parts.py", "pyarrow", "parquet", "store/files.py", "_commit")),
    ("fetch", ("fetch.py", "requests/", "urllib3/", "http/client.py", "socket.py", "ssl.py")),
)
# The rest of a rank: lane dispatch loops, thread hand-offs, MPI polling, the coordinator.
DISPATCH = ("lane.py", "politeness.py", "worker.py", "coordinator.py", "hosts.py", "concurrent/futures", "queue.py")


# Leaves of a thread that is blocked, not computing: py-spy (without --idle) still reports some of them.
BLOCKED = ("Condition.wait (threading.py", "_worker (concurrent/futures/thread.py:81)", "Event.wait", "sleep")


def classify(stack: str) -> str:
    frames = stack.split(";")
    if any(m in frames[-1] for m in BLOCKED):
        return "blocked"
    for frame in reversed(frames):  # the leaf first
        for category, markers in CATEGORIES:
            if any(m in frame for m in markers):
                return category
    if any(m in frame for frame in frames for m in DISPATCH):
        return "dispatch"
    return "other"


def summarize_profile(path: Path) -> tuple[Counter, int, Counter]:
    """(samples by category, total samples, top 'other' leaves) of a py-spy raw file."""
    counts: Counter = Counter()
    others: Counter = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        n = int(number)
        total += n
        category = classify(stack)
        counts[category] += n
        if category == "other":
            others[stack.split(";")[-1][:90]] += n
    return counts, total, others


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 URLs on 10 hosts")
    parser.add_argument("--urls", type=int, default=None)
    parser.add_argument("--hosts", type=int, default=None)
    parser.add_argument("--pool", type=int, default=6, help="distinct images per kind")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS[:4]), choices=SYSTEMS)
    parser.add_argument("--threads", type=int, default=32, help="naive loop threads")
    parser.add_argument("--per-format", type=int, default=None, help="URLs per format for ours' lane (0: skip)")
    parser.add_argument("--profile-rank", type=float, default=0.0, help="py-spy a rank for this many seconds")
    parser.add_argument("--profile-delay", type=float, default=8.0)
    parser.add_argument("--lane-profile", action="store_true", help="py-spy each per-format lane run")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--naive-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.naive_worker is not None:
        naive_main(args.naive_worker, args.threads)
        return 0
    args.urls = args.urls or (500 if args.quick else 2500)
    args.hosts = args.hosts or (10 if args.quick else 25)
    per_format = args.per_format if args.per_format is not None else (40 if args.quick else 100)
    if not NginxFarm.available():
        print(f"nginx is needed: {NginxFarm.available().reason}")
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="images-per-core-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pool = image_pool(args.pool)
    urls = plan_urls(args.urls, args.hosts, pool, args.seed)
    served = sum(u.source.stat().st_size for u in urls)
    mix = Counter(KIND_BY_NAME[u.kind].group for u in urls)
    print(
        f"images per core bench: {len(urls):,} URLs on {args.hosts} nginx hosts, {served / 1e9:.2f} GB served "
        f"({', '.join(f'{g} {mix[g]}' for g in GROUPS)}); {os.cpu_count()} cores; image_size {IMAGE_SIZE}, "
        f"JPEG q{QUALITY}; load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    farm = Farm(urls, args.hosts, workdir)
    results: dict[str, Result] = {}
    try:
        for system in args.systems:
            nginx_before = farm.cpu_seconds()
            print(f"\n[{system}]", flush=True)
            if system == "ours":
                result = run_ours(urls, farm, workdir / "ours", args)
                if per_format:
                    result.per_group_cpu_ms = run_ours_per_format(urls, farm, workdir / "ours_lane", per_format)
            elif system == "img2dataset":
                result = run_img2dataset(urls, farm, workdir / "peer")
            elif system == "lane":
                result = Result("ours, one Lane per format (in process)", 0, 0.0, 0.0)
                result.per_group_cpu_ms = run_ours_per_format(
                    urls, farm, workdir / "ours_lane", per_format, args.lane_profile
                )
            elif system == "naive":
                result = run_naive(urls, farm, workdir / "naive", args.threads)
            else:
                result = run_minimal(urls, os.cpu_count() or 1)
            result.extra["nginx_cpu_s"] = farm.cpu_seconds() - nginx_before
            results[system] = result
            print(
                f"  {result.images:,} images in {result.seconds:.1f} s: {result.rate:.1f} images/s, "
                f"{result.cpu_ms:.1f} ms CPU per image ({result.cpu:.0f} s CPU); "
                f"nginx {result.extra['nginx_cpu_s']:.1f} s CPU; load {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
                flush=True,
            )
            for note in result.notes:
                print(f"  NOTE: {note}", flush=True)
    finally:
        farm.stop()
    report(results, args)
    return 0


def report(results: dict[str, Result], args: argparse.Namespace) -> None:
    print("\n| system | images | seconds | images/s | CPU per image | " + " | ".join(GROUPS) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(GROUPS))
    for result in results.values():
        groups = " | ".join(
            f"{result.per_group_cpu_ms[g]:.1f} ms" if g in result.per_group_cpu_ms else "-" for g in GROUPS
        )
        print(
            f"| {result.system} | {result.images:,} | {result.seconds:.1f} | {result.rate:.1f} | "
            f"{result.cpu_ms:.1f} ms | {groups} |"
        )
    ours = results.get("ours")
    if ours is not None:
        extra = ours.extra
        print(
            f"\nours: download round {ours.seconds:.1f} s of a {extra['workflow_s']:.1f} s workflow; ranks "
            f"{ours.cpu:.0f} s CPU ({100 * ours.cpu / ours.seconds / (os.cpu_count() or 1):.0f}% of the cores), "
            f"whole workflow {extra['workflow_cpu_s']:.0f} s CPU; ranks' peak RSS "
            + " / ".join(f"{mb:,.0f}" for mb in extra.get("rank_peak_rss_mb", []))
            + f" MB; {extra.get('rank_faults', 0) / max(1, ours.images):,.0f} page faults per image"
        )
        for name, (p, s) in extra.get("quality", {}).items():
            print(f"  stored {name}: PSNR {p:.2f} dB, SSIM {s:.4f} vs a float LANCZOS reference")
        for other, goal in (("img2dataset", 2.0), ("minimal", 0.9)):
            if other in results and results[other].rate:
                ratio = ours.rate / results[other].rate
                verdict = "met" if ratio >= goal else "MISSED"
                print(f"  ours / {results[other].system}: x{ratio:.2f} images/s (goal >= {goal}: {verdict})")
        profile = extra.get("profile")
        if profile and Path(profile).exists():
            counts, total, others = summarize_profile(Path(profile))
            blocked = counts.pop("blocked", 0)
            busy = max(1, total - blocked)
            print(
                f"\n  py-spy, the busier rank, {args.profile_rank:.0f} s: {busy} samples of threads on a CPU "
                f"({blocked} more of blocked threads py-spy took for active, left out); "
                "fetch includes the MD5 of the body (hashed while read)"
            )
            for category, n in counts.most_common():
                print(f"    {category:8s} {100 * n / busy:5.1f}% of its CPU samples")
            ticks = PROFILE_RATE * args.profile_rank  # py-spy's duration counts samples taken
            print(
                f"    threads of the rank runnable at a sample, on average: {busy / ticks:.1f} "
                f"(>= {os.cpu_count()} cores: the rank never lacked work for them)"
            )
            if "profile_use" in extra:
                mine, both = extra["profile_use"]
                print(
                    f"    meanwhile it got {100 * mine:.0f}% of the {os.cpu_count()} cores, both ranks "
                    f"{100 * both:.0f}% (other jobs on the machine had the rest)"
                )
            print("    top 'other' leaves: " + "; ".join(f"{leaf} {n}" for leaf, n in others.most_common(6)))
    print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
