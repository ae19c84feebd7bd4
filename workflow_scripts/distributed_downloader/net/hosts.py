"""Every host a rank talks to, and whose rate controller a request to it takes its slot from.

A lane owns the controller of its own server. A redirect can lead anywhere: to the same server
(the hop takes a slot of the lane's own controller), to a server this rank holds a lane of (that
lane's controller), or to any other host, in the input or not. Those get a small budget of their
own for the whole run: the polite default rate split over every rank of the job, so that all
ranks together never send such a host more than ``default_rate_limit``, and one connection per
rank. The budget adapts down like any lane (429/503, Retry-After) but never above that default.
"""

from __future__ import annotations

import threading
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

    def __init__(self, default_rate: float, ranks: int, decrease: float) -> None:
        self.share_rate = default_rate / max(1, ranks)
        self.ranks = max(1, ranks)
        self.decrease = decrease
        self._lanes: dict[str, RateController] = {}
        self._others: dict[str, RateController] = {}
        self._lock = threading.Lock()

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
                limits = LaneLimits(
                    start_rate=self.share_rate,
                    ceiling=self.share_rate,
                    max_connections=1,
                    decrease=self.decrease,
                    floor=min(self.share_rate, 1 / 30),
                    level=self.share_rate,  # no slow start: this budget is already the ceiling
                )
                other = self._others[server] = RateController(limits)
            return other
