"""What ``workflow_scripts/run_tool_stage.py`` runs in the ``tool_filter`` / ``tool_schedule`` jobs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from distributed_downloader.tools import registry


def _logging_to(log_path: str | None, level: str) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )


def run_stage(config: Any, tool: str, stage: str, output: Path) -> dict:
    classes = registry.resolve(tool, config)
    if stage == "filter":
        part = classes.filter(config, tool)
        summary = part.run()
        if Path(output) != part.tool_paths.filter_summary:
            raise RuntimeError(f"the filter wrote {part.tool_paths.filter_summary}, the rule expects {output}")
        return summary
    if stage == "schedule":
        part = classes.scheduler(config, tool)
        plan = part.run()
        if Path(output) != part.tool_paths.schedule or not Path(output).exists():
            raise RuntimeError(f"the scheduler did not write {output}")
        return plan
    raise ValueError(f"unknown tool stage {stage!r}")


def run(smk: Any) -> None:
    config = smk.config
    _logging_to(smk.log[0] if smk.log else None, config["downloader_parameters"]["logger_level"])
    tool, stage = smk.wildcards.tool, smk.params.stage
    try:
        run_stage(config, tool, stage, Path(smk.output[0]))
    except Exception:
        logging.getLogger("distributed_downloader.tools").exception("tool %s: stage %s failed", tool, stage)
        raise
