"""Output folders written before issue #17 stay up to date: Snakemake reruns a rule whose params differ from
those recorded for its outputs, or whose ``script:`` is newer than them (a ``git pull`` that edits the script
gives it a new mtime). Either reran a finished run from ``initialize`` on (profiling every server again)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# rule -> its params.stage before #17, when run_stage.py picked the code by it (snakemake records it)
STAGE_PARAMS = {
    "initialize": "initialize",
    "profile_servers": "profile_servers",
    "schedule": "schedule",
    "verify": "verify",
    "report_plots": "report_plots",
    "snapshot_report": "snapshot_report",
}
# sha256 of workflow_scripts/run_stage.py as it has been since the first pipeline commit
RUN_STAGE_SHA256 = "1a140f48d434c49c6fddd83758f6c4272d946b3d44d1c9f3dc1f78724eae9fbc"


def test_run_stage_script_is_unchanged() -> None:
    text = (ROOT / "workflow_scripts" / "run_stage.py").read_bytes()
    assert hashlib.sha256(text).hexdigest() == RUN_STAGE_SHA256, "run_stage.py changed: see rule_entry.py"


def test_rules_keep_their_recorded_stage_params() -> None:
    found = {}
    for smk in (ROOT / "rules").glob("*.smk"):
        for name, body in re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", smk.read_text(), flags=re.M):
            stage = re.search(r'^\s+stage="(\w+)"', body, flags=re.M)
            if stage:
                found[name] = stage.group(1)
    assert {rule: found.get(rule) for rule in STAGE_PARAMS} == STAGE_PARAMS
