# Paths from the validated config, input functions, wildcard constraints.
import json
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

SCRIPTS_DIR = Path(workflow.basedir) / "workflow_scripts"
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))

from distributed_downloader import config as dd_config
from distributed_downloader.engine import launch as dd_launch
from distributed_downloader.engine import rounds as dd_rounds
from distributed_downloader.tools.dataset import ToolPaths

try:
    config.update(dd_config.validate(config))
except dd_config.ConfigError as error:
    raise WorkflowError(f"invalid configuration: {error}")

PATHS = dd_config.paths(config)
ROUNDS = config["downloader_parameters"]["num_downloads"]
PYTHON = sys.executable
# PYTHONPATH (jobs import the package even without `pip install`) and the original's
# environment variables (CONFIG_PATH, PATH_TO_INPUT, OUTPUT_*, DOWNLOADER_*, TOOLS_*) for jobs.
dd_config.export_environment(config, SCRIPTS_DIR)


wildcard_constraints:
    round=r"\d+",


def urls_manifest():
    return str(PATHS.urls_manifest)


def schedule_file(round_no):
    return str(PATHS.round_schedule(round_no))


def round_done(round_no):
    return str(PATHS.round_done(round_no))


def final_round_done(wildcards):
    """The done file of the last round that runs: the first that leaves nothing to retry, else the last."""
    for round_no in range(1, ROUNDS + 1):
        done = checkpoints.download.get(round=str(round_no)).output[0]
        if round_no == ROUNDS or not dd_rounds.more_rounds(Path(done)):
            return done


def log_file(name):
    return str(PATHS.logs / f"{name}.log")


def schedule_inputs(wildcards):
    """Round r is planned from the profiles and, after round 1, from the end of round r-1."""
    round_no = int(wildcards.round)
    inputs = {"manifest": urls_manifest(), "profiles": str(PATHS.profiles_table)}
    if round_no > 1:
        inputs["previous"] = round_done(round_no - 1)
    return inputs


def download_tasks():
    params = config["downloader_parameters"]
    return params["max_nodes"] * params["workers_per_node"]


def mpi_launcher(wildcards, resources):
    """resources.mpi with a bare mpiexec/mpirun made the one beside this Python (the venv's, activated or not)."""
    return dd_launch.resolve(resources.mpi)


def check_mpi_launchers(*names):
    """Before any job: stop, naming what is missing, when an MPI rule's launcher is not on this machine."""
    for name in names:
        try:
            raw = getattr(rules, name).rule.resources["mpi"].raw
        except (AttributeError, KeyError):
            continue  # Snakemake keeps resources elsewhere: the job itself fails on a missing launcher
        command = dd_launch.literal(raw)
        # None: an expression (of wildcards, input...) only the job can evaluate
        problem = dd_launch.problem(command, name) if command is not None else None
        if problem:
            raise WorkflowError(problem)


def verification_report():
    return str(PATHS.reports / "verification.json")


def plot_file(name):
    return str(PATHS.reports / "plots" / f"{name}.svg")


def snapshot_params():
    """What the snapshot plan depends on besides the input: a change re-initializes ("" without one)."""
    if not config["previous_dataset"]:
        return ""
    return json.dumps(
        {"previous_dataset": config["previous_dataset"], "snapshot_parameters": config["snapshot_parameters"]},
        sort_keys=True,
    )


def snapshot_report_file(ext):
    return str(PATHS.reports / f"snapshot_changes.{ext}")


def get_final_output():
    snapshot = [snapshot_report_file("json")] if config["previous_dataset"] else []
    return (
        [verification_report(), plot_file("throughput"), plot_file("errors_by_server"), plot_file("rate_over_time")]
        + snapshot
        + [str(ToolPaths.of(PATHS, tool).done) for tool in config["tools"]]
    )
