"""Every host a rank talks to, and whose rate controller a request to it takes its slot from.

A lane owns the controller of its own server. A redirect can lead anywhere: to the same server (the
hop takes a slot of the lane's own controller), to a server this rank holds a lane of (that lane's
controller), or to any other host, in the input or not. Those get a small budget of their own for
the whole run: the polite default rate split over every rank of the job, so that all ranks together
never send such a host more than ``default_rate_limit``, and one connection per rank. The budget
adapts down like any lane (429/503, Retry-After) but never above that default. A host that has lanes
this round on another rank (``laned``) gets only ``LANED_ELSEWHERE_RATE`` split over the ranks: its
lanes already send what it allows, and a full budget on top sent a Crawl-delay-10 host 1.75x its
rate (4 ranks). A budget that learned nothing (default rate, no pause, no connection cap) and has
been idle for ten minutes is dropped: a new one for the host is the same, and a run redirected to a
new host per URL held 7 kB per host for good.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from urllib.parse import urlsplit

from distributed_downloader.inputs import server_name_of
from distributed_downloader.net.politeness import LaneLimits, RateController


def server_of(url: str) -> str:
    """The server_name a URL belongs to ('' when it has none we could contact)."""
    parts = urlsplit(url)
    name, _ = server_name_of(parts.scheme, parts.netloc)
    return name


class HostRegistry:
    """Rate controllers by server_name for one rank: its lanes' own, and budgets for other hosts."""

    def __init__(self, default_rate: float, ranks: int, decrease: float, laned: Collection[str] = ()) -> None:
        self.share_rate = default_rate / max(1, ranks)
        self.ranks = max(1, ranks)
        self.laned = frozenset(laned)  # servers with lanes this round (on any rank)
        self.decrease = decrease
        self._lanes: dict[str, RateController] = {}
        self._others: dict[str, RateController] = {}
        self._prune_at = self.PRUNE_EVERY
        self._lock = threading.Lock()

    PRUNE_EVERY = 1000  # budgets between two looks for idle ones
    LANED_ELSEWHERE_RATE = 1 / 30  # req/s, all ranks together, for a host whose lanes run on other ranks
    # A budget unused this long (and two of its intervals) is dropped if it learned nothing. Longer
    # than any fetch: robots.txt's rules (its Crawl-delay cap) come a whole fetch after the slot.
    IDLE_SECONDS = 600.0

    def register_lane(self, server: str, controller: RateController) -> None:
        with self._lock:
            self._lanes[server] = controller

    def unregister_lane(self, server: str, controller: RateController) -> None:
        with self._lock:
            if self._lanes.get(server) is controller:
                del self._lanes[server]

    def cap_budget(self, server: str, rate: float | None) -> None:
        """A host's robots.txt rate (Crawl-delay, Request-rate), for the whole job: its budget takes
        this rank's share. A host this rank holds a lane of is capped by that lane."""
        with self._lock:
            other = self._others.get(server) if server not in self._lanes else None
        if other is not None:
            other.cap_rate(None if rate is None else rate / self.ranks)

    def controller_for(self, server: str) -> RateController:
        """The lane's controller when this rank holds the server, else the host's redirect budget."""
        with self._lock:
            lane = self._lanes.get(server)
            if lane is not None:
                return lane
            other = self._others.get(server)
            if other is None:
                rate = self.share_rate
                if server in self.laned:
                    rate = min(rate, self.LANED_ELSEWHERE_RATE / self.ranks)
                limits = LaneLimits(
                    start_rate=rate,
                    ceiling=rate,
                    max_connections=1,
                    decrease=self.decrease,
                    floor=min(rate, 1 / 30),
                    level=rate,  # no slow start: this budget is already the ceiling
                )
                other = self._others[server] = RateController(limits)
                if len(self._others) >= self._prune_at:
                    self._prune(other)
            return other

    def _prune(self, keep: RateController) -> None:
        now = time.monotonic()
        for server, other in list(self._others.items()):
            last = other.sends[-1] if other.sends else other.created
            idle = now - last > max(self.IDLE_SECONDS, 2.0 / other.rate)  # a new budget keeps the spacing
            plain = other.rate >= other.limits.ceiling and other.connection_cap is None and other.paused_for() == 0
            if other is not keep and idle and plain and other.in_flight == 0:
                del self._others[server]
        self._prune_at = len(self._others) + self.PRUNE_EVERY
