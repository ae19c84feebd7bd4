"""What a run produced: ``verify`` (every URL ends once in successes or errors), ``status`` (progress from
the output folder), ``plots`` (figures of the Snakemake report), ``snapshot_report`` (a snapshot's changes)."""
