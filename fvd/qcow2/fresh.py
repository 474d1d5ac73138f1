"""Writing a new qcow2 file in one pass, as `qemu-img convert` lays out its output.

`FreshWriter` is for a file nobody else sees until it is complete (`fvd convert` writes
a temporary file and renames it into place). The layout is qemu-img create's (header,
refcount table, refcount block, L1 table in clusters 0, 1, 2, 3..), but only the header
is written at first; data clusters are handed out one after the other past the L1
table, the mapping is kept in memory, and the L2 tables, L1 table, refcount blocks (and,
when one table cluster cannot point at them all, a bigger refcount table) are written
once at `close()`, after the data. No per-cluster metadata writes, no refcount search,
no flush until the end (and none at all with cache="unsafe"); writes may come from
several threads.

Every cluster of the finished file is in use exactly once (header, refcount table and
blocks, L1, L2 tables, data), so every refcount is 1 and every L1/L2 entry carries the
COPIED flag; `qemu-img check` finds it clean.

Limits (what convert needs, checked): over a backing file, writes and zeroing cover
whole clusters (the last one may end in the last sector); zeroing a range that holds
data writes zeros over it.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

import numpy as np

from fvd.errors import CorruptImageError
from fvd.fileio import BackingPolicy, full_pwrite, open_for_rewrite
from fvd.qcow2.format import (
    L1_DTYPE,
    L2_DTYPE,
    NEW_L1_CLUSTER,
    NEW_REFBLOCK_CLUSTER,
    OFF_REFTABLE,
    OFFSET_MASK,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFBLOCK_DTYPE,
    REFTABLE_DTYPE,
    S_REFTABLE_UPDATE,
    build_header,
    new_header,
)
from fvd.qcow2.image import check_create_sizes, new_backing
from fvd.types import Closing, StrPath


class FreshWriter(Closing):
    """A new qcow2 image being written by `fvd convert` (see the module doc)."""

    thread_safe_writes = True

    def __init__(
        self,
        path: StrPath,
        size: int,
        *,
        cluster_size: int = 65536,
        lazy_refcounts: bool = False,
        backing_file: Optional[StrPath] = None,
        backing_format: Optional[str] = None,
        cache: str = "writeback",
        overwrite: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.size, self.unsafe = size, cache == "unsafe"
        self.overwrite = overwrite  # an existing (empty) file is taken over, not refused
        self.overlay = backing_file is not None
        self._closed = True
        self.fd = self._write_header(cluster_size, lazy_refcounts, backing_file, backing_format)
        self._lock = threading.Lock()
        self._l2: dict[int, np.ndarray] = {}  # L1 index -> its L2 table (native uint64)
        self._closed = False

    def _write_header(
        self,
        cs: int,
        lazy_refcounts: bool,
        backing_file: Optional[StrPath],
        backing_format: Optional[str],
    ) -> int:
        """Create the file with its header: qemu-img create's layout (header, refcount
        table, refcount block, L1 table), the rest written at close. Returns the fd."""
        check_create_sizes(self.size, cs)
        # the backing file is the one the caller named (convert's -B): any policy
        name, fmt = new_backing(self.path, backing_file, backing_format, BackingPolicy())
        self.cs, self.cbits = cs, cs.bit_length() - 1
        self.l2_entries = cs // 8
        h = new_header(
            self.cbits,
            self.size,
            l1_size=-(-self.size // (cs * self.l2_entries)),
            backing_file=name,
            backing_format=fmt,
            lazy_refcounts=lazy_refcounts,
        )
        self.l1_size, self.l1_offset = h.l1_size, h.l1_table_offset
        self.rt_offset, self.rt_clusters = h.refcount_table_offset, h.refcount_table_clusters
        self.rb0 = NEW_REFBLOCK_CLUSTER * cs
        self.next = NEW_L1_CLUSTER + -(-8 * self.l1_size // cs)  # the next free cluster
        fd = open_for_rewrite(self.path, self.overwrite)
        try:
            full_pwrite(fd, build_header(h), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ------------------------------------------------------------------ writing
    def write(self, offset: int, data: Any) -> int:
        mv = memoryview(data).cast("B")
        n = len(mv)
        self._check(offset, n)
        if not n:
            return 0
        runs = self._map_for_write(offset, n)
        done = 0
        for host, length in runs:
            full_pwrite(self.fd, mv[done : done + length], host)
            done += length
        return n

    def _map_for_write(self, offset: int, n: int) -> list[tuple[int, int]]:
        """[(host offset, length)] of physically contiguous runs for [offset, offset+n),
        new clusters handed out in order."""
        cs, runs = self.cs, list[tuple[int, int]]()
        pos, end = offset, offset + n
        with self._lock:
            while pos < end:
                c = pos >> self.cbits
                stop = min(end, (c + 1) << self.cbits)
                table, j = self._table(c)
                e = int(table[j])
                if not e & OFFSET_MASK:
                    e = (self.next << self.cbits) | OFLAG_COPIED
                    self.next += 1
                    table[j] = e
                host = (e & OFFSET_MASK) + (pos & (cs - 1))
                if runs and runs[-1][0] + runs[-1][1] == host:
                    runs[-1] = (runs[-1][0], runs[-1][1] + stop - pos)
                else:
                    runs.append((host, stop - pos))
                pos = stop
        return runs

    def write_zeroes(self, offset: int, length: int) -> None:
        """The range reads as zeros: over a backing file whole clusters get the zero
        flag; data already written there is overwritten with zeros."""
        self._check(offset, length)
        pos, end = offset, offset + length
        while pos < end:
            c = pos >> self.cbits
            stop = min(end, (c + 1) << self.cbits)
            with self._lock:
                table, j = self._table(c)
                e = int(table[j])
                if not e & OFFSET_MASK and self.overlay:
                    table[j] = OFLAG_ZERO
            if e & OFFSET_MASK:
                host = (e & OFFSET_MASK) + (pos & (self.cs - 1))
                full_pwrite(self.fd, bytes(stop - pos), host)
            pos = stop

    def _check(self, offset: int, n: int) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: I/O on a closed image")
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ValueError(f"{self.path}: range [{offset}, {offset + n}) outside the image")
        # a short write must reach the end (its last sector: convert's source may end
        # inside the 512 bytes the qcow2 size was rounded up to)
        if self.overlay and (offset % self.cs or (n % self.cs and offset + n <= self.size - 512)):
            raise ValueError(
                f"{self.path}: a new overlay is written in whole clusters ({self.cs} bytes)"
            )

    def _table(self, c: int) -> tuple[np.ndarray, int]:
        i, j = c >> (self.cbits - 3), c & (self.l2_entries - 1)
        table = self._l2.get(i)
        if table is None:
            table = self._l2[i] = np.zeros(self.l2_entries, dtype=np.uint64)
        return table, j

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Write the L2 tables, L1 table and refcounts after the data; flush unless
        cache="unsafe". Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._write_metadata()
            if not self.unsafe:
                os.fdatasync(self.fd)
        finally:
            os.close(self.fd)

    def _write_metadata(self) -> None:
        cs = self.cs
        used = sorted(self._l2)
        l2_first = self.next
        rb_first, rt_first, total = self._refcount_layout(l2_first + len(used))
        l1 = np.zeros(self.l1_size, dtype=L1_DTYPE)
        for k, i in enumerate(used):
            if i >= self.l1_size:
                raise CorruptImageError(self.path, None, "write past the L1 table")
            host = (l2_first + k) << self.cbits
            full_pwrite(self.fd, self._l2[i].astype(L2_DTYPE).tobytes(), host)
            l1[i] = host | OFLAG_COPIED
        full_pwrite(self.fd, l1.tobytes(), self.l1_offset)
        self._write_refcounts(rb_first, rt_first, total)
        os.ftruncate(self.fd, total * cs)

    def _refcount_layout(self, end: int) -> tuple[int, int, int]:
        """(first new refcount block, first cluster of a new refcount table or 0, total
        clusters) for a file whose clusters below `end` are in use, the refcount
        clusters themselves included."""
        per_block = self.cs // 2  # 16-bit refcounts
        rt_capacity = self.rt_clusters * self.cs // 8
        total = end
        while True:
            blocks = -(-total // per_block)
            new_rt = 0 if blocks <= rt_capacity else -(-blocks * 8 // self.cs)
            want = end + (blocks - 1) + new_rt  # block 0 (cluster 2) is already counted
            if want == total:
                return end, (end + blocks - 1) if new_rt else 0, total
            total = want

    def _write_refcounts(self, rb_first: int, rt_first: int, total: int) -> None:
        cs, per_block = self.cs, self.cs // 2
        blocks = -(-total // per_block)
        counts = np.ones(blocks * per_block, dtype=REFBLOCK_DTYPE)
        counts[total:] = 0
        rt_clusters = -(-blocks * 8 // cs) if rt_first else self.rt_clusters
        reftable = np.zeros(rt_clusters * cs // 8, dtype=REFTABLE_DTYPE)
        reftable[0] = self.rb0
        for b in range(1, blocks):
            reftable[b] = (rb_first + b - 1) << self.cbits
        if rt_first:
            counts[self.rt_offset >> self.cbits] = 0  # the first table (cluster 1) is let go
        for b in range(blocks):
            block = counts[b * per_block : (b + 1) * per_block]
            full_pwrite(self.fd, block.tobytes(), int(reftable[b]))
        if rt_first:
            full_pwrite(self.fd, reftable.tobytes(), rt_first << self.cbits)
            update = S_REFTABLE_UPDATE.pack(rt_first << self.cbits, rt_clusters)
            full_pwrite(self.fd, update, OFF_REFTABLE)
        else:
            full_pwrite(self.fd, reftable.tobytes(), self.rt_offset)
