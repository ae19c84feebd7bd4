# distributed-downloader: a server-friendly, resumable bulk image downloader.
# Stages: initialize -> profile_servers -> schedule/download (one MPI job per round) -> verify -> tools.

import os

from snakemake.utils import min_version

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


report: "rules/report/workflow.rst"


include: "rules/common.smk"
include: "rules/initialize.smk"
include: "rules/profile.smk"
include: "rules/download.smk"
include: "rules/verify.smk"
include: "rules/snapshot.smk"
include: "rules/tools.smk"
include: "rules/report.smk"


check_mpi_launchers("download", "tool_run")


rule all:
    default_target: True
    input:
        get_final_output(),
