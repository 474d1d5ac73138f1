"""The base-image bitmap: one bit per block of the base, 1 = the block is in the image.

Bit order on disk (docs/format.md, "Base images"): block b is bit (b % 8) of byte b // 8,
least significant bit first.

Two in-memory copies, as in FVD 2011:

* ``fresh`` is authoritative for reads, copy-on-read and prefetch. Copy-on-read and
  prefetch set bits here only ("soft" bits, never journaled).
* ``stale`` holds the bits that are durable or will be at the next flush (on disk, in
  the journal, or in records waiting for the next flush, which syncs the data first).
  A guest write may skip the bitmap only when ``stale`` says every touched block is in
  the image; otherwise it journals the bits, even for blocks copy-on-read filled.

The whole bitmap is written only at a checkpoint, which syncs the data first, so a bit
on disk never names data that could still be lost.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Buffer


class MetaWriter(Protocol):
    """Where the bitmap region is written (fvd.core.image.ImageCore)."""

    def write_meta(self, offset: int, data: bytes) -> object: ...


def set_bits(arr: np.ndarray, first: int, count: int) -> None:
    """Set `count` bits from bit `first` in the uint8 array."""
    if count <= 0:
        return
    end = first + count
    i0, i1 = first >> 3, (end - 1) >> 3
    if i0 == i1:
        arr[i0] |= ((1 << count) - 1) << (first & 7)
        return
    arr[i0] |= (0xFF << (first & 7)) & 0xFF
    if i1 > i0 + 1:
        arr[i0 + 1 : i1] = 0xFF
    arr[i1] |= (1 << (((end - 1) & 7) + 1)) - 1


def get_bits(arr: np.ndarray, first: int, end: int) -> np.ndarray:
    """Bool array of the bits [first, end)."""
    raw = np.unpackbits(arr[first >> 3 : ((end - 1) >> 3) + 1], bitorder="little")
    skip = first & 7
    return raw[skip : skip + end - first].view(bool)


def all_set(arr: np.ndarray, first: int, end: int) -> bool:
    if end - first == 1:
        return bool(arr[first >> 3] >> (first & 7) & 1)
    return bool(get_bits(arr, first, end).all())


class Bitmap:
    def __init__(self, raw: Buffer, nblocks: int, offset: int) -> None:
        self.offset = offset
        self.nblocks = nblocks
        self.fresh = np.frombuffer(bytes(raw), dtype=np.uint8).copy()
        self.stale = self.fresh.copy()

    # Called by journal replay and by guest writes: durable bits.
    def set_range(self, first_block: int, count: int) -> None:
        set_bits(self.fresh, first_block, count)
        set_bits(self.stale, first_block, count)

    def set_soft(self, first_block: int, count: int) -> None:
        """Copy-on-read / prefetch: in memory only, lost (harmlessly) in a crash."""
        set_bits(self.fresh, first_block, count)

    def clear_range(self, first_block: int, count: int) -> None:
        """Repair only: the blocks read from the base again."""
        for arr in (self.fresh, self.stale):
            for b in range(first_block, first_block + count):
                arr[b >> 3] &= ~(1 << (b & 7)) & 0xFF

    def fresh_bits(self, first: int, end: int) -> np.ndarray:
        return get_bits(self.fresh, first, end)

    def stale_bits(self, first: int, end: int) -> np.ndarray:
        return get_bits(self.stale, first, end)

    def count_present(self) -> int:
        return int(np.count_nonzero(get_bits(self.fresh, 0, self.nblocks))) if self.nblocks else 0

    def write(self, img: MetaWriter) -> int:
        """Write the whole region (the caller synced the data first); returns its crc32."""
        self.stale[:] = self.fresh
        data = self.fresh.tobytes()
        img.write_meta(self.offset, data)
        return zlib.crc32(data)
