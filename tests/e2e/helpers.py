"""Checks shared by the end-to-end tests: read the dataset back and compare with expectations."""

from __future__ import annotations

import glob
import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from distributed_downloader.store.files import ERROR_SCHEMA, SUCCESS_SCHEMA

SUCCESS_COLUMNS = [f.name for f in SUCCESS_SCHEMA]
ERROR_COLUMNS = [f.name for f in ERROR_SCHEMA]


def read_all(images: Path, name: str, columns: list[str] | None = None) -> list[dict]:
    rows: list[dict] = []
    # A retry round appends successes-r{R}.parquet beside successes.parquet: both are the dataset.
    pattern = "successes*.parquet" if name == "successes.parquet" else name
    for path in sorted(glob.glob(str(images / "server_name=*" / "partition_id=*" / pattern))):
        table = pq.read_table(path, columns=columns)
        assert table.schema.names == (columns or (SUCCESS_COLUMNS if name.startswith("succ") else ERROR_COLUMNS))
        rows.extend(table.to_pylist())
    return rows


def check_dataset(output: Path, expected: list, image_size: int = 720) -> dict:
    """Every expected URL exactly once, successes with the right MD5s, errors with the right codes."""
    images = output / "downloaded_images"
    successes = read_all(images, "successes.parquet")
    errors = read_all(images, "errors.parquet")
    seen = Counter([r["uuid"] for r in successes] + [r["uuid"] for r in errors])
    duplicated = [u for u, n in seen.items() if n > 1]
    assert not duplicated, f"rows written twice: {duplicated[:5]}"
    by_uuid = {r.uuid: r for r in expected}
    assert set(seen) == set(by_uuid), (
        f"missing {sorted(set(by_uuid) - set(seen))[:5]}, unexpected {sorted(set(seen) - set(by_uuid))[:5]}"
    )
    for row in successes:
        want = by_uuid[row["uuid"]]
        assert want.md5 is not None, f"{row['uuid']} should have failed with {want.error_code}"
        assert row["hashsum_original"] == want.md5, row["identifier"]
        assert row["hashsum_resized"] == hashlib.md5(row["image"]).hexdigest()
        assert max(row["resized_size"]) <= image_size
        assert len(row["original_size"]) == 2 and len(row["resized_size"]) == 2
        assert row["identifier"] == want.identifier
    for row in errors:
        want = by_uuid[row["uuid"]]
        assert want.error_code is not None, (
            f"{row['identifier']} failed unexpectedly: {row['error_code']} {row['error_msg']}"
        )
        assert row["error_code"] == want.error_code, (row["identifier"], row["error_code"], row["error_msg"])
    return {"successes": len(successes), "errors": len(errors), "error_rows": errors}


def write_batch_urls(path: Path, urls: list[str]) -> None:
    """One batch's urls.parquet, as initialize writes it, for tests that run a Lane directly."""
    import uuid

    import pyarrow as pa

    from distributed_downloader.plan.partition import URL_SCHEMA

    table = pa.table(
        {
            "uuid": [str(uuid.uuid4()) for _ in urls],
            "source_id": [f"s{i}" for i in range(len(urls))],
            "identifier": urls,
            "license": [""] * len(urls),
            "source": [""] * len(urls),
            "title": [""] * len(urls),
        },
        schema=URL_SCHEMA,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def ranks_of(output: Path, round_no: int = 1) -> list[dict]:
    return json.loads((output / "state" / f"round_{round_no}_ranks.json").read_text())


def completed_batches(output: Path) -> int:
    """Batches with a completion marker so far."""
    return len(list((output / "downloaded_images").glob("server_name=*/partition_id=*/_completed")))


def slow_farm_config(farm, tmp_path: Path, rate: float, per_host: int = 60, **downloader) -> tuple[list, Path]:  # noqa: ANN001
    """A run slow enough to be interrupted: batches of 10 URLs, each server held to `rate` requests/s."""
    from distributed_downloader.demo import scenario as demo

    rows = demo.demo_rows(farm, per_host=per_host, faults=False)
    config = demo.write_config(
        tmp_path,
        demo.write_input(rows, tmp_path / "urls.csv"),
        batch_size=10,
        default_rate_limit=rate,
        max_rate_limit=rate,
        **downloader,
    )
    return rows, config


def lane_test_config(tmp_path: Path, **downloader: object) -> dict:
    """A validated config for tests that run a Lane directly on loopback: no robots, no retries."""
    from distributed_downloader import config as config_mod

    params = {
        "allow_private_addresses": True,
        "respect_robots_txt": False,
        "max_retries": 0,
        "timeout": {"connect": 3, "read": 3, "total": 10},
        **downloader,
    }
    return config_mod.validate(
        {
            "path_to_input": str(tmp_path / "unused.csv"),
            "path_to_output": str(tmp_path / "out"),
            "downloader_parameters": params,
        }
    )
