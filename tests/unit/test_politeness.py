"""Tests for per-server politeness: pacing, congestion control, signals, pauses, connection caps.

Every RateController here runs on a fake clock: no test sleeps. Each rule of politeness.py's
docstring has a test, and the whole controller is run against simulated servers that enforce
hidden token buckets, connection caps and a background of per-URL faults.
"""

from __future__ import annotations

import email.utils
import heapq
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import pytest

from distributed_downloader.net.politeness import (
    LaneLimits,
    RateController,
    advertised_rate,
    exhausted_pause,
    header,
    lane_connections,
    parse_retry_after,
)


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


WALL = 1_800_000_000.0  # the fake wall clock is the fake monotonic one shifted


def controller(
    start: float = 4.0,
    ceiling: float = 50.0,
    connections: int = 8,
    share: float = 1.0,
    decrease: float = 0.3,
    level: float | None = None,
) -> tuple[RateController, FakeClock]:
    clock = FakeClock()
    limits = LaneLimits(start_rate=start, ceiling=ceiling, max_connections=connections, decrease=decrease, level=level)
    return RateController(limits, clock=clock, share=share, wall_clock=lambda: clock.t + WALL), clock


def send_saturated(ctl: RateController, clock: FakeClock, seconds: float, answer: int | None = 200) -> list[float]:
    """A sender that always has work: each request starts as soon as its slot comes. Start times."""
    starts = []
    end = clock.t + seconds
    while clock.t < end:
        wait = ctl.try_take()
        if wait > 0:
            clock.advance(wait)
            continue
        starts.append(clock.t)
        if answer is not None:
            ctl.on_response(answer, {}, 0.01, clock.t)
    return starts


# ---------------------------------------------------------------- pacing and growth


def test_slots_are_spaced_by_one_over_rate_and_taken_only_when_due() -> None:
    ctl, clock = controller(start=4.0)
    assert ctl.try_take() == 0.0
    assert ctl.try_take() == pytest.approx(0.25)  # nothing taken: the caller waits and asks again
    assert ctl.try_take() == pytest.approx(0.25)
    clock.advance(0.25)
    assert ctl.try_take() == 0.0


def test_idle_time_is_not_banked_as_credit() -> None:
    ctl, clock = controller(start=4.0)
    ctl.try_take()
    clock.advance(10.0)
    assert ctl.try_take() == 0.0
    assert ctl.try_take() == pytest.approx(0.25)


def test_slow_start_grows_when_saturated() -> None:
    ctl, clock = controller(start=4.0)
    send_saturated(ctl, clock, 3.0)
    assert ctl.rate > 4.0 * 1.5**2  # ~x1.5 per saturated second


def test_no_growth_when_idle_or_lightly_used() -> None:
    ctl, clock = controller(start=4.0)
    for _ in range(20):
        clock.advance(1.0)
        assert ctl.try_take() == 0.0
    assert ctl.rate == 4.0


@pytest.mark.parametrize(("start", "ceiling"), [(1.0, 5.0), (3.0, 3.0), (40.0, 50.0)])
def test_ceiling_never_exceeded(start: float, ceiling: float) -> None:
    ctl, clock = controller(start=start, ceiling=ceiling)
    starts = send_saturated(ctl, clock, 60.0)
    assert ctl.rate <= ceiling
    later = [t for t in starts if t >= starts[0] + 30]
    assert len(later) <= ceiling * (later[-1] - later[0]) + 2


def test_remembered_level_skips_slow_start() -> None:
    ctl, clock = controller(start=10.0, level=10.0)
    assert not ctl.slow_start
    send_saturated(ctl, clock, 3.0)
    assert ctl.rate < 10.0 * 1.2  # probing near a known level, not doubling


# ---------------------------------------------------------------- signals, classified


@pytest.mark.parametrize("status", [404, 410, 500, 502, 504, 400, 401, 451])
def test_per_url_faults_never_lower_the_rate(status: int) -> None:
    ctl, clock = controller(start=10.0)
    for _ in range(3):  # a lone fault, and a few scattered among successes
        ctl.on_response(status, {}, 0.05, clock.t)
        for _ in range(5):
            ctl.on_response(200, {}, 0.05, clock.t)
    ctl.on_network_error(clock.t)
    assert ctl.rate == 10.0
    assert ctl.events["congestion"] == 0


def test_a_one_in_five_background_of_resets_never_lowers_the_rate() -> None:
    ctl, clock = controller(start=10.0)
    rng = random.Random(1)
    for _ in range(2000):
        clock.advance(0.01)
        if rng.random() < 0.2:
            ctl.on_network_error(clock.t)
        else:
            ctl.on_response(200, {}, 0.05, clock.t)
    assert ctl.events["congestion"] == 0


def test_a_burst_of_network_failures_across_urls_is_congestion() -> None:
    ctl, clock = controller(start=10.0)
    for _ in range(8):
        clock.advance(0.05)
        ctl.on_network_error(clock.t)
    assert ctl.rate == pytest.approx(10.0 * 0.7)  # rate_multiplier: the accepted rate tells nothing here


def test_a_burst_of_5xx_is_congestion() -> None:
    ctl, clock = controller(start=10.0)
    for _ in range(16):
        clock.advance(0.05)
        ctl.on_response(500, {}, 0.05, clock.t)
    assert ctl.rate < 10.0


@pytest.mark.parametrize("status", [429, 503])
def test_a_refusal_sets_the_rate_just_below_what_the_server_accepted(status: int) -> None:
    """A 503 without Retry-After (nginx's limit_req) is 'too many requests', like a 429."""
    ctl, clock = controller(start=20.0, level=20.0)  # past slow start, sending 20/s
    accepted_per_second = 12
    for _ in range(3):  # the server accepted 12 of every 20 and refused the rest
        for i in range(20):
            clock.advance(0.05)
            if i < accepted_per_second:
                ctl.on_response(200, {}, 0.05, clock.t)
            else:
                ctl.on_response(status, {}, 0.05, clock.t - 10)  # old sends: reaction once
    ctl.on_response(status, {}, 0.05, clock.t)
    assert ctl.rate == pytest.approx(accepted_per_second * 0.95, rel=0.1)
    assert ctl.connection_cap is None  # a bare 503 caps nothing by itself


def test_one_reaction_per_event_refusals_sent_before_it_are_not_news() -> None:
    ctl, clock = controller(start=20.0, level=20.0)
    ctl.on_response(429, {}, 0.05, clock.t)
    after_first = ctl.rate
    for _ in range(5):  # answers to requests sent before that reaction
        ctl.on_response(429, {}, 0.05, clock.t - 0.01)
    assert ctl.rate == after_first
    clock.advance(0.5)
    ctl.on_response(429, {}, 0.05, clock.t)  # sent after it: a new event
    assert ctl.rate < after_first


def test_first_refusal_after_a_quiet_spell_steps_down_at_most_ten_percent() -> None:
    ctl, clock = controller(start=20.0, level=20.0)
    send_saturated(ctl, clock, 20.0)  # 20 s of acceptance
    rate = ctl.rate
    ctl.on_response(429, {}, 0.05, clock.t)
    assert rate * 0.85 <= ctl.rate < rate


def test_a_decrease_reaches_the_very_next_slot() -> None:
    ctl, clock = controller(start=10.0, level=10.0)
    assert ctl.try_take() == 0.0
    clock.advance(0.01)
    ctl.on_response(429, {}, 0.05, clock.t)
    assert ctl.try_take() >= 1.0 / ctl.rate - 1e-9


def test_rate_never_drops_below_the_floor() -> None:
    ctl, clock = controller(start=4.0)
    for _ in range(200):
        clock.advance(5.0)
        ctl.on_response(429, {}, 0.05, clock.t)
    assert ctl.rate >= ctl.floor > 0


def test_latency_rising_under_load_is_congestion() -> None:
    ctl, clock = controller(start=10.0, level=10.0)
    for _ in range(32):
        clock.advance(0.1)
        ctl.on_response(200, {}, 0.05, clock.t)
    for _ in range(300):
        clock.advance(0.1)
        ctl.on_response(200, {}, 3.0, clock.t)
    assert ctl.rate < 10.0


# ---------------------------------------------------------------- pauses


@pytest.mark.parametrize("name", ["Retry-After", "retry-after", "RETRY-AFTER", "rEtRy-AfTeR"])
def test_retry_after_in_any_case_pauses_every_next_request(name: str) -> None:
    ctl, clock = controller(start=10.0)
    ctl.on_response(429, {name: "5"}, 0.05, clock.t)
    assert ctl.try_take() == pytest.approx(5.0)
    assert ctl.paused_for() == pytest.approx(5.0)
    clock.advance(5.0)
    assert ctl.try_take() == 0.0


def test_retry_after_on_a_503_and_on_a_success_pauses_too() -> None:
    ctl, clock = controller(start=10.0)
    ctl.on_response(200, {"Retry-After": "3"}, 0.05, clock.t)
    assert ctl.try_take() == pytest.approx(3.0)


def test_retry_after_http_date() -> None:
    ctl, clock = controller(start=10.0)
    when = email.utils.formatdate(clock.t + WALL + 30, usegmt=True)
    ctl.on_response(429, {"Retry-After": when}, 0.05, clock.t)
    assert 28.0 <= ctl.try_take() <= 30.5


def test_long_retry_after_is_kept_whole_the_lane_decides_to_give_up() -> None:
    ctl, clock = controller(start=10.0)
    ctl.on_response(429, {"Retry-After": "86400"}, 0.05, clock.t)
    assert ctl.paused_for() == pytest.approx(86400.0)


def test_acquire_waits_for_its_slot_or_refuses_a_long_pause() -> None:
    ctl, clock = controller(start=4.0)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    assert ctl.acquire(max_wait=10.0, sleep=sleep)
    assert ctl.acquire(max_wait=10.0, sleep=sleep)
    assert sum(slept) == pytest.approx(0.25)
    ctl.on_response(429, {"Retry-After": "100"}, 0.05, clock.t)
    assert not ctl.acquire(max_wait=10.0, sleep=sleep)


def test_acquire_with_a_connection_waits_for_one_to_be_free() -> None:
    """A redirect hop to a budget of one connection waits while another request holds it, up to max_wait."""
    ctl, clock = controller(start=4.0, connections=1)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    ticket, _ = ctl.started()
    assert not ctl.acquire(max_wait=2.0, sleep=sleep, connection=True)
    assert 2.0 <= sum(slept) <= 2.1
    ctl.finished(ticket)
    assert ctl.acquire(max_wait=2.0, sleep=sleep, connection=True)


@pytest.mark.parametrize(
    "value", ["Mon, 01 Jan 2024 99999999999999999999:00:00 GMT", "Mon, 01 Jan 2024 00:00:00 -99999999999999999999"]
)
def test_a_retry_after_date_that_overflows_is_no_date(value: str) -> None:
    """It used to raise OverflowError out of on_response: the answer became an internal error, its pause ignored."""
    assert parse_retry_after(value) is None
    ctl, clock = controller()
    ctl.on_response(429, {"Retry-After": value}, 0.05, clock.t)
    assert ctl.events["congestion"] == 1


def test_a_lower_cap_spaces_the_next_slot_from_the_last_one() -> None:
    """robots.txt's fetch took a slot at 5 req/s, its Crawl-delay of 2 s caps the rate: the next slot is 2 s on."""
    ctl, clock = controller(start=5.0, ceiling=5.0)
    assert ctl.try_take() == 0
    ctl.cap_rate(0.5)
    assert ctl.try_take() == pytest.approx(2.0)


def test_pause_relayed_from_another_lane_as_wall_clock_time() -> None:
    ctl, clock = controller(start=10.0)
    ctl.pause_until(clock.t + WALL + 7.0)
    assert ctl.try_take() == pytest.approx(7.0)
    assert ctl.paused_until_epoch() == pytest.approx(clock.t + WALL + 7.0)


def test_quota_exhausted_pauses_until_reset() -> None:
    ctl, clock = controller(start=10.0)
    ctl.on_response(200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "7"}, 0.05, clock.t)
    assert ctl.try_take() == pytest.approx(7.0)
    other, clock2 = controller(start=10.0)
    other.on_response(200, {"RateLimit-Remaining": "3", "RateLimit-Reset": "7"}, 0.05, clock2.t)
    assert other.try_take() == 0.0


def test_a_burst_of_403s_is_a_ban_a_lone_403_is_a_forbidden_file() -> None:
    ctl, clock = controller(start=10.0)
    for _ in range(4):
        ctl.on_response(403, {}, 0.05, clock.t)
    ctl.on_response(200, {}, 0.05, clock.t)  # a success breaks the streak
    for _ in range(4):
        ctl.on_response(403, {}, 0.05, clock.t)
    assert not ctl.is_banned() and ctl.rate == 10.0
    ctl.on_response(403, {}, 0.05, clock.t)  # the fifth in a row
    assert ctl.is_banned()
    assert ctl.paused_for() == pytest.approx(RateController.BAN_PAUSE)
    assert ctl.rate < 10.0


# ---------------------------------------------------------------- advertised limits


@pytest.mark.parametrize(
    ("headers", "share", "cap"),
    [
        ({"RateLimit-Policy": "4;w=1"}, 1.0, 4.0),
        ({"ratelimit-policy": '"burst";q=100;w=50'}, 1.0, 2.0),
        ({"X-RateLimit-Limit": "60", "X-RateLimit-Window": "60"}, 0.5, 0.5),
    ],
)
def test_advertised_limits_cap_the_rate_with_the_lane_share(headers: dict, share: float, cap: float) -> None:
    ctl, clock = controller(start=20.0, share=share)
    ctl.on_response(200, headers, 0.05, clock.t)
    assert ctl.rate == pytest.approx(cap)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"RateLimit-Policy": "10;w=1"}, 10.0),
        ({"RateLimit-Policy": "10 ; w = 2"}, 5.0),
        ({"RateLimit-Policy": "bogus, 50;w=10"}, 5.0),
        ({"RateLimit-Policy": '"a";q=100;w=10, "b";q=1000;w=3600'}, 1000 / 3600),
        ({"RateLimit-Policy": "10;w=0"}, None),
        ({"X-RateLimit-Limit": "1000"}, None),  # per what? an hour as often as a second: not a rate
        ({"X-RateLimit-Limit": "lots"}, None),
        ({"x-ratelimit-limit": "60", "x-ratelimit-window": "60"}, 1.0),
        ({"X-RateLimit-Limit": "100;w=10"}, 10.0),
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
        ({"ratelimit-remaining": "0", "RATELIMIT-RESET": "2.5"}, 2.5),
        ({"X-RateLimit-Remaining": "1", "X-RateLimit-Reset": "12"}, None),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "99999"}, 99999.0),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "soon"}, None),
        ({"RateLimit": '"default";r=0;t=9'}, 9.0),
        ({"RateLimit": '"default";r=5;t=9'}, None),
    ],
)
def test_exhausted_pause_table(headers: dict, expected: float | None) -> None:
    assert exhausted_pause(headers) == expected


def test_exhausted_pause_with_epoch_reset() -> None:
    pause = exhausted_pause({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(time.time()) + 20)})
    assert pause is not None and 18.0 <= pause <= 20.5


def test_header_lookup_ignores_case() -> None:
    assert header({"RETRY-after": "3"}, "Retry-After") == "3"
    assert header(None, "Retry-After") is None


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


# ---------------------------------------------------------------- connections


def test_concurrency_follows_rate_times_latency_within_the_share() -> None:
    ctl, clock = controller(start=4.0, connections=8)
    assert ctl.concurrency_limit() == 2  # ceil(4 * 0.05 * 1.5) + 1
    for _ in range(10):
        ctl.on_response(200, {}, 0.5, clock.t)
    assert ctl.concurrency_limit() == 4  # ceil(4 * 0.5 * 1.5) + 1
    for _ in range(40):
        ctl.on_response(200, {}, 5.0, clock.t)
    assert ctl.concurrency_limit() == 8
    one, _ = controller(start=40.0, connections=1)
    assert one.concurrency_limit() == 1


def test_stalled_requests_do_not_starve_the_others_but_the_share_holds() -> None:
    ctl, clock = controller(start=4.0, connections=4)
    tickets = [ctl.started()[0] for _ in range(2)]
    base = ctl.concurrency_limit()
    clock.advance(30.0)  # both stuck far beyond the usual latency
    assert ctl.concurrency_limit() == min(4, base + 2)
    for ticket in tickets:
        ctl.finished(ticket)
    assert ctl.in_flight == 0


def test_a_silent_server_gets_no_more_requests_until_it_answers() -> None:
    """ACK clocking: requests waiting beyond SILENCE_MIN with nothing answered hold the next one back."""
    ctl, clock = controller(start=20.0, connections=8)
    open_limit = ctl.concurrency_limit()  # ceil(20 * 0.05 * 1.5) + 1
    assert open_limit == 3
    ctl.started()
    clock.advance(0.02)
    ctl.started()
    assert ctl.concurrency_limit() == open_limit  # answers are not due yet
    clock.advance(RateController.SILENCE_MIN + 0.05)  # a stalled server: nothing comes back
    assert ctl.concurrency_limit() == 2  # the two in flight, no third
    assert ctl.events["silences"] == 1
    ctl.on_response(200, {}, 0.2, clock.t, wire_latency=0.2)
    assert ctl.concurrency_limit() > 2  # it answered: the clock ticks again


def test_silence_holds_each_late_request_for_a_while_only() -> None:
    """One stuck URL on a slow host must not stop it: after SILENCE_HOLD the next request goes."""
    ctl, clock = controller(start=2.0, connections=8)
    ctl.started()
    gap = ctl._silence_gap()
    assert gap == pytest.approx(2 / 2.0)  # two intervals of our rate: answers to a 2/s lane come that far apart
    clock.advance(gap - 0.01)
    assert ctl.concurrency_limit() > 1  # not silent yet
    clock.advance(0.02)
    assert ctl.concurrency_limit() == 1
    clock.advance(RateController.SILENCE_HOLD)
    assert ctl.concurrency_limit() > 1


def test_answers_flowing_around_one_stuck_url_are_no_silence() -> None:
    ctl, clock = controller(start=20.0, connections=8)
    ctl.started()  # stuck for good
    limits = []
    for _ in range(20):
        ticket, _ = ctl.started()
        clock.advance(0.05)
        ctl.on_response(200, {}, 0.05, clock.t, wire_latency=0.05)
        ctl.finished(ticket)
        limits.append(ctl.concurrency_limit())
    assert min(limits) > ctl.in_flight == 1
    assert ctl.events["silences"] == 0


def _one_sent_at_4_per_second() -> tuple[RateController, FakeClock, list[float]]:
    """A 4/s lane past slow start whose first request just left the wire; the list gets its waits."""
    ctl, clock = controller(start=4.0, ceiling=4.0)
    ctl.slow_start = False
    slept: list[float] = []
    ctl.space_send(slept.append)
    return ctl, clock, slept


def test_a_late_answer_spaces_the_next_request_from_the_answer() -> None:
    """The server counted a late request when it answered it: the next goes one interval after that."""
    ctl, clock, slept = _one_sent_at_4_per_second()
    clock.advance(0.6)
    ctl.on_response(200, {}, 0.6, clock.t, wire_latency=0.6)
    ctl.space_send(slept.append)
    assert slept == [pytest.approx(0.25)]
    clock.advance(0.6)
    slept.clear()
    ctl.on_response(200, {}, 0.01, clock.t, wire_latency=0.01)  # on time: our own spacing only
    ctl.space_send(slept.append)
    assert slept == []


def test_a_write_that_left_late_moves_the_next_one_back() -> None:
    ctl, clock, slept = _one_sent_at_4_per_second()
    clock.advance(0.1)
    ctl.wrote(0.1)  # the GIL held the write 0.1 s after the spacing let it go
    clock.advance(0.2)  # one interval after the spacing let it go, 0.15 s after the real write
    ctl.space_send(slept.append)
    assert slept == [pytest.approx(0.05)]  # one interval after the real write


def _usual_answers(ctl: RateController, clock: FakeClock, interval: float) -> None:
    for _ in range(10):  # the usual: answers 10 ms after the write
        ctl.space_send(lambda seconds: clock.advance(seconds))
        clock.advance(0.01)
        ctl.on_response(200, {}, 0.01, clock.t, wire_latency=0.01)
        clock.advance(interval - 0.01)


def _wait_after_a_late_answer(ctl: RateController, clock: FakeClock, late: float) -> list[float]:
    slept: list[float] = []
    ctl.space_send(slept.append)
    clock.advance(0.01 + late)
    ctl.on_response(200, {}, 0.01 + late, clock.t, wire_latency=0.01 + late)
    clock.advance(1.0 / ctl.rate - 0.01 - late)  # the next one's turn by our own spacing
    ctl.space_send(slept.append)
    return [seconds for seconds in slept if seconds > 1e-9]  # float dust is no wait


def test_after_jitter_an_answer_later_than_usual_moves_the_next_request_back() -> None:
    """A burst-of-one server: once it refused us below its level, lateness is taken as its reading time."""
    ctl, clock = controller(start=20.0, ceiling=20.0)
    ctl.slow_start = False
    _usual_answers(ctl, clock, 0.05)
    assert _wait_after_a_late_answer(ctl, clock, 0.03) == []  # a fast server: its burst absorbs it
    ctl.tight_burst = True  # what a jitter refusal sets (see the jitter tests)
    _usual_answers(ctl, clock, 0.05)
    assert _wait_after_a_late_answer(ctl, clock, 0.03) == [pytest.approx(0.03)]


def test_answers_late_by_ordinary_jitter_cost_nothing_on_a_server_that_never_refused_us_below_its_level() -> None:
    """Time to first byte varies by tens of ms on real servers: moving each next request back by it
    cost 7-8% of a slow lane's rate (fresh-eyes hunt), for servers whose burst absorbs it anyway."""
    ctl, clock = controller(start=2.0, ceiling=2.0)
    ctl.slow_start = False
    _usual_answers(ctl, clock, 0.5)
    assert _wait_after_a_late_answer(ctl, clock, 0.05) == []


def test_a_late_write_to_a_fast_server_costs_nothing_until_it_refused_us_below_its_level() -> None:
    ctl, clock = controller(start=40.0, ceiling=40.0)
    ctl.slow_start = False
    ctl.wrote(0.0)
    ctl.space_send(lambda seconds: None)
    ctl.wrote(0.005)
    assert ctl.wire_tokens == pytest.approx(0.0) and ctl.next_start == 0.0
    ctl.tight_burst = True
    ctl.space_send(lambda seconds: None)  # at the same instant: -1 token
    ctl.wrote(0.005)
    assert ctl.wire_tokens < -1 and ctl.next_start > clock.t


def test_connection_cap_is_learned_only_from_evidence_and_recovers() -> None:
    ctl, clock = controller(start=20.0, connections=8, level=20.0)
    for _ in range(30):  # requests with 1-2 in flight pass
        clock.advance(0.05)
        ctl.on_response(200, {}, 0.05, clock.t, concurrency=2)
    for _ in range(3):  # with 3 or more in flight every one is refused
        clock.advance(0.05)
        ctl.on_response(503, {}, 0.05, clock.t - 5, concurrency=3)
    assert ctl.connection_cap == 2
    assert ctl.concurrency_limit() <= 2
    clock.advance(RateController.CAP_RECOVERY_SECONDS + 1)
    ctl.on_response(200, {}, 0.05, clock.t, concurrency=2)
    assert ctl.connection_cap == 3


def test_token_bucket_refusals_at_any_concurrency_cap_nothing() -> None:
    ctl, clock = controller(start=20.0, connections=8, level=20.0)
    rng = random.Random(3)
    for _ in range(400):
        clock.advance(0.05)
        concurrency = rng.choice([1, 2, 3])
        status = 429 if rng.random() < 0.05 else 200
        ctl.on_response(status, {}, 0.05, clock.t, concurrency=concurrency)
    assert ctl.connection_cap is None


@pytest.mark.parametrize(("connections", "lanes"), [(8, 1), (8, 3), (8, 8), (5, 2), (40, 7)])
def test_lane_connection_shares_add_up_to_the_server_cap(connections: int, lanes: int) -> None:
    shares = [lane_connections(connections, lanes, i) for i in range(lanes)]
    assert sum(shares) == connections
    assert min(shares) >= 1


def test_memory_round_trip() -> None:
    ctl, clock = controller(start=20.0, level=20.0)
    ctl.on_response(429, {"Retry-After": "9"}, 0.05, clock.t)
    state = ctl.state()
    assert state.rate == ctl.rate and state.level == ctl.level
    assert state.paused_until_epoch == pytest.approx(clock.t + WALL + 9)


# ---------------------------------------------------------------- against simulated servers


@dataclass
class Server:
    """A hidden token bucket (rate, burst), an optional connection cap, and per-URL faults."""

    rate: float
    burst: float
    refusal: int = 429
    connection_cap: int | None = None
    faults: float = 0.02  # share of URLs that fail on their own (404 or reset)
    tokens: float = field(init=False)
    stamp: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def answer(self, now: float, concurrency: int, rng: random.Random) -> int | str:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.connection_cap is not None and concurrency > self.connection_cap:
            return 503
        if self.tokens < 1:
            return self.refusal
        self.tokens -= 1
        u = rng.random()
        return "reset" if u < self.faults / 2 else (404 if u < self.faults else 200)


def simulate(
    server: Server,
    lanes: int = 1,
    latency: float = 0.05,
    seconds: float = 120.0,
    start: float = 3.0,
    relay: bool = False,
    retry_after: bool = False,
    seed: int = 7,
    controllers: list[RateController] | None = None,
    level: float | None = None,
    level_guessed: bool = False,
) -> list[tuple[float, int | str]]:
    """`lanes` controllers (one server's lanes, each with its share) sending as fast as allowed.

    ``relay``: a lane's congestion reaches the others at once (what worker._relay_pauses does
    through rank 0, some 50 ms later). ``retry_after``: each refusal says when a token is back, in
    whole seconds (at least 1: what a token bucket with Retry-After answers). ``controllers``:
    filled with the lanes' controllers, to look at what they learned.
    """
    rng = random.Random(seed)
    clock = FakeClock()
    server.stamp = clock.t
    share = 1.0 / lanes
    ctls = [
        RateController(
            LaneLimits(
                start * share,
                80.0 * share,
                lane_connections(8, lanes, i),
                floor=share / 30,
                level=None if level is None else level * share,
            ),
            clock=clock,
            share=share,
            wall_clock=lambda: clock.t + WALL,
        )
        for i in range(lanes)
    ]
    for ctl in ctls:
        ctl.level_guessed = level_guessed
    if controllers is not None:
        controllers.extend(ctls)
    pending: list[tuple[float, int, int, int | str, float, int, int, dict]] = []
    log: list[tuple[float, int | str]] = []
    order = 0
    in_flight = [0] * lanes
    told = [0] * lanes
    t0 = clock.t
    while clock.t - t0 < seconds:
        waits = []
        for i, ctl in enumerate(ctls):
            if in_flight[i] >= ctl.concurrency_limit():
                continue
            wait = ctl.try_take()
            if wait > 0:
                waits.append(wait)
                continue
            ticket, concurrency = ctl.started()
            in_flight[i] += 1
            total = sum(in_flight)
            outcome = server.answer(clock.t, total, rng)
            headers = {}
            if retry_after and outcome in (429, 503):
                headers = {"Retry-After": str(max(1, math.ceil((1.0 - server.tokens) / server.rate)))}
            log.append((clock.t - t0, outcome))
            order += 1
            done = clock.t + latency * rng.uniform(0.5, 1.5)
            heapq.heappush(pending, (done, order, i, outcome, clock.t, ticket, concurrency, headers))
            waits.append(0.0)
        nxt = clock.t + min([w for w in waits if w > 0] or [0.01])
        if pending and pending[0][0] <= nxt:
            done, _, i, outcome, sent, ticket, concurrency, headers = heapq.heappop(pending)
            clock.t = max(clock.t, done)
            ctl = ctls[i]
            if outcome == "reset":
                ctl.on_network_error(sent)
            else:
                ctl.on_response(int(outcome), headers, latency, sent, concurrency)
            ctl.finished(ticket)
            in_flight[i] -= 1
            if relay and ctl.congestion_count() > told[i] and ctl.level is not None:
                told[i] = ctl.congestion_count()
                for other in ctls:
                    if other is not ctl:
                        other.sibling_level(ctl.level / ctl.share, ctl.level_guessed)
        elif not any(w == 0.0 for w in waits):
            clock.t = nxt
    return log


def worst_window(times: list[float]) -> int:
    best = left = 0
    for right, t in enumerate(times):
        while t - times[left] >= 1.0:
            left += 1
        best = max(best, right - left + 1)
    return best


@pytest.mark.parametrize(
    ("rate", "burst", "refusal", "latency"),
    [
        (66.0, 16.0, 429, 0.05),
        (40.0, 10.0, 503, 0.02),
        (20.0, 5.0, 429, 0.1),
        (20.0, 10.0, 503, 0.3),
        (10.0, 3.0, 503, 0.05),
        (5.0, 2.0, 429, 0.1),
    ],
)
def test_converges_and_holds_just_below_a_hidden_limit_despite_faults(
    rate: float, burst: float, refusal: int, latency: float
) -> None:
    log = simulate(Server(rate, burst, refusal, faults=0.03), latency=latency)
    accepted_second_half = sum(1 for t, o in log if t >= 60.0 and o not in (429, 503)) / 60.0
    refused = sum(1 for _, o in log if o in (429, 503))
    assert accepted_second_half >= 0.88 * rate, f"held {accepted_second_half:.2f}/s of {rate}"
    assert refused <= max(3, 0.005 * len(log)), f"{refused} refusals of {len(log)}"
    assert worst_window([t for t, _ in log]) <= rate + burst + 1


def test_two_lanes_of_one_server_stay_within_its_limits_together() -> None:
    server = Server(30.0, 8.0, 503, faults=0.02)
    log = simulate(server, lanes=2, latency=0.05)
    accepted_second_half = sum(1 for t, o in log if t >= 60.0 and o not in (429, 503)) / 60.0
    assert accepted_second_half >= 0.85 * 30.0
    assert worst_window([t for t, _ in log]) <= 30.0 + 8.0 + 1
    assert sum(1 for _, o in log if o in (429, 503)) <= 0.01 * len(log)


def test_a_connection_cap_holds_refusals_down() -> None:
    log = simulate(Server(60.0, 30.0, 429, connection_cap=2, faults=0.0), latency=0.1)
    refused = sum(1 for _, o in log if o == 503)
    assert refused <= 0.02 * len(log)
    assert sum(1 for t, o in log if t >= 60.0 and o == 200) / 60.0 >= 10.0  # ~2 connections / 0.1 s


def test_a_level_measured_under_load_is_not_held_for_minutes() -> None:
    """A lane slowed to 4/s by refusals under load, on a server that took 20/s from it before, climbs back."""
    ctl, clock = controller(start=20.0, level=20.0)
    send_saturated(ctl, clock, 4.0)  # the server accepts 20/s: that is its peak for this lane
    assert ctl.peak >= 15.0
    ctl.level, ctl.rate, ctl.last_decrease = 4.0, 3.8, clock.t  # a level measured while the lane was starved
    send_saturated(ctl, clock, 20.0)  # no refusal since
    assert ctl.rate >= 12.0, ctl.rate


def test_a_correct_level_is_held_with_few_probes() -> None:
    ctl, clock = controller(start=20.0, level=20.0)
    ctl.rate = 19.0
    send_saturated(ctl, clock, 30.0)
    assert ctl.rate <= 20.0 * 1.05


def test_concurrency_limit_survives_a_request_finishing_while_it_counts() -> None:
    """The lane thread calls concurrency_limit() without the lock while fetch threads call finished().

    A request finishing mid-count used to raise 'dictionary changed size during iteration' in the
    lane thread, which ends the whole MPI job. The interleaving is forced here: the first send time
    compared is the moment another thread finishes a request.
    """
    ctl, clock = controller(start=4.0, connections=8)
    tickets = [ctl.started()[0] for _ in range(4)]

    class FinishesOne(float):
        def __rsub__(self, other: float) -> float:
            if tickets:
                ctl.finished(tickets.pop())
            return float(other) - float(self)

    ctl._flying = {ticket: FinishesOne(sent) for ticket, sent in ctl._flying.items()}
    clock.advance(30.0)
    assert 1 <= ctl.concurrency_limit() <= 8
    assert ctl.in_flight == 0


# ---------------------------------------------------------------- jitter on slow, burst-of-one servers


def simulate_jittered(
    rate: float, jitter: float, seconds: float = 120.0, seed: int = 5, burst: float = 1.0, latency: float = 0.02
) -> list[tuple[float, int]]:
    """One lane against a token bucket (default: a burst of one) whose arrivals are delayed 0..jitter s.

    A busy server (or our own busy CPU) delays some requests more than others: two sends a full
    interval apart can arrive closer than the interval, and a burst of one refuses the second.
    Returns (arrival time, status) per request.
    """
    rng = random.Random(seed)
    clock = FakeClock()
    ctl = RateController(
        LaneLimits(3.0, 80.0, 8, floor=1 / 30), clock=clock, wall_clock=lambda: clock.t + WALL, name="jittered"
    )
    t0 = clock.t
    tokens, stamp = burst, t0
    events: list[tuple[float, int, str, float, int]] = []  # (time, order, kind, sent, ticket)
    order = 0
    log: list[tuple[float, int]] = []
    while clock.t - t0 < seconds:
        wait = ctl.try_take()
        if wait <= 0:
            ticket, _ = ctl.started()
            order += 1
            heapq.heappush(events, (clock.t + rng.uniform(0.0, jitter), order, "arrive", clock.t, ticket))
            continue
        due = clock.t + wait
        while events and events[0][0] <= due:
            when, _, kind, sent, ticket = heapq.heappop(events)
            clock.t = max(clock.t, when)
            if kind == "arrive":
                tokens = min(burst, tokens + (when - stamp) * rate)
                stamp = when
                status = 200 if tokens >= 1.0 else 429
                if status == 200:
                    tokens -= 1.0
                log.append((when - t0, status))
                order += 1
                heapq.heappush(events, (when + latency, order, f"done{status}", sent, ticket))
            else:
                ctl.on_response(int(kind[4:]), {}, clock.t - sent, sent, 1)
                ctl.finished(ticket)
        clock.t = max(clock.t, due)
    return log


@pytest.mark.parametrize(("rate", "jitter"), [(2.0, 0.05), (2.5, 0.08), (4.0, 0.04)])
def test_jitter_refusals_do_not_ratchet_a_slow_server_down(rate: float, jitter: float) -> None:
    """A burst-of-one server with arrival jitter is run near the rate its jitter allows, refusals kept rare."""
    log = simulate_jittered(rate, jitter)
    accepted_second_half = sum(1 for t, s in log if t >= 60.0 and s == 200) / 60.0
    refused = sum(1 for _, s in log if s == 429)
    assert accepted_second_half >= 0.8 * rate, f"held {accepted_second_half:.2f}/s of {rate}"
    assert refused <= max(4, 0.03 * len(log)), f"{refused} refusals of {len(log)}"


def test_a_lone_refusal_below_the_level_lowers_it_a_few_percent_only() -> None:
    ctl, clock = controller(start=3.0, level=3.0)
    ctl.slow_start = False
    send_saturated(ctl, clock, 12.0)  # sending at ~2.9/s, all accepted
    level = ctl.level
    assert level is not None
    clock.advance(0.2)
    ctl.on_response(429, {}, 0.05, clock.t)  # one refusal: the pair arrived too close together
    assert ctl.level == pytest.approx(level * (1 - RateController.JITTER_STEP))
    assert ctl.rate >= 0.9 * level
    assert ctl.events["jitter"] == 1 and ctl.tight_burst
    clock.advance(0.5)
    ctl.on_response(429, {}, 0.05, clock.t)  # a second one within the window: congestion, not jitter
    assert ctl.events["jitter"] == 1 and ctl.events["congestion"] == 1
    assert ctl.level >= (1 - RateController.MAX_CUT) * level * 0.9


def test_space_send_spaces_requests_at_the_wire() -> None:
    """Slots taken on time but reaching the socket together leave at one interval from each other."""
    ctl, clock = controller(start=4.0, ceiling=4.0)
    ctl.slow_start = False
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)

    ctl.space_send(sleep)  # the first goes at once
    ctl.space_send(sleep)  # a second right behind it waits one interval...
    ctl.space_send(sleep)  # ...and a third, two (they queue)
    assert slept == [pytest.approx(0.25), pytest.approx(0.5)]
    clock.advance(2.0)  # idle time fills the bucket up to its capacity only (one request at 4/s)
    slept.clear()
    ctl.space_send(sleep)
    ctl.space_send(sleep)
    assert slept == [pytest.approx(0.25)]


def test_space_send_honours_a_short_pause_that_came_after_the_slot() -> None:
    ctl, clock = controller(start=4.0)
    slept: list[float] = []
    ctl.on_response(429, {"retry-after": "2"}, 0.05, clock.t)
    ctl.space_send(slept.append)
    assert slept and slept[0] == pytest.approx(2.0)


def test_a_refusal_while_pressed_is_no_connection_cap_if_one_less_cannot_carry_the_rate() -> None:
    """Two connections at 2 req/s and 0.6 s answers: one connection cannot carry 2/s (Little's law)."""
    ctl, clock = controller(start=2.0, connections=8, level=2.2)
    ctl.slow_start = False
    for _ in range(20):
        ctl.latencies.append(0.6)
    for _ in range(8):
        clock.advance(0.5)
        ctl.on_response(200, {}, 0.6, clock.t, concurrency=2)
    ctl.last_pressed = clock.t
    ctl.sends.clear()  # sending well below the level: the rule's other conditions hold
    clock.advance(0.3)
    ctl.on_response(429, {}, 0.6, clock.t, concurrency=2)
    assert ctl.connection_cap is None


# ---------------------------------------------------------------- lanes of one server on other ranks


def test_a_sibling_lanes_congestion_sets_this_lanes_share_of_the_level_at_once() -> None:
    ctl, clock = controller(start=30.0, ceiling=40.0, share=0.5)
    assert ctl.slow_start
    ctl.sibling_level(40.0)  # the other lane found 40 req/s for the whole server
    assert not ctl.slow_start and ctl.level == pytest.approx(20.0)
    assert ctl.rate == pytest.approx(20.0 * (1 - RateController.HEADROOM))
    assert ctl.congestion_count() == 0  # not this lane's own: never relayed back
    ctl.sibling_level(60.0)  # a higher level elsewhere never raises this lane's
    assert ctl.level == pytest.approx(20.0)
    clock.advance(1.0)
    assert ctl.try_take() == 0.0
    assert ctl.try_take() == pytest.approx(1.0 / ctl.rate)  # the next slot follows the new, slower pace


def test_relayed_congestion_halves_what_two_lanes_in_slow_start_cost_a_server() -> None:
    """Each lane finding the limit with its own refusals cost twice; with the relay one lane's is enough."""
    costs = {}
    for relay in (False, True):
        refused = 0
        for rate, burst in ((55.0, 27.0), (66.0, 16.0), (30.0, 8.0), (20.0, 10.0)):
            log = simulate(Server(rate, burst, 503, faults=0.02), lanes=2, latency=0.05, seconds=60.0, relay=relay)
            refused += sum(1 for _, o in log if o in (429, 503))
            accepted_late = sum(1 for t, o in log if t >= 20.0 and o not in (429, 503)) / 40.0
            assert accepted_late >= 0.85 * rate, (relay, rate, accepted_late)
            assert worst_window([t for t, _ in log]) <= rate + burst + 1
        costs[relay] = refused
    assert costs[True] <= 0.7 * costs[False], costs


@pytest.mark.parametrize(("rate", "burst"), [(26.0, 6.5), (38.0, 9.5), (38.0, 19.0), (57.0, 14.25), (66.0, 16.5)])
def test_first_contact_never_sends_a_second_over_rate_plus_burst(rate: float, burst: float) -> None:
    """Slow start drains a hidden burst; the second holding the drain must not hold refusals on top.

    (x1.5 per second all the way: 33 requests in a second against 26 + 6.5, 72 against 57 + 14.)
    """
    log = simulate_jittered(rate, 0.0, seconds=30.0, burst=burst, latency=0.03)
    assert any(status == 429 for _, status in log)  # the limit was found...
    assert worst_window([t for t, _ in log]) <= rate + burst  # ...without a second over it


@pytest.mark.parametrize(("rate", "burst"), [(8.0, 3.0), (10.0, 2.0), (10.0, 3.0), (12.0, 3.0), (12.0, 4.0)])
def test_two_lanes_in_slow_start_never_send_a_second_over_rate_plus_burst(rate: float, burst: float) -> None:
    """Each lane ramps blind to the other's refusal until the relay reaches it, so two lanes overshoot
    twice over: two lanes of a 10/s + 3 nginx host, both at 7.9/s when the first refusal came, sent 14
    requests in a second (x1.5 per second up to 16/s server-wide: 5 of these 5 cases over)."""
    log = simulate(Server(rate, burst, 503, faults=0.02), lanes=2, latency=0.05, seconds=40.0, relay=False)
    assert any(o == 503 for _, o in log)  # the limit was found...
    assert worst_window([t for t, _ in log]) <= rate + burst  # ...without a second over it


def test_a_refusal_in_slow_start_while_connections_hold_the_lane_back_is_a_connection_cap() -> None:
    """Slow start at 12 req/s, the lane's 4 connections all busy and only 6/s going out: a 503 there
    says "fewer at once". Read as the rate, it set a 4.8/s level that two lanes of a 37.5/s host
    held for 100 s (the politeness bench's makespan)."""
    ctl, clock = controller(start=12.0, connections=4)
    for _ in range(20):
        ctl.latencies.append(0.04)
    for _ in range(12):  # 6 sends a second: held back by connections, not by the rate
        clock.advance(1 / 6)
        ctl.try_take()
        ctl.next_start = 0.0
        ctl.on_response(200, {}, 0.04, clock.t, concurrency=3)
    assert ctl.slow_start
    rate = ctl.rate
    ctl.last_pressed = clock.t
    clock.advance(0.05)
    ctl.on_response(503, {}, 0.04, clock.t - 0.04, concurrency=4)
    assert ctl.connection_cap == 3
    assert ctl.slow_start and ctl.rate == rate and ctl.level is None


def test_a_connection_cap_guessed_from_one_refusal_is_lifted_when_a_refusal_reads_as_the_rate() -> None:
    """Slow start at 12.5 req/s, 2 connections busy (one held by a stalled URL), 9.4/s going out, and
    an 8/s bucket refuses: read as "fewer at once", it capped the heavy bench's host at one connection
    for the whole run, and each later stall stopped the lane for 2 s. The next refusal, sent with
    nothing else in flight, is the rate: the guessed cap goes with it."""
    ctl, clock = controller(start=12.5, connections=3)
    for _ in range(20):
        ctl.latencies.append(0.02)

    def send(seconds: float) -> None:
        for _ in range(round(9.4 * seconds)):
            clock.advance(1 / 9.4)
            ctl.try_take()
            ctl.next_start = 0.0
            ctl.on_response(200, {}, 0.02, clock.t, concurrency=1)

    send(2.0)
    assert ctl.slow_start
    ctl.last_pressed = clock.t
    clock.advance(0.02)
    ctl.on_response(503, {}, 0.02, clock.t - 0.02, concurrency=2)
    assert ctl.connection_cap == 1 and ctl.cap_guessed  # the guess (it could have been a cap)
    send(1.0)
    ctl.on_response(503, {}, 0.02, clock.t - 0.02, concurrency=1)  # alone in flight: the rate
    assert ctl.connection_cap is None and not ctl.cap_guessed
    assert ctl.level is not None and not ctl.slow_start
    assert ctl.concurrency_limit() >= 2


def test_a_lane_far_below_a_siblings_level_climbs_to_it_at_slow_start_pace() -> None:
    """A lane that opened later (1 req/s) hears that the server takes 40/s (20 its share): it must
    not crawl there at 5% a second (it took 40 s to reach 8/s), nor overshoot the level."""
    ctl, clock = controller(start=1.0, ceiling=40.0, share=0.5)
    send_saturated(ctl, clock, 1.0)
    ctl.sibling_level(40.0)
    send_saturated(ctl, clock, 12.0)
    assert 0.9 * 20.0 <= ctl.rate <= 20.0
    assert not ctl.slow_start


@pytest.mark.parametrize("rate", [12.0, 26.0, 38.0])
def test_two_refusals_measure_an_nginx_like_limit_without_a_third(rate: float) -> None:
    """nginx's limit_req with burst = rate/2: slow start's refusal, the guess regrown to the limit
    and refused once more; the answers accepted between the two measure the limit (3 refusals per
    host before: the second one only stepped down 10%)."""
    log = simulate_jittered(rate, 0.0, seconds=60.0, burst=rate / 2, latency=0.03)
    assert sum(1 for _, status in log if status == 429) <= 2
    assert sum(1 for t, status in log if t >= 30.0 and status == 200) / 30.0 >= 0.9 * rate


def test_a_refusal_while_sending_far_below_our_rate_cuts_a_quarter_of_the_rate_at_most() -> None:
    """A lane allowed 10 req/s sends 3/s (its share of a connection cap the other lane fills, say) and
    is refused: what the server accepted from it measures the lane, not the server's rate."""
    ctl, clock = controller(start=10.0, level=11.0)
    ctl.slow_start = False
    ctl.rate = 10.3
    for i in range(44):  # 3 sends a second; after 10 s, every sixth is refused (a jitter trim, two events)
        clock.advance(1 / 3)
        ctl.try_take()
        ctl.next_start = 0.0
        status = 503 if i >= 30 and i % 6 == 0 else 200
        ctl.on_response(status, {}, 0.04, clock.t - 0.04, concurrency=1)
    assert ctl.events["congestion"] == 2
    # Each event a quarter of the rate at most (before: of the 3/s sent: 10.1 -> 2.4 at once).
    assert ctl.level >= (1 - RateController.MAX_CUT) ** 2 * (1 - RateController.HEADROOM) * 10.1


def test_slow_starts_first_refusal_while_little_went_out_guesses_from_most_of_the_rate() -> None:
    """Slow start at 12 req/s but 3/s going out (stalls, the CPU) and a jittered refusal: a guess of
    0.8 x 3/s held a 5/s burst-of-one host near 1.2/s; the guess is 0.8 x 0.75 of the rate at least."""
    ctl, clock = controller(start=12.0, connections=8)
    for _ in range(12):
        clock.advance(1 / 3)
        ctl.try_take()
        ctl.next_start = 0.0
        ctl.on_response(200, {}, 0.04, clock.t - 0.04, concurrency=1)
    rate = ctl.rate
    clock.advance(0.05)
    ctl.on_response(429, {}, 0.04, clock.t - 0.04, concurrency=1)
    assert not ctl.slow_start and ctl.level_guessed
    assert ctl.level == pytest.approx(RateController.SLOW_START_EXIT * RateController.SLOW_START_SENT_FLOOR * rate)


# ---------------------------------------------------------------- ceilings and odd header values


def test_an_announced_rate_never_lifts_robots_crawl_delay() -> None:
    """robots.txt asks one request per 5 s; the server then announces 10 req/s in its headers: the
    stricter stays (the announced rate had replaced the Crawl-delay: 100 requests in 10 s)."""
    ctl, clock = controller(start=4.0, ceiling=50.0)
    ctl.cap_rate(0.2)
    ctl.on_response(200, {"RateLimit-Policy": "10;w=1"}, 0.01)
    starts = send_saturated(ctl, clock, 60.0)
    assert ctl.ceiling == pytest.approx(0.2)
    assert sum(1 for t in starts if t >= clock.t - 10.0) <= 2
    ctl.cap_rate(None)  # robots.txt without a Crawl-delay now: the announced rate still holds
    assert ctl.ceiling == pytest.approx(10.0)


def test_an_announced_rate_below_the_floor_is_kept() -> None:
    """100 requests an hour announced: the lane's floor (1 per 30 s) must not lift it to 120."""
    ctl, clock = controller(start=4.0, ceiling=50.0)
    ctl.on_response(200, {"RateLimit-Policy": "100;w=3600"}, 0.01)
    assert len(send_saturated(ctl, clock, 3600.0)) <= 101


@pytest.mark.parametrize("value", ["\xb2", "1\xb9", "9" * 400])
def test_a_retry_after_of_odd_digits_is_no_delay_and_the_refusal_still_counts(value: str) -> None:
    """Latin-1 superscripts pass isdigit() but not float() (the refusal was lost and its URL written
    as an internal error); hundreds of digits read as an infinite pause."""
    assert parse_retry_after(value) is None
    ctl, _ = controller()
    ctl.on_response(429, {"Retry-After": value}, 0.01)
    assert len(ctl.refused) == 1 and ctl.paused_for() == 0.0


@dataclass
class DroppingServer(Server):
    """A token bucket whose limit falls mid-run (a server under load tightening its limit)."""

    drop_at: float = 60.0
    new_rate: float = 3.0
    new_burst: float = 1.0
    started: float = 1000.0  # simulate()'s fake clock starts here

    def answer(self, now: float, concurrency: int, rng: random.Random) -> int | str:
        if now - self.started >= self.drop_at and self.rate != self.new_rate:
            self.rate, self.burst = self.new_rate, self.new_burst
            self.tokens = min(self.tokens, self.burst)
        return super().answer(now, concurrency, rng)


@pytest.mark.parametrize(("rate", "burst", "new_rate", "new_burst"), [(30.0, 8.0, 3.0, 1.0), (20.0, 5.0, 8.0, 1.0)])
def test_a_limit_that_falls_mid_run_is_held_without_a_refusal_every_few_seconds(
    rate: float, burst: float, new_rate: float, new_burst: float
) -> None:
    """The peak the server accepted before the drop stayed: every level found after it was dropped as
    'far below the peak' and regrown at slow-start pace past the limit, every ~9 s (30 -> 3 req/s:
    26 refusals after the drop, 2.07/s held; 20 -> 8: 26 refusals, 5.9/s held)."""
    log = simulate(DroppingServer(rate, burst, 429, faults=0.02, new_rate=new_rate, new_burst=new_burst), seconds=300.0)
    refused = sum(1 for t, o in log if t >= 70.0 and o in (429, 503))
    held = sum(1 for t, o in log if t >= 150.0 and o not in (429, 503, "reset")) / 150.0
    assert refused <= 6, refused
    assert held >= 0.85 * new_rate, held


@pytest.mark.parametrize(
    "headers",
    [{"RateLimit": '"d";r=0;t=inf'}, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1e400"}],
)
def test_an_infinite_quota_reset_is_no_pause_for_good(headers: dict) -> None:
    ctl, _ = controller()
    ctl.on_response(429, headers, 0.01)
    ctl.pause_until(float("inf"))  # relayed from another lane
    assert ctl.paused_for() == 0.0 and ctl.state().paused_until_epoch == 0.0


def test_a_gap_with_a_pause_reads_between_its_bounds_and_the_memory_keeps_the_low_end() -> None:
    """Between two refusals the server accepted min(burst, r x pause) + r x (gap - pause) answers: 48
    answers over a 5-s gap with a 1-s Retry-After in it say r in [48/5, 48/4]. The lane runs at the
    geometric middle (held at the low end, an 11/s host with a burst of 3 sat at 9 req/s all run);
    the server memory keeps the low end (the middle read 4/s hosts whose burst covers the pause at
    up to 4.6/s, and the next monthly run would start above them)."""
    ctl, clock = controller(start=12.0, level=12.0)
    t0 = clock.t
    ctl.on_response(429, {"Retry-After": "1"}, 0.02, sent_at=t0)
    ctl.rate = 12.0  # grown back by the next refusal
    ctl.accepted.extend(t0 + 1.0 + i * (4.0 / 48) for i in range(48))
    ctl.sends.extend(t0 + 1.0 + i * (4.0 / 49) for i in range(49))
    clock.t = t0 + 5.0
    ctl.refused.append(clock.t)
    middle = 48 / math.sqrt(5.0 * 4.0)
    reading, lower = ctl._between_refusals(clock.t)
    assert (reading, lower) == pytest.approx((middle, 48 / 5.0))
    ctl.refused.pop()
    ctl.on_response(429, {}, 0.02, sent_at=clock.t)
    assert ctl.level == pytest.approx(middle)
    assert ctl.remembered_level() == pytest.approx(48 / 5.0)
    assert ctl.state().level == pytest.approx(48 / 5.0)


def test_a_level_relayed_with_its_low_end_is_remembered_at_the_low_end() -> None:
    """Another lane's level read through a pause comes with its low end (whole-server figures)."""
    ctl, _ = controller(start=4.0, share=0.5)
    ctl.sibling_level(20.0, server_floor=16.0)
    assert ctl.level == pytest.approx(10.0) and ctl.remembered_level() == pytest.approx(8.0)
    ctl.sibling_level(12.0)  # a lower one read without a pause
    assert ctl.level == pytest.approx(6.0) and ctl.remembered_level() == pytest.approx(6.0)


def test_a_low_end_is_forgotten_with_the_level_it_bounded() -> None:
    """A level read through a pause keeps its low end (9.6 req/s) for the server memory. Once that
    level is dropped (LEVEL_HOLD quiet seconds) and the lane has regrown to 50 req/s, all accepted, a
    burst of resets sets a new level at the rate: the memory still kept the stale low end, 9.6, and
    the next run would start at a fifth of what the server took."""
    ctl, clock = controller(start=12.0, level=12.0)
    t0 = clock.t
    ctl.on_response(429, {"Retry-After": "1"}, 0.02, sent_at=t0)
    ctl.rate = 12.0
    ctl.accepted.extend(t0 + 1.0 + i * (4.0 / 48) for i in range(48))
    ctl.sends.extend(t0 + 1.0 + i * (4.0 / 49) for i in range(49))
    clock.t = t0 + 5.0
    ctl.on_response(429, {}, 0.02, sent_at=clock.t)
    assert ctl.remembered_level() == pytest.approx(48 / 5.0)
    send_saturated(ctl, clock, RateController.LEVEL_HOLD + 30.0)
    assert ctl.level is None and ctl.rate == pytest.approx(50.0)
    for _ in range(RateController.OUTCOME_WINDOW):
        clock.advance(0.01)
        ctl.on_network_error(clock.t)
    assert ctl.level == pytest.approx(50.0)
    assert ctl.remembered_level() == pytest.approx(50.0) and ctl.state().level == pytest.approx(50.0)


@pytest.mark.parametrize("guessed", [False, True])
def test_a_remembered_low_end_is_probed_like_a_guess(guessed: bool) -> None:
    """A 4/s server with a burst of 4 that answers Retry-After: 5: a run keeps the low end of its
    reading, ~0.4 of the limit. The next run starts there; held as measured, it sat at 0.4 of the
    limit for LEVEL_HOLD (300 s); probed like a guess (lane_controller marks it so when the lane
    ran well above it), one refusal measures the limit."""

    log = simulate(Server(4.0, 4.0, 429, faults=0.02), seconds=60.0, start=1.6, level=1.7, level_guessed=guessed)
    held = sum(1 for t, o in log if t >= 30.0 and o not in (429, 503)) / 30.0
    assert worst_window([t for t, _ in log]) <= 8
    if guessed:
        assert held >= 0.85 * 4.0, held
    else:
        assert held < 0.5 * 4.0, held  # what the memory's low end alone gave


@pytest.mark.parametrize("measured", [True, False])
def test_a_level_relayed_from_a_lane_held_back_is_not_held_as_measured(measured: bool) -> None:
    """A lane that sent far below its rate when refused (its connections held by stalled requests)
    read itself, not the server; relayed as a measurement, the other lane of a 43/s host held
    4.5 req/s for 75 s after the first lane's batch was done. Relayed as such, it is regrown from."""
    ctl, clock = controller(start=4.0, share=0.5)
    ctl.slow_start = False
    ctl.sibling_level(9.46, measured=measured)
    assert ctl.level_measured is measured
    send_saturated(ctl, clock, 30.0)  # everything accepted
    if measured:
        assert ctl.rate <= 4.73 * 1.02, ctl.rate  # gentle probes only
    else:
        assert ctl.rate > 4.73 * 1.3, ctl.rate


def test_a_gap_without_a_pause_reads_what_was_accepted_in_it() -> None:
    ctl, clock = controller(start=11.0, level=11.0)
    t0 = clock.t
    ctl.refused.append(t0)
    ctl.accepted.extend(t0 + i * (5.0 / 50) for i in range(1, 51))
    clock.t = t0 + 5.0
    ctl.refused.append(clock.t)
    reading, lower = ctl._between_refusals(clock.t)
    assert reading == pytest.approx(10.0) and lower is None


def test_pauses_within_a_pause_count_once_and_windows_leave_them_out() -> None:
    ctl, clock = controller(start=4.0, level=4.0)
    t0 = clock.t
    ctl.on_response(429, {"Retry-After": "1"}, 0.01, sent_at=t0)
    clock.advance(0.5)
    ctl.on_response(429, {"Retry-After": "1"}, 0.01, sent_at=t0)  # sent before the first answer came
    assert ctl._paused_between(t0, t0 + 3.0) == pytest.approx(1.5)
    clock.t = t0 + 2.5
    ctl.accepted.extend(t0 + 1.5 + i * 0.25 for i in range(4))  # 4 answers in the 1 s after the pause
    accepted, _, _ = ctl._measured(clock.t)  # a 2-s window, 1 s of it paused: 4/s, not 2/s
    assert accepted == pytest.approx(4.0)


@pytest.mark.parametrize(("rate", "burst"), [(3.0, 1.0), (8.0, 4.0), (22.0, 11.0)])
def test_a_retry_after_host_with_a_small_burst_is_held_near_its_limit(rate: float, burst: float) -> None:
    """Each refusal says Retry-After: 1 while the bucket holds less than a second of rate: the
    pause wastes tokens, and a rate read across it was held as the level (simulated: 0.66, 0.81
    and 0.86 of the limit; measured: the heavy bench's 11/s host at 0.82 for the whole run)."""
    log = simulate(Server(rate, burst, 429, faults=0.04), seconds=60.0, retry_after=True)
    held = sum(1 for t, o in log if t >= 20.0 and o not in (429, 503)) / 40.0
    assert held >= 0.9 * rate, held
    assert worst_window([t for t, _ in log]) <= rate + burst


@pytest.mark.parametrize(("rate", "seed"), [(4.0, 7), (4.0, 11), (11.0, 7), (46.0, 7)])
def test_a_retry_after_host_whose_burst_covers_the_pause_is_remembered_at_most_at_its_limit(
    rate: float, seed: int
) -> None:
    """A burst of a second's rate refills over a 1-s pause: the geometric middle reads above the
    limit (corrected by the next refusal), but what the memory keeps is never above it."""
    ctls: list[RateController] = []
    log = simulate(Server(rate, rate, 429, faults=0.04), seconds=60.0, retry_after=True, seed=seed, controllers=ctls)
    assert worst_window([t for t, _ in log]) <= 2 * rate
    remembered = ctls[0].remembered_level()
    assert remembered is not None and remembered <= rate * 1.02, remembered


def test_space_send_honours_a_short_pause_that_came_while_it_waited() -> None:
    """Two requests queued at the wire; while the second waits its interval, the first is answered
    429 + Retry-After: 2. The second must wait out the pause too (it was written 0.25 s later, in it)."""
    ctl, clock = controller(start=4.0, ceiling=4.0)
    ctl.slow_start = False
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)
        if len(slept) == 1:
            clock.advance(-seconds + 0.1)  # 0.1 s into the wait, the first request's answer
            ctl.on_response(429, {"Retry-After": "2"}, 0.05, clock.t - 0.05)
            clock.advance(seconds - 0.1)

    ctl.space_send(sleep)  # the first goes at once
    start = clock.t
    ctl.space_send(sleep)
    assert clock.t >= ctl.paused_until and clock.t - start == pytest.approx(2.1)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"RateLimit-Policy": '"a";q=-5;w=1'}, None),
        ({"X-RateLimit-Limit": "-1", "X-RateLimit-Window": "1"}, None),
        ({"RateLimit-Policy": '"a";q=0;w=1, "b";q=10;w=1'}, 10.0),
        ({"RateLimit-Policy": '"a";q=nan;w=1, "b";q=10;w=1'}, 10.0),
        ({"RateLimit-Policy": "0;w=1, 10;w=1"}, 10.0),
        ({"RateLimit-Policy": '"a";q=1e400;w=1'}, None),
    ],
)
def test_an_announced_rate_is_finite_and_above_zero(headers: dict, expected: float | None) -> None:
    """profiling takes the announced rate as the server's ceiling: -5 req/s made every slot due at once."""
    assert advertised_rate(headers) == expected


def test_a_siblings_higher_level_leaves_this_lanes_own_guess_a_guess() -> None:
    """Lane 0's first refusal guessed 3.4 req/s (its sends held to 0.75 of its rate by a busy CPU);
    lane 1's relayed level, 4.2 for this share, is higher, so lane 0 keeps its own level, and that
    level is still a guess: it must grow until a refusal measures the limit. Taken as measured, a
    37.5/s host's lane held 3.4 req/s for 120 s (the background bench's makespan, twice)."""
    ctl, clock = controller(start=0.75, ceiling=40.0, share=0.5)
    send_saturated(ctl, clock, 10.0)
    ctl._leave_slow_start(clock.t, 4.28)
    assert ctl.level_guessed and ctl.level == pytest.approx(0.8 * 4.28)
    ctl.sibling_level(8.32, guessed=True)
    assert ctl.level == pytest.approx(0.8 * 4.28) and ctl.level_guessed
    ctl.sibling_level(8.32, guessed=False)  # a measured sibling level above ours says nothing of ours either
    assert ctl.level_guessed
    send_saturated(ctl, clock, 20.0)
    assert ctl.rate >= 2 * 3.42


def test_a_lane_whose_siblings_closed_takes_their_share_and_no_more() -> None:
    """Reshare: every rate figure scales with the lane's share, so the server sees what all its
    lanes sent together before, now from one; a share never shrinks this way."""
    ctl, clock = controller(start=5.0, ceiling=20.0, share=0.5, level=8.0)
    ctl.level_floor = 6.0
    ctl.peak = 9.0
    ctl.cap_rate(4.0)  # half of a robots.txt Request-rate of 8/s
    assert ctl.rate == 4.0
    ctl.reshare(1.0)
    assert ctl.share == 1.0
    assert ctl.rate == pytest.approx(8.0)  # the robots.txt ceiling, now whole: 8/s
    assert ctl.robots_ceiling == pytest.approx(8.0) and ctl.ceiling == pytest.approx(8.0)
    assert (ctl.level, ctl.level_floor, ctl.peak) == (pytest.approx(16.0), pytest.approx(12.0), pytest.approx(18.0))
    ctl.reshare(0.5)  # never smaller
    ctl.reshare(1.0)  # nor again
    assert ctl.rate == pytest.approx(8.0) and ctl.share == 1.0
    # At the server: no more than the whole robots.txt rate, from this lane alone.
    starts = send_saturated(ctl, clock, 10.0)
    assert len(starts) <= 8 * 10 + 1


def test_reshare_keeps_the_lane_under_its_new_ceiling() -> None:
    ctl, clock = controller(start=15.0, ceiling=20.0, share=1 / 3)
    ctl.reshare(0.5)
    assert ctl.ceiling == pytest.approx(30.0) and ctl.rate == pytest.approx(22.5)
    ctl.reshare(1.0)
    assert ctl.ceiling == pytest.approx(60.0) and ctl.rate == pytest.approx(45.0)
    assert ctl.floor == pytest.approx(1 / 30 * 3)


def test_ceilings_set_after_a_reshare_are_taken_at_the_new_share() -> None:
    ctl, clock = controller(start=5.0, ceiling=10.0, share=0.5)
    ctl.reshare(1.0)
    ctl.cap_rate(3.0 * ctl.share)  # lane.py: robots.txt's rate x the controller's share
    assert ctl.rate <= 3.0 and ctl.ceiling == pytest.approx(3.0)
    assert len(send_saturated(ctl, clock, 10.0)) <= 31
    other, clock = controller(start=5.0, ceiling=10.0, share=0.5)
    other.reshare(1.0)
    other.on_response(200, {"RateLimit-Policy": "6;w=1"}, 0.01, clock.t)
    assert other.ceiling == pytest.approx(6.0) and other.rate <= 6.0


def test_a_reshare_keeps_slow_start_and_a_pause() -> None:
    ctl, clock = controller(start=2.0, ceiling=10.0, share=0.5)
    assert ctl.slow_start
    ctl.pause_until(clock.t + WALL + 5.0)
    ctl.reshare(1.0)
    assert ctl.rate == pytest.approx(4.0) and ctl.ceiling == pytest.approx(20.0)
    assert ctl.slow_start and ctl.paused_for() == pytest.approx(5.0)


# ---------------------------------------------------------------- the wire's debt (fresh-eyes hunt)


def _backlogged_lane(
    ctl: RateController, clock: FakeClock, seconds: float, wire_latency: object, write_late: float = 0.0
) -> tuple[list[float], list[float]]:
    """A backlogged lane: slots from try_take within concurrency_limit(), space_send before each write,
    wrote(write_late) after it, the answer `wire_latency` after the write. Returns (writes, waits)."""
    latency_of = wire_latency if callable(wire_latency) else (lambda n: wire_latency)
    ev, seq, writes, waits = [], 0, [], []
    end, pump = clock.t + seconds, clock.t
    while clock.t < end:
        if ev and ev[0][0] <= pump:
            t, _, kind, data = heapq.heappop(ev)
            clock.t = t
            if kind == "write":
                ctl.wrote(write_late)
                writes.append(t)
                lat = latency_of(len(writes))
                heapq.heappush(ev, (t + lat, seq, "answer", (*data, lat)))
                seq += 1
            else:
                ticket, slot, lat = data
                ctl.on_response(200, {}, t - slot, slot, 1, wire_latency=lat)
                ctl.finished(ticket)
            continue
        clock.t = pump
        if ctl.in_flight < ctl.concurrency_limit():
            wait = ctl.try_take()
            if wait <= 0:
                ticket, _ = ctl.started()
                slept: list[float] = []
                ctl.space_send(slept.append)
                waits.append(sum(slept))
                heapq.heappush(ev, (clock.t + sum(slept) + write_late, seq, "write", (ticket, clock.t)))
                seq += 1
                pump = clock.t + 1e-6
            else:
                pump = clock.t + min(wait, 0.25) + 0.0002
        else:
            pump = min(ev[0][0] if ev else clock.t + 0.25, clock.t + 0.25)
    return writes, waits


def test_a_constant_write_time_does_not_cut_the_rate() -> None:
    """Every write takes 50 ms (a plain-http:// host that closes its connections: the TCP connect runs
    inside request(), between space_send and wrote()). The server sees requests exactly 1/rate apart,
    yet each wrote() debits 0.05*rate tokens and the bucket never recovers: 10/s -> ~5/s."""
    ctl, clock = controller(start=10.0, ceiling=10.0, connections=4, level=10.0)
    ctl.slow_start = False
    writes, waits = _backlogged_lane(ctl, clock, 120.0, wire_latency=0.05, write_late=0.05)
    rate = len([t for t in writes if t > writes[0] + 60]) / 60
    assert rate > 9.0, (rate, ctl.wire_tokens, statistics.mean(waits[-50:]))


def test_a_few_slow_urls_do_not_leave_every_request_waiting() -> None:
    """A 2/s host answers in 50 ms, every 10th URL in 0.8 s (a cache miss: that URL, not the server).
    Each such answer is "late" (> the 0.2-s silence gap) and re-phases the wire bucket one interval
    after itself; slots keep coming at the rate, so the debt never drains and from then on every request
    waits ~0.3 s between its slot and its write. The latency median (slot -> answer) follows, x5, and
    the silence gap with it (0.2 -> 1.3 s): ACK clocking no longer sees a stall shorter than that."""
    ctl, clock = controller(start=2.0, ceiling=2.0, connections=4, level=2.0)
    ctl.slow_start = False
    _, waits = _backlogged_lane(ctl, clock, 300.0, wire_latency=lambda n: 0.8 if n % 10 == 5 else 0.05)
    assert statistics.mean(waits[-100:]) < 0.05, (statistics.mean(waits[-100:]), ctl.latency, ctl._silence_gap())


def test_the_wire_spacing_holds_when_the_deficit_is_deep() -> None:
    """One write that left 6 s late (a 5-s DNS retry or SYN retransmits on a plain-http:// connect) at
    2/s: 12 tokens of debt. space_send then sleeps its 5-s maximum whatever the debt, so two sends whose
    threads reached it 0.3 s apart (jitter) go out 0.3 s apart: the burst-of-one refusal the bucket exists
    to prevent."""
    ctl, clock = controller(start=2.0, ceiling=2.0, level=2.0)
    ctl.slow_start = False
    ctl.wrote(6.0)
    released = []
    for gap in (0.0, 0.3):
        clock.advance(gap)
        slept: list[float] = []
        ctl.space_send(slept.append)
        released.append(clock.t + sum(slept))
    assert released[1] - released[0] >= 0.5 - 1e-9, released


def test_a_rate_cut_keeps_the_wire_debt_in_seconds() -> None:
    """A debt of 4 s at 2/s is 8 tokens; read at 1.4/s it was 5.7 s, beyond space_send's 5-s wait, and
    a jittered pair then left 0.3 s apart (fresh-eyes hunt)."""
    ctl, clock = controller(start=2.0, ceiling=2.0, level=2.0)
    ctl.slow_start = False
    ctl.wrote(0.0)
    ctl.wrote(6.0)  # one write 6 s late: 4 s of debt at most
    ctl.sibling_level(2.0 * 0.7 / (1 - RateController.HEADROOM))  # another lane's level: 1.4 req/s
    assert ctl.rate == pytest.approx(1.4)
    released = []
    for gap in (0.0, 0.3):  # two fetch threads reach the wire 0.3 s apart
        clock.advance(gap)
        slept: list[float] = []
        ctl.space_send(slept.append)
        released.append(clock.t + sum(slept))
    assert released[1] - released[0] >= 1 / 1.4 - 1e-9, released


def test_slow_urls_among_answers_that_keep_coming_are_no_silence_and_move_nothing() -> None:
    """40% of a 5/s server's URLs answer in 0.4 s (uncached), the rest in 50 ms: each slow answer was
    taken for a stalled server, and the lane sent 59% of its rate (fresh-eyes hunt)."""
    rnd = random.Random(3)
    ctl, clock = controller(start=5.0, ceiling=5.0, connections=8, level=5.0)
    ctl.slow_start = False
    start = clock.t
    writes, _ = _backlogged_lane(ctl, clock, 120.0, wire_latency=lambda n: 0.4 if rnd.random() < 0.4 else 0.05)
    sent = sum(1 for t in writes if start + 60 <= t < start + 120) / 60
    assert sent >= 0.9 * 5.0, sent
