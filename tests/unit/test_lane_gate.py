"""The lane's hop gate at the wire: a pause that comes after a request took its slot."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from distributed_downloader.engine.lane import _LaneGate
from distributed_downloader.errors import DownloadError, ErrorCode
from distributed_downloader.net.politeness import LaneLimits, RateController


def _gate() -> tuple[_LaneGate, RateController]:
    controller = RateController(LaneLimits(start_rate=50.0, ceiling=50.0, max_connections=4), name="h#0")
    return _LaneGate(SimpleNamespace(controller=controller), time.monotonic(), 1), controller  # type: ignore[arg-type]


def test_a_request_goes_out_when_no_pause_came() -> None:
    gate, _ = _gate()
    gate.on_wire()
    assert not gate.cancelled


def test_a_long_pause_after_the_slot_was_taken_keeps_the_request_off_the_wire() -> None:
    """Slot taken, then another answer's 'Retry-After: 30': the request was written inside the pause
    (space_send waits out 5 s at most). Now nothing is sent and the URL goes back to the queue as a
    cancelled copy (not a row), which the controller's pause holds until it ends."""
    gate, controller = _gate()
    controller.on_response(429, {"retry-after": "30"}, 0.01)
    with pytest.raises(DownloadError) as info:
        gate.on_wire()
    assert info.value.code == ErrorCode.SERVER_PAUSED
    assert gate.cancelled
    assert controller.try_take() > 25  # the queue waits for the pause's end


def test_a_write_that_left_late_is_told_to_the_controller_and_lateness_counts_from_it() -> None:
    gate, controller = _gate()
    told: list[float] = []
    controller.wrote = told.append  # type: ignore[method-assign]
    answers: list[float | None] = []
    controller.on_response = lambda *args, **kwargs: answers.append(args[5])  # type: ignore[method-assign]
    gate.on_wire()
    time.sleep(0.05)  # the GIL held the write back
    gate.wrote()
    gate.on_response("http://h/x", 200, {}, 0.0)
    assert len(told) == 1 and told[0] >= 0.05
    assert answers[0] is not None and answers[0] < 0.05  # the answer's lateness runs from the real write
