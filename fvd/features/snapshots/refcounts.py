"""Refcount arithmetic: which physical chunks the snapshots hold, and how many times
(docs/format.md section 8). A chunk with refcount > 0 is frozen: the front copies it on
its first write there."""

from __future__ import annotations

import time
from typing import NamedTuple, Sequence

import numpy as np

from fvd.core.allocator import front_usage
from fvd.core.image import ImageCore
from fvd.errors import CorruptImageError, RefcountOverflowError
from fvd.features.snapshots.codec import Entry
from fvd.features.snapshots.state import front_partial
from fvd.ondisk import fvd_records as fr

# read at call time: tests lower it to reach the limit
REFCOUNT_MAX = fr.REFCOUNT_MAX


class Held(NamedTuple):
    """The chunks a table (and its partial chunks' sources) holds: `mask` counts per
    physical chunk (uint8), `nheld` how many are held."""

    mask: np.ndarray
    nheld: int


class Decrement(NamedTuple):
    """A snapshot's chunks taken off the refcounts: the new (trimmed) table, and the
    chunks nothing holds any more (neither a snapshot nor the front)."""

    refcount: np.ndarray
    freed: np.ndarray


def add_sources(held: Held, sources: Sequence[int] | np.ndarray) -> Held:
    """`held` with the partial chunks' sources added (a source is never mapped by the
    table, so each counts once)."""
    if len(sources) == 0:
        return held
    mask = held.mask
    need = int(np.max(sources)) + 1
    if need > len(mask):
        grown = np.zeros(need, dtype=mask.dtype)
        grown[: len(mask)] = mask
        mask = grown
    mask[np.asarray(sources, dtype=np.int64)] += 1
    return Held(mask, held.nheld + len(sources))


def front_held(img: ImageCore, n: int) -> Held:
    """held_mask of the front's table, plus the sources of its partial chunks (a snapshot
    holds those too). The table maps allocated chunks only, all below the allocator's
    end: with that cap the mask is built in one pass (two if it is not so)."""
    mask, count = img.impl.held_mask(img.table, n, img.allocator.end)
    if mask is None:
        mask, count = img.impl.held_mask(img.table, n)
    ps = front_partial(img)
    sources = ps.sources() if ps is not None else ()
    return add_sources(Held(mask, int(count)), sources)


def set_frozen(img: ImageCore, refcount: np.ndarray, install: bool = True) -> None:
    """The frozen bits are the chunks with refcount > 0."""
    n = max(len(refcount), len(img.frozen), 1024)
    frozen = np.zeros(n, dtype=np.uint8)
    frozen[: len(refcount)] = refcount > 0
    img.frozen = frozen
    if install:
        img.chunk_map.set_frozen(frozen)


def freeze_front(img: ImageCore) -> None:
    """Point in time: every chunk the front maps is frozen, then the fast-path writes
    that saw one unfrozen are waited for. From here on a write to the front copies (slow
    path, behind the image lock), so the snapshot's chunks hold what was acknowledged
    before the snapshot began (or during it, never after it returned)."""
    mask = front_held(img, 0).mask
    n = max(len(img.frozen), len(mask), 1024)
    frozen = np.zeros(n, dtype=np.uint8)
    frozen[: len(img.frozen)] = img.frozen
    frozen[: len(mask)] |= mask
    img.frozen = frozen
    img.chunk_map.set_frozen(frozen)
    img.allocator.quiesce(time.sleep)


def increment(path: str, refcount: np.ndarray, held: Held) -> np.ndarray:
    """Refcounts after a new snapshot holds `held` (the front never maps one physical
    chunk twice, so each held chunk gains exactly 1); RefcountOverflowError past the
    maximum."""
    rc = np.zeros(len(held.mask), dtype=np.uint32)
    rc[: len(refcount)] = refcount
    rc += held.mask
    # only held chunks gained: any count past the maximum is one of theirs
    if held.nheld and int(rc.max()) > REFCOUNT_MAX:
        bad = int(np.argmax(rc))
        raise RefcountOverflowError(
            f"{path}: chunk {bad} is already held by "
            f"{REFCOUNT_MAX} snapshots; delete some snapshots first"
        )
    return rc.astype(np.uint16)


def trimmed(rc: np.ndarray) -> np.ndarray:
    """A refcount table cut after its last nonzero entry (uint16)."""
    if len(rc) and rc[-1]:
        return rc.astype(np.uint16)  # nothing to trim (no scan for the last count)
    nz = np.flatnonzero(rc)
    return rc[: int(nz[-1]) + 1 if len(nz) else 0].astype(np.uint16)


def decrement(img: ImageCore, refcount: np.ndarray, held: Held, e: Entry) -> Decrement:
    """Refcounts after snapshot `e` (holding `held`, validated: no chunk twice) is gone.
    CorruptImageError when it holds chunks the refcounts do not count."""
    what = f"snapshot {e.name!r}"
    if held.mask[len(refcount) :].any():
        raise CorruptImageError(
            img.path, e.table_offset, f"{what} holds chunks past the refcount table"
        )
    rc = refcount.astype(np.int32)
    mask = np.zeros(len(rc), dtype=np.int32)
    mask[: len(held.mask)] = held.mask[: len(rc)]
    if held.nheld and np.logical_and(mask, rc == 0).any():
        raise CorruptImageError(
            img.path,
            img.header.refcount_table_offset,
            f"{what} holds chunks whose refcount is 0 (run check -r all)",
        )
    rc -= mask
    dropped = np.flatnonzero(np.logical_and(mask, rc == 0))
    freed = dropped
    if len(dropped):  # the front's usage matters only for chunks no snapshot holds now
        front = front_usage(img.table, len(rc))
        ps = front_partial(img)
        if ps is not None:  # a partial chunk's source stays (fvd.granular)
            sources = ps.sources()
            front[sources[sources < len(front)]] += 1
        freed = dropped[front[dropped] == 0]
    return Decrement(trimmed(rc), freed)
