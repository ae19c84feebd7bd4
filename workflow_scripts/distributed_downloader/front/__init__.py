"""The front door: the command line, the classic Python API and the Snakemake invocation behind both.

The only part of the package that imports Snakemake's API (``tool_rules``' WorkflowError included): jobs run
inside Snakemake and the rest of the package never needs it.
"""
