"""A small NBD client: what a base image on another machine needs, nothing more.

Why our own: libnbd's Python binding (Debian python3-libnbd) is built for the system
interpreter only and cannot be imported from the Python fvd runs on (nor pip-installed);
a read-only base needs a few hundred lines of protocol, tested against nbdkit and qemu-nbd.

Protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):
fixed newstyle handshake, NBD_OPT_GO with the export name (NBD_OPT_EXPORT_NAME when the
server does not know GO), simple replies only (no structured replies negotiated), so
NBD_CMD_READ answers with a 16-byte header and the data; NBD_CMD_DISC to leave.

URIs as QEMU and libnbd spell them: ``nbd://HOST[:PORT]/EXPORT`` (TCP, port 10809 by
default) and ``nbd+unix:///EXPORT?socket=PATH`` (unix socket); the export name is the
percent-decoded path without its leading slash.

Threads: `NbdClient` keeps a small pool of connections. A read takes an idle connection
(or opens one, up to `max_connections`), so a foreground read never queues behind a
prefetch read in flight on another connection. Any socket error closes that connection
and raises `BaseImageError` naming the URI; the next read connects again, so a base whose
server comes back is used again.
"""
from __future__ import annotations

import socket
import struct
import threading
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import BaseImageError

NBD_MAGIC = 0x4E42444D41474943              # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054              # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_GO = 1, 2, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP = (1 << 31) | 1
INFO_EXPORT = 0
CMD_READ, CMD_DISC = 0, 2
DEFAULT_PORT = 10809
MAX_REQUEST = 4 << 20           # below every server's limit (qemu-nbd: 32 MiB)
SCHEMES = ("nbd://", "nbd+unix://")


def is_nbd_uri(name) -> bool:
    """True for an NBD URI (never a file path, whatever files exist)."""
    return isinstance(name, str) and name.startswith(SCHEMES)


def parse_uri(uri: str) -> tuple[str, Any, str]:
    """("unix", path, export) or ("tcp", (host, port), export); ValueError when invalid."""
    parts = urlsplit(uri)
    export = unquote(parts.path.removeprefix("/"))
    query = parse_qs(parts.query)
    if parts.scheme == "nbd+unix":
        sock = query.get("socket", [None])[0]
        if parts.netloc or not sock:
            raise ValueError(f"{uri}: an nbd+unix URI is nbd+unix:///EXPORT?socket=PATH")
        return "unix", sock, export
    if parts.scheme == "nbd":
        if not parts.hostname:
            raise ValueError(f"{uri}: an nbd URI is nbd://HOST[:PORT]/EXPORT")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{uri}: bad port") from None
        return "tcp", (parts.hostname, port), export
    raise ValueError(f"{uri}: not an NBD URI (nbd:// or nbd+unix://)")


class _Connection:
    """One negotiated connection in the transmission phase."""

    def __init__(self, uri: str, timeout: float | None):
        kind, where, export = parse_uri(uri)
        if kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(where)
            except BaseException:
                self.sock.close()
                raise
        else:
            self.sock = socket.create_connection(where, timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.cookie = 0
        try:
            self.size, self.flags = self._handshake(export.encode())
        except BaseException:
            self.sock.close()
            raise

    # ----- handshake --------------------------------------------------------------------
    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, mv: memoryview) -> None:
        got = 0
        while got < len(mv):
            n = self.sock.recv_into(mv[got:])
            if n == 0:
                raise ConnectionError("server closed the connection")
            got += n

    def _handshake(self, export: bytes) -> tuple[int, int]:
        magic, opt_magic, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBD_MAGIC or opt_magic != IHAVEOPT:
            raise ConnectionError("not a newstyle NBD server")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise ConnectionError("server does not speak fixed newstyle NBD")
        no_zeroes = bool(hflags & FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE |
                                      (FLAG_NO_ZEROES if no_zeroes else 0)))
        data = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
        self._send_option(OPT_GO, data)
        size = flags = None
        while True:
            _opt, rtype, payload = self._option_reply()
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO and len(payload) >= 12 and \
                    struct.unpack_from(">H", payload)[0] == INFO_EXPORT:
                size, flags = struct.unpack_from(">QH", payload, 2)
            elif rtype == REP_ERR_UNSUP:
                return self._export_name(export, no_zeroes)
            elif rtype & (1 << 31):
                msg = payload.decode("utf-8", "replace") or f"error {rtype & 0x7FFFFFFF}"
                raise ConnectionError(f"export {export.decode(errors='replace')!r} "
                                      f"refused: {msg}")
        if size is None or flags is None:
            raise ConnectionError("server sent no export size")
        return size, flags

    def _send_option(self, option: int, data: bytes) -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self._recv(20))
        if magic != OPT_REPLY_MAGIC:
            raise ConnectionError("bad option reply magic")
        return opt, rtype, self._recv(length) if length else b""

    def _export_name(self, export: bytes, no_zeroes: bool) -> tuple[int, int]:
        self._send_option(OPT_EXPORT_NAME, export)
        size, flags = struct.unpack(">QH", self._recv(10))
        if not no_zeroes:
            self._recv(124)
        return size, flags

    # ----- transmission -----------------------------------------------------------------
    def readinto(self, offset: int, mv: memoryview) -> None:
        pos = 0
        while pos < len(mv):
            n = min(MAX_REQUEST, len(mv) - pos)
            self.cookie += 1
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, self.cookie,
                                          offset + pos, n))
            magic, error, cookie = struct.unpack(">IIQ", self._recv(16))
            if magic != SIMPLE_REPLY_MAGIC or cookie != self.cookie:
                raise ConnectionError("unexpected reply from server")
            if error:
                raise OSError(error, f"server error {error} reading {n} bytes at "
                                     f"{offset + pos}")
            self._recv_into(mv[pos:pos + n])
            pos += n

    def close(self) -> None:
        try:
            self.cookie += 1
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self.cookie,
                                          0, 0))
        except OSError:
            pass
        finally:
            self.sock.close()


class NbdClient:
    """Read-only access to an NBD export, safe from any thread (a connection pool)."""

    def __init__(self, uri: str, *, max_connections: int = 4,
                 timeout: float | None = 60.0):
        parse_uri(uri)
        self.uri = uri
        self.timeout = timeout
        self.max_connections = max_connections
        self._idle: list[_Connection] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()
        conn = self._connect()
        self.size = conn.size
        self._count = 1
        self._put(conn)

    def _connect(self) -> _Connection:
        try:
            return _Connection(self.uri, self.timeout)
        except (OSError, struct.error) as e:
            raise BaseImageError(f"{self.uri}: cannot connect to NBD server: {e}") from e

    def _take(self) -> _Connection:
        with self._cond:
            while True:
                if self._closed:
                    raise BaseImageError(f"{self.uri}: NBD base is closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self.max_connections:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return self._connect()
        except BaseException:
            self._drop()
            raise

    def _put(self, conn: _Connection) -> None:
        with self._cond:
            if self._closed:
                conn.close()
                return
            self._idle.append(conn)
            self._cond.notify()

    def _drop(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify()

    def readinto(self, offset: int, buffer) -> int:
        mv = memoryview(buffer).cast("B")
        if offset < 0 or offset + len(mv) > self.size:
            raise ValueError(f"{self.uri}: read [{offset}, {offset + len(mv)}) outside the "
                             f"export (size {self.size})")
        conn = self._take()
        try:
            conn.readinto(offset, mv)
        except (OSError, struct.error) as e:
            conn.sock.close()
            self._drop()
            raise BaseImageError(f"{self.uri}: NBD read of {len(mv)} bytes at {offset} "
                                 f"failed: {e}") from e
        except BaseException:
            conn.sock.close()       # a half-read reply leaves the stream unusable
            self._drop()
            raise
        self._put(conn)
        return len(mv)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()
