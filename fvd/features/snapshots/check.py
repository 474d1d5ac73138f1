"""check and repair of the snapshot metadata: refcounts recomputed from every snapshot's
lookup table and granule record; leaks, undercounts and damaged snapshots."""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from fvd import fileio
from fvd.core.allocator import front_usage
from fvd.core.image import ImageCore
from fvd.errors import CorruptImageError
from fvd.features.base import marked_unallocated
from fvd.features.snapshots import refcounts
from fvd.features.snapshots.codec import Entry
from fvd.features.snapshots.state import SnapshotMeta, front_partial
from fvd.features.snapshots.tables import (
    Problem,
    lookup_table_problems,
    read_snapshot_bitmap,
    read_snapshot_table,
    snapshot_record,
)
from fvd.features.snapshots.transaction import MetadataChange, commit
from fvd.ondisk import format as fmt
from fvd.ondisk import sparse_table
from fvd.types import CheckResult


class _Count(NamedTuple):
    counted: np.ndarray  # references per physical chunk, from the snapshots kept
    keep: list[Entry]  # the snapshots that are sound
    lost: list[str]  # names of those repair deletes
    owner: np.ndarray  # 1 at chunks of snapshot metadata


def store_refcounts(img: ImageCore, st: SnapshotMeta, refcount: np.ndarray) -> None:
    """Commit a new refcount table (and snapshot table) copy-on-write; repair helper."""
    commit(img, st, MetadataChange(st.entries, refcount))


def check_snapshots(st: SnapshotMeta, img: ImageCore, result: CheckResult, repair: bool) -> None:
    """Recompute refcounts from every snapshot table; find leaks and double use.

    With repair, damaged snapshots are deleted (reported as lost), the refcount table is
    rewritten from what the remaining snapshots hold, and an invalid revert marker is
    cleared; all in one copy-on-write commit."""
    if st.broken:
        result.messages.append(f"ERROR snapshot metadata unusable ({st.broken})")
    count = _count(st, img, result)
    _front_in_metadata(img, count.owner, result)
    stored = np.zeros(len(count.counted), dtype=np.int64)
    stored[: len(st.refcount)] = st.refcount[: len(count.counted)]
    under, over = _compare(img, stored, count.counted, result)
    if st.rewrite:
        result.messages.append("ERROR the revert marker is invalid")
    changed = len(under) or len(over) or count.lost or st.rewrite or st.broken
    if not (repair and changed) or img.read_only:
        return
    _repair(st, img, result, count)
    img.stats.refcount_updates += int(len(under) + len(over))
    usage = front_usage(img.table, len(stored))
    ps = front_partial(img)
    if ps is not None:  # the front's partial chunks' sources are in use
        src = ps.sources()
        usage[src[src < len(usage)]] += 1
    gone = [int(p) for p in over if count.counted[p] == 0 and usage[p] == 0 and count.owner[p] == 0]
    if gone:
        img.allocator.release_now(gone)


def _count(st: SnapshotMeta, img: ImageCore, result: CheckResult) -> _Count:
    d, cs = img.header.data_offset, img.chunk_size
    nfile = -(-(fileio.file_size(img.fd) - d) // cs)  # tables are bounded by the file
    nphys = max(len(st.refcount), img.allocator.end, nfile, 1)
    owner = np.zeros(nphys, dtype=np.int8)  # 1 = snapshot metadata
    for a, n in st.metadata_runs(img):
        owner[a : a + n] = 1  # disjoint and inside the file: checked at open
    counted = np.zeros(len(owner), dtype=np.int64)
    keep, lost = [], list(st.dropped)
    for e in st.entries:
        t = _sound_table(img, e, result)
        sources = _sound_sources(img, e, t, result) if t is not None else None
        if t is None or sources is None:
            lost.append(e.name)
            continue
        keep.append(e)
        np.add.at(counted, t[t < fmt.ZERO_CHUNK].astype(np.int64), 1)
        np.add.at(counted, sources.astype(np.int64), 1)  # its partial chunks' sources
    return _Count(counted, keep, lost, owner)


def _sound_table(img: ImageCore, e: Entry, result: CheckResult) -> Optional[np.ndarray]:
    """The snapshot's lookup table (and bitmap copy) when sound, else None (reported)."""
    try:
        t = read_snapshot_table(img, e)
    except CorruptImageError as err:
        if err.what.endswith("checksum mismatch"):
            problems = [Problem(err.offset, err.what, 1)]
        else:
            raw = sparse_table.decode(
                img.read_meta(e.table_offset, 4 * img.nchunks),
                sparse_table.is_sparse(img.header),
            )
            problems = lookup_table_problems(img, e, raw)
        for off, what, n in problems:
            result.corruptions += n
            result.messages.append(f"ERROR at offset {off}: {what}")
        return None
    if e.bitmap_offset and not _check_snapshot_bitmap(img, e, t, result):
        return None
    return t


def _sound_sources(
    img: ImageCore, e: Entry, table: np.ndarray, result: CheckResult
) -> Optional[np.ndarray]:
    """The sources of the snapshot's partial chunks (its granule record; none without
    one), or None when its record is damaged (the partial chunks cannot be read
    without it)."""
    try:
        record = snapshot_record(img, e, table)
    except CorruptImageError as err:
        result.corruptions += 1
        result.messages.append(f"ERROR {err}")
        return None
    return record.sources if record is not None else np.zeros(0, dtype=np.int64)


def _check_snapshot_bitmap(
    img: ImageCore, e: Entry, table: np.ndarray, result: CheckResult
) -> bool:
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


def _front_in_metadata(img: ImageCore, owner: np.ndarray, result: CheckResult) -> None:
    front = img.table[img.table < fmt.ZERO_CHUNK].astype(np.int64)
    fm = front[front < len(owner)]
    fm = fm[owner[fm] == 1]
    if len(fm) and not img.for_check:  # check mode counted them at open
        result.corruptions += len(fm)
        result.messages.append(
            f"ERROR the lookup table points into snapshot metadata (chunk {int(fm[0])})"
        )


def _compare(
    img: ImageCore, stored: np.ndarray, counted: np.ndarray, result: CheckResult
) -> tuple[np.ndarray, np.ndarray]:
    """(undercounted, overcounted) chunks, reported."""
    d, cs = img.header.data_offset, img.chunk_size
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
    return under, over


def _repair(st: SnapshotMeta, img: ImageCore, result: CheckResult, count: _Count) -> None:
    """Drop the damaged snapshots and store the recomputed refcounts (one commit)."""
    if count.lost:
        result.messages.append(
            f"Repair deletes damaged snapshot(s) {sorted(set(count.lost))} "
            f"(their contents are lost)"
        )
    if st.broken:
        result.messages.append("Repair drops the unusable snapshot table: every snapshot is lost")
    fixed = refcounts.trimmed(count.counted.clip(0, refcounts.REFCOUNT_MAX))
    img.flush()
    st.entries = count.keep
    store_refcounts(img, st, fixed)
    st.dropped, st.rewrite, st.broken = [], False, None
