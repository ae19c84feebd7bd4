"""The download job of one round: MPI ranks, the coordinator, lanes, and who owns the round.

``launch``: the MPI launcher and the world check; ``worker``: one rank (rank 0 also runs the ``coordinator``);
``lane``: one rank's share of one server, downloading its batches; ``reuse``: rows a monthly snapshot copies
instead of downloading; ``probe_rows``: profiling's probe kept as the batch's first row; ``ownership``: one
job per round; ``rounds``: ending a round with nothing to do without MPI.
"""
