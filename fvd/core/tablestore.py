"""Reading and writing a sparse lookup table (docs/format.md, "Sparse tables").

A sparse table is read by its data runs (SEEK_DATA: a hole is all unallocated), and a
checkpoint writes only the 512-byte units that differ from what the file holds, so a
16 TiB image with a few writes keeps a table of a few KiB on disk. Its crc32 is computed
without hashing the zero runs (fvd.ondisk.sparse_table.crc32_zeros).
"""

from __future__ import annotations

import mmap
import zlib
from typing import Callable, Protocol

import numpy as np

from fvd.fileio import data_runs
from fvd.ondisk import sparse_table as sp
from fvd.ondisk.fvd_records import UNALLOCATED


class MetaIO(Protocol):
    """What the table store needs of the image core."""

    fd: int

    def read_meta(self, offset: int, length: int) -> bytes: ...

    def write_meta(self, offset: int, data: bytes) -> None: ...


def _aligned_runs(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Byte runs (relative to `start`) of [start, end) that may hold data, widened to
    whole 512-byte units."""
    runs: list[tuple[int, int]] = []
    for a, b, is_data in data_runs(fd, start, end):
        if is_data:
            lo = (a - start) // sp.UNIT * sp.UNIT
            hi = min(-(-(b - start) // sp.UNIT) * sp.UNIT, end - start)
            if runs and lo <= runs[-1][1]:
                runs[-1] = (runs[-1][0], max(runs[-1][1], hi))
            else:
                runs.append((lo, hi))
    return runs


def unallocated_table(nchunks: int) -> np.ndarray:
    """A writable table of `nchunks` UNALLOCATED entries. A large one lives in an
    anonymous mapping populated in one call (MAP_POPULATE): faulting 64 MiB in page by
    page costs several times as much, and this is most of what opening a sparse 16 TiB
    image does."""
    if nchunks < 1 << 18:
        return np.full(nchunks, UNALLOCATED, dtype=np.uint32)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    table = np.frombuffer(mmap.mmap(-1, 4 * nchunks, flags=flags), dtype=np.uint32)
    table.fill(UNALLOCATED)
    return table


def load(core: MetaIO, offset: int, nchunks: int, want_crc: bool) -> tuple[np.ndarray, int]:
    """(table, crc32 of its stored bytes or 0 when not wanted) of a sparse table:
    only its data runs are read."""
    table = unallocated_table(nchunks)
    size = 4 * nchunks
    crc, pos = 0, 0
    for a, b in _aligned_runs(core.fd, offset, offset + size):
        raw = core.read_meta(offset + a, b - a)
        table[a // 4 : b // 4] = sp.decode(raw, True)
        if want_crc:
            crc = zlib.crc32(raw, sp.crc32_zeros(crc, a - pos))
            pos = b
    if want_crc:
        crc = sp.crc32_zeros(crc, size - pos)
    return table, crc


def store(core: MetaIO, offset: int, table: np.ndarray) -> int:
    """Write the units of a sparse table that differ from the file; returns its crc32."""
    stored = sp.encode(table, True)
    mask = sp.nonzero_units(stored)
    raw = memoryview(stored.data).cast("B")
    size = len(raw)
    on_disk = np.zeros(len(mask), dtype=bool)
    for a, b in _aligned_runs(core.fd, offset, offset + size):
        on_disk[a // sp.UNIT : -(-b // sp.UNIT)] = True
    for first, stop in sp.unit_runs(mask | on_disk):
        a, b = first * sp.UNIT, min(stop * sp.UNIT, size)
        old = core.read_meta(offset + a, b - a) if on_disk[first:stop].any() else None
        _write_changed(core.write_meta, offset, raw, a, b, old)
    return sp.stored_crc(stored, mask)


def _write_changed(
    write: Callable[[int, bytes], None],
    offset: int,
    raw: memoryview,
    a: int,
    b: int,
    old: bytes | None,
) -> None:
    """Write the units of raw[a:b] that differ from `old` (None: the file holds zeros
    there, so write the non-zero units)."""
    new = np.frombuffer(raw[a:b], dtype=np.uint8)
    ref = np.zeros(b - a, dtype=np.uint8) if old is None else np.frombuffer(old, np.uint8)
    pad = -(b - a) % sp.UNIT
    diff = np.concatenate((new != ref, np.zeros(pad, dtype=bool))).reshape(-1, sp.UNIT)
    for first, stop in sp.unit_runs(np.asarray(diff.any(axis=1))):
        lo, hi = a + first * sp.UNIT, min(a + stop * sp.UNIT, b)
        write(offset + lo, bytes(raw[lo:hi]))


def pieces(table: np.ndarray) -> tuple[list[tuple[int, bytes]], int]:
    """(the non-zero (offset, bytes) runs of a sparse table's stored form, its crc32):
    what a fresh, zeroed region needs written to hold the table."""
    stored = sp.encode(table, True)
    mask = sp.nonzero_units(stored)
    raw = memoryview(stored.data).cast("B")
    out = []
    for first, stop in sp.unit_runs(mask):
        a, b = first * sp.UNIT, min(stop * sp.UNIT, len(raw))
        out.append((a, bytes(raw[a:b])))
    return out, sp.stored_crc(stored, mask)
