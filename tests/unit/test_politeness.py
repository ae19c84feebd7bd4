"""Tests for per-server politeness: pacing, adaptive rate, Retry-After, rate-limit headers, robots.txt.

Every RateController here runs on a fake clock: no test sleeps.
"""

from __future__ import annotations

import email.utils
import heapq
import math
import time

import pytest

from distributed_downloader.politeness import (
    MAX_PAUSE,
    LaneLimits,
    RateController,
    RobotsRules,
    advertised_rate,
    exhausted_pause,
    parse_retry_after,
)

TOKEN = "distributed-downloader"


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def controller(
    start: float = 4.0, ceiling: float = 50.0, connections: int = 8, share: float = 1.0, decrease: float = 0.5
) -> tuple[RateController, FakeClock]:
    clock = FakeClock()
    limits = LaneLimits(start_rate=start, ceiling=ceiling, max_connections=connections, decrease=decrease)
    return RateController(limits, clock=clock, share=share), clock


def send_saturated(ctl: RateController, clock: FakeClock, seconds: float) -> list[float]:
    """A sender that always has work: each request starts as soon as its slot comes. Start times."""
    starts = []
    end = clock.t + seconds
    while clock.t < end:
        clock.advance(ctl.reserve())
        starts.append(clock.t)
    return starts


# ---------------------------------------------------------------- pacing and growth


def test_reserve_spaces_slots_by_one_over_rate() -> None:
    ctl, clock = controller(start=4.0)
    waits = [ctl.reserve() for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.25, 0.5, 0.75])
    clock.advance(0.1)
    assert ctl.reserve() == pytest.approx(0.9)


def test_no_burst_after_idle_time() -> None:
    ctl, clock = controller(start=4.0)
    ctl.reserve()
    clock.advance(10.0)
    assert ctl.reserve() == 0.0
    assert ctl.reserve() == pytest.approx(0.25)  # idle time is not banked as credit


def test_slow_start_grows_when_saturated() -> None:
    ctl, clock = controller(start=4.0, ceiling=1000.0)
    send_saturated(ctl, clock, 1.01)
    assert ctl.rate == pytest.approx(6.0)
    send_saturated(ctl, clock, 3.0)
    assert ctl.rate > 10.0
    assert ctl.events["increases"] >= 3


def test_no_growth_when_idle() -> None:
    ctl, clock = controller(start=4.0)
    for _ in range(20):
        assert ctl.reserve() == 0.0
        clock.advance(2.0)
    assert ctl.rate == 4.0
    assert ctl.events["increases"] == 0


def test_no_growth_while_lightly_used() -> None:
    ctl, clock = controller(start=10.0)
    for _ in range(100):  # 2 requests/s against a 10 requests/s allowance
        clock.advance(0.5 + ctl.reserve())
    assert ctl.rate == 10.0


@pytest.mark.parametrize(("start", "ceiling"), [(3.0, 7.0), (1.0, 2.5), (10.0, 10.0), (20.0, 5.0)])
def test_ceiling_never_exceeded(start: float, ceiling: float) -> None:
    ctl, clock = controller(start=start, ceiling=ceiling)
    assert ctl.rate <= ceiling
    starts = send_saturated(ctl, clock, 60.0)
    assert ctl.rate <= ceiling + 1e-9
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= 1.0 / ceiling - 1e-9
    # over the last ten seconds no more than ten seconds' worth (+1 for the window edge)
    window = [s for s in starts if starts[-1] - 10.0 <= s < starts[-1]]
    assert len(window) <= ceiling * 10.0 + 1


# ---------------------------------------------------------------- congestion


def ramp(ctl: RateController, clock: FakeClock, seconds: float = 4.0) -> float:
    send_saturated(ctl, clock, seconds)
    return ctl.rate


def test_429_decreases_once_per_event_not_per_response() -> None:
    ctl, clock = controller(start=4.0, ceiling=1000.0)
    before = ramp(ctl, clock)
    for _ in range(8):  # eight in-flight requests answered 429 together
        ctl.on_status(429, {})
    assert ctl.rate == pytest.approx(before * 0.5)
    assert ctl.events["congestion"] == 1
    clock.advance(0.5)
    ctl.on_status(429, {})
    assert ctl.rate == pytest.approx(before * 0.5)
    clock.advance(0.6)  # a new event, more than a second after the first
    ctl.on_status(503, {})
    assert ctl.rate == pytest.approx(before * 0.25)
    assert ctl.events["congestion"] == 2
    assert not ctl.slow_start


def test_decrease_pushes_the_next_slot_out() -> None:
    ctl, clock = controller(start=8.0)
    ctl.on_status(429, {})
    assert ctl.rate == pytest.approx(4.0)
    assert ctl.reserve() == pytest.approx(0.25)


@pytest.mark.parametrize("status", [200, 301, 404, 410, 500, 502])
def test_other_statuses_do_not_decrease(status: int) -> None:
    ctl, _ = controller(start=8.0)
    ctl.on_status(status, {})
    assert ctl.rate == 8.0
    assert ctl.events["congestion"] == 0


def test_rate_never_drops_below_the_floor() -> None:
    ctl, clock = controller(start=1.0)
    for _ in range(40):
        ctl.on_status(429, {})
        clock.advance(2.0)
    assert ctl.rate == pytest.approx(ctl.limits.floor)


def test_network_error_slows_down_gently() -> None:
    ctl, _ = controller(start=10.0)
    ctl.on_network_error()
    assert ctl.rate == pytest.approx(8.0)


def test_retry_after_seconds_pause_the_lane() -> None:
    ctl, clock = controller(start=10.0)
    ctl.on_status(429, {"Retry-After": "5"})
    assert ctl.events["pauses"] == 1
    assert ctl.reserve() == pytest.approx(5.0)  # nothing starts before the pause ends
    clock.advance(5.0)
    assert ctl.reserve() == pytest.approx(1.0 / ctl.rate)  # then pacing resumes at the lowered rate
    assert ctl.rate == pytest.approx(5.0)


def test_retry_after_lowercase_header_and_503() -> None:
    ctl, _ = controller(start=10.0)
    ctl.on_status(503, {"retry-after": "3"})
    assert ctl.reserve() == pytest.approx(3.0)


def test_retry_after_http_date_pauses_the_lane() -> None:
    ctl, _ = controller(start=10.0)
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    ctl.on_status(429, {"Retry-After": when})
    assert 28.0 <= ctl.reserve() <= 30.5


def test_retry_after_is_capped() -> None:
    ctl, _ = controller(start=10.0)
    ctl.on_status(429, {"Retry-After": "86400"})
    assert ctl.reserve() == pytest.approx(MAX_PAUSE)


def test_a_lone_403_is_not_congestion_a_burst_is() -> None:
    ctl, _ = controller(start=10.0)
    for _ in range(4):
        ctl.on_status(403, {})
    assert ctl.rate == 10.0
    ctl.on_success(0.1)  # a success breaks the streak
    for _ in range(4):
        ctl.on_status(403, {})
    assert ctl.rate == 10.0
    ctl.on_status(403, {})  # the fifth in a row
    assert ctl.rate == pytest.approx(5.0)
    assert ctl.events["congestion"] == 1


# ---------------------------------------------------------------- advertised limits


@pytest.mark.parametrize(
    ("headers", "share", "cap"),
    [
        ({"RateLimit-Policy": "10;w=1"}, 1.0, 10.0),
        ({"RateLimit-Policy": "10;w=1"}, 0.5, 5.0),
        ({"ratelimit-policy": "120;w=60"}, 1.0, 2.0),
        ({"X-RateLimit-Limit": "6"}, 1.0, 6.0),
        ({"X-RateLimit-Limit": "6"}, 0.25, 1.5),
        ({"X-RateLimit-Limit": "100, 100;w=10"}, 1.0, 10.0),
        ({"X-RateLimit-Limit": "30", "X-RateLimit-Window": "10"}, 1.0, 3.0),
    ],
)
def test_advertised_limits_cap_the_rate_with_the_lane_share(headers: dict, share: float, cap: float) -> None:
    ctl, clock = controller(start=30.0, ceiling=50.0, share=share)
    ctl.on_success(0.05, headers)
    assert ctl.rate == pytest.approx(cap)
    assert ctl.ceiling == pytest.approx(cap)
    send_saturated(ctl, clock, 10.0)
    assert ctl.rate <= cap + 1e-9


def test_advertised_limit_above_the_lane_ceiling_does_not_raise_it() -> None:
    ctl, _ = controller(start=3.0, ceiling=5.0)
    ctl.on_success(0.05, {"RateLimit-Policy": "100;w=1"})
    assert ctl.ceiling == 5.0


def test_advertised_limit_on_a_429_also_caps() -> None:
    ctl, _ = controller(start=30.0)
    ctl.on_status(429, {"RateLimit-Policy": "4;w=1"})
    assert ctl.rate <= 4.0


def test_quota_exhausted_pauses_until_reset() -> None:
    ctl, _ = controller(start=10.0)
    ctl.on_success(0.05, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "7"})
    assert ctl.reserve() == pytest.approx(7.0)
    ctl2, _ = controller(start=10.0)
    ctl2.on_success(0.05, {"RateLimit-Remaining": "3", "RateLimit-Reset": "7"})
    assert ctl2.reserve() == 0.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"RateLimit-Policy": "10;w=1"}, 10.0),
        ({"RateLimit-Policy": "10 ; w = 2"}, 5.0),
        ({"RateLimit-Policy": "bogus, 50;w=10"}, 5.0),
        ({"RateLimit-Policy": "10;w=0"}, None),
        ({"X-RateLimit-Limit": "5"}, 5.0),
        ({"X-RateLimit-Limit": "lots"}, None),
        ({"x-ratelimit-limit": "60", "x-ratelimit-window": "60"}, 1.0),
    ],
)
def test_advertised_rate_table(headers: dict, expected: float | None) -> None:
    assert advertised_rate(headers) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"X-RateLimit-Remaining": "0"}, None),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "12"}, 12.0),
        ({"RateLimit-Remaining": "0", "RateLimit-Reset": "2.5"}, 2.5),
        ({"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "12"}, None),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "99999"}, MAX_PAUSE),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "soon"}, None),
    ],
)
def test_exhausted_pause_table(headers: dict, expected: float | None) -> None:
    assert exhausted_pause(headers) == expected


def test_exhausted_pause_with_epoch_reset() -> None:
    pause = exhausted_pause({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(time.time()) + 20)})
    assert pause is not None and 18.0 <= pause <= 20.5


# ---------------------------------------------------------------- concurrency


def test_concurrency_limit_follows_rate_times_latency_within_max_connections() -> None:
    ctl, _ = controller(start=4.0, connections=8)
    assert ctl.concurrency_limit() == 2  # ceil(4 * 0.05 * 1.5) + 1
    ctl.on_success(0.5)
    assert ctl.concurrency_limit() == math.ceil(4 * 0.5 * 1.5) + 1
    ctl.on_success(5.0)
    assert ctl.concurrency_limit() == 8
    for rate in (0.05, 1.0, 7.0, 49.0):
        for latency in (0.001, 0.2, 3.0, 60.0):
            ctl.rate, ctl.latency = rate, latency
            assert 1 <= ctl.concurrency_limit() <= 8
    one, _ = controller(start=40.0, connections=1)
    one.on_success(2.0)
    assert one.concurrency_limit() == 1


# ---------------------------------------------------------------- parse_retry_after


def test_parse_retry_after_table() -> None:
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 7 ") == 7.0
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now_epoch=now - 10) == pytest.approx(10.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now_epoch=now + 10) == 0.0


# ---------------------------------------------------------------- robots.txt

ROBOTS = """
User-agent: distributed-downloader
Disallow: /private/
Crawl-delay: 2

User-agent: *
Disallow: /
Crawl-delay: 10
Request-rate: 1/20
"""


def test_robots_rules_for_our_token_and_for_others() -> None:
    ours = RobotsRules(ROBOTS, TOKEN)
    theirs = RobotsRules(ROBOTS, "someotherbot")
    assert ours.allowed("http://h.org/img/1.jpg")
    assert not ours.allowed("http://h.org/private/1.jpg")
    assert not theirs.allowed("http://h.org/img/1.jpg")
    assert ours.crawl_delay() == 2.0
    assert theirs.crawl_delay() == 10.0
    assert ours.request_rate() == pytest.approx(0.5)
    assert theirs.request_rate() == pytest.approx(0.05)  # Request-rate 1/20 is stricter than 1/10


def test_robots_star_group_applies_when_we_are_not_named() -> None:
    rules = RobotsRules("User-agent: *\nDisallow: /private/\nCrawl-delay: 4\n", TOKEN)
    assert rules.allowed("http://h.org/img/1.jpg")
    assert not rules.allowed("http://h.org/private/x.jpg")
    assert rules.crawl_delay() == 4.0
    assert rules.request_rate() == pytest.approx(0.25)


def test_robots_request_rate_stricter_than_crawl_delay() -> None:
    rules = RobotsRules(f"User-agent: {TOKEN}\nCrawl-delay: 1\nRequest-rate: 1/5\n", TOKEN)
    assert rules.request_rate() == pytest.approx(0.2)


@pytest.mark.parametrize("text", [None, ""])
def test_no_robots_allows_everything(text: str | None) -> None:
    rules = RobotsRules(text, TOKEN)
    assert rules.allowed("http://h.org/anything")
    assert rules.crawl_delay() is None
    assert rules.request_rate() is None


def test_robots_without_delays() -> None:
    rules = RobotsRules("User-agent: *\nDisallow:\n", TOKEN)
    assert rules.allowed("http://h.org/x")
    assert rules.crawl_delay() is None
    assert rules.request_rate() is None


# ---------------------------------------------------------------- against a hidden token bucket


def simulate(
    limit: float, latency: float, seconds: float = 120.0, start: float = 3.0, ceiling: float = 50.0
) -> list[tuple[float, bool]]:
    """One lane against a server with a hidden token bucket (rate `limit`, burst `limit`).

    The sender reserves a slot, waits for it (responses that arrive meanwhile are fed back at
    their own time), sends; the server answers 200, or 429 + Retry-After: 1 when the bucket is
    empty; the answer reaches the controller `latency` seconds later. Returns (start, accepted).
    """
    ctl, clock = controller(start=start, ceiling=ceiling)
    t0 = clock.t
    tokens, stamp = limit, t0
    pending: list[tuple[float, bool]] = []
    log: list[tuple[float, bool]] = []
    while True:
        send = clock.t + ctl.reserve()
        while pending and pending[0][0] <= send:
            at, ok = heapq.heappop(pending)
            clock.t = at
            if ok:
                ctl.on_success(latency, {})
            else:
                ctl.on_status(429, {"Retry-After": "1"}, latency)
        clock.t = send
        if send - t0 >= seconds:
            return [(s - t0, ok) for s, ok in log]
        tokens = min(limit, tokens + (send - stamp) * limit)
        stamp = send
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        log.append((send, ok))
        heapq.heappush(pending, (send + latency, ok))


@pytest.mark.parametrize(("limit", "latency"), [(20.0, 0.0), (20.0, 0.05), (20.0, 0.3), (5.0, 0.1), (40.0, 0.1)])
def test_controller_converges_just_below_a_hidden_limit(limit: float, latency: float) -> None:
    log = simulate(limit, latency)
    accepted_last_minute = sum(1 for t, ok in log if t >= 60.0 and ok) / 60.0
    rejected_share = sum(1 for _, ok in log if not ok) / len(log)
    assert accepted_last_minute >= 0.75 * limit, f"accepted {accepted_last_minute:.2f}/s of {limit}"
    assert rejected_share <= 0.03, f"429 share {rejected_share:.2%}"
    # the server's limit is respected on average: accepted never beyond what the bucket allows
    assert accepted_last_minute <= limit + 1e-9
