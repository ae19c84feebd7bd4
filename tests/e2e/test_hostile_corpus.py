"""One real workflow run (local profile, 2 MPI ranks) over a corpus of ~1,000 real exotic and broken files.

The corpus is Pillow's own test images (tests/corpus.py): fuzzer crashers and timeouts, truncated
files, decompression bombs, 16-bit, CMYK, palette, animated images and dozens of other formats,
served as they are by 4 loopback hosts. Every URL must end as exactly one row, no rank and no lane
may die, and every file that Pillow fully decodes here in a format we accept, within the default
pixel cap, must be stored with the MD5 of its bytes. Run with ``-s`` for the summary.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from distributed_downloader.demo import scenario as demo
from distributed_downloader.errors import ErrorCode
from distributed_downloader.imaging.process import ImageSettings
from tests import corpus
from tests.conftest import run, skip_or_fail, snakemake_cmd
from tests.e2e.helpers import ranks_of, read_all
from tests.e2e.static_hosts import StaticHosts

pytestmark = pytest.mark.e2e

HOSTS = 4
COMMON_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"})
MAX_PIXELS = ImageSettings().max_image_pixels  # the default pixel cap (config.schema.yaml's max_image_pixels)
# The only codes a healthy host serving a bad file may produce: not an image / corrupt, or over the
# pixel cap. Anything else (INTERNAL -17, a network error, a timeout) means the file broke something.
FILE_CODES = frozenset({ErrorCode.IMAGE_DECODE, ErrorCode.TOO_MANY_PIXELS})
# Files Pillow decodes in a common format within the cap that we nevertheless refuse, with the reason.
# None with Pillow 13.0.0 and the corpus of pillow 13.0.0.
KNOWN_REFUSALS: dict[str, str] = {}


def _pillow_check(data: bytes) -> tuple[str | None, bool]:
    """(the format Pillow identifies with any plugin, whether it is a common format within the cap that
    Pillow fully loads). Pillow's own guard raises only over 2 x 89,478,485 pixels: our default cap."""
    fmt = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # corrupt-TIFF-tag chatter, DecompressionBombWarning under the cap
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                if fmt not in COMMON_FORMATS or img.width * img.height > MAX_PIXELS:
                    return fmt, False
                img.load()
                return fmt, True
    except Exception:
        return fmt, False


@pytest.fixture(scope="module")
def corpus_files() -> list[tuple[str, Path]]:
    try:
        corpus.fetch()
    except corpus.CorpusError as exc:
        skip_or_fail(f"the image corpus cannot be fetched: {exc}")
    return corpus.files()


def test_hostile_corpus(tmp_path: Path, corpus_files: list[tuple[str, Path]]) -> None:
    bodies = {rel: path.read_bytes() for rel, path in corpus_files}
    md5 = {rel: hashlib.md5(data).hexdigest() for rel, data in bodies.items()}
    checked = {rel: _pillow_check(data) for rel, data in bodies.items()}
    decodable = {rel: fmt for rel, (fmt, loads) in checked.items() if loads}
    must_succeed = {rel for rel in decodable if rel not in KNOWN_REFUSALS}

    # Round robin over the sorted names: every host gets every kind of file.
    names = sorted(bodies)
    routes: list[dict[str, bytes]] = [{} for _ in range(HOSTS)]
    for i, rel in enumerate(names):
        routes[i % HOSTS]["/corpus/" + rel] = bodies[rel]

    with StaticHosts(routes) as hosts:
        rows = [
            demo.Expected(f"c{i:04d}", hosts.url(i % HOSTS, "/corpus/" + rel), None, None)
            for i, rel in enumerate(names)
        ]
        name_of = {row.uuid: rel for row, rel in zip(rows, names, strict=True)}
        config = demo.write_config(
            tmp_path,
            demo.write_input(rows, tmp_path / "urls.csv"),
            num_downloads=2,
            workers_per_node=2,
            batch_size=50,
            default_rate_limit=60,
            max_rate_limit=200,
        )
        started = time.monotonic()
        result = run(snakemake_cmd(config, tmp_path), timeout=600, check=False)
        seconds = time.monotonic() - started
        requests = sum(hosts.requests(h) for h in range(HOSTS))

    output = tmp_path / "output"
    logs = sorted((output / "logs").rglob("*.log"))
    crashed = {str(p.relative_to(output)): p.read_text(errors="replace") for p in logs}
    crashed = {p: text for p, text in crashed.items() if "Traceback" in text}
    assert result.returncode == 0, (
        f"workflow exit code {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}\n"
        + "\n".join(f"--- {p}\n{text[-4000:]}" for p, text in crashed.items())
    )
    assert not crashed, "\n".join(f"--- {p}\n{text[-4000:]}" for p, text in crashed.items())
    assert len(ranks_of(output)) == 2
    # No lane died and no batch failed (the round would still end 0 with them listed).
    batches = [b for p in sorted((output / "state").glob("round_*_batches.json")) for b in json.loads(p.read_text())]
    assert batches and not [b for b in batches if b["failed"] or b["server_failed"]]

    images = output / "downloaded_images"
    successes = read_all(images, "successes.parquet", columns=["uuid", "identifier", "hashsum_original"])
    errors = read_all(images, "errors.parquet", columns=["uuid", "identifier", "error_code", "error_msg"])
    seen = Counter([r["uuid"] for r in successes] + [r["uuid"] for r in errors])
    twice = sorted(name_of[u] for u, n in seen.items() if n > 1)
    missing = sorted(name_of[u] for u in name_of if u not in seen)
    assert not twice and not missing, f"rows written twice: {twice[:10]}; URLs without a row: {missing[:10]}"
    assert set(seen) == set(name_of)

    wrong_md5 = [name_of[r["uuid"]] for r in successes if r["hashsum_original"] != md5[name_of[r["uuid"]]]]
    assert not wrong_md5, f"stored with another MD5 than the file's: {wrong_md5[:10]}"
    error_of = {name_of[r["uuid"]]: (r["error_code"], r["error_msg"]) for r in errors}
    refused = {rel: error_of[rel] for rel in sorted(must_succeed) if rel in error_of}
    assert not refused, "Pillow decodes these, we refused them:\n" + "\n".join(
        f"{rel} ({decodable[rel]}): {code} {msg}" for rel, (code, msg) in refused.items()
    )
    odd = {rel: e for rel, e in error_of.items() if e[0] not in FILE_CODES}
    assert not odd, "errors a served file should not cause:\n" + "\n".join(
        f"{rel}: {code} {msg}" for rel, (code, msg) in sorted(odd.items())
    )
    verification = json.loads((output / "reports" / "verification.json").read_text())
    assert verification["ok"] and verification["totals"]["urls"] == len(rows), verification

    by_code = Counter(code for code, _ in error_of.values())
    extra = Counter(str(checked[name_of[r["uuid"]]][0]) for r in successes if name_of[r["uuid"]] not in must_succeed)
    print(
        f"\nhostile corpus: {len(rows)} files ({sum(map(len, bodies.values())) / 1e6:.1f} MB) on {HOSTS} hosts,"
        f" {requests} requests, workflow {seconds:.1f}s\n"
        f"  successes: {len(successes)} ({len(must_succeed)} required; others by Pillow's format: {dict(extra)})\n"
        f"  errors: {len(errors)}: "
        + ", ".join(f"{ErrorCode(code).name} ({code}) {n}" for code, n in sorted(by_code.items()))
    )
