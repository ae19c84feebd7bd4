"""What ``workflow_scripts/run_tool_stage.py`` runs in the ``tool_filter`` / ``tool_schedule`` jobs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distributed_downloader.logs import log_to
from distributed_downloader.tools import registry


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
    log_to(smk.log[0] if smk.log else None, config["downloader_parameters"]["logger_level"], mode="w", stderr=True)
    tool, stage = smk.wildcards.tool, smk.params.stage
    try:
        run_stage(config, tool, stage, Path(smk.output[0]))
    except Exception:
        logging.getLogger("distributed_downloader.tools").exception("tool %s: stage %s failed", tool, stage)
        raise
