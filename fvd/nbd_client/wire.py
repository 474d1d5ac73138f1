"""A socket with an overall deadline: every receive and send of one handshake or one
request must finish before it, however the peer paces its bytes. Any socket error, end of
stream or missed deadline raises BaseImageError naming the URI and what was being done;
the caller then drops the connection (a half-read reply leaves the stream unusable)."""

from __future__ import annotations

import errno
import math
import os
import socket
import time
from typing import NoReturn

from fvd.errors import BaseImageError
from fvd.nbd_client.protocol import MIN_RATE, STATUS_PIECE


class Wire:
    """The byte stream of one connection (a plain or a TLS socket)."""

    def __init__(self, sock: socket.socket, uri: str) -> None:
        self.sock = sock
        self.uri = uri
        self.what = "handshake"
        self.limit = math.inf
        self.deadline = math.inf
        self.credit = 0  # payload bytes that may still extend the deadline

    def start(self, what: str, seconds: float, credit: int = 0) -> None:
        """A new operation (`what` names it in errors) that must end within `seconds`,
        plus 1/MIN_RATE s per payload byte received, for at most `credit` bytes (see
        recv_into): it ends within seconds + credit / MIN_RATE whatever the peer does."""
        self.what = what
        self.limit = seconds
        self.deadline = time.monotonic() + seconds
        self.credit = credit

    def fail(self, problem: str) -> NoReturn:
        raise BaseImageError(f"{self.uri}: NBD {self.what}: {problem}")

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self._expired()
        return left

    def _expired(self) -> NoReturn:
        self.fail(
            f"no complete answer within the deadline ({self.limit:g} s, plus 1 s per "
            f"{MIN_RATE // 1024} KiB of payload received; see the URI's timeout "
            f"parameters); connection dropped"
        )

    def recv_into(self, mv: memoryview, payload: bool = False) -> None:
        """Fill `mv`; bytes of a payload (`payload`) extend the deadline at MIN_RATE, so a
        slow but steady bulk transfer completes and a trickle does not."""
        got = 0
        while got < len(mv):
            self.sock.settimeout(self.remaining())
            try:
                n = self.sock.recv_into(mv[got:])
            except TimeoutError:
                self._expired()
            except OSError as e:
                self.fail(f"receive failed: {_describe(e)}")
            if n == 0:
                self.fail("the server closed the connection")
            got += n
            if payload and self.credit:
                k = min(n, self.credit)
                self.credit -= k
                self.deadline += k / MIN_RATE

    def recv(self, n: int, payload: bool = False) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf), payload)
        return bytes(buf)

    def skip(self, n: int) -> None:
        """Read and drop `n` payload bytes (bounded by the caller) in pieces."""
        scratch = memoryview(bytearray(min(n, STATUS_PIECE)))
        while n:
            k = min(n, len(scratch))
            self.recv_into(scratch[:k], payload=True)
            n -= k

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.remaining())
        try:
            self.sock.sendall(data)
        except TimeoutError:
            self._expired()
        except OSError as e:
            self.fail(f"send failed: {_describe(e)}")

    def close(self) -> None:
        self.sock.close()


def _describe(e: OSError) -> str:
    if type(e).__module__ == "ssl":  # SSLError: its errno is OpenSSL's, not an errno
        return str(e)
    if e.errno is not None and e.errno in errno.errorcode:
        return f"{errno.errorcode[e.errno]}: {os.strerror(e.errno)}"
    return str(e) or type(e).__name__
