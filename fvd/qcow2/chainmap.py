"""The map of a whole qcow2 chain in numpy: every cluster's L2 entry of every layer,
resolved top-down at once (cf. `ClusterMixin._extents`, which walks the same tree
extent by extent in Python).

For `extents_array()` of a whole image whose layers are all qcow2 with one cluster size
and sizes that are whole clusters: the common backup chain. Anything else (a raw or fvd
backing file, compressed clusters, reserved bits, odd offsets) returns None and the
caller takes the general path, which raises what it should.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from fvd.qcow2.format import (
    L2E_STD_RESERVED_MASK,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_ZERO,
)
from fvd.qcow2.state import Qcow2State
from fvd.types import EXTENT_DTYPE, FLAG_DATA, FLAG_PRESENT, FLAG_ZERO


def chain_extents(top: Qcow2State) -> Optional[np.ndarray]:
    """EXTENT_DTYPE rows covering the whole of `top`, merged as `extents()` merges them,
    or None when the chain is not one this module handles (module doc)."""
    layers = _layers(top)
    if layers is None:
        return None
    cs = top.cluster_size
    n = -(-top.size // cs)
    depth = np.full(n, len(layers) - 1, dtype=np.int64)  # unallocated: the bottom's
    flags = np.full(n, FLAG_ZERO, dtype=np.uint32)
    host = np.full(n, -1, dtype=np.int64)
    open_ = np.ones(n, dtype=bool)  # not decided yet: reads through to the next layer
    for d, img in enumerate(layers):
        entries = _entries(img, n)
        if entries is None:
            return None
        if img.size < top.size:  # past a shorter backing file: zeros (extents() puts
            past = np.arange(n) >= img.size // cs  # them one below the layer over it)
            take = open_ & past
            depth[take] = d
            open_ &= ~past
        off = (entries & np.uint64(OFFSET_MASK)).astype(np.int64)
        zero = (entries & np.uint64(OFLAG_ZERO)) != 0
        take = open_ & ((off != 0) | zero)
        depth[take] = d
        data = take & ~zero
        flags[take] = np.where(data[take], FLAG_DATA, FLAG_ZERO) | FLAG_PRESENT
        host[take] = np.where(off[take] != 0, off[take], -1)
        open_ &= ~take
    return _runs(depth, flags, host, cs, top.size)


def _layers(top: Qcow2State) -> Optional[list[Qcow2State]]:
    from_top: list[Qcow2State] = []
    img: object = top
    while img is not None:
        if not isinstance(img, type(top)):
            return None  # a raw or fvd backing file
        if img.cluster_size != top.cluster_size or img.size % img.cluster_size:
            return None
        from_top.append(img)
        img = img._backing
    return from_top


def _entries(img: Qcow2State, n: int) -> Optional[np.ndarray]:
    """Native uint64 L2 entries of the first n clusters (0 where there is no table), or
    None when one is unusual."""
    per = img.cluster_size // 8
    out = np.zeros(max(n, 0), dtype=np.uint64)
    for i in np.flatnonzero(img._l1).tolist():
        lo = i * per
        if lo >= n:
            break
        l2_off = img._l2_offset(img._l1, i, img._l1_offset)  # validates the L1 entry
        if l2_off:
            table = img._l2_peek(l2_off).astype(np.uint64)
            out[lo : min(n, lo + per)] = table[: min(n, lo + per) - lo]
    bad = (out & np.uint64(OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK)) != 0
    off = out & np.uint64(OFFSET_MASK)
    bad |= (off % np.uint64(img.cluster_size) != 0) | (off >= np.uint64(img._file_size))
    bad &= out != 0
    if bad.any() or (img._version == 2 and ((out & np.uint64(OFLAG_ZERO)) != 0).any()):
        return None
    return out


def _runs(depth: np.ndarray, flags: np.ndarray, host: np.ndarray, cs: int, size: int) -> np.ndarray:
    n = len(depth)
    if n == 0:
        return np.zeros(0, dtype=EXTENT_DTYPE)
    brk = np.ones(n, dtype=bool)
    brk[1:] = (
        (depth[1:] != depth[:-1])
        | (flags[1:] != flags[:-1])
        | ((host[1:] < 0) != (host[:-1] < 0))
        | ((host[1:] >= 0) & (host[1:] != host[:-1] + cs))
    )
    heads = np.flatnonzero(brk)
    ends = np.append(heads[1:], n)
    out = np.zeros(len(heads), dtype=EXTENT_DTYPE)
    out["start"] = heads.astype(np.uint64) * np.uint64(cs)
    stop = np.minimum(ends.astype(np.uint64) * np.uint64(cs), np.uint64(size))
    out["length"] = stop - out["start"]
    out["flags"] = flags[heads]
    out["depth"] = depth[heads]
    out["offset"] = host[heads]
    return out
