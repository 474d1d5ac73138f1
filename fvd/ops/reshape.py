"""Offline header changes of an fvd image: resize, a new base, emptying the front.

Each runs on a cleanly closed image (the caller closes its handle first; the file is
locked exclusively meanwhile) as an ordered sequence of writes and fdatasyncs whose last
step is the one-sector header write, the commit point: a crash at any point leaves the
image as it was before or as it is after (docs/format.md section 11).
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Optional

import numpy as np

from fvd.core import tableless
from fvd.errors import ChainError, CorruptImageError
from fvd.fileio import file_size, full_pwrite, lock_image, truncate_tail
from fvd.ondisk import format as fmt
from fvd.ondisk import sparse_table

SLOT = 4096  # a base name slot (names are at most 4095 bytes)


class _Locked:
    """The image file opened read-write and locked exclusively, its header parsed; the
    image must have been closed cleanly (journal empty, table and bitmap current)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        try:
            lock_image(self.fd, path, exclusive=True)
            raw = os.pread(self.fd, fmt.HEADER_SIZE, 0)
            self.header: fmt.ImageHeader = fmt.parse_header(raw, path, file_size(self.fd))
        except BaseException:
            os.close(self.fd)
            raise
        if not self.header.clean_shutdown:
            os.close(self.fd)
            raise ChainError(f"{path}: image was not closed cleanly; open and close it first")
        self.nchunks = -(-self.header.virtual_size // self.header.chunk_size)

    def __enter__(self) -> _Locked:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            raise CorruptImageError(self.path, offset + len(data), "truncated metadata region")
        return data

    def table(self) -> np.ndarray:
        if fmt.is_tableless(self.header):  # every chunk at its own place: all "allocated"
            return tableless.identity_table(self.nchunks)
        raw = self.read(self.header.table_offset, 4 * self.nchunks)
        return sparse_table.decode(raw, sparse_table.is_sparse(self.header))

    def write(self, offset: int, data: bytes) -> None:
        full_pwrite(self.fd, data, offset)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def commit(self, **changes: Any) -> None:
        """The commit point: one header sector, then fdatasync."""
        self.header = self.header.replace(**changes)
        self.write(0, fmt.build_header(self.header))
        self.sync()

    def refuse_snapshots(self, what: str) -> None:
        if self.header.nb_snapshots or self.header.snapshot_table_offset:
            raise ChainError(
                f"{self.path}: cannot {what} an image with internal snapshots "
                f"(as qemu-img for qcow2); delete them first"
            )


# ----- resize ----------------------------------------------------------------------------
def resize_file(path: str, size: int) -> None:
    """Give a closed image the virtual size `size` (the caller checked that a shrink cuts
    no data). Growing writes UNALLOCATED entries for the new chunks, moving the journal
    forward when the table region is too small, then commits the header."""
    if not 0 < size <= fmt.MAX_VIRTUAL_SIZE:
        raise ChainError(f"{path}: size must be in (0, {fmt.MAX_VIRTUAL_SIZE}], not {size}")
    with _Locked(path) as f:
        f.refuse_snapshots("resize")
        h, old_n = f.header, f.nchunks
        new_n = -(-size // h.chunk_size)
        if new_n > fmt.MAX_TABLE_ENTRIES:
            raise ChainError(f"{path}: {size} bytes is too large for this chunk size")
        base_size = h.base_size if h.base_format != fmt.BASE_NONE else 0
        if size > h.virtual_size and base_size > h.virtual_size:
            raise ChainError(
                f"{path}: the base ({base_size} bytes) is larger than the image; growing "
                f"would expose base data: rebase or convert instead"
            )
        if fmt.is_tableless(h):
            _resize_tableless(f, size)
            return
        table = f.table()
        if new_n <= old_n:
            _shrink(f, table, size, new_n)
        else:
            _grow(f, table, size, new_n)


def _resize_tableless(f: _Locked, size: int) -> None:
    """The file is the data area: it grows before the header commits the new size, and
    is cut after a shrink commits (the caller checked the cut part reads zeros)."""
    new_end = f.header.data_offset + size
    if size > f.header.virtual_size:
        os.ftruncate(f.fd, new_end)
        f.sync()
        f.commit(virtual_size=size)
    else:
        f.commit(virtual_size=size)
        os.ftruncate(f.fd, new_end)
        f.sync()


def _shrink(f: _Locked, table: np.ndarray, size: int, new_n: int) -> None:
    cut = np.flatnonzero(table[new_n:] < fmt.ZERO_CHUNK)
    if len(cut):
        raise ChainError(
            f"{f.path}: chunk {new_n + int(cut[0])} past the new size holds data; "
            f"shrinking would lose it"
        )
    stored = sparse_table.encode(table[:new_n], sparse_table.is_sparse(f.header))
    f.commit(virtual_size=size, table_crc=zlib.crc32(stored.tobytes()))


def _grow(f: _Locked, table: np.ndarray, size: int, new_n: int) -> None:
    h = f.header
    new_table = np.full(new_n, fmt.UNALLOCATED, dtype=np.uint32)
    new_table[: len(table)] = table
    raw = sparse_table.encode(new_table, sparse_table.is_sparse(h)).tobytes()
    need = fmt.round_up(len(raw), fmt.ALIGN)
    changes: dict[str, Any] = dict(virtual_size=size, table_crc=zlib.crc32(raw))
    if need > h.table_size:
        changes.update(_room_for_table(f, need))
        f.write(h.table_offset, raw)  # lands in the old journal: clean, so unread
    else:
        f.write(h.table_offset + 4 * len(table), raw[4 * len(table) :])
    f.sync()
    f.commit(**changes)


def _room_for_table(f: _Locked, need: int) -> dict[str, Any]:
    """Header changes that grow the table region into the journal (its end stays)."""
    h = f.header
    if h.table_offset + h.table_size != h.journal_offset:
        raise ChainError(f"{f.path}: the table is not followed by the journal; convert instead")
    end = h.journal_offset + h.journal_size
    journal_offset = h.table_offset + need
    if end - journal_offset < fmt.MIN_JOURNAL:
        most = (end - fmt.MIN_JOURNAL - h.table_offset) // 4 * h.chunk_size
        raise ChainError(
            f"{f.path}: the table cannot grow past {most} bytes of virtual size in this "
            f"layout (its journal would be smaller than {fmt.MIN_JOURNAL}); convert instead"
        )
    return dict(
        table_size=need,
        journal_offset=journal_offset,
        journal_size=end - journal_offset,
        journal_epoch=h.journal_epoch + 1,  # old sectors in the moved region stay dead
    )


# ----- emptying the front (commit) ------------------------------------------------------
def empty_front(path: str) -> bool:
    """Every chunk of a closed overlay's front reads from its base again: header marked
    unclean, bitmap cleared, table cleared (each step reads the same data: the base holds
    what the front held, commit wrote it there first). Without snapshots every chunk is
    then free: the data area is cut off and a clean header commits. With snapshots the
    chunks they hold stay; returns True: the caller's next read-write open scrubs the
    rest and writes the clean header."""
    with _Locked(path) as f:
        h = f.header
        if h.base_format == fmt.BASE_NONE:
            raise ChainError(f"{path}: has no base image; emptying it would lose its data")
        f.commit(clean_shutdown=0, base_flags=h.base_flags & ~fmt.BASE_FLAG_PREFETCHED)
        bitmap = bytes(h.bitmap_size)
        f.write(h.bitmap_offset, bitmap)
        f.sync()  # bits first: a cleared chunk under a set bit would read zeros
        if fmt.is_tableless(h):  # the data area becomes one hole
            os.ftruncate(f.fd, h.data_offset)
            os.ftruncate(f.fd, tableless.data_end(h))
            f.commit(
                clean_shutdown=1,
                bitmap_crc=zlib.crc32(bitmap),
                journal_epoch=h.journal_epoch + 1,
            )
            return False
        empty = np.full(f.nchunks, fmt.UNALLOCATED, dtype=np.uint32)
        table = sparse_table.encode(empty, sparse_table.is_sparse(h)).tobytes()
        f.write(h.table_offset, table)
        f.sync()
        if h.nb_snapshots or h.snapshot_table_offset or h.partial_map_offset:
            return True
        truncate_tail(f.fd, h.data_offset)
        f.commit(
            clean_shutdown=1,
            table_crc=zlib.crc32(table),
            bitmap_crc=zlib.crc32(bitmap),
            journal_epoch=h.journal_epoch + 1,
        )
        return False


# ----- a new base (rebase) --------------------------------------------------------------
def set_base(path: str, name: bytes, base_format: int, base_size: int) -> None:
    """Point a closed overlay at a new base of `base_size` bytes: the new name goes to the
    name slot the header does not use, the bitmap is rewritten for the new size (blocks
    past the old base size are the image's where its chunk is allocated or zero), bytes
    that will read the image instead of the old base are zeroed, then the header commits.
    The caller copied, in safe mode, what the new base would change."""
    if not 0 < len(name) <= fmt.MAX_BASE_NAME:
        raise ChainError(f"{path}: base name must be 1..{fmt.MAX_BASE_NAME} bytes")
    with _Locked(path) as f:
        h = f.header
        if h.base_format == fmt.BASE_NONE:
            raise ChainError(
                f"{path}: has no base image (an fvd image gets its base region at create); "
                f"convert it with -B instead"
            )
        f.refuse_snapshots("rebase")
        table = f.table()
        bits, bitmap_size = _new_bitmap(f, table, base_size)
        changes = _name_slot(f, len(name))
        if bits is not None:
            f.commit(clean_shutdown=0)  # the bitmap crc is not checked while unclean
            f.write(h.bitmap_offset, bits)
        f.write(changes["base_name_offset"], name.ljust(SLOT, b"\0")[:SLOT])
        f.sync()
        final = bits if bits is not None else f.read(h.bitmap_offset, h.bitmap_size)
        nblocks = -(-base_size // h.block_size)
        flags = h.base_flags
        if not _all_set(final, min(nblocks, -(-h.virtual_size // h.block_size))):
            flags &= ~fmt.BASE_FLAG_PREFETCHED
        f.commit(
            **changes,
            base_name_size=len(name),
            base_format=base_format,
            base_size=base_size,
            base_flags=flags,
            bitmap_size=bitmap_size,
            bitmap_crc=zlib.crc32(final),
            clean_shutdown=1,
            journal_epoch=h.journal_epoch + 1,
        )


def _all_set(bits: bytes, nblocks: int) -> bool:
    arr = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
    return bool(arr[:nblocks].all())


def _region_room(f: _Locked, offset: int) -> int:
    """Bytes from `offset` to the next region (or the data area)."""
    h = f.header
    starts = [h.table_offset, h.journal_offset, h.data_offset, h.base_name_offset]
    return int(min(s for s in starts if s > offset)) - offset


def _new_bitmap(f: _Locked, table: np.ndarray, base_size: int) -> tuple[Optional[bytes], int]:
    """(new bitmap bytes or None when unchanged, bitmap_size). Also zeroes, in allocated
    chunks, the bytes under clear bits that the new (smaller) base no longer covers."""
    h = f.header
    bs, cs, vs = h.block_size, h.chunk_size, h.virtual_size
    old_nb, new_nb = -(-h.base_size // bs), -(-base_size // bs)
    need = fmt.round_up(-(-new_nb // 8), fmt.ALIGN)
    size = max(h.bitmap_size, need)
    if size > _region_room(f, h.bitmap_offset):
        raise ChainError(
            f"{f.path}: the bitmap region has no room for a {base_size}-byte base "
            f"(block size {bs}); convert with -B instead"
        )
    raw = f.read(h.bitmap_offset, h.bitmap_size).ljust(size, b"\0")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    _zero_uncovered(f, table, bits, base_size, min(old_nb, -(-vs // bs)))
    if new_nb <= old_nb:
        return (None, h.bitmap_size) if size == h.bitmap_size else (raw, size)
    owned = table < fmt.UNALLOCATED  # allocated or ZERO: the image answers
    blocks = np.arange(old_nb, new_nb, dtype=np.int64)
    chunk = np.minimum(blocks * bs // cs, len(table) - 1)
    bits[old_nb:new_nb] = (owned[chunk] & (blocks * bs < vs)).astype(np.uint8)
    return np.packbits(bits, bitorder="little").tobytes(), size


def _zero_uncovered(
    f: _Locked, table: np.ndarray, bits: np.ndarray, base_size: int, old_nb: int
) -> None:
    """Blocks with a clear bit read the old base; past the new base's end they will read
    the image: make their bytes in an allocated chunk zeros (never read until then)."""
    h = f.header
    bs, cs = h.block_size, h.chunk_size
    first = base_size // bs
    for b in np.flatnonzero(bits[first:old_nb] == 0).tolist():
        block = first + b
        lo = max(block * bs, base_size)
        hi = min((block + 1) * bs, h.virtual_size, h.base_size)  # past it: the image's
        entry = int(table[lo // cs])
        if hi > lo and entry < fmt.ZERO_CHUNK:
            f.write(h.data_offset + entry * cs + lo % cs, bytes(hi - lo))


def _name_slot(f: _Locked, name_size: int) -> dict[str, Any]:
    """Where the new name goes: the home slot after the header region when the name is
    elsewhere, else a slot right after the journal (taken from the journal's last 4 KiB
    when no gap is there). Never the slot the header names."""
    h = f.header
    cur = h.base_name_offset
    others = [h.bitmap_offset, h.journal_offset]
    if h.table_offset:  # a table-less image has none
        others.append(h.table_offset)
    if cur != fmt.HEADER_REGION and min(others) >= fmt.HEADER_REGION + SLOT:
        return dict(base_name_offset=fmt.HEADER_REGION)
    end = h.journal_offset + h.journal_size
    if end + SLOT <= h.data_offset and not (end <= cur < end + SLOT):
        return dict(base_name_offset=end)
    if h.journal_size - SLOT < fmt.MIN_JOURNAL:
        raise ChainError(f"{f.path}: no room for a second base name slot; convert instead")
    return dict(base_name_offset=end - SLOT, journal_size=h.journal_size - SLOT)
