"""What `workflow_scripts/run_stage.py` runs inside a Snakemake `script:` job: log to the rule's
log file, then call the stage named by the rule's `params.stage`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distributed_downloader import stages
from distributed_downloader.logs import log_to


def run(smk: Any) -> None:
    config = smk.config
    log_to(smk.log[0] if smk.log else None, config["downloader_parameters"]["logger_level"], mode="w", stderr=True)
    stage = smk.params.stage
    try:
        if stage == "initialize":
            stages.initialize(config, Path(smk.output[0]))
        elif stage == "profile_servers":
            stages.profile_servers(config)
        elif stage == "schedule":
            stages.make_schedule(config, int(smk.wildcards.round), Path(smk.output[0]))
        elif stage == "report_plots":
            from distributed_downloader import config as config_mod
            from distributed_downloader.report import plots

            paths = config_mod.paths(config)
            plots.make_all(Path(smk.input.verification), paths.state, paths.images, dict(smk.output.items()))
        elif stage == "verify":
            stages.verify_downloads(config, Path(smk.output.json), Path(smk.output.csv))
        elif stage == "snapshot_report":
            stages.snapshot_report(config, Path(smk.output.json), Path(smk.output.csv))
        else:
            raise ValueError(f"unknown stage {stage!r}")
    except Exception:
        logging.getLogger("distributed_downloader").exception("stage %s failed", stage)
        raise
