"""The copy loop of `fvd convert`: planned ranges from a source disk into an output writer.

Kept apart from `fvd.convert` (which decides what to copy and where: arguments, policy,
outputs) so the loop can be measured and changed on its own.

Data ranges are copied in pieces of up to BUFFER bytes on a few threads, each piece with
its own reused buffer: adjacent ranges are merged first, and short ranges are packed
together into one piece, so a fragmented source costs one task per BUFFER bytes, not
one per extent. Reads, zero detection (numpy, per `grain`) and fvd/raw writes release
the GIL; writes to a qcow2 output stay on the calling thread (fvd.qcow2 is not
thread-safe). All-zero grains inside the data are skipped, or zeroed when the output is
an overlay (its backing file may hold data there).
"""

from __future__ import annotations

import collections
import os
import queue
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Protocol

import numpy as np

from fvd.types import ConvertResult, DiskReader
from fvd.units import MiB

BUFFER = MiB  # per piece: 1 read, few writes; stays in the CPU cache
COPY_THREADS = min(2, os.cpu_count() or 1)  # best measured on 2 cores


class Range(NamedTuple):
    start: int
    length: int
    zero: bool
    depth: int = 0  # the chain layer holding the data (qemu-img map's depth) ...
    host: Optional[int] = None  # ... and where in that layer's file, when known


Run = tuple[int, int, bool]  # (lo, hi, nonzero) inside a buffer
# (guest offset, offset in the piece's buffer, length, depth, host offset or -1)
Segment = tuple[int, int, int, int, int]
Progress = Optional[Callable[[int, int], None]]
# per chain depth: read(host offset, buffer) from that layer's file, or None
LayerReader = Optional[Callable[[int, memoryview], object]]


class Writer(Protocol):
    """An output the loop writes to (fvd.Image, fvd.qcow2.Qcow2Image, a raw file)."""

    def write(self, offset: int, data: Any) -> Any: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...


@dataclass
class CopyCounts:
    """What the loop did (fvd.ConvertResult without the time); fvd.chain counts so too."""

    bytes_read: int = 0
    bytes_written: int = 0
    extents: int = 0
    zero_ranges: int = 0

    def result(self, started: float) -> ConvertResult:
        """The ConvertResult of an operation that began at time.monotonic() `started`."""
        return ConvertResult(
            self.bytes_read,
            self.bytes_written,
            self.extents,
            self.zero_ranges,
            time.monotonic() - started,
        )


def merge_adjacent(ranges: Iterable[Range], keep_hosts: bool = False) -> list[Range]:
    """Sorted ranges with touching neighbours of the same kind merged (a chain's map
    splits data where the layer changes). With keep_hosts, data ranges merge only when
    they continue in the same layer's file, so they can still be read from it."""
    out: list[Range] = []
    for r in ranges:
        if not r.length:
            continue
        if not keep_hosts:
            r = Range(r.start, r.length, r.zero)
        last = out[-1] if out else None
        if (
            last is not None
            and last.zero == r.zero
            and last.start + last.length == r.start
            and last.depth == r.depth
            and (last.host is None) == (r.host is None)
            and (last.host is None or last.host + last.length == r.host)
        ):
            out[-1] = Range(last.start, last.length + r.length, r.zero, last.depth, last.host)
        else:
            out.append(r)
    return out


def pieces(ranges: Iterable[Range], size: int = BUFFER) -> Iterator[list[Segment]]:
    """The data ranges cut into pieces of at most `size` buffer bytes; short ranges
    share a piece."""
    cur: list[Segment] = []
    used = 0
    for r in ranges:
        if r.zero:
            continue
        pos, end = r.start, r.start + r.length
        while pos < end:
            n = min(end - pos, size - used)
            host = -1 if r.host is None else r.host + (pos - r.start)
            cur.append((pos, used, n, r.depth, host))
            used += n
            pos += n
            if used == size:
                yield cur
                cur, used = [], 0
    if cur:
        yield cur


def copy_ranges(
    view: DiskReader,
    out: Writer,
    ranges: list[Range],
    *,
    overlay: bool,
    progress: Progress,
    grain: int,
    threads: int = COPY_THREADS,
    layers: Sequence[LayerReader] = (),
) -> CopyCounts:
    """Copy `ranges` (sorted, not overlapping) of `view` into `out`; see the module doc.
    Zero ranges are skipped, or written as zeros when `overlay`. `layers`: readers of
    the chain's files by depth; a data range with a host offset in a layer that has one
    is read from that file directly, without the per-cluster lookups of `view`."""
    merged = merge_adjacent(ranges)
    counts = CopyCounts(
        bytes_read=sum(r.length for r in merged if not r.zero),
        extents=sum(1 for r in merged if not r.zero),
        zero_ranges=sum(1 for r in merged if r.zero),
    )
    ranges = merge_adjacent(ranges, keep_hosts=True) if layers else merged
    total = sum(r.length for r in ranges if not r.zero or overlay)
    tracker = _Tracker(progress, total)
    if overlay:
        for r in ranges:
            if r.zero:
                out.write_zeroes(r.start, r.length)
                tracker.advance(r.length)
    loop = _Loop(view, out, overlay, grain, threads, layers)
    counts.bytes_written = loop.run(pieces(ranges), tracker)
    return counts


class _Tracker:
    def __init__(self, progress: Progress, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        if progress is not None:
            progress(0, total)

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


# (buffer, segments with their runs when this thread must write them, bytes written, length)
PieceResult = tuple[bytearray, Optional[list[tuple[Segment, list[Run]]]], int, int]


class _Loop:
    """Reads (and, for thread-safe outputs, writes) pieces on a pool of threads."""

    def __init__(
        self,
        view: DiskReader,
        out: Writer,
        overlay: bool,
        grain: int,
        threads: int,
        layers: Sequence[LayerReader] = (),
    ) -> None:
        self.view, self.out, self.overlay, self.grain = view, out, overlay, grain
        self.threads, self.layers = threads, list(layers)
        self.workers_write = getattr(out, "thread_safe_writes", True)
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(2 * threads):
            self.free.put(bytearray(BUFFER))

    def run(self, work: Iterator[list[Segment]], tracker: _Tracker) -> int:
        """Copy every piece; returns the data bytes written."""
        written = 0
        pending: collections.deque[Future[PieceResult]] = collections.deque()

        def finish_one() -> None:
            nonlocal written
            buf, found, n, length = pending.popleft().result()
            if found is not None:  # the output is not thread-safe: written here
                n = self.write_piece(memoryview(buf), found)
            written += n
            self.free.put(buf)
            tracker.advance(length)

        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="fvd-convert") as pool:
            try:
                for segs in work:
                    while len(pending) >= 2 * self.threads:
                        finish_one()
                    pending.append(pool.submit(self.piece, segs))
                while pending:
                    finish_one()
            finally:
                for fut in pending:
                    fut.cancel()
        return written

    def piece(self, segs: list[Segment]) -> PieceResult:
        buf = self.free.get()
        mv = memoryview(buf)
        found = []
        for seg in segs:
            pos, lo, n, depth, host = seg
            part = mv[lo : lo + n]
            reader = self.layers[depth] if host >= 0 and depth < len(self.layers) else None
            if reader is not None:
                reader(host, part)
            else:
                self.view.readinto(pos, part)
            found.append((seg, nonzero_runs(part, self.grain)))
        length = sum(seg[2] for seg in segs)
        if self.workers_write:
            return buf, None, self.write_piece(mv, found), length
        return buf, found, 0, length

    def write_piece(self, mv: memoryview, found: list[tuple[Segment, list[Run]]]) -> int:
        written = 0
        for (pos, lo, n, _, _), runs in found:
            written += write_runs(self.out, pos, mv[lo : lo + n], runs, self.overlay)
        return written


def nonzero_runs(mv: memoryview, grain: int) -> list[Run]:
    """[(lo, hi, nonzero)] covering mv: runs of grains with and without a non-zero byte."""
    n = len(mv)
    whole = n // grain
    if whole:
        words = np.frombuffer(mv[: whole * grain], dtype=np.uint64)
        nz = words.reshape(whole, grain // 8).any(axis=1)
    else:
        nz = np.zeros(0, dtype=bool)
    if whole * grain < n:
        tail = mv[whole * grain :]
        nz = np.append(nz, tail != bytes(len(tail)))
    if nz.all():
        return [(0, n, True)]
    edges = np.flatnonzero(np.diff(np.concatenate(([False], nz, [False])).astype(np.int8)))
    runs: list[Run] = []
    prev = 0
    for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        lo, hi = a * grain, min(n, b * grain)
        if lo > prev:
            runs.append((prev, lo, False))
        runs.append((lo, hi, True))
        prev = hi
    if prev < n:
        runs.append((prev, n, False))
    return runs


def write_runs(out: Writer, offset: int, mv: memoryview, runs: list[Run], overlay: bool) -> int:
    """Write the non-zero runs; zero runs are skipped, or zeroed when the output is an
    overlay (its backing may hold data there). Returns the data bytes written."""
    written = 0
    for lo, hi, nonzero in runs:
        if nonzero:
            out.write(offset + lo, mv[lo:hi])
            written += hi - lo
        elif overlay:
            out.write_zeroes(offset + lo, hi - lo)
    return written
