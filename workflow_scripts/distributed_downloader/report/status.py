"""A run's status from the output folder alone: fast, read-only, usable while a run is going."""

from __future__ import annotations

from collections.abc import Mapping

from distributed_downloader.config import Paths
from distributed_downloader.store.files import read_marker
from distributed_downloader.store.jsonfiles import read_json


def collect(paths: Paths) -> dict:
    manifest = read_json(paths.urls_manifest)
    if not isinstance(manifest, dict):
        return {"stage": "not initialized"}
    batches_total = done = successes = errors = transient = 0
    per_server: dict[str, dict] = {}
    for server, info in manifest["servers"].items():
        row = {"batches": len(info["fingerprints"]), "done": 0, "successes": 0, "errors": 0}
        for partition_id, fp in enumerate(info["fingerprints"]):
            marker = read_marker(paths.batch_images(server, partition_id))
            if marker is not None and marker.fingerprint == fp:
                row["done"] += 1
                row["successes"] += marker.successes
                row["errors"] += marker.errors
                transient += marker.transient
        per_server[server] = row
        batches_total += row["batches"]
        done += row["done"]
        successes += row["successes"]
        errors += row["errors"]
    rounds = paths.done_rounds()
    progress = {str(round_no): read_json(path) for round_no, path in paths.round_states("progress").items()}
    verification = read_json(paths.reports / "verification.json")
    return {
        "stage": "verified" if verification else ("downloading" if paths.state.is_dir() else "initialized"),
        "input_rows": manifest["input_rows"],
        "rejected_rows": manifest["rejected_rows"],
        "urls": manifest["total_urls"],
        "servers": len(manifest["servers"]),
        "batches_total": batches_total,
        "batches_done": done,
        "successes": successes,
        "errors": errors,
        "errors_retryable": transient,
        "rounds_done": rounds,
        "progress": progress,
        "verification_ok": None if not isinstance(verification, dict) else verification.get("ok"),
        "per_server": per_server,
    }


def render(status: Mapping, servers: int = 10) -> str:
    if status.get("stage") == "not initialized":
        return "not initialized: run the workflow first"
    lines = [
        f"stage: {status['stage']}   rounds done: {status['rounds_done'] or '-'}",
        f"input rows {status['input_rows']:,}  rejected {status['rejected_rows']:,}"
        f"  URLs {status['urls']:,} on {status['servers']} servers",
        f"batches {status['batches_done']:,}/{status['batches_total']:,} done   "
        f"successes {status['successes']:,}  errors {status['errors']:,} ({status['errors_retryable']:,} retryable)",
    ]
    if status["verification_ok"] is not None:
        verdict = "OK, every URL accounted for exactly once" if status["verification_ok"] else "PROBLEMS (see reports)"
        lines.append(f"verification: {verdict}")
    ranked = sorted(status["per_server"].items(), key=lambda kv: kv[1]["done"] - kv[1]["batches"])[:servers]
    lines.append("server                                   batches  done  successes  errors")
    for name, row in ranked:
        lines.append(f"{name[:40]:40} {row['batches']:8} {row['done']:5} {row['successes']:10} {row['errors']:7}")
    return "\n".join(lines)
