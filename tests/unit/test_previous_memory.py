"""A monthly snapshot starts each server from what the previous run learned of it (previous.learned_limits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distributed_downloader.plan import previous
from distributed_downloader.plan.server_memory import read_memory


def _run(folder: Path, memory: dict | str) -> Path:
    state = folder / "state"
    state.mkdir(parents=True)
    (state / "server_memory.json").write_text(memory if isinstance(memory, str) else json.dumps(memory))
    (folder / "downloaded_images").mkdir()
    return folder


def test_learned_limits_carry_rate_level_and_cap_not_pauses(tmp_path: Path) -> None:
    out = _run(
        tmp_path / "march",
        {
            "a.org": {"rate": 12.5, "level": 13.1, "connection_cap": 3, "paused_until": 9e9},
            "b.org": {"rate": 4.0, "level": None, "connection_cap": None, "paused_until": 0.0},
            "c.org": {"paused_until": 9e9},  # nothing learned but a pause: nothing carried
            "d.org": "garbage",
        },
    )
    learned = previous.learned_limits([str(out)])
    assert learned == {"a.org": {"rate": 12.5, "level": 13.1, "connection_cap": 3}, "b.org": {"rate": 4.0}}


def test_the_images_folder_works_too_and_the_first_listed_run_wins(tmp_path: Path) -> None:
    march = _run(tmp_path / "march", {"a.org": {"rate": 10.0, "level": 11.0}})
    february = _run(tmp_path / "february", {"a.org": {"rate": 2.0, "level": 2.0}, "b.org": {"rate": 7.0}})
    learned = previous.learned_limits([str(march / "downloaded_images"), str(february)])
    assert learned == {"a.org": {"rate": 10.0, "level": 11.0}, "b.org": {"rate": 7.0}}


def test_missing_or_unreadable_memory_is_no_memory(tmp_path: Path) -> None:
    broken = _run(tmp_path / "broken", "{not json")
    assert previous.learned_limits([str(broken), str(tmp_path / "nowhere")]) == {}


def test_this_runs_own_memory_comes_first(tmp_path: Path) -> None:
    """A resumed run keeps what it learned itself; the previous run fills in servers it has not met."""
    march = _run(tmp_path / "march", {"a.org": {"rate": 10.0, "level": 11.0}, "b.org": {"rate": 7.0, "level": 7.5}})
    own = tmp_path / "april" / "state" / "server_memory.json"
    own.parent.mkdir(parents=True)
    own.write_text(json.dumps({"a.org": {"rate": 3.0, "level": 3.2, "connection_cap": None, "paused_until": 0.0}}))
    memory = read_memory(own, [str(march)])
    assert memory["a.org"]["level"] == 3.2 and memory["b.org"] == {"rate": 7.0, "level": 7.5}
    assert read_memory(tmp_path / "none.json", None) == {}


def test_damaged_memory_values_are_left_out_not_fatal(tmp_path: Path) -> None:
    """An edited or damaged memory file: a non-dict entry failed the coordinator, a NaN/infinite cap
    or a string failed the lane's controller (the rank, the MPI job); an infinite rate or level
    started a lane at its ceiling. Only finite positive figures (a pause >= 0) are kept."""
    from distributed_downloader.engine.coordinator import Coordinator
    from distributed_downloader.engine.lane import LaneSpec, lane_controller

    own = tmp_path / "april" / "state" / "server_memory.json"
    own.parent.mkdir(parents=True)
    own.write_text(
        '{"a.org": 1, "b.org": {"rate": "fast", "connection_cap": NaN, "paused_until": "soon"},'
        ' "c.org": {"connection_cap": Infinity, "level": -5, "paused_until": Infinity, "rate": 6},'
        ' "d.org": {"rate": 3.5, "level": 4, "connection_cap": 2, "paused_until": 0}}'
    )
    march = _run(tmp_path / "march", '{"e.org": {"rate": Infinity, "level": Infinity, "connection_cap": 2}}')
    assert previous.learned_limits([str(march)]) == {"e.org": {"connection_cap": 2}}
    memory = read_memory(own, [str(march)])
    assert memory == {
        "a.org": {},
        "b.org": {},
        "c.org": {"rate": 6.0},
        "d.org": {"rate": 3.5, "level": 4.0, "connection_cap": 2, "paused_until": 0.0},
        "e.org": {"connection_cap": 2},
    }
    coordinator = Coordinator({"servers": []}, 0.3, memory)
    for name, entry in coordinator.memory.items():
        ctl = lane_controller(LaneSpec(name, 0, 1, 2.0, 50.0, 8, 0.3, memory=entry))
        assert ctl.rate <= 6.0 and ctl.paused_for() == 0.0 and (ctl.level is None or ctl.level == 4.0)


def test_a_lane_starts_just_below_its_remembered_level_not_at_a_remembered_probe() -> None:
    """Memory of a 4/s host: level 3.69, rate 3.84 (its lane was probing above the level when the run
    ended). Started at 3.84, one probe passed 1.05 x the level, the level was forgotten and the lane
    regrew to 5.2 req/s: a refusal on each of five hosts of the snapshot bench's second run."""
    from distributed_downloader.engine.lane import LaneSpec, lane_controller
    from distributed_downloader.net.politeness import RateController

    ctl = lane_controller(LaneSpec("h", 0, 1, 3.0, 50.0, 8, 0.3, memory={"rate": 3.84, "level": 3.69}))
    assert ctl.level == 3.69 and not ctl.slow_start
    assert abs(ctl.rate - 3.69 * (1 - RateController.HEADROOM)) < 1e-9


@pytest.mark.parametrize(("reading", "guessed"), [(6.0, True), (4.2, False), (None, False)])
def test_a_remembered_low_end_far_below_its_reading_is_probed_like_a_guess(reading, guessed) -> None:  # noqa: ANN001
    """The low end of a reading through a long pause may lie at half the limit: held as a measured
    level, the next run sat there for 300 s; far below what its lane ran at, it is probed like a guess."""
    from distributed_downloader.engine.lane import LaneSpec, lane_controller

    memory = {"rate": 3.8, "level": 4.0, "level_reading": reading}
    ctl = lane_controller(LaneSpec("h", 0, 1, 3.0, 50.0, 8, 0.3, memory=memory))
    assert ctl.level == 4.0 and ctl.level_guessed is guessed


def test_the_reading_beside_a_level_carries_to_the_next_monthly_run(tmp_path: Path) -> None:
    out = _run(tmp_path / "march", {"a.org": {"rate": 3.8, "level": 4.0, "level_reading": 6.0}})
    assert previous.learned_limits([str(out)]) == {"a.org": {"rate": 3.8, "level": 4.0, "level_reading": 6.0}}


def test_a_previous_dataset_under_home_carries_its_limits(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """``previous_dataset: ~/runs/march`` reused march's rows (load() expands ``~``) but not its
    limits: every server started at default_rate again, above a 4/s host's level."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _run(tmp_path / "runs" / "march", {"a.org": {"rate": 3.6, "level": 4.0}})
    assert previous.learned_limits(["~/runs/march"]) == {"a.org": {"rate": 3.6, "level": 4.0}}
