"""Tools applied to a downloaded dataset: filter -> schedule -> run (MPI), each a Snakemake rule.

Built-ins: ``size_based``, ``duplication_based``, ``resize``, ``image_verification``,
``export_webdataset`` (writes WebDataset shards beside the store; tools/export/). Custom tools
register their parts with the decorators below from the module named by ``tools_parameters.tools_module``::

    from distributed_downloader.tools import FilterRegister, RunnerRegister, PythonFilterToolBase, MPIRunnerTool
"""

from __future__ import annotations

from typing import Any

from distributed_downloader.tools import builtins  # noqa: F401 - registers the built-in tools
from distributed_downloader.tools.base import (
    DefaultScheduler,
    FilterToolBase,
    MPIRunnerTool,
    PythonFilterToolBase,
    SchedulerToolBase,
    ToolBase,
)
from distributed_downloader.tools.batch import BatchResult, PartitionContext
from distributed_downloader.tools.builtins import BUILTIN_TOOLS
from distributed_downloader.tools.registry import (
    TOOLS_REGISTRY,
    FilterRegister,
    RunnerRegister,
    SchedulerRegister,
    ToolClasses,
    ToolError,
    registered_tools,
    resolve,
)

__all__ = [
    "BUILTIN_TOOLS",
    "TOOLS_REGISTRY",
    "BatchResult",
    "DefaultScheduler",
    "FilterRegister",
    "FilterToolBase",
    "MPIRunnerTool",
    "PartitionContext",
    "PythonFilterToolBase",
    "RunnerRegister",
    "SchedulerRegister",
    "SchedulerToolBase",
    "ToolBase",
    "ToolClasses",
    "ToolError",
    "apply_tool",
    "apply_tools",
    "registered_tools",
    "resolve",
]


def __getattr__(name: str) -> Any:
    # Lazy: jobs import the tools without paying for the Snakemake API.
    if name in ("apply_tool", "apply_tools"):
        from distributed_downloader.front import api  # the classic entry points live in front/

        return getattr(api, name)
    raise AttributeError(name)
