"""The politeness benchmark's farms: servers with hidden limits and the faults of the real world.

Three scenarios (issue #13: a bench farm must look like the world, not like our own clean farm):

``background`` (loopback ``testserver.ImageFarm``; default 20,000 URLs on 50 hosts)
    Zipf host sizes; hidden token-bucket rates spread geometrically over 2-66 req/s with small
    bursts (capacity max(1, rate/4)); refusals are 429 + Retry-After on some hosts, bare 429 on
    others and nginx's bare 503 on the rest; some hosts cap their connections (503, with or
    without Retry-After); small latencies; and on EVERY host, the largest included, an everyday
    background of 1-3% per-URL faults (404s, one-off 500s, resets, stalls of 30 s).
``heavy`` (loopback; ~1,030 URLs on 8 hosts)
    ~40% faulty URLs: the background faults at a high dose plus decompression bombs
    (/bomb.png), truncated images and HTML served as image/jpeg; the hidden rates are set so
    that the politeness bound (max over hosts of retrievable URLs / rate) is ~20 s.
``nginx`` (real nginx through ``distributed_downloader.demo.nginxfarm``; default 20,000 URLs on 20 hosts:
    the background farm's scale)
    nginx's own ``limit_req`` (burst, nodelay) and ``limit_conn``, bare 429 or 503 refusals, and
    1-3% permanent faults per host (404, 500, connection closed without a response, 1 byte/s).

Every choice is deterministic for a seed. URL paths are planned before any server starts (the
ports are only known then); ``Scenario.start`` brings up a fresh farm, so each system under test
meets servers in the same state (full buckets, one-off faults not yet played).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from distributed_downloader.demo.testserver import (
    OUTCOME_ERROR500,
    OUTCOME_MISSING,
    OUTCOME_OK,
    OUTCOME_RESET,
    OUTCOME_STALL,
    FaultMix,
    HostSpec,
    ImageFarm,
    render_image,
)

SCENARIOS = ("background", "heavy", "nginx")
IMAGE_SIZE = (64, 48)  # small images: the farm's image generation must not eat the 2 cores
ROBOTS = "/robots.txt"
# Faults a client can get past by asking again (one request more each).
ONE_OFF = frozenset({OUTCOME_ERROR500, OUTCOME_RESET, OUTCOME_STALL})


@dataclass(frozen=True)
class HostPlan:
    index: int
    name: str
    rate: float  # hidden requests/s
    capacity: float  # hidden bucket: back-to-back requests allowed (testserver burst; nginx burst + 1)
    max_connections: int | None
    refusal: str  # how a refusal looks: "429+RA", "429", "503"
    cap_refusal: str  # the same for the connection cap ("" without one)
    latency: float
    spec: object  # HostSpec (loopback) or NginxHost
    urls: int = 0
    retrievable: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # URL kind -> count

    @property
    def bound_seconds(self) -> float:
        """The least time this host's retrievable URLs take without exceeding its hidden rate."""
        return self.retrievable / self.rate

    @property
    def requests_needed(self) -> int:
        """Requests a perfect client sends: every URL once, plus one more per one-off fault."""
        return self.urls + sum(n for kind, n in self.kinds.items() if kind in ONE_OFF)


@dataclass(frozen=True)
class UrlPlan:
    uuid: str
    host: int
    path: str  # with its query string
    kind: str  # ok, missing, error500, reset, stall, bomb, truncated, html, nginx-...
    retrievable: bool


@dataclass
class Scenario:
    name: str
    backend: str  # "testserver" or "nginx"
    seed: int
    image_size: tuple[int, int]
    hosts: list[HostPlan]
    urls: list[UrlPlan]

    @property
    def bound(self) -> float:
        return max(h.bound_seconds for h in self.hosts)

    @property
    def requests_bound(self) -> float:
        """max over hosts of (requests a perfect client needs - capacity) / rate: counts the faulty URLs too."""
        return max(max(0.0, h.requests_needed - h.capacity) / h.rate for h in self.hosts)

    @property
    def retrievable(self) -> list[UrlPlan]:
        return [u for u in self.urls if u.retrievable]

    def expected_bytes(self, url: UrlPlan) -> bytes:
        """The image a retrievable URL serves."""
        width, height = self.image_size
        if self.backend == "nginx":
            name = url.path.rsplit("/", 1)[1].split(".", 1)[0]
            return render_image(self.seed, f"{url.host}/{name}", "jpg", width, height)
        return _bytes_farm(self.seed).expected_bytes(url.path)

    def start(self, workdir: object = None) -> RunningFarm:
        if self.backend == "nginx":
            return _start_nginx(self, workdir)
        return _start_loopback(self)

    def describe(self, limit: int = 60) -> str:
        lines = [
            f"{'host':>5} {'urls':>6} {'retr':>6} {'rate':>5} {'cap.':>4} {'conns':>5} {'refusal':>7} {'cap ref':>7}"
            f" {'lat ms':>6} {'faults':>28} {'retr/rate s':>11}"
        ]
        for h in sorted(self.hosts, key=lambda h: -h.bound_seconds)[:limit]:
            faults = " ".join(
                f"{_SHORT.get(k.removeprefix('nginx-'), k)}:{n}"
                for k, n in sorted(h.kinds.items())
                if k.removeprefix("nginx-") != OUTCOME_OK
            )
            lines.append(
                f"{h.name:>5} {h.urls:>6} {h.retrievable:>6} {h.rate:>5g} {h.capacity:>4g}"
                f" {h.max_connections or '-':>5} {h.refusal:>7} {h.cap_refusal or '-':>7} {h.latency * 1000:>6.0f}"
                f" {faults:>28} {h.bound_seconds:>11.1f}"
            )
        if len(self.hosts) > limit:
            lines.append(f"... {len(self.hosts) - limit} more hosts")
        return "\n".join(lines)


@functools.lru_cache(maxsize=4)
def _bytes_farm(seed: int) -> ImageFarm:
    return ImageFarm(1, seed=seed)  # never started: expected_bytes needs no server


_SHORT = {"missing": "404", "error500": "500", "reset": "rst", "stall": "stl", "truncated": "trunc"}


# ----------------------------------------------------------------------------- planning


def zipf_counts(servers: int, total: int, exponent: float) -> list[int]:
    """Counts proportional to k**-exponent (k = 1..servers), summing exactly to ``total``, each >= 1."""
    weights = [k**-exponent for k in range(1, servers + 1)]
    scale = total / sum(weights)
    counts = [max(1, math.floor(w * scale)) for w in weights]
    short = total - sum(counts)
    for i in range(abs(short)):  # hand the rounding remainder out from the biggest down
        counts[i % servers] += 1 if short > 0 else -1
    return counts


def _geometric_rates(servers: int, low: float, high: float) -> list[float]:
    """``servers`` rates from ``high`` down to ``low``, geometric, rounded to 0.5 req/s."""
    ratio = (low / high) ** (1 / max(1, servers - 1))
    return [max(low, round(high * ratio**k * 2) / 2) for k in range(servers)]


def _paired_order(servers: int, rng: random.Random, spread: float = 2.5) -> list[int]:
    """Big-with-fast pairing, locally shuffled: each host's rank moves by a few places."""
    return sorted(range(servers), key=lambda k: k + rng.uniform(-spread, spread))


def _refusal_style(rng: random.Random) -> str:
    return rng.choices(["429+RA", "429", "503"], weights=[2, 1, 2])[0]


def _image_path(host: str, n: int, size: tuple[int, int]) -> str:
    return f"/img/{host}-{n:06d}.jpg?w={size[0]}&h={size[1]}"


def _loopback_spec(
    name: str,
    rate: float,
    capacity: float,
    refusal: str,
    cap: int | None,
    cap_refusal: str,
    latency: float,
    background: FaultMix | None,
    advertise: bool = False,
) -> HostSpec:
    return HostSpec(
        name=name,
        rate_limit=rate,
        burst=capacity,
        max_connections=cap,
        latency=latency,
        advertise_limits=advertise,
        refuse_status=503 if refusal == "503" else 429,
        retry_after=refusal == "429+RA",
        connection_refuse_status=503,
        connection_retry_after=cap_refusal == "503+RA",
        background=background,
    )


def _finish(hosts: list[HostPlan], urls: list[UrlPlan]) -> list[HostPlan]:
    """Hosts with their URL counts filled in."""
    by_host: dict[int, Counter] = {h.index: Counter() for h in hosts}
    for url in urls:
        by_host[url.host][url.kind] += 1
    done = []
    for h in hosts:
        kinds = by_host[h.index]
        retrievable = sum(1 for u in urls if u.host == h.index and u.retrievable)
        done.append(
            HostPlan(**{**h.__dict__, "urls": sum(kinds.values()), "retrievable": retrievable, "kinds": dict(kinds)})
        )
    return done


def plan_background(
    servers: int = 50,
    total_urls: int = 20000,
    seed: int = 3,
    zipf: float = 0.9,
    min_rate: float = 2.0,
    max_rate: float = 66.0,
    image_size: tuple[int, int] = IMAGE_SIZE,
) -> Scenario:
    if servers < 2:
        raise ValueError("the benchmark needs at least 2 servers")
    rng = random.Random(seed)
    counts = zipf_counts(servers, total_urls, zipf)
    rates = _geometric_rates(servers, min_rate, max_rate)
    order = _paired_order(servers, rng)
    hosts: list[HostPlan] = []
    urls: list[UrlPlan] = []
    for index in range(servers):
        name = f"s{index:02d}"
        rate = rates[order[index]]
        capacity = max(1.0, round(rate / 4))
        refusal = _refusal_style(rng)
        latency = round(rng.uniform(0.005, 0.040), 3)
        cap: int | None = None
        cap_refusal = ""
        if rng.random() < 0.4:  # a connection cap the hidden rate can live with (a stall holds a slot)
            cap = max(rng.randint(2, 6), math.ceil(rate * (latency + 0.03)) + 1)
            cap_refusal = rng.choice(["503", "503+RA"])
        mix = FaultMix.everyday(round(rng.uniform(0.01, 0.03), 4))
        spec = _loopback_spec(name, rate, capacity, refusal, cap, cap_refusal, latency, mix, rng.random() < 0.1)
        hosts.append(HostPlan(index, name, rate, capacity, cap, refusal, cap_refusal, latency, spec))
        for n in range(counts[index]):
            path = _image_path(name, n, image_size)
            outcome = mix.outcome(seed, path)
            urls.append(UrlPlan(f"bench-{name}-{n:06d}", index, path, outcome, outcome != OUTCOME_MISSING))
    return Scenario("background", "testserver", seed, image_size, _finish(hosts, urls), urls)


def lifted(scenario: Scenario) -> Scenario:
    """The same hosts, latencies and retrievable images with every limit and fault lifted.

    What this machine needs to move these images through fetch, decode, resize, encode and write
    when no server holds it back: the floor a politeness result is measured against, on a machine
    whose cores the farm shares.
    """
    if scenario.backend != "testserver":
        raise ValueError("only the loopback farm can lift its limits")
    hosts = [
        HostPlan(h.index, h.name, math.inf, math.inf, None, "", "", h.latency, HostSpec(name=h.name, latency=h.latency))
        for h in scenario.hosts
    ]
    urls = [UrlPlan(u.uuid, u.host, u.path, "ok", True) for u in scenario.urls if u.retrievable]
    name = f"{scenario.name}-lifted"
    return Scenario(name, "testserver", scenario.seed, scenario.image_size, _finish(hosts, urls), urls)


HEAVY_MIX = FaultMix(missing=0.12, error500=0.10, reset=0.06, stall=0.03)
HEAVY_SPECIAL = {"bomb": 0.04, "truncated": 0.05, "html": 0.04}  # shares of all URLs


def plan_heavy(
    servers: int = 8,
    total_urls: int = 1030,
    seed: int = 3,
    target_bound: float = 20.0,
    image_size: tuple[int, int] = IMAGE_SIZE,
) -> Scenario:
    """~40% faulty URLs; hidden rates chosen so that max(retrievable / rate) is ~``target_bound``."""
    rng = random.Random(seed)
    counts = zipf_counts(servers, total_urls, 0.7)
    urls: list[UrlPlan] = []
    for index in range(servers):
        name = f"h{index:02d}"
        for n in range(counts[index]):
            key = f"{name}-{n:06d}"
            draw = rng.random()
            special = ""
            for kind, share in HEAVY_SPECIAL.items():
                if draw < share:
                    special = kind
                    break
                draw -= share
            if special == "bomb":
                urls.append(UrlPlan(f"bench-{key}", index, f"/bomb.png?k={key}", "bomb", False))
            elif special == "truncated":
                path = f"/truncated/{key}.jpg?w={image_size[0]}&h={image_size[1]}"
                urls.append(UrlPlan(f"bench-{key}", index, path, "truncated", False))
            elif special == "html":
                urls.append(UrlPlan(f"bench-{key}", index, f"/html/{key}.jpg", "html", False))
            else:
                path = _image_path(name, n, image_size)
                outcome = HEAVY_MIX.outcome(seed, path)
                urls.append(UrlPlan(f"bench-{key}", index, path, outcome, outcome != OUTCOME_MISSING))
    hosts: list[HostPlan] = []
    for index in range(servers):
        name = f"h{index:02d}"
        retrievable = sum(1 for u in urls if u.host == index and u.retrievable)
        target = target_bound * (1.0 - 0.4 * index / max(1, servers - 1))  # 20 s down to 12 s
        rate = max(1.0, math.ceil(retrievable / target * 2) / 2)
        capacity = max(1.0, round(rate / 4))
        refusal = ["429+RA", "503", "429"][index % 3]
        latency = round(rng.uniform(0.010, 0.040), 3)
        cap = max(3, math.ceil(rate * (latency + 0.03)) + 2) if index % 3 == 1 else None
        cap_refusal = "503" if cap else ""
        spec = _loopback_spec(name, rate, capacity, refusal, cap, cap_refusal, latency, HEAVY_MIX)
        hosts.append(HostPlan(index, name, rate, capacity, cap, refusal, cap_refusal, latency, spec))
    return Scenario("heavy", "testserver", seed, image_size, _finish(hosts, urls), urls)


def plan_nginx(
    servers: int = 20,
    total_urls: int = 20000,
    seed: int = 3,
    zipf: float = 0.9,
    min_rate: float = 2.0,
    max_rate: float = 66.0,
    image_size: tuple[int, int] = IMAGE_SIZE,
) -> Scenario:
    from distributed_downloader.demo.nginxfarm import NginxHost  # the caller checked it imports

    rng = random.Random(seed)
    counts = zipf_counts(servers, total_urls, zipf)
    rates = [float(round(r)) for r in _geometric_rates(servers, min_rate, max_rate)]  # nginx: whole r/s
    order = _paired_order(servers, rng)
    hosts: list[HostPlan] = []
    urls: list[UrlPlan] = []
    for index in range(servers):
        name = f"n{index:02d}"
        rate = rates[order[index]]
        burst = max(1, round(rate / 4))  # nodelay: burst + 1 requests may arrive at once
        status = rng.choice([429, 503])
        cap = max(rng.randint(2, 6), math.ceil(rate * 0.05) + 1) if rng.random() < 0.4 else None
        spec = NginxHost(rate=rate, burst=burst, refuse_status=status, max_connections=cap)
        refusal = str(status)
        hosts.append(HostPlan(index, name, rate, burst + 1.0, cap, refusal, refusal if cap else "", 0.0, spec))
        share = rng.uniform(0.01, 0.03)
        for n in range(counts[index]):
            key = f"{name}-{n:06d}"
            draw = rng.random()
            kind = "ok"
            if draw < share:  # 404 45%, 500 30%, closed without a response 20%, 1 byte/s 5%
                kind = rng.choices(["missing", "error500", "reset", "stall"], weights=[45, 30, 20, 5])[0]
            folder = {"ok": "img", "missing": "missing", "error500": "err", "reset": "reset", "stall": "stall"}[kind]
            urls.append(UrlPlan(f"bench-{key}", index, f"/{folder}/{key}.jpg", f"nginx-{kind}", kind == "ok"))
    return Scenario("nginx", "nginx", seed, image_size, _finish(hosts, urls), urls)


def plan(
    name: str, servers: int | None, urls: int | None, seed: int, quick: bool, image_size: tuple[int, int]
) -> Scenario:
    if name == "background":
        return plan_background(servers or 50, urls or (2000 if quick else 20000), seed, image_size=image_size)
    if name == "heavy":
        return plan_heavy(servers or 8, urls or (400 if quick else 1030), seed, image_size=image_size)
    if name == "nginx":
        return plan_nginx(servers or 20, urls or (1500 if quick else 20000), seed, image_size=image_size)
    raise ValueError(f"unknown scenario {name!r}; one of {SCENARIOS}")


# ----------------------------------------------------------------------------- running farms


@dataclass(frozen=True)
class Request:
    """One request as a server logged it, on the time.monotonic() scale."""

    start: float
    end: float
    status: int
    path: str
    connection: int = 0  # the TCP connection's serial number on its host (0: not known)


class RunningFarm:
    """A started farm: URLs, and every request each host logged (server-side)."""

    scenario: Scenario

    def url(self, url: UrlPlan) -> str:
        raise NotImplementedError

    def log(self, host: int) -> list[Request]:
        raise NotImplementedError

    def requests(self) -> int:
        return sum(len(self.log(h.index)) for h in self.scenario.hosts)

    def describe_host(self, host: int) -> str:
        raise NotImplementedError

    def expected_md5(self, url: UrlPlan) -> str:
        return hashlib.md5(self.scenario.expected_bytes(url)).hexdigest()

    def stop(self) -> None:
        raise NotImplementedError


class _Loopback(RunningFarm):
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.farm = ImageFarm([h.spec for h in scenario.hosts], seed=scenario.seed).start()  # type: ignore[misc]

    def url(self, url: UrlPlan) -> str:
        return self.farm.url(url.host, url.path)

    def log(self, host: int) -> list[Request]:
        return [Request(e.start, e.end, e.status, e.path, e.connection) for e in self.farm.request_log(host)]

    def requests(self) -> int:
        return sum(self.farm.stats(h.index).requests for h in self.scenario.hosts)

    def describe_host(self, host: int) -> str:
        return self.farm.base_urls[host].split("//", 1)[1]

    def expected_md5(self, url: UrlPlan) -> str:
        return hashlib.md5(self.farm.expected_bytes(url.path)).hexdigest()

    def stop(self) -> None:
        self.farm.stop()


def _start_loopback(scenario: Scenario) -> RunningFarm:
    return _Loopback(scenario)


class _Nginx(RunningFarm):
    def __init__(self, scenario: Scenario, workdir: object) -> None:
        from distributed_downloader.demo.nginxfarm import NginxFarm

        self.scenario = scenario
        self.farm = NginxFarm([h.spec for h in scenario.hosts], workdir=workdir, seed=scenario.seed)  # type: ignore[misc]
        width, height = scenario.image_size
        by_host: dict[int, dict[str, list[str]]] = {h.index: {} for h in scenario.hosts}
        for url in scenario.urls:
            name = url.path.rsplit("/", 1)[1].split(".", 1)[0]
            by_host[url.host].setdefault(url.kind.removeprefix("nginx-"), []).append(name)
        for index, kinds in by_host.items():
            self.farm.add_images(index, kinds.get("ok", []), width, height)
            self.farm.add_faults(
                index,
                missing=kinds.get("missing", []),
                reset=kinds.get("reset", []),
                error500=kinds.get("error500", []),
                stall=kinds.get("stall", []),
            )
        self.farm.start()
        self._epoch_to_mono = time.time() - time.monotonic()

    def url(self, url: UrlPlan) -> str:
        return self.farm.url(url.host, url.path)

    def log(self, host: int) -> list[Request]:
        shift = self._epoch_to_mono
        return [Request(e.start - shift, e.end - shift, e.status, e.path, e.connection) for e in self.farm.log(host)]

    def describe_host(self, host: int) -> str:
        return self.farm.url(host, "").split("//", 1)[1].rstrip("/")

    def expected_md5(self, url: UrlPlan) -> str:
        return self.farm.expected_md5(url.host, url.path)

    def stop(self) -> None:
        self.farm.stop()


def _start_nginx(scenario: Scenario, workdir: object) -> RunningFarm:
    return _Nginx(scenario, workdir)


def nginx_unavailable() -> str:
    """Why the nginx scenario cannot run here, or "" when it can."""
    try:
        from distributed_downloader.demo.nginxfarm import NginxFarm
    except ImportError as exc:
        return (
            f"distributed_downloader.demo.nginxfarm cannot be imported ({exc}); the nginx scenario needs it "
            "(real nginx hosts, written alongside this bench)"
        )
    availability = NginxFarm.available()
    return "" if availability else f"nginx cannot run here: {availability.reason}"
