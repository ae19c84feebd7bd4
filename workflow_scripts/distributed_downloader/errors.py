"""Error codes written to ``errors.parquet`` and the exceptions that carry them.

Positive codes are HTTP statuses. Negative codes are ours; they are part of the
data format (the README's table of error codes) and must never be renumbered.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    NETWORK = -1  # connection refused/reset, DNS failure, broken body
    IMAGE_DECODE = -2  # body is not a decodable image (HTML, truncated, corrupt)
    TIMEOUT = -3  # connect, read or total-time timeout
    TOO_LARGE = -4  # body over max_image_bytes
    TOO_MANY_PIXELS = -5  # over max_image_pixels (decompression-bomb guard)
    ROBOTS_DISALLOWED = -6  # refused by the server's robots.txt
    X_ROBOTS_TAG = -7  # opted out by an X-Robots-Tag header (noai, noimageai, ...)
    PRIVATE_ADDRESS = -8  # URL or redirect resolves to a private/loopback/link-local address
    REDIRECT = -9  # redirect loop or too many redirects
    SERVER_IGNORED = -10  # server on the ignored list (unreachable at profiling, or the user's list)
    # -11 is reserved and never written: a URL still failing after the last round keeps its last transient
    # code (retry_count says how often it was tried). Kept so that the number is never reused and a store
    # that holds it (a monthly snapshot's previous_dataset) reads it as transient (snapshot.RETRIED_NOW).
    RETRIES_EXHAUSTED = -11
    PROTOCOL = -12  # malformed HTTP response (bad Content-Length, bad encoding)
    BANNED = -13  # refused (403) during a burst of 403s: a temporary ban, tried again next round
    SERVER_PAUSED = -14  # the server asked us to wait (Retry-After, quota) longer than a round may wait
    ROBOTS_UNAVAILABLE = -15  # robots.txt answered 5xx / was unreachable: disallow all for now (RFC 9309)
    TDM_RESERVED = -16  # opted out by `tdm-reservation: 1` (W3C TDM Reservation Protocol): permanent
    INTERNAL = -17  # an unexpected exception while handling this URL (a library raised): transient
    SERVER_UNREACHABLE = -18  # no answer to profiling's probes: held for this round, downloaded again next round


TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset(
    {
        ErrorCode.NETWORK,
        ErrorCode.TIMEOUT,
        ErrorCode.BANNED,
        ErrorCode.SERVER_PAUSED,
        ErrorCode.ROBOTS_UNAVAILABLE,
        ErrorCode.INTERNAL,
        ErrorCode.SERVER_UNREACHABLE,
    }
)


def is_transient(code: int) -> bool:
    """Whether a URL that failed with ``code`` deserves another try in a later round."""
    return code in TRANSIENT_HTTP or code in TRANSIENT_CODES


def internal_error_message(exc: BaseException, where: str) -> str:
    """The error_msg of an INTERNAL row: where it happened, the exception's type and message."""
    text = str(exc).replace("\n", " ")[:300]
    return f"internal error while {where}: {type(exc).__name__}: {text} (tried again next round)"


class DownloadError(Exception):
    """A URL's failure, carried to the error row as (code, message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message


class ImageError(DownloadError):
    """The body could not be turned into a stored image."""
