"""Refcount table, refcount blocks and cluster allocation (cf. QEMU block/qcow2-refcount.c).

16-bit big-endian refcounts. Refcount blocks are cached whole (numpy '>u2' arrays) and
written back whole, one pwrite per dirty block, as QEMU's refcount cache does.
Allocation is first-fit from a moving free index, so new clusters are appended in
allocation order. A new refcount block is placed inside the range it covers (it counts
itself). Decrements caused by replacing an L2 entry are deferred until that L2 change is
stable ("L2 entry stable before the refcount decrement it causes").
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import numpy.typing as npt

from fvd.errors import CorruptImageError
from fvd.qcow2.format import (
    L1E_RESERVED_MASK,
    L2E_STD_RESERVED_MASK,
    OFF_REFTABLE,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    REFBLOCK_DTYPE,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    REFTABLE_DTYPE,
    S_REFTABLE_UPDATE,
)
from fvd.qcow2.state import Clusters, Qcow2State, RefBlock, Table

MAX_REFCOUNT = 0xFFFF


class RefcountMixin(Qcow2State):
    """Mixed into Qcow2Image; uses its I/O helpers (_meta_read, _meta_write, _sync)."""

    # ----------------------------------------------------------------- lookup
    def _rb_entries(self) -> int:
        return self._cs // 2

    def _refblock(self, b: int) -> Optional[RefBlock]:
        """The cached refcount block `b` (loading it), or None when it is not allocated."""
        arr = self._rb.get(b)
        if arr is not None:
            return arr
        if b >= len(self._reftable):
            return None
        e = int(self._reftable[b])
        if e & REFT_RESERVED_MASK:
            raise CorruptImageError(
                self.path, self._rt_offset + 8 * b, "refcount table entry has reserved bits set"
            )
        off = e & REFT_OFFSET_MASK
        if off == 0:
            return None
        if off % self._cs or off + self._cs > self._file_size:
            raise CorruptImageError(
                self.path,
                self._rt_offset + 8 * b,
                f"refcount block offset {off:#x} invalid or past the end",
            )
        arr = np.frombuffer(self._meta_read(off, self._cs), dtype=REFBLOCK_DTYPE).copy()
        self._rb[b] = arr
        return arr

    def _refblock_placed(self, b: int) -> bool:
        return b < len(self._reftable) and int(self._reftable[b]) & REFT_OFFSET_MASK != 0

    def _refcount(self, idx: int) -> int:
        rbits = self._cbits - 1
        arr = self._refblock(idx >> rbits)
        return 0 if arr is None else int(arr[idx & ((1 << rbits) - 1)])

    # ------------------------------------------------------------- updating
    def _update_refcounts(self, clusters: Clusters, delta: int) -> None:
        """Add `delta` to the refcount of every cluster index in `clusters` (with repeats)."""
        clusters = np.asarray(clusters, dtype=np.int64)
        if clusters.size == 0:
            return
        rbits = self._cbits - 1
        mask = (1 << rbits) - 1
        blocks = clusters >> rbits
        for b in np.unique(blocks):
            b = int(b)
            idx = clusters[blocks == b] & mask
            arr = self._refblock(b)
            if arr is None:
                if delta < 0:
                    raise CorruptImageError(self.path, None, "freeing a cluster with refcount 0")
                arr = self._rb[b] = np.zeros(self._rb_entries(), dtype=REFBLOCK_DTYPE)
            new = arr.astype(np.int64)
            np.add.at(new, idx, delta)
            if new.min() < 0 or new.max() > MAX_REFCOUNT:
                raise CorruptImageError(
                    self.path, None, f"refcount underflow/overflow in block {b}"
                )
            arr[:] = new
            self._rb_dirty.add(b)
            if not self._refblock_placed(b):
                self._place_refblock(b)
        self.stats.refcount_updates += int(clusters.size)
        if delta < 0:
            self._free_idx = min(self._free_idx, int(clusters.min()))
            freed = clusters[self._refcounts_of(clusters) == 0]
            for c in freed.tolist():
                self._l2.pop(c << self._cbits, None)  # a freed L2 table leaves the cache
                self._l2_dirty.discard(c << self._cbits)

    def _defer_free(self, host_offset: int) -> None:
        """Free a cluster once the L2 change that dropped it is stable."""
        self._deferred.append(host_offset >> self._cbits)

    def _apply_deferred(self) -> None:
        if self._deferred:
            done, self._deferred = self._deferred, []
            self._update_refcounts(done, -1)

    # ------------------------------------------------------------- allocation
    def _first_free(self, start: Optional[int] = None) -> int:
        idx = self._free_idx if start is None else start
        rbits = self._cbits - 1
        mask = (1 << rbits) - 1
        while True:
            arr = self._refblock(idx >> rbits)
            if arr is None:
                return idx
            free = np.flatnonzero(arr[idx & mask :] == 0)
            if free.size:
                return idx + int(free[0])
            idx = ((idx >> rbits) + 1) << rbits

    def _alloc_cluster(self) -> int:
        """Allocate one host cluster (refcount 0 -> 1); returns its byte offset."""
        while True:
            idx = self._first_free()
            if not self._refblock_placed(idx >> (self._cbits - 1)):
                self._place_refblock(idx >> (self._cbits - 1), at=idx)
                continue
            self._update_refcounts([idx], +1)
            self._free_idx = idx + 1
            self._extend_file((idx + 1) << self._cbits)
            return idx << self._cbits

    def _alloc_contiguous(self, n: int) -> int:
        """Allocate n contiguous clusters (L1 copies, snapshot tables); returns the offset."""
        if n == 1:
            return self._alloc_cluster()
        rbits = self._cbits - 1
        while True:
            start = self._find_free_run(n)
            missing = [
                b
                for b in range(start >> rbits, ((start + n - 1) >> rbits) + 1)
                if not self._refblock_placed(b)
            ]
            if missing:
                # a block is needed to count these clusters: place it, then search again
                self._place_refblock(missing[0])
                continue
            self._update_refcounts(np.arange(start, start + n), +1)
            if start == self._free_idx:
                self._free_idx = start + n
            self._extend_file((start + n) << self._cbits)
            return start << self._cbits

    def _find_free_run(self, n: int) -> int:
        start = self._first_free()
        while True:
            run = 0
            while run < n and self._refcount(start + run) == 0:
                run += 1
            if run == n:
                return start
            start = self._first_free(start + run + 1)

    def _extend_file(self, end: int) -> None:
        """Make the file cover a newly allocated cluster (QEMU uses fallocate here)."""
        if end > self._file_size:
            os.ftruncate(self.fd, end)
            self._file_size = end

    # ------------------------------------------------ new refcount blocks / table
    def _place_refblock(self, b: int, at: Optional[int] = None) -> None:
        """Give refcount block `b` a home, write it and hook it into the refcount table.

        With `at` inside the range of `b` the block counts itself (QEMU's preference).
        QEMU's order: L2 cache flushed -> refblock written + flushed -> refcount table
        entry written synchronously (8 bytes).
        """
        if b >= len(self._reftable):
            self._grow_reftable(b + 1)
            if self._refblock_placed(b):
                return
        rbits = self._cbits - 1
        arr = self._rb.get(b)
        if arr is None:
            arr = self._rb[b] = np.zeros(self._rb_entries(), dtype=REFBLOCK_DTYPE)
        if at is None:
            at = self._first_free()
            while (at >> rbits) != b and not self._refblock_placed(at >> rbits):
                self._place_refblock(at >> rbits, at=at)
                if self._refblock_placed(b):
                    return
                at = self._first_free()
        if (at >> rbits) == b:
            arr[at & ((1 << rbits) - 1)] += 1
            self.stats.refcount_updates += 1
        else:
            self._update_refcounts([at], +1)
        if at == self._free_idx:
            self._free_idx = at + 1
        off = at << self._cbits
        self._extend_file(off + self._cs)
        self._flush_l2_cache()
        self._meta_write(off, arr.tobytes())
        self._rb_dirty.discard(b)
        self._sync()
        self._reftable[b] = off
        self._meta_write(self._rt_offset + 8 * b, self._reftable[b : b + 1].tobytes())
        self._sync()

    def _grow_reftable(self, min_entries: int) -> None:
        """Write a bigger refcount table (and the blocks covering it) past the end of the
        file, switch the header to it with one synchronous 12-byte write, free the old one.
        The table is made 50% bigger than needed, as QEMU does."""
        cs, rbits = self._cs, self._cbits - 1
        start = self._end_cluster()
        tab_clusters, nblocks = 1, 0
        while True:
            end = start + nblocks + tab_clusters
            need = max(min_entries, ((end - 1) >> rbits) + 1)
            want = -(-(need * 3 // 2) * 8 // cs)
            missing = [
                b
                for b in range(start >> rbits, ((end - 1) >> rbits) + 1)
                if not self._refblock_placed(b)
            ]
            if want <= tab_clusters and len(missing) == nblocks:
                break
            tab_clusters, nblocks = max(tab_clusters, want), len(missing)
        table = np.zeros(tab_clusters * cs // 8, dtype=REFTABLE_DTYPE)
        table[: len(self._reftable)] = self._reftable
        for i, b in enumerate(missing):
            table[b] = (start + i) << self._cbits
            if b not in self._rb:
                self._rb[b] = np.zeros(self._rb_entries(), dtype=REFBLOCK_DTYPE)
            self._rb_dirty.add(b)
        old_off, old_clusters = self._rt_offset, self._rt_clusters
        self._reftable = table  # the new blocks count as placed now
        self._update_refcounts(np.arange(start, end), +1)
        self._extend_file(end << self._cbits)
        self._flush_l2_cache()
        for b in sorted(self._rb_dirty):  # the new blocks (all of them when lazy)
            if not self._lazy and b not in missing:
                continue
            self._meta_write(int(table[b]) & REFT_OFFSET_MASK, self._rb[b].tobytes())
            self._rb_dirty.discard(b)
        tab_off = (start + nblocks) << self._cbits
        self._meta_write(tab_off, table.tobytes())
        self._sync()
        self._rt_offset, self._rt_clusters = tab_off, tab_clusters
        self._meta_write(OFF_REFTABLE, S_REFTABLE_UPDATE.pack(tab_off, tab_clusters))
        self._sync()
        self._update_refcounts(np.arange(old_clusters) + (old_off >> self._cbits), -1)

    def _end_cluster(self) -> int:
        """First cluster index past every allocated cluster (and the end of the file)."""
        rbits = self._cbits - 1
        end = -(-self._file_size // self._cs)
        for b in range(len(self._reftable) - 1, -1, -1):
            arr = self._refblock(b)
            if arr is not None:
                used = np.flatnonzero(arr)
                if used.size:
                    end = max(end, (b << rbits) + int(used[-1]) + 1)
                    break
        for b, arr in self._rb.items():
            used = np.flatnonzero(arr)
            if used.size:
                end = max(end, (b << rbits) + int(used[-1]) + 1)
        return end

    # ------------------------------------------------------------ write-back
    def _flush_refcount_cache(self) -> None:
        """Write every dirty refcount block (whole cluster each), then flush."""
        todo = sorted(b for b in self._rb_dirty if self._refblock_placed(b))
        if not todo:
            return
        for b in todo:
            off = int(self._reftable[b]) & REFT_OFFSET_MASK
            self._meta_write(off, self._rb[b].tobytes())
            self._rb_dirty.discard(b)
        self._sync()

    # ------------------------------------------------- computing from metadata
    def _compute_refcounts(self) -> tuple[npt.NDArray[np.int64], list[str]]:
        """Refcounts implied by the metadata, as qemu-img check computes them.

        Returns (counts array indexed by cluster, list of corruption messages).
        """
        cs, cbits = self._cs, self._cbits
        nclusters = max(-(-self._file_size // cs), 1)
        refs, errors = [], []

        def area(off: int, length: int) -> None:
            if length:
                refs.append(np.arange(off >> cbits, -(-(off + length) // cs), dtype=np.int64))

        area(0, cs)
        area(self._rt_offset, self._rt_clusters * cs)
        rt = self._reftable.astype(np.uint64)
        blocks = rt & np.uint64(REFT_OFFSET_MASK)
        if (rt & np.uint64(REFT_RESERVED_MASK)).any():
            errors.append("refcount table entry with reserved bits set")
        refs.append((blocks[blocks != 0] >> np.uint64(cbits)).astype(np.int64))
        if self._snapshots:
            area(self._snapshots_offset, self._snap_table_len)
        trees = [(self._l1, self._l1_offset, True)]
        trees += [(self._snapshot_l1(s), s.l1_table_offset, False) for s in self._snapshots]
        for l1, l1_off, _active in trees:
            area(l1_off, len(l1) * 8)
        # header, refcount and L1 tables, refcount blocks, snapshot table: a cluster of
        # these that anything else also uses is an overlap, which a refcount cannot fix
        exclusive = np.concatenate(refs)
        for l1, _l1_off, active in trees:
            self._count_tree(l1, active, refs, errors)
        allrefs = np.concatenate(refs) if refs else np.zeros(0, dtype=np.int64)
        # bounded by the file, never by what an entry names: a reference past the end
        # is an error, not an array index
        beyond = allrefs[(allrefs >= nclusters) | (allrefs < 0)]
        allrefs = allrefs[(allrefs < nclusters) & (allrefs >= 0)]
        counts = np.zeros(nclusters, dtype=np.int64)
        np.add.at(counts, allrefs, 1)
        if beyond.size:
            errors.extend(
                [f"reference past the end of the file (cluster {int(beyond[0])})"]
                * int(beyond.size)
            )
        excl = np.unique(exclusive[(exclusive >= 0) & (exclusive < nclusters)])
        for c in excl[counts[excl] > 1].tolist():
            errors.append(f"metadata cluster {c} is also used by other metadata or data")
        return counts, errors

    def _count_tree(
        self, l1: Table, active: bool, refs: list[npt.NDArray[np.int64]], errors: list[str]
    ) -> None:
        l1u = l1.astype(np.uint64)
        if (l1u & np.uint64(L1E_RESERVED_MASK)).any():
            errors.append("L1 entry with reserved bits set")
        for i in np.flatnonzero(l1u & np.uint64(OFFSET_MASK)):
            l2_off = int(l1u[i]) & OFFSET_MASK
            if l2_off % self._cs or l2_off + self._cs > self._file_size:
                errors.append(f"L2 table offset {l2_off:#x} invalid")
                continue
            refs.append(np.array([l2_off >> self._cbits], dtype=np.int64))
            l2 = self._l2_peek(l2_off).astype(np.uint64)
            if (l2 & np.uint64(OFLAG_COMPRESSED)).any():
                errors.append("compressed clusters are not supported")
            if (l2 & np.uint64(L2E_STD_RESERVED_MASK)).any():
                errors.append(f"L2 entry with reserved bits set in table {l2_off:#x}")
            offs = l2 & np.uint64(OFFSET_MASK)
            offs = offs[offs != 0]
            if (offs % np.uint64(self._cs)).any():
                errors.append(f"unaligned data cluster in L2 table {l2_off:#x}")
            refs.append((offs >> np.uint64(self._cbits)).astype(np.int64))

    def _copied_errors(self) -> int:
        """Active entries whose COPIED flag disagrees with refcount == 1."""
        bad = 0
        copied = np.uint64(OFLAG_COPIED)
        l1u = self._l1.astype(np.uint64)
        for i in np.flatnonzero(l1u & np.uint64(OFFSET_MASK)):
            l2_off = int(l1u[i]) & OFFSET_MASK
            if l2_off % self._cs or l2_off + self._cs > self._file_size:
                continue
            if bool(int(l1u[i]) & OFLAG_COPIED) != (self._refcount(l2_off >> self._cbits) == 1):
                bad += 1
            l2 = self._l2_peek(l2_off).astype(np.uint64)
            offs = l2 & np.uint64(OFFSET_MASK)
            idx = np.flatnonzero(offs)
            rc = self._refcounts_of((offs[idx] >> np.uint64(self._cbits)).astype(np.int64))
            bad += int(((l2[idx] & copied != 0) != (rc == 1)).sum())
        return bad

    def _refcounts_of(self, clusters: Clusters) -> npt.NDArray[np.int64]:
        """Vectorised refcount lookup for an array of cluster indexes."""
        clusters = np.asarray(clusters, dtype=np.int64)
        out = np.zeros(clusters.size, dtype=np.int64)
        rbits = self._cbits - 1
        blocks = clusters >> rbits
        for b in np.unique(blocks):
            sel = blocks == b
            arr = self._refblock(int(b))
            if arr is not None:
                out[sel] = arr[clusters[sel] & ((1 << rbits) - 1)]
        return out

    def _stored_refcounts(self, n: int) -> npt.NDArray[np.int64]:
        rbits = self._cbits - 1
        out = np.zeros(n, dtype=np.int64)
        for b in range(-(-n // (1 << rbits))):
            arr = self._refblock(b)
            if arr is not None:
                lo = b << rbits
                hi = min(n, lo + len(arr))
                out[lo:hi] = arr[: hi - lo]
        return out

    def _rebuild_refcounts(self) -> None:
        """Replace every refcount with what the metadata implies (repair / dirty open)."""
        self._deferred = []
        counts, errors = self._compute_refcounts()
        if errors:
            raise CorruptImageError(self.path, None, "cannot rebuild refcounts: " + errors[0])
        if counts.max(initial=0) > MAX_REFCOUNT:
            raise CorruptImageError(self.path, None, "refcount overflow while rebuilding")
        per = 1 << (self._cbits - 1)
        self._rb, self._rb_dirty, unplaced = {}, set(), []
        for b in range(max(-(-len(counts) // per), len(self._reftable))):
            seg = counts[b * per : (b + 1) * per]
            arr = np.zeros(per, dtype=REFBLOCK_DTYPE)
            arr[: len(seg)] = seg
            if self._refblock_placed(b):
                self._rb[b] = arr
                self._rb_dirty.add(b)
            elif seg.any():
                self._rb[b] = arr
                unplaced.append(b)
        self._free_idx = 0
        for b in unplaced:
            if not self._refblock_placed(b):
                self._place_refblock(b)
        self._flush_refcount_cache()
