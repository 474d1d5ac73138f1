"""What a snapshot holds, read and validated: its lookup table, its copy of the base
bitmap and its granule record (docs/format.md sections 8 and 10)."""

from __future__ import annotations

import os
import zlib
from typing import NamedTuple, Optional

import numpy as np

from fvd import fileio
from fvd.core import tablestore
from fvd.core.bitmap import get_bits
from fvd.core.hooks import PartialChunks
from fvd.core.image import ImageCore
from fvd.errors import CorruptImageError
from fvd.features.granular import check_record_table, decode_map, decode_provenance
from fvd.features.snapshots.codec import Entry
from fvd.features.snapshots.refcounts import Held
from fvd.features.snapshots.state import SnapshotMeta
from fvd.ondisk import format as fmt
from fvd.ondisk import sparse_table


class Problem(NamedTuple):
    """A corruption found in a snapshot's metadata: where, what, and how many."""

    offset: Optional[int]
    what: str
    n: int


# A snapshot's granule record (fvd.features.granular.decode_map, with its provenance
# section: decode_provenance), in the form the front's partial chunks take too.
GranuleRecord = PartialChunks


def physical_chunks(img: ImageCore) -> int:
    """How many whole or partial chunks the data area of the file holds."""
    d, cs = img.header.data_offset, img.chunk_size
    return max(0, -(-(fileio.file_size(img.fd) - int(d)) // cs))


def _state(img: ImageCore) -> Optional[SnapshotMeta]:
    st = img.snapshot_state
    assert st is None or isinstance(st, SnapshotMeta)
    return st


def read_snapshot_table(img: ImageCore, e: Entry) -> np.ndarray:
    """The snapshot's lookup table, checksum and entries validated (CorruptImageError)."""
    return read_held_table(img, e)[0]


class HeldTable(NamedTuple):
    table: np.ndarray
    held: Held


def read_held_table(img: ImageCore, e: Entry) -> HeldTable:
    """read_snapshot_table, and the chunks the validated table holds."""
    if sparse_table.is_sparse(img.header):  # only its data runs are read
        table, crc = tablestore.load(img, e.table_offset, img.nchunks, True)
    else:
        raw = img.read_meta(e.table_offset, 4 * img.nchunks)
        table, crc = sparse_table.decode(raw, False), zlib.crc32(raw)
    if crc != e.table_crc:
        raise CorruptImageError(
            img.path, e.table_offset, f"snapshot {e.name!r}: lookup table checksum mismatch"
        )
    held = _held_ok(img, table, physical_chunks(img))
    if held is not None:
        return HeldTable(table, held)
    problems = lookup_table_problems(img, e, table)
    if problems:
        raise CorruptImageError(img.path, problems[0].offset, problems[0].what)
    raise AssertionError("lookup table check disagrees with itself")  # pragma: no cover


def lookup_table_problems(img: ImageCore, e: Entry, table: np.ndarray) -> list[Problem]:
    """The problems of a snapshot's lookup table: entries past the end of the file, into
    snapshot metadata, or mapping one chunk twice."""
    nphys = physical_chunks(img)
    if _held_ok(img, table, nphys) is not None:
        return []
    st = _state(img)
    alloc = np.flatnonzero(table < fmt.ZERO_CHUNK)
    held = table[alloc]
    ok = alloc[held < nphys]
    meta = st.meta_mask(nphys) if st is not None else np.zeros(0, dtype=bool)
    inmeta = ok[meta[table[ok]]] if len(meta) else ok[:0]
    out = []
    for where, why in (
        (alloc[held >= nphys], "points past the end of the file"),
        (inmeta, "points into snapshot metadata"),
    ):
        if len(where):
            v = int(where[0])
            what = f"snapshot {e.name!r}: entry {int(table[v])} of chunk {v} {why}"
            out.append(Problem(e.table_offset + 4 * v, what, len(where)))
    vals = np.sort(table[ok])
    ndup = int(np.count_nonzero(vals[1:] == vals[:-1]))
    if ndup:
        what = f"snapshot {e.name!r} maps one physical chunk from several virtual chunks"
        out.append(Problem(e.table_offset, what, ndup))
    return out


def _held_ok(img: ImageCore, table: np.ndarray, nphys: int) -> Optional[Held]:
    """The chunks the table holds when lookup_table_problems finds nothing: every entry
    inside the file, none in snapshot metadata, no chunk mapped twice. Else None."""
    mask, count = img.impl.held_mask(table, nphys, nphys)
    if mask is None:
        return None  # an entry points past the end of the file
    if int(np.count_nonzero(mask)) != count:
        return None  # a chunk mapped twice
    st = _state(img)
    if st is not None and count:
        meta = st.meta_mask(nphys)
        if np.logical_and(mask, meta[:nphys]).any():
            return None
    return Held(mask, int(count))


def read_snapshot_bitmap(img: ImageCore, e: Entry) -> np.ndarray:
    """The snapshot's copy of the base bitmap (uint8 array, bitmap_size bytes)."""
    raw = img.read_meta(e.bitmap_offset, img.header.bitmap_size)
    if zlib.crc32(raw) != e.bitmap_crc:
        raise CorruptImageError(
            img.path, e.bitmap_offset, f"snapshot {e.name!r}: bitmap checksum mismatch"
        )
    return np.frombuffer(raw, dtype=np.uint8).copy()


def granule_record(
    fd: int,
    path: str,
    e: Entry,
    table: np.ndarray,
    chunk_size: int,
    granule: int,
    data_offset: int,
) -> Optional[GranuleRecord]:
    """The snapshot's granule record read through `fd`, its crc checked and its entries
    matched against the snapshot's lookup table `table`; None when the snapshot has
    none. CorruptImageError naming the offset otherwise."""
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
    return GranuleRecord(chunks, sources, rows, *(prov or (None, None)))


def snapshot_record(img: ImageCore, e: Entry, table: np.ndarray) -> Optional[GranuleRecord]:
    """granule_record of an open image's snapshot (None without one), counted in stats."""
    if not (e.granules_offset or e.granules_bad):
        return None
    granule = img.header.granule_size or fmt.DEFAULT_GRANULE
    d = img.header.data_offset
    rec = granule_record(img.fd, img.path, e, table, img.chunk_size, granule, d)
    img.stats.metadata_reads += 1
    img.stats.metadata_bytes_read += e.granules_size
    return rec


def needs_base(img: ImageCore, bits: np.ndarray) -> bool:
    """True when a bitmap has a clear bit below the end of the base (min(base, size))."""
    bend = min(img.header.base_size, img.size)
    nb = -(-bend // img.block_size)
    return bool(nb) and not get_bits(bits, 0, nb).all()


def snapshots_need_base(img: ImageCore) -> bool:
    """True when some snapshot still reads blocks from the base (prefetch must then keep
    the base attached). Reads each snapshot's bitmap (one read each)."""
    st = _state(img)
    if st is None or img.bitmap is None:
        return False
    return any(needs_base(img, read_snapshot_bitmap(img, e)) for e in st.entries)
