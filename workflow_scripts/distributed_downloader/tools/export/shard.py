"""One WebDataset shard: a plain tar written to a temp file, hashed as it is written, renamed when whole.

A trainer lists a shard folder and trusts whatever ``.tar`` it finds there, so a shard must appear
only once it is complete: it is written to ``.<name>.<random>.tmp`` beside its final name, fsynced,
and renamed. Its SHA-256 is computed over the bytes as they go out (no second read of a 1 GB file).

Members are written with fixed metadata (mtime 0, uid/gid 0, mode 0644, no user names), so the same
samples give a byte-identical shard: a resumed export produces the very shards an uninterrupted one
would, and the index's hashes can be compared across runs.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distributed_downloader.tools.dataset import remove_stale_temps, temp_name

BLOCK = tarfile.BLOCKSIZE  # 512: every header and every member's data is padded to it
RECORD = tarfile.RECORDSIZE  # 10240: the archive is padded to it, as tar and Python's tarfile do
END_OF_ARCHIVE = 2 * BLOCK  # two zero blocks close a tar
TEMP_TAG = "export"


@dataclass(frozen=True)
class ShardInfo:
    """A committed shard, as the index lists it."""

    file: str
    samples: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"file": self.file, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}


def padded(size: int) -> int:
    """Bytes ``size`` bytes of member data take in a tar (rounded up to a block)."""
    return -(-size // BLOCK) * BLOCK


def closed_size(written: int) -> int:
    """The size of an archive of ``written`` member bytes once closed (end blocks, record padding)."""
    return -(-(written + END_OF_ARCHIVE) // RECORD) * RECORD


def _tarinfo_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


_TEMPLATE = _tarinfo_header("", 0)  # a ustar block; only the name, size and checksum fields vary
_NAME, _SIZE, _CHECKSUM = slice(0, 100), slice(124, 136), slice(148, 156)
_MAX_FAST_SIZE = 8**11  # what 11 octal digits hold


def member_header(name: str, size: int) -> bytes:
    """The header block(s) of a regular-file member, byte for byte what ``tarfile`` writes in PAX format.

    ``TarInfo.tobuf`` costs ~40 us a member (8% of an export of 100 kB images); a short ASCII name
    (every uuid key) only needs three fields of a fixed block filled in. Anything else (a long or
    non-ASCII name gets a PAX extended header) goes through ``tarfile``.
    """
    encoded = name.encode("ascii", "replace")
    if len(encoded) > 100 or not name.isascii() or size >= _MAX_FAST_SIZE:
        return _tarinfo_header(name, size)
    block = bytearray(_TEMPLATE)
    block[_NAME] = encoded.ljust(100, b"\0")
    block[_SIZE] = b"%011o\0" % size
    block[_CHECKSUM] = b"        "
    block[_CHECKSUM] = b"%06o\0 " % sum(block)
    return bytes(block)


def remove_temps(folder: Path, pattern: str) -> int:
    """Delete the temp shards (matching ``.{pattern}.export.*.tmp``) a killed export left."""
    return remove_stale_temps(folder, pattern, TEMP_TAG)


class ShardWriter:
    """Writes samples (each a few named members) into one tar shard; ``commit`` makes it appear whole."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.temp = path.parent / temp_name(path.name, TEMP_TAG)
        self._file = open(self.temp, "wb")  # noqa: SIM115 - closed by commit/abort
        self._sha = hashlib.sha256()
        self.bytes = 0
        self.samples = 0

    @staticmethod
    def encode(members: Sequence[tuple[str, bytes]]) -> list[bytes]:
        """The tar bytes of one sample's members (headers, data, padding), in order."""
        chunks: list[bytes] = []
        for name, data in members:
            chunks.append(member_header(name, len(data)))
            chunks.append(data)
            pad = padded(len(data)) - len(data)
            if pad:
                chunks.append(b"\0" * pad)
        return chunks

    def fits(self, size: int, max_samples: int, max_bytes: int) -> bool:
        """Whether a sample of ``size`` tar bytes still belongs in this shard (an empty shard takes any)."""
        if self.samples == 0:
            return True
        return self.samples < max_samples and closed_size(self.bytes + size) <= max_bytes

    def add(self, chunks: Sequence[bytes]) -> None:
        for chunk in chunks:
            self._write(chunk)
        self.samples += 1

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self.bytes += len(data)

    def commit(self) -> ShardInfo:
        """Close the archive, make it durable and rename it into place."""
        self._write(b"\0" * (closed_size(self.bytes) - self.bytes))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp, self.path)
        _fsync_dir(self.path.parent)
        return ShardInfo(self.path.name, self.samples, self.bytes, self._sha.hexdigest())

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.temp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (the directory entry), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
