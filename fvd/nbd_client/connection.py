"""One negotiated connection in the transmission phase: requests strictly one at a time,
so replies never need reordering; each request has its own deadline (Wire.start)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from fvd.nbd_client import handshake, replies
from fvd.nbd_client.protocol import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_READ,
    MAX_CREDIT,
    MAX_REQUEST,
    MAX_STATUS,
    REQUEST_MAGIC,
)
from fvd.nbd_client.uri import NbdUri

if TYPE_CHECKING:
    import ssl


class Connection:
    def __init__(
        self,
        u: NbdUri,
        connect_timeout: float,
        timeout: float,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.wire, neg = handshake.connect(u, connect_timeout, tls_context)
        self.size, self.flags = neg.size, neg.flags
        self.structured, self.context = neg.structured, neg.context
        self.timeout = timeout
        self.cookie = 0

    def _request(self, cmd: int, offset: int, length: int, what: str) -> int:
        self.cookie += 1
        self.wire.start(what, self.timeout, MAX_CREDIT)
        self.wire.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self.cookie, offset, length))
        return self.cookie

    def readinto(self, offset: int, mv: memoryview) -> None:
        pos = 0
        while pos < len(mv):
            n = min(MAX_REQUEST, len(mv) - pos)
            cookie = self._request(
                CMD_READ, offset + pos, n, f"read of {n} bytes at {offset + pos}"
            )
            replies.read_reply(self.wire, cookie, self.structured, offset + pos, mv[pos : pos + n])
            pos += n

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """[(length, NBD_STATE_* flags)] from offset, covering at most `length` bytes and
        at least one; all data when the server has no base:allocation."""
        if self.context is None:
            return [(length, 0)]
        n = min(length, MAX_STATUS)
        cookie = self._request(CMD_BLOCK_STATUS, offset, n, f"block status at {offset}")
        return replies.status_reply(self.wire, cookie, self.context, n)

    def close(self) -> None:
        """NBD_CMD_DISC (best effort, within a second), then close."""
        try:
            self.cookie += 1
            self.wire.start("disconnect", 1.0)
            self.wire.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self.cookie, 0, 0))
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
        finally:
            self.wire.close()
