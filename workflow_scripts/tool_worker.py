"""Entry point of a tool's MPI run job (under mpiexec or srun)."""

import sys

from distributed_downloader.tools.worker import main

if __name__ == "__main__":
    sys.exit(main())
