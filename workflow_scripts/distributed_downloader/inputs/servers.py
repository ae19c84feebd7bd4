"""URLs -> server names: the server a URL belongs to (host[:port] as the HTTP client contacts it), or why
the URL is refused. Batches, lanes and politeness are all per server name."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

import idna
import pyarrow as pa
import pyarrow.compute as pc

from distributed_downloader.inputs.columns import MAX_URL_LENGTH, URL_COLUMNS

_AUTHORITY = r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):(?://(?P<authority>[^/?#]*))?"
_DEFAULT_PORTS = {"http": "80", "https": "443"}


@lru_cache(maxsize=65536)
def server_name_of(scheme: str, authority: str) -> tuple[str, str]:
    """(server_name, '') or ('', reason). server_name = host[:port], lower-cased, safe as a path segment."""
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return "", f"unsupported scheme '{scheme}'"
    if "\\" in authority:  # clients disagree on where such a URL goes: it could land on another server
        return "", "ambiguous host (backslash in the authority)"
    if "@" in authority:
        authority = authority.rsplit("@", 1)[1]  # drop credentials: never part of a server's name
    host, port = authority, ""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return "", "malformed IPv6 host"
        host, rest = authority[: end + 1], authority[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return "", "malformed host"
            port = rest[1:]
    elif ":" in authority:
        host, port = authority.rsplit(":", 1)
    host = host.lower()
    if port and (not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536):
        return "", f"invalid port '{port}'"
    if not host.isascii():
        # IDNA 2008 with UTS 46 mapping, as requests/urllib3 encode it: the name must be the host
        # the client really contacts (IDNA 2003 would fold straße.de into strasse.de).
        try:
            host = idna.encode(host.rstrip(".\u3002\uff0e\uff61"), uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return "", "host is not a valid internationalised domain name"
    host = host.rstrip(".")
    if not host:
        return "", "URL has no host"
    if host.startswith("["):
        try:
            if "%" in host:  # a zone id names a local interface: never a server on the web
                raise ValueError(host)
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "", "malformed IPv6 host"
    elif host.startswith(".") or any(not (c.isalnum() or c in ".-_") for c in host):
        return "", "invalid characters in host"
    if port and port.lstrip("0") != _DEFAULT_PORTS[scheme]:
        return f"{host}:{int(port)}", ""
    return host, ""


def add_server_names(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Append `server_name`; fold URL problems into `_reject`."""
    identifier = batch.column("identifier")
    parts = pc.extract_regex(identifier, _AUTHORITY)
    valid_form = pc.fill_null(pc.is_valid(parts), False)
    scheme = pc.fill_null(pc.struct_field(parts, [0]), "")
    authority = pc.fill_null(pc.struct_field(parts, [1]), "")
    pairs = pc.binary_join_element_wise(scheme, authority, "\x00")
    distinct = pc.unique(pairs)
    looked_up = [server_name_of(*p.split("\x00", 1)) for p in distinct.to_pylist()]
    index = pc.index_in(pairs, distinct)
    names = pc.take(pa.array([n for n, _ in looked_up], pa.string()), index)
    reasons = pc.take(pa.array([r for _, r in looked_up], pa.string()), index)
    reject = batch.column("_reject")
    length = pc.utf8_length(identifier)
    has_control = pc.match_substring_regex(identifier, r"[\x00-\x1f\x7f]")
    reason = pc.if_else(
        pc.not_equal(reject, ""),
        reject,
        pc.if_else(
            pc.equal(identifier, ""),
            "empty URL",
            pc.if_else(
                pc.invert(valid_form),
                "malformed URL",
                pc.if_else(
                    pc.greater(length, MAX_URL_LENGTH),
                    f"URL longer than {MAX_URL_LENGTH} characters",
                    pc.if_else(has_control, "control characters in URL", reasons),
                ),
            ),
        ),
    )
    columns = [batch.column(name) for name in URL_COLUMNS]
    return pa.RecordBatch.from_arrays(
        [*columns, pc.if_else(pc.equal(reason, ""), names, ""), reason],
        names=[*URL_COLUMNS, "server_name", "_reject"],
    )
