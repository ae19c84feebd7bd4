"""One store row as one WebDataset sample: ``<key>.<jpg|png|webp>`` (the image) and ``<key>.json``.

The image is exported in its stored encoding, byte for byte (its MD5 stays ``hashsum_resized``), so
an export costs no decode and loses nothing. Only ``raw_bgr`` rows (the original tool's pixel buffer,
which no image reader opens) are re-encoded, losslessly, as PNG. The encoding is read from the bytes'
signature rather than trusted from the config, because a store can hold rows written under other
``image_format`` settings (a resize run with another format, carried-over snapshot rows).

The JSON member holds every successes column but ``image``, in the file's column order (so columns a
later version adds come along), plus ``server_name`` and ``partition_id`` of the row's partition.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import io
import json
import math
import string
from dataclasses import dataclass
from typing import Any

from PIL import Image

KEY_CHARS = frozenset(string.ascii_letters + string.digits + "-_")
PNG_COMPRESS_LEVEL = 1  # lossless at any level; 1 is ~5x faster than the default 6 for ~10% more bytes
RAW = "raw"


@dataclass(frozen=True)
class Sample:
    """A row ready for a shard: the members in the order they are written."""

    uuid: str
    key: str
    ext: str
    image: bytes
    meta: bytes

    @property
    def members(self) -> list[tuple[str, bytes]]:
        return [(f"{self.key}.{self.ext}", self.image), (f"{self.key}.json", self.meta)]


def sample_key(uuid: str) -> str:
    """The members' stem: the uuid, every character but ``[A-Za-z0-9_-]`` percent-encoded (UTF-8).

    WebDataset groups members by the name before the first ``.`` of the file name, and a ``/`` would
    make a folder, so a uuid like ``a.b/c`` must not be written as is. The encoding is reversible and
    keeps distinct uuids distinct; the JSON member carries the uuid as stored.
    """
    if uuid and all(c in KEY_CHARS for c in uuid):
        return uuid
    return "".join(c if c in KEY_CHARS else "".join(f"%{b:02X}" for b in c.encode()) for c in uuid) or "%00"


def stored_encoding(data: bytes, resized_size: Any, image_format: str) -> str | None:
    """``jpg``, ``png``, ``webp``, ``raw`` (a BGR buffer of ``resized_size``) or None (none of those).

    A raw buffer has no signature and may start with any bytes (a pink first pixel is ``FF D8 FF``, a
    JPEG's), so under ``image_format: raw_bgr`` a buffer of exactly height x width x 3 bytes is raw first.
    """
    raw_size = _raw_size(resized_size)
    if image_format == "raw_bgr" and raw_size is not None and len(data) == raw_size:
        return RAW
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if raw_size is not None and len(data) == raw_size:
        return RAW
    return None


def _raw_size(resized_size: Any) -> int | None:
    try:
        height, width = (int(v) for v in resized_size)
    except (TypeError, ValueError):
        return None
    return height * width * 3 if height > 0 and width > 0 else None


def raw_bgr_to_png(data: bytes, resized_size: Any) -> bytes:
    """A raw BGR buffer as a lossless RGB PNG (the pixels are exactly the buffer's)."""
    height, width = (int(v) for v in resized_size)
    img = Image.frombytes("RGB", (width, height), data, "raw", "BGR")
    out = io.BytesIO()
    img.save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def _json_value(value: Any) -> Any:
    """JSON for the column types a successes file may hold beyond str/int/bool/float/list."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return str(value)


def metadata_json(row: dict, server_name: str, partition_id: int) -> bytes:
    """The JSON member: the row's columns but ``image`` (in its order), then its partition."""
    meta = {name: value for name, value in row.items() if name != "image"}
    meta["server_name"] = server_name
    meta["partition_id"] = partition_id
    try:
        text = json.dumps(meta, ensure_ascii=False, default=_json_value, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a NaN or an infinity (a float column): no JSON token, written as null
        text = json.dumps(_finite(meta), ensure_ascii=False, default=_json_value, separators=(",", ":"))
    return text.encode()


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def make_sample(row: dict, server_name: str, partition_id: int, image_format: str) -> Sample | str:
    """The sample of a successes row, or the reason it cannot be one (a row is data, never a crash)."""
    uuid = row.get("uuid")
    data = row.get("image")
    if not isinstance(uuid, str):
        return "the row has no uuid"
    if not data:
        return "the row has no image bytes"
    encoding = stored_encoding(data, row.get("resized_size"), image_format)
    if encoding is None:
        return (
            f"the image bytes ({len(data)}) are neither JPEG, PNG nor WebP, nor a raw_bgr buffer of "
            f"resized_size {row.get('resized_size')!r}"
        )
    if encoding == RAW:
        try:
            data = raw_bgr_to_png(data, row["resized_size"])
        except Exception as exc:  # Pillow on a malformed buffer: report it, go on
            return f"raw_bgr -> PNG failed: {type(exc).__name__}: {exc}"
        encoding = "png"
    return Sample(uuid, sample_key(uuid), encoding, data, metadata_json(row, server_name, partition_id))
