"""Thin `script:` entry shared by the light rules; the logic lives in distributed_downloader.stages."""

from distributed_downloader.rule_entry import run

run(snakemake)  # noqa: F821 - injected by Snakemake
