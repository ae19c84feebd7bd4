"""Tests for scheduling: lanes per server and which batches each round still has to do.

Manifests come from partition.write_partitions, markers from store.write_marker, all in tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distributed_downloader import config as config_mod
from distributed_downloader import inputs
from distributed_downloader.errors import ErrorCode
from distributed_downloader.plan import partition, schedule
from distributed_downloader.plan.profiling import ServerProfile
from distributed_downloader.store.files import Marker, write_marker


def make_run(tmp_path: Path, urls_per_server: dict[str, int], batch_size: int = 3, **cfg_extra):
    """Write an input CSV, initialize it for real, return (config, paths, manifest)."""
    lines = ["uuid,identifier,source_id"]
    for server, count in urls_per_server.items():
        lines += [f"{server}-{i},http://{server}/{i}.jpg,s{i}" for i in range(count)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "in.csv"
    source.write_text("\n".join(lines) + "\n")
    raw = {
        "path_to_input": str(source),
        "path_to_output": str(tmp_path / "out"),
        "downloader_parameters": {"batch_size": batch_size, "max_nodes": 2, "workers_per_node": 2},
    }
    cfg = config_mod.validate({**raw, **cfg_extra})
    paths = config_mod.paths(cfg)
    result = partition.write_partitions(inputs.rows(source), paths.urls, paths.rejected_table, batch_size)
    return cfg, paths, result.manifest


def profile(name: str, manifest: dict, max_rate: float = 10.0, error_code: int = 0, reason: str = "") -> ServerProfile:
    info = manifest["servers"][name]
    return ServerProfile(
        server_name=name,
        total_batches=len(info["fingerprints"]),
        total_urls=info["urls"],
        rate_limit=min(2.0, max_rate),
        max_rate=max_rate,
        max_connections=8,
        latency_ms=12.0,
        probe_status=200,
        robots_found=False,
        crawl_delay=0.0,
        advertised_rate=0.0,
        reachable=not error_code,
        reason=reason,
        error_code=error_code,
    )


def mark(
    paths,
    manifest: dict,
    server: str,
    pid: int,
    round_no: int = 1,
    transient: int = 0,
    fingerprint: str | None = None,
) -> None:
    fp = fingerprint or manifest["servers"][server]["fingerprints"][pid]
    write_marker(
        paths.batch_images(server, pid),
        Marker(fp, round_no, successes=1, errors=transient, transient=transient),
    )


# ---------------------------------------------------------------- lanes_for


@pytest.mark.parametrize(
    ("batches_left", "max_rate", "rules", "cpu", "ranks", "expected"),
    [
        (0, 100.0, {}, 1, 8, 0),
        (10, 100.0, {}, 1, 8, 2),  # ceil(100 / 60)
        (10, 100.0, {}, 2, 8, 1),  # ceil(100 / 120)
        (10, 50.0, {}, 1, 8, 1),  # the default ceiling fits one lane
        (10, 10.0, {}, 1, 8, 1),
        (10, 1000.0, {}, 1, 8, 8),  # capped by ranks
        (2, 1000.0, {}, 1, 8, 2),  # capped by batches left
        (10, 1000.0, {}, 1, 0, 1),  # at least one
        (5, 1.0, {"1": 1, "10": 2, "50": 4}, 1, 8, 1),
        (10, 1.0, {"1": 1, "10": 2, "50": 4}, 1, 8, 2),
        (60, 1.0, {"1": 1, "10": 2, "50": 4}, 1, 8, 4),
        (60, 1.0, {"1": 1, "10": 2, "50": 4}, 1, 3, 3),  # capped by ranks
        (3, 1000.0, {"10": 5}, 1, 8, 1),  # no rule applies: one lane, whatever the rate
        (12, 1.0, {10: 6}, 1, 8, 6),  # integer keys, as YAML gives them
        (4, 1.0, {"1": 6}, 1, 8, 4),  # never more lanes than batches
    ],
)
def test_lanes_for(batches_left: int, max_rate: float, rules: dict, cpu: int, ranks: int, expected: int) -> None:
    assert schedule.lanes_for(batches_left, max_rate, rules, cpu, ranks) == expected


# ---------------------------------------------------------------- build


def test_first_round_everything_full(tmp_path: Path) -> None:
    cfg, paths, manifest = make_run(tmp_path, {"a.org": 7, "b.org": 2})
    profiles = {n: profile(n, manifest) for n in manifest["servers"]}
    plan = schedule.build(manifest, profiles, paths, cfg, 1)
    assert plan["round"] == 1 and plan["num_rounds"] == 3
    servers = {s["server_name"]: s for s in plan["servers"]}
    assert [b["mode"] for b in servers["a.org"]["batches"]] == ["full"] * 3
    assert [b["partition_id"] for b in servers["a.org"]["batches"]] == [0, 1, 2]
    fingerprints = [b["fingerprint"] for b in servers["a.org"]["batches"]]
    assert fingerprints == manifest["servers"]["a.org"]["fingerprints"]
    assert servers["a.org"]["urls_left"] == 7
    assert servers["b.org"]["urls_left"] == 2
    assert plan["totals"] == {"servers": 2, "batches": 4, "urls": 9, "lower_bound_seconds": 0.7}
    assert plan["config"] == dict(cfg)


def test_modes_from_markers(tmp_path: Path) -> None:
    cfg, paths, manifest = make_run(tmp_path, {"a.org": 15})  # five batches of 3
    mark(paths, manifest, "a.org", 1, round_no=1, transient=2)  # retry in round 2
    mark(paths, manifest, "a.org", 2, round_no=1, transient=0)  # done
    mark(paths, manifest, "a.org", 3, round_no=2, transient=1)  # done in this very round already
    mark(paths, manifest, "a.org", 4, round_no=1, fingerprint="0" * 32)  # stale marker: other URL list
    plan = schedule.build(manifest, {"a.org": profile("a.org", manifest)}, paths, cfg, 2)
    (server,) = plan["servers"]
    modes = {b["partition_id"]: b["mode"] for b in server["batches"]}
    assert modes == {0: "full", 1: "retry", 4: "full"}
    assert server["urls_left"] == 9
    assert plan["totals"]["batches"] == 3


def test_batch_mode_directly(tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    assert schedule.batch_mode(folder, "f", 1, ignored=False) == "full"
    assert schedule.batch_mode(folder, "f", 1, ignored=True) == "ignored"
    write_marker(folder, Marker("f", 1, successes=3, errors=1, transient=1))
    assert schedule.batch_mode(folder, "f", 1, ignored=False) is None
    assert schedule.batch_mode(folder, "f", 2, ignored=False) == "retry"
    assert schedule.batch_mode(folder, "f", 2, ignored=True) == "ignored"
    assert schedule.batch_mode(folder, "g", 2, ignored=False) == "full"


def test_done_servers_are_left_out(tmp_path: Path) -> None:
    cfg, paths, manifest = make_run(tmp_path, {"a.org": 4, "b.org": 2})
    for pid in range(2):
        mark(paths, manifest, "a.org", pid)
    profiles = {n: profile(n, manifest) for n in manifest["servers"]}
    plan = schedule.build(manifest, profiles, paths, cfg, 2)
    assert [s["server_name"] for s in plan["servers"]] == ["b.org"]


def test_ignored_server_gets_ignored_mode_and_no_lanes(tmp_path: Path) -> None:
    cfg, paths, manifest = make_run(tmp_path, {"a.org": 4, "gone.org": 5})
    profiles = {
        "a.org": profile("a.org", manifest),
        "gone.org": profile("gone.org", manifest, error_code=ErrorCode.SERVER_IGNORED, reason="unreachable"),
    }
    mark(paths, manifest, "gone.org", 1)  # a finished batch stays finished
    plan = schedule.build(manifest, profiles, paths, cfg, 1)
    servers = {s["server_name"]: s for s in plan["servers"]}
    gone = servers["gone.org"]
    assert [(b["partition_id"], b["mode"]) for b in gone["batches"]] == [(0, "ignored")]
    assert gone["lanes"] == 0
    assert gone["ignored_code"] == int(ErrorCode.SERVER_IGNORED)
    assert gone["ignored_reason"] == "unreachable"
    assert servers["a.org"]["lanes"] >= 1
    assert plan["servers"][-1]["server_name"] == "gone.org"  # no time estimate: scheduled last


def test_a_server_unreachable_at_profiling_is_held_for_round_one_only(tmp_path: Path) -> None:
    cfg, paths, manifest = make_run(tmp_path, {"a.org": 2, "down.org": 2})
    profiles = {
        "a.org": profile("a.org", manifest),
        "down.org": profile("down.org", manifest, error_code=ErrorCode.SERVER_UNREACHABLE, reason="probe failed: x"),
    }
    first = {s["server_name"]: s for s in schedule.build(manifest, profiles, paths, cfg, 1)["servers"]}
    assert first["down.org"]["ignored_code"] == ErrorCode.SERVER_UNREACHABLE and first["down.org"]["lanes"] == 0
    assert {b["mode"] for b in first["down.org"]["batches"]} == {"ignored"}
    second = {s["server_name"]: s for s in schedule.build(manifest, profiles, paths, cfg, 2)["servers"]}
    assert second["down.org"]["ignored_code"] == 0 and second["down.org"]["lanes"] >= 1
    assert second["down.org"]["ignored_reason"] == ""
    assert {b["mode"] for b in second["down.org"]["batches"]} == {"full"}  # nothing committed in this test


def test_servers_sorted_by_estimated_seconds_descending(tmp_path: Path) -> None:
    cfg, paths, manifest = make_run(tmp_path, {"fast.org": 30, "slow.org": 4, "mid.org": 10, "zero.org": 3})
    profiles = {
        "fast.org": profile("fast.org", manifest, max_rate=10.0),  # 3 s
        "slow.org": profile("slow.org", manifest, max_rate=0.1),  # 40 s
        "mid.org": profile("mid.org", manifest, max_rate=1.0),  # 10 s
        "zero.org": profile("zero.org", manifest, error_code=int(ErrorCode.ROBOTS_DISALLOWED)),
    }
    plan = schedule.build(manifest, profiles, paths, cfg, 1)
    assert [s["server_name"] for s in plan["servers"]] == ["slow.org", "mid.org", "fast.org", "zero.org"]
    assert plan["totals"]["lower_bound_seconds"] == 40.0


def test_lanes_with_and_without_schedule_rules(tmp_path: Path) -> None:
    def lanes(folder: Path, **extra) -> dict[str, int]:
        cfg, paths, manifest = make_run(folder, {"big.org": 30, "small.org": 3}, **extra)
        profiles = {n: profile(n, manifest, max_rate=100.0) for n in manifest["servers"]}
        plan = schedule.build(manifest, profiles, paths, cfg, 1)
        return {s["server_name"]: s["lanes"] for s in plan["servers"]}

    # ceil(100 / 60) = 2 lanes for big.org; small.org has a single batch, so a single lane
    assert lanes(tmp_path / "a") == {"big.org": 2, "small.org": 1}
    assert lanes(tmp_path / "b", schedule_rules={"1": 1, "5": 2}) == {"big.org": 2, "small.org": 1}


# ---------------------------------------------------------------- a round with nothing to do


def test_an_empty_round_ends_without_mpi_and_without_importing_the_worker(tmp_path: Path) -> None:
    """empty_round.py exits 0 with the done file written, in well under the worker's import time."""
    import json
    import subprocess
    import sys

    from distributed_downloader.engine.rounds import finish_if_empty

    cfg, paths, manifest = make_run(tmp_path, {"a.org": 4})
    profiles = {n: profile(n, manifest) for n in manifest["servers"]}
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps(schedule.build(manifest, profiles, paths, cfg, 1)))
    assert not finish_if_empty(listed, tmp_path / "listed.done")  # batches to download: MPI's job
    assert not (tmp_path / "listed.done").exists()
    for pid in range(2):  # every listed batch already done (a resumed round): nothing left
        mark(paths, manifest, "a.org", pid)
    assert finish_if_empty(listed, tmp_path / "listed.done")

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"round": 2, "servers": [], "config": dict(cfg)}))
    script = Path(__file__).resolve().parents[2] / "workflow_scripts" / "empty_round.py"
    probe = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('worker imported:', 'distributed_downloader.engine.worker' in sys.modules))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(script), str(empty), str(tmp_path / "empty.done")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "empty.done").read_text())["round"] == 2
    assert "nothing to do" in done.stdout
    assert "worker imported: False" in done.stdout  # its imports cost seconds between rounds


def test_a_round_leaves_work_when_a_batch_has_no_marker_or_urls_to_try_again(tmp_path: Path) -> None:
    from distributed_downloader.engine.rounds import finish_if_empty, more_rounds
    from distributed_downloader.engine.worker import leaves_work

    cfg, paths, manifest = make_run(tmp_path, {"a.org": 4, "b.org": 2})
    profiles = {n: profile(n, manifest) for n in manifest["servers"]}
    plan = schedule.build(manifest, profiles, paths, cfg, 1)
    assert leaves_work(plan, paths)  # nothing done yet (a failed batch has no marker)
    mark(paths, manifest, "a.org", 0)
    mark(paths, manifest, "a.org", 1)
    assert leaves_work(plan, paths)  # b.org's batch has none
    mark(paths, manifest, "b.org", 0, transient=1)
    assert leaves_work(plan, paths)  # one URL to try again
    mark(paths, manifest, "b.org", 0)
    assert not leaves_work(plan, paths)
    # what the next round's schedule agrees with
    assert schedule.build(manifest, profiles, paths, cfg, 2)["servers"] == []

    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps(plan))
    assert finish_if_empty(listed, tmp_path / "r1.done")  # a resumed round whose batches are all done
    assert json.loads((tmp_path / "r1.done").read_text())["leaves_work"] is False
    assert not more_rounds(tmp_path / "r1.done")


@pytest.mark.parametrize(
    ("content", "more"),
    [
        ('{"round": 1, "leaves_work": false}', False),
        ('{"round": 1, "leaves_work": true}', True),
        ('{"round": 1, "ranks": 2}', True),  # written before leaves_work: every round runs, as it did
        ("not json", True),
        ("[1]", True),
    ],
)
def test_more_rounds_reads_the_done_file_and_says_yes_when_unsure(tmp_path: Path, content: str, more: bool) -> None:
    from distributed_downloader.engine.rounds import more_rounds

    done = tmp_path / "download_round_1.done"
    done.write_text(content)
    assert more_rounds(done) is more
    assert more_rounds(tmp_path / "missing.done") is True


@pytest.mark.parametrize(
    ("known_rate", "expected"),
    [
        (None, 2),  # nothing known: lanes for the ceiling (ceil(100 / 60))
        (4.0, 1),  # a 4 req/s server needs one lane: two would collide on its small burst
        (40.0, 1),  # 40 x 1.25 = 50 fits one lane
        (60.0, 2),  # 75 does not
        (500.0, 2),  # never beyond the ceiling's lanes
    ],
)
def test_lanes_for_a_server_whose_rate_is_known(known_rate: float | None, expected: int) -> None:
    assert schedule.lanes_for(10, 100.0, {}, 1, 8, known_rate=known_rate) == expected


def test_build_gives_lanes_by_the_remembered_level(tmp_path: Path) -> None:
    """Round 2 (or a resume, or the next monthly snapshot) knows each server's level: a slow server
    with many batches gets one lane, a fast one still two."""
    cfg, paths, manifest = make_run(tmp_path, {"slow.org": 12, "fast.org": 12})
    profiles = {n: profile(n, manifest, max_rate=100.0) for n in manifest["servers"]}
    first = {s["server_name"]: s["lanes"] for s in schedule.build(manifest, profiles, paths, cfg, 1)["servers"]}
    assert first == {"slow.org": 2, "fast.org": 2}
    paths.state.mkdir(parents=True, exist_ok=True)
    (paths.state / "server_memory.json").write_text(
        json.dumps({"slow.org": {"rate": 3.8, "level": 4.0}, "fast.org": {"rate": 90.0, "level": 95.0}})
    )
    second = {s["server_name"]: s["lanes"] for s in schedule.build(manifest, profiles, paths, cfg, 1)["servers"]}
    assert second == {"slow.org": 1, "fast.org": 2}


def test_schedule_rules_give_no_more_lanes_than_a_remembered_rate_needs() -> None:
    """Lanes on other ranks collide on a small burst (simulated, a 4 req/s burst-1 server: 1 lane 0.5%
    refused and 88% of its rate held, 2 lanes 25% refused and 11% held); schedule_rules bypassed the
    rate's need that lanes by rate observe."""
    assert schedule.lanes_for(10, 100.0, {"1": 3}, 1, 8, known_rate=4.0) == 1
    assert schedule.lanes_for(10, 200.0, {"1": 3}, 1, 8, known_rate=100.0) == 3  # ceil(125 / 60)
    assert schedule.lanes_for(10, 100.0, {"1": 3}, 1, 8) == 3  # nothing remembered: the rules


def test_build_gives_no_more_lanes_than_a_remembered_connection_cap(tmp_path: Path) -> None:
    """Each lane holds at least one connection: 4 lanes of a server remembered to take 2 at once held 4."""
    cfg, paths, manifest = make_run(tmp_path, {"capped.org": 12}, schedule_rules={"1": 4})
    profiles = {n: profile(n, manifest, max_rate=100.0) for n in manifest["servers"]}
    paths.state.mkdir(parents=True, exist_ok=True)
    (paths.state / "server_memory.json").write_text(json.dumps({"capped.org": {"connection_cap": 2}}))
    plan = schedule.build(manifest, profiles, paths, cfg, 1)
    assert [s["lanes"] for s in plan["servers"]] == [2]
