"""NBD URIs as the NBD URI standard (nbd doc/uri.md) and libnbd spell them, plus fvd's
deadline parameters.

    nbd://HOST[:PORT]/EXPORT            TCP, port 10809 by default
    nbds://HOST[:PORT]/EXPORT           TCP with TLS (STARTTLS), refused without it
    nbd+unix:///EXPORT?socket=PATH      unix socket
    nbds+unix:///EXPORT?socket=PATH     unix socket with TLS

Query parameters: ``socket``; for TLS (libnbd's names) ``tls-certificates=DIR``,
``tls-verify-peer=0|1``, ``tls-hostname=NAME``, ``tls-psk-file=FILE``, ``tls-username``;
fvd's deadlines ``connect-timeout=SECONDS`` (connect, TLS and handshake) and
``timeout=SECONDS`` (per request, see protocol.MIN_RATE). Any other parameter is refused:
the URI standard asks clients to diagnose what they do not understand, and a misspelt
``tls-certificates`` must not silently mean "the system CAs".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union
from urllib.parse import parse_qs, unquote, urlsplit

from fvd.nbd_client.protocol import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    MAX_STRING,
    MAX_TIMEOUT,
)

SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")
TLS_PARAMS = ("tls-certificates", "tls-verify-peer", "tls-hostname", "tls-psk-file", "tls-username")
KNOWN_PARAMS = ("socket", "connect-timeout", "timeout", *TLS_PARAMS)
TRUE, FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


@dataclass(frozen=True)
class NbdUri:
    """A parsed NBD URI; `where` is the socket path ("unix") or (host, port) ("tcp")."""

    uri: str
    kind: str
    where: Union[str, tuple[str, int]]
    export: str
    tls: bool = False
    tls_certificates: str | None = None
    tls_verify_peer: bool = True
    tls_hostname: str | None = None
    tls_psk_file: str | None = None
    tls_username: str | None = None
    user: str | None = None  # the URI's userinfo: the PSK user by default
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    timeout: float = DEFAULT_TIMEOUT


def is_nbd_uri(name: object) -> bool:
    """True for an NBD URI (never a file path, whatever files exist)."""
    return isinstance(name, str) and name.startswith(SCHEMES)


def parse_uri(uri: str) -> NbdUri:
    """The URI's parts; ValueError naming the URI when it is not a valid NBD URI."""
    parts = urlsplit(uri)
    scheme = parts.scheme
    if scheme not in ("nbd", "nbds", "nbd+unix", "nbds+unix"):
        raise ValueError(f"{uri}: not an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://)")
    export = unquote(parts.path.removeprefix("/"))
    if len(export.encode()) > MAX_STRING:
        raise ValueError(f"{uri}: export name longer than {MAX_STRING} bytes")
    query = _query(uri, parts.query)
    tls = scheme.startswith("nbds")
    if not tls and any(k in query for k in TLS_PARAMS):
        raise ValueError(f"{uri}: tls-* parameters need nbds:// or nbds+unix://")
    where: Union[str, tuple[str, int]]
    if scheme.endswith("+unix"):
        sock = query.get("socket")
        if parts.hostname or parts.port or not sock:
            raise ValueError(f"{uri}: a unix socket URI is {scheme}:///EXPORT?socket=PATH")
        kind, where = "unix", sock
    else:
        if "socket" in query or not parts.hostname:
            raise ValueError(f"{uri}: a TCP URI is {scheme}://HOST[:PORT]/EXPORT")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{uri}: bad port") from None
        kind, where = "tcp", (parts.hostname, port)
    return NbdUri(
        uri,
        kind,
        where,
        export,
        tls=tls,
        tls_certificates=query.get("tls-certificates"),
        tls_verify_peer=_bool(uri, "tls-verify-peer", query.get("tls-verify-peer", "1")),
        tls_hostname=query.get("tls-hostname"),
        tls_psk_file=query.get("tls-psk-file"),
        tls_username=query.get("tls-username"),
        user=unquote(parts.username) if parts.username else None,
        connect_timeout=_seconds(uri, query, "connect-timeout", DEFAULT_CONNECT_TIMEOUT),
        timeout=_seconds(uri, query, "timeout", DEFAULT_TIMEOUT),
    )


def _query(uri: str, text: str) -> dict[str, str]:
    raw = parse_qs(text, keep_blank_values=True)
    for key, values in raw.items():
        if key not in KNOWN_PARAMS:
            known = ", ".join(KNOWN_PARAMS)
            raise ValueError(f"{uri}: unknown query parameter {key!r} (known: {known})")
        if len(values) > 1:
            raise ValueError(f"{uri}: query parameter {key!r} given twice")
    return {k: v[0] for k, v in raw.items()}


def _bool(uri: str, key: str, value: str) -> bool:
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise ValueError(f"{uri}: {key} must be 0 or 1")


def _seconds(uri: str, query: dict[str, str], key: str, default: float) -> float:
    if key not in query:
        return default
    try:
        value = float(query[key])
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT:
        raise ValueError(f"{uri}: {key} must be a number of seconds in (0, {MAX_TIMEOUT:g}]")
    return value
