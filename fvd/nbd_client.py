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

import functools
import os
import socket
import struct
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from fvd.errors import BaseImageError

if TYPE_CHECKING:
    from typing_extensions import Buffer

T = TypeVar("T")

NBD_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
STRUCTURED_REPLY_MAGIC = 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_GO = 1, 2, 7
OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR_UNSUP = (1 << 31) | 1
INFO_EXPORT = 0
CMD_READ, CMD_DISC, CMD_BLOCK_STATUS = 0, 2, 7
REPLY_FLAG_DONE = 1
REPLY_NONE, REPLY_OFFSET_DATA, REPLY_OFFSET_HOLE, REPLY_BLOCK_STATUS = 0, 1, 2, 5
REPLY_ERROR_BIT = 1 << 15
STATE_HOLE, STATE_ZERO = 1, 2
BASE_ALLOCATION = b"base:allocation"
MAX_STATUS = 1 << 30
SPARSE_READ_MIN = 1 << 20  # reads this large ask block status first
DEFAULT_PORT = 10809
MAX_REQUEST = 4 << 20  # below every server's limit (qemu-nbd: 32 MiB)
SCHEMES = ("nbd://", "nbd+unix://")


def is_nbd_uri(name: object) -> bool:
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

    def __init__(self, uri: str, timeout: float | None) -> None:
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
        self.sock.sendall(
            struct.pack(">I", FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0))
        )
        self._negotiate_block_status(export)
        data = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
        self._send_option(OPT_GO, data)
        size = flags = None
        while True:
            _opt, rtype, payload = self._option_reply()
            if rtype == REP_ACK:
                break
            if (
                rtype == REP_INFO
                and len(payload) >= 12
                and struct.unpack_from(">H", payload)[0] == INFO_EXPORT
            ):
                size, flags = struct.unpack_from(">QH", payload, 2)
            elif rtype == REP_ERR_UNSUP:
                return self._export_name(export, no_zeroes)
            elif rtype & (1 << 31):
                msg = payload.decode("utf-8", "replace") or f"error {rtype & 0x7FFFFFFF}"
                raise ConnectionError(f"export {export.decode(errors='replace')!r} refused: {msg}")
        if size is None or flags is None:
            raise ConnectionError("server sent no export size")
        return size, flags

    def _negotiate_block_status(self, export: bytes) -> None:
        """Structured replies and the base:allocation context, when the server has them
        (self.context stays None otherwise: reads still work, extents say "data")."""
        self.structured = False
        self.context: int | None = None
        self._send_option(OPT_STRUCTURED_REPLY, b"")
        if not self._option_acked():
            return
        self.structured = True
        data = (
            struct.pack(">I", len(export))
            + export
            + struct.pack(">I", 1)
            + struct.pack(">I", len(BASE_ALLOCATION))
            + BASE_ALLOCATION
        )
        self._send_option(OPT_SET_META_CONTEXT, data)
        while True:
            _opt, rtype, payload = self._option_reply()
            if rtype == REP_META_CONTEXT and len(payload) >= 4 and payload[4:] == BASE_ALLOCATION:
                self.context = struct.unpack_from(">I", payload)[0]
            elif rtype == REP_ACK or rtype & (1 << 31):
                return

    def _option_acked(self) -> bool:
        while True:
            _opt, rtype, _payload = self._option_reply()
            if rtype == REP_ACK:
                return True
            if rtype & (1 << 31):
                return False

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
    def _request(self, cmd: int, offset: int, length: int) -> int:
        self.cookie += 1
        self.sock.sendall(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self.cookie, offset, length)
        )
        return self.cookie

    def readinto(self, offset: int, mv: memoryview) -> None:
        pos = 0
        while pos < len(mv):
            n = min(MAX_REQUEST, len(mv) - pos)
            cookie = self._request(CMD_READ, offset + pos, n)
            self._reply(cookie, mv[pos : pos + n], offset + pos)
            pos += n

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """[(length, NBD_STATE_* flags)] from offset, covering at most `length` bytes."""
        if self.context is None:
            return [(length, 0)]
        cookie = self._request(CMD_BLOCK_STATUS, offset, min(length, MAX_STATUS))
        found: list[tuple[int, int]] = []
        self._reply(cookie, None, offset, found)
        return found

    def _reply(
        self,
        cookie: int,
        out: memoryview | None,
        base: int,
        status: list[tuple[int, int]] | None = None,
    ) -> None:
        """Read the whole reply to `cookie`: simple, or structured chunks until DONE.
        Read data lands in `out` (which starts at virtual `base`); a hole is zero-filled."""
        error = None
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                err, got = struct.unpack(">IQ", self._recv(12))
                self._check_cookie(got, cookie)
                if err:
                    raise OSError(err, f"server error {err}")
                if out is not None:
                    self._recv_into(out)
                return
            if magic != STRUCTURED_REPLY_MAGIC:
                raise ConnectionError("unexpected reply from server")
            flags, rtype, got, length = struct.unpack(">HHQI", self._recv(16))
            self._check_cookie(got, cookie)
            error = self._chunk(rtype, length, out, base, status) or error
            if flags & REPLY_FLAG_DONE:
                break
        if error:
            raise OSError(error[0], f"server error {error[0]}: {error[1]}")

    def _chunk(
        self,
        rtype: int,
        length: int,
        out: memoryview | None,
        base: int,
        status: list[tuple[int, int]] | None,
    ) -> tuple[int, str] | None:
        if rtype == REPLY_OFFSET_DATA and out is not None and length >= 8:
            (off,) = struct.unpack(">Q", self._recv(8))
            s = off - base
            if s < 0 or s + length - 8 > len(out):
                raise ConnectionError("read reply outside the request")
            self._recv_into(out[s : s + length - 8])
        elif rtype == REPLY_OFFSET_HOLE and out is not None and length == 12:
            off, size = struct.unpack(">QI", self._recv(12))
            s = off - base
            if s < 0 or s + size > len(out):
                raise ConnectionError("hole reply outside the request")
            out[s : s + size] = bytes(size)
        elif rtype == REPLY_BLOCK_STATUS and status is not None and length >= 4:
            payload = self._recv(length)
            if struct.unpack_from(">I", payload)[0] == self.context:
                status.extend(struct.iter_unpack(">II", payload[4 : 4 + (length - 4) // 8 * 8]))
        elif rtype & REPLY_ERROR_BIT:
            payload = self._recv(length)
            err = struct.unpack_from(">I", payload)[0] if length >= 4 else 5
            msg = payload[6:].decode("utf-8", "replace") if length >= 6 else ""
            return (err or 5, msg)
        elif length:
            self._recv(length)  # a chunk type we did not ask for: skip it
        return None

    def _check_cookie(self, got: int, want: int) -> None:
        if got != want:
            raise ConnectionError(f"reply for request {got}, expected {want}")

    def close(self) -> None:
        try:
            self.cookie += 1
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self.cookie, 0, 0))
        except OSError:
            pass
        finally:
            self.sock.close()


class NbdClient:
    """Read-only access to an NBD export, safe from any thread (a connection pool)."""

    def __init__(
        self, uri: str, *, max_connections: int | None = None, timeout: float | None = 60.0
    ) -> None:
        parse_uri(uri)
        self.uri = uri
        self.timeout = timeout
        if max_connections is None:  # FVD_NBD_CONNECTIONS: the pool size of NBD bases
            max_connections = int(os.environ.get("FVD_NBD_CONNECTIONS", "4"))
        self.max_connections = max(1, max_connections)
        self._idle: list[_Connection] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()
        conn = self._connect()
        self.size = conn.size
        self.block_status = conn.context is not None
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

    def _call(self, what: str, fn: Callable[[_Connection], T]) -> T:
        """fn(connection) on a pooled connection; a failed connection is dropped."""
        conn = self._take()
        try:
            result = fn(conn)
        except (OSError, struct.error) as e:
            conn.sock.close()
            self._drop()
            raise BaseImageError(f"{self.uri}: NBD {what} failed: {e}") from e
        except BaseException:
            conn.sock.close()  # a half-read reply leaves the stream unusable
            self._drop()
            raise
        self._put(conn)
        return result

    def readinto(self, offset: int, buffer: Buffer) -> int:
        """Fill `buffer` from `offset`. A large read first asks block status and reads
        only what is not known to be zero (nbdkit's file plugin, unlike qemu-nbd, sends
        holes as data), so prefetch of a sparse base does not move its zeros."""
        mv = memoryview(buffer).cast("B")
        if offset < 0 or offset + len(mv) > self.size:
            raise ValueError(
                f"{self.uri}: read [{offset}, {offset + len(mv)}) outside the "
                f"export (size {self.size})"
            )
        runs = [(offset, len(mv), False)]
        if len(mv) >= SPARSE_READ_MIN and self.block_status:
            runs = _data_runs(self.extents(offset, len(mv)))
        for start, n, zero in runs:
            piece = mv[start - offset : start - offset + n]
            if zero:
                piece[:] = bytes(n)
            else:
                self._call(
                    f"read of {n} bytes at {start}",
                    functools.partial(_Connection.readinto, offset=start, mv=piece),
                )
        return len(mv)

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool, bool]]:
        """(start, length, zero, data) runs of base:allocation covering the range exactly;
        all data when the server has no block status."""
        pos, end = offset, offset + length
        while pos < end:
            found = self._call(
                f"block status at {pos}",
                functools.partial(_Connection.block_status, offset=pos, length=end - pos),
            )
            start = pos
            for n, flags in found:
                n = min(n, end - pos)
                if n <= 0:
                    break
                yield pos, n, bool(flags & STATE_ZERO), not flags & STATE_HOLE
                pos += n
            if pos == start:  # no progress: say "data", never loop
                yield pos, end - pos, False, True
                pos = end

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()


def _data_runs(extents: Iterable[tuple[int, int, bool, bool]]) -> list[tuple[int, int, bool]]:
    """(start, length, zero) runs: known-zero ranges apart, adjacent others merged."""
    runs: list[tuple[int, int, bool]] = []
    for start, n, zero, _data in extents:
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], runs[-1][1] + n, zero)
        else:
            runs.append((start, n, zero))
    return runs
