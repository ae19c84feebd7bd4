"""What each Snakemake rule runs: ``STAGES[rule]``, one function per rule, named after the rule.

The light rules (rules/*.smk: initialize, profile_servers, schedule, verify, report_plots,
snapshot_report, tool_filter, tool_schedule) all run ``workflow_scripts/run_stage.py``, which calls
``run(snakemake)``: log to the rule's log file, then ``STAGES[snakemake.rule](snakemake)``. Each entry of
the table reads what its function needs from the job (config, wildcards, inputs, outputs); the functions
themselves are plain functions of the validated config, called as such by the tests. The two MPI rules,
download and tool_run, start their ranks with download_worker.py (engine/worker.py) and tool_worker.py
(tools/worker.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from distributed_downloader import config as config_mod
from distributed_downloader import inputs
from distributed_downloader.engine.probe_rows import ProbeKeeper
from distributed_downloader.logs import log_to
from distributed_downloader.net.fetch import FetchSettings
from distributed_downloader.plan import partition, profiling, snapshot, stale_images
from distributed_downloader.plan import schedule as schedule_mod
from distributed_downloader.report import verify as verify_mod
from distributed_downloader.store.files import atomic_write_json

log = logging.getLogger("distributed_downloader")


def initialize(config: Mapping, manifest_out: Path) -> dict:
    paths = config_mod.paths(config)
    rows = inputs.rows(config["path_to_input"], config["initializer"], config.get("path_to_occurrences", ""))
    result = partition.write_partitions(
        rows, paths.urls, paths.rejected_table, config["downloader_parameters"]["batch_size"]
    )
    summary = {
        "input_rows": result.input_rows,
        "rejected_rows": result.rejected_rows,
        "servers": len(result.manifest["servers"]),
        "batches": sum(len(s["fingerprints"]) for s in result.manifest["servers"].values()),
    }
    planned = snapshot.plan(config, paths, result.manifest)  # monthly snapshots: what previous_dataset holds
    if planned is not None:
        summary["snapshot"] = planned["totals"]
    moved = stale_images.move_aside(result.manifest, paths.images, paths.output)
    summary["stale_partitions_moved"] = len(moved)
    for entry in moved:
        log.warning("moved aside %s (%s) to %s", entry["from"], entry["reason"], entry["to"])
    log.info("initialized: %s", summary)
    if Path(manifest_out) != paths.urls_manifest:
        atomic_write_json(Path(manifest_out), result.manifest)
    return summary


def profile_servers(config: Mapping) -> list[profiling.ServerProfile]:
    paths = config_mod.paths(config)
    params = config["downloader_parameters"]
    manifest = partition.read_manifest(paths.urls)
    settings = profiling.ProbeSettings(
        fetch=FetchSettings.from_config(params),
        default_rate=params["default_rate_limit"],
        max_rate=params["max_rate_limit"],
        max_connections=params["max_connections_per_server"],
        respect_robots=params["respect_robots_txt"],
        keep_probe=ProbeKeeper(paths, manifest, params),
    )
    ignored = profiling.read_ignored_list(params["ignored_servers"])
    results = profiling.profile_all(
        manifest,
        paths.urls,
        settings,
        ignored,
        # A snapshot probes a URL it will download (the probe is its first request), none when all is reused.
        samples=lambda name, count: snapshot.download_sample(
            paths, name, len(manifest["servers"][name]["fingerprints"]), count
        ),
    )
    profiling.write_tables(results, paths.profiles_table, paths.ignored_table, paths.robots)
    for profile, _ in results:
        log.info(
            "%s: %s, latency %.0f ms, start %.2f req/s, ceiling %.2f req/s%s",
            profile.server_name,
            "reachable" if profile.reachable else "unreachable",
            profile.latency_ms,
            profile.rate_limit,
            profile.max_rate,
            f" -- ignored: {profile.reason}" if profile.error_code else "",
        )
    return [p for p, _ in results]


def schedule(config: Mapping, round_no: int, out: Path) -> dict:
    paths = config_mod.paths(config)
    manifest = partition.read_manifest(paths.urls)
    profiles = profiling.read_profiles(paths.profiles_table)
    plan = schedule_mod.build(manifest, profiles, paths, config, round_no)
    atomic_write_json(Path(out), plan)
    log.info("round %d: %s", round_no, plan["totals"])
    return plan


def verify(config: Mapping, json_out: Path, csv_out: Path) -> dict:
    paths = config_mod.paths(config)
    manifest = partition.read_manifest(paths.urls)
    result = verify_mod.verify_all(manifest, paths)
    verify_mod.write_reports(result, Path(json_out), Path(csv_out))
    totals = result["totals"]
    log.info(
        "verified %d URLs of %d servers: %d successes, %d errors, %d input rows rejected",
        totals["urls"],
        len(result["servers"]),
        totals["successes"],
        totals["errors"],
        result["rejected_rows"],
    )
    if not result["ok"]:
        raise RuntimeError("verification failed:\n" + "\n".join(result["problems"][:50]))
    return result


def report_plots(config: Mapping, verification: Path, outputs: Mapping[str, str]) -> None:
    from distributed_downloader.report import plots

    paths = config_mod.paths(config)
    plots.make_all(Path(verification), paths, dict(outputs))


def snapshot_report(config: Mapping, json_out: Path, csv_out: Path) -> dict:
    from distributed_downloader.report import snapshot_report as report_mod

    paths = config_mod.paths(config)
    report = report_mod.write(paths, partition.read_manifest(paths.urls), Path(json_out), Path(csv_out))
    log.info("snapshot changes: %s", report["totals"])
    return report


def tool_filter(config: Mapping, tool: str, output: Path) -> dict:
    from distributed_downloader.tools import registry  # the tools' libraries only in the tool jobs

    part = registry.resolve(tool, config).filter(config, tool)
    summary = part.run()
    if Path(output) != part.tool_paths.filter_summary:
        raise RuntimeError(f"the filter wrote {part.tool_paths.filter_summary}, the rule expects {output}")
    return summary


def tool_schedule(config: Mapping, tool: str, output: Path) -> dict:
    from distributed_downloader.tools import registry

    part = registry.resolve(tool, config).scheduler(config, tool)
    plan = part.run()
    if Path(output) != part.tool_paths.schedule or not Path(output).exists():
        raise RuntimeError(f"the scheduler did not write {output}")
    return plan


# rule -> what it runs, given the Snakemake job (``snakemake`` in a script: job)
STAGES: dict[str, Callable[[Any], object]] = {
    "initialize": lambda job: initialize(job.config, Path(job.output[0])),
    "profile_servers": lambda job: profile_servers(job.config),
    "schedule": lambda job: schedule(job.config, int(job.wildcards.round), Path(job.output[0])),
    "verify": lambda job: verify(job.config, Path(job.output.json), Path(job.output.csv)),
    "report_plots": lambda job: report_plots(job.config, Path(job.input.verification), dict(job.output.items())),
    "snapshot_report": lambda job: snapshot_report(job.config, Path(job.output.json), Path(job.output.csv)),
    "tool_filter": lambda job: tool_filter(job.config, job.wildcards.tool, Path(job.output[0])),
    "tool_schedule": lambda job: tool_schedule(job.config, job.wildcards.tool, Path(job.output[0])),
}


def run(job: Any) -> None:
    """A rule's ``script:`` job (``job`` is Snakemake's ``snakemake`` object): log, then its stage."""
    config = job.config
    log_to(job.log[0] if job.log else None, config["downloader_parameters"]["logger_level"], mode="w", stderr=True)
    tool = getattr(job.wildcards, "tool", None)
    try:
        stage = STAGES[job.rule]
    except KeyError:
        raise ValueError(f"rule {job.rule!r} has no stage in distributed_downloader.stages.STAGES") from None
    try:
        stage(job)
    except Exception:
        if tool:
            logging.getLogger("distributed_downloader.tools").exception("tool %s: stage %s failed", tool, job.rule)
        else:
            log.exception("stage %s failed", job.rule)
        raise
