"""Per-server politeness: an adaptive pacing rate, Retry-After, rate-limit headers, robots.txt.

A server's budget is split into lanes (see schedule.py); one lane is driven by exactly one rank,
and each lane's controller never exceeds its share, so the server's total across all ranks and
nodes stays within the server's limit. Everything here takes an injected clock.
"""

from __future__ import annotations

import email.utils
import math
import re
import threading
import time
import urllib.robotparser
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Clock = Callable[[], float]
CONGESTION_STATUSES = frozenset({429, 503})
MAX_PAUSE = 600.0  # never trust a Retry-After longer than this; the lane is re-tried next round instead


def parse_retry_after(value: str | None, now_epoch: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now_epoch = time.time() if now_epoch is None else now_epoch
    return max(0.0, when.timestamp() - now_epoch)


_POLICY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*;\s*w\s*=\s*(\d+(?:\.\d+)?)")


def advertised_rate(headers: Mapping[str, str]) -> float | None:
    """Requests/second a server announces: RateLimit-Policy (`10;w=1`), X-RateLimit-Limit (+ window)."""
    lower = {k.lower(): v for k, v in headers.items()}
    policy = lower.get("ratelimit-policy")
    if policy:
        for part in policy.split(","):
            match = _POLICY.match(part)
            if match and float(match.group(2)) > 0:
                return float(match.group(1)) / float(match.group(2))
    limit = lower.get("x-ratelimit-limit")
    if limit:
        try:
            quota = float(limit.split(",")[0].split(";")[0])
        except ValueError:
            return None
        window = 1.0
        match = re.search(r"w\s*=\s*(\d+(?:\.\d+)?)", limit)
        if match:
            window = float(match.group(1))
        elif lower.get("x-ratelimit-window", "").strip().replace(".", "", 1).isdigit():
            window = float(lower["x-ratelimit-window"])
        return quota / window if window > 0 else None
    return None


def exhausted_pause(headers: Mapping[str, str]) -> float | None:
    """Seconds until the quota resets when a server says none is left (Remaining: 0)."""
    lower = {k.lower(): v for k, v in headers.items()}
    remaining = lower.get("ratelimit-remaining") or lower.get("x-ratelimit-remaining")
    reset = lower.get("ratelimit-reset") or lower.get("x-ratelimit-reset")
    if remaining is None or reset is None:
        return None
    try:
        if float(remaining.split(",")[0]) > 0:
            return None
        value = float(reset.split(",")[0])
    except ValueError:
        return None
    # X-RateLimit-Reset is often an epoch time rather than seconds left.
    if value > 1e9:
        value -= time.time()
    return max(0.0, min(value, MAX_PAUSE))


@dataclass
class LaneLimits:
    start_rate: float
    ceiling: float  # this lane's share of the server's max rate
    max_connections: int  # this lane's share of the server's connections
    decrease: float = 0.3  # the rate is multiplied by (1 - decrease) on congestion (config: rate_multiplier)
    floor: float = 1 / 30


class RateController:
    """Adaptive pacing for one lane.

    - Pacing: request starts are spaced at least 1/rate apart (no bursts).
    - Slow start: while no congestion was seen, the rate grows x1.5 per second of saturated use.
    - Congestion (429/503, a 403 burst): the rate drops by the decrease factor, at most once per
      event; the failing level is remembered as the rate the server actually accepted lately (a
      token bucket's burst hides how far over the limit we were). Growth then goes additive and
      slows near that level, probing per so many requests, so steady state sits just below the
      server's real limit; once past the level without trouble, growth speeds up again.
    - A 503 while several requests are in flight caps the lane's connections (a connection limit),
      rather than its rate.
    - Retry-After / quota exhausted: no request starts before the given time.
    - Advertised limits (RateLimit-Policy, X-RateLimit-Limit) cap the rate directly.
    """

    SLOW_START_GROWTH = 1.5  # per saturated second, until the first congestion
    NEAR = 0.9  # "near" the last failing level: from this fraction of it on, grow gently
    GROWTH_FAR = 0.05  # per saturated second, far below the last failing level
    GROWTH_NEAR = 0.01  # per probe, near it
    PROBE_REQUESTS = 100  # requests between two probes near the last failing level...
    PROBE_SECONDS = 5.0  # ...or this long, whichever comes first
    ACCEPTED_WINDOW = 10.0  # seconds of successes that estimate what the server accepts

    def __init__(self, limits: LaneLimits, clock: Clock = time.monotonic, share: float = 1.0) -> None:
        self.limits = limits
        self.clock = clock
        self.share = share  # this lane's fraction of the server (1/lanes)
        self.rate = min(limits.start_rate, limits.ceiling)
        self.ceiling = limits.ceiling
        self.slow_start = True
        self.congestion_rate: float | None = None
        self.paused_until = 0.0
        self.next_start = 0.0
        self.last_decrease = -math.inf
        self.epoch_start = clock()
        self.epoch_first = self.epoch_start
        self.epoch_sent = 0
        self.epoch_congested = False
        self.sent_since_increase = 0
        self.last_increase = self.epoch_start
        self.forbidden_streak = 0
        self.in_flight = 0
        self.connection_cap = limits.max_connections
        self.successes: deque[float] = deque()
        self.latency = 0.0  # smoothed seconds per request
        self.events = {"congestion": 0, "pauses": 0, "increases": 0}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ sending

    def concurrency_limit(self) -> int:
        """Connections this lane may hold: enough for rate x latency (Little's law), within its share."""
        needed = math.ceil(self.rate * max(self.latency, 0.05) * 1.5) + 1
        return max(1, min(self.limits.max_connections, self.connection_cap, needed))

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def reserve(self) -> float:
        """Claim the next start slot; returns seconds to wait before sending (0 = now)."""
        with self._lock:
            now = self.clock()
            self._roll_epoch(now)
            start = max(now, self.next_start, self.paused_until)
            self.next_start = start + 1.0 / self.rate
            self.epoch_sent += 1
            self.sent_since_increase += 1
            return start - now

    # ------------------------------------------------------------------ feedback

    def on_success(self, latency: float, headers: Mapping[str, str] | None = None) -> None:
        with self._lock:
            now = self.clock()
            self.successes.append(now)
            while self.successes and self.successes[0] < now - self.ACCEPTED_WINDOW:
                self.successes.popleft()
            self.latency = latency if self.latency == 0 else 0.8 * self.latency + 0.2 * latency
            self.forbidden_streak = 0
            if headers:
                self._apply_headers(headers)

    def on_status(self, status: int, headers: Mapping[str, str], latency: float = 0.0) -> None:
        with self._lock:
            now = self.clock()
            self._apply_headers(headers)
            if status == 403:
                self.forbidden_streak += 1
                if self.forbidden_streak < 5:  # a lone 403 is a forbidden file, a burst is a ban
                    return
                self.forbidden_streak = 0
            elif status not in CONGESTION_STATUSES:
                return
            pause = parse_retry_after(headers.get("Retry-After") or headers.get("retry-after"))
            if pause is not None:
                self._pause(now, min(pause, MAX_PAUSE))
            if status == 503 and self.in_flight >= 1:
                # Refused while others were in flight: too many connections, not too many requests.
                self.connection_cap = max(1, min(self.connection_cap, self.in_flight))
                self.epoch_congested = True
                return
            self._decrease(now)

    def on_network_error(self) -> None:
        """Timeouts and resets: slow down gently (an overloaded server often looks like this)."""
        with self._lock:
            self._decrease(self.clock(), factor=0.8)

    # ------------------------------------------------------------------ internals

    def _pause(self, now: float, seconds: float) -> None:
        if now + seconds > self.paused_until:
            self.paused_until = now + seconds
            self.events["pauses"] += 1

    def _apply_headers(self, headers: Mapping[str, str]) -> None:
        announced = advertised_rate(headers)
        if announced is not None and announced > 0:
            self.ceiling = min(self.limits.ceiling, announced * self.share)
            self.rate = min(self.rate, self.ceiling)
        pause = exhausted_pause(headers)
        if pause:
            self._pause(self.clock(), pause)

    def _decrease(self, now: float, factor: float | None = None) -> None:
        self.epoch_congested = True
        if now - self.last_decrease < max(1.0, self.latency * 2, 2.0 / self.rate):
            return  # one reaction per congestion event, not per in-flight request
        self.events["congestion"] += 1
        self.last_decrease = now
        # The level that just failed: what the server accepted lately, never above our own rate.
        window = min(self.ACCEPTED_WINDOW, max(1.0, now - self.epoch_first))
        accepted = sum(1 for t in self.successes if t >= now - window) / window
        self.congestion_rate = max(self.limits.floor, min(self.rate, accepted)) if accepted > 0 else self.rate
        self.slow_start = False
        multiplier = factor if factor is not None else 1.0 - self.limits.decrease
        self.rate = max(self.limits.floor, self.rate * multiplier)
        self.next_start = max(self.next_start, now + 1.0 / self.rate)

    def _roll_epoch(self, now: float) -> None:
        if now - self.epoch_start < 1.0:
            return
        elapsed = now - self.epoch_start
        saturated = self.epoch_sent >= 0.8 * self.rate * elapsed and now >= self.paused_until
        if saturated and not self.epoch_congested and self.rate < self.ceiling:
            if self.slow_start:
                self.rate = min(self.ceiling, self.rate * self.SLOW_START_GROWTH)
            else:
                # Additive increase: brisk far below the level that last failed, gentle near it.
                if self.congestion_rate is not None and self.rate > self.congestion_rate * 1.05:
                    self.congestion_rate = None  # well past the old failing level: grow briskly again
                near = self.congestion_rate is not None and self.rate >= self.NEAR * self.congestion_rate
                probe_due = (
                    self.sent_since_increase >= self.PROBE_REQUESTS or now - self.last_increase >= self.PROBE_SECONDS
                )
                if near and not probe_due:
                    # Near the level that failed, probe per so many requests, not per second, so a
                    # slow server sees as few 429s per request as a fast one.
                    self._close_epoch(now)
                    return
                step = max(0.02, self.rate * (self.GROWTH_NEAR if near else self.GROWTH_FAR))
                self.rate = min(self.ceiling, self.rate + step)
            self.events["increases"] += 1
            self.sent_since_increase = 0
            self.last_increase = now
        self._close_epoch(now)

    def _close_epoch(self, now: float) -> None:
        self.epoch_start, self.epoch_sent, self.epoch_congested = now, 0, False


class RobotsRules:
    """robots.txt for one server, matched against our product token."""

    def __init__(self, text: str | None, robots_token: str) -> None:
        self.token = robots_token
        self.parser: urllib.robotparser.RobotFileParser | None = None
        if text:
            self.parser = urllib.robotparser.RobotFileParser()
            self.parser.parse(text.splitlines())

    def allowed(self, url: str) -> bool:
        return True if self.parser is None else self.parser.can_fetch(self.token, url)

    def crawl_delay(self) -> float | None:
        if self.parser is None:
            return None
        delay = self.parser.crawl_delay(self.token)
        return float(delay) if delay is not None else None

    def request_rate(self) -> float | None:
        """Requests/second from Crawl-delay or Request-rate, the stricter one."""
        rates = []
        delay = self.crawl_delay()
        if delay:
            rates.append(1.0 / delay)
        if self.parser is not None:
            rr = self.parser.request_rate(self.token)
            if rr is not None and rr.seconds > 0:
                rates.append(rr.requests / rr.seconds)
        return min(rates) if rates else None
