# Tools (README: Tools): per tool, filter -> schedule -> run (MPI), after verification.
# config["tools"] runs in order, each tool on the dataset the previous one left; any tool also runs
# on its own by asking for <tools_folder>/<tool>/_done.json. The image store is rewritten in place
# (undeclared), so only the small summaries are declared outputs; per-partition markers under
# <tools_folder>/<tool>/done/ make a killed run resume without applying the tool twice.
from distributed_downloader.tools.registry import TOOL_NAME_PATTERN
from distributed_downloader.front.tool_rules import ToolRules

TOOLS = ToolRules(config, PATHS, verification_report())
TOOLS.check_configured()


wildcard_constraints:
    tool=TOOL_NAME_PATTERN,


rule tool_filter:
    input:
        unpack(TOOLS.filter_inputs),
    output:
        TOOLS.filter_summary("{tool}"),
    log:
        log_file("tools/{tool}/filter"),
    conda:
        "../envs/environment.yaml"
    script:
        "../workflow_scripts/run_stage.py"


rule tool_schedule:
    input:
        TOOLS.filter_summary("{tool}"),
    output:
        TOOLS.schedule("{tool}"),
    log:
        log_file("tools/{tool}/schedule"),
    localrule: True
    conda:
        "../envs/environment.yaml"
    script:
        "../workflow_scripts/run_stage.py"


# One MPI job per tool, like download: every rank rewrites its scheduled partitions.
rule tool_run:
    input:
        schedule=TOOLS.schedule("{tool}"),
    output:
        TOOLS.done("{tool}"),
    log:
        log_file("tools/{tool}/run"),
    conda:
        "../envs/environment.yaml"
    threads: 1
    resources:
        nodes=config["tools_parameters"]["max_nodes"],
        tasks=TOOLS.tasks(),
        cpus_per_task=config["tools_parameters"]["cpu_per_worker"],
        mpi="mpiexec",
    params:
        python=PYTHON,
        worker=str(SCRIPTS_DIR / "tool_worker.py"),
        mpi=mpi_launcher,
    shell:
        "{params.mpi} -n {resources.tasks} {params.python:q} {params.worker:q}"
        " --tasks {resources.tasks} {input.schedule:q} {output:q} > {log:q} 2>&1"
