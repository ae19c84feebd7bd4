"""Thin `script:` entry of every light rule: distributed_downloader.stages.STAGES[snakemake.rule] runs."""

from distributed_downloader.stages import run

run(snakemake)  # noqa: F821 - injected by Snakemake
