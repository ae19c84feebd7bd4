"""A loopback farm of real nginx servers, to measure our politeness against real server software.

``testserver.ImageFarm`` is our own Python server: it behaves the way we wrote it. This farm runs
Debian's nginx (``/usr/sbin/nginx``), so a hidden limit is nginx's own ``limit_req`` token bucket
(``burst`` + ``nodelay``) and ``limit_conn`` counter, refusals are nginx's bare 429 or 503 (never a
``Retry-After``), and what a host saw is read back from nginx's own ``access_log``.

One nginx master (``worker_processes 1``, ``daemon off``) serves every host; host ``i`` is a
``server`` on ``127.0.0.<first_address + i>`` with a free port. Config, pid, error log, access logs,
temp paths and docroots all live in ``workdir``, so nothing outside it is touched.

URL space of each host::

    /img/<name>.jpg        an image written by ``add_images`` (``testserver.render_image`` bytes), 200
    /missing/<name>.jpg    404 (no such file)
    /reset/<name>.jpg      nginx's 444: the connection is closed without any response
    /err/<name>.jpg        500
    /stall/<name>.jpg      the image of ``add_faults(stall=...)``, sent at 1 byte/s from the first byte
                           of the status line on (``limit_rate 1``, for a 200 only): bytes keep coming,
                           so a per-read timeout never fires; only a client's total deadline ends it
    /robots.txt            ``NginxHost.robots_txt``, or 404; the only path exempt from the limits
    anything else          404

Every path but ``/robots.txt`` passes the host's ``limit_req`` and ``limit_conn`` first, as on a
real server where the limit is per host, not per file: a fault URL can be refused too. The fault
routes answer by prefix, so any ``<name>`` works; ``add_faults`` records which URLs a test meant.

Lifetime: ``stop()`` (or leaving the ``with`` block) kills nginx's whole process group and waits;
an ``atexit`` hook stops farms a crashed test left running; the master gets SIGTERM if the Python
process dies (``PR_SET_PDEATHSIG``, set when the farm is started from the main thread); and a
timer stops the farm after ``max_lifetime`` seconds whatever happens.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from distributed_downloader.demo.testserver import max_requests_in_window, render_image

NGINX = Path("/usr/sbin/nginx")
START_TIMEOUT = 10.0  # seconds for nginx to listen on every host
STOP_TIMEOUT = 10.0  # seconds for the process group to exit after SIGTERM, before SIGKILL
START_ATTEMPTS = 3  # a port picked free can be taken before nginx binds it: retry with new ports
ROBOTS_PATH = "/robots.txt"
_NO_FILE = "/__nginxfarm_no_such_file__"  # try_files target that never exists
_PR_SET_PDEATHSIG = 1
_LIVE: weakref.WeakSet[NginxFarm] = weakref.WeakSet()


@dataclass(frozen=True)
class NginxHost:
    """One host's hidden limits, enforced by nginx itself."""

    rate: float  # limit_req rate in requests/s (nginx counts in r/m when not whole: 7.5 -> 450r/m)
    burst: int  # limit_req burst, with nodelay: burst + 1 requests may arrive at once
    refuse_status: int = 503  # limit_req_status / limit_conn_status: 429, or nginx's default 503
    max_connections: int | None = None  # limit_conn: requests in flight at once
    robots_txt: str | None = None  # body of /robots.txt; 404 when None

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError("rate must be > 0")
        if round(self.rate * 60) < 1:
            raise ValueError("rate must be >= 1/60 r/s (nginx's finest unit is 1r/m)")
        if self.burst < 0:
            raise ValueError("burst must be >= 0")
        if not 400 <= self.refuse_status <= 599:
            raise ValueError("refuse_status must be within 400..599 (nginx's limit_req_status range)")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")


@dataclass(frozen=True)
class LogEntry:
    """One access_log line: when nginx started reading the request, when it logged it, what it sent."""

    start: float  # epoch seconds: $msec - $request_time (millisecond resolution)
    end: float  # epoch seconds: $msec
    status: int  # 444 for a closed connection, 499 when the client hung up first
    path: str  # $request_uri, query included
    user_agent: str  # "" when the header was absent
    connection: int = 0  # $connection: the TCP connection's serial number (keep-alive reuse)
    bytes_sent: int = 0


_LOG_FORMAT = "\\t".join(
    ["$msec", "$request_time", "$status", "$request_uri", "$http_user_agent", "$connection", "$bytes_sent"]
)


def parse_log_line(line: str) -> LogEntry | None:
    """A LogEntry from one line of the farm's log_format (JSON-escaped, tab-separated); None if partial."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 7:
        return None
    try:
        end_ms = round(float(parts[0]) * 1000)
        took_ms = round(float(parts[1]) * 1000)
        uri, agent = (json.loads(f'"{value}"') for value in parts[3:5])
        return LogEntry(
            (end_ms - took_ms) / 1000, end_ms / 1000, int(parts[2]), uri, agent, int(parts[5]), int(parts[6])
        )
    except ValueError:
        return None


def peak_overlap(entries: list[LogEntry]) -> int:
    """Most requests in flight at once, over half-open intervals [start, end) in whole milliseconds.

    Half-open so that back-to-back requests on one keep-alive connection (one ends in the millisecond
    the next starts) count once; a request nginx handled within one millisecond counts at its instant.
    """
    events: list[tuple[int, int]] = []  # (ms, order): order 0 = end, 1 = start, 2 = instantaneous
    for entry in entries:
        start, end = round(entry.start * 1000), round(entry.end * 1000)
        if end > start:
            events += [(start, 1), (end, 0)]
        else:
            events.append((start, 2))
    events.sort()
    current = best = 0
    for _, kind in events:
        if kind == 0:
            current -= 1
        elif kind == 1:
            current += 1
            best = max(best, current)
        else:
            best = max(best, current + 1)
    return best


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def _listening(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((address, port)) == 0


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM to the nginx master when the thread that started it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _rate_directive(rate: float) -> str:
    return f"{int(rate)}r/s" if float(rate).is_integer() else f"{round(rate * 60)}r/m"


@dataclass(frozen=True)
class Availability:
    """``NginxFarm.available()``: truthy when nginx can run here, else falsy with the reason."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


@dataclass
class _HostState:
    spec: NginxHost
    address: str
    docroot: Path
    log_path: Path
    port: int = 0
    md5: dict[str, str] = field(default_factory=dict)  # path -> md5 of the bytes on disk
    faults: dict[str, str] = field(default_factory=dict)  # path -> missing | reset | error500 | stall


class NginxFarm:
    """Real nginx servers on 127.0.0.N, one per ``NginxHost``; a context manager."""

    @staticmethod
    def available() -> Availability:
        """Whether nginx can run here: falsy, with ``.reason``, when it cannot."""
        if not NGINX.exists():
            return Availability(False, f"{NGINX} is missing (apt-get install nginx)")
        if not os.access(NGINX, os.X_OK):
            return Availability(False, f"{NGINX} is not executable")
        return Availability(True, "")

    def __init__(
        self,
        hosts: list[NginxHost],
        workdir: Path | None = None,
        first_address: int = 2,
        seed: int = 0,
        max_lifetime: float = 3600.0,
    ) -> None:
        if not hosts:
            raise ValueError("at least one host")
        if first_address < 1 or first_address + len(hosts) - 1 > 254:
            raise ValueError("hosts must fit in 127.0.0.1..127.0.0.254")
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="nginxfarm-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.max_lifetime = max_lifetime
        self.hosts = [
            _HostState(
                spec,
                f"127.0.0.{first_address + i}",
                self.workdir / "hosts" / str(i),
                self.workdir / "logs" / f"host_{i}.access.log",
            )
            for i, spec in enumerate(hosts)
        ]
        for host in self.hosts:
            for folder in ("img", "stall"):
                (host.docroot / folder).mkdir(parents=True, exist_ok=True)
            if host.spec.robots_txt is not None:
                (host.docroot / "robots.txt").write_text(host.spec.robots_txt)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ content

    def _write_image(self, host_index: int, folder: str, name: str, width: int, height: int) -> str:
        host = self.hosts[host_index]
        data = render_image(self.seed, f"{host_index}/{name}", "jpg", width, height)
        target = host.docroot / folder / f"{name}.jpg"
        partial = target.with_name(target.name + ".part")
        partial.write_bytes(data)
        partial.replace(target)  # atomic: a running nginx never serves half a file
        path = f"/{folder}/{name}.jpg"
        host.md5[path] = hashlib.md5(data).hexdigest()
        return path

    def add_images(self, host_index: int, names: list[str], width: int = 64, height: int = 48) -> None:
        """Write ``/img/<name>.jpg`` for each name (deterministic bytes); works before or after start."""
        for name in names:
            if not name or "/" in name:
                raise ValueError(f"bad image name {name!r}")
            self._write_image(host_index, "img", name, width, height)

    def add_faults(
        self,
        host_index: int,
        missing: Sequence[str] = (),
        reset: Sequence[str] = (),
        error500: Sequence[str] = (),
        stall: Sequence[str] = (),
    ) -> None:
        """Record per-URL permanent faults (see the module docstring for the paths); stall bodies are written."""
        faults = self.hosts[host_index].faults
        for kind, prefix, names in (
            ("missing", "missing", missing),
            ("reset", "reset", reset),
            ("error500", "err", error500),
            ("stall", "stall", stall),
        ):
            for name in names:
                if not name or "/" in name:
                    raise ValueError(f"bad fault name {name!r}")
                if kind == "stall":
                    self._write_image(host_index, "stall", name, 64, 48)
                faults[f"/{prefix}/{name}.jpg"] = kind

    def faults(self, host_index: int) -> dict[str, str]:
        """Fault paths recorded by ``add_faults``: path -> missing | reset | error500 | stall."""
        return dict(self.hosts[host_index].faults)

    def images(self, host_index: int) -> list[str]:
        """Paths of the images written by ``add_images``."""
        return [p for p in self.hosts[host_index].md5 if p.startswith("/img/")]

    def url(self, host_index: int, path: str) -> str:
        host = self.hosts[host_index]
        if not host.port:
            raise RuntimeError("the farm has no ports before start()")
        return f"http://{host.address}:{host.port}{path}"

    def expected_md5(self, host_index: int, path: str) -> str:
        """MD5 of the bytes nginx serves for ``path`` (an image or a stall body)."""
        return self.hosts[host_index].md5[path.split("?", 1)[0]]

    # ------------------------------------------------------------------ config and process

    def _config(self) -> str:
        work = self.workdir
        lines = [
            "# Written by distributed_downloader.nginxfarm; regenerated at every start.",
            "daemon off;",
            "master_process on;",
            "worker_processes 1;",
            f"pid {work / 'nginx.pid'};",
            f"error_log {work / 'logs' / 'error.log'} warn;",
        ]
        if os.geteuid() == 0:
            lines.append("user root;")  # workers keep root's access to a 0700 temp docroot
        lines += [
            "events { worker_connections 1024; }",
            "http {",
            "    default_type application/octet-stream;",
            "    types { image/jpeg jpg; text/plain txt; }",
            "    sendfile on;",
            "    keepalive_timeout 65s;",
            "    server_tokens off;",
            "    access_log off;",
            f"    client_body_temp_path {work / 'tmp' / 'body'};",
            f"    proxy_temp_path {work / 'tmp' / 'proxy'};",
            f"    fastcgi_temp_path {work / 'tmp' / 'fastcgi'};",
            f"    uwsgi_temp_path {work / 'tmp' / 'uwsgi'};",
            f"    scgi_temp_path {work / 'tmp' / 'scgi'};",
            f"    log_format farm escape=json '{_LOG_FORMAT}';",
            "    limit_req_log_level info;",  # below the error_log level: refusals are not errors here
            "    limit_conn_log_level info;",
            # Only a 200 trickles on /stall/: a refusal there must arrive at once, like anywhere else.
            # limit_rate takes variables (nginx >= 1.17) and is read when the response is first written.
            "    map $status $farm_stall_rate { 200 1; default 0; }",
        ]
        for i, host in enumerate(self.hosts):
            spec = host.spec
            lines.append(f"    limit_req_zone $server_addr zone=req{i}:1m rate={_rate_directive(spec.rate)};")
            burst = f" burst={spec.burst}" if spec.burst else ""  # nginx rejects burst=0 (its default)
            limits = [f"limit_req zone=req{i}{burst} nodelay;"]
            if spec.max_connections is not None:
                lines.append(f"    limit_conn_zone $server_addr zone=conn{i}:1m;")
                limits.append(f"limit_conn conn{i} {spec.max_connections};")
            limit = " ".join(limits)
            robots = "try_files /robots.txt =404;" if spec.robots_txt is not None else "return 404;"
            lines += [
                "    server {",
                f"        listen {host.address}:{host.port};",
                f"        root {host.docroot};",
                f"        access_log {host.log_path} farm;",
                f"        limit_req_status {spec.refuse_status};",
                f"        limit_conn_status {spec.refuse_status};",
                f"        location = {ROBOTS_PATH} {{ {robots} }}",
                f"        location / {{ {limit} }}",
                f"        location ^~ /missing/ {{ {limit} try_files {_NO_FILE} =404; }}",
                # try_files runs after the limits (return would run before them); 444 closes silently
                f"        location ^~ /reset/ {{ {limit} try_files {_NO_FILE} =444; }}",
                f"        location ^~ /err/ {{ {limit} try_files {_NO_FILE} =500; }}",
                f"        location ^~ /stall/ {{ {limit} limit_rate $farm_stall_rate; limit_rate_after 0; }}",
                "    }",
            ]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def start(self) -> NginxFarm:
        """Write the config, start nginx, wait until every host listens."""
        availability = self.available()
        if not availability:
            raise RuntimeError(availability.reason)
        with self._lock:
            if self._proc is not None:
                raise RuntimeError("already started")
            for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (self.workdir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
            error = ""
            for _ in range(START_ATTEMPTS):
                error = self._try_start()
                if not error or "Address already in use" not in error:
                    break
            if error:
                raise RuntimeError(f"nginx did not start: {error}")
            _LIVE.add(self)
            if self.max_lifetime > 0:
                self._timer = threading.Timer(self.max_lifetime, self.stop)
                self._timer.daemon = True
                self._timer.start()
        return self

    def _try_start(self) -> str:
        """One start with freshly picked ports; "" on success, else nginx's complaint."""
        for host in self.hosts:
            host.port = _free_port(host.address)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self._config())
        stderr = self.workdir / "logs" / "nginx.stderr"
        main_thread = threading.current_thread() is threading.main_thread()
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(
                [str(NGINX), "-p", str(self.workdir), "-e", str(self.workdir / "logs" / "error.log"), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,  # its own process group: stop() kills master and worker together
                preexec_fn=_die_with_parent if main_thread else None,  # noqa: PLW1509 - only prctl, no locks
            )
        self._proc = proc
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if all(_listening(h.address, h.port) for h in self.hosts):
                return ""
            time.sleep(0.02)
        self._kill()
        log = self.workdir / "logs" / "error.log"
        text = (stderr.read_text(errors="replace") + (log.read_text(errors="replace") if log.exists() else ""))[-2000:]
        return text or f"no listener within {START_TIMEOUT}s"

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # fast shutdown: the master ends its worker, then itself
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group holds master + worker: kill both
            proc.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """Stop nginx and wait for it; remove the workdir if the farm made it. Idempotent."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._kill()
            _LIVE.discard(self)
            if self._own_workdir and self.workdir.exists():
                shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> NginxFarm:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ what the hosts saw

    def log(self, host_index: int) -> list[LogEntry]:
        """Every request host ``host_index`` logged so far, in log order (nginx writes each line unbuffered)."""
        path = self.hosts[host_index].log_path
        if not path.exists():
            return []
        with open(path, encoding="utf-8", errors="replace") as handle:
            return [entry for line in handle if (entry := parse_log_line(line)) is not None]

    def max_in_flight(self, host_index: int) -> int:
        """Peak of requests in flight at once, from the log's [start, end) intervals."""
        return peak_overlap(self.log(host_index))

    def worst_window(self, host_index: int, window: float = 1.0) -> int:
        """Most requests starting within any ``window`` seconds, /robots.txt excluded: the peak rate sent."""
        starts = sorted(e.start for e in self.log(host_index) if e.path.split("?", 1)[0] != ROBOTS_PATH)
        return max_requests_in_window(starts, window)


@atexit.register
def _stop_all() -> None:
    """No nginx outlives the Python process that started it (a crashed test included)."""
    for farm in list(_LIVE):
        with contextlib.suppress(Exception):
            farm.stop()
