"""NbdClient: read-only access to an NBD export, safe from any thread.

A small pool of connections: a read takes an idle connection (or opens one, up to
`max_connections`), so a foreground read never queues behind a prefetch read in flight
on another connection. Any failure (socket error, missed deadline, protocol violation,
server error) closes that connection for good and raises BaseImageError naming the URI;
the next request connects again, so a base whose server comes back is used again."""

from __future__ import annotations

import functools
import os
import threading
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

from fvd.errors import BaseImageError
from fvd.nbd_client import tls
from fvd.nbd_client.connection import Connection
from fvd.nbd_client.protocol import SPARSE_READ_MIN, STATE_HOLE, STATE_ZERO
from fvd.nbd_client.uri import parse_uri

if TYPE_CHECKING:
    from typing_extensions import Buffer

T = TypeVar("T")


class NbdClient:
    """`timeout` / `connect_timeout` (seconds) override the URI's (docs/nbd.md)."""

    def __init__(
        self,
        uri: str,
        *,
        max_connections: int | None = None,
        timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        self.parsed = parse_uri(uri)
        self.uri = uri
        self.timeout = self.parsed.timeout if timeout is None else timeout
        self.connect_timeout = (
            self.parsed.connect_timeout if connect_timeout is None else connect_timeout
        )
        if max_connections is None:  # FVD_NBD_CONNECTIONS: the pool size of NBD bases
            max_connections = int(os.environ.get("FVD_NBD_CONNECTIONS", "4"))
        self.max_connections = max(1, max_connections)
        # built once, before any connection: unusable TLS settings fail without a server
        self._tls = tls.client_context(self.parsed) if self.parsed.tls else None
        self._idle: list[Connection] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()
        conn = self._connect()
        self.size = conn.size
        self.block_status = conn.context is not None
        self._count = 1
        self._put(conn)

    def _connect(self) -> Connection:
        return Connection(self.parsed, self.connect_timeout, self.timeout, self._tls)

    def _take(self) -> Connection:
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
            conn = self._connect()
        except BaseException:
            self._drop()
            raise
        if conn.size != self.size:
            conn.close()
            self._drop()
            raise BaseImageError(
                f"{self.uri}: the export's size changed from {self.size} to {conn.size}"
            )
        return conn

    def _put(self, conn: Connection) -> None:
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

    def _call(self, fn: Callable[[Connection], T]) -> T:
        """fn(connection) on a pooled connection; a connection that failed in any way is
        closed and never reused (a half-read reply leaves its stream unusable)."""
        conn = self._take()
        try:
            result = fn(conn)
        except BaseException:
            conn.wire.close()
            self._drop()
            raise
        self._put(conn)
        return result

    def readinto(self, offset: int, buffer: Buffer) -> int:
        """Fill `buffer` from `offset`, or raise BaseImageError (then what `buffer` holds
        is undefined: nothing of a failed read may be used). A large read first asks block
        status and reads only what is not known to be zero (nbdkit's file plugin, unlike
        qemu-nbd, sends holes as data), so prefetch of a sparse base does not move its
        zeros."""
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
                self._call(functools.partial(Connection.readinto, offset=start, mv=piece))
        return len(mv)

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool, bool]]:
        """(start, length, zero, data) runs of base:allocation covering the range exactly,
        adjacent equal runs merged (also across requests); all data without block status."""
        pos, end = offset, offset + length
        run_start, run_flags = offset, -1
        while pos < end:
            found = self._call(
                functools.partial(Connection.block_status, offset=pos, length=end - pos)
            )
            for n, flags in found:
                if flags != run_flags and pos > run_start:
                    yield _extent(run_start, pos - run_start, run_flags)
                    run_start = pos
                run_flags = flags
                pos += n
        if pos > run_start:
            yield _extent(run_start, pos - run_start, run_flags)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()


def _extent(start: int, n: int, flags: int) -> tuple[int, int, bool, bool]:
    return start, n, bool(flags & STATE_ZERO), not flags & STATE_HOLE


def _data_runs(extents: Iterable[tuple[int, int, bool, bool]]) -> list[tuple[int, int, bool]]:
    """(start, length, zero) runs: known-zero ranges apart, adjacent others merged."""
    runs: list[tuple[int, int, bool]] = []
    for start, n, zero, _data in extents:
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], runs[-1][1] + n, zero)
        else:
            runs.append((start, n, zero))
    return runs
