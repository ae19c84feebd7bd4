"""Finish a download round with nothing to do without starting MPI: exit 0 when done, 1 when there is work."""

import sys
from pathlib import Path

from distributed_downloader.engine.rounds import finish_if_empty

if __name__ == "__main__":
    sys.exit(0 if finish_if_empty(Path(sys.argv[1]), Path(sys.argv[2])) else 1)
