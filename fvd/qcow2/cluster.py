"""Guest-to-host cluster mapping: L1/L2 lookup, reads, allocating writes, zero writes,
extents (cf. QEMU block/qcow2-cluster.c).

L2 tables are cached whole ('>u8' numpy arrays keyed by host offset) and written back
whole, one pwrite per dirty table. The cache is unbounded (QEMU's default L2 cache also
covers the whole disk for images up to 256 GiB at 64 KiB clusters).

Reads inside one cluster use a read table per active L1 index (`_fast_l2`): a native
uint64 array.array holding the host cluster offset where the L2 entry is a plain,
valid data cluster and 0 where the general path must decide (unallocated, zero flag,
compressed, reserved bits, out of range). Every change to an active mapping updates or
drops it: `_write_span`, `_zero_clusters`, `_l2_for_write`, `_resize_l1`.
"""

from __future__ import annotations

from array import array
from dataclasses import replace
from typing import Iterator, Optional

import numpy as np

from fvd.errors import CorruptImageError, UnsupportedFeatureError
from fvd.qcow2.format import (
    L1E_RESERVED_MASK,
    L2_DTYPE,
    L2E_STD_RESERVED_MASK,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
)
from fvd.qcow2.state import Chunk, Qcow2State, Table
from fvd.types import Extent

_NONE, _DATA, _BACKING, _ZEROS = range(4)  # runs of _read_tree


class ClusterMixin(Qcow2State):
    """Mixed into Qcow2Image."""

    # ------------------------------------------------------------ L1 / L2
    def _l2_peek(self, off: int) -> Table:
        """The L2 table at host offset `off` (cached; one metadata read on a miss)."""
        arr = self._l2.get(off)
        if arr is None:
            if off % self._cs or off + self._cs > self._file_size:
                raise CorruptImageError(
                    self.path, off, "L2 table offset invalid or past the end of the file"
                )
            arr = np.frombuffer(self._meta_read(off, self._cs), dtype=L2_DTYPE).copy()
            self._l2[off] = arr
        return arr

    def _l2_offset(self, l1: Table, i: int, l1_off: int) -> int:
        e = int(l1[i])
        if e & L1E_RESERVED_MASK:
            raise CorruptImageError(self.path, l1_off + 8 * i, "L1 entry has reserved bits set")
        off = e & OFFSET_MASK
        if off and (off % self._cs or off + self._cs > self._file_size):
            raise CorruptImageError(
                self.path, l1_off + 8 * i, f"L1 entry points to {off:#x}: unaligned or past the end"
            )
        return off

    def _decode(self, e: int, l2_off: int, j: int) -> tuple[int, int]:
        """(host cluster offset or 0, zero flag) of an L2 entry, validated."""
        if e & OFLAG_COMPRESSED:
            raise UnsupportedFeatureError(f"{self.path}: compressed clusters are not supported")
        if e & L2E_STD_RESERVED_MASK:
            raise CorruptImageError(self.path, l2_off + 8 * j, "L2 entry has reserved bits set")
        off, zero = e & OFFSET_MASK, e & OFLAG_ZERO
        if zero and self._version == 2:
            raise CorruptImageError(self.path, l2_off + 8 * j, "zero cluster in a v2 image")
        if off and (off % self._cs or off >= self._file_size):
            raise CorruptImageError(
                self.path, l2_off + 8 * j, f"data cluster {off:#x} unaligned or past the end"
            )
        return off, zero

    def _lookup(self, l1: Table, l1_off: int, g: int) -> tuple[int, int, int]:
        """(host cluster offset or 0, zero flag, l2 table offset) for guest offset g."""
        cidx = g >> self._cbits
        i, j = cidx >> self._l2bits, cidx & self._l2mask
        if i >= len(l1):
            return 0, 0, 0
        l2_off = self._l2_offset(l1, i, l1_off)
        if not l2_off:
            return 0, 0, 0
        off, zero = self._decode(int(self._l2_peek(l2_off)[j]), l2_off, j)
        return off, zero, l2_off

    # ------------------------------------------------------------------ read
    def _build_fast_l2(self, i: int) -> Optional[array[int]]:
        """The read table of active L1 index i (see module doc), or None when the L1
        entry maps no table. Raises what the general lookup would for this table."""
        if i >= len(self._l1):
            return None
        l2_off = self._l2_offset(self._l1, i, self._l1_offset)
        if not l2_off:
            return None
        l2u = self._l2_peek(l2_off).astype(np.uint64)
        offs = l2u & np.uint64(OFFSET_MASK)
        plain = (l2u & np.uint64(~(OFFSET_MASK | OFLAG_COPIED) & (2**64 - 1))) == 0
        ok = plain & (offs % np.uint64(self._cs) == 0) & (offs < np.uint64(self._file_size))
        table = array("Q", np.where(ok, offs, np.uint64(0)).astype(np.uint64).tobytes())
        self._fast_l2[i] = table
        return table

    def _read_tree(self, l1: Table, l1_off: int, offset: int, mv: memoryview) -> None:
        """Fill mv with guest bytes from `offset` through the tree under `l1`: one pread
        per run of physically contiguous clusters, one backing-file read per run of
        unallocated clusters, one fill per run of zero clusters."""
        cs, n, pos = self._cs, len(mv), 0
        kind, run_pos, run_host = _NONE, 0, 0  # the open run: kind, start in mv, host
        while pos < n:
            g = offset + pos
            chunk = min(cs - (g & (cs - 1)), n - pos)
            off, zero, _ = self._lookup(l1, l1_off, g)
            if off and not zero:
                host = off + (g & (cs - 1))
                if kind == _DATA and run_host + (pos - run_pos) == host:
                    pos += chunk
                    continue
                new, new_host = _DATA, host
            elif not off and not zero and self._backing is not None:
                new, new_host = _BACKING, 0
            else:
                new, new_host = _ZEROS, 0
            if new != kind or new == _DATA:
                self._finish_run(kind, offset, mv, run_pos, pos, run_host)
                kind, run_pos, run_host = new, pos, new_host
            pos += chunk
        self._finish_run(kind, offset, mv, run_pos, n, run_host)

    def _finish_run(
        self, kind: int, offset: int, mv: memoryview, lo: int, hi: int, host: int
    ) -> None:
        if hi <= lo:
            return
        if kind == _DATA:
            self._data_readinto(host, mv[lo:hi])
        elif kind == _BACKING:
            self._backing_read(offset + lo, mv[lo:hi])
        elif kind == _ZEROS:
            mv[lo:hi] = bytes(hi - lo)

    def _backing_read(self, g: int, mv: memoryview) -> None:
        """Guest bytes of an unallocated range from the backing file (zeros past its
        end, as QEMU reads them)."""
        b = self._backing
        assert b is not None  # callers read the backing file only when there is one
        n = max(0, min(len(mv), b.size - g))
        if n:
            b.readinto(g, mv[:n])
        if n < len(mv):
            mv[n:] = bytes(len(mv) - n)

    def _reads_zero(self, g: int) -> bool:
        off, zero, _ = self._lookup(self._l1, self._l1_offset, g)
        return bool(zero) or not off and self._backing is None

    # ----------------------------------------------------------------- write
    def _l2_for_write(self, i: int) -> tuple[int, Table]:
        """(offset, table) of the active L2 table i, allocated or copied so that it is
        ours alone (refcount 1). QEMU's l2_allocate: refblock write + flush, L2 write +
        flush, L1 entry write (8 bytes) + flush, then the old shared table is unreferenced."""
        e = int(self._l1[i])
        old = self._l2_offset(self._l1, i, self._l1_offset)
        if old and e & OFLAG_COPIED:
            return old, self._l2_peek(old)
        self._fast_l2.pop(i, None)
        new = self._alloc_cluster()
        self._flush_refcount_cache()
        table = self._l2_peek(old).copy() if old else np.zeros(self._cs // 8, dtype=L2_DTYPE)
        self._l2[new] = table
        self._l2_dirty.add(new)
        self._flush_l2_cache()
        self._l1[i] = new | OFLAG_COPIED
        self._meta_write(self._l1_offset + 8 * i, self._l1[i : i + 1].tobytes())
        self._sync()
        if old:
            self._update_refcounts([old >> self._cbits], -1)
        return new, table

    def _write_span(self, g: int, mv: memoryview) -> None:
        """Write mv at guest offset g; the range lies inside one L2 table.

        Allocating and COW clusters get fresh host clusters; data goes out first (one
        pwritev per physically contiguous run, COW head/tail merged in), then the L2
        entries change in the cache and the replaced clusters are freed once the L2
        change is stable."""
        cs, i = self._cs, g >> (self._cbits + self._l2bits)
        l2_off, l2 = self._l2_for_write(i)
        segments: list[tuple[int, list[Chunk]]] = []  # (host, buffers): contiguous runs
        updates: list[tuple[int, int, int]] = []  # (L2 index, new entry, old host offset)
        seg_end, pos = -1, 0  # host end of the last run
        bufs: list[Chunk]
        fresh = self._preallocate(g, len(mv), l2)
        while pos < len(mv):
            gg = g + pos
            within = gg & (cs - 1)
            chunk = min(cs - within, len(mv) - pos)
            j = (gg >> self._cbits) & self._l2mask
            e = int(l2[j])
            off, zero = self._decode(e, l2_off, j)
            piece = mv[pos : pos + chunk]
            tail = cs - within - chunk
            if off and e & OFLAG_COPIED and not zero:  # ours: overwrite in place
                host, bufs = off + within, [piece]
            elif off and e & OFLAG_COPIED:  # preallocated zero cluster
                host, bufs = off, [self._zeros[:within], piece, self._zeros[:tail]]
                updates.append((j, off | OFLAG_COPIED, 0))
                self._cow_pending = True
            else:
                new, host, bufs = self._new_cluster(fresh, gg, piece, off, zero)
                updates.append((j, new | OFLAG_COPIED, off))
            if segments and seg_end == host:
                segments[-1][1].extend(bufs)
            else:
                segments.append((host, bufs))
            seg_end = host + sum(len(b) for b in bufs)
            pos += chunk
        for host, bufs in segments:
            self._data_writev(host, [b for b in bufs if len(b)])
        self._apply_l2_updates(i, l2, l2_off, updates)

    def _new_cluster(
        self, fresh: list[tuple[int, int]], gg: int, piece: memoryview, off: int, zero: int
    ) -> tuple[int, int, list[Chunk]]:
        """(new cluster, host offset, buffers) for `piece` at guest offset gg written
        into a cluster that is not ours (unallocated, zero or shared): the rest of the
        cluster comes from the shared cluster or the backing file (copy on write), or
        is zeros where a reused cluster may hold old bytes."""
        cs = self._cs
        within = gg & (cs - 1)
        chunk, tail = len(piece), cs - within - len(piece)
        if fresh:
            eof, new = fresh.pop()
        else:
            eof = self._file_size
            new = self._alloc_cluster()
        if chunk == cs:
            return new, new, [piece]
        if off and not zero:  # shared: copy on write
            old = bytearray(cs)
            self._data_readinto(off, memoryview(old))
            self._cow_pending = True
            return new, new, [old[:within], piece, old[within + chunk :]]
        if not off and not zero and self._backing is not None:
            old = bytearray(cs)  # copy on write from backing
            self._backing_read(gg - within, memoryview(old))
            self._cow_pending = True
            return new, new, [old[:within], piece, old[within + chunk :]]
        if new >= eof:  # fresh cluster, reads as zeros
            return new, new + within, [piece]
        return new, new, [self._zeros[:within], piece, self._zeros[:tail]]  # reused: zero rest

    def _apply_l2_updates(
        self, i: int, l2: Table, l2_off: int, updates: list[tuple[int, int, int]]
    ) -> None:
        """The new L2 entries into the cached table (and its fast view); the replaced
        clusters are freed once the L2 change is stable."""
        fast = self._fast_l2.get(i)
        for j, entry, old_host in updates:
            l2[j] = entry
            if fast is not None:
                host = entry & OFFSET_MASK
                fast[j] = host if host < self._file_size else 0
            if old_host:
                self._defer_free(old_host)
        if updates:
            self._l2_dirty.add(l2_off)

    def _preallocate(self, g: int, length: int, l2: Table) -> list[tuple[int, int]]:
        """Clusters for a multi-cluster write allocated at once, as QEMU's
        qcow2_alloc_clusters does for one request: [(eof before, offset)], popped in
        order; [] when at most one cluster is needed."""
        cs = self._cs
        first = (g >> self._cbits) & self._l2mask
        last = ((g + length - 1) >> self._cbits) & self._l2mask
        entries = l2[first : last + 1].astype(np.uint64)
        mine = (entries & np.uint64(OFLAG_COPIED)) != 0
        need = int((~mine).sum())
        if need < 2:
            return []
        eof = self._file_size
        start = self._alloc_contiguous(need)
        return [(eof, start + k * cs) for k in range(need - 1, -1, -1)]

    def _zero_clusters(self, start: int, end: int) -> None:
        """Whole clusters [start, end) inside one L2 table read as zeros afterwards: the
        v3 zero flag (0 in v2: there is no backing file), old clusters freed."""
        i = start >> (self._cbits + self._l2bits)
        first = (start >> self._cbits) & self._l2mask
        count = (end - start) >> self._cbits
        if self._backing is not None:  # unallocated reads the backing: flag all
            return self._zero_flag_clusters(i, first, count)
        if not self._l2_offset(self._l1, i, self._l1_offset):
            return  # no L2 table: already reads as zeros
        old = self._l2_peek(self._l2_offset(self._l1, i, self._l1_offset))
        if not (old[first : first + count].astype(np.uint64) & np.uint64(OFFSET_MASK)).any():
            return  # nothing allocated there
        l2_off, l2 = self._l2_for_write(i)
        self._fast_l2.pop(i, None)
        for j in range(first, first + count):
            off, _ = self._decode(int(l2[j]), l2_off, j)
            if off:
                l2[j] = OFLAG_ZERO if self._version == 3 else 0
                self._defer_free(off)
        self._l2_dirty.add(l2_off)

    def _zero_flag_clusters(self, i: int, first: int, count: int) -> None:
        """Over a backing file: every cluster gets the zero flag (v3 only)."""
        if self._version != 3:
            raise UnsupportedFeatureError(
                f"{self.path}: zeroing over a backing file needs qcow2 v3"
            )
        l2_off, l2 = self._l2_for_write(i)
        self._fast_l2.pop(i, None)
        for j in range(first, first + count):
            off, zero = self._decode(int(l2[j]), l2_off, j)
            if off:
                self._defer_free(off)
            elif zero:
                continue
            l2[j] = OFLAG_ZERO
        self._l2_dirty.add(l2_off)

    # ------------------------------------------------------------- write-back
    def _flush_l2_cache(self) -> None:
        """Write dirty L2 tables with QEMU's dependencies: refcount blocks first (unless
        lazy), COW data flushed first; then the deferred frees become refcount changes."""
        if self._l2_dirty:
            if not self._lazy:
                self._flush_refcount_cache()
            if self._cow_pending and self._unsynced:
                self._sync()
            for off in sorted(self._l2_dirty):
                self._meta_write(off, self._l2[off].tobytes())
            self._l2_dirty.clear()
            self._sync()
        elif self._deferred and self._unsynced:
            self._sync()
        self._apply_deferred()

    # ----------------------------------------------------------------- map
    def _classify(
        self, g: int, l1: Optional[Table] = None, l1_off: Optional[int] = None
    ) -> tuple[bool, bool, bool, Optional[int]]:
        if l1 is None or l1_off is None:
            l1, l1_off = self._l1, self._l1_offset
        off, zero, _ = self._lookup(l1, l1_off, g)
        if zero:
            return False, True, True, (off or None)
        if off:
            return True, False, True, off
        return False, True, False, None

    def _extents(
        self, offset: int, length: int, l1: Optional[Table] = None, l1_off: Optional[int] = None
    ) -> Iterator[Extent]:
        if self._backing is None:
            yield from self._own_extents(offset, length, l1, l1_off)
            return
        # Unallocated runs show the backing file's extents (depth + 1). The backing file is
        # asked once for the whole range and swept alongside: one call per layer, not one
        # per unallocated run (a deep chain of scattered overlays has thousands of them).
        backing = _Sweep(self._backing_extents(offset, length))
        cur = None
        for e in self._own_extents(offset, length, l1, l1_off):
            parts = [e] if e.present else backing.take(e.start, e.length)
            for p in parts:
                if (
                    cur is not None
                    and (cur.data, cur.zero, cur.depth, cur.present)
                    == (p.data, p.zero, p.depth, p.present)
                    and (cur.offset is None) == (p.offset is None)
                    and (cur.offset is None or cur.offset + cur.length == p.offset)
                ):
                    cur = replace(cur, length=cur.length + p.length)
                    continue
                if cur is not None:
                    yield cur
                cur = p
        if cur is not None:
            yield cur

    def _backing_extents(self, start: int, length: int) -> Iterator[Extent]:
        b = self._backing
        assert b is not None  # called for unallocated runs of an overlay only
        inside = max(0, min(length, b.size - start))
        if inside:
            for x in b.extents(start, inside):
                yield Extent(x.start, x.length, x.depth + 1, x.present, x.zero, x.data, x.offset)
        if inside < length:
            yield Extent(start + inside, length - inside, 1, False, True, False, None)

    def _own_extents(
        self, offset: int, length: int, l1: Optional[Table], l1_off: Optional[int]
    ) -> Iterator[Extent]:
        if l1 is None or l1_off is None:
            l1, l1_off = self._l1, self._l1_offset
        cur = None
        for seg in self._segments(offset, offset + length, l1, l1_off):
            if (
                cur is not None
                and (cur.data, cur.zero, cur.present) == (seg.data, seg.zero, seg.present)
                and (
                    (cur.offset is None and seg.offset is None)
                    or (
                        cur.offset is not None
                        and seg.offset is not None
                        and cur.offset + cur.length == seg.offset
                    )
                )
            ):
                cur = replace(cur, length=cur.length + seg.length)
            else:
                if cur is not None:
                    yield cur
                cur = seg
        if cur is not None:
            yield cur

    def _segments(self, start: int, end: int, l1: Table, l1_off: int) -> Iterator[Extent]:
        """Extents of [start, end), one L2 table at a time: its entries are classified
        with numpy; a table holding anything unusual (compressed, reserved bits, bad
        offsets) goes through the per-cluster lookup, which raises what it should."""
        cover = self._cs << self._l2bits
        pos = start
        while pos < end:
            stop = min(end, (pos // cover + 1) * cover)
            fast = self._table_segments(pos, stop, l1, l1_off)
            yield from (fast if fast is not None else self._cluster_segments(pos, stop, l1, l1_off))
            pos = stop

    def _table_segments(
        self, pos: int, stop: int, l1: Table, l1_off: int
    ) -> Optional[list[Extent]]:
        cs, cbits = self._cs, self._cbits
        i = pos >> (cbits + self._l2bits)
        if i >= len(l1) or not self._l2_offset(l1, i, l1_off):
            return [Extent(pos, stop - pos, 0, False, True, False, None)]
        first = (pos >> cbits) & self._l2mask
        last = ((stop - 1) >> cbits) & self._l2mask
        e = self._l2_peek(self._l2_offset(l1, i, l1_off))[first : last + 1].astype(np.uint64)
        if (e & np.uint64(OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK)).any():
            return None
        off = e & np.uint64(OFFSET_MASK)
        zero = (e & np.uint64(OFLAG_ZERO)) != 0
        if (zero.any() and self._version == 2) or (
            (off != 0) & ((off % np.uint64(cs) != 0) | (off >= np.uint64(self._file_size)))
        ).any():
            return None
        alloc = off != 0
        data = alloc & ~zero
        present = alloc | zero
        host = off.astype(np.int64)
        # A run breaks where the class changes or the host clusters stop following.
        n = len(e)
        brk = np.ones(n, dtype=bool)
        if n > 1:
            same = (
                (data[1:] == data[:-1])
                & (zero[1:] == zero[:-1])
                & (present[1:] == present[:-1])
                & (alloc[1:] == alloc[:-1])
                & (~alloc[1:] | (host[1:] == host[:-1] + cs))
            )
            brk[1:] = ~same
        heads = np.flatnonzero(brk).tolist() + [n]
        base = (pos >> cbits) << cbits
        out = []
        for a, b in zip(heads[:-1], heads[1:]):
            s = max(pos, base + a * cs)
            t = min(stop, base + b * cs)
            h = int(host[a]) + (s - (base + a * cs)) if alloc[a] else None
            out.append(
                Extent(
                    s, t - s, 0, bool(present[a]), bool(zero[a]) or not alloc[a], bool(data[a]), h
                )
            )
        return out

    def _cluster_segments(self, pos: int, end: int, l1: Table, l1_off: int) -> Iterator[Extent]:
        cs = self._cs
        while pos < end:
            within = pos & (cs - 1)
            chunk = min(cs - within, end - pos)
            data, zero, present, host = self._classify(pos, l1, l1_off)
            if host is not None:
                host += within
            yield Extent(pos, chunk, 0, present, zero, data, host)
            pos += chunk


class _Sweep:
    """Sorted extents covering a range, consumed left to right in clipped pieces."""

    def __init__(self, extents: Iterator[Extent]) -> None:
        self._it = extents
        self._cur: Optional[Extent] = None

    def take(self, start: int, length: int) -> list[Extent]:
        """The extents covering [start, start + length), clipped to it."""
        end, out = start + length, []
        while True:
            x = self._cur if self._cur is not None else next(self._it, None)
            assert x is not None, "backing extents cover the whole range"
            self._cur = x
            x_end = x.start + x.length
            if x_end <= start:
                self._cur = None
                continue
            s, t = max(start, x.start), min(end, x_end)
            shift = s - x.start
            off = None if x.offset is None else x.offset + shift
            out.append(Extent(s, t - s, x.depth, x.present, x.zero, x.data, off))
            if x_end <= end:
                self._cur = None
            if t >= end:
                return out
