"""Open: the snapshot table and the refcount table are read (never the snapshots' own
tables) and every range they name is cross-checked against the file and each other.

In check mode a damaged table leaves `st.broken` set (no snapshot is usable; repair
drops them all), a damaged entry is left out and named in `st.dropped` (repair removes
it), and an invalid revert marker sets `st.rewrite` (repair clears it)."""

from __future__ import annotations

import zlib
from typing import NamedTuple, Optional

import numpy as np

from fvd import fileio
from fvd.core.image import ImageCore
from fvd.errors import CorruptImageError
from fvd.features.snapshots import codec
from fvd.features.snapshots.check import check_snapshots
from fvd.features.snapshots.codec import ENTRY, ENTRY_OFFSET, TABLE_HEAD, Entry, TableHead
from fvd.features.snapshots.refcounts import set_frozen
from fvd.features.snapshots.state import NO_RUN, Run, SnapshotMeta, front_partial
from fvd.features.snapshots.tables import (
    read_snapshot_bitmap,
    read_snapshot_table,
    snapshot_record,
)
from fvd.ondisk import format as fmt
from fvd.ondisk import fvd_records as fr
from fvd.ondisk.fvd_records import REFCOUNT_DTYPE
from fvd.types import CheckResult


class SnapshotState(SnapshotMeta):
    """The core's snapshot slot (fvd.core.hooks.SnapshotHook)."""

    def has_snapshots(self) -> bool:
        """True while the image holds a snapshot."""
        return bool(self.entries)

    def check(self, img: ImageCore, result: CheckResult, repair: bool) -> None:
        check_snapshots(self, img, result, repair)


def state_of(img: ImageCore) -> SnapshotState:
    """The image's snapshot state (an empty one for an image without a snapshot table)."""
    img.check_open()
    if img.snapshot_state is None:
        img.snapshot_state = SnapshotState(img)
    st = img.snapshot_state
    assert isinstance(st, SnapshotState)
    return st


class _Broken(NamedTuple):
    """Why the snapshot table is unusable (repair drops every snapshot)."""

    offset: int
    what: str


class _Tables(NamedTuple):
    """The snapshot table's head and the refcounts, read and bounded by the file."""

    head: TableHead
    raw: bytes  # the whole snapshot table
    refcount: np.ndarray
    table_chunks: Run
    refcount_chunks: Run
    file_size: int
    owner: np.ndarray  # chunks of snapshot metadata so far (the tables)


def attach_snapshots(img: ImageCore) -> None:
    """Open hook: the snapshot state of `img` (module doc)."""
    st = SnapshotState(img)
    img.snapshot_state = st
    tables = _read_tables(img)
    if isinstance(tables, _Broken):
        return _unusable(img, st, tables)
    entries = _parse_entries(img, st, tables)
    if isinstance(entries, _Broken):
        return _unusable(img, st, entries)
    refcount = tables.refcount
    st.entries, st.refcount = entries, refcount
    st.table_chunks, st.refcount_chunks = tables.table_chunks, tables.refcount_chunks
    nphys = len(tables.owner)
    held_meta = np.flatnonzero((refcount[:nphys] > 0) & tables.owner[: len(refcount)])
    if len(held_meta):
        img.problem(
            img.header.refcount_table_offset + 2 * int(held_meta[0]),
            f"refcount table counts snapshot metadata chunk {int(held_meta[0])}",
            len(held_meta),
        )
    _apply_revert_marker(img, st, tables.head)
    set_frozen(img, st.refcount, install=False)


def _unusable(img: ImageCore, st: SnapshotMeta, why: _Broken) -> None:
    img.problem(why.offset, why.what + " (repair drops every snapshot)")
    st.broken = why.what


def _inside(img: ImageCore, off: int, size: int, file_size: int) -> bool:
    d, cs = img.header.data_offset, img.chunk_size
    return off >= d and (off - d) % cs == 0 and off + size <= file_size


def _read_tables(img: ImageCore) -> _Tables | _Broken:
    """The snapshot table and the refcounts, bounded by the file; why not (_Broken)."""
    h, fo = img.header, fmt.FIELD_OFFSET
    file_size = fileio.file_size(img.fd)
    toff, tsize = h.snapshot_table_offset, h.snapshot_table_size
    roff, rsize = h.refcount_table_offset, h.refcount_table_size
    outside = "is outside the data area or the file"
    if not (tsize >= TABLE_HEAD.size and _inside(img, toff, tsize, file_size)):
        what = f"snapshot table [{toff}, {toff + tsize}) {outside} ({file_size} bytes)"
        return _Broken(fo["snapshot_table_offset"], what)
    if rsize and not (rsize % 2 == 0 and _inside(img, roff, rsize, file_size)):
        what = f"refcount table [{roff}, {roff + rsize}) {outside} ({file_size} bytes)"
        return _Broken(fo["refcount_table_offset"], what)
    raw = img.read_meta(toff, tsize)
    head = codec.decode_head(raw)
    if head is None:
        return _Broken(toff, "snapshot table magic or checksum mismatch")
    if head.nb_snapshots != h.nb_snapshots:
        what = f"header says {h.nb_snapshots} snapshots, the snapshot table holds "
        return _Broken(fo["nb_snapshots"], what + str(head.nb_snapshots))
    table_chunks = _chunks(img, toff, tsize)
    rc_chunks = _chunks(img, roff, rsize) if rsize else NO_RUN
    if rsize and _overlap(table_chunks, rc_chunks):
        return _Broken(fo["refcount_table_offset"], "refcount table overlaps the snapshot table")
    rc_raw = img.read_meta(roff, rsize) if rsize else b""
    if zlib.crc32(rc_raw) != head.refcount_crc:
        return _Broken(roff, "refcount table checksum mismatch")
    refcount = np.frombuffer(rc_raw, dtype=REFCOUNT_DTYPE).astype(np.uint16)
    nphys = max(0, -(-(file_size - img.header.data_offset) // img.chunk_size))
    if len(refcount) > nphys and refcount[nphys:].any():
        return _Broken(roff, "refcount table counts chunks past the end of the file")
    owner = np.zeros(nphys, dtype=bool)
    for first, n in (table_chunks, rc_chunks):
        owner[first : first + n] = True
    return _Tables(head, raw, refcount, table_chunks, rc_chunks, file_size, owner)


def _chunks(img: ImageCore, offset: int, nbytes: int) -> Run:
    return (offset - img.header.data_offset) // img.chunk_size, -(-nbytes // img.chunk_size)


def _overlap(r1: Run, r2: Run) -> bool:
    return bool(r1[1] and r2[1] and r1[0] < r2[0] + r2[1] and r2[0] < r1[0] + r1[1])


class _Decoded(NamedTuple):
    entry: Entry  # granule record fields as stored, not yet checked
    where: int  # host offset of the entry
    problem: Optional[tuple[int, str]]  # a name that is not UTF-8
    end: int  # table position after the entry


class _Range(NamedTuple):
    offset: int
    nbytes: int
    field: int  # host offset of the field naming it
    what: str


def _parse_entries(img: ImageCore, st: SnapshotMeta, tables: _Tables) -> list[Entry] | _Broken:
    """The entries of a snapshot table, every range bounded by the file and disjoint
    from the other metadata (`tables.owner` marks it, and grows); _Broken when the
    table is unusable. A damaged entry is reported and left out (st.dropped)."""
    entries: list[Entry] = []
    pos = TABLE_HEAD.size
    for _ in range(tables.head.nb_snapshots):
        dec = _decode_entry(img, tables.raw, pos)
        if isinstance(dec, _Broken):
            return dec
        pos = dec.end
        e, ranges = dec.entry, _ranges(img, dec.entry, dec.where)
        problem = dec.problem or _entry_problem(img, e, dec.where, entries, ranges, tables)
        if problem is not None:
            img.problem(problem[0], problem[1] + " (repair deletes the snapshot)")
            st.dropped.append(e.name)
            continue
        for r in ranges:
            first, count = _chunks(img, r.offset, r.nbytes)
            tables.owner[first : first + count] = True
        _claim_granules(img, e, dec.where, tables)
        entries.append(e)
    return entries


def _decode_entry(img: ImageCore, raw: bytes, pos: int) -> _Decoded | _Broken:
    """The entry at table position `pos` (_Broken when it does not fit the table)."""
    h = img.header
    where = h.snapshot_table_offset + pos
    if pos + ENTRY.size > len(raw):
        return _Broken(where, "snapshot table entry overruns the table")
    f = codec.unpack(ENTRY, raw, pos)
    pos += ENTRY.size
    xsize, nlen = f["extra_size"], f["name_size"]
    if xsize % 8 or pos + xsize > len(raw):
        return _Broken(
            where + ENTRY_OFFSET["extra_size"], f"snapshot extra data size {xsize} out of range"
        )
    bitmap = granules = {}
    if xsize >= codec.EXTRA_BITMAP.size and h.base_format != fmt.BASE_NONE:
        bitmap = codec.unpack(codec.EXTRA_BITMAP, raw, pos)
    if xsize >= codec.EXTRA_GRANULES.size and h.base_format == fmt.BASE_NONE:
        granules = codec.unpack(codec.EXTRA_GRANULES, raw, pos)
    pos += xsize  # extra data past the fields known here is skipped
    if nlen == 0 or pos + nlen > len(raw):
        return _Broken(where, "snapshot name size out of range")
    name_raw, problem = raw[pos : pos + nlen], None
    try:
        name = name_raw.decode("utf-8")
    except UnicodeDecodeError:
        name, problem = repr(name_raw), (where, "snapshot name is not UTF-8")
    e = Entry(
        id=f["id"],
        created_ns=f["created_ns"],
        size=f["virtual_size"],
        table_offset=f["table_offset"],
        table_crc=f["table_crc"],
        name=name,
        vm_offset=f["vm_state_offset"],
        vm_size=f["vm_state_size"],
        vm_crc=f["vm_state_crc"],
        bitmap_offset=bitmap.get("bitmap_offset", 0),
        bitmap_crc=bitmap.get("bitmap_crc", 0),
        granules_offset=granules.get("granules_offset", 0),
        granules_size=granules.get("granules_size", 0),
        granules_crc=granules.get("granules_crc", 0),
    )
    return _Decoded(e, where, problem, pos + codec.pad8(nlen))


def _ranges(img: ImageCore, e: Entry, where: int) -> list[_Range]:
    """The ranges of the file an entry names (its granule record aside)."""
    out = [
        _Range(
            e.table_offset, 4 * img.nchunks, where + ENTRY_OFFSET["table_offset"], "lookup table"
        )
    ]
    if img.header.base_format != fmt.BASE_NONE:
        out.append(
            _Range(e.bitmap_offset, img.header.bitmap_size, where + ENTRY_OFFSET["extra"], "bitmap")
        )
    if e.vm_size:
        out.append(
            _Range(e.vm_offset, e.vm_size, where + ENTRY_OFFSET["vm_state_offset"], "vm_state")
        )
    return out


def _entry_problem(
    img: ImageCore,
    e: Entry,
    where: int,
    entries: list[Entry],
    ranges: list[_Range],
    tables: _Tables,
) -> Optional[tuple[int, str]]:
    """Why an entry cannot be used (offset, what), or None."""
    h = img.header
    if e.id >= h.next_snapshot_id or any(e.id == x.id or e.name == x.name for x in entries):
        return where, f"snapshot {e.name!r}: duplicate name or id {e.id} out of range"
    if e.size != img.size:
        return where + 16, f"snapshot {e.name!r}: size {e.size} differs from the image"
    for r in ranges:
        if not _inside(img, r.offset, r.nbytes, tables.file_size):
            return r.field, (
                f"snapshot {e.name!r}: {r.what} at {r.offset} is outside the data "
                f"area or the file ({tables.file_size} bytes)"
            )
        first, count = _chunks(img, r.offset, r.nbytes)
        if tables.owner[first : first + count].any():
            return (
                r.field,
                f"snapshot {e.name!r}: {r.what} at {r.offset} overlaps other snapshot metadata",
            )
    return None


def _claim_granules(img: ImageCore, e: Entry, where: int, tables: _Tables) -> None:
    """The granule record is optional: one that does not fit is left unused (and
    unowned), for check() to report and repair to drop; the snapshot stays."""
    if not e.granules_offset:
        return
    g_off, g_size = e.granules_offset, e.granules_size
    first, count = _chunks(img, g_off, g_size)
    bad = None
    if not (_inside(img, g_off, g_size, tables.file_size) and g_size >= fr.PartialMapHead.sizeof()):
        bad = (
            f"snapshot {e.name!r}: granule record [{g_off}, {g_off + g_size}) is "
            f"outside the data area or the file ({tables.file_size} bytes)"
        )
    elif tables.owner[first : first + count].any():
        bad = f"snapshot {e.name!r}: granule record at {g_off} overlaps other snapshot metadata"
    if bad is None:
        tables.owner[first : first + count] = True
        return
    e.granules_bad = (where + ENTRY_OFFSET["extra"], bad)
    e.granules_offset = e.granules_size = e.granules_crc = 0


def _apply_revert_marker(img: ImageCore, st: SnapshotMeta, head: TableHead) -> None:
    """docs/format.md section 8: a marker holds at exactly the epoch it was written in;
    an older one was voided by the checkpoint after it, a newer one cannot exist."""
    h = img.header
    if not head.revert_id:
        return
    where = h.snapshot_table_offset + 16
    if head.revert_epoch > h.journal_epoch:
        img.problem(
            where,
            f"revert marker for epoch {head.revert_epoch} is newer than the "
            f"journal epoch {h.journal_epoch} (repair clears it)",
        )
        st.rewrite = True
        return
    if head.revert_epoch == img.header.journal_epoch:
        _apply_pending_revert(img, st, head.revert_id, where)


def _apply_pending_revert(img: ImageCore, st: SnapshotMeta, revert_id: int, where: int) -> None:
    """A revert committed but not yet checkpointed: the front is that snapshot's table."""
    target = [e for e in st.entries if e.id == revert_id]
    try:
        if not target:
            raise CorruptImageError(
                img.path, where, f"pending revert to unknown snapshot id {revert_id}"
            )
        table = read_snapshot_table(img, target[0])
        record = snapshot_record(img, target[0], table)
        bits = read_snapshot_bitmap(img, target[0]) if img.bitmap is not None else None
    except CorruptImageError as e:
        img.problem(
            e.offset,
            f"{e.what}; the pending revert cannot be applied "
            f"(repair clears it: the image stays as before the revert)",
        )
        st.rewrite = True
        return
    img.table = table
    ps = front_partial(img)
    if ps is not None:
        ps.clear()  # the old front's partial chunks went with it
        if record is not None:  # ... and the snapshot's are the front's now
            ps.load_record(record.chunks, record.sources, record.rows)
    if bits is not None and img.bitmap is not None:  # ... its bitmap is the front's
        img.bitmap.fresh[:] = bits
        img.bitmap.stale[:] = bits
