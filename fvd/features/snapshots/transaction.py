"""The one metadata transaction of snapshot create, delete, revert and repair
(docs/format.md, "Atomic commit order").

All snapshot metadata (snapshot table, refcount table, each snapshot's lookup table,
bitmap copy, granule record and vm_state) lives in chunks of the data area and is
written copy-on-write: `commit` allocates fresh contiguous chunks, writes the new
metadata there and syncs it, then one header write + sync commits it (a failure before
the header write gives the chunks back and restores the header in memory). Only then
are the chunks nothing refers to any more released (hole-punched)."""

from __future__ import annotations

import heapq
import zlib
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np

from fvd import fileio
from fvd.core.image import ImageCore
from fvd.features.snapshots.codec import TABLE_HEAD, Entry, encode_table, entry_size
from fvd.features.snapshots.refcounts import set_frozen
from fvd.features.snapshots.state import NO_RUN, Run, SnapshotMeta
from fvd.ondisk import format as fmt
from fvd.ondisk.fvd_records import REFCOUNT_DTYPE

Buffer = Union[bytes, bytearray, memoryview]


class Pieces(list[tuple[int, Buffer]]):
    """(offset, bytes) runs of a region whose other bytes are zeros."""


class Region(NamedTuple):
    """Bytes appended after the tables (rounded up to whole chunks): a buffer, Pieces,
    or None (nothing written)."""

    nbytes: int
    data: Optional[Union[Buffer, Pieces]]


class RevertMarker(NamedTuple):
    """docs/format.md section 8: revert to snapshot `snapshot_id` at journal `epoch`."""

    snapshot_id: int = 0
    epoch: int = 0


@dataclass
class MetadataChange:
    """What one commit makes durable, and what it frees once it is."""

    entries: list[Entry]
    refcount: np.ndarray
    regions: list[Region] = field(default_factory=list)
    # called with the host offsets of the regions before the table is encoded
    placed: Optional[Callable[[list[int]], None]] = None
    # bytes the entries' extra data grows by once `placed` has run
    table_growth: int = 0
    revert: RevertMarker = RevertMarker()
    keep_refcount_table: bool = False  # the refcount table stays where it is (revert)
    header_fields: dict[str, int] = field(default_factory=dict)  # more fields to write
    release_runs: list[Run] = field(default_factory=list)  # freed by the commit
    release_chunks: Union[np.ndarray, Sequence[int]] = ()  # freed after the runs
    refcount_updates: int = 0  # for img.stats


class _Layout(NamedTuple):
    first: int  # the first chunk of the new metadata
    counts: list[int]  # chunks of each piece: table, refcount table (unless kept), regions
    offsets: list[int]  # host offsets of the pieces


class _Written(NamedTuple):
    header_fields: dict[str, int]
    table_chunks: Run
    refcount_chunks: Run
    old_runs: list[Run]  # of the tables the commit replaces


def commit(
    img: ImageCore,
    st: SnapshotMeta,
    change: MetadataChange,
    after_sync: Optional[Callable[[], None]] = None,
) -> None:
    """Write `change` copy-on-write and commit it (module doc); `after_sync` runs after
    the commit point, before the old chunks are released."""
    saved = img.header
    rc_raw = b""
    if change.entries:
        rc_raw = change.refcount.astype(REFCOUNT_DTYPE, copy=False).tobytes()
    layout = _allocate(img, change, len(rc_raw))
    if change.placed is not None:
        change.placed(layout.offsets[len(layout.offsets) - len(change.regions) :])
    try:
        written = _write(img, st, change, layout, rc_raw)
        img.write_header(**change.header_fields, **written.header_fields)
    except BaseException:
        img.header = saved
        img.abandon_chunks(list(range(layout.first, layout.first + sum(layout.counts))))
        raise
    # The header is written: from here on memory follows it, even if the sync fails
    # (then the old metadata chunks are kept: a leak at most, never a reuse).
    new_refcount = change.refcount is not st.refcount
    st.entries, st.refcount = change.entries, change.refcount
    st.table_chunks, st.refcount_chunks = written.table_chunks, written.refcount_chunks
    img.stats.refcount_updates += change.refcount_updates
    if new_refcount:
        set_frozen(img, st.refcount)
    img.sync()  # commit point
    if after_sync is not None:
        after_sync()
    release_runs(img, written.old_runs + change.release_runs)
    if len(change.release_chunks):
        img.allocator.release_now(int(i) for i in change.release_chunks)


def _allocate(img: ImageCore, change: MetadataChange, rc_bytes: int) -> _Layout:
    """Fresh contiguous chunks for the tables and the regions (entries need the regions'
    offsets: allocate first, encode after)."""
    cs, d = img.chunk_size, img.header.data_offset
    sizes = []
    if change.entries:
        tsize = TABLE_HEAD.size + sum(entry_size(e) for e in change.entries)
        sizes.append(tsize + change.table_growth)
        if not change.keep_refcount_table:
            sizes.append(rc_bytes)
    sizes.extend(r.nbytes for r in change.regions)
    counts = [-(-n // cs) for n in sizes]
    total = sum(counts)
    first = img.allocator.allocate_run(total) if total else 0
    img.grow_frozen(first + total)
    starts = accumulate(counts[:-1], initial=first)
    return _Layout(first, counts, [d + p * cs for p in starts] if counts else [])


def _write(
    img: ImageCore, st: SnapshotMeta, change: MetadataChange, layout: _Layout, rc_raw: bytes
) -> _Written:
    """The new tables and regions written and synced; the header fields naming them."""
    old_runs = [r for r in (st.table_chunks, st.refcount_chunks) if r[1]]
    if not change.entries:
        img.sync()
        features = img.header.incompatible_features & ~(
            fmt.INCOMPAT_SNAPSHOTS | fmt.INCOMPAT_SNAPSHOT_PARTIAL | fmt.INCOMPAT_PROVENANCE
        )
        return _Written(_table_fields(0, 0, 0, 0, features), NO_RUN, NO_RUN, old_runs)
    first, counts, offs = layout
    table = encode_table(change.entries, zlib.crc32(rc_raw), *change.revert)
    bufs: list[tuple[int, Buffer]] = [(offs[0], table)]
    if change.keep_refcount_table:
        rc_chunks = st.refcount_chunks
        roff = img.header.data_offset + rc_chunks[0] * img.chunk_size if rc_chunks[1] else 0
        old_runs = [r for r in old_runs if r != rc_chunks]
    else:
        rc_chunks = (first + counts[0], counts[1]) if rc_raw else NO_RUN
        roff = offs[1] if rc_raw else 0
        if rc_raw:
            bufs.append((offs[1], rc_raw))
    region_offs = offs[len(offs) - len(change.regions) :]
    bufs += _region_bufs(img, region_offs, change.regions)
    write_runs(img, bufs)
    features = _pairs_bit(img.header.incompatible_features | fmt.INCOMPAT_SNAPSHOTS, change.entries)
    fields = _table_fields(offs[0], len(table), roff, len(rc_raw), features)
    fields["nb_snapshots"] = len(change.entries)
    img.sync()
    return _Written(fields, (first, counts[0]), rc_chunks, old_runs)


def _table_fields(toff: int, tsize: int, roff: int, rsize: int, features: int) -> dict[str, int]:
    return dict(
        snapshot_table_offset=toff,
        snapshot_table_size=tsize,
        nb_snapshots=0,
        refcount_table_offset=roff,
        refcount_table_size=rsize,
        incompatible_features=features,
    )


def _pairs_bit(features: int, entries: Sequence[Entry]) -> int:
    """INCOMPAT_SNAPSHOT_PARTIAL while a snapshot holds partial chunks (a granule record):
    a reader that does not know it would read such a snapshot's chunks whole.
    INCOMPAT_PROVENANCE once a record with a provenance section was written, until no
    record is left (open does not read the records, so the bit is kept with them): a
    reader that knows records but not provenance would take such a record for damage."""
    if any(e.granules_offset for e in entries):
        if any(e.granules_provenance for e in entries):
            features |= fmt.INCOMPAT_PROVENANCE
        return features | fmt.INCOMPAT_SNAPSHOT_PARTIAL
    return features & ~(fmt.INCOMPAT_SNAPSHOT_PARTIAL | fmt.INCOMPAT_PROVENANCE)


def _region_bufs(
    img: ImageCore, offs: Sequence[int], regions: Sequence[Region]
) -> list[tuple[int, Buffer]]:
    """(host offset, bytes) writes of the regions; a Pieces region is zeroed first (a
    tail chunk given back may hold bytes), then only its pieces written."""
    bufs: list[tuple[int, Buffer]] = []
    for o, (n, b) in zip(offs, regions):
        if isinstance(b, Pieces):
            fileio.punch_hole(img.fd, o, n)
            fileio.extend_to(img.fd, o + n)  # the region's zeros may be a hole to its end
            bufs += [(o + rel, piece) for rel, piece in b]
        elif b is not None and n:
            bufs.append((o, b))
    return bufs


def write_runs(img: ImageCore, bufs: list[tuple[int, Buffer]]) -> None:
    """Write (offset, bytes) regions; adjacent ones go out as one pwritev."""
    bufs = sorted(bufs, key=lambda t: t[0])
    i = 0
    while i < len(bufs):
        off, group = bufs[i][0], [bufs[i][1]]
        end = off + len(bufs[i][1])
        j = i + 1
        while j < len(bufs) and bufs[j][0] == end:  # no zero padding is written
            group.append(bufs[j][1])
            end = bufs[j][0] + len(bufs[j][1])
            j += 1
        total = fileio.full_pwritev(img.fd, group, off)
        img.stats.metadata_writes += 1
        img.stats.metadata_bytes_written += total
        i = j


def release_runs(img: ImageCore, runs: Sequence[Run]) -> None:
    idx: list[int] = []
    for a, n in runs:
        idx.extend(range(a, a + n))
    if idx:
        img.allocator.release_now(idx)


def flush_tables(img: ImageCore) -> None:
    """Step 1 of create and delete (docs/format.md, "Atomic commit order"): pending table
    records (writeback) are journaled and synced now, so the front's durable table is the
    in-memory one. Without any it already is, and the sync of the new metadata before
    the commit header makes the data written since durable: one fdatasync fewer, same
    order."""
    if img.metadata_pending:
        img.flush()
    else:
        img.check_open()


def trim_tail(img: ImageCore) -> None:
    """Give free chunks at the end of the data area back to the file system."""
    alloc = img.allocator
    alloc.reclaim()
    if alloc.pending or alloc.retired:
        return  # (a retired chunk may still be read: cut the tail later)
    last = in_use_end(img, alloc.end)
    if last >= alloc.end:
        return
    alloc.free = [i for i in alloc.free if i < last]
    heapq.heapify(alloc.free)
    alloc.end = last
    end = img.header.data_offset + last * img.chunk_size
    fileio.truncate_tail(img.fd, end)


def in_use_end(img: ImageCore, end: int) -> int:
    """1 + the last chunk in use, as from img.in_use() (0: none), or some value >= end
    once that is known: the front's table is scanned only when the snapshot metadata,
    the refcounts and the partial chunks end before `end` (no whole-table bincount)."""
    last = 0
    st: Any = img.snapshot_state
    if st is not None:  # as SnapshotMeta.mark_used: metadata runs, refcount > 0
        last = max([a + n for a, n in st.metadata_runs(img) if n] + [0])
        rc = st.refcount
        if len(rc) > last and rc[-1]:
            last = len(rc)  # the usual case: delete trims the table past its last count
        elif len(rc) > last:
            nz = np.flatnonzero(rc[last:])
            last += int(nz[-1]) + 1 if len(nz) else 0
    if img.partial is not None:  # its sources and map chunks, as PartialState.mark_used
        last = max(last, len(img.partial.mark_used(np.zeros(0, dtype=bool))))
    if last >= end:
        return last
    t = img.table
    valid = t < fmt.ZERO_CHUNK
    if valid.any():
        last = max(last, int(t.max(where=valid, initial=0)) + 1)
    return last
