"""Allocation map of an image: the runs `qemu-img map --output=json` would report.

The table is cut into runs vectorised (one numpy pass finds the entries that are not
UNALLOCATED; the runs are built from those), so the cost grows with the number of runs,
not with the virtual size. Runs below the end of a base image are split by the bitmap
(partially written chunks follow their blocks) and, where they read the base, by the
base's own extents (a raw base reports its holes, found with SEEK_DATA/SEEK_HOLE).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Optional

import numpy as np

from fvd.core.hooks import MappedDisk
from fvd.fileio import data_runs
from fvd.ondisk import format as fmt
from fvd.types import EXTENT_DTYPE, FLAG_DATA, FLAG_PRESENT, FLAG_ZERO, Extent, extents_to_array


def _check_range(img: MappedDisk, offset: int, length: Optional[int]) -> int:
    img.check_open()
    if length is None:
        length = img.size - offset
    if offset < 0 or length < 0 or offset + length > img.size:
        raise ValueError(f"range [{offset}, {offset + length}) outside the image")
    return length


def image_extents(
    img: MappedDisk, offset: int = 0, length: Optional[int] = None
) -> Iterator[Extent]:
    """Iterate Extents covering [offset, offset+length) exactly, equal neighbours merged."""
    length = _check_range(img, offset, length)
    return _merge(_segments(img, offset, offset + length))


def extents_array(img: MappedDisk, offset: int = 0, length: int | None = None) -> np.ndarray:
    """The same extents as a numpy structured array (EXTENT_DTYPE); offset -1 = none."""
    part = getattr(img, "partial", None)
    if fmt.is_tableless(img.header):
        return extents_to_array(image_extents(img, offset, length))
    if img.base_layer is None and (part is None or not part.active):  # partial chunks split
        length = _check_range(img, offset, length)
        if length == 0:
            return np.zeros(0, dtype=EXTENT_DTYPE)
        return _array_no_base(img, offset, offset + length)
    return extents_to_array(image_extents(img, offset, length))


def run_arrays(
    table: np.ndarray, first: int, last: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of chunks [first, last) as arrays (first chunk, end chunk, entry of the first
    chunk). A run is UNALLOCATED chunks, ZERO chunks, or allocated chunks whose physical
    chunks follow each other; runs of the first two kinds never touch one of their own
    kind, so with no base each run is exactly one extent."""
    t = table[first:last]
    idx = np.flatnonzero(t != fmt.UNALLOCATED)
    vals = t[idx]
    n = len(idx)
    if n:
        alloc = vals < fmt.ZERO_CHUNK
        same = np.zeros(n, dtype=bool)
        same[1:] = (idx[1:] == idx[:-1] + 1) & (
            ((vals[1:] == fmt.ZERO_CHUNK) & (vals[:-1] == fmt.ZERO_CHUNK))
            | (
                alloc[1:]
                & alloc[:-1]
                & (vals[1:].astype(np.int64) == vals[:-1].astype(np.int64) + 1)
            )
        )
        heads = np.flatnonzero(~same)
        tails = np.append(heads[1:], n) - 1
        starts = idx[heads].astype(np.int64) + first
        ends = idx[tails].astype(np.int64) + first + 1
        entries = vals[heads].astype(np.int64)
    else:
        starts = ends = entries = np.zeros(0, dtype=np.int64)
    # the UNALLOCATED gaps before, between and after those runs
    prev_end = np.concatenate([[first], ends])
    next_start = np.concatenate([starts, [last]])
    gap = next_start > prev_end
    gs, ge = prev_end[gap], next_start[gap]
    all_s = np.concatenate([starts, gs])
    order = np.argsort(all_s, kind="stable")
    return (
        all_s[order],
        np.concatenate([ends, ge])[order],
        np.concatenate([entries, np.full(len(gs), fmt.UNALLOCATED, np.int64)])[order],
    )


def table_runs(table: np.ndarray, first: int, last: int) -> Iterator[tuple[int, int, int]]:
    """The runs of `run_arrays` as (first chunk, end chunk, entry) tuples."""
    s, e, v = run_arrays(table, first, last)
    return zip(s.tolist(), e.tolist(), v.tolist())


def _array_no_base(img: MappedDisk, start: int, end: int) -> np.ndarray:
    """extents_array of an image without a base: one row per table run, no Python
    objects (the runs already are the merged extents)."""
    cs, d = img.chunk_size, img.header.data_offset
    c0, c1, ent = run_arrays(img.table, start // cs, (end - 1) // cs + 1)
    lo = np.maximum(c0 * cs, start)
    hi = np.minimum(c1 * cs, end)
    alloc = ent < fmt.ZERO_CHUNK
    out = np.empty(len(c0), dtype=EXTENT_DTYPE)
    out["start"] = lo
    out["length"] = hi - lo
    out["flags"] = np.where(
        alloc,
        FLAG_DATA | FLAG_PRESENT,
        np.where(ent == fmt.ZERO_CHUNK, FLAG_ZERO | FLAG_PRESENT, FLAG_ZERO),
    )
    out["depth"] = 0
    out["offset"] = np.where(alloc, d + ent * cs + (lo - c0 * cs), -1)
    return out


def _tableless_segments(img: MappedDisk, start: int, end: int) -> Iterator[Extent]:
    """A table-less image: the file's data and holes (SEEK_DATA/SEEK_HOLE) at guest
    offset + data_offset; below a base's end the bitmap splits them (a hole in a block
    the image owns reads zeros, in one it does not, the base)."""
    d, base = img.header.data_offset, img.base_layer
    for hs, he, is_data in data_runs(img.fd, d + start, d + end):
        s, e = hs - d, he - d
        if base is None:
            yield Extent(s, e - s, 0, True, not is_data, is_data, hs if is_data else None)
        elif is_data:
            yield from base.segments_in_chunk(s, e, hs)
        else:
            for x in base.segments_below(s, e):
                if x.depth == 0:  # the image's own hole: zeros, not the base
                    x = Extent(x.start, x.length, 0, True, True, False, None)
                yield x


def _segments(img: MappedDisk, start: int, end: int) -> Iterator[Extent]:
    if end <= start:
        return
    if fmt.is_tableless(img.header):
        yield from _tableless_segments(img, start, end)
        return
    cs = img.chunk_size
    data_offset = img.header.data_offset
    base = img.base_layer
    for c0, c1, e in table_runs(img.table, start // cs, (end - 1) // cs + 1):
        pos, stop = max(start, c0 * cs), min(end, c1 * cs)
        if e < fmt.ZERO_CHUNK:
            host = data_offset + e * cs + pos - c0 * cs
            if base is not None:
                yield from base.segments_in_chunk(pos, stop, host)
            elif img.partial is not None and img.partial.active:
                yield from _partial_segments(img, pos, stop, c0, e, data_offset)
            else:
                yield Extent(pos, stop - pos, 0, True, False, True, host)
        elif e == fmt.ZERO_CHUNK:
            yield Extent(pos, stop - pos, 0, True, True, False, None)
        elif base is not None:
            yield from base.segments_below(pos, stop)
        else:
            yield Extent(pos, stop - pos, 0, False, True, False, None)


def _partial_segments(
    img: MappedDisk, pos: int, stop: int, c0: int, e0: int, data_offset: int
) -> Iterator[Extent]:
    """A run of allocated chunks (chunk c0 maps e0, the next ones follow) in which some
    chunks may be partial (fvd.features.granular): those split by their granule bits."""
    cs, st = img.chunk_size, img.partial
    assert st is not None  # the caller saw active partial chunks
    while pos < stop:
        v = pos // cs
        end = min(stop, (v + 1) * cs)
        e = e0 + (v - c0)
        k = st.slot_of(v)
        if k is None:
            yield Extent(pos, end - pos, 0, True, False, True, data_offset + e * cs + pos - v * cs)
        else:
            for s, t, h in st.host_runs(k, e, pos, end, v * cs, data_offset):
                yield Extent(s, t - s, 0, True, False, True, h)
        pos = end


def _merge(segments: Iterable[Extent]) -> Iterator[Extent]:
    cur = None
    for seg in segments:
        if cur is not None and _joins(cur, seg):
            cur = Extent(
                cur.start,
                cur.length + seg.length,
                cur.depth,
                cur.present,
                cur.zero,
                cur.data,
                cur.offset,
            )
            continue
        if cur is not None:
            yield cur
        cur = seg
    if cur is not None:
        yield cur


def _joins(a: Extent, b: Extent) -> bool:
    if (a.depth, a.present, a.zero, a.data) != (b.depth, b.present, b.zero, b.data):
        return False
    if (a.offset is None) != (b.offset is None):
        return False
    return a.offset is None or a.offset + a.length == b.offset
