"""Internal snapshots: read-only copies of the lookup table plus a refcount table that
counts only the chunks read-only snapshots hold (docs/format.md, "Snapshots").

The writeable front is tracked by its one-level table and the journal alone: the
refcount table is read at open, written at snapshot create / delete / repair, and never
touched by guest writes. A chunk with refcount > 0 is *frozen*: the front copies it to a
fresh chunk on its first write there (`copy_chunk`).

All snapshot metadata (snapshot table, refcount table, each snapshot's lookup table and
vm_state) lives in chunks of the data area and is written copy-on-write: new metadata goes
to freshly allocated chunks, is synced, and one header write + sync commits it. Only then
are the chunks nothing refers to any more released (hole-punched).

With a base image each snapshot also keeps a copy of the durable (stale) bitmap (entry
extra data: bitmap_offset, bitmap_crc). Views read the base for its clear bits, revert
restores it with the table, and prefetch keeps the base attached while some snapshot's
copy still has a clear bit below the base end (snapshots_need_base).
"""

import heapq
import os
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np

from fvd import fileio
from fvd.core import journal, tablestore
from fvd.core.allocator import front_usage
from fvd.core.bitmap import Bitmap, get_bits
from fvd.core.hooks import BaseHook, PartialHook
from fvd.core.image import drain_map
from fvd.errors import (
    BaseImageError,
    CorruptImageError,
    ReadOnlyImageError,
    RefcountOverflowError,
    SnapshotBusyError,
    SnapshotNotFoundError,
)
from fvd.features.base import BaseLayer, _open_backend, marked_unallocated
from fvd.features.granular import (
    PartialState,
    check_record_table,
    decode_map,
    decode_provenance,
)
from fvd.ondisk import format as fmt
from fvd.ondisk import fvd_records as fr
from fvd.ondisk import sparse_table
from fvd.ondisk.fvd_records import REFCOUNT_DTYPE, REFCOUNT_MAX, TABLE_DTYPE
from fvd.ondisk.structs import span_struct
from fvd.types import SnapshotInfo

TABLE_MAGIC = fr.SNAPSHOT_TABLE_MAGIC
TABLE_HEAD = fr.S_SNAPSHOT_TABLE_HEAD  # magic crc nb_snapshots refcount_crc revert_id revert_epoch
ENTRY = fr.S_SNAPSHOT_ENTRY_HEAD  # id created_ns virtual_size table_offset table_crc name_size
#                                   extra_size vm_state_offset vm_state_size vm_state_crc reserved
EXTRA_BITMAP = fr.S_SNAPSHOT_EXTRA_BITMAP  # bitmap_offset bitmap_crc reserved (with a base)
EXTRA_GRANULES = fr.S_SNAPSHOT_EXTRA_GRANULES  # granules_offset _size _crc reserved (no base)
assert TABLE_HEAD.size == 32 and ENTRY.size == 64 and EXTRA_BITMAP.size == 16
assert EXTRA_GRANULES.size == 24
_OFF_CRC, _S_CRC = span_struct(fr.SnapshotTableHead, "crc", "crc")
_EOFF = fr.SNAPSHOT_ENTRY_OFFSET  # field offsets in an entry, for error messages
MAX_NAME = 255


@dataclass
class _Entry:
    id: int
    created_ns: int
    size: int
    table_offset: int
    table_crc: int
    name: str
    vm_offset: int
    vm_size: int
    vm_crc: int
    bitmap_offset: int = 0  # copy of the base bitmap (images with a base), else 0
    bitmap_crc: int = 0
    granules_offset: int = 0  # granule record (images without a base), else 0
    granules_size: int = 0
    granules_crc: int = 0
    granules_bad: Optional[tuple[int, str]] = None  # (offset, why) of a record not usable
    granules_provenance: bool = False  # its record, written by this open, has provenance

    def info(self, header=None):
        """The public SnapshotInfo; its uuid derives from the image header's UUID."""
        created = datetime.fromtimestamp(self.created_ns / 1e9, tz=timezone.utc)
        suid = fmt.snapshot_uuid(header, self.id, self.created_ns)
        return SnapshotInfo(self.name, self.id, created, self.size, self.vm_size, uuid=suid)


def _pad8(n):
    return (n + 7) & ~7


def _extra_size(e):
    if e.bitmap_offset:
        return EXTRA_BITMAP.size
    return EXTRA_GRANULES.size if e.granules_offset else 0


def entry_size(e):
    return ENTRY.size + _extra_size(e) + _pad8(len(e.name.encode("utf-8")))


def encode_table(entries, refcount_crc, revert_id=0, revert_epoch=0):
    body = bytearray()
    for e in entries:
        name = e.name.encode("utf-8")
        body += ENTRY.pack(
            e.id,
            e.created_ns,
            e.size,
            e.table_offset,
            e.table_crc,
            len(name),
            _extra_size(e),
            e.vm_offset,
            e.vm_size,
            e.vm_crc,
            0,
        )
        if e.bitmap_offset:
            body += EXTRA_BITMAP.pack(e.bitmap_offset, e.bitmap_crc, 0)
        elif e.granules_offset:
            body += EXTRA_GRANULES.pack(e.granules_offset, e.granules_size, e.granules_crc, 0)
        body += name.ljust(_pad8(len(name)), b"\0")
    raw = (
        bytearray(
            TABLE_HEAD.pack(TABLE_MAGIC, 0, len(entries), refcount_crc, revert_id, revert_epoch)
        )
        + body
    )
    _S_CRC.pack_into(raw, _OFF_CRC, zlib.crc32(raw))
    return bytes(raw)


def check_name(name):
    if not isinstance(name, str):
        raise ValueError(f"snapshot name must be a str, not {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"snapshot name {name!r} is not valid UTF-8") from None
    if not 1 <= len(raw) <= MAX_NAME:
        raise ValueError(f"snapshot name must be 1..{MAX_NAME} UTF-8 bytes, not {len(raw)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"snapshot name {name!r} contains control characters")
    return name


class SnapshotState:
    """Snapshot table, refcounts and open views of one image (in memory)."""

    def __init__(self):
        self.entries = []  # in id order
        self.refcount = np.zeros(0, dtype=np.uint16)
        self.table_chunks = (0, 0)  # (first, count) of the snapshot table
        self.refcount_chunks = (0, 0)  # (first, count) of the refcount table
        self.views = {}  # snapshot id -> number of open views
        self.views_lock = threading.Lock()  # views close without the image lock
        self.broken = None  # check mode: why the snapshot table is unusable
        self.dropped = []  # check mode: names of damaged entries left out
        self.rewrite = False  # check mode: the revert marker must be cleared

    # ----- layout helpers --------------------------------------------------------
    def find(self, name, path):
        for e in self.entries:
            if e.name == name:
                return e
        raise SnapshotNotFoundError(f"{path}: no snapshot named {name!r}")

    @staticmethod
    def entry_chunks(img, e):
        """(first, count) runs of the chunks that hold an entry's lookup table + vm_state."""
        cs, d = img.chunk_size, img.header.data_offset
        out = [((e.table_offset - d) // cs, -(-4 * img.nchunks // cs))]
        if e.bitmap_offset:
            out.append(((e.bitmap_offset - d) // cs, -(-img.header.bitmap_size // cs)))
        if e.vm_size:
            out.append(((e.vm_offset - d) // cs, -(-e.vm_size // cs)))
        if e.granules_offset:
            out.append(((e.granules_offset - d) // cs, -(-e.granules_size // cs)))
        return out

    def metadata_runs(self, img):
        out = [r for r in (self.table_chunks, self.refcount_chunks) if r[1]]
        for e in self.entries:
            out.extend(self.entry_chunks(img, e))
        return out

    def meta_mask(self, n):
        """Bool array (at least n long) of the chunks holding snapshot metadata."""
        meta = self.metadata_runs(self.img)
        need = max([n] + [a + k for a, k in meta])
        mask = np.zeros(need, dtype=bool)
        for a, k in meta:
            mask[a : a + k] = True
        return mask

    # ----- hooks from Image -----------------------------------------------------------
    def has_snapshots(self) -> bool:
        """True while the image holds a snapshot (fvd.core.hooks.SnapshotHook)."""
        return bool(self.entries)

    def mark_used(self, used):
        img = self.img
        rc = self.refcount
        meta = self.metadata_runs(img)
        need = max([len(rc)] + [a + n for a, n in meta])
        if need > len(used):
            grown = np.zeros(need, dtype=bool)
            grown[: len(used)] = used
            used = grown
        used[: len(rc)] |= rc > 0
        for a, n in meta:
            used[a : a + n] = True
        return used

    def copy_chunk(self, img, v, old, new, offset, length):
        """Copy the bytes of frozen chunk `old` the write does not cover into `new`."""
        cs = img.chunk_size
        vstart = v * cs
        w0 = max(offset, vstart) - vstart
        w1 = min(offset + length, vstart + cs) - vstart
        if w0 == 0 and w1 >= cs:
            return []
        d = img.header.data_offset
        src, dst = d + old * cs, d + new * cs
        lo, hi = (0 if w0 > 0 else w1), (cs if w1 < cs else w0)
        buf = bytearray(hi - lo)
        img.chunk_map.pread_host(src + lo, buf)
        img.chunk_map.pwritev(dst + lo, [buf])
        if not img.writethrough:
            return []
        out = []
        mv = memoryview(buf)
        for a, b in ((0, w0), (w1, cs)):
            if b > a:
                out.append(journal.data_crc_record(dst + a, b - a, zlib.crc32(mv[a - lo : b - lo])))
        return out

    def check(self, img, result, repair):
        _check(self, img, result, repair)


# ----- open --------------------------------------------------------------------------
def attach_snapshots(img):
    """Read the snapshot table and the refcount table (never the snapshots' tables) and
    cross-check every range they name against the file and each other.

    In check mode a damaged table leaves `st.broken` set (no snapshot is usable; repair
    drops them all), a damaged entry is left out and named in `st.dropped` (repair
    removes it), and an invalid revert marker sets `st.rewrite` (repair clears it)."""
    st = SnapshotState()
    st.img = img
    img.snapshot_state = st
    file_size = fileio.file_size(img.fd)
    cs, d = img.chunk_size, img.header.data_offset
    nphys = max(0, -(-(file_size - d) // cs))
    toff, tsize = img.header.snapshot_table_offset, img.header.snapshot_table_size
    roff, rsize = img.header.refcount_table_offset, img.header.refcount_table_size
    fo = fmt.FIELD_OFFSET

    def broken(offset, what):
        img.problem(offset, what + " (repair drops every snapshot)")
        st.broken = what

    if not (
        toff >= d
        and (toff - d) % cs == 0
        and tsize >= TABLE_HEAD.size
        and toff + tsize <= file_size
    ):
        return broken(
            fo["snapshot_table_offset"],
            f"snapshot table [{toff}, {toff + tsize}) is outside the data area "
            f"or the file ({file_size} bytes)",
        )
    if rsize and not (
        roff >= d and (roff - d) % cs == 0 and rsize % 2 == 0 and roff + rsize <= file_size
    ):
        return broken(
            fo["refcount_table_offset"],
            f"refcount table [{roff}, {roff + rsize}) is outside the data area "
            f"or the file ({file_size} bytes)",
        )
    raw = img.read_meta(toff, tsize)
    magic, crc, nb, rc_crc, revert_id, revert_epoch = TABLE_HEAD.unpack_from(raw)
    check = bytearray(raw)
    _S_CRC.pack_into(check, _OFF_CRC, 0)
    if magic != TABLE_MAGIC or zlib.crc32(check) != crc:
        return broken(toff, "snapshot table magic or checksum mismatch")
    if nb != img.header.nb_snapshots:
        return broken(
            fo["nb_snapshots"],
            f"header says {img.header.nb_snapshots} snapshots, the snapshot table holds {nb}",
        )
    table_chunks = ((toff - d) // cs, -(-tsize // cs))
    rc_chunks = ((roff - d) // cs, -(-rsize // cs)) if rsize else (0, 0)
    if rsize and _overlap(table_chunks, rc_chunks):
        return broken(fo["refcount_table_offset"], "refcount table overlaps the snapshot table")
    rc_raw = img.read_meta(roff, rsize) if rsize else b""
    if zlib.crc32(rc_raw) != rc_crc:
        return broken(roff, "refcount table checksum mismatch")
    refcount = np.frombuffer(rc_raw, dtype=REFCOUNT_DTYPE).astype(np.uint16)
    if len(refcount) > nphys and refcount[nphys:].any():
        return broken(roff, "refcount table counts chunks past the end of the file")
    owner = np.zeros(nphys, dtype=bool)  # chunks of snapshot metadata so far
    for first, n in (table_chunks, rc_chunks):
        owner[first : first + n] = True
    entries = _parse_entries(img, st, raw, nb, file_size, owner)
    if entries is None:
        return
    st.entries, st.refcount = entries, refcount
    st.table_chunks, st.refcount_chunks = table_chunks, rc_chunks
    held_meta = np.flatnonzero((refcount[:nphys] > 0) & owner[: len(refcount)])
    if len(held_meta):
        img.problem(
            roff + 2 * int(held_meta[0]),
            f"refcount table counts snapshot metadata chunk {int(held_meta[0])}",
            len(held_meta),
        )
    _apply_revert_marker(img, st, revert_id, revert_epoch)
    _set_frozen(img, st, install=False)


def _overlap(r1, r2):
    return r1[1] and r2[1] and r1[0] < r2[0] + r2[1] and r2[0] < r1[0] + r1[1]


def _parse_entries(img, st, raw, nb, file_size, owner):
    """The entries of a snapshot table, every range bounded by the file and disjoint
    from the other metadata (`owner` marks it); None when the table is unusable."""
    h = img.header
    cs, d = img.chunk_size, h.data_offset
    toff = h.snapshot_table_offset
    pos = TABLE_HEAD.size
    tbytes = 4 * img.nchunks
    names, entries = set(), []

    def broken(offset, what):
        img.problem(offset, what + " (repair drops every snapshot)")
        st.broken = what

    def inside(off, size):
        return off >= d and (off - d) % cs == 0 and off + size <= file_size

    for _ in range(nb):
        where = toff + pos
        if pos + ENTRY.size > len(raw):
            return broken(where, "snapshot table entry overruns the table")
        (sid, created, size, t_off, t_crc, nlen, xsize, vm_off, vm_size, vm_crc, _r2) = (
            ENTRY.unpack_from(raw, pos)
        )
        pos += ENTRY.size
        if xsize % 8 or pos + xsize > len(raw):
            return broken(
                where + _EOFF["extra_size"], f"snapshot extra data size {xsize} out of range"
            )
        bm_off = bm_crc = g_off = g_size = g_crc = 0
        if xsize >= EXTRA_BITMAP.size:
            bm_off, bm_crc, _r3 = EXTRA_BITMAP.unpack_from(raw, pos)
        if xsize >= EXTRA_GRANULES.size and img.header.base_format == fmt.BASE_NONE:
            g_off, g_size, g_crc, _r4 = EXTRA_GRANULES.unpack_from(raw, pos)
        pos += xsize  # extra data past the fields known here is skipped
        if nlen == 0 or pos + nlen > len(raw):
            return broken(where, "snapshot name size out of range")
        name_raw = raw[pos : pos + nlen]
        pos += _pad8(nlen)
        problem = None
        try:
            name = name_raw.decode("utf-8")
        except UnicodeDecodeError:
            name, problem = repr(name_raw), (where, "snapshot name is not UTF-8")
        if img.header.base_format == fmt.BASE_NONE:
            bm_off = bm_crc = 0  # no base: a bitmap copy means nothing
        runs = [(t_off, tbytes, where + _EOFF["table_offset"], "lookup table")]
        if img.header.base_format != fmt.BASE_NONE:
            runs.append((bm_off, img.header.bitmap_size, where + _EOFF["extra"], "bitmap"))
        if vm_size:
            runs.append((vm_off, vm_size, where + _EOFF["vm_state_offset"], "vm_state"))
        if problem is None and (
            name in names or sid >= img.header.next_snapshot_id or any(sid == e.id for e in entries)
        ):
            problem = (where, f"snapshot {name!r}: duplicate name or id {sid} out of range")
        if problem is None and size != img.size:
            problem = (where + 16, f"snapshot {name!r}: size {size} differs from the image")
        for off, n, field, what in runs:
            if problem is None and not inside(off, n):
                problem = (
                    field,
                    f"snapshot {name!r}: {what} at {off} is outside the data "
                    f"area or the file ({file_size} bytes)",
                )
            elif problem is None:
                first, count = (off - d) // cs, -(-n // cs)
                if owner[first : first + count].any():
                    problem = (
                        field,
                        f"snapshot {name!r}: {what} at {off} overlaps other snapshot metadata",
                    )
        if problem is not None:
            img.problem(problem[0], problem[1] + " (repair deletes the snapshot)")
            st.dropped.append(name)
            continue
        for off, n, _, _ in runs:
            owner[(off - d) // cs : (off - d) // cs + -(-n // cs)] = True
        names.add(name)
        e = _Entry(sid, created, size, t_off, t_crc, name, vm_off, vm_size, vm_crc, bm_off, bm_crc)
        if g_off:
            # the granule record is optional: one that does not fit is left unused (and
            # unowned), for check() to report and repair to drop; the snapshot stays
            first, count = (g_off - d) // cs, -(-g_size // cs)
            if not (inside(g_off, g_size) and g_size >= fr.PartialMapHead.sizeof()):
                e.granules_bad = (
                    where + _EOFF["extra"],
                    f"snapshot {name!r}: granule record [{g_off}, {g_off + g_size}) is "
                    f"outside the data area or the file ({file_size} bytes)",
                )
            elif owner[first : first + count].any():
                e.granules_bad = (
                    where + _EOFF["extra"],
                    f"snapshot {name!r}: granule record at {g_off} overlaps other "
                    f"snapshot metadata",
                )
            else:
                owner[first : first + count] = True
                e.granules_offset, e.granules_size, e.granules_crc = g_off, g_size, g_crc
        entries.append(e)
    return entries


def _apply_revert_marker(img, st, revert_id, revert_epoch):
    """docs/format.md section 8: a marker holds at exactly the epoch it was written in;
    an older one was voided by the checkpoint after it, a newer one cannot exist."""
    h = img.header
    if not revert_id:
        return
    where = h.snapshot_table_offset + 16
    if revert_epoch > h.journal_epoch:
        img.problem(
            where,
            f"revert marker for epoch {revert_epoch} is newer than the "
            f"journal epoch {h.journal_epoch} (repair clears it)",
        )
        st.rewrite = True
        return
    if revert_epoch != img.header.journal_epoch:
        return
    # A revert committed but not yet checkpointed: the front is that snapshot's table.
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
    if img.partial is not None:
        img.partial.clear()  # the old front's partial chunks went with it
        if record is not None:  # ... and the snapshot's are the front's now
            img.partial.load_record(*record)
    if bits is not None:  # ... and its bitmap is the front's bitmap
        img.bitmap.fresh[:] = bits
        img.bitmap.stale[:] = bits


def _set_frozen(img, st, install=True):
    n = max(len(st.refcount), len(img.frozen), 1024)
    frozen = np.zeros(n, dtype=np.uint8)
    frozen[: len(st.refcount)] = st.refcount > 0
    img.frozen = frozen
    if install:
        img.chunk_map.set_frozen(frozen)


def read_snapshot_table(img, e):
    """The snapshot's lookup table, checksum and entries validated (CorruptImageError)."""
    return _read_snapshot_table(img, e)[0]


def _read_snapshot_table(img, e):
    """read_snapshot_table, plus the held_mask (mask, count) of the validated table."""
    if sparse_table.is_sparse(img.header):  # only its data runs are read
        table, crc = tablestore.load(img, e.table_offset, img.nchunks, True)
    else:
        raw = img.read_meta(e.table_offset, 4 * img.nchunks)
        table, crc = sparse_table.decode(raw, False), zlib.crc32(raw)
    if crc != e.table_crc:
        raise CorruptImageError(
            img.path, e.table_offset, f"snapshot {e.name!r}: lookup table checksum mismatch"
        )
    d, cs = img.header.data_offset, img.chunk_size
    nphys = max(0, -(-(fileio.file_size(img.fd) - d) // cs))
    ok = _held_ok(img, table, nphys)
    if ok is not None:
        return table, ok[0], ok[1]
    problems = lookup_table_problems(img, e, table)
    if problems:
        raise CorruptImageError(img.path, problems[0][0], problems[0][1])
    raise AssertionError("lookup table check disagrees with itself")  # pragma: no cover


def lookup_table_problems(img, e, table):
    """[(offset, what, count)] of a snapshot's lookup table: entries past the end of the
    file, into snapshot metadata, or mapping one chunk twice."""
    st = img.snapshot_state
    d, cs = img.header.data_offset, img.chunk_size
    nphys = max(0, -(-(fileio.file_size(img.fd) - d) // cs))
    if _held_ok(img, table, nphys) is not None:
        return []
    out = []
    alloc = np.flatnonzero(table < fmt.ZERO_CHUNK)
    held = table[alloc]
    past = alloc[held >= nphys]
    if len(past):
        v = int(past[0])
        out.append(
            (
                e.table_offset + 4 * v,
                f"snapshot {e.name!r}: entry {int(table[v])} of "
                f"chunk {v} points past the end of the file",
                len(past),
            )
        )
    ok = alloc[held < nphys]
    meta = st.meta_mask(nphys) if st is not None else np.zeros(0, dtype=bool)
    inmeta = ok[meta[table[ok]]] if len(meta) else ok[:0]
    if len(inmeta):
        v = int(inmeta[0])
        out.append(
            (
                e.table_offset + 4 * v,
                f"snapshot {e.name!r}: entry {int(table[v])} of "
                f"chunk {v} points into snapshot metadata",
                len(inmeta),
            )
        )
    vals = np.sort(table[ok])
    ndup = int(np.count_nonzero(vals[1:] == vals[:-1]))
    if ndup:
        out.append(
            (
                e.table_offset,
                f"snapshot {e.name!r} maps one physical chunk from several virtual chunks",
                ndup,
            )
        )
    return out


def _held_ok(img, table, nphys):
    """(mask, count) of the chunk map's held_mask (1 at each physical chunk the table
    maps) when lookup_table_problems finds nothing: every entry inside the file, none in
    snapshot metadata, no chunk mapped twice. Else None."""
    mask, count = img.impl.held_mask(table, nphys, nphys)
    if mask is None:
        return None  # an entry points past the end of the file
    if int(np.count_nonzero(mask)) != count:
        return None  # a chunk mapped twice
    st = img.snapshot_state
    if st is not None and count:
        meta = st.meta_mask(nphys)
        if np.logical_and(mask, meta[:nphys]).any():
            return None
    return mask, count


def read_snapshot_bitmap(img, e):
    """The snapshot's copy of the base bitmap (uint8 array, bitmap_size bytes)."""
    raw = img.read_meta(e.bitmap_offset, img.header.bitmap_size)
    if zlib.crc32(raw) != e.bitmap_crc:
        raise CorruptImageError(
            img.path, e.bitmap_offset, f"snapshot {e.name!r}: bitmap checksum mismatch"
        )
    return np.frombuffer(raw, dtype=np.uint8).copy()


def granule_record(fd, path, e, table, chunk_size, granule, data_offset, provenance=False):
    """The snapshot's granule record as (chunks, sources, rows) (fvd.features.granular
    .decode_map), read through `fd`, its crc checked and its entries matched against the
    snapshot's lookup table `table`; None when the snapshot has none. CorruptImageError
    naming the offset otherwise. With `provenance`, a 4th item: decode_provenance's
    (origins, carried rows), or None."""
    if e.granules_bad:
        raise CorruptImageError(path, *e.granules_bad)
    if not e.granules_offset:
        return None
    raw = os.pread(fd, e.granules_size, e.granules_offset)
    if len(raw) != e.granules_size or zlib.crc32(raw) != e.granules_crc:
        raise CorruptImageError(
            path,
            e.granules_offset,
            f"snapshot {e.name!r}: granule record checksum mismatch or truncated",
        )
    off = e.granules_offset
    try:
        chunks, sources, rows = decode_map(raw, len(table), chunk_size, granule, path, off)
        nphys = max(0, -(-(fileio.file_size(fd) - data_offset) // chunk_size))
        check_record_table(chunks, sources, rows, table, path, off, nphys)
        prov = decode_provenance(raw, len(chunks), chunk_size, granule, path, off)
    except CorruptImageError as err:  # name the snapshot
        what = f"snapshot {e.name!r}: granule record: {err.what}"
        raise CorruptImageError(path, err.offset, what) from None
    if provenance:
        return chunks, sources, rows, prov
    return chunks, sources, rows


def snapshot_record(img, e, table):
    """granule_record of an open image's snapshot (None without one), counted in stats."""
    if not (e.granules_offset or e.granules_bad):
        return None
    granule = img.header.granule_size or fmt.DEFAULT_GRANULE
    d = img.header.data_offset
    rec = granule_record(img.fd, img.path, e, table, img.chunk_size, granule, d)
    img.stats.metadata_reads += 1
    img.stats.metadata_bytes_read += e.granules_size
    return rec


def _needs_base(img, bits):
    """True when a bitmap has a clear bit below the end of the base (min(base, size))."""
    bend = min(img.header.base_size, img.size)
    nb = -(-bend // img.block_size)
    return bool(nb) and not get_bits(bits, 0, nb).all()


def snapshots_need_base(img):
    """True when some snapshot still reads blocks from the base (prefetch must then keep
    the base attached). Reads each snapshot's bitmap (one read each)."""
    st = img.snapshot_state
    if st is None or img.bitmap is None:
        return False
    return any(_needs_base(img, read_snapshot_bitmap(img, e)) for e in st.entries)


def _state(img):
    img.check_open()
    if img.snapshot_state is None:
        st = SnapshotState()
        st.img = img
        img.snapshot_state = st
    return img.snapshot_state


def _writable_state(img):
    img.check_writable()
    return _state(img)


# ----- commit ------------------------------------------------------------------------
def _commit(img, st, entries, refcount, extra=(), revert=(0, 0), refcount_chunks=None):
    """Write a new snapshot table (+ refcount table unless reused) and extra chunk contents
    to fresh contiguous chunks, sync, then commit with one header write + sync.

    `extra` is a list of (nbytes, buffer-or-None) regions appended in order (each rounded up
    to whole chunks); returns the host offsets of the extra regions. Old table chunks are
    released once the header no longer points at them."""
    cs, d = img.chunk_size, img.header.data_offset
    rc_raw = refcount.astype(REFCOUNT_DTYPE, copy=False).tobytes() if len(entries) else b""
    rc_crc = zlib.crc32(rc_raw)
    # entries need the offsets of the extra regions: allocate first, encode after
    sizes = []
    if entries:
        tsize = TABLE_HEAD.size + sum(entry_size(e) for e in entries)
        sizes.append(tsize)
        if refcount_chunks is None:
            sizes.append(len(rc_raw))
    sizes.extend(n for n, _ in extra)
    nch = [-(-n // cs) for n in sizes]
    first = img.allocator.allocate_run(sum(nch)) if sum(nch) else 0
    img.grow_frozen(first + sum(nch))
    offs, p = [], first
    for k in nch:
        offs.append(d + p * cs)
        p += k
    extra_offs = offs[len(offs) - len(extra) :] if extra else []
    return first, nch, offs, extra_offs, rc_raw, rc_crc


def _write_and_commit(img, st, entries, refcount, layout, extra, revert, refcount_chunks):
    first, nch, offs, extra_offs, rc_raw, rc_crc = layout
    cs, d = img.chunk_size, img.header.data_offset
    old_runs = [r for r in (st.table_chunks, st.refcount_chunks) if r[1]]
    h = {}
    if entries:
        table = encode_table(entries, rc_crc, *revert)
        bufs = [(offs[0], table)]
        new_table_chunks = (first, nch[0])
        if refcount_chunks is None:
            if rc_raw:
                bufs.append((offs[1], rc_raw))
            new_rc_chunks = (first + nch[0], nch[1]) if rc_raw else (0, 0)
            roff = offs[1] if rc_raw else 0
        else:
            new_rc_chunks = refcount_chunks
            roff = d + refcount_chunks[0] * cs if refcount_chunks[1] else 0
            old_runs = [r for r in old_runs if r != refcount_chunks]
        bufs += _extra_bufs(img, extra_offs, extra)
        _write_runs(img, bufs)
        h.update(
            snapshot_table_offset=offs[0],
            snapshot_table_size=len(table),
            nb_snapshots=len(entries),
            refcount_table_offset=roff,
            refcount_table_size=len(rc_raw),
            incompatible_features=_pairs_bit(
                img.header.incompatible_features | fmt.INCOMPAT_SNAPSHOTS, entries
            ),
        )
    else:
        new_table_chunks = new_rc_chunks = (0, 0)
        h.update(
            snapshot_table_offset=0,
            snapshot_table_size=0,
            nb_snapshots=0,
            refcount_table_offset=0,
            refcount_table_size=0,
            incompatible_features=img.header.incompatible_features
            & ~(fmt.INCOMPAT_SNAPSHOTS | fmt.INCOMPAT_SNAPSHOT_PARTIAL | fmt.INCOMPAT_PROVENANCE),
        )
    img.sync()
    return h, new_table_chunks, new_rc_chunks, old_runs


def _pairs_bit(features, entries):
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


class _Pieces(list):
    """(offset, bytes) runs of an extra region whose other bytes are zeros."""


def _extra_bufs(img, offs, extra):
    """(host offset, bytes) writes of the extra regions; a _Pieces region is zeroed
    first (a tail chunk given back may hold bytes), then only its pieces written."""
    bufs = []
    for o, (n, b) in zip(offs, extra):
        if isinstance(b, _Pieces):
            fileio.punch_hole(img.fd, o, n)
            fileio.extend_to(img.fd, o + n)  # the region's zeros may be a hole to its end
            bufs += [(o + rel, piece) for rel, piece in b]
        elif b is not None and n:
            bufs.append((o, b))
    return bufs


def _write_runs(img, bufs):
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
        total = sum(len(b) for b in group)
        done = 0
        while done < total:
            views = _skip(group, done)
            done += os.pwritev(img.fd, views, off + done)
        img.stats.metadata_writes += 1
        img.stats.metadata_bytes_written += total
        i = j


def _skip(bufs, n):
    out = []
    for b in bufs:
        mv = memoryview(b).cast("B")
        if n >= len(mv):
            n -= len(mv)
            continue
        out.append(mv[n:])
        n = 0
    return out


def _trim_tail(img):
    """Give free chunks at the end of the data area back to the file system."""
    alloc = img.allocator
    alloc.reclaim()
    if alloc.pending or alloc.retired:
        return  # (a retired chunk may still be read: cut the tail later)
    last = _in_use_end(img, alloc.end)
    if last >= alloc.end:
        return
    alloc.free = [i for i in alloc.free if i < last]
    heapq.heapify(alloc.free)
    alloc.end = last
    end = img.header.data_offset + last * img.chunk_size
    fileio.truncate_tail(img.fd, end)


def _in_use_end(img, end):
    """1 + the last chunk in use, as from img.in_use() (0: none), or some value >= end
    once that is known: the front's table is scanned only when the snapshot metadata,
    the refcounts and the partial chunks end before `end` (no whole-table bincount)."""
    last = 0
    st = img.snapshot_state
    if st is not None:  # as SnapshotState.mark_used: metadata runs, refcount > 0
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


def _flush_tables(img):
    """Step 1 of create and delete (docs/format.md, "Atomic commit order"): pending table
    records (writeback) are journaled and synced now, so the front's durable table is the
    in-memory one. Without any it already is, and the sync of the new metadata before
    the commit header (step 4 / 3) makes the data written since durable: one fdatasync
    fewer, same order."""
    if img.metadata_pending:
        img.flush()
    else:
        img.check_open()


def _release_runs(img, run_list):
    idx = []
    for a, n in run_list:
        idx.extend(range(a, a + n))
    if idx:
        img.allocator.release_now(idx)


# ----- operations ---------------------------------------------------------------------
def create_snapshot(img: Any, name: str, vm_state: bytes = b"") -> SnapshotInfo:
    """A read-only snapshot of the current contents; returns its SnapshotInfo.

    With a base image the snapshot also gets a copy of the durable (stale) bitmap. The
    image lock is held throughout, so a prefetch or copy-on-read store in another thread
    cannot change the table or the bitmap between the flush and the copy."""
    st = _writable_state(img)
    with img.lock:
        img.check_open()
        _freeze_front(img)
        try:
            return _create(img, st, name, vm_state)
        except BaseException:
            _set_frozen(img, st)  # the old refcounts (or the committed ones)
            raise


def _front_held(img, n):
    """held_mask of the front's table, plus the sources of its partial chunks (a snapshot
    holds those too). The table maps allocated chunks only, all below the allocator's
    end: with that cap the mask is built in one pass (two if it is not so). A source is
    never mapped by the table, so each held chunk counts once."""
    mask, count = img.impl.held_mask(img.table, n, img.allocator.end)
    if mask is None:
        mask, count = img.impl.held_mask(img.table, n)
    return _add_sources(mask, count, img.partial.sources() if img.partial is not None else ())


def _add_sources(mask, count, sources):
    """mask (uint8 per physical chunk) with the partial chunks' sources added."""
    if len(sources) == 0:
        return mask, count
    need = int(np.max(sources)) + 1
    if need > len(mask):
        grown = np.zeros(need, dtype=mask.dtype)
        grown[: len(mask)] = mask
        mask = grown
    mask[np.asarray(sources, dtype=np.int64)] += 1
    return mask, count + len(sources)


def _freeze_front(img):
    """Point in time: every chunk the front maps is frozen, then the fast-path writes
    that saw one unfrozen are waited for. From here on a write to the front copies (slow
    path, behind the image lock), so the snapshot's chunks hold what was acknowledged
    before the snapshot began (or during it, never after it returned)."""
    mask, _ = _front_held(img, 0)
    n = max(len(img.frozen), len(mask), 1024)
    frozen = np.zeros(n, dtype=np.uint8)
    frozen[: len(img.frozen)] = img.frozen
    frozen[: len(mask)] |= mask
    img.frozen = frozen
    img.chunk_map.set_frozen(frozen)
    img.allocator.quiesce(time.sleep)


def _undo_commit(img, saved_header, layout):
    """A snapshot commit failed before its header was written: forget its chunks."""
    img.header = saved_header
    first, nch = layout[0], layout[1]
    img.abandon_chunks(list(range(first, first + sum(nch))))


def _create(img, st, name, vm_state):
    check_name(name)
    if any(e.name == name for e in st.entries):
        raise ValueError(f"{img.path}: a snapshot named {name!r} already exists")
    vm = memoryview(vm_state).cast("B")
    _flush_tables(img)
    # the snapshot holds the front's partial chunks as they are: its granule record
    # names each one's source and written granules (nothing is copied)
    granules = b""
    if img.partial is not None and img.partial.active:
        granules = img.partial.encode(provenance=True)
    table = img.table
    mask, nheld = _front_held(img, len(st.refcount))
    rc = np.zeros(len(mask), dtype=np.uint32)
    rc[: len(st.refcount)] = st.refcount
    # the front never maps one physical chunk twice, so each held chunk gains exactly 1
    rc += mask
    # only held chunks gained: any count past the maximum is one of theirs
    if nheld and int(rc.max()) > REFCOUNT_MAX:
        bad = int(np.argmax(rc))
        raise RefcountOverflowError(
            f"{img.path}: chunk {bad} is already held by "
            f"{REFCOUNT_MAX} snapshots; delete some snapshots first"
        )
    refcount = rc.astype(np.uint16)
    if sparse_table.is_sparse(img.header):
        # only the non-zero units: the fresh chunks read as zeros (docs/format.md)
        tpieces, tcrc = tablestore.pieces(table)
        tstored = (4 * len(table), _Pieces(tpieces))
    else:
        tbytes = table.astype(TABLE_DTYPE, copy=False).tobytes()  # one copy, not two
        tstored, tcrc = (len(tbytes), tbytes), zlib.crc32(tbytes)
    entry = _Entry(
        img.header.next_snapshot_id,
        time.time_ns(),
        img.size,
        0,
        tcrc,
        name,
        0,
        len(vm),
        zlib.crc32(vm) if len(vm) else 0,
    )
    entries = st.entries + [entry]
    extra = [tstored]
    if img.bitmap is not None:
        # the bits that are durable now (flush above): soft bits name data that is also
        # in the base, so the snapshot reads those blocks from the base
        bits = img.bitmap.stale.tobytes()
        entry.bitmap_crc = zlib.crc32(bits)
        extra.append((len(bits), bits))
    if granules:
        entry.granules_size, entry.granules_crc = len(granules), zlib.crc32(granules)
        entry.granules_provenance = granules[12] & 1 == 1  # head flags: provenance
        extra.append((len(granules), granules))
    extra.append((len(vm), vm))
    saved = img.header
    layout = _commit(img, st, entries, refcount, extra)
    offs = iter(layout[3])
    entry.table_offset = next(offs)
    if img.bitmap is not None:
        entry.bitmap_offset = next(offs)
    if granules:
        entry.granules_offset = next(offs)
    entry.vm_offset = next(offs) if len(vm) else 0
    try:
        h, tch, rch, old = _write_and_commit(
            img, st, entries, refcount, layout, extra, (0, 0), None
        )
        img.write_header(next_snapshot_id=entry.id + 1, **h)
    except BaseException:
        _undo_commit(img, saved, layout)
        raise
    # The header is written: from here on memory follows it, even if the sync fails
    # (then the old metadata chunks are kept: a leak at most, never a reuse).
    st.entries, st.refcount = entries, refcount
    st.table_chunks, st.refcount_chunks = tch, rch
    img.stats.refcount_updates += nheld
    _set_frozen(img, st)
    img.sync()  # commit point
    _release_runs(img, old)
    _trim_tail(img)
    return entry.info(img.header)


def list_snapshots(img: Any) -> list[SnapshotInfo]:
    img.check_open()
    st = img.snapshot_state
    return [e.info(img.header) for e in st.entries] if st is not None else []


def delete_snapshot(img, name):
    """Drop a snapshot; chunks nothing else holds become free (reused before growing)."""
    st = _writable_state(img)
    with img.lock:
        img.check_open()
        _delete(img, st, name)


def _delete(img, st, name):
    e = st.find(name, img.path)
    if st.views.get(e.id):
        raise SnapshotBusyError(
            f"{img.path}: snapshot {name!r} is open (open_snapshot); "
            f"close its views before deleting it"
        )
    _flush_tables(img)  # the durable front table is the in-memory one
    stable, mask, nheld = _read_snapshot_table(img, e)
    rec = snapshot_record(img, e, stable)
    if rec is not None:  # the sources of its partial chunks are held too
        mask, nheld = _add_sources(mask, nheld, rec[1])
    # mask: 1 at each chunk the snapshot holds (validated: no chunk twice)
    if mask[len(st.refcount) :].any():
        raise CorruptImageError(
            img.path, e.table_offset, f"snapshot {name!r} holds chunks past the refcount table"
        )
    rc = st.refcount.astype(np.int32)
    held = np.zeros(len(rc), dtype=np.int32)
    held[: len(mask)] = mask[: len(rc)]
    if nheld and np.logical_and(held, rc == 0).any():
        raise CorruptImageError(
            img.path,
            img.header.refcount_table_offset,
            f"snapshot {name!r} holds chunks whose refcount is 0 (run check -r all)",
        )
    rc -= held
    entries = [x for x in st.entries if x is not e]
    dropped = np.flatnonzero(np.logical_and(held, rc == 0))
    freed = dropped
    if len(dropped):  # the front's usage matters only for chunks no snapshot holds now
        front = front_usage(img.table, len(rc))
        if img.partial is not None:  # a partial chunk's source stays (fvd.granular)
            sources = img.partial.sources()
            front[sources[sources < len(front)]] += 1
        freed = dropped[front[dropped] == 0]
    # trim the refcount table past its last nonzero entry
    if len(rc) and rc[-1]:
        refcount = rc.astype(np.uint16)  # nothing to trim (no scan for the last count)
    else:
        nz = np.flatnonzero(rc)
        refcount = rc[: int(nz[-1]) + 1 if len(nz) else 0].astype(np.uint16)
    saved = img.header
    layout = _commit(img, st, entries, refcount)
    try:
        h, tch, rch, old = _write_and_commit(img, st, entries, refcount, layout, [], (0, 0), None)
        img.write_header(**h)
    except BaseException:
        _undo_commit(img, saved, layout)
        raise
    old = old + st.entry_chunks(img, e)
    st.entries, st.refcount = entries, refcount  # memory follows the written header
    st.table_chunks, st.refcount_chunks = tch, rch
    img.stats.refcount_updates += nheld
    _set_frozen(img, st)
    img.sync()  # commit point
    _release_runs(img, old)
    if len(freed):
        img.allocator.release_now(int(i) for i in np.unique(freed))
    _trim_tail(img)


def revert_to_snapshot(img, name):
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


def _revert(img, st, name):
    e = st.find(name, img.path)
    img.flush()
    new_table = read_snapshot_table(img, e)
    record = snapshot_record(img, e, new_table)
    new_bits = read_snapshot_bitmap(img, e) if img.bitmap is not None else None
    if new_bits is not None and img.base_layer is None and _needs_base(img, new_bits):
        raise CorruptImageError(
            img.path,
            e.bitmap_offset,
            f"snapshot {name!r} reads the base image, but the image is marked prefetched",
        )
    old_table = img.table.copy()
    img.dirty_since_checkpoint = True
    img.checkpoint(clean=False)  # journal empty at the current epoch
    epoch = img.header.journal_epoch
    saved = img.header
    layout = _commit(img, st, st.entries, st.refcount, refcount_chunks=st.refcount_chunks)
    try:
        h, tch, _, old = _write_and_commit(
            img, st, st.entries, st.refcount, layout, [], (e.id, epoch), st.refcount_chunks
        )
        img.write_header(**h)
    except BaseException:
        _undo_commit(img, saved, layout)
        raise
    st.table_chunks = tch  # memory follows the written header
    img.sync()  # commit point
    old_sources = np.zeros(0, dtype=np.int64)
    temps = []
    if img.partial is not None:  # the old front's partial chunks go with it
        old_sources, temps = img.partial.detach(img)
        if record is not None:
            new_table = img.partial.complete_record(img, new_table, record)
    _swap_front(img, new_table, new_bits)
    img.dirty_since_checkpoint = True
    img.checkpoint(clean=False)  # table in place, epoch E+1
    _release_runs(img, old)
    # chunks only the old front used (not frozen: every entry of new_table is frozen)
    mask = old_table < fmt.ZERO_CHUNK
    cand = np.concatenate(
        [old_table[mask].astype(np.int64), old_sources, np.asarray(temps, dtype=np.int64)]
    )
    fz = img.frozen
    cand = cand[(cand >= len(fz)) | (fz[np.minimum(cand, len(fz) - 1)] == 0)]
    if len(cand):
        img.allocator.release_now(int(i) for i in cand)
    _trim_tail(img)


def _swap_front(img, new_table, new_bits):
    """Install the reverted table and bitmap, in place (the chunk map views them), in an
    order lock-free readers can follow: a reader pairs a bit (base or image) with a table
    entry, so bits leaving go first (those blocks read the base, which the new front
    reads too), then the table, then the bits arriving, each step after the readers that
    saw the previous state have finished (a grace period of the chunk map)."""
    bm = img.bitmap
    if new_bits is not None:
        np.bitwise_and(bm.fresh, new_bits, out=bm.fresh)
        np.bitwise_and(bm.stale, new_bits, out=bm.stale)
        img.allocator.quiesce(time.sleep)  # no reader still acts on a cleared bit
    img.table[:] = new_table
    if new_bits is not None:
        img.allocator.quiesce(time.sleep)  # no reader still holds an old entry
        bm.fresh[:] = new_bits
        bm.stale[:] = new_bits


def read_vm_state(img: Any, name: str) -> bytes:
    st = _state(img)
    with img.lock:  # a concurrent delete may not free the chunks meanwhile
        return _read_vm_state(img, st, name)


def _read_vm_state(img, st, name):
    img.check_open()
    e = st.find(name, img.path)
    if not e.vm_size:
        return b""
    data = img.read_meta(e.vm_offset, e.vm_size)
    if zlib.crc32(data) != e.vm_crc:
        raise CorruptImageError(
            img.path, e.vm_offset, f"snapshot {name!r}: vm_state checksum mismatch"
        )
    return data


# ----- read-only views ------------------------------------------------------------------
class SnapshotView:
    """A read-only view of one snapshot, with its own read-only file descriptor.

    With a base image: blocks whose bit is clear in the snapshot's bitmap (below the end
    of the base) read from the base, through the view's own read-only open of it (so the
    view outlives the image handle's base layer); the rest as for the front."""

    read_only = True
    base_layer: Optional[BaseHook] = None
    partial: Optional[PartialHook] = None
    bitmap: Any = None

    def __init__(self, img: Any, entry: Any) -> None:
        self.path = img.path
        self.name = entry.name
        self.size = img.size
        self.chunk_size = img.chunk_size
        self.block_size = img.block_size
        # what the view's readers use: the data area and the table encoding (base_size
        # once a base is attached); the image's header facts for changed extents
        self.header = fmt.ImageHeader(
            data_offset=img.header.data_offset,
            incompatible_features=img.header.incompatible_features,
        )
        self.facts = img.header
        self.closed: bool = True
        self.state = img.snapshot_state
        self.snapshot_id = entry.id
        self.stats = img.impl.Stats()
        self.fd = os.open(img.path, os.O_RDONLY)
        try:
            raw = os.pread(self.fd, 4 * img.nchunks, entry.table_offset)
            self.stats.metadata_reads += 1
            self.stats.metadata_bytes_read += len(raw)
            if len(raw) != 4 * img.nchunks or zlib.crc32(raw) != entry.table_crc:
                raise CorruptImageError(
                    img.path,
                    entry.table_offset,
                    f"snapshot {entry.name!r}: lookup table checksum mismatch or truncated",
                )
            self.table = sparse_table.decode(raw, sparse_table.is_sparse(img.header))
            problems = lookup_table_problems(img, entry, self.table)
            if problems:
                raise CorruptImageError(img.path, problems[0][0], problems[0][1])
            self.chunk_map = img.impl.ChunkMap(
                self.fd,
                self.table,
                np.ones(0, dtype=np.uint8),
                self.chunk_size,
                self.header.data_offset,
                self.size,
                self.stats,
            )
            self.chunk_map.error = img.io_error
            if img.bitmap is not None:
                self._attach_base(img, entry)
            self._attach_partial(img, entry)
        except BaseException:
            if self.base_layer is not None:
                self.base_layer.close()
            os.close(self.fd)
            raise
        with self.state.views_lock:
            self.state.views[self.snapshot_id] = self.state.views.get(self.snapshot_id, 0) + 1
        self.closed = False

    def _attach_partial(self, img, entry):
        """The snapshot's partial chunks (its granule record): reads split by their bits
        on the fast path, as the front's do."""
        if not (entry.granules_offset or entry.granules_bad):
            return
        granule = img.header.granule_size or fmt.DEFAULT_GRANULE
        chunks, sources, rows = granule_record(
            self.fd,
            img.path,
            entry,
            self.table,
            self.chunk_size,
            granule,
            self.header.data_offset,
        )
        self.stats.metadata_reads += 1
        self.stats.metadata_bytes_read += entry.granules_size
        ps = PartialState(img.nchunks, self.chunk_size, self.size, granule)
        ps.install(self.chunk_map)
        ps.load_record(chunks, sources, rows)
        self.partial = ps

    def _attach_base(self, img, entry):

        h = img.header
        raw = os.pread(self.fd, h.bitmap_size, entry.bitmap_offset)
        self.stats.metadata_reads += 1
        self.stats.metadata_bytes_read += len(raw)
        if len(raw) != h.bitmap_size or zlib.crc32(raw) != entry.bitmap_crc:
            raise CorruptImageError(
                img.path,
                entry.bitmap_offset,
                f"snapshot {entry.name!r}: bitmap checksum mismatch or truncated",
            )
        bits = np.frombuffer(raw, dtype=np.uint8)
        if not _needs_base(img, bits):
            return  # every block is in the image: no base needed
        self.bitmap = Bitmap(raw, -(-img.header.base_size // self.block_size), 0)
        self.header = self.header.replace(base_size=img.header.base_size)
        path = img.base_path
        backend = _open_backend(
            img.path,
            path,
            img.header.base_format,
            (os.path.realpath(img.path),),
            img.backing_policy,
        )
        if backend.size != img.header.base_size:
            backend.close()

            raise BaseImageError(
                f"{path}: base image size changed from {img.header.base_size} "
                f"to {backend.size} bytes"
            )
        self.base_layer = BaseLayer(self, backend, path, False)
        self.base_layer.attach_map()

    def check_open(self):
        if self.closed:
            raise ValueError(f"{self.path}: I/O on a closed snapshot view")

    def readinto(self, offset: int, buffer: Any) -> int:
        self.check_open()
        if self.base_layer is not None and not self.base_layer.fast_read:
            return self.base_layer.readinto(offset, buffer)
        return self.chunk_map.readinto(offset, buffer)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: Any) -> int:
        raise ReadOnlyImageError(self.path)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.chunk_map.closed = True
        drain_map(self.chunk_map)  # reads already inside finish on the open fd
        if self.base_layer is not None:
            self.base_layer.close()
            self.base_layer = None
        os.close(self.fd)
        with self.state.views_lock:
            left = self.state.views.get(self.snapshot_id, 1) - 1
            if left:
                self.state.views[self.snapshot_id] = left
            else:
                self.state.views.pop(self.snapshot_id, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"<fvd snapshot view {self.path!r} {self.name!r}>"


def open_snapshot(img, name):
    st = _state(img)
    with img.lock:  # no delete between finding the entry and counting the view
        img.check_open()
        return SnapshotView(img, st.find(name, img.path))


def store_refcounts(img, st, refcount):
    """Commit a new refcount table (and snapshot table) copy-on-write; repair helper."""
    layout = _commit(img, st, st.entries, refcount)
    h, tch, rch, old = _write_and_commit(img, st, st.entries, refcount, layout, [], (0, 0), None)
    img.write_header(**h)
    img.sync()  # commit point
    st.refcount, st.table_chunks, st.refcount_chunks = refcount, tch, rch
    _set_frozen(img, st)
    _release_runs(img, old)


# ----- check -------------------------------------------------------------------------------
def _check_snapshot_bitmap(img, e, table, result):
    """The snapshot's bitmap copy: checksum, and no bit set in a chunk its table leaves
    unallocated (the view would read zeros there instead of the base). Returns True when
    clean; repair deletes the snapshot otherwise (it is read-only)."""

    try:
        bits = read_snapshot_bitmap(img, e)
    except CorruptImageError as err:
        result.corruptions += 1
        result.messages.append(f"ERROR {err}")
        return False
    nblocks = -(-img.header.base_size // img.block_size)
    bad = marked_unallocated(bits, nblocks, table, img.chunk_size, img.block_size)
    for v in bad.tolist()[:10]:
        result.messages.append(
            f"ERROR snapshot {e.name!r}: bitmap marks blocks of "
            f"unallocated chunk {v} as in the image"
        )
    result.corruptions += len(bad)
    return not len(bad)


def _check(st, img, result, repair):
    """Recompute refcounts from every snapshot table; find leaks and double use.

    With repair, damaged snapshots are deleted (reported as lost), the refcount table is
    rewritten from what the remaining snapshots hold, and an invalid revert marker is
    cleared; all in one copy-on-write commit."""
    d, cs = img.header.data_offset, img.chunk_size
    lost = list(st.dropped)
    if st.broken:
        result.messages.append(f"ERROR snapshot metadata unusable ({st.broken})")
    nfile = -(-(fileio.file_size(img.fd) - d) // cs)  # tables are bounded by the file
    nphys = max(len(st.refcount), img.allocator.end, nfile, 1)
    owner = np.zeros(nphys, dtype=np.int8)  # 1 = snapshot metadata
    for a, n in st.metadata_runs(img):
        owner[a : a + n] = 1  # disjoint and inside the file: checked at open
    counted = np.zeros(len(owner), dtype=np.int64)
    keep = []
    for e in st.entries:
        try:
            t = read_snapshot_table(img, e)
        except CorruptImageError as err:
            t = None
            if err.what.endswith("checksum mismatch"):
                problems = [(err.offset, err.what, 1)]
            else:
                raw = sparse_table.decode(
                    img.read_meta(e.table_offset, 4 * img.nchunks),
                    sparse_table.is_sparse(img.header),
                )
                problems = lookup_table_problems(img, e, raw)
            for off, what, n in problems:
                result.corruptions += n
                result.messages.append(f"ERROR at offset {off}: {what}")
        if t is not None and e.bitmap_offset and not _check_snapshot_bitmap(img, e, t, result):
            t = None
        if t is None:
            lost.append(e.name)
            continue
        try:
            record = snapshot_record(img, e, t)
        except CorruptImageError as err:
            # the snapshot's partial chunks cannot be read without it
            result.corruptions += 1
            result.messages.append(f"ERROR {err}")
            lost.append(e.name)
            continue
        keep.append(e)
        held = t[t < fmt.ZERO_CHUNK].astype(np.int64)
        np.add.at(counted, held, 1)
        if record is not None:  # its partial chunks' sources are held too
            np.add.at(counted, record[1].astype(np.int64), 1)
    front = img.table[img.table < fmt.ZERO_CHUNK].astype(np.int64)
    fm = front[front < len(owner)]
    fm = fm[owner[fm] == 1]
    if len(fm) and not img.for_check:  # check mode counted them at open
        result.corruptions += len(fm)
        result.messages.append(
            f"ERROR the lookup table points into snapshot metadata (chunk {int(fm[0])})"
        )
    stored = np.zeros(len(counted), dtype=np.int64)
    stored[: len(st.refcount)] = st.refcount[: len(counted)]
    under = np.flatnonzero(stored < counted)
    over = np.flatnonzero(stored > counted)
    for p in under[:10]:
        result.messages.append(
            f"ERROR chunk {int(p)} refcount={int(stored[p])} "
            f"reference={int(counted[p])} (host offset {d + int(p) * cs})"
        )
    result.corruptions += len(under)
    for p in over[:10]:
        result.messages.append(
            f"Leaked chunk {int(p)} refcount={int(stored[p])} reference={int(counted[p])}"
        )
    result.leaks += len(over)
    if st.rewrite:
        result.messages.append("ERROR the revert marker is invalid")
    changed = len(under) or len(over) or lost or st.rewrite or st.broken
    if not (repair and changed) or img.read_only:
        return
    if lost:
        result.messages.append(
            f"Repair deletes damaged snapshot(s) {sorted(set(lost))} (their contents are lost)"
        )
    if st.broken:
        result.messages.append("Repair drops the unusable snapshot table: every snapshot is lost")
    fixed = counted.clip(0, REFCOUNT_MAX).astype(np.uint16)
    nz = np.flatnonzero(fixed)
    fixed = fixed[: int(nz[-1]) + 1 if len(nz) else 0]
    img.flush()
    st.entries = keep
    store_refcounts(img, st, fixed)
    st.dropped, st.rewrite, st.broken = [], False, None
    img.stats.refcount_updates += int(len(under) + len(over))
    usage = front_usage(img.table, len(stored))
    if img.partial is not None:  # the front's partial chunks' sources are in use
        src = img.partial.sources()
        usage[src[src < len(usage)]] += 1
    gone = [int(p) for p in over if counted[p] == 0 and usage[p] == 0 and owner[p] == 0]
    if gone:
        img.allocator.release_now(gone)
