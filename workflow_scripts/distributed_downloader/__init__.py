"""distributed-downloader: a server-friendly, resumable bulk image downloader (Snakemake + MPI)."""

from __future__ import annotations

from typing import Any

__version__ = "1.0.0.dev0"
__all__ = ["download_images", "apply_tools", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: workers and rules import submodules without paying for the Snakemake API.
    if name in ("download_images", "apply_tools"):
        from distributed_downloader.front import api

        return getattr(api, name)
    raise AttributeError(name)
