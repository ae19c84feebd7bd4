"""Entry point of the MPI download job (run under mpiexec or srun)."""

import sys

# MPI first, before any heavy library: seen on a 2-node Slurm cluster with the mpich wheel under
# `srun --mpi=pmi2`, importing the tools' libraries before MPI_Init intermittently corrupted the
# PMI2 exchange (slurmstepd: "invalid client request") and MPI_Init failed or hung.
from mpi4py import MPI  # noqa: E402,F401

from distributed_downloader.engine.worker import main

if __name__ == "__main__":
    sys.exit(main())
