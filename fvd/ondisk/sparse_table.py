"""Sparse lookup tables (docs/format.md, "Sparse tables"): with INCOMPAT_SPARSE_TABLE
an entry is stored inverted (entry ^ 0xFFFFFFFF), so an unallocated entry is stored as
zeros and an empty table can stay a hole in the file. These helpers encode, decode, find
the 512-byte units that hold anything, and compute the table's crc32 without reading
(or hashing) the zero runs."""

from __future__ import annotations

import zlib
from typing import Any, Iterator

import numpy as np

from fvd.ondisk.fvd_records import INCOMPAT_SPARSE_TABLE, TABLE_DTYPE, UNALLOCATED, ImageHeader

UNIT = 512  # bytes: the granule in which a sparse table is compared and written
UNIT_ENTRIES = UNIT // 4
RESERVE = 4096  # bytes of table given file blocks at once (before entries are set)
_CRC_POLY = 0xEDB88320


def is_sparse(header: ImageHeader) -> bool:
    return bool(header.incompatible_features & INCOMPAT_SPARSE_TABLE)


def encode(table: np.ndarray, sparse: bool) -> np.ndarray:
    """The on-disk entries (TABLE_DTYPE) of an in-memory table."""
    stored = table.astype(TABLE_DTYPE, copy=sparse)  # inverted in place below
    if sparse:
        np.bitwise_xor(stored, UNALLOCATED, out=stored)
    return stored


def decode(raw: Any, sparse: bool) -> np.ndarray:
    """An in-memory (uint32, writable) table from on-disk bytes."""
    table = np.frombuffer(raw, dtype=TABLE_DTYPE).astype(np.uint32)
    if sparse:
        np.bitwise_xor(table, UNALLOCATED, out=table)
    return table


def nonzero_units(stored: np.ndarray) -> np.ndarray:
    """bool per 512-byte unit of the stored table: does it hold a non-zero byte?"""
    n = len(stored)
    whole = n // UNIT_ENTRIES * UNIT_ENTRIES
    mask = stored[:whole].reshape(-1, UNIT_ENTRIES).any(axis=1)
    if whole < n:
        mask = np.append(mask, bool(stored[whole:].any()))
    return np.asarray(mask, dtype=bool)


def unit_runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """[first, stop) runs of True units."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    for first, stop in zip(edges[::2].tolist(), edges[1::2].tolist()):
        yield first, stop


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, m) for m in mat]


def _zero_operators() -> list[list[int]]:
    """The crc register's linear map for 2**k zero bytes, k = 0..63."""
    one_bit = [_CRC_POLY] + [1 << i for i in range(31)]
    ops = [_gf2_square(_gf2_square(_gf2_square(one_bit)))]  # 8 zero bits: one byte
    for _ in range(63):
        ops.append(_gf2_square(ops[-1]))
    return ops


_ZERO_OPS = _zero_operators()


def crc32_zeros(crc: int, length: int) -> int:
    """zlib.crc32(bytes(length), crc) without hashing `length` bytes: zero bytes move
    the register linearly, so apply the map for each power of two in `length`."""
    reg = crc ^ 0xFFFFFFFF
    k = 0
    while length:
        if length & 1:
            reg = _gf2_times(_ZERO_OPS[k], reg)
        length >>= 1
        k += 1
    return reg ^ 0xFFFFFFFF


def stored_crc(stored: np.ndarray, mask: np.ndarray) -> int:
    """zlib.crc32 of the stored table's bytes, hashing only its non-zero units."""
    raw = memoryview(stored.data).cast("B")
    crc, pos = 0, 0
    for first, stop in unit_runs(mask):
        a, b = first * UNIT, min(stop * UNIT, len(raw))
        crc = zlib.crc32(raw[a:b], crc32_zeros(crc, a - pos))
        pos = b
    return crc32_zeros(crc, len(raw) - pos)
