"""HostRegistry: redirect targets' budgets, and dropping the idle ones that learned nothing."""

from __future__ import annotations

import time

import pytest

from distributed_downloader.net.hosts import HostRegistry


def test_idle_budgets_that_learned_nothing_are_dropped_the_others_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run redirected to a new host per URL kept a 7 kB budget per host for good (146 MB for 20,000)."""
    monkeypatch.setattr(HostRegistry, "PRUNE_EVERY", 10)
    monkeypatch.setattr(HostRegistry, "IDLE_SECONDS", 0.0)
    registry = HostRegistry(default_rate=400.0, ranks=1, decrease=0.3)  # 2/rate: 5 ms of idle is enough
    refused = registry.controller_for("refused.org")
    refused.try_take()
    refused.on_response(429, {}, 0.01)  # learned something: a lower rate
    paused = registry.controller_for("paused.org")
    paused.on_response(200, {"Retry-After": "60"}, 0.01)
    busy = registry.controller_for("busy.org")
    busy.started()  # a request in flight
    for i in range(200):
        registry.controller_for(f"img{i}.cdn.org").try_take()
        time.sleep(0.0005)
    time.sleep(0.01)
    registry.controller_for("last.org")
    assert len(registry._others) < 40
    for name, controller in (("refused.org", refused), ("paused.org", paused), ("busy.org", busy)):
        assert registry.controller_for(name) is controller


def test_a_host_whose_lanes_run_on_another_rank_gets_a_token_budget_only() -> None:
    """Its lanes already send what it allows: a full budget on every other rank on top sent a
    Crawl-delay-10 host 0.175 req/s against 0.1 (4 ranks, default rate 2)."""
    registry = HostRegistry(default_rate=2.0, ranks=4, decrease=0.3, laned=["big.org"])
    elsewhere = registry.controller_for("big.org")
    assert elsewhere.rate == pytest.approx(HostRegistry.LANED_ELSEWHERE_RATE / 4)
    assert elsewhere.ceiling == pytest.approx(HostRegistry.LANED_ELSEWHERE_RATE / 4)
    assert registry.controller_for("other.org").rate == pytest.approx(0.5)  # not laned: the default share
