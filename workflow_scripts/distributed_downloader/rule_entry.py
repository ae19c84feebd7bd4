"""What ``workflow_scripts/run_stage.py`` imports: ``stages.run`` (log, then ``stages.STAGES[snakemake.rule]``).

run_stage.py keeps its text from before issue #17 on purpose: Snakemake reruns a ``script:`` rule whose
script is newer than its outputs, so an edit there (a ``git pull`` gives the file a new mtime) reran every
output folder written before from ``initialize`` on. See ``tests/unit/test_rule_provenance.py``.
"""

from distributed_downloader.stages import run

__all__ = ["run"]
