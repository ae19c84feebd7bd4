"""A corpus of about a thousand real exotic and broken image files, for the hostile-corpus e2e test.

The files are Pillow's own test images: the ``Tests/images/`` folder of Pillow's source distribution
on PyPI (fuzzer crashers and timeouts, truncated files, decompression bombs, 16-bit, CMYK, palette,
animated images and dozens of formats). ``fetch`` downloads the pinned sdist with pip (from the package
registry, the only network it needs), extracts that folder alone into a cache folder and writes a
manifest last, so a second call costs nothing.

Cache folder: ``$DD_IMAGE_CORPUS`` if set, else ``.cache/image-corpus/`` in the repository (git-ignored).
``python -m tests.corpus`` fetches it (``.ci/run`` does, before the tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
ENV_VAR = "DD_IMAGE_CORPUS"
DEFAULT_ROOT = REPO / ".cache" / "image-corpus"

# Pinned, so that the corpus (and the test's figures) are the same wherever it runs.
PILLOW_VERSION = "13.0.0"
PILLOW_SDIST_SHA256 = "cdcd1ba258178f7356d74170c9a81ba4eab6a5d55748bc402a5a2a6fe6be3510"  # PyPI's
IMAGES_PREFIX = "Tests/images/"
MANIFEST = "manifest.json"

# Sanity bounds of what we extract: pillow 13.0.0 has 1,060 files, 58 MB. Anything far off means the
# sdist is not what we think it is.
MIN_FILES, MAX_FILES = 500, 3_000
MAX_TOTAL_BYTES = 200 * 2**20
MAX_FILE_BYTES = 50 * 2**20
FETCH_TIMEOUT = 900  # seconds for pip download (47 MB and the sdist's build requirements)


class CorpusError(RuntimeError):
    """The corpus could not be fetched or is not what it should be."""


def root() -> Path:
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser().resolve() if value else DEFAULT_ROOT


def folder(base: Path | None = None) -> Path:
    """Where the corpus of the pinned version lives (its files under ``images/``)."""
    return (base or root()) / f"pillow-{PILLOW_VERSION}"


def manifest(base: Path | None = None) -> dict | None:
    """The manifest of a complete corpus, None when it has not been fetched (or not completely)."""
    try:
        return json.loads((folder(base) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def files(base: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, file) of every corpus file, sorted by relative path."""
    found = manifest(base)
    if found is None:
        raise CorpusError(f"no corpus at {folder(base)}: run `python -m tests.corpus`")
    images = folder(base) / "images"
    return [(rel, images / rel) for rel in found["files"]]


def _download_sdist(into: Path, timeout: float) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-binary",
        ":all:",
        "--no-deps",
        f"pillow=={PILLOW_VERSION}",
        "-d",
        str(into),
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CorpusError(f"pip download of pillow=={PILLOW_VERSION} took over {timeout:.0f}s") from None
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip()[-1500:]
        raise CorpusError(f"pip download of pillow=={PILLOW_VERSION} failed ({result.returncode}): {tail}")
    found = sorted(into.glob(f"pillow-{PILLOW_VERSION}.tar.gz"))
    if not found:
        raise CorpusError(f"pip download left no pillow-{PILLOW_VERSION}.tar.gz in {into}")
    return found[0]


def _relative(name: str) -> str | None:
    """The path below Tests/images/ of an sdist member, None outside it (or when unsafe)."""
    parts = PurePosixPath(name).parts
    if len(parts) < 4 or parts[1:3] != ("Tests", "images"):  # pillow-X.Y.Z/Tests/images/...
        return None
    rest = parts[3:]
    if any(p in ("", ".", "..") for p in rest):
        return None
    return "/".join(rest)


def _extract(sdist: Path, images: Path) -> tuple[list[str], int]:
    names: list[str] = []
    total = 0
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            rel = _relative(member.name)
            if rel is None or not member.isfile():  # regular files only: no links, devices, ...
                continue
            if member.size > MAX_FILE_BYTES:
                raise CorpusError(f"{rel} is {member.size} bytes, over {MAX_FILE_BYTES}")
            total += member.size
            if total > MAX_TOTAL_BYTES or len(names) >= MAX_FILES:
                raise CorpusError(f"{sdist.name}: Tests/images/ over {MAX_FILES} files or {MAX_TOTAL_BYTES} bytes")
            source = archive.extractfile(member)
            assert source is not None
            target = images / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
            names.append(rel)
    if len(names) < MIN_FILES:
        raise CorpusError(f"{sdist.name}: only {len(names)} files under Tests/images/ (expected >= {MIN_FILES})")
    return sorted(names), total


def fetch(base: Path | None = None, timeout: float = FETCH_TIMEOUT, log: Callable[[str], object] = print) -> dict:
    """Fetch the corpus unless it is already there; returns its manifest. Raises CorpusError."""
    found = manifest(base)
    if found is not None:
        return found
    target = folder(base)
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".fetching-", dir=target.parent) as scratch:
        work = Path(scratch)
        sdist = _download_sdist(work / "sdist", timeout)
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != PILLOW_SDIST_SHA256:
            raise CorpusError(f"{sdist.name} has sha256 {digest}, expected {PILLOW_SDIST_SHA256}")
        staged = work / target.name
        names, total = _extract(sdist, staged / "images")
        seconds = time.monotonic() - started
        found = {
            "source": f"pillow=={PILLOW_VERSION} sdist ({sdist.name}, sha256 {digest}), {IMAGES_PREFIX}",
            "file_count": len(names),
            "total_bytes": total,
            "fetch_seconds": round(seconds, 1),
            "files": names,
        }
        (staged / MANIFEST).write_text(json.dumps(found, indent=1))  # written last: its presence = complete
        if target.exists():  # an incomplete earlier attempt (no manifest), or another fetch won the race
            if manifest(base) is not None:
                return manifest(base)
            shutil.rmtree(target)
        staged.rename(target)
    log(f"image corpus: {len(names)} files, {total / 1e6:.1f} MB from pillow=={PILLOW_VERSION} in {seconds:.0f}s")
    return found


def main() -> int:
    try:
        found = fetch()
    except CorpusError as exc:
        print(f"image corpus: {exc}", file=sys.stderr)
        return 1
    print(f"image corpus at {folder()}: {found['file_count']} files, {found['total_bytes'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
