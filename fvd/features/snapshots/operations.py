"""Snapshot create, delete, revert, vm_state, each one metadata transaction
(fvd.features.snapshots.transaction)."""

from __future__ import annotations

import time
import zlib
from typing import Optional

import numpy as np

from fvd.core import tablestore
from fvd.core.image import ImageCore
from fvd.errors import CorruptImageError, SnapshotBusyError
from fvd.features.snapshots import refcounts
from fvd.features.snapshots.attach import SnapshotState, state_of
from fvd.features.snapshots.codec import EXTRA_BITMAP, EXTRA_GRANULES, Entry, check_name
from fvd.features.snapshots.state import front_partial
from fvd.features.snapshots.tables import (
    needs_base,
    read_held_table,
    read_snapshot_bitmap,
    read_snapshot_table,
    snapshot_record,
)
from fvd.features.snapshots.transaction import (
    MetadataChange,
    Pieces,
    Region,
    RevertMarker,
    commit,
    flush_tables,
    trim_tail,
)
from fvd.ondisk import format as fmt
from fvd.ondisk import sparse_table
from fvd.ondisk.fvd_records import PARTIAL_MAP_FLAG_PROVENANCE, TABLE_DTYPE
from fvd.types import SnapshotInfo


def _writable_state(img: ImageCore) -> SnapshotState:
    img.check_writable()
    return state_of(img)


# ----- create ---------------------------------------------------------------------------
def create_snapshot(img: ImageCore, name: str, vm_state: bytes = b"") -> SnapshotInfo:
    """A read-only snapshot of the current contents; returns its SnapshotInfo.

    With a base image the snapshot also gets a copy of the durable (stale) bitmap. The
    image lock is held throughout, so a prefetch or copy-on-read store in another thread
    cannot change the table or the bitmap between the flush and the copy."""
    st = _writable_state(img)
    with img.lock:
        img.check_open()
        refcounts.freeze_front(img)
        try:
            return _create(img, st, name, vm_state)
        except BaseException:
            refcounts.set_frozen(img, st.refcount)  # the old refcounts (or the committed ones)
            raise


def _stored_table(img: ImageCore) -> tuple[Region, int]:
    """The front's table as a region to store, and its crc."""
    table = img.table
    if sparse_table.is_sparse(img.header):
        # only the non-zero units: the fresh chunks read as zeros (docs/format.md)
        tpieces, tcrc = tablestore.pieces(table)
        return Region(4 * len(table), Pieces(tpieces)), tcrc
    tbytes = table.astype(TABLE_DTYPE, copy=False).tobytes()  # one copy, not two
    return Region(len(tbytes), tbytes), zlib.crc32(tbytes)


def _create(img: ImageCore, st: SnapshotState, name: str, vm_state: bytes) -> SnapshotInfo:
    check_name(name)
    if any(e.name == name for e in st.entries):
        raise ValueError(f"{img.path}: a snapshot named {name!r} already exists")
    vm = memoryview(vm_state).cast("B")
    flush_tables(img)
    # the snapshot holds the front's partial chunks as they are: its granule record
    # names each one's source and written granules (nothing is copied)
    granules = b""
    ps = front_partial(img)
    if ps is not None and ps.active:
        granules = ps.encode(provenance=True)
    held = refcounts.front_held(img, len(st.refcount))
    refcount = refcounts.increment(img.path, st.refcount, held)
    table, tcrc = _stored_table(img)
    vm_crc = zlib.crc32(vm) if len(vm) else 0
    entry = Entry(
        id=img.header.next_snapshot_id,
        created_ns=time.time_ns(),
        size=img.size,
        table_offset=0,  # the offsets once the commit has placed the regions (_place)
        table_crc=tcrc,
        name=name,
        vm_offset=0,
        vm_size=len(vm),
        vm_crc=vm_crc,
    )
    change = MetadataChange(st.entries + [entry], refcount, [table], refcount_updates=held.nheld)
    change.header_fields["next_snapshot_id"] = entry.id + 1
    has_bitmap = img.bitmap is not None
    if img.bitmap is not None:
        # the bits that are durable now (flush above): soft bits name data that is also
        # in the base, so the snapshot reads those blocks from the base
        bits = img.bitmap.stale.tobytes()
        entry.bitmap_crc = zlib.crc32(bits)
        change.regions.append(Region(len(bits), bits))
        change.table_growth += EXTRA_BITMAP.size
    if granules:
        entry.granules_size, entry.granules_crc = len(granules), zlib.crc32(granules)
        entry.granules_provenance = bool(granules[12] & PARTIAL_MAP_FLAG_PROVENANCE)  # flags
        change.regions.append(Region(len(granules), granules))
        change.table_growth += EXTRA_GRANULES.size
    change.regions.append(Region(len(vm), vm))
    change.placed = lambda offsets: _place(entry, offsets, has_bitmap)
    commit(img, st, change)
    trim_tail(img)
    return entry.info(img.header)


def _place(e: Entry, offsets: list[int], has_bitmap: bool) -> None:
    """The new entry's offsets, in the order of its regions (table, bitmap copy,
    granule record, vm_state)."""
    offs = iter(offsets)
    e.table_offset = next(offs)
    if has_bitmap:
        e.bitmap_offset = next(offs)
    if e.granules_size:
        e.granules_offset = next(offs)
    e.vm_offset = next(offs) if e.vm_size else 0


def list_snapshots(img: ImageCore) -> list[SnapshotInfo]:
    img.check_open()
    st = img.snapshot_state
    return [e.info(img.header) for e in st.entries] if st is not None else []


# ----- delete ---------------------------------------------------------------------------
def delete_snapshot(img: ImageCore, name: str) -> None:
    """Drop a snapshot; chunks nothing else holds become free (reused before growing)."""
    st = _writable_state(img)
    with img.lock:
        img.check_open()
        _delete(img, st, name)


def _delete(img: ImageCore, st: SnapshotState, name: str) -> None:
    e = st.find(name, img.path)
    if st.views.get(e.id):
        raise SnapshotBusyError(
            f"{img.path}: snapshot {name!r} is open (open_snapshot); "
            f"close its views before deleting it"
        )
    flush_tables(img)  # the durable front table is the in-memory one
    stable, held = read_held_table(img, e)
    rec = snapshot_record(img, e, stable)
    if rec is not None:  # the sources of its partial chunks are held too
        held = refcounts.add_sources(held, rec.sources)
    dec = refcounts.decrement(img, st.refcount, held, e)
    change = MetadataChange([x for x in st.entries if x is not e], dec.refcount)
    change.release_runs = st.entry_chunks(img, e)
    change.release_chunks = np.unique(dec.freed)
    change.refcount_updates = held.nheld
    commit(img, st, change)
    trim_tail(img)


# ----- revert ---------------------------------------------------------------------------
def revert_to_snapshot(img: ImageCore, name: str) -> None:
    """The front becomes the snapshot's contents; the snapshot and all others stay.

    Crash atomicity: checkpoint (empty journal at epoch E), then commit a snapshot table
    carrying "revert to id at epoch E" (open applies it while the epoch is still E), then
    checkpoint the new table in place, which moves the epoch past E and voids the marker.
    With a base image the snapshot's bitmap replaces the front's in the same steps (it is
    written by the checkpoint; an open under the marker reads the snapshot's copy)."""
    st = _writable_state(img)
    with img.lock:
        img.check_open()
        _revert(img, st, name)


def _revert(img: ImageCore, st: SnapshotState, name: str) -> None:
    e = st.find(name, img.path)
    img.flush()
    new_table = read_snapshot_table(img, e)
    record = snapshot_record(img, e, new_table)
    new_bits = read_snapshot_bitmap(img, e) if img.bitmap is not None else None
    if new_bits is not None and img.base_layer is None and needs_base(img, new_bits):
        raise CorruptImageError(
            img.path,
            e.bitmap_offset,
            f"snapshot {name!r} reads the base image, but the image is marked prefetched",
        )
    old_table = img.table.copy()
    img.dirty_since_checkpoint = True
    img.checkpoint(clean=False)  # journal empty at the current epoch
    marker = RevertMarker(e.id, img.header.journal_epoch)
    change = MetadataChange(st.entries, st.refcount, revert=marker, keep_refcount_table=True)

    def install() -> None:
        """After the commit point: the front becomes the snapshot, checkpointed."""
        old_sources, temps = np.zeros(0, dtype=np.int64), list[int]()
        table = new_table
        ps = front_partial(img)
        if ps is not None:  # the old front's partial chunks go with it
            old_sources, temps = ps.detach(img)
            if record is not None:
                table = ps.complete_record(img, table, record[:3])
        _swap_front(img, table, new_bits)
        img.dirty_since_checkpoint = True
        img.checkpoint(clean=False)  # table in place, epoch E+1
        change.release_chunks = _only_front(img, old_table, old_sources, temps)

    commit(img, st, change, after_sync=install)
    trim_tail(img)


def _only_front(
    img: ImageCore, old_table: np.ndarray, old_sources: np.ndarray, temps: list[int]
) -> np.ndarray:
    """Chunks only the old front used (not frozen: every entry of the new table is)."""
    mask = old_table < fmt.ZERO_CHUNK
    cand = np.concatenate(
        [old_table[mask].astype(np.int64), old_sources, np.asarray(temps, dtype=np.int64)]
    )
    fz = img.frozen
    out: np.ndarray = cand[(cand >= len(fz)) | (fz[np.minimum(cand, len(fz) - 1)] == 0)]
    return out


def _swap_front(img: ImageCore, new_table: np.ndarray, new_bits: Optional[np.ndarray]) -> None:
    """Install the reverted table and bitmap, in place (the chunk map views them), in an
    order lock-free readers can follow: a reader pairs a bit (base or image) with a table
    entry, so bits leaving go first (those blocks read the base, which the new front
    reads too), then the table, then the bits arriving, each step after the readers that
    saw the previous state have finished (a grace period of the chunk map)."""
    bm = img.bitmap
    if new_bits is None or bm is None:  # no base, no bits: the table alone
        img.table[:] = new_table
        return
    np.bitwise_and(bm.fresh, new_bits, out=bm.fresh)
    np.bitwise_and(bm.stale, new_bits, out=bm.stale)
    img.allocator.quiesce(time.sleep)  # no reader still acts on a cleared bit
    img.table[:] = new_table
    img.allocator.quiesce(time.sleep)  # no reader still holds an old entry
    bm.fresh[:] = new_bits
    bm.stale[:] = new_bits


# ----- vm_state ---------------------------------------------------------------------------
def read_vm_state(img: ImageCore, name: str) -> bytes:
    st = state_of(img)
    with img.lock:  # a concurrent delete may not free the chunks meanwhile
        img.check_open()
        e = st.find(name, img.path)
        if not e.vm_size:
            return b""
        data: bytes = img.read_meta(e.vm_offset, e.vm_size)
        if zlib.crc32(data) != e.vm_crc:
            raise CorruptImageError(
                img.path, e.vm_offset, f"snapshot {name!r}: vm_state checksum mismatch"
            )
        return data
