"""The politeness benchmark's loopback farm: many servers with hidden, varied limits and skewed URL counts.

Every server is a real HTTP host of ``ImageFarm`` on 127.0.0.<n>. Its hidden limits:

- a token bucket of ``rate`` req/s with ``burst = rate`` (over it: 429 + Retry-After),
- ``max_connections`` concurrent requests (over it: 503 + Retry-After: 1),
- a small latency, a few with light transient 500s, a few announcing their limits in headers.

URL counts follow a Zipf law (rank k gets a share proportional to k**-zipf). Rates are spread
geometrically over [min_rate, max_rate] and paired with counts mostly big-with-fast (as real
institutions tend to be), with a seeded local shuffle so that several servers end up near the
makespan bound rather than one. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from distributed_downloader.testserver import HostSpec, ImageFarm

IMAGE_QUERY = "?w=64&h=48"  # small images: the farm's image generation must not eat the 2 cores


@dataclass(frozen=True)
class ServerPlan:
    index: int
    spec: HostSpec
    urls: int

    @property
    def rate(self) -> float:
        assert self.spec.rate_limit is not None
        return self.spec.rate_limit

    @property
    def burst(self) -> float:
        return self.spec.burst if self.spec.burst is not None else max(1.0, self.rate)

    @property
    def bound_seconds(self) -> float:
        """The least time this server's URLs can take without exceeding its hidden rate."""
        return self.urls / self.rate


def zipf_counts(servers: int, total: int, exponent: float) -> list[int]:
    """Counts proportional to k**-exponent (k = 1..servers), summing exactly to ``total``, each >= 1."""
    weights = [k**-exponent for k in range(1, servers + 1)]
    scale = total / sum(weights)
    counts = [max(1, math.floor(w * scale)) for w in weights]
    short = total - sum(counts)
    for i in range(abs(short)):  # hand the rounding remainder out from the biggest down
        counts[i % servers] += 1 if short > 0 else -1
    return counts


def plan_farm(
    servers: int = 30,
    total_urls: int = 20000,
    seed: int = 0,
    zipf: float = 0.8,
    min_rate: float = 2.0,
    max_rate: float = 25.0,
) -> list[ServerPlan]:
    if servers < 2:
        raise ValueError("the benchmark needs at least 2 servers")
    rng = random.Random(seed)
    counts = zipf_counts(servers, total_urls, zipf)
    # Geometric spread of rates, fastest first; paired with counts biggest first after a local shuffle
    # (each server's rank moves by a few places), rounded to 0.5 req/s.
    ratio = (min_rate / max_rate) ** (1 / (servers - 1))
    rates = [round(max_rate * ratio**k * 2) / 2 for k in range(servers)]
    order = sorted(range(servers), key=lambda k: k + rng.uniform(-2.5, 2.5))
    plans = []
    fault_servers = set(rng.sample(range(servers), k=max(1, servers // 6)))
    advertising = set(rng.sample(range(servers), k=max(1, servers // 5)))
    for index in range(servers):
        rate = rates[order[index]]
        spec = HostSpec(
            name=f"s{index:02d}",
            rate_limit=rate,
            burst=rate,
            max_connections=rng.randint(2, 8),
            latency=round(rng.uniform(0.005, 0.030), 3),
            advertise_limits=index in advertising,
            fault_rate=0.01 if index in fault_servers else 0.0,
        )
        plans.append(ServerPlan(index, spec, counts[index]))
    return plans


def start_farm(plans: list[ServerPlan], seed: int = 0) -> ImageFarm:
    return ImageFarm([p.spec for p in plans], seed=seed).start()


def farm_urls(farm: ImageFarm, plans: list[ServerPlan]) -> list[tuple[str, str, int]]:
    """(uuid, url, server index) for every URL; all image keys are distinct."""
    rows = []
    for plan in plans:
        for n in range(plan.urls):
            key = f"{plan.spec.name}-{n:06d}"
            rows.append((f"bench-{key}", farm.url(plan.index, f"/img/{key}.jpg{IMAGE_QUERY}"), plan.index))
    return rows


def describe(plans: list[ServerPlan]) -> str:
    lines = [
        f"{'server':>6} {'urls':>6} {'rate':>6} {'burst':>6} {'conns':>5} {'lat ms':>6} {'adv':>3} {'fault':>5}"
        f" {'urls/rate s':>11}"
    ]
    for p in sorted(plans, key=lambda p: -p.bound_seconds):
        lines.append(
            f"{p.spec.name:>6} {p.urls:>6} {p.rate:>6.1f} {p.burst:>6.1f} {p.spec.max_connections:>5}"
            f" {p.spec.latency * 1000:>6.0f} {'yes' if p.spec.advertise_limits else '':>3} {p.spec.fault_rate:>5.2f}"
            f" {p.bound_seconds:>11.1f}"
        )
    return "\n".join(lines)
