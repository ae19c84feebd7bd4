"""The tool registry: ``FilterRegister``, ``SchedulerRegister``, ``RunnerRegister`` and tool lookup.

Each decorator registers a class as one part of the tool with the given name, as in the original::

    @FilterRegister("my_tool")
    class MyFilter(PythonFilterToolBase): ...

A user module named by ``tools_parameters.tools_module`` (a dotted module name or a ``.py`` path) is
imported before a tool is looked up, so it can register its own tools. A tool needs all three parts,
unless ``tools_parameters.allow_unregistered_tools`` (the CLI's ``--tool_name_override``) lets the
missing ones default to ``PythonFilterToolBase`` / ``DefaultScheduler`` / ``MPIRunnerTool``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from distributed_downloader.tools.base import (
    DefaultScheduler,
    FilterToolBase,
    MPIRunnerTool,
    PythonFilterToolBase,
    SchedulerToolBase,
)

FAMILIES = ("filter", "scheduler", "runner")
_BASES: dict[str, type] = {"filter": FilterToolBase, "scheduler": SchedulerToolBase, "runner": MPIRunnerTool}
_DEFAULTS: dict[str, type] = {"filter": PythonFilterToolBase, "scheduler": DefaultScheduler, "runner": MPIRunnerTool}
TOOL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]*"  # also the {tool} wildcard of rules/tools.smk
TOOL_NAME = re.compile(rf"^{TOOL_NAME_PATTERN}$")

# tool name -> family -> class
TOOLS_REGISTRY: dict[str, dict[str, type]] = {}


class ToolError(ValueError):
    """An unknown or badly registered tool, or a tools module that cannot be imported."""


def _same_class(a: type, b: type) -> bool:
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register(family: str, name: str) -> Callable[[type], type]:
    """Decorator: register the class as the ``family`` part of tool ``name``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise ToolError(f"tool name {name!r} must match {TOOL_NAME.pattern} (it becomes a folder name)")

    def wrapper(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, _BASES[family])):
            raise TypeError(f"a {family} of tool {name!r} must subclass {_BASES[family].__name__}, got {cls!r}")
        existing = TOOLS_REGISTRY.get(name, {}).get(family)
        if existing is not None and not _same_class(existing, cls):
            raise ToolError(f"tool {name!r} already has a {family}: {existing.__module__}.{existing.__qualname__}")
        TOOLS_REGISTRY.setdefault(name, {})[family] = cls
        return cls

    return wrapper


FilterRegister = functools.partial(register, "filter")
SchedulerRegister = functools.partial(register, "scheduler")
RunnerRegister = functools.partial(register, "runner")


def registered_tools() -> dict[str, list[str]]:
    """Tool name -> its registered families."""
    return {name: sorted(parts) for name, parts in sorted(TOOLS_REGISTRY.items())}


def _module_file(spec: str, config_path: str | None) -> Path | None:
    if not (spec.endswith(".py") or os.sep in spec or "/" in spec):
        return None
    candidates = [Path(spec).expanduser()]
    if config_path and not Path(spec).is_absolute():
        candidates.append(Path(config_path).parent / spec)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.absolute()
    raise ToolError(f"tools_parameters.tools_module: no such file {spec!r}")


def load_tools_module(spec: str, config_path: str | None = None) -> None:
    """Import the user's tools module (dotted name or .py path) once per process."""
    if not spec:
        return
    try:
        path = _module_file(spec, config_path if config_path is not None else os.environ.get("CONFIG_PATH"))
        if path is None:
            importlib.import_module(spec)
            return
        name = "distributed_downloader_user_tools_" + hashlib.md5(str(path).encode(), usedforsecurity=False).hexdigest()
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ToolError(f"tools_parameters.tools_module: cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    except ToolError:
        raise
    except Exception as exc:
        raise ToolError(
            f"tools_parameters.tools_module {spec!r} failed to import: {type(exc).__name__}: {exc}"
        ) from exc


@dataclass(frozen=True)
class ToolClasses:
    name: str
    filter: type
    scheduler: type
    runner: type
    defaulted: tuple[str, ...]  # families that fell back to the defaults


def resolve(name: str, config: Mapping) -> ToolClasses:
    """The three classes of tool ``name`` (importing the user's tools module first).

    Raises ToolError for an unknown tool, or one missing parts, unless unregistered tools are allowed.
    """
    params = config.get("tools_parameters", {})
    load_tools_module(params.get("tools_module", ""))
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise ToolError(f"tool name {name!r} must match {TOOL_NAME.pattern}")
    parts = TOOLS_REGISTRY.get(name, {})
    missing = tuple(f for f in FAMILIES if f not in parts)
    if missing and not params.get("allow_unregistered_tools", False):
        known = ", ".join(f"{n} ({'/'.join(p)})" for n, p in registered_tools().items())
        what = "unknown tool" if len(missing) == len(FAMILIES) else f"tool without a registered {'/'.join(missing)}"
        raise ToolError(
            f"{what} {name!r}; registered tools: {known}. Register it in the module named by "
            "tools_parameters.tools_module, or set tools_parameters.allow_unregistered_tools: true "
            "(distributed_downloader_tools --tool_name_override) to use the default parts"
        )
    classes = {f: parts.get(f, _DEFAULTS[f]) for f in FAMILIES}
    return ToolClasses(name, classes["filter"], classes["scheduler"], classes["runner"], missing)
