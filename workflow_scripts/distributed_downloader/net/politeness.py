"""Per-server politeness: pacing, congestion control, and the limits servers announce.

One ``RateController`` paces one lane (a rank's share of one server). The rule it follows:

**Signals, classified.** Only *congestion* lowers a server's rate; a *per-URL fault* never does.

- Congestion (the server says "too much, slow down"):
  - a refusal: 429, or 503 with or without Retry-After (nginx's ``limit_req`` answers a bare 503);
  - a Retry-After on any response, or an exhausted ``RateLimit`` / ``X-RateLimit`` quota (a pause);
  - a burst of 403s (a ban: ``BAN_STREAK`` in a row);
  - across many URLs, a burst of network failures (resets, timeouts, refused connections) or of
    5xx answers: at least ``BURST_MIN`` of them and at least half of the last ``OUTCOME_WINDOW``
    outcomes (an overloaded server, not one bad file);
  - a sustained rise of latency under load (the median of recent answers many times its baseline).
- Per-URL faults (the URL is bad, the server is fine): 404/410, a lone 500, one reset or timeout, a
  body that is not an image. They are retried or written as error rows, the rate is untouched.

This is how TCP separates loss from corruption and how crawler autothrottles (Scrapy's AutoThrottle
never lets an error shorten or collapse the delay; StormCrawler backs a host off only on 429/503)
stay fast on servers with a background of broken files.

**Converge and hold.** (A level left alone for ``LEVEL_HOLD`` seconds is stale: brisk growth again.)
Slow start multiplies the rate by ``SLOW_START_GROWTH`` (x1.5) per saturated second (x1.2 above
16 req/s, or 16/k for a server's k lanes, so a hidden burst drains over more than one second), in
steps of a quarter second or a
few sends, until the first refusal, which sets a *guessed* level: ``SLOW_START_EXIT`` (0.8) of the
rate we were sending at (the overshoot is the time the burst took to drain); a guess grows 5% a
second until a refusal measures the limit. A later congestion event sets the rate to
``1 - HEADROOM`` of the rate the server *accepted*: between two refusals when there were some
(the bucket was empty at both ends: exactly its refill rate), else lately (answers that were not
refusals, per second), never above the current rate; only refusals of requests sent after the
last reaction count as a new event, so one overshoot costs one reaction. A level found by one lane
is relayed to the server's lanes on other ranks (``sibling_level``). Below that level the
rate grows briskly (``GROWTH_FAR`` per saturated second); near it, it probes gently (``GROWTH_NEAR``
per ``PROBE_REQUESTS`` requests *and* ``PROBE_SECONDS``), so steady state sits within a few percent
below the server's real limit, and a slow server sees as few refusals per request as a fast one.
When nothing was accepted (or for bursts of failures), the rate is multiplied by
``1 - decrease`` (config ``rate_multiplier``).

**Connections.** A lane holds what Little's law needs (rate x latency) within its share of the
server's connections. A connection cap is learned only from evidence that concurrency is what the
server refuses (refusals only at >= k requests in flight, none below), and it recovers by one
connection per ``CAP_RECOVERY_SECONDS`` without refusals.

**A silent server gets no more requests (ACK clocking).** When nothing has come back for
``SILENCE_MIN`` (or 4x the usual latency, or two intervals of our rate) while a request waits that
long, the server is stuck (overloaded, or its process is not scheduled), not one URL: the lane sends
nothing more until an answer comes, for at most ``SILENCE_HOLD`` per late request (then one more
goes: a per-URL stall must not stop a slow host). Little's law would instead open a connection per
interval of the stall, and the server would take them all at once when it wakes: over its connection
cap, and a burst its rate limiter refuses (measured on the background farm: 40 of 128 refusals were
connection refusals during such stalls, in every run at the same instants on many hosts). Like TCP,
which sends only as acknowledgements come back. An answer that came late says the server took the
request when it answered it: the next request goes a full interval after it, not after our send (a
burst-of-one host refused the pair otherwise).

**Jitter is not congestion.** A server with a tiny burst allowance refuses any two requests that
arrive closer than its interval, and our sends reach the wire with some jitter (threads, the GIL, a
busy CPU). So requests are spaced again right before they are written (``space_send``: a token
bucket of our own rate holding ``WIRE_BURST_SECONDS`` of burst). A lone refusal (no other in the
last ``ACCEPTED_WINDOW``, or under ``JITTER_SHARE`` of our sends) that comes while we send no faster
than the level the server showed lowers that level by ``JITTER_STEP`` only, a lone refusal lowers it
by 10% at most and any refusal event by ``MAX_CUT``: the accepted rate is believed only as far as
the refusals say we were above it. Such a refusal also marks the server as one with a burst of
about one (``tight_burst``): from then on an answer later than usual moves our next request back by
its lateness (the server read it late: a busy farm or network). A write that left later than writes
usually do (``wrote``: the GIL, a busy CPU) moves the next one back on such a server and on any we
send to at 10 req/s or less (``_spacing_matters``), where it costs little of so long an interval.
The wire's debt is kept in seconds across rate changes. Without this, a few jitter refusals
ratcheted a slow server down to half of what it allows (measured: 2-req/s hosts held at 1.2-1.4
req/s for a whole run). A refusal that comes while the lane presses all its connections is read as
a connection limit only if one connection less still carries the rate (Little's law); otherwise a
2-connection lane took a jittered pair for a connection cap and fell to 1/latency.

**Pauses.** Retry-After (any header case, seconds or HTTP date), a quota reset and a ban stop every
request of the lane until the given time; the lane relays a pause to the server's other lanes on
other ranks through the coordinator (``pause_until``). The controller keeps no reservations: the
caller takes a slot only at the moment it sends, so a pause or a decrease reaches the very next
request.

A pause blurs what the server accepts: its bucket refilled while we waited, up to its burst
(unknown), so the A answers between two refusals with a pause of P in their gap g say only r in
[A/g, A/(g-P)] (exact at the low end when the burst covers the pause, at the high end for a burst
of one). The rate is read at their geometric middle, and windows leave paused time out: held at
the low end, a Retry-After host with a small burst sat at 0.82 of its limit all run (the heavy
bench's largest host). The server memory keeps the low end (``remembered_level``), so a next run
never starts above what the server was seen to accept.

Everything takes an injected clock, so the rules are unit-tested on a fake one.
"""

from __future__ import annotations

import datetime
import email.utils
import itertools
import logging
import math
import re
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)
Clock = Callable[[], float]
REFUSAL_STATUSES = frozenset({429, 503})
SERVER_ERROR_STATUSES = frozenset({500, 502, 504})


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A header's value whatever the case of its name (plain dicts included)."""
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    for key, value in headers.items():
        if key.lower() == lower:
            return value
    return None


def parse_retry_after(value: str | None, now_epoch: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        # isdigit() also takes latin-1's superscripts ("\xb2"), which float() refuses: no delay then.
        # A delay of hundreds of digits is no delay either (float() reads it as inf: paused for good).
        seconds = float(value) if value.isascii() else math.nan
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):  # e.g. an hour of 20 digits
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    now_epoch = time.time() if now_epoch is None else now_epoch
    return max(0.0, when.timestamp() - now_epoch)


_NUMBER = r"(\d+(?:\.\d+)?)"
_OLD_POLICY = re.compile(rf"^\s*{_NUMBER}\s*;\s*w\s*=\s*{_NUMBER}")  # draft-06..08: 10;w=1
_PARAM = re.compile(r";\s*([a-z]+)\s*=\s*([^;,\s]+)")


def _params(item: str) -> dict[str, str]:
    return {key: value.strip('"') for key, value in _PARAM.findall(item.lower())}


def advertised_rate(headers: Mapping[str, str] | None) -> float | None:
    """Requests/second a server announces, or None.

    ``RateLimit-Policy`` in both draft forms (``10;w=1`` and ``"name";q=10;w=1``, the strictest
    policy wins) and ``X-RateLimit-Limit`` only with an explicit window (``;w=60`` or
    ``X-RateLimit-Window``): a bare ``X-RateLimit-Limit: 1000`` is as often per hour as per second,
    so it is not read as a rate (the quota's Remaining/Reset still pause us).
    """
    rates: list[float] = []
    policy = header(headers, "RateLimit-Policy")
    if policy:
        for item in policy.split(","):
            old = _OLD_POLICY.match(item)
            if old:
                rates += _rate(float(old.group(1)), float(old.group(2)))
                continue
            params = _params(item)
            try:
                quota, window = float(params["q"]), float(params.get("w", "0"))
            except (KeyError, ValueError):
                continue
            rates += _rate(quota, window)
    if rates:
        return min(rates)
    limit = header(headers, "X-RateLimit-Limit")
    if limit:
        try:
            quota = float(limit.split(",")[0].split(";")[0])
        except ValueError:
            return None
        match = re.search(rf"w\s*=\s*{_NUMBER}", limit)
        window_text = match.group(1) if match else (header(headers, "X-RateLimit-Window") or "").strip()
        try:
            window = float(window_text)
        except ValueError:
            return None
        return next(iter(_rate(quota, window)), None)
    return None


def _rate(quota: float, window: float) -> list[float]:
    """[quota / window] when both are finite and above 0, else []. A negative quota (``q=-5``) was
    read as -5 req/s: profiling took it as the server's ceiling and its lane's slots came at once
    (1/rate < 0); a zero or NaN one hid the other policies of the header from min()."""
    rate = quota / window if window > 0 and quota > 0 else math.nan
    return [rate] if math.isfinite(rate) and rate > 0 else []


def exhausted_pause(headers: Mapping[str, str] | None, now_epoch: float | None = None) -> float | None:
    """Seconds until the quota resets when a server says none is left (remaining 0), else None."""
    combined = header(headers, "RateLimit")  # draft-08+: RateLimit: "default";r=0;t=10
    if combined:
        for item in combined.split(","):
            params = _params(item)
            if params.get("r") == "0" and "t" in params:
                try:
                    return max(0.0, float(params["t"]))
                except ValueError:
                    return None
    remaining = header(headers, "RateLimit-Remaining") or header(headers, "X-RateLimit-Remaining")
    reset = header(headers, "RateLimit-Reset") or header(headers, "X-RateLimit-Reset")
    if remaining is None or reset is None:
        return None
    try:
        if float(remaining.split(",")[0]) > 0:
            return None
        value = float(reset.split(",")[0])
    except ValueError:
        return None
    if value > 1e9:  # X-RateLimit-Reset is often an epoch time rather than seconds left
        value -= time.time() if now_epoch is None else now_epoch
    return max(0.0, value)


@dataclass
class LaneLimits:
    start_rate: float  # this lane's starting rate
    ceiling: float  # this lane's share of the server's max rate (also Crawl-delay, advertised limits)
    max_connections: int  # this lane's share of the server's connections
    decrease: float = 0.3  # multiplicative cut when the accepted rate tells nothing (rate_multiplier)
    floor: float = 1 / 30  # the lane's lowest rate (its share of the server's floor)
    level: float | None = None  # a rate the server was seen to accept (server memory): no slow start


@dataclass
class ControllerState:
    """What a lane's controller learned, kept across batches, rounds and resumes (server memory)."""

    rate: float
    level: float | None
    connection_cap: int | None
    paused_until_epoch: float


class RateController:
    """Adaptive pacing and congestion control for one lane (see the module docstring for the rules)."""

    SLOW_START_GROWTH = 1.5  # per saturated second, until the first congestion...
    SLOW_START_BRISK_BELOW = 16.0  # ...while the server gets fewer requests/s than this; then
    SLOW_START_LATE_GROWTH = 1.2  # this (see _slow_start_growth)
    HEADROOM = 0.05  # after congestion: this far below the accepted rate
    NEAR = 0.97  # from this fraction of the level on, growth turns into gentle probing
    GROWTH_FAR = 0.05  # per saturated second, below the level
    GROWTH_NEAR = 0.01  # per probe, near the level
    PROBE_REQUESTS = 100  # requests between two probes near the level...
    PROBE_SECONDS = 8.0  # ...and at least this long
    # Seconds without congestion after which a level is stale (grow briskly again). Long: the gentle
    # probes near the level find a raised limit anyway, and each brisk re-probe of a busy host cost
    # a burst of refusals (measured at 60 s: 18 refusals on the two largest hosts of the bench).
    LEVEL_HOLD = 300.0
    FORGET_LEVEL = 1.05  # this far past the level without trouble: it was low or the limit rose, grow briskly
    ACCEPTED_WINDOW = 10.0  # seconds of accepted answers that estimate what the server accepts
    OUTCOME_WINDOW = 16  # recent outcomes that judge a burst of failures
    BURST_SHARE = 0.75  # share of those outcomes failing the same way that counts as congestion
    BAN_STREAK = 5  # 403s in a row: a ban, not a forbidden file
    BAN_PAUSE = 60.0  # seconds a ban stops the lane (doubling per ban, up to BAN_PAUSE_MAX)
    BAN_PAUSE_MAX = 3600.0
    CAP_EVIDENCE = 3  # refusals at >= k in flight, with none below, before a connection cap is learned
    CAP_SAMPLES = 64
    CAP_RECOVERY_SECONDS = 30.0
    WIRE_BURST_SECONDS = 0.1  # at the wire, at most this much of our rate back to back (>= 1 request)
    WIRE_MAX_DEBT = 4.0  # seconds of wire debt a late write may leave at most (space_send waits 5 s at most)
    TIGHT_INTERVAL = 0.1  # from this interval between our requests on, lateness moves the next one back
    JITTER_SHARE = 0.005  # refusals per send (last ACCEPTED_WINDOW) below which one is jitter...
    JITTER_STEP = 0.03  # ...and lowers the level by this much only
    MAX_CUT = 0.25  # the most one refusal event lowers the level by...
    NOT_PRESSING = 0.6  # ...of our rate when we sent less than this share of it (else of what we sent)
    SLOW_START_SENT_FLOOR = 0.75  # the first refusal's rate is at least this share of slow start's rate
    SLOW_START_EXIT = 0.8  # the first refusal: the level is this share of the rate we were sending at
    GUESS_PROBE_SECONDS = 1.0  # a guessed level is probed this often...
    GUESS_GROWTH = 0.05  # ...by this much (the "within ~10% below the limit" needs it found)
    BETWEEN_TRUSTED = 0.85  # two refusals alone measure the limit if it reads this close to our rate
    BETWEEN_ANSWERS = 8  # accepted answers between two refusals that measure the server's rate
    LATENCY_SAMPLES = 32
    LATENCY_RISE = 5.0  # median latency this many times its baseline...
    LATENCY_MIN_RISE = 1.0  # ...and at least this many seconds above it...
    LATENCY_SUSTAIN = 10.0  # ...for this long: congestion
    SILENCE_MIN = 0.1  # seconds without any answer (and 4x the usual latency) that make a server silent...
    SILENCE_HOLD = 1.0  # ...which holds new requests this long per late one at most

    def __init__(
        self,
        limits: LaneLimits,
        clock: Clock = time.monotonic,
        share: float = 1.0,
        wall_clock: Clock = time.time,
        name: str = "",
    ) -> None:
        self.name = name  # for the log
        self.limits = limits
        self.clock = clock
        self.wall_clock = wall_clock
        self.share = share  # this lane's fraction of the server (1/lanes)
        self.connection_share = share  # its fraction of the server's connections (reshare keeps it)
        self.ceiling = limits.ceiling
        self.floor = min(limits.floor, limits.ceiling)
        # Ceilings beyond our own, each kept apart so one never lifts the other: robots.txt's rate
        # (cap_rate) and the rate the server announces (headers).
        self.robots_ceiling: float | None = None
        self.announced_ceiling: float | None = None
        self.rate = max(self.floor, min(limits.start_rate, limits.ceiling))
        self.level = limits.level
        self.level_measured = True  # the level came from sending at our rate (else: our own limits)
        self.level_since = clock()  # when the level was last set
        self.peak = 0.0  # the most this lane has seen the server accept per second (2-s windows)
        self.regrowing_to_peak = False  # a measured level was dropped as far below the peak: growing back to it
        self.refused: deque[float] = deque()  # times of refusals (429/503) in the last ACCEPTED_WINDOW
        self.wire_tokens = 1.0  # space_send's bucket
        self.wire_at = clock()
        self.slow_start = limits.level is None
        self.level_guessed = False  # the level is slow start's step back, not a measurement: probe it sooner
        now = clock()
        self.paused_until = 0.0
        self.pauses: deque[tuple[float, float]] = deque()  # (start, end) of recent pauses, overlaps merged
        self.level_floor: float | None = None  # a lower bound of the level when it was read through a pause
        self.next_start = 0.0
        self.last_decrease = -math.inf
        self.epoch_start = now
        self.epoch_sent = 0
        self.epoch_congested = False
        self.sent_since_increase = 0
        self.last_increase = now
        self.created = now
        self._flying: dict[int, float] = {}  # ticket -> send time
        self.last_answer = now  # when the server last answered anything (a network error included)
        self.wire_latencies: deque[float] = deque(maxlen=self.LATENCY_SAMPLES)  # from our write to the answer
        self.write_lates: deque[float] = deque(maxlen=16)  # how long after space_send each write left
        self.tight_burst = False  # it refused us below its level (jitter): its burst is about one
        self._silence_counted = -math.inf
        self._tickets = itertools.count()
        self.connection_cap: int | None = None
        self.cap_guessed = False  # the cap came from one refusal while pressed, not from CAP_EVIDENCE
        self.cap_changed = now
        self.last_pressed = -math.inf  # when the lane last sent with all its connections busy
        self.accepted: deque[float] = deque()  # completion times of answers that were not refusals
        self.sends: deque[float] = deque()  # slot times of the last ACCEPTED_WINDOW seconds
        self.outcomes: deque[str] = deque(maxlen=self.OUTCOME_WINDOW)  # "ok" | "net" | "5xx"
        self.concurrency: deque[tuple[int, bool]] = deque(maxlen=self.CAP_SAMPLES)  # (in flight at send, refused)
        self.latencies: deque[float] = deque(maxlen=self.LATENCY_SAMPLES)
        self.latency_baseline: float | None = None
        self.latency_high_since: float | None = None
        self.forbidden_streak = 0
        self.bans = 0
        self.answers = 0  # HTTP answers this controller saw (server memory learns only from lanes that had some)
        self.events = {"congestion": 0, "pauses": 0, "increases": 0, "caps": 0, "bans": 0, "jitter": 0, "silences": 0}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ sending

    @property
    def rate(self) -> float:
        """Our pace for this lane, req/s."""
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        old = getattr(self, "_rate", None)
        self._rate = value
        if old is None or value == old or not hasattr(self, "wire_tokens"):
            return
        # The wire's debt (or credit) is time: kept in tokens, a cut turned 4 s of debt into more
        # than space_send waits (a jittered pair left unspaced) and left a wait every later request
        # carried while its slots came at the new rate.
        now = self.clock()
        tokens = self._wire_tokens_at(now, old)
        self.wire_tokens = min(self._wire_capacity(value), 1.0 - (1.0 - tokens) * value / old)
        self.wire_at = now

    def _wire_capacity(self, rate: float) -> float:
        return max(1.0, rate * self.WIRE_BURST_SECONDS)

    def _wire_tokens_at(self, now: float, rate: float) -> float:
        """space_send's bucket as of ``now``, refilled at ``rate`` up to its capacity."""
        return min(self._wire_capacity(rate), self.wire_tokens + (now - self.wire_at) * rate)

    @property
    def latency(self) -> float:
        return statistics.median(self.latencies) if self.latencies else 0.0

    def concurrency_limit(self) -> int:
        """Connections this lane may hold: what rate x latency needs (Little's law), within its share.

        Requests stuck far beyond the usual latency (a stalled URL waiting for its timeout) are
        added on top, so a few stalls do not starve the server's other URLs; the share and any
        learned connection cap still bound the total.
        """
        now = self.clock()
        needed = math.ceil(self.rate * max(self.latency, 0.05) * 1.5) + 1
        cap = self.limits.max_connections if self.connection_cap is None else self.connection_cap
        limit = max(1, min(self.limits.max_connections, cap, needed + self._stalled(now)))
        flying = len(self._flying)
        if flying and flying < limit and self._silent(now):
            return flying  # nothing more until the server answers (see "A silent server" above)
        return limit

    def _silence_gap(self) -> float:
        """How long without any answer is silence: well beyond the usual latency, and two intervals
        of our rate (answers to a slow lane come that far apart anyway; with some URLs slow, a cache
        miss is not a stall: 40% of a 5/s server's URLs at 0.4 s had held the lane at 59%). Also
        counting the slow end of the server's answers (2x their 90th percentile) held the heavy
        farm's lanes at their tail: makespan 2.46-2.50x its bound instead of 1.94."""
        return max(self.SILENCE_MIN, 4 * self.latency, 2.0 / self.rate)

    def _silent(self, now: float) -> bool:
        """Nothing came back for a while and a request is late: hold (at most SILENCE_HOLD per late one)."""
        gap = self._silence_gap()
        if now - self.last_answer < gap:
            return False
        # A copy: the lane thread calls this without the lock while fetch threads finish requests.
        silent = any(gap < now - t <= gap + self.SILENCE_HOLD for t in list(self._flying.values()))
        if silent and self._silence_counted != self.last_answer:  # one count per silence
            self._silence_counted = self.last_answer
            self.events["silences"] += 1
        return silent

    def _stalled(self, now: float) -> int:
        slow = max(1.0, 4 * self.latency)
        # A copy: the lane thread calls this without the lock while fetch threads finish requests.
        return sum(1 for t in list(self._flying.values()) if now - t > slow)

    def try_take(self) -> float:
        """Take a start slot now and return 0, or return the seconds until one is due (nothing taken)."""
        with self._lock:
            now = self.clock()
            self._roll_epoch(now)
            due = max(self.next_start, self.paused_until)
            if due > now:
                return due - now
            # Idle time is not banked as credit: the next slot is one interval from now.
            self.next_start = now + 1.0 / self.rate
            self.sends.append(now)
            while self.sends[0] < now - self.ACCEPTED_WINDOW:
                self.sends.popleft()
            self.epoch_sent += 1
            self.sent_since_increase += 1
            return 0.0

    def space_send(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Right before a request is written: wait until our own rate allows it *at the wire*.

        Slots are taken by the lane thread; a fetch thread may reach the socket late (a busy CPU)
        and the next one on time, and a server with a burst of one refuses the pair. A token bucket
        at our rate with ``WIRE_BURST_SECONDS`` of capacity (at least one request) spaces them
        again; waiting callers queue (the tokens go negative). A short pause is honoured here too,
        also one that comes while they wait (another answer's Retry-After).
        """
        with self._lock:
            now = self.clock()
            tokens = self._wire_tokens_at(now, self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            paused = self.paused_until - now
            if 0 < paused <= 5.0:  # a pause that came after the slot was taken (longer ones: the lane stops)
                wait = max(wait, paused)
            self.wire_tokens = tokens - 1.0
            self.wire_at = now
        woke = now + min(wait, 5.0)
        if wait > 0:
            sleep(min(wait, 5.0))
        for _ in range(3):  # a short pause that came while we waited (another answer's Retry-After) holds us too
            with self._lock:
                later = self.paused_until - max(woke, self.clock())
                woke = self.paused_until
            if not 0 < later <= 5.0:
                return
            sleep(later)

    def wrote(self, late: float) -> None:
        """The request ``space_send`` let go reached the kernel ``late`` seconds after it (the GIL, a
        busy CPU, a new connection): the next one waits as much longer than a write usually takes,
        or the server sees the pair closer than we spaced them (a burst-of-one host refused the next
        one at 0.8 of its rate). What every write takes (request()'s own time, a connect on a server
        that closes each one) spaces nothing and is not charged."""
        with self._lock:
            usual = min(self.write_lates) if self.write_lates else 0.0
            self.write_lates.append(late)
            excess = late - usual
            if excess <= 0 or not self._spacing_matters():
                return
            # No deeper than space_send waits (5 s at most): beyond, a pair would leave unspaced.
            deepest = 1.0 - self.WIRE_MAX_DEBT * self.rate
            self.wire_tokens = max(self.wire_tokens - excess * self.rate, min(self.wire_tokens, deepest))
            self._slots_follow_the_wire()

    def _spacing_matters(self) -> bool:
        """Whether a write's few ms of lateness can cost a refusal here: a server that refused us
        below its level (a burst of about one), or one we send to at most 1/TIGHT_INTERVAL req/s.
        Elsewhere the server's burst absorbs it, and moving each next request back by its write's
        lateness cost the 66/s host 10-15% of its rate (makespan 1.20 of the floor, was 1.04)."""
        return self.tight_burst or self.rate * self.TIGHT_INTERVAL <= 1.0

    def _slots_follow_the_wire(self) -> None:
        """The wire's debt moves the lane's next slot too, once: else every later request, its slot
        still due at our rate, would wait the debt at the wire (a latency the server never caused,
        which fed Little's law, the silence gap and the latency rule)."""
        if self.wire_tokens < 1.0:
            self.next_start = max(self.next_start, self.wire_at + (1.0 - self.wire_tokens) / self.rate)

    def acquire(self, max_wait: float, sleep: Callable[[float], None] = time.sleep, connection: bool = False) -> bool:
        """Block until a slot is taken (True), or return False at once if it is further than max_wait.

        ``connection``: first wait, up to ``max_wait`` in all, until fewer than ``concurrency_limit()``
        requests are in flight (a redirect hop to a host whose connections someone else counts).
        """
        waited = 0.0
        while True:
            if connection and self.in_flight >= self.concurrency_limit():
                if waited >= max_wait:
                    return False
                sleep(0.05)
                waited += 0.05
                continue
            wait = self.try_take()
            if wait <= 0:
                return True
            if wait > max_wait:
                return False
            sleep(min(wait, 0.25))  # re-check: a pause or a decrease may move the slot meanwhile

    def cap_rate(self, rate: float | None) -> None:
        """An extra ceiling for this lane (its share of robots.txt's Crawl-delay / Request-rate)."""
        with self._lock:
            self.robots_ceiling = None if rate is None else max(1e-6, rate)
            self._set_ceiling()
            if self.sends:  # the next slot is one new interval after the last one (robots.txt's own fetch)
                self.next_start = max(self.next_start, self.sends[-1] + 1.0 / self.rate)

    def not_before(self, epoch: float) -> None:
        """No request before this wall-clock time (the pace after profiling's last request)."""
        with self._lock:
            self.next_start = max(self.next_start, self.clock() + epoch - self.wall_clock())

    def paused_for(self) -> float:
        return max(0.0, self.paused_until - self.clock())

    def _paused_between(self, since: float, until: float) -> float:
        """Seconds of [since, until] this lane was paused (Retry-After, quota, ban)."""
        return sum(max(0.0, min(end, until) - max(start, since)) for start, end in self.pauses)

    def started(self) -> tuple[int, int]:
        """A request goes out: (its ticket for finished(), how many are in flight with it)."""
        with self._lock:
            now = self.clock()
            if len(self._flying) + 1 >= self.concurrency_limit():
                self.last_pressed = now  # every connection the lane may hold is busy: connection-bound
            ticket = next(self._tickets)
            self._flying[ticket] = now
            return ticket, len(self._flying)

    def finished(self, ticket: int) -> None:
        with self._lock:
            self._flying.pop(ticket, None)

    @property
    def in_flight(self) -> int:
        return len(self._flying)

    # ------------------------------------------------------------------ feedback

    def on_response(
        self,
        status: int,
        headers: Mapping[str, str] | None,
        latency: float,
        sent_at: float | None = None,
        concurrency: int = 1,
        wire_latency: float | None = None,
    ) -> None:
        """Any HTTP answer (a redirect hop, a 200, a 404, a 429...): classify it and react.

        ``wire_latency``: seconds from the request's bytes to this answer (``latency`` counts from
        its slot); a late one spaces our next request from now.
        """
        with self._lock:
            now = self.clock()
            self.answers += 1
            self._answered(now, wire_latency)
            self._apply_headers(now, headers)
            sent_at = now if sent_at is None else sent_at
            if status in REFUSAL_STATUSES:
                self.refused.append(now)
                while self.refused[0] < now - self.ACCEPTED_WINDOW:
                    self.refused.popleft()
                self.concurrency.append((concurrency, True))
                self.forbidden_streak = 0
                if self._explained_by_connections(now, concurrency):
                    return
                self._congestion(now, sent_at, factor=None)
                return
            self.concurrency.append((concurrency, False))
            self._accepted(now)
            if status == 403:
                self.forbidden_streak += 1
                if self.forbidden_streak >= self.BAN_STREAK:
                    self.forbidden_streak = 0
                    self._ban(now, sent_at)
                return
            self.forbidden_streak = 0
            if status in SERVER_ERROR_STATUSES:
                self._outcome(now, sent_at, "5xx")
                return
            self._outcome(now, sent_at, "ok")
            if 200 <= status < 300:
                self._latency(now, latency)

    def on_network_error(self, sent_at: float | None = None) -> None:
        """A reset, a timeout or a refused connection: a per-URL fault unless many URLs fail together."""
        with self._lock:
            now = self.clock()
            self.last_answer = now
            self._outcome(now, now if sent_at is None else sent_at, "net")

    def _answered(self, now: float, wire_latency: float | None) -> None:
        previous, self.last_answer = self.last_answer, now
        if wire_latency is None:
            return
        usual = statistics.median(self.wire_latencies) if self.wire_latencies else wire_latency
        gap = self._silence_gap()
        self.wire_latencies.append(wire_latency)
        # The bucket counts from space_send, the lateness from the real write: what a write takes
        # anyway is no lateness.
        write = min(self.write_lates) if self.write_lates else 0.0
        if wire_latency > gap and previous <= now - wire_latency:
            # Nothing else was answered since this one was written: the server stalled, and its
            # limiter counts the request from about now. The next one goes one interval after this
            # answer. (One slow URL among answers that kept coming says nothing of the kind.)
            cap = write * self.rate
        elif self.tight_burst and wire_latency > usual:
            # A server that refuses a pair closer than its interval: an answer later than usual says
            # it read the request that much later, so the next one moves back by as much.
            cap = (usual + write) * self.rate
        else:
            return
        self.wire_tokens = min(cap, self._wire_tokens_at(now, self.rate))
        self.wire_at = now
        self._slots_follow_the_wire()

    def is_banned(self) -> bool:
        """True while a ban's pause lasts (the lane writes refused URLs as transient, not 403)."""
        return self.bans > 0 and self.paused_until > self.clock()

    def pause_until(self, epoch: float) -> None:
        """A pause another lane of this server saw (wall-clock time), relayed by the coordinator."""
        with self._lock:
            now = self.clock()
            self._pause(now, epoch - self.wall_clock())

    def sibling_level(
        self, server_level: float, guessed: bool = False, server_floor: float | None = None, measured: bool = True
    ) -> None:
        """Another lane of this server (on another rank) met congestion at ``server_level`` req/s for
        the whole server: this lane takes its share of it as its level at once, instead of finding
        the same limit again with refusals of its own (two lanes in slow start each refused 3-4
        times on a 55/s nginx host)."""
        with self._lock:
            level = server_level * self.share
            if level <= 0:
                return
            now = self.clock()
            # Still far below it (this lane opened later): slow start's pace up to the level, not
            # 5% a second (a lane at 1 of a 20/s share took 40 s to reach 8).
            self.slow_start = self.slow_start and self.rate < min(self.level or level, level) * self.NEAR * 0.5
            # A guess there (its slow start's step back) is a guess here: grown from briskly until
            # a refusal measures the limit. A lane that keeps its own, lower level keeps what that
            # was: a sibling's higher level turned this lane's own guess into a measurement, which
            # only gentle probes then left (a 37.5/s host's lane held 3.4 req/s for 120 s, twice).
            if self.level is None or level <= self.level:
                self.level_guessed = guessed
                self.level_floor = None if server_floor is None else server_floor * self.share
                # Read by a lane held back (its connections or the CPU): it measured that lane, not
                # the server. Taken as measured here, a 43/s host's other lane held 4.5 req/s for 75 s
                # after the first lane's batch was done (its own level regrew, this one never did).
                self.level_measured = measured
            self.level = min(self.level, level) if self.level is not None else level
            self.level_since = self.last_decrease = self.last_increase = now
            self.sent_since_increase = 0
            before = self.rate
            self.rate = max(self.floor, min(self.rate, self.level * (1.0 - self.HEADROOM)))
            self.next_start = max(self.next_start, now + 1.0 / self.rate) if self.rate < before else self.next_start
            log.info(
                "%s: another lane met congestion at %.2f req/s: %.2f -> %.2f req/s",
                self.name,
                server_level,
                before,
                self.rate,
            )

    def reshare(self, share: float) -> None:
        """The server's other lanes closed: this lane now holds ``share`` of it (more than before).

        Every rate figure is per lane and scales with the share: the server sees what all its lanes
        sent together before, now from this one. Held at its old share, the last lane of a 49.5/s
        host ran its 500-URL batch at half of what the two lanes had sent (5.8 req/s for 70 s after
        its sibling's batch was done: the background bench's makespan). Connections stay: the pool
        was sized for them.
        """
        with self._lock:
            if not 0 < share <= 1.0 or share <= self.share:
                return  # only ever grows: a lane opens for a server before its first batch, never later
            factor = share / self.share
            self.share = share
            self.limits.ceiling *= factor
            self.limits.floor *= factor
            if self.robots_ceiling is not None:
                self.robots_ceiling *= factor
            if self.announced_ceiling is not None:
                self.announced_ceiling *= factor
            before = self.rate
            self.rate *= factor
            self._set_ceiling()  # clamps the rate to the new ceiling
            self.rate = max(self.floor, self.rate)
            if self.level is not None:
                self.level *= factor
            if self.level_floor is not None:
                self.level_floor *= factor
            self.peak *= factor
            log.info("%s: now %.0f%% of the server: %.2f -> %.2f req/s", self.name, 100 * share, before, self.rate)

    def congestion_count(self) -> int:
        """Congestion reactions so far (jitter trims included): a new one is relayed to the server's other lanes."""
        return self.events["congestion"] + self.events["jitter"]

    def paused_until_epoch(self) -> float:
        remaining = self.paused_until - self.clock()
        return self.wall_clock() + remaining if remaining > 0 else 0.0

    # ------------------------------------------------------------------ memory

    def state(self) -> ControllerState:
        return ControllerState(self.rate, self.remembered_level(), self.connection_cap, self.paused_until_epoch())

    def remembered_level(self) -> float | None:
        """The level a server memory keeps: the low end of one read through a pause (see Pauses)."""
        if self.level is None or self.level_floor is None:
            return self.level
        return min(self.level, self.level_floor)

    # ------------------------------------------------------------------ internals

    def _accepted(self, now: float) -> None:
        self.accepted.append(now)
        while self.accepted and self.accepted[0] < now - self.ACCEPTED_WINDOW:
            self.accepted.popleft()
        self._recover_cap(now)

    def _measured(self, now: float) -> tuple[float, float, bool]:
        """(accepted per second, sent per second, whether the window is full) over the last second or so.

        Right after a refusal the accepted rate is the server's own limit: a token bucket that
        refuses accepts exactly its refill rate; while it still drains its burst the estimate is
        high, which the next refusal corrects (an estimate too low would cost minutes of probing).
        The window spans ~8 answers' worth, at least a second; a lane younger than that has none.
        """
        length = min(self.ACCEPTED_WINDOW, max(1.0, 8.0 / self.rate))
        since = max(now - length, self.created)
        span = now - since
        if span < 0.5:
            return 0.0, 0.0, False
        full = span >= length * 0.99
        # Paused time is left out: nothing could be sent then (a 1-s Retry-After in a 2.6-s window
        # read a 3/s host at 2.0 req/s, where gentle probes left it for the whole run).
        sending = max(0.25, span - self._paused_between(since, now))
        accepted = sum(1 for t in self.accepted if t >= since) / sending
        sent = sum(1 for t in self.sends if t >= since) / sending
        return accepted, sent, full

    def _outcome(self, now: float, sent_at: float, kind: str) -> None:
        self.outcomes.append(kind)
        if kind == "ok" or len(self.outcomes) < self.OUTCOME_WINDOW // 2:
            return
        failures = sum(1 for k in self.outcomes if k == kind)
        if failures >= self.BURST_SHARE * len(self.outcomes):
            # Most URLs failing together: the server is struggling, not one file.
            self.outcomes.clear()
            self._congestion(now, sent_at, factor=1.0 - self.limits.decrease)

    def _latency(self, now: float, latency: float) -> None:
        self.latencies.append(latency)
        if len(self.latencies) < self.LATENCY_SAMPLES // 2:
            return
        median = statistics.median(self.latencies)
        if self.latency_baseline is None or median < self.latency_baseline:
            self.latency_baseline = median
        high = median > max(self.LATENCY_RISE * self.latency_baseline, self.latency_baseline + self.LATENCY_MIN_RISE)
        if not high:
            self.latency_high_since = None
            return
        if self.latency_high_since is None:
            self.latency_high_since = now
        elif now - self.latency_high_since >= self.LATENCY_SUSTAIN:
            self.latency_high_since = None
            self.latencies.clear()
            self._congestion(now, now, factor=1.0 - self.limits.decrease / 2)

    def _explained_by_connections(self, now: float, concurrency: int) -> bool:
        """Whether a refusal is the server's connection limit rather than its rate limit.

        A rate limit refuses us when we send faster than it allows; a refusal that comes while the
        lane is bound by its connections (all busy: slow answers, a stalled request, another lane
        holding the server's connections) and sends well below the rate the server accepted
        before says "fewer at once", not "slower": the lane then holds one connection less
        (recovering one per CAP_RECOVERY_SECONDS) and keeps its rate. Otherwise the evidence must be
        plain: the recent refusals all came with >= k requests in flight (k >= 2), most requests
        sent at >= k were refused (a token bucket near its rate refuses a few percent, a connection
        limit nearly all above it),
        and many sent at < k passed. Either way, lowering the rate on connection refusals would
        spiral: each cut lowers what the server accepts next, which sets the next cut.
        """
        if self.connection_cap is not None and concurrency > self.connection_cap:
            return True  # sent before the cap was lowered
        pressed = now - self.last_pressed < max(1.0, 2 * self.latency)
        # One connection less must still carry the rate (Little's law): a slow server with a burst of
        # one refuses a jittered pair while the lane "presses" its two connections, and taking it
        # for a connection limit would hold the lane at 1/latency (measured: 1.3 of 2 req/s).
        sustains = concurrency - 1 >= self.rate * max(self.latency, 0.05) * 1.5
        # What we would send if connections did not hold us back: the level, or in slow start our rate
        # (a first refusal there used to be read as the rate: 2 lanes on a 4-connection host fell to 1/4).
        reference = self.level if self.level is not None else self.rate if self.slow_start else None
        if concurrency >= 2 and pressed and sustains and reference is not None:
            span = max(2.0, 8.0 / self.rate)
            since = max(now - span, self.created)
            sent = sum(1 for t in self.sends if t >= since) / max(now - since, 1e-9)
            if now - since >= 1.0 and sent < 0.9 * reference:
                self._lower_cap(now, concurrency - 1)
                self.cap_guessed = True  # until a refusal reads as the rate (_congestion)
                return True
        refused = [c for c, r in self.concurrency if r]
        if len(refused) < self.CAP_EVIDENCE:
            return False
        k = min(refused)
        if k < 2:
            return False  # refused with nothing else in flight: that is the rate
        at_or_above = [r for c, r in self.concurrency if c >= k]
        below = sum(1 for c, _ in self.concurrency if c < k)
        if sum(at_or_above) * 2 < len(at_or_above) or below < 4 * self.CAP_EVIDENCE:
            return False
        self._lower_cap(now, k - 1)
        self.cap_guessed = False
        self.concurrency.clear()
        self.level = None  # the refusals that lowered the rate were about connections: grow again
        return True

    def _lower_cap(self, now: float, cap: int) -> None:
        current = self.limits.max_connections if self.connection_cap is None else self.connection_cap
        self.connection_cap = max(1, min(current, cap))
        self.cap_changed = now
        self.events["caps"] += 1
        log.info("%s: refused with %d in flight: holds %d connections", self.name, cap + 1, self.connection_cap)

    def _recover_cap(self, now: float) -> None:
        if self.connection_cap is None or now - self.cap_changed < self.CAP_RECOVERY_SECONDS:
            return
        self.cap_changed = now
        self.connection_cap += 1
        if self.connection_cap >= self.limits.max_connections:
            self.connection_cap = None

    def _ban(self, now: float, sent_at: float) -> None:
        self.bans += 1
        self.events["bans"] += 1
        self._pause(now, min(self.BAN_PAUSE * 2 ** (self.bans - 1), self.BAN_PAUSE_MAX))
        self._congestion(now, sent_at, factor=1.0 - self.limits.decrease, force=True)

    def _pause(self, now: float, seconds: float) -> None:
        # An infinite pause (a quota reset of "inf" or 1e400) is no time a server means: it stopped
        # the server for good, every round, and wrote Infinity (not JSON) into the server memory.
        if seconds > 0 and math.isfinite(seconds) and now + seconds > self.paused_until:
            self.paused_until = now + seconds
            if self.pauses and self.pauses[-1][1] >= now:  # a pause within a pause: one span
                self.pauses[-1] = (self.pauses[-1][0], now + seconds)
            else:
                self.pauses.append((now, now + seconds))
            while self.pauses[0][1] < now - 2 * self.ACCEPTED_WINDOW:
                self.pauses.popleft()
            self.events["pauses"] += 1
            self.epoch_congested = True

    def _apply_headers(self, now: float, headers: Mapping[str, str] | None) -> None:
        if not headers:
            return
        announced = advertised_rate(headers)
        if announced is not None and announced > 0:
            self.announced_ceiling = max(1e-6, announced * self.share)
            self._set_ceiling()
        pause = parse_retry_after(header(headers, "Retry-After"), self.wall_clock())
        if pause is not None:
            self._pause(now, pause)
        quota = exhausted_pause(headers, self.wall_clock())
        if quota:
            self._pause(now, quota)

    def _set_ceiling(self) -> None:
        # The strictest of our own ceiling, robots.txt's and the server's: an announced 10 req/s had
        # replaced a Crawl-delay of 5 s, and the floor (1/30 req/s) had lifted an announced 100/hour.
        caps = [cap for cap in (self.robots_ceiling, self.announced_ceiling) if cap is not None]
        self.ceiling = min([self.limits.ceiling, *caps])
        self.floor = min(self.limits.floor, self.ceiling)
        self.rate = min(self.rate, self.ceiling)

    def _congestion(self, now: float, sent_at: float, factor: float | None, force: bool = False) -> None:
        self.epoch_congested = True
        if sent_at < self.last_decrease and not force:
            return  # sent before our last reaction: not news
        if factor is None and not force and self._jitter(now):
            return
        self.events["congestion"] += 1
        self.level_guessed = False
        if factor is None and self.cap_guessed:
            # A refusal that is the rate: the one that set the cap may have been the rate too. A lane
            # that one stalled URL held to 9.4 of its 12.5/s was refused by an 8/s bucket, read it as
            # a cap of one connection and kept it for the run (each later stall stopped the host 2 s).
            self.cap_guessed = False
            self.connection_cap = None
            log.info("%s: refused at the rate: the connection cap it guessed is lifted", self.name)
        accepted, sent, full = self._measured(now)
        if factor is None and accepted > 0:
            if self.slow_start:
                # What we were sending, or most of our rate when far less went out (connections or
                # the CPU held the lane back: the refusal then says little about the rate).
                self._leave_slow_start(now, min(self.rate, max(sent, accepted, self.SLOW_START_SENT_FLOOR * self.rate)))
                return
            between = self._between_refusals(now)
            floor = None
            if between is not None:
                accepted, floor = between
            elif not full or now - self.last_decrease > self.ACCEPTED_WINDOW or len(self.refused) <= 1:
                # One refusal after a quiet spell (we just crossed the limit), or too young to
                # measure: an estimate too low costs minutes of probing, so step down 10% at most.
                accepted = max(accepted, 0.9 * min(self.rate, max(sent, accepted, self.peak)))
            # One event lowers the level by MAX_CUT at most: a short window with two refusals in it
            # (server-side jitter on a busy host) reads far below what the server accepts, and a
            # real overload takes two or three events instead of one.
            # Relative to what we sent, unless that was far below our rate: then something else held
            # the lane back (its share of a connection cap the other lanes fill, the CPU) and the
            # refusal measured that, not the rate (a 43/s host's lanes were cut 10.3 -> 3.6 req/s
            # in one event and held there 100 s).
            sending = max(sent, accepted)
            base = self.rate if sending < self.NOT_PRESSING * self.rate else min(self.rate, sending)
            accepted = max(accepted, (1.0 - self.MAX_CUT) * base)
            self.level = min(self.rate, accepted)
            self.level_floor = None if floor is None else min(self.level, floor)
            target = self.level * (1.0 - self.HEADROOM)
            if self.regrowing_to_peak and self.level < self.peak:
                # Refused again on the way back to a peak the server once took: it takes less now (its
                # limit fell). Kept, that peak dropped every level as suspect and regrew at slow-start
                # pace past the limit, forever: a 30 -> 3 req/s drop held 2.1/s with 5% refused.
                self.peak = self.level
            self.regrowing_to_peak = False
        else:
            target = self.rate * (factor if factor is not None else 1.0 - self.limits.decrease)
            if self.level is None:
                # A new level, not read through a pause: the low end of a level dropped since (stale,
                # or regrown past) bounds nothing now. Kept, the memory held a 50/s lane at 9.6.
                self.level, self.level_floor = self.rate, None
            else:
                self.level = min(self.level, self.rate)
        # Measured only if we really sent at our rate: a lane held back by its connections or by
        # the CPU measures itself, not the server, and must not hold that level for minutes.
        self.level_measured = sent >= 0.8 * self.rate
        self.level_since = now
        self.slow_start = False
        before = self.rate
        self.rate = max(self.floor, min(self.rate, target))
        log.info(
            "%s: congestion (%s): %.2f -> %.2f req/s; accepted %.2f/s, sent %.2f/s",
            self.name,
            "refusal" if factor is None else f"x{factor:.2f}",
            before,
            self.rate,
            accepted,
            sent,
        )
        self.last_decrease = now
        self.next_start = max(self.next_start, now + 1.0 / self.rate)
        self.sent_since_increase = 0
        self.last_increase = now

    def _between_refusals(self, now: float) -> tuple[float, float | None] | None:
        """What the server accepted per second between an earlier refusal and this one, or None;
        with a pause in between, (the reading, its lower bound).

        A refusal says the server's bucket was empty; a token bucket refilling at r then accepts
        r x gap answers (+-1) until the next refusal while we press it, whatever its burst. (A
        short window right after slow start reads the burst it drained as rate: 55/s on a 38/s
        host.) The latest earlier refusal with ``BETWEEN_ANSWERS`` accepted answers and another
        refusal after it is used: recent, so we pressed all along; long enough to count.

        A pause P in a gap g (Retry-After) blurs it: the bucket refilled min(burst, r x P) while we
        waited, so A answers say r in [A/g, A/(g-P)]: the low end is exact when the burst covers
        the pause (the snapshot bench's 4/s hosts, burst 1 s), the high end when the burst is one.
        The low end held an 11/s host with a burst of 3 at 9 req/s (0.82) for the whole run, the
        high end read 4/s hosts at up to 5/s; the geometric middle is within sqrt(g/(g-P)) of
        either (simulated over Retry-After buckets of 3-66 req/s, bursts of r/4 to r: the 10th
        percentile hold 0.857 -> 0.868, median 0.961 -> 0.960, 3.11 -> 2.68 refusals per host), a
        reading above the limit is corrected by the next refusal, whose gap is longer, and the low
        end is what the server memory keeps (``level_floor``). Such a reading is trusted when its
        high end is near our rate (the pause lowers the rest): read against its low end, the 11/s
        host's second refusal fell back to a 1-s window that counted the burst (12 req/s) and cost a
        third refusal.
        """
        accepted = self.accepted
        count = 0
        index = len(accepted) - 1
        for inside, earlier in enumerate(reversed(list(self.refused)[:-1])):
            while index >= 0 and accepted[index] > earlier:
                count += 1
                index -= 1
            # A refusal in between too: we pressed. Two lone ones (jitter on a burst of one while we
            # sent below the limit) would read our own rate, not the server's: a lower bound of the
            # limit that is believed only when close to the rate we send at (else it read our waste).
            if count >= self.BETWEEN_ANSWERS and now > earlier:
                gap = now - earlier
                paused = self._paused_between(earlier, now)
                lower = count / gap
                sending = max(gap - paused, gap / 4)
                measured = count / math.sqrt(gap * sending) if paused > 0 else lower
                # Trusted when its high end is near our rate: a pause, not our own slack, lowers the rest.
                if inside or count / sending >= self.BETWEEN_TRUSTED * self.rate:
                    return measured, (lower if paused > 0 else None)
        return None

    def _leave_slow_start(self, now: float, sending: float) -> None:
        """The first refusal: the limit lies below the rate we were sending at, by up to its burst.

        Slow start overshoots by the time a burst allowance takes to drain (measured 1.5-2x the
        limit on nginx's burst = rate/2): keeping that rate costs a refusal per event down to the
        limit. A step back to ``SLOW_START_EXIT`` of it is taken as the level; the next refusal,
        if any, measures the limit between the two (``_between_refusals``).
        """
        before = self.rate
        self.slow_start = False
        self.level = sending * self.SLOW_START_EXIT
        self.level_floor = None
        self.rate = max(self.floor, min(self.rate, self.level * (1.0 - self.HEADROOM)))
        self.level_measured = True
        self.level_guessed = True
        self.level_since = self.last_decrease = self.last_increase = now
        self.sent_since_increase = 0
        self.next_start = max(self.next_start, now + 1.0 / self.rate)
        log.info("%s: first refusal at %.2f req/s: %.2f -> %.2f req/s", self.name, sending, before, self.rate)

    def _jitter(self, now: float) -> bool:
        """A lone refusal while we send no faster than the level the server showed: lower it a little."""
        if self.slow_start or self.level is None or now - self.created < 2.0:
            return False
        while self.refused and self.refused[0] < now - self.ACCEPTED_WINDOW:
            self.refused.popleft()
        window_sends = sum(1 for t in self.sends if t >= now - self.ACCEPTED_WINDOW)
        if len(self.refused) > max(1.0, self.JITTER_SHARE * window_sends):
            return False
        _, sending, _ = self._measured(now)  # now, not a 10-s average that a ramp would hold down
        if sending > self.level:
            return False
        before = self.rate
        self.level *= 1.0 - self.JITTER_STEP
        self.rate = max(self.floor, min(self.rate, self.level * (1.0 - self.HEADROOM)))
        self.last_decrease = now
        self.events["jitter"] += 1
        self.tight_burst = True
        log.info(
            "%s: lone refusal at %.2f req/s, below the %.2f/s level: jitter, %.2f -> %.2f req/s",
            self.name,
            sending,
            self.level / (1.0 - self.JITTER_STEP),
            before,
            self.rate,
        )
        return True

    def _slow_start_growth(self) -> float:
        """x1.5 per second while the server gets under ``SLOW_START_BRISK_BELOW`` req/s, x1.2 above.

        An exponential ramp drains a hidden burst almost all in the last second before the first
        refusal: that second then holds rate + burst accepted *plus* the refused requests, over
        what the server allows (simulated: 6 of 72 first contacts; measured on a 57/s host: 72
        requests in a second against 57 + 14). Growing slower above a few requests per second
        spreads the drain over more than a second (0 of 72), for ~1 s more to reach 66/s.

        A server's k lanes each ramp blind to the others' refusals until the relay through rank 0
        reaches them (0.2-0.5 s), so together they overshoot k times over: the brisk ramp ends at
        ``SLOW_START_BRISK_BELOW / k`` req/s server-wide (two lanes of a 10/s + 3 nginx host both
        at 7.9/s sent 14 requests in a second; simulated without the relay: 5 of 87 first
        contacts over rate + burst, 0 now).
        """
        if self.rate < self.SLOW_START_BRISK_BELOW * self.share * self.share:
            return self.SLOW_START_GROWTH
        return self.SLOW_START_LATE_GROWTH

    def _roll_epoch(self, now: float) -> None:
        # Epochs of a few sends (0.25-1 s) so growth is smooth: a burst-hiding token bucket then
        # sees at most a small overshoot before its first refusal.
        elapsed = now - self.epoch_start
        if elapsed < min(1.0, max(0.25, 3.0 / self.rate)):
            return
        if now - self.created >= 2.0:
            self.peak = max(self.peak, sum(1 for t in self.accepted if t >= now - 2.0) / 2.0)
        saturated = self.epoch_sent >= 0.8 * self.rate * elapsed and now >= self.paused_until
        if saturated and not self.epoch_congested and self.rate < self.ceiling:
            self._grow(now, min(elapsed, 1.0))
        self.epoch_start, self.epoch_sent, self.epoch_congested = now, 0, False

    def _grow(self, now: float, elapsed: float) -> None:
        if self.slow_start:
            top = self.ceiling if self.level is None else min(self.ceiling, self.NEAR * self.level)
            self.rate = min(top, self.rate * self._slow_start_growth() ** elapsed)
            if self.rate >= top and self.level is not None:  # a sibling's level reached: hold or probe it
                self.slow_start = False
            return
        if self.level is not None and self.rate > self.level * self.FORGET_LEVEL:
            self.level = None  # well past the old failing level: the server allows more now
        if self.level is not None and now - max(self.last_decrease, self.level_since) > self.LEVEL_HOLD:
            # Long quiet: the level may have been measured under load, or the server allows more
            # now (CUBIC speeds up the longer it goes without loss).
            self.level = None
        near = self.level is not None and self.rate >= self.NEAR * self.level
        # A level we never really sent at, or far below what the server has accepted from us:
        # it measured us (connections, CPU, slow answers), not the server. Grow to find its own.
        suspect = not self.level_measured or (self.level is not None and self.level < 0.5 * self.peak)
        if near and suspect and now - self.last_decrease > self.PROBE_SECONDS:
            self.level = None
            near = False
            self.regrowing_to_peak = self.level_measured  # a refusal below half the peak: it is stale
        if near:
            guessed = self.level_guessed
            due = (guessed or self.sent_since_increase >= self.PROBE_REQUESTS) and now - self.last_increase >= (
                self.GUESS_PROBE_SECONDS if guessed else self.PROBE_SECONDS
            )
            if not due:
                return
            step = self.rate * (self.GUESS_GROWTH if guessed else self.GROWTH_NEAR)
        elif self.level is None and self.rate < 0.5 * self.peak:
            # Far below what the server accepted before: back up at slow-start pace.
            self.rate = min(self.ceiling, self.rate * self.SLOW_START_GROWTH**elapsed)
            self.events["increases"] += 1
            return
        else:
            step = self.rate * self.GROWTH_FAR * elapsed
            if self.level is not None:  # do not jump far past the level in one step
                step = min(step, max(self.NEAR * self.level - self.rate, self.rate * self.GROWTH_NEAR))
        self.rate = min(self.ceiling, self.rate + max(step, 0.001))
        self.events["increases"] += 1
        self.sent_since_increase = 0
        self.last_increase = now


def lane_connections(max_connections: int, lanes: int, lane_index: int) -> int:
    """This lane's share of the server's connections; the shares add up to max_connections exactly.

    The schedule never gives a server more lanes than connections, so every share is >= 1.
    """
    base, extra = divmod(max(1, max_connections), max(1, lanes))
    return max(1, base + (1 if lane_index < extra else 0))
