"""Connect and negotiate: fixed newstyle, NBD_OPT_STARTTLS for nbds://, structured replies
and the base:allocation context when offered, then NBD_OPT_GO (NBD_OPT_EXPORT_NAME when
the server does not know GO). Every option reply is checked against what the option
allows, bounded (protocol.MAX_OPTION_REPLY bytes, MAX_OPTION_REPLIES replies) and the
whole exchange shares one deadline (the URI's connect-timeout)."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from fvd.errors import BaseImageError
from fvd.nbd_client import tls
from fvd.nbd_client.protocol import (
    BASE_ALLOCATION,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_EXPORT,
    MAX_EXPORT_SIZE,
    MAX_OPTION_REPLIES,
    MAX_OPTION_REPLY,
    MAX_STRING,
    NBD_MAGIC,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_TLS_REQD,
    REP_ERR_UNSUP,
    REP_ERROR_BIT,
    REP_ERRORS,
    REP_INFO,
    REP_META_CONTEXT,
)
from fvd.nbd_client.uri import NbdUri
from fvd.nbd_client.wire import Wire

if TYPE_CHECKING:
    import ssl


@dataclass
class Negotiated:
    size: int
    flags: int
    structured: bool
    context: int | None  # the base:allocation context id, when the server has one


def connect(
    u: NbdUri, connect_timeout: float, tls_context: ssl.SSLContext | None = None
) -> tuple[Wire, Negotiated]:
    """A connection in the transmission phase, or BaseImageError naming the URI;
    `tls_context` (tls.client_context) for nbds:// URIs."""
    started = time.monotonic()
    wire = Wire(_open_socket(u, connect_timeout), u.uri)
    wire.start("handshake", connect_timeout)
    wire.deadline = started + connect_timeout  # the connect counts too
    try:
        return wire, _negotiate(wire, u, tls_context)
    except BaseException:
        wire.close()
        raise


def _open_socket(u: NbdUri, timeout: float) -> socket.socket:
    try:
        if isinstance(u.where, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(u.where)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection(u.where, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except TimeoutError:
        raise BaseImageError(
            f"{u.uri}: cannot connect to NBD server: no answer within {timeout:g} s"
        ) from None
    except OSError as e:
        raise BaseImageError(f"{u.uri}: cannot connect to NBD server: {e}") from e


def _negotiate(wire: Wire, u: NbdUri, tls_context: ssl.SSLContext | None) -> Negotiated:
    magic, opt_magic, hflags = struct.unpack(">QQH", wire.recv(18))
    if magic != NBD_MAGIC:
        wire.fail("not an NBD server (no NBDMAGIC)")
    if opt_magic != IHAVEOPT or not hflags & FLAG_FIXED_NEWSTYLE:
        wire.fail("the server does not speak fixed newstyle NBD")
    no_zeroes = bool(hflags & FLAG_NO_ZEROES)
    wire.send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0)))
    if u.tls:
        _starttls(wire, u, tls_context or tls.client_context(u))
    export = u.export.encode()
    structured = _acked(wire, OPT_STRUCTURED_REPLY, b"")
    context = _meta_context(wire, export) if structured else None
    size, flags = _go(wire, export, no_zeroes)
    if size > MAX_EXPORT_SIZE:
        wire.fail(f"the export claims {size} bytes (more than 2^63 - 1)")
    return Negotiated(size, flags, structured, context)


def _starttls(wire: Wire, u: NbdUri, ctx: ssl.SSLContext) -> None:
    _send_option(wire, OPT_STARTTLS, b"")
    for rtype, payload in _replies(wire, OPT_STARTTLS, allow_tls_reqd=True):
        if rtype == REP_ACK:
            break
        if rtype & REP_ERROR_BIT:
            wire.fail(f"the server does not offer TLS ({_error_text(rtype, payload)})")
        wire.fail(f"unexpected reply type {rtype} to NBD_OPT_STARTTLS")
    tls.start(wire, u, ctx)


def _send_option(wire: Wire, option: int, data: bytes) -> None:
    wire.send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def _replies(wire: Wire, option: int, allow_tls_reqd: bool = False) -> Iterator[tuple[int, bytes]]:
    """(reply type, payload) of the replies to `option`, each checked and bounded; the
    caller stops at the final one."""
    for _ in range(MAX_OPTION_REPLIES):
        magic, opt, rtype, length = struct.unpack(">QIII", wire.recv(20))
        if magic != OPT_REPLY_MAGIC:
            wire.fail("bad option reply magic")
        if opt != option:
            wire.fail(f"reply for option {opt}, expected {option}")
        if length > MAX_OPTION_REPLY:
            wire.fail(f"option reply of {length} bytes (at most {MAX_OPTION_REPLY} allowed)")
        payload = wire.recv(length) if length else b""
        if rtype == REP_ERR_TLS_REQD and not allow_tls_reqd:
            wire.fail("the server requires TLS: use an nbds:// or nbds+unix:// URI")
        yield rtype, payload
    wire.fail(f"more than {MAX_OPTION_REPLIES} replies to option {option}")


def _error_text(rtype: int, payload: bytes) -> str:
    name = REP_ERRORS.get(rtype, f"error {rtype & ~REP_ERROR_BIT}")
    msg = payload[:MAX_STRING].decode("utf-8", "replace")
    return f"{name}: {msg}" if msg else name


def _acked(wire: Wire, option: int, data: bytes) -> bool:
    _send_option(wire, option, data)
    for rtype, _payload in _replies(wire, option):
        if rtype == REP_ACK:
            return True
        if rtype & REP_ERROR_BIT:
            return False
        wire.fail(f"unexpected reply type {rtype} to option {option}")
    raise AssertionError("unreachable")


def _meta_context(wire: Wire, export: bytes) -> int | None:
    data = (
        struct.pack(">I", len(export))
        + export
        + struct.pack(">II", 1, len(BASE_ALLOCATION))
        + BASE_ALLOCATION
    )
    _send_option(wire, OPT_SET_META_CONTEXT, data)
    context = None
    for rtype, payload in _replies(wire, OPT_SET_META_CONTEXT):
        if rtype == REP_ACK:
            return context
        if rtype & REP_ERROR_BIT:
            return None
        if rtype != REP_META_CONTEXT or len(payload) < 5:
            wire.fail(f"unexpected reply (type {rtype}, {len(payload)} bytes) to a meta context")
        if payload[4:] == BASE_ALLOCATION and context is None:
            (context,) = struct.unpack_from(">I", payload)
    raise AssertionError("unreachable")


def _go(wire: Wire, export: bytes, no_zeroes: bool) -> tuple[int, int]:
    _send_option(wire, OPT_GO, struct.pack(">I", len(export)) + export + struct.pack(">H", 0))
    size = flags = None
    for rtype, payload in _replies(wire, OPT_GO):
        if rtype == REP_ACK:
            break
        if rtype == REP_INFO:
            if len(payload) < 2:
                wire.fail("NBD_REP_INFO shorter than its type")
            if struct.unpack_from(">H", payload)[0] == INFO_EXPORT:
                if len(payload) != 12:
                    wire.fail(f"NBD_INFO_EXPORT of {len(payload)} bytes (12 expected)")
                size, flags = struct.unpack_from(">QH", payload, 2)
        elif rtype == REP_ERR_UNSUP:
            return _export_name(wire, export, no_zeroes)
        elif rtype & REP_ERROR_BIT:
            name = export.decode(errors="replace")
            wire.fail(f"export {name!r} refused ({_error_text(rtype, payload)})")
        else:
            wire.fail(f"unexpected reply type {rtype} to NBD_OPT_GO")
    if size is None or flags is None:
        wire.fail("the server sent no export size")
    return size, flags


def _export_name(wire: Wire, export: bytes, no_zeroes: bool) -> tuple[int, int]:
    wire.send(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(export)) + export)
    size, flags = struct.unpack(">QH", wire.recv(10))
    if not no_zeroes:
        wire.recv(124)
    return size, flags
