"""Thin `script:` entry of the tool_filter and tool_schedule rules; the logic is in distributed_downloader.tools."""

from distributed_downloader.tools.entry import run

run(snakemake)  # noqa: F821 - injected by Snakemake
