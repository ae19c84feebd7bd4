"""The export's settings (``tools_parameters.export_*``) and where it writes.

Kept apart so the filter, the runner, the tests and the bench read the same defaults; the schema in
``config/config.schema.yaml`` documents each key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from distributed_downloader.config import Paths

DEFAULT_MAX_SAMPLES = 10_000
DEFAULT_MAX_BYTES = 1_000_000_000
DEFAULT_SHUFFLE_WINDOW = 2048


@dataclass(frozen=True)
class ExportSettings:
    max_samples: int = DEFAULT_MAX_SAMPLES  # a shard closes at this many samples...
    max_bytes: int = DEFAULT_MAX_BYTES  # ...or before it would pass this many bytes
    shuffle: bool = False
    seed: int = 0
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW  # rows shuffled together (held in memory at once)
    min_side: int = 0  # export rows whose stored image's shorter side is at least this
    license_full: bool = False  # export only rows with is_license_full

    @classmethod
    def from_parameters(cls, parameters: Mapping) -> ExportSettings:
        return cls(
            max_samples=int(parameters.get("export_shard_max_samples", DEFAULT_MAX_SAMPLES)),
            max_bytes=int(parameters.get("export_shard_max_bytes", DEFAULT_MAX_BYTES)),
            shuffle=bool(parameters.get("export_shuffle", False)),
            seed=int(parameters.get("export_seed", 0)),
            shuffle_window=int(parameters.get("export_shuffle_window", DEFAULT_SHUFFLE_WINDOW)),
            min_side=int(parameters.get("export_min_side", 0)),
            license_full=bool(parameters.get("export_license_full", False)),
        )

    def __post_init__(self) -> None:
        if self.max_samples < 1 or self.max_bytes < 1 or self.shuffle_window < 1 or self.min_side < 0:
            raise ValueError(f"export settings out of range: {self}")


def export_folder(paths: Paths) -> Path:
    """``<path_to_output>/exports/webdataset``: shards, ``shards.json`` and the per-rank progress."""
    return paths.output / "exports" / "webdataset"
