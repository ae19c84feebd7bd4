"""A job's logging: one helper for the rule scripts (file + stderr) and the MPI ranks (their own file)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from distributed_downloader.logs import log_to


@pytest.fixture
def root_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_rank_log_and_a_rule_log(tmp_path: Path, capsys: pytest.CaptureFixture[str], root_restored: None) -> None:
    rank_log = tmp_path / "logs" / "tools" / "t" / "rank_1.log"  # folders made
    log_to(rank_log, "INFO")
    logging.getLogger("distributed_downloader.x").debug("not at INFO")
    worker = threading.Thread(target=lambda: logging.getLogger("distributed_downloader.x").info("from %s", "a lane"))
    worker.start()
    worker.join()
    line = rank_log.read_text().strip()
    assert line.endswith(f"INFO {worker.name} distributed_downloader.x: from a lane") and "not at" not in line
    assert capsys.readouterr().err == ""  # a rank logs to its file only

    rule_log = tmp_path / "logs" / "verify.log"
    rule_log.parent.mkdir(parents=True, exist_ok=True)
    rule_log.write_text("an earlier attempt\n")
    log_to(rule_log, "WARNING", mode="w", stderr=True)
    logging.getLogger("distributed_downloader").warning("verified")
    assert (
        rule_log.read_text().count("\n") == 1
        and "WARNING MainThread distributed_downloader: verified" in rule_log.read_text()
    )
    assert "verified" in capsys.readouterr().err
    assert "from a lane" in rank_log.read_text()  # the earlier file is no longer written, not truncated
