"""Helpers of ``rules/tools.smk`` (kept here so the rule file holds only rules): tool targets, the
input function of ``tool_filter`` and the early check of tool names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distributed_downloader.config import Paths
from distributed_downloader.tools import registry
from distributed_downloader.tools.dataset import ToolPaths


def _workflow_error(message: str) -> Exception:
    from snakemake.exceptions import WorkflowError

    return WorkflowError(message)


class ToolRules:
    def __init__(self, config: Mapping, paths: Paths, verification_report: str) -> None:
        self.config = config
        self.paths = paths
        self.verification_report = verification_report

    # A tool's files, from ToolPaths (the tools' own owner of them); ``tool`` may be the "{tool}" wildcard.
    def filter_summary(self, tool: str) -> str:
        return str(ToolPaths.of(self.paths, tool).filter_summary)

    def schedule(self, tool: str) -> str:
        return str(ToolPaths.of(self.paths, tool).schedule)

    def done(self, tool: str) -> str:
        return str(ToolPaths.of(self.paths, tool).done)

    def check(self, tool: str) -> None:
        """An unknown tool (or one missing parts, without allow_unregistered_tools) fails before any job."""
        try:
            registry.resolve(tool, self.config)
        except registry.ToolError as error:
            raise _workflow_error(f"tool {tool!r}: {error}") from None

    def check_configured(self) -> None:
        """Every tool of config["tools"] is known and listed once."""
        seen: set[str] = set()
        for tool in self.config["tools"]:
            if tool in seen:
                raise _workflow_error(f"config key 'tools': {tool!r} is listed twice")
            seen.add(tool)
            self.check(tool)

    def filter_inputs(self, wildcards: Any) -> dict[str, str]:
        """The verified dataset and, for a tool of config["tools"], the end of the tool before it."""
        tool = wildcards.tool
        self.check(tool)
        inputs = {"verification": self.verification_report}
        tools = list(self.config["tools"])
        if tool in tools and tools.index(tool) > 0:
            inputs["previous"] = self.done(tools[tools.index(tool) - 1])
        return inputs

    def tasks(self) -> int:
        params = self.config["tools_parameters"]
        return params["max_nodes"] * params["workers_per_node"]
