"""A monthly snapshot starts each server from what the previous run learned of it (previous.learned_limits)."""

from __future__ import annotations

import json
from pathlib import Path

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
