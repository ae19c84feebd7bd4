"""The stages as plain functions of the validated config: what each Snakemake rule calls."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from distributed_downloader import config as config_mod
from distributed_downloader import inputs
from distributed_downloader.engine.probe_rows import ProbeKeeper
from distributed_downloader.net.fetch import FetchSettings
from distributed_downloader.plan import partition, profiling, schedule, snapshot, stale_images
from distributed_downloader.report import verify
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


def make_schedule(config: Mapping, round_no: int, out: Path) -> dict:
    paths = config_mod.paths(config)
    manifest = partition.read_manifest(paths.urls)
    profiles = profiling.read_profiles(paths.profiles_table)
    plan = schedule.build(manifest, profiles, paths, config, round_no)
    atomic_write_json(Path(out), plan)
    log.info("round %d: %s", round_no, plan["totals"])
    return plan


def verify_downloads(config: Mapping, json_out: Path, csv_out: Path) -> dict:
    paths = config_mod.paths(config)
    manifest = partition.read_manifest(paths.urls)
    result = verify.verify_all(manifest, paths)
    verify.write_reports(result, Path(json_out), Path(csv_out))
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


def snapshot_report(config: Mapping, json_out: Path, csv_out: Path) -> dict:
    from distributed_downloader.report import snapshot_report as report_mod

    paths = config_mod.paths(config)
    report = report_mod.write(paths, partition.read_manifest(paths.urls), Path(json_out), Path(csv_out))
    log.info("snapshot changes: %s", report["totals"])
    return report
