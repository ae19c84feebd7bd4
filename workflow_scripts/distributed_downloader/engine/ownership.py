"""One download job per round at a time.

A killed workflow can leave ranks behind (local `mpiexec`: its proxy survives a SIGKILL of the
process group; Slurm: the job runs on when `snakemake` itself is killed). Left alone they would keep
downloading beside the resumed run, doubling the rate a server sees. So each job claims the round
by writing a fresh token; ranks of an older job see the token change and stop, and local ranks
whose launcher is gone stop on their own.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from distributed_downloader.store.files import atomic_write_json

CHECK_SECONDS = 1.0
GRACE_SECONDS = 2.5  # a new job waits this long so an older one has seen the new token and stopped
LAUNCHER_NAMES = ("mpiexec", "mpirun", "hydra_pmi_prox", "hydra_nameserv")


def claim(path: Path) -> tuple[str, bool]:
    """Write a new owner token for the round; (token, whether another job had claimed it before)."""
    previous = path.exists()
    token = uuid.uuid4().hex
    atomic_write_json(path, {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    return token, previous


def current_token(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["token"]
    except (OSError, ValueError, KeyError):
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def launcher_gone() -> bool:
    """True when this rank was started by a local mpiexec that no longer exists."""
    parent = os.getppid()
    if parent == 1:
        return True
    if not _comm(parent).startswith("hydra_pmi_prox"):
        return False  # srun/slurmstepd or another launcher: it kills its ranks itself
    return not _comm(_parent(parent)).startswith(LAUNCHER_NAMES)


class Ownership:
    """Answers, at most once per CHECK_SECONDS, whether this job still owns its round."""

    def __init__(self, path: Path, token: str) -> None:
        self.path = path
        self.token = token
        self._checked = 0.0
        self._verdict: str | None = None

    def lost(self) -> str | None:
        """Why this job must stop ('superseded', 'launcher gone'), or None."""
        now = time.monotonic()
        if self._verdict is None and now - self._checked >= CHECK_SECONDS:
            self._checked = now
            if current_token(self.path) not in (self.token, None):
                self._verdict = "superseded by a newer download job for this round"
            elif launcher_gone():
                self._verdict = "the MPI launcher is gone (the workflow was killed)"
        return self._verdict
