"""Changed-block tracking from the lookup tables: which ranges may differ between two
points in time (a snapshot, or the live front). No data is read.

A *state* is a lookup table plus, with a base image, the bitmap that goes with it (the
snapshot's copy, or the front's durable ``stale`` bits: a block whose bit is only soft
holds the base's bytes, so it is the same as reading the base).

Where byte x of a state comes from (docs/format.md, sections 7 and 8), as a *source key*:

* below the base end with the block's bit clear: the base (``KEY_BASE``), which never
  changes;
* otherwise the chunk's entry: physical chunk p (``p``: a chunk a snapshot holds is
  frozen, so two states mapping p read the same bytes there), or zeros (``KEY_ZERO`` for
  ZERO and UNALLOCATED entries).

* in a partial chunk (docs/format.md, section 10; images without a base), of the front
  or held by a snapshot (its granule record): granule g's key is the chunk's entry N
  when its bit is set, else its source chunk S.

Two states may differ at x exactly when their keys at x differ, except where the newer
state *carries* granule x (provenance, docs/format.md section 10: a copy-forward copied
its bytes from an origin chunk, untouched since) and its origin is the older state's key
there: the older state holds that chunk, frozen since, so the bytes are equal.
The comparison runs at the finest granularity the format records: chunks, refined to
blocks where a base bitmap is involved (``_refine_blocks``) and to granules where either
state has partial chunks (``_walk``). Only the two states are read: a record is exact,
so no state between them matters.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, overload

import numpy as np

from fvd.core.hooks import MappedDisk
from fvd.errors import CorruptImageError, SnapshotNotFoundError
from fvd.features.granular import NONE
from fvd.features.snapshots import Entry, granule_record
from fvd.ondisk import format as fmt
from fvd.ondisk import sparse_table
from fvd.types import Extent

KEY_ZERO = np.uint64(1 << 40)  # reads as zeros
KEY_BASE = np.uint64(1 << 41)  # reads from the base image

CHANGED_DTYPE = np.dtype([("start", "<u8"), ("length", "<u8"), ("flags", "<u4")])
FLAG_DATA = 1  # the range holds (possibly) nonzero data in the newer state
FLAG_ZERO = 2  # the range reads as zeros in the newer state: a backup may skip it
Ranges = tuple[np.ndarray, np.ndarray, np.ndarray]  # (starts, stops, zero in the newer state)


@dataclass
class State:
    """One point in time: a table (uint32 entries) and the bitmap bits that go with it
    (uint8 array, or None without a base)."""

    table: np.ndarray
    bits: np.ndarray | None
    snapshot_id: int | None  # None: the live front
    partial: Partial | None = None  # the front's partial chunks
    record: Partial | None = None  # a snapshot's granule record (its table maps N)


@dataclass
class Partial:
    """Partial chunks of a state (fvd.features.granular), or a snapshot's granule record:
    virtual chunk numbers (sorted), their source chunks, and their granule bit rows (uint8,
    one row of ceil(gpc / 8) bytes per chunk, granule g = bit g % 8 of byte g // 8)."""

    chunks: np.ndarray
    sources: np.ndarray
    rows: np.ndarray
    granule_size: int
    # provenance (docs/format.md section 10): per chunk, the chunk its carried granules
    # were copied from (NONE: none) and their rows (a subset of `rows`), or None
    origins: np.ndarray | None = None
    carried: np.ndarray | None = None


@dataclass
class Geometry:
    size: int
    chunk_size: int
    block_size: int
    bend: int  # bytes below this may come from the base (0 without a base)


# ----- reading states ------------------------------------------------------------------
def _pread(fd: int, path: str, length: int, offset: int, crc: int, what: str) -> bytes:
    raw = os.pread(fd, length, offset)
    if len(raw) != length or zlib.crc32(raw) != crc:
        raise CorruptImageError(path, offset, f"{what}: checksum mismatch or truncated")
    return raw


def snapshot_state(
    fd: int, path: str, entry: Entry, nchunks: int, bitmap_size: int, sparse: bool
) -> State:
    """Read a snapshot's lookup table (and bitmap copy) through `fd`."""
    what = f"snapshot {entry.name!r}"
    raw = _pread(
        fd, path, 4 * nchunks, entry.table_offset, entry.table_crc, f"{what}: lookup table"
    )
    table = sparse_table.decode(raw, sparse)
    bits = None
    if entry.bitmap_offset and bitmap_size:
        braw = _pread(
            fd, path, bitmap_size, entry.bitmap_offset, entry.bitmap_crc, f"{what}: bitmap"
        )
        bits = np.frombuffer(braw, dtype=np.uint8)
    return State(table, bits, entry.id)


def _find(disk: MappedDisk, name: str) -> Entry:
    st = disk.snapshot_state
    for e in st.entries if st is not None else ():
        if e.name == name:
            assert isinstance(e, Entry)
            return e
    raise SnapshotNotFoundError(f"{disk.path}: no snapshot named {name!r}")


def _resolve(disk: MappedDisk, since: str, until: str | None) -> tuple[Geometry, list[State]]:
    """(Geometry, States) of an image or a snapshot view (`disk`): snapshot `since` and
    `until` (a snapshot, or the live contents of `disk`). Granule records are exact (a
    snapshot holds its partial chunks as they are), so the two states alone say where
    their sources differ: no state between them is read."""
    disk.check_open()
    for name, what in ((since, "since"), (until, "until")):
        if name is not None and not isinstance(name, str):
            raise ValueError(f"{what} must be a snapshot name (str), not {type(name).__name__}")
    e_since = _find(disk, since)
    e_until = _find(disk, until) if until is not None else None
    if e_until is not None and e_since.id > e_until.id:
        raise ValueError(f"{disk.path}: snapshot {since!r} is newer than {e_until.name!r}")
    h = disk.header
    bsize = h.bitmap_size if h.base_format else 0
    granule = h.granule_size or fmt.DEFAULT_GRANULE
    states = [_snapshot(disk, e_since, bsize, granule)]
    if e_until is None:
        states.append(_live(disk, granule))
    elif e_until is not e_since:
        states.append(_snapshot(disk, e_until, bsize, granule))
    bend = min(disk.header.base_size, disk.size) if bsize else 0
    return Geometry(disk.size, disk.chunk_size, disk.block_size, bend), states


def _snapshot(disk: MappedDisk, e: Entry, bitmap_size: int, granule: int) -> State:
    """A snapshot's state, with its granule record."""
    nchunks = -(-disk.size // disk.chunk_size)
    sparse = sparse_table.is_sparse(disk.header)
    state = snapshot_state(disk.fd, disk.path, e, nchunks, bitmap_size, sparse)
    if e.granules_offset or e.granules_bad:
        d = disk.header.data_offset
        rec = granule_record(disk.fd, disk.path, e, state.table, disk.chunk_size, granule, d)
        if rec is not None:
            state.record = Partial(
                rec.chunks, rec.sources, rec.rows, granule, rec.origins, rec.carried
            )
    return state


def _live(disk: MappedDisk, granule: int) -> State:
    """The live contents of `disk`, copied at one point in time (no write changes the
    table meanwhile)."""
    with disk.lock:
        bits = disk.bitmap.stale.copy() if disk.bitmap is not None else None
        partial = None
        if disk.partial is not None and disk.partial.active:
            p = disk.partial.partial_chunks()
            partial = Partial(p.chunks, p.sources, p.rows, granule, p.origins, p.carried)
        return State(disk.table.copy(), bits, None, partial)


# ----- the comparison -------------------------------------------------------------------
def _chunk_keys(table: np.ndarray) -> np.ndarray:
    """Source key per chunk, ignoring the base: p, or KEY_ZERO."""
    t = table.astype(np.uint64)
    return np.where(t < fmt.ZERO_CHUNK, t, KEY_ZERO)


def _bits(bits: np.ndarray, nblocks: int) -> np.ndarray:
    out = np.unpackbits(bits, bitorder="little")[:nblocks].view(bool)
    if len(out) < nblocks:
        out = np.concatenate([out, np.zeros(nblocks - len(out), dtype=bool)])
    return out


def compare(geo: Geometry, a: State, b: State) -> np.ndarray:
    """Changed ranges between state a (older) and b (newer) as a CHANGED_DTYPE array,
    sorted, adjacent ranges of equal flags merged."""
    return compare_chain(geo, [a, b])


def compare_chain(geo: Geometry, states: Sequence[State]) -> np.ndarray:
    """Changed ranges between states[0] (the oldest) and states[-1] (the newest), through
    any states passed between them in id order (see _walk); as `compare`."""
    a, b = states[0], states[-1]
    cs = geo.chunk_size
    nchunks = -(-geo.size // cs)
    ta, tb = a.table[:nchunks], b.table[:nchunks]
    # chunks that reach below the base end are compared block by block; the rest (every
    # chunk, without a base) by their entries. Both come out sorted, the first before.
    nbase_chunks = -(-geo.bend // cs) if geo.bend else 0
    if a.partial is not None:
        raise ValueError("the older state is a snapshot: it has no partial chunks")
    if any(s.partial is not None for s in states[:-1]):
        raise ValueError("only the newest state can be the front")
    if any(_granular(s) for s in states):
        if nbase_chunks:
            raise ValueError("partial chunks in an image with a base")
        starts, stops, zero = _walk(geo, [s.table[:nchunks] for s in states], states)
    else:
        starts, stops, zero = _chunk_runs(ta, tb, nbase_chunks, cs, geo.size)
    if nbase_chunks:
        ka, kb = _chunk_keys(ta[:nbase_chunks]), _chunk_keys(tb[:nbase_chunks])
        rs, re, rz = _refine_blocks(geo, ka, kb, a, b, nbase_chunks)
        starts, stops, zero = (
            np.concatenate([rs, starts]),
            np.concatenate([re, stops]),
            np.concatenate([rz, zero]),
        )
    return _merge(starts, stops, zero)


def _granular(s: State) -> bool:
    g = s.partial if s.partial is not None else s.record
    return g is not None and len(g.chunks) > 0


def _changed_chunks(ta: np.ndarray, tb: np.ndarray, first: int) -> np.ndarray:
    """Chunks from `first` whose entries differ, ZERO and UNALLOCATED counting as equal
    (both read zeros), as sorted int64 chunk numbers."""
    ta, tb = ta[first:], tb[first:]
    idx = np.flatnonzero(ta != tb)  # one pass; the rest is per changed chunk
    return idx[(ta[idx] < fmt.ZERO_CHUNK) | (tb[idx] < fmt.ZERO_CHUNK)] + first


def _chunk_runs(ta: np.ndarray, tb: np.ndarray, first: int, cs: int, size: int) -> Ranges:
    """Chunks from `first` whose entries differ: (starts, stops, zero in the newer state)."""
    idx = _changed_chunks(ta, tb, first)
    starts = idx.astype(np.uint64) * np.uint64(cs)
    stops = np.minimum(starts + np.uint64(cs), np.uint64(size))
    return starts, stops, tb[idx] >= fmt.ZERO_CHUNK


def _walk(geo: Geometry, tables: Sequence[np.ndarray], states: Sequence[State]) -> Ranges:
    """Chunks whose keys differ between the first and the last state (and the front's
    partial chunks), refined to granules: per step between consecutive states (callers
    pass the two endpoints), granule g of chunk v has in each state the key N where its
    bit is set and S elsewhere (a chunk without partial state: its entry everywhere); the
    granules whose keys differ are reported, a chunk with no partial state in either
    state whole when its keys differ. The union over the steps is reported. Vectorised
    over the candidate chunks and the 64-bit words of the rows and the runs found (never
    per granule). Flags: zero where the newest state's chunk reads zeros."""
    cs = geo.chunk_size
    ta, tb = tables[0], tables[-1]
    cand = _changed_chunks(ta, tb, 0)
    front = states[-1].partial
    if front is not None and len(front.chunks):
        pv = front.chunks.astype(np.int64)
        cand = np.union1d(cand, pv[tb[pv] < fmt.ZERO_CHUNK])  # N is a physical chunk
    gs = next(_partial_of(s) for s in states if _granular(s)).granule_size
    whole, parts = _differing(cand, tables, states, gs, cs // gs)
    v = cand[whole]
    w_starts = v.astype(np.uint64) * np.uint64(cs)
    w_stops = np.minimum(w_starts + np.uint64(cs), np.uint64(geo.size))
    w = (w_starts, w_stops, tb[v] >= fmt.ZERO_CHUNK)
    pos, rows = _union_rows(parts)
    keep = ~whole[pos]
    pos, rows = pos[keep], rows[keep]
    if not len(pos):
        return w
    return _merge_sorted(w, _granule_runs(geo, cand[pos], rows, tb, gs))


def _partial_of(s: State) -> Partial:
    g = s.partial if s.partial is not None else s.record
    assert g is not None
    return g


class _Layer(NamedTuple):
    """A state over the candidate chunks (see _layers)."""

    has: np.ndarray  # the chunk is partial
    src: np.ndarray  # source keys
    rows: np.ndarray  # bit rows, padded to whole 64-bit words
    origins: np.ndarray  # origin keys of the carried granules
    carried: np.ndarray  # carried rows, padded


def _differing(
    cand: np.ndarray,
    tables: Sequence[np.ndarray],
    states: Sequence[State],
    gs: int,
    gpc: int,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Per step between consecutive states: the candidates whose keys differ with no
    partial state in either (`whole`, ORed over the steps), and the (positions in cand,
    padded rows) of the granules that differ in the others."""
    nbytes = -(-gpc // 8)
    width = -(-nbytes // 8) * 8  # row bytes padded to whole 64-bit words
    valid = _rows(np.full((1, nbytes), 0xFF, dtype=np.uint8), gpc, None)[0]
    whole = np.zeros(len(cand), dtype=bool)
    parts = []
    kp = _chunk_keys(tables[0][cand])
    prev = _layers(states[0], cand, kp, gs, gpc, width)
    for s, t in zip(states[1:], tables[1:]):
        kc = _chunk_keys(t[cand])
        cur = _layers(s, cand, kc, gs, gpc, width)
        plain = ~(prev.has | cur.has)
        whole |= plain & (kp != kc)
        idx = np.flatnonzero(~plain)
        if len(idx):
            parts.append((idx, _granules_differ(idx, kp, prev, kc, cur) & valid))
        kp, prev = kc, cur
    return whole, parts


def _granules_differ(
    idx: np.ndarray, kp: np.ndarray, prev: _Layer, kc: np.ndarray, cur: _Layer
) -> np.ndarray:
    """Padded rows of the granules of chunks `idx` that differ between two states."""
    # granule g reads N where its bit is set, else S (a whole chunk: S = N, no bits);
    # it differs where the two states' sources for g differ
    n_p, s_p, n_c, s_c = kp[idx], prev.src[idx], kc[idx], cur.src[idx]
    rp, rc = prev.rows[idx], cur.rows[idx]
    rows = (
        (rc & rp & _byte_mask(n_c != n_p))
        | (rc & ~rp & _byte_mask(n_c != s_p))
        | (~rc & rp & _byte_mask(s_c != n_p))
        | (~rc & ~rp & _byte_mask(s_c != s_p))
    )
    # a carried granule of the newer state holds the bytes its origin chunk had when
    # they were copied; the older state reads that chunk there and holds it (frozen
    # since), so the bytes are equal (docs/format.md section 10)
    o_c, c_c = cur.origins[idx], cur.carried[idx]
    same = (c_c & rp & _byte_mask(o_c == n_p)) | (c_c & ~rp & _byte_mask(o_c == s_p))
    out: np.ndarray = rows & ~same
    return out


def _granule_runs(
    geo: Geometry, chunks: np.ndarray, rows: np.ndarray, tb: np.ndarray, gs: int
) -> Ranges:
    """The runs of set bits of `rows` (one padded row per chunk of `chunks`) as ranges."""
    first, last = _run_edges(rows.view("<u8"))
    width = rows.shape[1] * 8  # bits per row, a power of two
    shift = width.bit_length() - 1
    cv = chunks[first >> shift]
    chunk_start = cv.astype(np.uint64) * np.uint64(geo.chunk_size)
    g_starts = chunk_start + (first & (width - 1)).astype(np.uint64) * np.uint64(gs)
    g_stops = chunk_start + ((last & (width - 1)) + 1).astype(np.uint64) * np.uint64(gs)
    g_stops = np.minimum(g_stops, np.uint64(geo.size))
    live = g_starts < g_stops  # granules past the end of the image count as set
    return g_starts[live], g_stops[live], tb[cv[live]] >= fmt.ZERO_CHUNK


def _byte_mask(differ: np.ndarray) -> np.ndarray:
    """Per chunk, a column of 0xFF where `differ` holds, else 0 (ANDed with bit rows)."""
    out: np.ndarray = np.where(differ, 0xFF, 0).astype(np.uint8)[:, None]
    return out


def _layers(s: State, cand: np.ndarray, keys: np.ndarray, gs: int, gpc: int, width: int) -> _Layer:
    """State s over the chunks `cand`: a chunk without partial state has source = its
    own key and no bits; a chunk without provenance no carried bits."""
    has = np.zeros(len(cand), dtype=bool)
    src = keys.copy()
    rows = np.zeros((len(cand), width), dtype=np.uint8)
    origins = np.full(len(cand), KEY_ZERO, dtype=np.uint64)  # never a chunk's key
    carried = np.zeros((len(cand), width), dtype=np.uint8)
    g = s.partial if s.partial is not None else s.record
    if g is not None and len(g.chunks) and len(cand):
        if g.granule_size != gs:
            raise ValueError("states with different granule sizes")
        loc, i = _locate(cand, g.chunks)
        phys = keys[loc] < KEY_ZERO  # a zeroed chunk is no longer partial
        loc, i = loc[phys], i[phys]
        has[loc] = True
        src[loc] = g.sources[i].astype(np.uint64)
        rows[loc] = _rows(g.rows[i], gpc, None)
        if g.origins is not None and g.carried is not None:
            known = g.origins[i] != NONE
            origins[loc[known]] = g.origins[i][known].astype(np.uint64)
            carried[loc] = _rows(g.rows[i] & g.carried[i], gpc, None)
    return _Layer(has, src, rows, origins, carried)


def _locate(cand: np.ndarray, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in sorted `cand`, indexes in `chunks`) of the chunks that are in cand."""
    chunks = chunks.astype(np.int64)
    loc = np.searchsorted(cand, chunks)
    hit = loc < len(cand)
    hit[hit] = cand[loc[hit]] == chunks[hit]
    return loc[hit], np.flatnonzero(hit)


def _rows(rows: np.ndarray, gpc: int, invert: np.ndarray | None) -> np.ndarray:
    """Bit rows padded to whole 64-bit words (bits past the chunk's last granule clear),
    each inverted where `invert` is set (the clear granules differ)."""
    nbytes = rows.shape[1]
    width = -(-nbytes // 8) * 8
    if width == nbytes and invert is None and gpc % 8 == 0:
        return np.ascontiguousarray(rows)  # the usual case: no copy
    out = np.zeros((len(rows), width), dtype=np.uint8)
    if invert is None:
        out[:, :nbytes] = rows
    else:
        out[:, :nbytes] = rows ^ np.where(invert, 0xFF, 0).astype(np.uint8)[:, None]
    if gpc % 8:  # bits past the last granule of a row are padding
        out[:, nbytes - 1] &= np.uint8((1 << (gpc % 8)) - 1)
    return out


def _union_rows(
    parts: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """The steps' (positions, rows) as one sorted list, rows of one position ORed."""
    parts = [(p, r) for p, r in parts if len(p)]
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 8), dtype=np.uint8)
    if len(parts) == 1:
        return parts[0]  # positions come sorted and distinct from one step
    pos = np.concatenate([p for p, _ in parts])
    rows = np.concatenate([r for _, r in parts])
    order = np.argsort(pos, kind="stable")
    pos, rows = pos[order], rows[order]
    first = np.flatnonzero(np.concatenate([[True], pos[1:] != pos[:-1]]))
    return pos[first], np.bitwise_or.reduceat(rows, first, axis=0)


def _run_edges(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of set bits in each row of a 2-d uint64 array (bit b of word w of a row is
    bit 64 * w + b of the row; runs do not cross rows): (first bits, last bits) as bit
    numbers over the flattened array, sorted. One pass over the words to find the
    nonzero ones; the rest is per nonzero word and per run, never per bit."""
    per_row = words.shape[1]  # a power of two: rows hold ceil(gpc / 8) bytes, padded
    flat = words.reshape(-1)
    idx = np.flatnonzero(flat)
    x = flat[idx]
    top = np.uint64(63)
    prev = nxt = np.zeros(len(idx), dtype=np.uint64)
    if per_row > 1:
        # the neighbour words' adjacent bits carry a run across a word edge in a row
        col = idx & (per_row - 1)
        prev = np.where(col != 0, flat[idx - 1] >> top, prev)
        nxt_i = np.minimum(idx + 1, len(flat) - 1)
        nxt = np.where(col != per_row - 1, flat[nxt_i] << top, nxt)
    starts = x & ~((x << np.uint64(1)) | prev)
    ends = x & ~((x >> np.uint64(1)) | nxt)
    return _bit_numbers(idx, starts), _bit_numbers(idx, ends)


def _bit_numbers(idx: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Sorted numbers (64 * idx + bit) of the set bits of uint64 `words` (idx: their
    word numbers, sorted): one pass per set bit of the fullest word, each over the words
    that still have bits left; set bit j of a word (from its lowest) goes to the word's
    offset + j."""
    nz = words != 0
    idx, w = idx[nz], words[nz]
    at = np.arange(len(idx))  # which of the nonzero words
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    while len(w):
        low = w & (~w + np.uint64(1))  # the lowest set bit
        # a power of two converts to float64 exactly: its exponent is the bit number
        bit = (low.astype(np.float64).view(np.int64) >> 52) - 1023
        parts.append((at, idx[at] * 64 + bit))
        w = w ^ low
        left = w != 0
        at, w = at[left], w[left]
    if not parts:
        return np.zeros(0, dtype=np.int64)
    if len(parts) == 1:
        return parts[0][1]
    count = np.zeros(len(idx), dtype=np.int64)
    for a, _ in parts:
        count[a] += 1
    offset = np.cumsum(count) - count
    out = np.empty(int(count.sum()), dtype=np.int64)
    for j, (a, bits) in enumerate(parts):
        out[offset[a] + j] = bits
    return out


def _merge_sorted(x: Ranges, y: Ranges) -> Ranges:
    """Two sorted lists of disjoint (starts, stops, zero) ranges as one sorted list."""
    if not len(y[0]):
        return x
    if not len(x[0]):
        return y
    pos_x = np.arange(len(x[0])) + np.searchsorted(y[0], x[0], "left")
    pos_y = np.arange(len(y[0])) + np.searchsorted(x[0], y[0], "right")

    def merged(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m = np.empty(len(a) + len(b), dtype=a.dtype)
        m[pos_x], m[pos_y] = a, b
        return m

    return merged(x[0], y[0]), merged(x[1], y[1]), merged(x[2], y[2])


def _refine_blocks(
    geo: Geometry, ka: np.ndarray, kb: np.ndarray, a: State, b: State, nbase_chunks: int
) -> Ranges:
    """Chunks that reach below the base end, compared block by block: the key of a block
    is KEY_BASE where its bit is clear, else its chunk's key. Only chunks where the
    entries or some bit differ are expanded."""
    cs, bs = geo.chunk_size, geo.block_size
    per = cs // bs
    nblocks = -(-geo.bend // bs)
    padded = nbase_chunks * per
    bits_a = np.ones(padded, dtype=bool)  # blocks past the base end: in the image
    bits_b = np.ones(padded, dtype=bool)
    bits_a[:nblocks] = _bits(a.bits, nblocks) if a.bits is not None else True
    bits_b[:nblocks] = _bits(b.bits, nblocks) if b.bits is not None else True
    ba, bb = bits_a.reshape(nbase_chunks, per), bits_b.reshape(nbase_chunks, per)
    cand = np.flatnonzero((ka != kb) | (ba != bb).any(axis=1))
    if not len(cand):
        e = np.zeros(0, dtype=np.uint64)
        return e, e, np.zeros(0, dtype=bool)
    keys_a = np.where(ba[cand], ka[cand][:, None], KEY_BASE)
    keys_b = np.where(bb[cand], kb[cand][:, None], KEY_BASE)
    changed = keys_a != keys_b
    if nblocks % per and nbase_chunks - 1 in cand:
        # the block the base ends in reads the image past bend, even with its bit clear
        row = int(np.searchsorted(cand, nbase_chunks - 1))
        last = (nblocks - 1) % per
        if ka[nbase_chunks - 1] != kb[nbase_chunks - 1]:
            changed[row, last] = True
            changed[row, last + 1 :] = True
    rows, cols = np.nonzero(changed)
    starts = cand[rows].astype(np.uint64) * np.uint64(cs) + cols.astype(np.uint64) * np.uint64(bs)
    stops = np.minimum(starts + np.uint64(bs), np.uint64(geo.size))
    keep = starts < stops
    return starts[keep], stops[keep], (keys_b[rows, cols] == KEY_ZERO)[keep]


def _merge(starts: np.ndarray, stops: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Sorted, disjoint ranges in; adjacent ones with equal flags joined."""
    n = len(starts)
    if n == 0:
        return np.zeros(0, dtype=CHANGED_DTYPE)
    brk = np.ones(n, dtype=bool)
    brk[1:] = (starts[1:] != stops[:-1]) | (zero[1:] != zero[:-1])
    first = np.flatnonzero(brk)
    last = np.empty_like(first)
    last[:-1] = first[1:] - 1
    last[-1] = n - 1
    out = np.empty(len(first), dtype=CHANGED_DTYPE)
    out["start"] = starts[first]
    out["length"] = stops[last] - starts[first]
    out["flags"] = np.where(zero[first], FLAG_ZERO, FLAG_DATA)
    return out


# ----- public entry points ----------------------------------------------------------------
def changed_extents_array(owner: MappedDisk, since: str, until: str | None = None) -> np.ndarray:
    """Ranges whose bytes may differ between snapshot `since` and `until` (or the live
    contents of `owner`): structured array (start, length, flags)."""
    geo, states = _resolve(owner, since, until)
    return compare_chain(geo, states)


class ChangedExtents(Sequence[Extent]):
    """The changed ranges as Extents (fvd.image.Extent: zero ranges have zero=True,
    data=False; depth 0, offset None), made on access from `array` (CHANGED_DTYPE), so a
    million ranges cost nothing until they are looked at."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, i: int) -> Extent: ...

    @overload
    def __getitem__(self, i: slice) -> ChangedExtents: ...

    def __getitem__(self, i: int | slice) -> Extent | ChangedExtents:
        if isinstance(i, slice):
            return ChangedExtents(self.array[i])
        start, length, flags = self.array[i].tolist()
        zero = bool(flags & FLAG_ZERO)
        return Extent(start, length, 0, True, zero, not zero, None)

    def __iter__(self) -> Iterator[Extent]:
        starts, lengths = self.array["start"].tolist(), self.array["length"].tolist()
        zeros = (self.array["flags"] & FLAG_ZERO).astype(bool).tolist()
        for s, n, z in zip(starts, lengths, zeros):
            yield Extent(s, n, 0, True, z, not z, None)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChangedExtents):
            return np.array_equal(self.array, other.array)
        return NotImplemented

    def __repr__(self) -> str:
        return f"<ChangedExtents: {len(self)} ranges, {int(self.array['length'].sum())} bytes>"


def changed_extents(owner: MappedDisk, since: str, until: str | None = None) -> ChangedExtents:
    """The ranges of `changed_extents_array` as a sequence of Extents."""
    return ChangedExtents(changed_extents_array(owner, since, until))
