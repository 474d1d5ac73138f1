"""Table-less images (docs/format.md, "Table-less images"): the mapping strategy in which
guest offset x lives at host offset data_offset + x and the host file system allocates
(a sparse file: unwritten ranges are holes, zeroes and trims punch holes).

The core keeps one translation for both modes: for a table-less image its in-memory
table is the identity (virtual chunk v at physical chunk v), built at open and never
stored, so the compiled fast path and its pure-Python twin translate it unchanged and
every chunk counts as allocated: a write never allocates, and without a base it is one
data write (plus the flush of writethrough). The journal then carries only bitmap and
data-crc records of a base image's copy-on-write tracking.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import numpy as np

from fvd.core.journal import bitmap_record
from fvd.errors import TablelessError
from fvd.ondisk.fvd_records import ImageHeader


class TablelessCore(Protocol):
    """What this module uses of fvd.core.image.ImageCore."""

    path: str
    size: int
    block_size: int
    writethrough: bool
    bitmap: Any  # fvd.core.bitmap.Bitmap or None
    lock: Any

    def write(self, offset: int, data: Any) -> int: ...

    def punch_range(self, offset: int, length: int) -> None: ...

    def sync(self) -> None: ...

    def check_open(self) -> None: ...

    def seal_overlapping(self, offset: int, length: int) -> None: ...

    def apply(
        self, changes: dict[int, int], extra: Any = (), after: Optional[Callable[[], None]] = None
    ) -> None: ...


def identity_table(nchunks: int) -> np.ndarray:
    """The in-memory table of a table-less image: chunk v at physical chunk v."""
    return np.arange(nchunks, dtype=np.uint32)


def data_end(header: ImageHeader) -> int:
    """End of a table-less image's data area: the host file's size."""
    return header.data_offset + header.virtual_size


def refuse(path: str, what: str) -> TablelessError:
    """The one-line error for `what` (snapshots, ...) asked of a table-less image."""
    return TablelessError(path, what)


def write_zeroes(core: TablelessCore, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros: holes punched in the file. Blocks a
    base still provides leave it: a block the range covers whole gets its bitmap bit
    (journaled after the punch, so a crash before it leaves the base's bytes, never
    half a range), one it covers in part is written with zeros (copy-on-write)."""
    if offset < 0 or length < 0 or offset + length > core.size:
        raise ValueError(
            f"range [{offset}, {offset + length}) outside the image (size {core.size})"
        )
    end = offset + length
    bm = core.bitmap
    if length == 0:
        return
    # the last journal transaction's data crcs must not cover bytes a punch changes
    core.seal_overlapping(offset, length)
    if bm is None:
        core.punch_range(offset, length)
        if core.writethrough:
            core.sync()
        return
    bs = core.block_size
    inner_s, inner_e = -(-offset // bs) * bs, end // bs * bs
    if inner_e <= inner_s:  # inside one block
        _zero_piece(core, offset, end)
        return
    _zero_piece(core, offset, inner_s)
    _zero_piece(core, inner_e, end)
    with core.lock:
        core.check_open()
        core.punch_range(inner_s, inner_e - inner_s)
        b0, b1 = inner_s // bs, min(inner_e // bs, bm.nblocks)
        if b1 <= b0 or bm.stale_bits(b0, b1).all():
            if core.writethrough:
                core.sync()
            return

        def set_bits() -> None:
            bm.set_range(b0, b1 - b0)

        core.apply({}, [bitmap_record(b0, b1 - b0)], set_bits)


def _zero_piece(core: TablelessCore, start: int, stop: int) -> None:
    """Part of one block: zeros written where the base may still provide the block (the
    write path copies the rest of it), else a punched hole."""
    if stop <= start:
        return
    b = start // core.block_size
    bm = core.bitmap
    if b < bm.nblocks and not bm.stale_bits(b, b + 1)[0]:
        core.write(start, bytes(stop - start))
    else:
        core.punch_range(start, stop - start)
        if core.writethrough:
            core.sync()
