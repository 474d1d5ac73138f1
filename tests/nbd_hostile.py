"""A scripted hostile NBD server and the wire fuzzer built on it (issue 19).

This is a test tool, not a server: real serving is nbdkit's (the project rule), but a
misbehaving peer can only be scripted. `HostileServer` speaks fixed newstyle on a unix
socket (a thread per connection) with an in-memory export and, unless a fault is set,
answers as an honest but awkward server would: reads split into chunks of random size,
sometimes out of order, zero ranges as hole chunks, DONE on the last chunk or on a
separate NONE, block status split into many descriptors with unknown flag bits, fewer
descriptors than asked or a final one reaching past the request. A `Fault` makes the
n-th occurrence of one site ("hello", "option", "go", "read", "status") misbehave in one
scripted way (see FAULTS).

`run_session(seed)` generates a session (export, server habits, one fault or none, the
client operations: NbdClient reads, extents and concurrent reads through the pool,
fvd images over the export with copy-on-read, prefetch, map) and checks the rules:
every outcome is the export's correct data or BaseImageError; an honest session
succeeds; no operation waits past its deadline; afterwards, with the server honest
again, each image reads back the export exactly and checks clean (nothing wrong was
stored). `run_sessions` runs sessions in child processes under RLIMIT_AS with a
watchdog, as tests/fuzzlib.py does for images:

    [FVD_WIRE_JOBS=3] python -m tests.nbd_hostile SESSIONS [SEED]
"""

import functools
import json
import os
import random
import re
import resource
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

NBD_MAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
SIMPLE, STRUCTURED = 0x67446698, 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_GO, OPT_SR, OPT_META = 1, 2, 7, 8, 10
ACK, INFO, META = 1, 3, 4
ERR = 1 << 31
NONE, DATA, HOLE, STATUS = 0, 1, 2, 5
ERROR, ERROR_OFFSET = (1 << 15) | 1, (1 << 15) | 2
DONE = 1
CONTEXT_ID = 7
# The client's deadlines in the fuzz (connect-timeout and timeout): short where the fault
# makes the server go quiet, long otherwise (an honest server on a loaded machine must
# not be taken for a stalling one)
TIMEOUT, RELAXED = 0.25, 10.0
SLOW_FAULTS = ("stall", "trickle", "no_done")
MEMORY_LIMIT = 1 << 30  # a worker needs about 600 MiB of address space
SESSION_TIMEOUT = 30.0

FAULTS = {
    "hello": ["bad_magic", "oldstyle", "not_fixed", "close", "stall", "trickle"],
    "option": [
        "reply_magic",
        "reply_opt",
        "huge_len",
        "endless_info",
        "info_len",
        "size_huge",
        "size_2_63",
        "err_huge_msg",
        "tls_reqd",
        "unknown_reply",
        "refuse",
        "meta_short",
        "no_size",
        "stall",
        "trickle",
        "close",
    ],
    "read": [
        "none_only",
        "half",
        "hole_len",
        "hole_zero",
        "data_short",
        "outside",
        "overlap",
        "unknown_type",
        "unknown_error",
        "error",
        "error_offset",
        "error_huge",
        "error_msglen",
        "cookie",
        "simple",
        "none_not_done",
        "none_len",
        "status_chunk",
        "no_done",
        "stall",
        "trickle",
        "close_mid",
        "bad_magic",
        "huge_data",
        "extra_after_done",
    ],
    "status": [
        "len_odd",
        "len_short",
        "huge",
        "context",
        "zero_desc",
        "past_end",
        "two_chunks",
        "data_chunk",
        "no_chunk",
        "too_many",
        "error",
        "cookie",
        "simple_ok",
        "simple_err",
        "stall",
        "trickle",
        "no_done",
    ],
}


FAULTS["go"] = FAULTS["option"]
CHUNK_FAULTS = FAULTS["read"][: FAULTS["read"].index("cookie")]


class Fault:
    """`kind` at the `nth` occurrence of `site` (and every later one with `every`)."""

    def __init__(self, site, kind, nth=0, every=False):
        self.site, self.kind, self.nth, self.every = site, kind, nth, every

    def __repr__(self):
        return f"Fault({self.site}, {self.kind}, {self.nth}{', every' if self.every else ''})"


class Closed(Exception):
    """The client went away or the server is stopping."""


class HostileServer:
    """Serves `export` (bytes) on unix socket `path`; `fault` fires once, at the n-th
    occurrence of its site (counted over all connections), unless `honest()` was called."""

    def __init__(
        self,
        path,
        export,
        seed=0,
        fault=None,
        structured=True,
        meta=True,
        go=True,
        pace=None,
        descriptors=None,
    ):
        self.path, self.export, self.fault = path, export, fault
        self.structured, self.meta, self.go = structured, meta, go
        self.pace = pace  # seconds between 16 KiB pieces of every reply: a slow link
        self.descriptors = descriptors  # None, "ones" or "alternating": 1-byte descriptors
        self.rng = random.Random(seed)
        self.zero_runs = [m.span() for m in re.finditer(rb"\x00{512,}", export)]
        self.lock = threading.Lock()
        self.counts = {}
        self.fired = False
        self.enabled = True
        self.stopping = threading.Event()
        self.conns = []
        self.threads = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    @property
    def uri(self):
        return f"nbd+unix:///exp?socket={self.path}"

    def honest(self):
        self.enabled = False

    def stop(self):
        self.stopping.set()
        try:
            socket.socket(socket.AF_UNIX).connect(self.path)  # wake accept()
        except OSError:
            pass
        self.listener.close()
        for c in list(self.conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        for t in [self.acceptor, *self.threads]:
            t.join(10)
        if os.path.exists(self.path):
            os.unlink(self.path)

    # ----- plumbing ----------------------------------------------------------------------
    def _accept(self):
        while not self.stopping.is_set():
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            if self.stopping.is_set():
                c.close()
                return
            self.conns.append(c)
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, c):
        state = {"trickle": False}
        try:
            self._handshake(c, state)
            self._transmission(c, state)
        except (Closed, OSError):
            pass
        finally:
            try:
                c.close()
            except OSError:
                pass

    def _fires(self, site):
        """The fault's kind when this occurrence of `site` is the faulty one."""
        with self.lock:
            n = self.counts.get(site, 0)
            self.counts[site] = n + 1
            f = self.fault
            if self.enabled and f and f.site == site and (f.nth == n or f.every and n > f.nth):
                self.fired = True
                return f.kind
        return None

    def _send(self, c, data, state):
        if self.pace is not None:
            for i in range(0, len(data), 16384):
                if self.stopping.wait(self.pace):
                    raise Closed()
                c.sendall(data[i : i + 16384])
            return
        if not state["trickle"]:
            c.sendall(data)
            return
        for i in range(len(data)):  # one byte every 50 ms until the client gives up
            if self.stopping.wait(0.05):
                raise Closed()
            c.sendall(data[i : i + 1])

    def _recv(self, c, n):
        buf = b""
        while len(buf) < n:
            got = c.recv(n - len(buf))
            if not got:
                raise Closed()
            buf += got
        return buf

    def _stall(self):
        self.stopping.wait()
        raise Closed()

    # ----- handshake ---------------------------------------------------------------------
    def _handshake(self, c, st):
        kind = self._fires("hello")
        magic, opt_magic, hflags = NBD_MAGIC, IHAVEOPT, 3
        if kind == "bad_magic":
            magic ^= 1
        elif kind == "oldstyle":
            opt_magic = 0x00420281861253
        elif kind == "not_fixed":
            hflags = 0
        elif kind == "close":
            raise Closed()
        elif kind == "stall":
            self._stall()
        elif kind == "trickle":
            st["trickle"] = True
        self._send(c, struct.pack(">QQH", magic, opt_magic, hflags), st)
        (cflags,) = struct.unpack(">I", self._recv(c, 4))
        st["no_zeroes"] = bool(cflags & 2)
        st["structured"] = False
        while True:
            magic, opt, length = struct.unpack(">QII", self._recv(c, 16))
            data = self._recv(c, length) if length else b""
            if opt == OPT_EXPORT_NAME:
                tail = b"" if st["no_zeroes"] else bytes(124)
                self._send(c, struct.pack(">QH", len(self.export), 1) + tail, st)
                return
            if self._option(c, st, opt, data):
                return

    def _reply(self, c, st, opt, rtype, payload=b"", length=None):
        n = len(payload) if length is None else length
        self._send(c, struct.pack(">QIII", REPLY_MAGIC, opt, rtype, n) + payload, st)

    def _option(self, c, st, opt, data):
        """Answer one option; True when the transmission phase starts."""
        kind = self._fires("option")
        if opt == OPT_GO:  # "go": NBD_OPT_GO's replies only
            kind = self._fires("go") or kind
        if kind and self._option_fault(c, st, opt, kind):
            return False
        if opt == OPT_SR:
            self._reply(c, st, opt, ACK if self.structured else ERR | 1)
            st["structured"] = self.structured
        elif opt == OPT_META:
            if st["structured"] and self.meta:
                self._reply(c, st, opt, META, struct.pack(">I", CONTEXT_ID) + b"base:allocation")
            self._reply(c, st, opt, ACK)
        elif opt == OPT_GO:
            if not self.go:
                self._reply(c, st, opt, ERR | 1)
                return False
            self._reply(c, st, opt, INFO, struct.pack(">HQH", 0, len(self.export), 1))
            self._reply(c, st, opt, ACK)
            return True
        elif opt == OPT_ABORT:
            self._reply(c, st, opt, ACK)
            raise Closed()
        else:
            self._reply(c, st, opt, ERR | 1)
        return False

    def _option_fault(self, c, st, opt, kind):
        """Misbehave in reply to `opt`; True when the fault replaced the reply."""
        if kind == "reply_magic":
            self._send(c, struct.pack(">QIII", REPLY_MAGIC ^ 4, opt, ACK, 0), st)
        elif kind == "reply_opt":
            self._reply(c, st, opt + 1, ACK)
        elif kind == "huge_len":
            self._reply(c, st, opt, INFO, b"\0" * 100, length=0xFFFFFFF0)
        elif kind == "endless_info":
            while not self.stopping.is_set():
                self._reply(c, st, opt, INFO, struct.pack(">HH", 3, 512))
        elif kind == "info_len":
            self._reply(c, st, opt, INFO, struct.pack(">HQ", 0, len(self.export)))
        elif kind == "size_huge":
            self._reply(c, st, opt, INFO, struct.pack(">HQH", 0, (1 << 64) - 1, 1))
            self._reply(c, st, opt, ACK)
        elif kind == "size_2_63":
            self._reply(c, st, opt, INFO, struct.pack(">HQH", 0, 1 << 63, 1))
            self._reply(c, st, opt, ACK)
        elif kind == "err_huge_msg":
            self._reply(c, st, opt, ERR | 2, b"x" * 50, length=0xFFFFFFF0)
        elif kind == "tls_reqd":
            self._reply(c, st, opt, ERR | 5, b"TLS required")
        elif kind == "unknown_reply":
            self._reply(c, st, opt, 77, b"??")
        elif kind == "refuse":
            self._reply(c, st, opt, ERR | 2, b"no")
            return True
        elif kind == "meta_short":
            self._reply(c, st, opt, META, b"\0\0")
        elif kind == "no_size":
            self._reply(c, st, opt, ACK)
            return True
        elif kind == "stall":
            self._stall()
        elif kind == "trickle":
            st["trickle"] = True
            return False
        elif kind == "close":
            raise Closed()
        self._stall_after_fault()
        return True

    def _stall_after_fault(self):
        """After a violation the client hangs up; wait for that (or the stop)."""
        self.stopping.wait(5)
        raise Closed()

    # ----- transmission ------------------------------------------------------------------
    def _transmission(self, c, st):
        while True:
            _magic, _flags, cmd, cookie, off, length = struct.unpack(">IHHQQI", self._recv(c, 28))
            if cmd == 2:
                raise Closed()
            if cmd == 0:
                self._read(c, st, cookie, off, length)
            elif cmd == 7:
                self._status(c, st, cookie, off, length)
            else:
                self._send(c, struct.pack(">IIQ", SIMPLE, 22, cookie), st)

    def _chunk(self, c, st, flags, rtype, cookie, payload, length=None):
        n = len(payload) if length is None else length
        self._send(c, struct.pack(">IHHQI", STRUCTURED, flags, rtype, cookie, n) + payload, st)

    def _read_pieces(self, off, n):
        """Honest content chunks [(flags-less type, offset, payload)] for [off, off+n)."""
        rng = self.rng
        cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.choice([0, 0, 1, 3, 20]))))
        bounds = [0, *cuts, n]
        pieces = []
        for a, b in zip(bounds, bounds[1:]):
            data = self.export[off + a : off + b]
            if not any(data) and rng.random() < 0.7:
                pieces.append((HOLE, off + a, struct.pack(">QI", off + a, b - a)))
            else:
                pieces.append((DATA, off + a, struct.pack(">Q", off + a) + data))
        if rng.random() < 0.3:
            rng.shuffle(pieces)
        return pieces

    def _read(self, c, st, cookie, off, n):
        kind = self._fires("read")
        if not st["structured"]:
            self._simple_read(c, st, cookie, off, n, kind)
            return
        if kind and self._read_fault(c, st, cookie, off, n, kind):
            return
        pieces = self._read_pieces(off, n)
        separate_none = self.rng.random() < 0.5
        for i, (rtype, _, payload) in enumerate(pieces):
            last = i == len(pieces) - 1 and not separate_none
            self._chunk(c, st, DONE if last else 0, rtype, cookie, payload)
        if separate_none:
            self._chunk(c, st, DONE, NONE, cookie, b"")

    def _simple_read(self, c, st, cookie, off, n, kind):
        """Structured replies not negotiated: a simple reply, or a fault."""
        data = self.export[off : off + n]
        head = struct.pack(">IIQ", SIMPLE, 0, cookie)
        if kind == "cookie":
            head = struct.pack(">IIQ", SIMPLE, 0, cookie + 1)
        elif kind in ("close_mid", "half", "none_only"):
            self._send(c, head + data[: n // 2], st)
            raise Closed()
        elif kind in ("error", "unknown_error", "error_offset"):
            self._send(c, struct.pack(">IIQ", SIMPLE, 5, cookie), st)  # legal: an error
            return
        elif kind == "stall":
            self._stall()
        elif kind == "trickle":
            st["trickle"] = True
        elif kind == "bad_magic":
            head = struct.pack(">IIQ", SIMPLE ^ 1, 0, cookie)
        elif kind:  # a structured chunk that was not negotiated
            self._chunk(c, st, DONE, DATA, cookie, struct.pack(">Q", off) + data)
            self._stall_after_fault()
        self._send(c, head + data, st)

    def _read_fault(self, c, st, cookie, off, n, kind):
        """Send a faulty reply; True when it replaced the honest one."""
        if kind in CHUNK_FAULTS:
            self._chunk_fault(c, st, cookie, off, n, kind)
        else:
            return self._framing_fault(c, st, cookie, off, n, kind)
        self._stall_after_fault()
        return True

    def _chunk_fault(self, c, st, cookie, off, n, kind):
        """Malformed content and error chunks."""
        data = self.export[off : off + n]
        half = max(1, n // 2)
        ch = lambda flags, t, p, length=None: self._chunk(c, st, flags, t, cookie, p, length)  # noqa: E731
        if kind == "none_only":
            ch(DONE, NONE, b"")
        elif kind == "half" and n > 1:
            ch(DONE, DATA, struct.pack(">Q", off) + data[:half])
        elif kind == "half":
            ch(DONE, NONE, b"")
        elif kind == "hole_len":
            ch(DONE, HOLE, struct.pack(">QIQ", off, n, 0))
        elif kind == "hole_zero":
            ch(0, HOLE, struct.pack(">QI", off, 0))
            ch(DONE, DATA, struct.pack(">Q", off) + data)
        elif kind == "data_short":
            ch(DONE, DATA, struct.pack(">Q", off)[:5])
        elif kind == "outside":
            ch(DONE, DATA, struct.pack(">Q", off + 1) + data)
        elif kind == "overlap":
            ch(0, DATA, struct.pack(">Q", off) + data)
            ch(DONE, DATA, struct.pack(">Q", off + n - 1) + data[-1:])
        elif kind == "unknown_type":
            ch(0, 3, b"abcd")
            ch(DONE, DATA, struct.pack(">Q", off) + data)
        elif kind == "unknown_error":
            ch(DONE, (1 << 15) | 77, struct.pack(">IH", 5, 3) + b"bad" + b"x" * 20)
        elif kind == "error":
            ch(DONE, ERROR, struct.pack(">IH", 5, 4) + b"oops")
        elif kind == "error_offset":
            ch(0, DATA, struct.pack(">Q", off) + data)
            ch(DONE, ERROR_OFFSET, struct.pack(">IH", 5, 0) + struct.pack(">Q", off))
        elif kind == "error_huge":
            ch(DONE, ERROR, struct.pack(">IH", 5, 10) + b"0123456789", length=0xFFFFFFF0)
        elif kind == "error_msglen":
            ch(DONE, ERROR, struct.pack(">IH", 5, 60000) + b"short")

    def _framing_fault(self, c, st, cookie, off, n, kind):
        """Wrong cookies, magics, reply kinds, stalls, trickles, hang-ups."""
        data = self.export[off : off + n]
        ch = lambda flags, t, p, length=None: self._chunk(c, st, flags, t, cookie, p, length)  # noqa: E731
        if kind == "cookie":
            self._chunk(c, st, DONE, DATA, cookie + 1, struct.pack(">Q", off) + data)
        elif kind == "simple":
            self._send(c, struct.pack(">IIQ", SIMPLE, 0, cookie) + data, st)
        elif kind == "none_not_done":
            ch(0, NONE, b"")
            ch(DONE, DATA, struct.pack(">Q", off) + data)
        elif kind == "none_len":
            ch(DONE, NONE, b"abcd")
        elif kind == "status_chunk":
            ch(0, STATUS, struct.pack(">III", CONTEXT_ID, n, 0))
            ch(DONE, DATA, struct.pack(">Q", off) + data)
        elif kind == "no_done":
            ch(0, DATA, struct.pack(">Q", off) + data)
            self._stall()
        elif kind == "stall":
            self._stall()
        elif kind == "trickle":
            st["trickle"] = True
            return False
        elif kind == "close_mid":
            payload = struct.pack(">Q", off) + data
            self._send(c, struct.pack(">IHHQI", STRUCTURED, DONE, DATA, cookie, len(payload)), st)
            self._send(c, payload[: len(payload) // 2], st)
            raise Closed()
        elif kind == "bad_magic":
            self._send(c, struct.pack(">IHHQI", STRUCTURED ^ 8, DONE, NONE, cookie, 0), st)
        elif kind == "huge_data":
            ch(DONE, DATA, struct.pack(">Q", off) + data, length=0xFFFFFFF0)
        elif kind == "extra_after_done":
            ch(DONE, DATA, struct.pack(">Q", off) + data)
            ch(DONE, DATA, struct.pack(">Q", off) + data)  # a stray reply: next request fails
            return True
        self._stall_after_fault()
        return True

    # ----- block status ------------------------------------------------------------------
    def _descriptors(self, off, n):
        """Honest [length, flags] descriptors from off: zero runs of 512 bytes or more are
        holes (reporting zeros as data is honest too), split at random, unknown flag bits
        set at random, sometimes fewer than asked or the final one reaching past."""
        rng = self.rng
        end = off + n
        cuts = {off, end}
        for a, b in self.zero_runs:
            if a < end and b > off:
                cuts.update((max(a, off), min(b, end)))
        bounds = sorted(cuts)
        out = []
        for a, b in zip(bounds, bounds[1:]):
            zero = any(za <= a and b <= zb for za, zb in self.zero_runs)
            pieces = [
                a,
                *sorted(rng.sample(range(a + 1, b), min(b - a - 1, rng.choice([0, 0, 2])))),
                b,
            ]
            for p, q in zip(pieces, pieces[1:]):
                flags = 3 if zero else 0
                if rng.random() < 0.2:
                    flags |= 1 << rng.randrange(2, 31)  # unknown bits: ignored
                out.append([q - p, flags])
        if rng.random() < 0.3 and len(out) > 1:
            del out[rng.randrange(1, len(out)) :]  # fewer than asked: legal
        elif rng.random() < 0.2 and end < len(self.export):
            out[-1][0] += rng.randrange(1, len(self.export) - end + 1)  # final one past
        return out

    def _status(self, c, st, cookie, off, n):
        kind = self._fires("status")
        if kind and self._status_fault(c, st, cookie, off, n, kind):
            return
        if self.descriptors:  # as many 1-byte descriptors as the request allows
            pattern = (1, 0, 1, 0) if self.descriptors == "ones" else (1, 0, 1, 3)
            payload = struct.pack(">I", CONTEXT_ID) + struct.pack(">IIII", *pattern) * (n // 2)
            payload += struct.pack(">II", 1, 0) * (n % 2)
        else:
            desc = self._descriptors(off, n)
            payload = struct.pack(">I", CONTEXT_ID)
            payload += b"".join(struct.pack(">II", *d) for d in desc)
        if self.rng.random() < 0.5:
            self._chunk(c, st, DONE, STATUS, cookie, payload)
        else:
            self._chunk(c, st, 0, STATUS, cookie, payload)
            self._chunk(c, st, DONE, NONE, cookie, b"")

    def _status_fault(self, c, st, cookie, off, n, kind):
        ch = lambda flags, t, p, length=None: self._chunk(c, st, flags, t, cookie, p, length)  # noqa: E731
        good = struct.pack(">III", CONTEXT_ID, n, 0)
        if kind == "len_odd":
            ch(DONE, STATUS, good + b"abc")
        elif kind == "len_short":
            ch(DONE, STATUS, struct.pack(">I", CONTEXT_ID))
        elif kind == "huge":
            ch(DONE, STATUS, good, length=0xFFFFFFF0 - 4)
        elif kind == "context":
            ch(DONE, STATUS, struct.pack(">III", CONTEXT_ID + 1, n, 0))
        elif kind == "zero_desc":
            ch(DONE, STATUS, struct.pack(">IIIII", CONTEXT_ID, 0, 0, n, 0))
        elif kind == "past_end":
            ch(DONE, STATUS, struct.pack(">IIIII", CONTEXT_ID, n, 0, 4096, 0))
        elif kind == "two_chunks":
            ch(0, STATUS, good)
            ch(DONE, STATUS, good)
        elif kind == "data_chunk":
            ch(0, DATA, struct.pack(">Q", off) + b"x")
            ch(DONE, STATUS, good)
        elif kind == "no_chunk":
            ch(DONE, NONE, b"")
        elif kind == "too_many":
            ch(DONE, STATUS, struct.pack(">I", CONTEXT_ID) + b"\0" * 8 * (n + 1))
        elif kind == "error":
            ch(DONE, ERROR, struct.pack(">IH", 95, 0))
        elif kind == "cookie":
            self._chunk(c, st, DONE, STATUS, cookie ^ 0xFF, good)
        elif kind == "simple_ok":
            self._send(c, struct.pack(">IIQ", SIMPLE, 0, cookie), st)
        elif kind == "simple_err":
            self._send(c, struct.pack(">IIQ", SIMPLE, 22, cookie), st)
            return True
        elif kind == "stall":
            self._stall()
        elif kind == "trickle":
            st["trickle"] = True
            return False
        elif kind == "no_done":
            ch(0, STATUS, good)
            self._stall()
        self._stall_after_fault()
        return True


# ----- sessions ------------------------------------------------------------------------------
class Violation(Exception):
    """An outcome the rules forbid."""


def make_export(rng):
    size = rng.choice([512, 4096, 65536, 200 * 1024, 1 << 20, (1 << 20) + 4096 * 3, 2 << 20])
    data = bytearray(rng.randbytes(size))
    for _ in range(rng.randint(0, 4)):  # zero ranges, aligned or not
        a = rng.randrange(size)
        b = min(size, a + rng.choice([1, 100, 4096, 65536, 1 << 20]))
        if rng.random() < 0.6:
            a, b = a // 4096 * 4096, min(size, -(-b // 4096) * 4096)
        data[a:b] = bytes(b - a)
    return bytes(data)


def _timed(limit, what, fn):
    """fn() -> result or None for BaseImageError; Violation for anything else or a wait
    past `limit` seconds."""
    import fvd

    t = time.monotonic()
    try:
        result = fn()
        err = None
    except fvd.BaseImageError as e:
        result, err = None, e
    took = time.monotonic() - t
    if took > limit:
        raise Violation(f"{what}: took {took:.1f} s, beyond the deadline bound {limit:.1f} s")
    return result, err


def _check_extents(export, off, n, extents):
    pos = off
    prev = None
    for start, length, zero, data in extents:
        if start != pos or length <= 0:
            raise Violation(f"extents do not tile the range: {start} at {pos}")
        if zero and any(export[start : start + length]):
            raise Violation(f"extent [{start}, +{length}) claims zeros over data")
        if prev == (zero, data):
            raise Violation("adjacent equal extents not merged")
        prev = (zero, data)
        pos += length
    if pos != off + n:
        raise Violation(f"extents end at {pos}, not {off + n}")


def _client_ops(rng, server, export, uri, limit):
    """NbdClient: reads, extents, concurrent reads through a pool of 2."""
    from fvd.nbd_client import NbdClient

    size = len(export)
    client, err = _timed(limit, "connect", lambda: NbdClient(uri, max_connections=2))
    errors = [err] if err else []
    if client is None:
        return errors
    try:
        if client.size != size:
            raise Violation(f"size {client.size}, export has {size}")
        for _ in range(rng.randint(1, 4)):
            off = rng.randrange(size)
            n = rng.randint(1, min(size - off, rng.choice([1, 512, 4096, 70000, 2 << 20])))
            buf = bytearray(b"\xee" * n)
            got, err = _timed(limit, "read", functools.partial(client.readinto, off, buf))
            if err is None and bytes(buf) != export[off : off + n]:
                raise Violation(f"read of {n} at {off} returned wrong data")
            errors += [err] if err else []
            if rng.random() < 0.4:
                got, err = _timed(
                    limit, "extents", functools.partial(_list_extents, client, off, n)
                )
                if err is None:
                    _check_extents(export, off, n, got)
                errors += [err] if err else []
        errors += _concurrent(rng, client, export, limit)
    finally:
        client.close()
    return errors


def _list_extents(client, off, n):
    return list(client.extents(off, n))


def _concurrent(rng, client, export, limit):
    size = len(export)
    results = []

    def reader(seed):
        r = random.Random(seed)
        for _ in range(3):
            off = r.randrange(size)
            n = r.randint(1, min(size - off, 20000))
            buf = bytearray(n)
            _, err = _timed(limit, "pool read", functools.partial(client.readinto, off, buf))
            results.append((err, bytes(buf) == export[off : off + n]))

    threads = [threading.Thread(target=reader, args=(rng.random(),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(err is None and not ok for err, ok in results):
        raise Violation("a pooled read returned wrong data")
    return [err for err, _ in results if err]


def _image_ops(rng, server, export, uri, workdir, limit, ops):
    """An fvd image over the export: copy-on-read reads, prefetch, map; then, with the
    server honest, everything stored must be the export's data."""
    import fvd

    size = len(export)
    path = os.path.join(workdir, "top.fvd")
    if os.path.exists(path):
        os.unlink(path)
    _, err = _timed(
        limit,
        "create",
        lambda: fvd.create(path, size, base=uri, base_format="raw", block_size=4096),
    )
    errors = [err] if err else []
    if err:
        return errors
    op = rng.choice(["cor", "prefetch", "map", "cor"])
    ops.append(op)

    def use():
        with fvd.open(path, "r+", copy_on_read=(op == "cor")) as img:
            if op == "cor":
                for _ in range(3):
                    off = rng.randrange(size)
                    n = rng.randint(1, min(size - off, 300000))
                    if img.read(off, n) != export[off : off + n]:
                        raise Violation("copy-on-read returned wrong data")
            elif op == "prefetch":
                img.prefetch()
            else:
                got = [(e.start, e.length, e.zero, e.data) for e in img.extents()]
                _check_extents(export, 0, size, got)

    _, err = _timed(limit * 4, f"image {op}", use)
    errors += [err] if err else []
    server.honest()
    _verify_image(path, export, op)
    return errors


def _verify_image(path, export, op, attempts=10):
    """With the server honest, the image reads back the export and checks clean. The
    image's URI may carry the fuzz's 0.25 s deadlines, which an honest server on a loaded
    machine can miss (seen once in 10,000 sessions with 3 attempts): a missed deadline
    here is retried (deadlines are what the sessions test, not this check)."""
    import fvd

    for attempt in range(attempts):
        try:
            with fvd.open(path) as img:
                if img.read(0, len(export)) != export:
                    raise Violation(f"after {op} the image holds wrong data")
                if not img.check().ok:
                    raise Violation(f"after {op} the image does not check clean")
            return
        except fvd.BaseImageError as e:
            if "deadline" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.2)


def run_session(seed, workdir):
    """One generated session; returns a description. Violation on a broken rule."""
    rng = random.Random(seed)
    export = make_export(rng)
    site = rng.choice(["hello", "option", "go", "read", "read", "status", "status", None])
    fault = Fault(site, rng.choice(FAULTS[site]), rng.choice([0, 0, 1, 2, 4])) if site else None
    if fault and fault.kind in SLOW_FAULTS:
        fault.nth = min(fault.nth, 1)  # short deadlines: let the fault fire
    on_image = rng.random() < 0.5
    if fault and on_image and site in ("hello", "go", "option"):
        fault.nth += 3 if site == "option" else 1  # mostly past create's connection
    habits = dict(structured=rng.random() < 0.85, meta=rng.random() < 0.85, go=rng.random() < 0.9)
    path = os.path.join(workdir, "s.sock")
    if os.path.exists(path):
        os.unlink(path)
    server = HostileServer(path, export, rng.random(), fault, **habits)
    timeout = TIMEOUT if fault and fault.kind in SLOW_FAULTS else RELAXED
    uri = f"{server.uri}&connect-timeout={timeout}&timeout={timeout}"
    # one deadline trip at most (one fault), plus the payload allowance and slack
    limit = 2 * timeout + len(export) / (64 * 1024) + 5.0
    try:
        if not on_image:
            ops = ["client"]
            errors = _client_ops(rng, server, export, uri, limit)
        else:
            ops = ["image"]
            errors = _image_ops(rng, server, export, uri, workdir, limit, ops)
    finally:
        server.stop()
    # an unfired slow fault leaves 0.25 s deadlines on an honest server: missing them
    # under load is not a refusal
    missed = timeout == TIMEOUT and all("deadline" in str(e) for e in errors)
    if errors and not server.fired and not missed:
        raise Violation(f"an honest server was refused: {errors[0]}")
    return (
        f"ops={'/'.join(ops)} {fault} {habits} size={len(export)} fired={server.fired} "
        f"errors={len(errors)}"
    )


# ----- child process and runner ----------------------------------------------------------------
def worker(seed, start, count):
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    work = tempfile.mkdtemp(prefix="fvdwire", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        for i in range(start, start + count):
            print(f"START {i}", flush=True)
            try:
                what = run_session(f"{seed}-{i}", work)
                print(f"OK {i} {what}", flush=True)
            except BaseException as e:  # noqa: B036 - every escape is a finding
                tb = traceback.format_exc(limit=-8)
                fail = {"session": i, "error": repr(e)[:500], "traceback": tb}
                print("FAIL " + json.dumps(fail), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_sessions(count, seed=0, timeout=SESSION_TIMEOUT, env=None, jobs=1):
    """Run `count` sessions in `jobs` child processes at a time (contiguous ranges; the
    sessions mostly wait on short deadlines); returns the failures (dicts)."""
    failures = []
    bounds = [count * j // jobs for j in range(jobs + 1)]
    threads = [
        threading.Thread(target=_run_range, args=(a, b, seed, timeout, env, failures))
        for a, b in zip(bounds, bounds[1:])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(failures, key=lambda f: f["session"])


def _run_range(nxt, end, seed, timeout, env, failures):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while nxt < end:
        cmd = ["worker", str(seed), str(nxt), str(end - nxt)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.nbd_hostile", *cmd],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        current, last = nxt, time.monotonic()
        died = True
        while True:
            r, _, _ = select.select([proc.stdout], [], [], 0.5)
            if r:
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith("START "):
                    current, last = int(line.split()[1]), time.monotonic()
                elif line.startswith("OK "):
                    nxt = int(line.split()[1]) + 1
                elif line.startswith("FAIL "):
                    failures.append(json.loads(line[5:]))
                    nxt = failures[-1]["session"] + 1
            elif time.monotonic() - last > timeout:
                proc.kill()
                failures.append({"session": current, "error": f"hang: no result in {timeout} s"})
                nxt, died = current + 1, False
                break
        proc.wait()
        err = proc.stderr.read()
        if died and nxt <= current < end:
            error = f"child died ({proc.returncode})"
            failures.append({"session": current, "error": error, "stderr": err[-2000:]})
            nxt = current + 1


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:  # python -m tests.nbd_hostile SESSIONS [SEED]
        n = int(sys.argv[1])
        t0 = time.monotonic()
        jobs = int(os.environ.get("FVD_WIRE_JOBS", "1"))
        fails = run_sessions(n, sys.argv[2] if len(sys.argv) > 2 else 0, jobs=jobs)
        for f in fails:
            print(json.dumps(f))
        print(f"wire fuzz: {n} sessions, {len(fails)} failures, {time.monotonic() - t0:.0f} s")
        sys.exit(1 if fails else 0)
