"""Tests for the download coordinator's bookkeeping (lanes, batches, progress), on real schedules."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from distributed_downloader import config as config_mod
from distributed_downloader import inputs
from distributed_downloader.engine.coordinator import Coordinator
from distributed_downloader.engine.lane import Lane, LaneSpec, lane_controller
from distributed_downloader.errors import ErrorCode
from distributed_downloader.plan import partition, schedule
from distributed_downloader.plan.profiling import ServerProfile

# server -> (urls, max_rate): with batch_size 2 and rate ceilings chosen so the
# longest-first order is long.org, mid.org, short.org
SERVERS = {"short.org": (2, 10.0), "long.org": (12, 1.0), "mid.org": (8, 2.0)}


def build_schedule(
    tmp_path: Path, servers: dict = SERVERS, rules: dict | None = None, ignored: tuple[str, ...] = ()
) -> dict:
    lines = ["uuid,identifier,source_id"]
    for name, (count, _) in servers.items():
        lines += [f"{name}-{i},http://{name}/{i}.jpg,s" for i in range(count)]
    source = tmp_path / "in.csv"
    source.write_text("\n".join(lines) + "\n")
    cfg = config_mod.validate(
        {
            "path_to_input": str(source),
            "path_to_output": str(tmp_path / "out"),
            "schedule_rules": rules if rules is not None else {"1": 3},
            "downloader_parameters": {"batch_size": 2, "max_nodes": 2, "workers_per_node": 2},
        }
    )
    paths = config_mod.paths(cfg)
    manifest = partition.write_partitions(inputs.rows(source), paths.urls, paths.rejected_table, 2).manifest
    profiles = {}
    for name, (count, rate) in servers.items():
        code = int(ErrorCode.SERVER_IGNORED) if name in ignored else 0
        profiles[name] = ServerProfile(
            name,
            -(-count // 2),
            count,
            1.0,
            rate,
            6,
            10.0,
            200,
            False,
            0.0,
            0.0,
            not code,
            "ignored by test" if code else "",
            code,
        )
    return schedule.build(manifest, profiles, paths, cfg, 1)


def stats(urls: int = 2, successes: int = 1, size: int = 100, failed: bool = False) -> dict:
    return {
        "urls": urls,
        "processed": urls,
        "successes": successes,
        "new_successes": successes,
        "bytes": size,
        "server_failed": failed,
    }


def test_longest_server_first_and_one_lane_per_server_per_request(tmp_path: Path) -> None:
    plan = build_schedule(tmp_path)
    assert [s["server_name"] for s in plan["servers"]] == ["long.org", "mid.org", "short.org"]
    coord = Coordinator(plan, decrease=0.5)
    got = coord.request_lanes(rank=0, free=10, held=set())
    assert [a.lane["server_name"] for a in got] == ["long.org", "mid.org", "short.org"]
    assert [a.batch["partition_id"] for a in got] == [0, 0, 0]
    first = got[0].lane
    assert first["lane_index"] == 0 and first["lanes"] == 3
    assert first["start_rate"] == 1.0 and first["max_rate"] == 1.0 and first["max_connections"] == 6
    assert first["decrease"] == 0.5 and first["ignored_code"] == 0


def test_free_slots_limit_the_lanes_handed_out(tmp_path: Path) -> None:
    coord = Coordinator(build_schedule(tmp_path), decrease=0.5)
    got = coord.request_lanes(rank=0, free=1, held=set())
    assert [a.lane["server_name"] for a in got] == ["long.org"]
    assert coord.request_lanes(rank=1, free=0, held=set()) == []


def test_never_more_lanes_than_allowed_and_never_a_held_server(tmp_path: Path) -> None:
    coord = Coordinator(build_schedule(tmp_path), decrease=0.5)
    held: dict[int, set[str]] = {r: set() for r in range(6)}
    for rank in range(6):
        for a in coord.request_lanes(rank, free=10, held=held[rank]):
            assert a.lane["server_name"] not in held[rank]
            held[rank].add(a.lane["server_name"])
    lanes_open = Counter(name for names in held.values() for name in names)
    # long.org: 6 batches, rule -> 3 lanes; mid.org: 4 batches -> 3 lanes; short.org: 1 batch -> 1 lane
    assert lanes_open == {"long.org": 3, "mid.org": 3, "short.org": 1}
    for name, state in coord.servers.items():
        assert len(state.open_lanes) == lanes_open[name]
        assert sorted(state.holders) == sorted(state.open_lanes)
    assert coord.request_lanes(6, free=10, held=set()) == []  # every server at its lane limit


def test_a_rank_is_not_given_a_server_it_already_holds(tmp_path: Path) -> None:
    coord = Coordinator(build_schedule(tmp_path), decrease=0.5)
    first = coord.request_lanes(0, free=1, held=set())
    assert [a.lane["server_name"] for a in first] == ["long.org"]
    again = coord.request_lanes(0, free=1, held={"long.org"})
    assert [a.lane["server_name"] for a in again] == ["mid.org"]
    other = coord.request_lanes(1, free=1, held=set())
    assert [a.lane["server_name"] for a in other] == ["short.org"]  # every server's first lane comes first
    extra = coord.request_lanes(1, free=1, held={"short.org"})
    assert [a.lane["server_name"] for a in extra] == ["long.org"]
    assert extra[0].lane["lane_index"] == 1


def test_next_batch_drains_the_server_then_closes_the_lane(tmp_path: Path) -> None:
    coord = Coordinator(build_schedule(tmp_path, rules={"1": 1}), decrease=0.5)
    (assignment,) = coord.request_lanes(0, free=1, held=set())
    assert assignment.lane["server_name"] == "long.org"
    seen = [assignment.batch["partition_id"]]
    while (batch := coord.next_batch("long.org", 0, stats())) is not None:
        seen.append(batch["partition_id"])
    assert seen == [0, 1, 2, 3, 4, 5]
    state = coord.servers["long.org"]
    assert not state.open_lanes and not state.holders
    assert state.done_batches == 6
    # no batches left: the server is not handed out again
    later = coord.request_lanes(1, free=5, held=set())
    assert [a.lane["server_name"] for a in later] == ["mid.org", "short.org"]


def test_closed_lane_index_is_reused(tmp_path: Path) -> None:
    coord = Coordinator(build_schedule(tmp_path, rules={"1": 2}), decrease=0.5)
    a0 = coord.request_lanes(0, free=1, held=set())[0]
    coord.request_lanes(1, free=2, held=set())  # the first lanes of mid.org and short.org
    a1 = coord.request_lanes(2, free=1, held=set())[0]
    assert (a0.lane["server_name"], a1.lane["server_name"]) == ("long.org", "long.org")
    assert {a0.lane["lane_index"], a1.lane["lane_index"]} == {0, 1}
    state = coord.servers["long.org"]
    state.pending.clear()  # pretend the rest went elsewhere: lane 0 closes on its next request
    assert coord.next_batch("long.org", 0, stats()) is None
    state.pending.append({"partition_id": 99, "fingerprint": "x", "mode": "full"})
    again = coord.request_lanes(3, free=3, held=set())
    reopened = [a for a in again if a.lane["server_name"] == "long.org"]
    assert len(reopened) == 1 and reopened[0].lane["lane_index"] == 0


def test_exhausted_finished_and_progress(tmp_path: Path) -> None:
    coord = Coordinator(build_schedule(tmp_path), decrease=0.5)
    assert coord.total_batches == 6 + 4 + 1
    assert not coord.exhausted and coord.done_batches < coord.total_batches
    assert coord.progress()["eta_s"] is None
    held: dict[int, set[str]] = {r: set() for r in range(4)}
    lanes: list[tuple[str, int]] = []
    for rank in range(4):
        for a in coord.request_lanes(rank, free=3, held=held[rank]):
            held[rank].add(a.lane["server_name"])
            lanes.append((a.lane["server_name"], a.lane["lane_index"]))
    reported = 0
    while lanes:
        name, index = lanes.pop(0)
        failed = name == "short.org"
        nxt = coord.next_batch(name, index, stats(urls=2, successes=2, size=10, failed=failed))
        reported += 1
        if nxt is not None:
            lanes.append((name, index))
        if coord.exhausted:
            assert all(not s.pending for s in coord.servers.values())
    assert coord.exhausted and coord.done_batches == coord.total_batches
    assert reported == coord.total_batches == coord.done_batches
    progress = coord.progress()
    assert progress["batches_done"] == progress["batches_total"] == 11
    assert progress["urls_done"] == 22
    assert progress["successes"] == 22
    assert progress["bytes"] == 110
    assert progress["servers_active"] == 0
    assert progress["servers_failed"] == ["short.org"]
    assert progress["eta_s"] == 0.0


def test_ignored_server_gets_exactly_one_lane(tmp_path: Path) -> None:
    plan = build_schedule(tmp_path, rules={"1": 3}, ignored=("long.org",))
    coord = Coordinator(plan, decrease=0.5)
    names = []
    for rank in range(4):
        names += [a.lane["server_name"] for a in coord.request_lanes(rank, free=5, held=set())]
    assert names.count("long.org") == 1
    lane = next(s for s in plan["servers"] if s["server_name"] == "long.org")
    assert lane["ignored_code"] == int(ErrorCode.SERVER_IGNORED)


def test_random_interleavings_keep_the_invariants(tmp_path: Path) -> None:
    """Ranks ask for lanes and finish batches in random order: every batch is handed out exactly once,
    a server never has more lanes than allowed, a rank never holds two lanes of one server."""
    plan = build_schedule(tmp_path, rules={"1": 2, "4": 3})
    limits = {s["server_name"]: s["lanes"] for s in plan["servers"]}
    expected = Counter((s["server_name"], b["partition_id"]) for s in plan["servers"] for b in s["batches"])
    rng = random.Random(1234)
    for _ in range(20):
        coord = Coordinator(plan, decrease=0.5)
        held: dict[int, dict[str, int]] = {r: {} for r in range(5)}  # rank -> server -> lane index
        handed: Counter = Counter()
        refused: set[int] = set()  # ranks that were answered "no lane" with free slots
        steps = 0
        while coord.done_batches < coord.total_batches:
            steps += 1
            assert steps < 1000
            rank = rng.randrange(5)
            if held[rank] and rng.random() < 0.6:
                name = rng.choice(sorted(held[rank]))
                batch = coord.next_batch(name, held[rank][name], stats())
                if batch is None:
                    del held[rank][name]
                else:
                    handed[(name, batch["partition_id"])] += 1
            else:
                free = rng.randint(0, 3)
                given = coord.request_lanes(rank, free=free, held=set(held[rank]))
                # The worker stops asking after an empty answer: it must be final for that rank.
                assert not (given and rank in refused), f"rank {rank} got a lane after an empty answer"
                if free and not given:
                    refused.add(rank)
                for a in given:
                    name = a.lane["server_name"]
                    assert name not in held[rank]
                    held[rank][name] = a.lane["lane_index"]
                    handed[(name, a.batch["partition_id"])] += 1
            for name, limit in limits.items():
                holders = [r for r in held if name in held[r]]
                assert len(holders) <= max(1, limit)
                assert len({held[r][name] for r in holders}) == len(holders)
                assert len(coord.servers[name].open_lanes) == len(holders)
        assert handed == expected


def test_a_failed_batch_is_recorded_with_its_reason(tmp_path: Path) -> None:
    coord = Coordinator(build_schedule(tmp_path), decrease=0.5)
    (first, *_) = coord.request_lanes(0, free=1, held=set())
    partition_id = first.batch["partition_id"]
    coord.finished_batch("long.org", {**stats(), "partition_id": partition_id, "failed": "disk full"})
    assert coord.failed_batches == {f"long.org/{partition_id}": "disk full"}
    assert coord.progress()["batches_failed"] == 1
    assert not coord.servers["long.org"].failed  # one batch, not the server


def test_a_dead_lane_sets_its_server_aside_with_the_batches_it_held(tmp_path: Path) -> None:
    coord = Coordinator(build_schedule(tmp_path, rules={"1": 2}), decrease=0.5)
    (a0,) = coord.request_lanes(0, free=1, held=set())
    second = coord.next_batch("long.org", 0, None)  # pipelined: the lane holds two batches
    assert second is not None
    coord.finished_batch("long.org", {**stats(), "partition_id": a0.batch["partition_id"]})
    coord.lane_failed("long.org", 0, "internal error while running lane long.org#0: KeyError: 'x'")
    state = coord.servers["long.org"]
    assert state.failed and "KeyError" in state.failed_reason
    assert not state.pending and not state.open_lanes
    failed = coord.failed_batches
    assert f"long.org/{second['partition_id']}" in failed  # held by the dead lane
    assert f"long.org/{a0.batch['partition_id']}" not in failed  # committed before it died
    assert len(failed) == 6 - 1  # the rest was set aside
    assert "long.org" in coord.progress()["servers_failed"]
    # Other servers go on.
    assert {a.lane["server_name"] for a in coord.request_lanes(1, free=3, held=set())} == {"mid.org", "short.org"}


def many_servers(tmp_path: Path, count: int) -> dict:
    return build_schedule(tmp_path, {f"s{i:02d}.org": (2, 5.0) for i in range(count)}, rules={"1": 1})


def test_a_rank_gets_its_fair_share_until_every_rank_has_asked(tmp_path: Path) -> None:
    # 25 servers of one lane and 32 slots per rank: the first rank to ask took all 25 and the other
    # idled the whole round (issue #16). Now it gets 13; its next ask is empty (final); rank 0 the rest.
    coord = Coordinator(many_servers(tmp_path, 25), decrease=0.5, ranks=2)
    first = coord.request_lanes(1, free=32, held=set())
    assert len(first) == 13
    assert coord.request_lanes(1, free=32 - 13, held={a.lane["server_name"] for a in first}) == []
    second = coord.request_lanes(0, free=32, held=set())
    assert len(second) == 12
    names = [a.lane["server_name"] for a in first + second]
    assert sorted(names) == sorted(coord.servers) and len(set(names)) == 25  # every server has its lane
    assert coord.request_lanes(0, free=20, held=set(names[13:])) == []


def test_fair_share_never_leaves_a_server_without_a_lane(tmp_path: Path) -> None:
    # Any ask order, slots and rank count: once every rank has asked until its answer was empty (or
    # its slots were full) and freed slots asked again, every server has had a lane.
    rng = random.Random(5)
    for trial in range(60):
        servers = rng.randint(1, 30)
        ranks = rng.randint(1, 5)
        slots = rng.randint(1, 12)
        (tmp_path / str(trial)).mkdir()
        coord = Coordinator(many_servers(tmp_path / str(trial), servers), decrease=0.5, ranks=ranks)
        held: dict[int, set[str]] = {r: set() for r in range(ranks)}
        exhausted: set[int] = set()
        opened: set[str] = set()
        while True:
            asking = [r for r in range(ranks) if r not in exhausted and len(held[r]) < slots]
            if not asking:
                if not any(held.values()):
                    break
                rank = rng.choice([r for r in range(ranks) if held[r]])  # a lane ends: its slot frees
                held[rank].discard(rng.choice(sorted(held[rank])))
                continue
            rank = rng.choice(asking)
            got = coord.request_lanes(rank, slots - len(held[rank]), set(held[rank]))
            if not got:
                exhausted.add(rank)
            for a in got:
                name = a.lane["server_name"]
                assert name not in opened
                opened.add(name)
                held[rank].add(name)
                coord.servers[name].pending.clear()  # one batch per lane here: the server is drained
        assert opened == set(coord.servers), (servers, ranks, slots)


def test_server_memory_learns_only_what_a_server_was_seen_to_accept(tmp_path: Path) -> None:
    """A lane that had no answer leaves the memory alone; a rate above the lane's accepted peak is
    remembered as that peak (a lane regrew to 7.9 req/s on a 4/s host after a connection-cap finding
    dropped its level, and the next monthly run started there: 28 refusals instead of 0)."""
    coord = Coordinator(build_schedule(tmp_path), decrease=0.5)
    server = coord.order[0]
    base = {"server": server, "share": 1.0, "connection_cap": None, "paused_until": 0.0}
    coord.learn([{**base, "rate": 3.8, "level": 4.0, "answers": 500, "peak": 4.5}])
    assert coord.memory[server]["rate"] == 3.8 and coord.memory[server]["level"] == 4.0
    coord.learn([{**base, "rate": 7.9, "level": None, "answers": 0, "peak": 0.0}])  # learned nothing
    assert coord.memory[server]["rate"] == 3.8 and coord.memory[server]["level"] == 4.0
    coord.learn([{**base, "rate": 7.9, "level": None, "answers": 120, "peak": 4.5}])
    assert coord.memory[server]["rate"] == 4.5


def test_server_memory_keeps_the_low_end_of_a_level_and_what_the_lane_ran_at(tmp_path: Path) -> None:
    """A level read through a pause is remembered at its low end (lane snapshot "level") with the
    reading the lane ran at beside it, so the next run probes up from the low end."""
    coord = Coordinator(build_schedule(tmp_path), decrease=0.5)
    server = coord.order[0]
    base = {"server": server, "share": 0.5, "connection_cap": None, "paused_until": 0.0, "answers": 50, "peak": 5.0}
    coord.learn([{**base, "rate": 2.0, "level": 1.0, "level_reading": 2.1}, {**base, "rate": 2.0, "level": 2.0}])
    assert coord.memory[server]["level"] == 2.0 and coord.memory[server]["level_reading"] == 4.2
    coord.learn([{**base, "rate": 2.0, "level": 1.5, "level_reading": 1.5}])  # read without a pause
    assert coord.memory[server]["level"] == 3.0 and coord.memory[server]["level_reading"] is None


def test_server_memory_keeps_measured_levels_not_guesses(tmp_path: Path) -> None:
    """Slow start's step back (0.8 of what it sent when first refused: 5.6 for a 4/s host) is a guess:
    remembered as a level, the next monthly run started above the limit."""
    coord = Coordinator(build_schedule(tmp_path), decrease=0.5)
    server = coord.order[0]
    base = {"server": server, "share": 1.0, "connection_cap": None, "paused_until": 0.0, "answers": 50, "peak": 5.0}
    coord.learn([{**base, "rate": 5.3, "level": 5.6, "level_guessed": True}])
    assert coord.memory[server]["level"] is None
    coord.learn([{**base, "rate": 3.8, "level": 4.0, "level_guessed": False}])
    assert coord.memory[server]["level"] == 4.0
    coord.learn([{**base, "rate": 3.9, "level": 5.6, "level_guessed": True}])  # a later guess: the measurement stays
    coord.learn([{**base, "rate": 3.9, "level": None}])
    assert coord.memory[server]["level"] == 4.0


def test_running_lanes_take_the_whole_server_once_no_lane_can_open(tmp_path: Path) -> None:
    coord = Coordinator(build_schedule(tmp_path, rules={"1": 2}), decrease=0.5)
    coord.request_lanes(0, free=3, held=set())  # lane 0 of long.org (6 batches), mid.org (4), short.org (1)
    coord.request_lanes(1, free=2, held={"short.org"})  # lane 1 of long.org and of mid.org
    assert sorted(coord.servers["long.org"].running.items()) == [(0, 0), (1, 1)]
    # long.org: batches 2-5 go to its two lanes; while both run, each keeps half of the server.
    for lane in (0, 1, 0, 1):
        assert coord.next_batch("long.org", lane, stats()) is not None
        assert coord.reshares("long.org") == []
    # Lane 0 asks for more and is closed, but its last batch still runs: nothing changes yet.
    assert coord.next_batch("long.org", 0, stats()) is None
    assert coord.reshares("long.org") == []
    # It ended: the lane on rank 1 takes the whole server, told once.
    coord.lane_closed("long.org", 0)
    assert coord.reshares("long.org") == [(1, 1.0)]
    assert coord.reshares("long.org") == []
    # A lane that died leaves its share to the others too.
    assert coord.next_batch("mid.org", 0, stats()) is not None
    assert coord.next_batch("mid.org", 1, stats()) is not None  # mid.org's 4 batches are all out
    assert coord.reshares("mid.org") == []
    coord.lane_failed("mid.org", 1, "boom")
    assert coord.reshares("mid.org") == []  # its fetches may still be sending until the rank joined it
    coord.lane_closed("mid.org", 1)
    assert coord.reshares("mid.org") == [(0, 1.0)]


def test_a_lane_closed_for_batches_but_still_running_is_told_pauses_and_levels(tmp_path: Path) -> None:
    """Lane 0 asked for more and got none, but its last batch still runs (and will be reshared to
    the whole server): a Retry-After or level another lane found must reach it too."""
    coord = Coordinator(build_schedule(tmp_path, rules={"1": 2}), decrease=0.5)
    coord.request_lanes(0, free=3, held=set())
    coord.request_lanes(1, free=2, held={"short.org"})
    for lane in (0, 1, 0, 1):
        assert coord.next_batch("long.org", lane, stats()) is not None
    assert coord.next_batch("long.org", 0, stats()) is None
    assert coord.pause("long.org", until=2e9, from_rank=1) == [0]
    coord.lane_closed("long.org", 0)
    assert coord.pause("long.org", until=2e9, from_rank=1) == []


def test_a_reshared_lane_remembers_the_whole_servers_connection_cap(tmp_path: Path) -> None:
    """Connections stay per lane when a lane takes a grown share of the rate: the server memory
    divides a lane's connection cap by its share of the connections, not of the rate."""
    spec = LaneSpec("s.org", 0, 2, 4.0, 20.0, 8, 0.5, memory={"rate": 4.0, "connection_cap": 4})
    ctl = lane_controller(spec)
    assert ctl.connection_cap == 2  # half of the server's 4
    lane = SimpleNamespace(spec=spec, controller=ctl, current=None, server_failed=False)
    ctl.answers = 10
    coord = Coordinator({"servers": []}, decrease=0.5)
    coord.learn([Lane.snapshot(lane)])  # type: ignore[arg-type]
    assert coord.memory["s.org"]["connection_cap"] == 4
    ctl.reshare(1.0)
    coord.learn([Lane.snapshot(lane)])  # type: ignore[arg-type]
    assert coord.memory["s.org"]["connection_cap"] == 4


def test_a_lane_alone_because_the_batches_ran_out_takes_the_whole_server(tmp_path: Path) -> None:
    coord = Coordinator(build_schedule(tmp_path, rules={"1": 2}), decrease=0.5)
    coord.request_lanes(0, free=3, held=set())  # lane 0 of each server; no second rank ever asks
    for _ in range(3):  # mid.org's 4 batches all go to lane 0: no second lane can open after this
        assert coord.reshares("mid.org") == []
        assert coord.next_batch("mid.org", 0, stats()) is not None
    assert coord.reshares("mid.org") == [(0, 1.0)]
    assert coord.request_lanes(1, free=3, held=set())[0].lane["server_name"] == "long.org"
