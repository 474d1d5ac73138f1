"""Internal snapshots (cf. QEMU block/qcow2-snapshot.c).

Create: the VM state goes into fresh clusters mapped by L2 tables that only the
snapshot's L1 references, at the guest offsets just past the disk (QEMU's
"vm_state_offset" = ceil(size / L2 coverage) * L2 coverage); the active L1 is copied to
new clusters; every L2 table and data cluster under the active L1 gets refcount +1; COPIED
is cleared in the active L1/L2 tables; refcounts and L2 tables are flushed, the L1 is
rewritten; the snapshot table is rewritten to new clusters, flushed, and the header
switched with one synchronous 12-byte write; the old table is freed.
Delete: the snapshot table is rewritten without the entry, then the snapshot's tree is
unreferenced (refcount -1), its L1 freed, and COPIED recomputed in the active tree.
"""

from __future__ import annotations

import copy
import datetime
import time
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

from fvd.errors import CorruptImageError
from fvd.qcow2.format import (
    L1_DTYPE,
    L2_DTYPE,
    OFF_SNAPSHOTS,
    OFFSET_MASK,
    OFLAG_COPIED,
    OFLAG_ZERO,
    S_SNAPSHOTS_UPDATE,
    SnapshotInfo,
    build_snapshot_table,
    parse_snapshot_table,
    snapshot_extra,
)
from fvd.qcow2.state import Qcow2State, Table
from fvd.types import Closing, Extent, extents_to_array

if TYPE_CHECKING:
    from typing_extensions import Buffer


class SnapshotMixin(Qcow2State):
    """Mixed into Qcow2Image."""

    # ----------------------------------------------------------- loading
    def _load_snapshots(self, nb: int, offset: int) -> None:
        self._snapshots, self._snapshots_offset, self._snap_table_len = [], offset, 0
        if not nb:
            return
        avail = self._file_size - offset
        want = min(avail, nb * 128 + self._cs)
        while True:
            raw = self._meta_read(offset, want)
            try:
                snaps, end = parse_snapshot_table(self.path, raw, nb, self.size, self._version)
                break
            except CorruptImageError:
                if want >= avail:
                    raise
                want = min(avail, want * 4)
        for s in snaps:
            if (
                s.l1_table_offset % self._cs
                or (s.l1_size and s.l1_table_offset == 0)
                or s.l1_table_offset + 8 * s.l1_size > self._file_size
            ):
                raise CorruptImageError(
                    self.path,
                    offset,
                    f"snapshot {s.id}: L1 table {s.l1_table_offset:#x} unaligned or past the end",
                )
            cover = self._cs << self._l2bits
            room = max(0, s.l1_size * cover - self._vm_state_offset())
            if s.vm_state_size > min(room, self._file_size):
                raise CorruptImageError(
                    self.path,
                    offset,
                    f"snapshot {s.id}: vm_state size "
                    f"{s.vm_state_size} exceeds what its L1 table maps "
                    f"or the file holds",
                )
        self._snapshots, self._snap_table_len = snaps, end

    def _snapshot_l1(self, s: SnapshotInfo) -> Table:
        l1 = self._snap_l1.get(s.l1_table_offset)
        if l1 is None:
            raw = self._meta_read(s.l1_table_offset, 8 * s.l1_size) if s.l1_size else b""
            l1 = np.frombuffer(bytes(raw), dtype=L1_DTYPE).copy()
            self._snap_l1[s.l1_table_offset] = l1
        return l1

    def _find_snapshot(self, name: str) -> SnapshotInfo:
        for s in self._snapshots:
            if s.name == name:
                return s
        for s in self._snapshots:
            if s.id == name:
                return s
        raise ValueError(f"{self.path}: no snapshot named {name!r}")

    # ------------------------------------------------------------ public
    def snapshots(self) -> list[SnapshotInfo]:
        """Infos (name, id, created, size, vm_state_size) in table order."""
        self._check_open()
        return [copy.copy(s) for s in self._snapshots]

    def read_vm_state(self, name: str) -> bytes:
        """The vm_state stored with snapshot `name`."""
        self._check_open()
        s = self._find_snapshot(name)
        buf = bytearray(s.vm_state_size)
        self._read_tree(
            self._snapshot_l1(s), s.l1_table_offset, self._vm_state_offset(), memoryview(buf)
        )
        return bytes(buf)

    def open_snapshot(self, name: str) -> Qcow2SnapshotView:
        """A read-only view of snapshot `name` (read, readinto, extents), valid while
        this image stays open and the snapshot is not deleted."""
        self._check_open()
        return Qcow2SnapshotView(self, self._find_snapshot(name))

    def create_snapshot(self, name: str, vm_state: Buffer = b"") -> SnapshotInfo:
        """Internal snapshot of the current contents, QEMU's way (see module doc)."""
        self._check_writable()
        if not isinstance(name, str) or not name:
            raise ValueError("snapshot name must be a non-empty string")
        if any(s.name == name for s in self._snapshots):
            raise ValueError(f"{self.path}: snapshot {name!r} already exists")
        vm = memoryview(vm_state).cast("B")
        self.flush()
        n_disk = self._l1_disk_entries()
        vm_entries = self._write_vm_state(vm)
        snap_l1 = np.zeros(n_disk + len(vm_entries), dtype=L1_DTYPE)
        snap_l1[:n_disk] = self._l1[:n_disk]
        snap_l1[n_disk:] = vm_entries
        raw = snap_l1.tobytes()
        l1_off = self._alloc_contiguous(max(1, -(-len(raw) // self._cs)))
        self._meta_write(l1_off, raw)
        self._tree_refcount(self._l1[:n_disk], +1)
        self._fix_copied()
        now = time.time_ns()
        date_sec, date_nsec = now // 10**9, now % 10**9
        ids = [int(s.id) for s in self._snapshots if s.id.isdigit()]
        info = SnapshotInfo(
            id=str(max(ids, default=0) + 1),
            name=name,
            created=_to_datetime(date_sec, date_nsec),
            size=self.size,
            vm_state_size=len(vm),
            l1_table_offset=l1_off,
            l1_size=len(snap_l1),
            date_sec=date_sec,
            date_nsec=date_nsec,
            extra=snapshot_extra(len(vm), self.size),
        )
        self._snap_l1[l1_off] = snap_l1
        self._write_snapshot_table(self._snapshots + [info])
        self.flush()
        return copy.copy(info)

    def delete_snapshot(self, name: str) -> None:
        """Delete a snapshot and free what only it used."""
        self._check_writable()
        s = self._find_snapshot(name)
        self.flush()
        self._write_snapshot_table([x for x in self._snapshots if x is not s])
        l1 = self._snapshot_l1(s)
        self._tree_refcount(l1, -1)
        nl1 = max(1, -(-8 * s.l1_size // self._cs))
        self._update_refcounts(np.arange(nl1) + (s.l1_table_offset >> self._cbits), -1)
        self._snap_l1.pop(s.l1_table_offset, None)
        self._fix_copied()
        self.flush()

    # ------------------------------------------------------------ helpers
    def _l1_disk_entries(self) -> int:
        cover = self._cs << self._l2bits
        return -(-self.size // cover)

    def _vm_state_offset(self) -> int:
        return self._l1_disk_entries() * (self._cs << self._l2bits)

    def _write_vm_state(self, vm: memoryview) -> list[int]:
        """Write the VM state into new L2 tables + clusters; returns their L1 entries."""
        cs, per_table = self._cs, self._cs << self._l2bits
        entries = []
        run: list[memoryview]  # pieces of one physically contiguous run
        for t in range(0, len(vm), per_table):
            part = vm[t : t + per_table]
            l2_off = self._alloc_cluster()
            table = np.zeros(cs // 8, dtype=L2_DTYPE)
            run_host, run = -1, []
            for j, p in enumerate(range(0, len(part), cs)):
                host = self._alloc_cluster()
                table[j] = host | OFLAG_COPIED
                piece = part[p : p + cs]
                if run and run_host + sum(len(x) for x in run) == host:
                    run.append(piece)
                else:
                    if run:
                        self._data_writev(run_host, run)
                    run_host, run = host, [piece]
            if run:
                self._data_writev(run_host, run)
            self._meta_write(l2_off, table.tobytes())
            entries.append(l2_off | OFLAG_COPIED)
        return entries

    def _tree_refcount(self, l1: Table, delta: int) -> None:
        """Refcount += delta for every L2 table under l1 and every cluster they map."""
        clusters = []
        l1u = l1.astype(np.uint64) & np.uint64(OFFSET_MASK)
        for t in l1u[l1u != 0]:
            t = int(t)
            clusters.append(np.array([t >> self._cbits], dtype=np.int64))
            offs = self._l2_peek(t).astype(np.uint64) & np.uint64(OFFSET_MASK)
            clusters.append((offs[offs != 0] >> np.uint64(self._cbits)).astype(np.int64))
        if clusters:
            self._update_refcounts(np.concatenate(clusters), delta)

    def _fix_copied(self) -> None:
        """Set COPIED exactly where refcount == 1 in the active L1 and L2 tables; flush
        refcounts and L2 tables, then rewrite the L1 table synchronously if it changed."""
        l1_changed = False
        for i in np.flatnonzero(self._l1.astype(np.uint64) & np.uint64(OFFSET_MASK)):
            e = int(self._l1[i])
            t = e & OFFSET_MASK
            want = t | (OFLAG_COPIED if self._refcount(t >> self._cbits) == 1 else 0)
            if want != e:
                self._l1[i] = want
                l1_changed = True
            l2 = self._l2_peek(t)
            l2u = l2.astype(np.uint64)
            offs = l2u & np.uint64(OFFSET_MASK)
            idx = np.flatnonzero(offs)
            if not idx.size:
                continue
            rc = self._refcounts_of((offs[idx] >> np.uint64(self._cbits)).astype(np.int64))
            copied = np.uint64(OFLAG_COPIED)
            new = np.where(rc == 1, l2u[idx] | copied, l2u[idx] & ~copied)
            if (new != l2u[idx]).any():
                l2[idx] = new
                self._l2_dirty.add(t)
        self.flush()
        if l1_changed:
            self._meta_write(self._l1_offset, self._l1.tobytes())
            self._sync()

    def _write_snapshot_table(self, snaps: list[SnapshotInfo]) -> None:
        raw = build_snapshot_table(snaps)
        old_off, old_len = self._snapshots_offset, self._snap_table_len
        off = 0
        if snaps:
            off = self._alloc_contiguous(-(-len(raw) // self._cs))
            self._meta_write(off, raw)
            self.flush()  # the new table and its refcounts are stable
        self._meta_write(OFF_SNAPSHOTS, S_SNAPSHOTS_UPDATE.pack(len(snaps), off))
        self._sync()
        self._snapshots, self._snapshots_offset, self._snap_table_len = snaps, off, len(raw)
        if old_len:
            n = -(-old_len // self._cs)
            self._update_refcounts(np.arange(n) + (old_off >> self._cbits), -1)

    def changed_ranges(
        self, since: str, until: Optional[str] = None
    ) -> list[tuple[int, int, bool]]:
        """(start, length, zero) runs of clusters whose mapping differs between snapshot `since` and
        `until` (a snapshot, or the active tree). A cluster mapped to the same host cluster
        in both trees holds the same bytes: a cluster a snapshot references is never written
        in place (copy on write)."""

        old = self._find_snapshot(since)
        old_l1 = self._snapshot_l1(old)
        if until is None:
            new_l1, size = self._l1, self.size
        else:
            info = self._find_snapshot(until)
            new_l1, size = self._snapshot_l1(info), info.size
        cs, per = self._cs, self._cs // 8
        key = np.uint64(OFFSET_MASK | OFLAG_ZERO)
        none = np.zeros(per, dtype=np.uint64)
        out: list[tuple[int, int, bool]] = []
        for i in range(-(-size // (cs * per))):
            a = int(old_l1[i]) & OFFSET_MASK if i < len(old_l1) else 0
            b = int(new_l1[i]) & OFFSET_MASK if i < len(new_l1) else 0
            if a == b and a:
                continue  # the same L2 table: nothing changed below it
            la = self._l2_peek(a).astype(np.uint64) & key if a else none
            lb = self._l2_peek(b).astype(np.uint64) & key if b else none
            diff = np.flatnonzero(la != lb)
            if not diff.size:
                continue
            zero = (lb[diff] & np.uint64(OFLAG_ZERO)).astype(bool) | (
                (lb[diff] == 0) & (self._backing is None)
            )
            for j, z in zip(diff.tolist(), zero.tolist()):
                start = (i * per + j) * cs
                if start >= size:
                    break
                length = min(cs, size - start)
                if out and out[-1][0] + out[-1][1] == start and out[-1][2] == z:
                    out[-1] = (out[-1][0], out[-1][1] + length, z)
                else:
                    out.append((start, length, z))
        return out


def _to_datetime(date_sec: int, date_nsec: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(date_sec + date_nsec / 1e9, tz=datetime.timezone.utc)


class Qcow2SnapshotView(Closing):
    """Read-only view of one internal snapshot: reads walk the snapshot's L1 table;
    unallocated clusters read from the backing file, as for the active tree."""

    read_only = True

    def __init__(self, img: Qcow2State, info: SnapshotInfo) -> None:
        self._img = img
        self.path = img.path
        self.name = info.name
        self.size = info.size
        self.cluster_size = img.cluster_size
        self.stats = img.stats
        self._l1 = img._snapshot_l1(info)
        self._l1_off = info.l1_table_offset
        self._closed = False

    def _check_open(self) -> None:
        if self._closed or self._img._closed:
            raise ValueError(f"{self.path}: I/O on a closed snapshot view")

    @property
    def closed(self) -> bool:
        return self._closed or self._img.closed

    def extents_array(self, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """extents() as an EXTENT_DTYPE array (fvd.types)."""
        return extents_to_array(self.extents(offset, length))

    def readinto(self, offset: int, buf: Buffer) -> int:
        self._check_open()
        mv = memoryview(buf).cast("B")
        if offset < 0 or offset + len(mv) > self.size:
            raise ValueError(
                f"{self.path}: I/O range [{offset}, {offset + len(mv)}) outside "
                f"the snapshot (size {self.size})"
            )
        self._img._read_tree(self._l1, self._l1_off, offset, mv)
        return len(mv)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        self._check_open()
        if length is None:
            length = self.size - offset
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.path}: range [{offset}, {offset + length}) outside the "
                f"snapshot (size {self.size})"
            )
        return self._img._extents(offset, length, self._l1, self._l1_off)

    def close(self) -> None:
        self._closed = True
