"""Input readers: stream a URL table as Arrow record batches of normalised string columns.

Every reader yields batches with the columns of ``URL_COLUMNS`` (strings, never null) plus
``_reject`` (empty string, or why the row is refused). Nothing reads a whole file into memory.

``files`` (formats, compression, dialects, raw batches) -> ``columns`` (names, UTF-8, ids, the
assembled batch) -> the readers ``generic`` and ``gbif`` -> ``servers`` (each URL's server name) ->
``readers`` (the registry ``rows()`` picks a reader from by the config's ``initializer``).
The names below are the package's public face.
"""

from distributed_downloader.inputs.columns import (
    GBIF_UUID_NAMESPACE,
    MAX_URL_LENGTH,
    NOT_PROVIDED,
    REQUIRED_COLUMNS,
    URL_COLUMNS,
    UUID_NAMESPACE,
    InputError,
    check_columns,
    deterministic_uuid,
    deterministic_uuids,
)
from distributed_downloader.inputs.files import (
    HEADER_BYTES,
    check_input,
    dialect,
    input_files,
    raw_batches,
    sniff_delimiter,
    tsv_is_quoted,
)
from distributed_downloader.inputs.readers import READERS, rows
from distributed_downloader.inputs.servers import add_server_names, server_name_of

__all__ = [
    "GBIF_UUID_NAMESPACE",
    "HEADER_BYTES",
    "MAX_URL_LENGTH",
    "NOT_PROVIDED",
    "READERS",
    "REQUIRED_COLUMNS",
    "URL_COLUMNS",
    "UUID_NAMESPACE",
    "InputError",
    "add_server_names",
    "check_columns",
    "check_input",
    "deterministic_uuid",
    "deterministic_uuids",
    "dialect",
    "input_files",
    "raw_batches",
    "rows",
    "server_name_of",
    "sniff_delimiter",
    "tsv_is_quoted",
]
