"""The snapshot metadata of an open image, in memory: the entries, the refcount table,
where the tables lie, and the views open on the snapshots."""

from __future__ import annotations

import threading
import zlib
from typing import Optional, cast

import numpy as np

from fvd.core import journal
from fvd.core.hooks import Record
from fvd.core.image import ImageCore
from fvd.errors import SnapshotNotFoundError
from fvd.features.granular import PartialState
from fvd.features.snapshots.codec import Entry

Run = tuple[int, int]  # (first, count) of a run of physical chunks
NO_RUN: Run = (0, 0)


def chunks_of(img: ImageCore, offset: int, nbytes: int) -> Run:
    """The run of whole chunks holding `nbytes` at host `offset` of the data area."""
    cs, d = img.chunk_size, img.header.data_offset
    return (offset - d) // cs, -(-nbytes // cs)


def front_partial(img: ImageCore) -> Optional[PartialState]:
    """The front's partial chunks (fvd.features.granular installs them), or None."""
    return cast(Optional[PartialState], img.partial)


class SnapshotMeta:
    """Snapshot table, refcounts and open views of one image (in memory)."""

    def __init__(self, img: ImageCore) -> None:
        self.img = img
        self.entries: list[Entry] = []  # in id order
        self.refcount = np.zeros(0, dtype=np.uint16)
        self.table_chunks: Run = NO_RUN  # the snapshot table
        self.refcount_chunks: Run = NO_RUN  # the refcount table
        self.views: dict[int, int] = {}  # snapshot id -> number of open views
        self.views_lock = threading.Lock()  # views close without the image lock
        self.broken: Optional[str] = None  # check mode: why the snapshot table is unusable
        self.dropped: list[str] = []  # check mode: names of damaged entries left out
        self.rewrite = False  # check mode: the revert marker must be cleared

    # ----- layout --------------------------------------------------------------------
    def find(self, name: str, path: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise SnapshotNotFoundError(f"{path}: no snapshot named {name!r}")

    @staticmethod
    def entry_chunks(img: ImageCore, e: Entry) -> list[Run]:
        """The runs of chunks that hold an entry's lookup table, bitmap copy, vm_state
        and granule record."""
        out = [chunks_of(img, e.table_offset, 4 * img.nchunks)]
        if e.bitmap_offset:
            out.append(chunks_of(img, e.bitmap_offset, img.header.bitmap_size))
        if e.vm_size:
            out.append(chunks_of(img, e.vm_offset, e.vm_size))
        if e.granules_offset:
            out.append(chunks_of(img, e.granules_offset, e.granules_size))
        return out

    def metadata_runs(self, img: ImageCore) -> list[Run]:
        out = [r for r in (self.table_chunks, self.refcount_chunks) if r[1]]
        for e in self.entries:
            out.extend(self.entry_chunks(img, e))
        return out

    def meta_mask(self, n: int) -> np.ndarray:
        """Bool array (at least n long) of the chunks holding snapshot metadata."""
        meta = self.metadata_runs(self.img)
        need = max([n] + [a + k for a, k in meta])
        mask = np.zeros(need, dtype=bool)
        for a, k in meta:
            mask[a : a + k] = True
        return mask

    # ----- hooks of the core -----------------------------------------------------------
    def mark_used(self, used: np.ndarray) -> np.ndarray:
        rc = self.refcount
        meta = self.metadata_runs(self.img)
        need = max([len(rc)] + [a + n for a, n in meta])
        if need > len(used):
            grown = np.zeros(need, dtype=bool)
            grown[: len(used)] = used
            used = grown
        used[: len(rc)] |= rc > 0
        for a, n in meta:
            used[a : a + n] = True
        return used

    def copy_chunk(
        self, img: ImageCore, v: int, old: int, new: int, offset: int, length: int
    ) -> list[Record]:
        """Copy the bytes of frozen chunk `old` the write does not cover into `new`."""
        cs = img.chunk_size
        vstart = v * cs
        w0 = max(offset, vstart) - vstart
        w1 = min(offset + length, vstart + cs) - vstart
        if w0 == 0 and w1 >= cs:
            return []
        d = img.header.data_offset
        src, dst = d + old * cs, d + new * cs
        lo, hi = (0 if w0 > 0 else w1), (cs if w1 < cs else w0)
        buf = bytearray(hi - lo)
        img.chunk_map.pread_host(src + lo, buf)
        img.chunk_map.pwritev(dst + lo, [buf])
        if not img.writethrough:
            return []
        out = []
        mv = memoryview(buf)
        for a, b in ((0, w0), (w1, cs)):
            if b > a:
                out.append(journal.data_crc_record(dst + a, b - a, zlib.crc32(mv[a - lo : b - lo])))
        return out
