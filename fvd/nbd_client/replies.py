"""Transmission-phase replies, checked against exactly what the protocol allows for the
request (proto.md, "Structured reply chunk message" and the request types):

* read, structured: OFFSET_DATA (length >= 9) and OFFSET_HOLE (length exactly 12, size
  nonzero) chunks inside the request, never overlapping, covering all of it before the
  chunk flagged DONE; NONE only with DONE and length 0; any other chunk type is a
  violation; a simple reply to a read is a violation once structured replies are on.
* block status: exactly one BLOCK_STATUS chunk for our context, 4 + 8k bytes with k >= 1
  and k at most the request length; descriptor lengths nonzero, each starting inside the
  request (the final one may reach past it: clipped). Descriptors are read in pieces and
  merged as they arrive; past MAX_STATUS_RUNS merged runs the rest of the chunk is read
  and dropped, and the next request starts where the kept runs end.
* error chunks: the server's errno and message (message length checked, at most 4096
  bytes read); then the connection is dropped without reading further.

Every violation raises BaseImageError naming the URI and what was wrong; nothing read
from such a reply may be used (the caller drops the connection and reports no data)."""

from __future__ import annotations

import array
import errno
import os
import re
import struct
import sys
from typing import Iterator, NoReturn

from fvd.nbd_client.protocol import (
    MAX_STATUS_RUNS,
    MAX_STRING,
    REPLY_BLOCK_STATUS,
    REPLY_ERROR_BIT,
    REPLY_ERROR_OFFSET,
    REPLY_FLAG_DONE,
    REPLY_NONE,
    REPLY_OFFSET_DATA,
    REPLY_OFFSET_HOLE,
    SIMPLE_REPLY_MAGIC,
    STATE_MASK,
    STATUS_PIECE,
    STRUCTURED_REPLY_MAGIC,
)
from fvd.nbd_client.wire import Wire


class Chunk:
    """One reply message's header: a simple reply (`simple`, `error`) or a chunk."""

    def __init__(self, wire: Wire, cookie: int, structured: bool) -> None:
        (magic,) = struct.unpack(">I", wire.recv(4))
        if magic == SIMPLE_REPLY_MAGIC:
            self.simple = True
            self.error, got = struct.unpack(">IQ", wire.recv(12))
            self.flags, self.type, self.length = REPLY_FLAG_DONE, REPLY_NONE, 0
        elif magic == STRUCTURED_REPLY_MAGIC and structured:
            self.simple, self.error = False, 0
            self.flags, self.type, got, self.length = struct.unpack(">HHQI", wire.recv(16))
        else:
            wire.fail(f"bad reply magic 0x{magic:08x}")
        if got != cookie:
            wire.fail(f"reply for request {got}, expected {cookie}")

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)


def server_error(wire: Wire, code: int, message: str = "") -> NoReturn:
    name = errno.errorcode.get(code, f"error {code}")
    text = f"{name}: {os.strerror(code)}" if code in errno.errorcode else name
    wire.fail(f"the server answered {text}" + (f" ({message})" if message else ""))


def error_chunk(wire: Wire, c: Chunk) -> NoReturn:
    """Raise for an error chunk (known or not: bit 15 set means the reply failed)."""
    fixed = 14 if c.type == REPLY_ERROR_OFFSET else 6
    if c.length < fixed:
        wire.fail(f"error chunk of {c.length} bytes (at least {fixed} expected)")
    code, msglen = struct.unpack(">IH", wire.recv(6))
    if msglen > c.length - fixed or msglen > MAX_STRING:
        wire.fail(f"error message of {msglen} bytes in a {c.length}-byte error chunk")
    message = wire.recv(msglen).decode("utf-8", "replace")
    server_error(wire, code or errno.EIO, message[:200])


def none_chunk(wire: Wire, c: Chunk) -> None:
    if c.length or not c.done:
        wire.fail("NBD_REPLY_TYPE_NONE chunk with a payload or not the last chunk")


class Coverage:
    """Which bytes of a read request the content chunks so far described: in order (the
    usual case) a counter, otherwise a byte map allocated on first need."""

    def __init__(self, wire: Wire, offset: int, length: int) -> None:
        self.wire, self.offset, self.length = wire, offset, length
        self.next = 0
        self.covered = 0
        self.map: bytearray | None = None

    def add(self, off: int, n: int) -> int:
        """Claim [off, off + n); returns its start in the request. Violations raise."""
        s = off - self.offset
        if off < self.offset or s + n > self.length:
            end = self.offset + self.length
            self.wire.fail(f"chunk [{off}, {off + n}) outside the request [{self.offset}, {end})")
        if self.map is None and s == self.next:
            self.next += n
        else:
            if self.map is None:
                self.map = bytearray(self.length)
                self.map[: self.next] = b"\x01" * self.next
            if self.map.find(1, s, s + n) >= 0:
                self.wire.fail(f"chunk [{off}, {off + n}) overlaps an earlier chunk")
            self.map[s : s + n] = b"\x01" * n
        self.covered += n
        return s

    def check_complete(self) -> None:
        if self.covered != self.length:
            self.wire.fail(
                f"the reply ended with {self.covered} of the {self.length} bytes requested"
            )


def read_reply(wire: Wire, cookie: int, structured: bool, offset: int, out: memoryview) -> None:
    """The whole reply to a read of len(out) bytes at `offset`, into `out`."""
    if not structured:
        c = Chunk(wire, cookie, structured)
        if c.error:
            server_error(wire, c.error)
        wire.recv_into(out, payload=True)
        return
    cov = Coverage(wire, offset, len(out))
    simple = "a simple reply to a read after structured replies were negotiated"
    for c in _content_chunks(wire, cookie, simple):
        if c.type == REPLY_OFFSET_DATA:
            if c.length < 9:
                wire.fail(f"data chunk of {c.length} bytes (at least 9 expected)")
            (off,) = struct.unpack(">Q", wire.recv(8))
            s = cov.add(off, c.length - 8)
            wire.recv_into(out[s : s + c.length - 8], payload=True)
        elif c.type == REPLY_OFFSET_HOLE:
            if c.length != 12:
                wire.fail(f"hole chunk of {c.length} bytes (12 expected)")
            off, size = struct.unpack(">QI", wire.recv(12))
            if size == 0:
                wire.fail("hole chunk of size 0")
            s = cov.add(off, size)
            out[s : s + size] = bytes(size)
        else:
            wire.fail(f"chunk type {c.type} is not allowed in a reply to a read")
    cov.check_complete()


def _content_chunks(wire: Wire, cookie: int, simple: str) -> Iterator[Chunk]:
    """The chunks of one structured reply that carry content, each to be read by the
    caller before the next is asked for; NONE and error chunks are handled here, and a
    simple reply (after its error, if any) fails with the message `simple`. Ends after
    the chunk flagged DONE."""
    while True:
        c = Chunk(wire, cookie, True)
        if c.simple:
            if c.error:
                server_error(wire, c.error)
            wire.fail(simple)
        if c.type == REPLY_NONE:
            none_chunk(wire, c)
        elif c.type & REPLY_ERROR_BIT:
            error_chunk(wire, c)
        else:
            yield c
        if c.done:
            return


_LOW_BITS = bytes(i & STATE_MASK for i in range(256))
_U32 = next(t for t in "IL" if array.array(t).itemsize == 4)
_RUN = re.compile(rb"(.)\1*", re.S)


class StatusRuns:
    """Block status descriptors merged as they arrive into (length, flags) runs of the
    flags fvd uses, validated, clipped to the request, at most MAX_STATUS_RUNS of them.
    The work per piece is C-speed scans plus one step per run: the flags' low bytes
    (big-endian: every 8th byte) masked by bytes.translate, runs found by a regex."""

    def __init__(self, wire: Wire, length: int) -> None:
        self.wire, self.length = wire, length
        self.pos = 0  # bytes of the request the kept runs cover
        self.runs: list[tuple[int, int]] = []
        self.full = False

    def add(self, piece: bytes) -> None:
        if self.full:
            return
        words = array.array(_U32, piece)
        if sys.byteorder == "little":
            words.byteswap()
        lengths = words[0::2]
        if 0 in lengths:
            self.wire.fail("block status descriptor of length 0")
        if self.pos + sum(lengths[:-1]) >= self.length:
            self.wire.fail(f"block status descriptors past the {self.length} bytes requested")
        past = max(0, self.pos + sum(lengths) - self.length)  # only the last may reach past
        flags = piece[7::8].translate(_LOW_BITS)
        for m in _RUN.finditer(flags):
            n = sum(lengths[m.start() : m.end()]) - (past if m.end() == len(flags) else 0)
            self._append(n, flags[m.start()])
            if self.full:
                return

    def _append(self, n: int, f: int) -> None:
        if self.runs and self.runs[-1][1] == f:
            self.runs[-1] = (self.runs[-1][0] + n, f)
        elif len(self.runs) == MAX_STATUS_RUNS:
            self.full = True
            return
        else:
            self.runs.append((n, f))
        self.pos += n


def status_reply(wire: Wire, cookie: int, context: int, length: int) -> list[tuple[int, int]]:
    """[(length, flags)] from the request's offset, covering at most `length` bytes."""
    runs: StatusRuns | None = None
    simple = "a simple reply without status to a block status request"
    for c in _content_chunks(wire, cookie, simple):
        if c.type != REPLY_BLOCK_STATUS:
            wire.fail(f"chunk type {c.type} is not allowed in a reply to block status")
        if runs is not None:
            wire.fail("a second block status chunk for the same context")
        runs = _status_chunk(wire, c, context, length)
    if runs is None:
        wire.fail("the reply ended without a block status chunk")
    return runs.runs


def _status_chunk(wire: Wire, c: Chunk, context: int, length: int) -> StatusRuns:
    count, rest = divmod(c.length - 4, 8)
    if c.length < 12 or rest:
        wire.fail(f"block status chunk of {c.length} bytes (4 + 8 * N, N >= 1, expected)")
    if count > length:
        wire.fail(f"{count} block status descriptors for {length} bytes")
    (got,) = struct.unpack(">I", wire.recv(4))
    if got != context:
        wire.fail(f"block status for context {got}, expected {context}")
    runs = StatusRuns(wire, length)
    left = c.length - 4
    while left:
        n = min(left, STATUS_PIECE)
        if runs.full:  # enough work for one request: drop the rest unparsed
            wire.skip(left)
            break
        runs.add(wire.recv(n, payload=True))
        left -= n
    return runs
