"""Entry point of the MPI download job (run under mpiexec or srun)."""

import sys

from distributed_downloader.worker import main

if __name__ == "__main__":
    sys.exit(main())
