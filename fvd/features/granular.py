"""Block-granular copy-on-write after snapshots (docs/format.md, "Partial chunks").

The front's first write into a chunk a snapshot holds (frozen) allocates a new chunk N and
writes only the granules the write touches (4 KiB each by default; head and tail of a
granule the write covers only in part are copied from the held chunk). Until every
granule of N is written, the held chunk S is N's private base: granule g of the virtual
chunk reads from N when its bit is set, else from S. Such a chunk is *partial*.

In memory, per image: ``slot`` (uint32 per virtual chunk, NONE or a slot index) and per
slot the source chunk (``src``) and a bitmap row (``bits``). The chunk maps of both
implementations view these arrays (ChunkMap.set_partial) and split reads by the bits on
the fast path. Slots are handed out append-only and arrays only grow (old ones are kept)
while the image is open, so a lock-free reader never sees a slot reused under it.

Lifecycle:
  * first write into a frozen chunk: new slot, data into N, then publish (slot, then table);
    journal TABLE + GRANULE (+ DATA_CRC in writethrough) records in one transaction;
  * a write into unwritten granules of a partial chunk: data, bits, one GRANULE record;
  * all granules written: the chunk is complete, the slot goes, S is released unless a
    snapshot still holds it;
  * create_snapshot copies nothing: the snapshot holds each partial chunk as the pair
    (N, S), its granule record; refcounts count N and S, so both are frozen;
  * a write into a partial chunk whose N is frozen copies forward: a new chunk takes N's
    written granules the write does not cover, then the write; S stays the source; the
    copied granules are *carried* from N (provenance: `cfrom`, and their `wbits` clear,
    so the first write into one takes the slow path and drops it), which snapshot
    records and the checkpoint's map keep, so changed extents do not report them again;
  * write_zeroes of the whole chunk, revert: the partial state is dropped (revert to a
    snapshot with a record gives the front whole chunks: complete_record);
  * delete_snapshot never frees a chunk that is a partial chunk's source;
  * checkpoint: the whole partial map is written copy-on-write to new chunks of the data
    area, the header points at it (fields partial_map_*), the old map is released.
Images with a base keep the whole-chunk copy (a chunk there also has base bitmap bits).
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

from fvd.core.bitmap import set_bits
from fvd.core.hooks import PartialChunks
from fvd.core.image import ImageCore
from fvd.core.journal import data_crc_record, granule_record
from fvd.errors import CorruptImageError, io_error
from fvd.fileio import data_runs, file_size, punch_hole
from fvd.ondisk import format as fmt
from fvd.ondisk import fvd_records as fr
from fvd.types import CheckResult
from fvd.units import flag_runs

U32 = npt.NDArray[np.uint32]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
Flags = npt.NDArray[np.bool_]
Plan = dict[int, int]  # virtual chunk -> new physical chunk
Records = list[bytes]
Afters = list[Callable[[], None]]
Slots = list[tuple[int, int]]  # (virtual chunk, slot) of first writes
Record = tuple[I64, U32, U8]  # (chunks, sources, rows) of a decoded map (decode_map)
Piece = Union[bytes, bytearray, memoryview]


def _run_all(calls: Afters) -> None:
    for call in calls:
        call()


NONE = 0xFFFFFFFF
MAP_MAGIC = fr.PARTIAL_MAP_MAGIC
MAP_HEAD = fr.S_PARTIAL_MAP_HEAD  # magic count granule_size flags
ENTRY_HEAD = fr.S_PARTIAL_MAP_ENTRY_HEAD  # virtual_chunk source_chunk, then the bit row
MAP_FLAG_PROVENANCE = fr.PARTIAL_MAP_FLAG_PROVENANCE  # a provenance section follows


def _pad8(n: int) -> int:
    return (n + 7) & ~7


class PartialState:
    """The front's partial chunks (see module doc)."""

    def __init__(
        self, nchunks: int, chunk_size: int, size: int, granule: int = fmt.DEFAULT_GRANULE
    ) -> None:
        self.nchunks = nchunks
        self.chunk_size = chunk_size
        self.size = size
        self.gsize = granule
        self.gshift = granule.bit_length() - 1
        self.gpc = chunk_size // granule
        self.gbytes = -(-self.gpc // 8)
        self.slot = np.zeros(0, dtype=np.uint32)  # full size on first use
        self.src = np.zeros(0, dtype=np.uint32)
        self.bits = np.zeros(0, dtype=np.uint8)
        # provenance (docs/format.md section 10, "Provenance"): per slot, the chunk its
        # carried granules were copied from (NONE: none), and `wbits`, the written granules
        # that are not carried (the fast path writes only there). Carried = bits & ~wbits.
        self.cfrom = np.zeros(0, dtype=np.uint32)
        self.wbits = np.zeros(0, dtype=np.uint8)
        self.used = 0  # slots handed out (append-only)
        self.active = 0  # partial chunks now
        self.map_run = (0, 0)  # (first, count) of the on-disk map
        self.map_provenance = False  # the on-disk map has a provenance section
        self.old_run = (0, 0)  # released after the next header
        self._keep: list[tuple[U32, U8, U8]] = []  # arrays lock-free readers may view
        self.cmap: Any = None  # the chunk map (fvd._impl: compiled or the twin)
        self.wait: Optional[Callable[[], None]] = None  # grace period of the chunk map

    # ----- in-memory structure ------------------------------------------------------
    def install(self, cmap: Any, wait: Optional[Callable[[], None]] = None) -> None:
        """Let the chunk map view the arrays; `wait()` returns once every call registered
        with the map before it has finished (Image: the allocator's quiesce)."""
        self.cmap = cmap
        self.wait = wait
        cmap.set_partial(self.slot, self.src, self.bits, self.gsize, self.wbits)

    def _reinstall(self) -> None:
        """New (grown) arrays: a call in flight may still view the old ones, which hold
        no slot numbered past their end; so wait for those calls before any such slot is
        published (a slot index past a viewed array would read outside it)."""
        if self.cmap is not None:
            self.cmap.set_partial(self.slot, self.src, self.bits, self.gsize, self.wbits)
            if self.wait is not None:
                self.wait()

    def slot_of(self, v: int) -> Optional[int]:
        if len(self.slot) == 0:
            return None
        k = int(self.slot[v])
        return None if k == NONE else k

    def new_slot(self, v: int, source: int) -> int:
        """A slot for virtual chunk v with all bits clear (not yet published)."""
        changed = False
        if len(self.slot) == 0:
            self.slot = np.full(self.nchunks, NONE, dtype=np.uint32)
            changed = True
        if self.used >= len(self.src):
            self._grow(max(64, 2 * len(self.src)))
            changed = True
        k = self.used
        self.used += 1
        self.src[k] = source
        self.cfrom[k] = NONE
        self.row(k)[:] = 0
        self.wrow(k)[:] = 0
        self._past_end(v, k)
        if changed:
            self._reinstall()
        return k

    def _grow(self, cap: int) -> None:
        """Arrays for `cap` slots (the old ones kept: in-flight readers may view them)."""
        n = len(self.src)
        self._keep.append((self.src, self.bits, self.wbits))
        src = np.zeros(cap, dtype=np.uint32)
        src[:n] = self.src
        cfrom = np.full(cap, NONE, dtype=np.uint32)
        cfrom[:n] = self.cfrom
        bits = np.zeros(cap * self.gbytes, dtype=np.uint8)
        bits[: len(self.bits)] = self.bits
        wbits = np.zeros(cap * self.gbytes, dtype=np.uint8)
        wbits[: len(self.wbits)] = self.wbits
        self.src, self.cfrom, self.bits, self.wbits = src, cfrom, bits, wbits

    def _past_end(self, v: int, k: int) -> None:
        """Granules past the end of the image are never read: count them as written."""
        end_g = -(-(self.size - v * self.chunk_size) // self.gsize)
        if end_g < self.gpc:
            self._set(self.row(k), end_g, self.gpc)
            self._set(self.wrow(k), end_g, self.gpc)

    def load_record(
        self,
        chunks: I64,
        sources: U32,
        rows: U8,
        origins: Optional[U32] = None,
        carried: Optional[U8] = None,
    ) -> None:
        """Take decoded partial chunks (decode_map; with provenance, decode_provenance's
        origins and carried rows) all at once: a snapshot view's, the front's after a
        revert, or the partial map at open (no slot may exist yet)."""
        assert self.active == 0
        n = len(chunks)
        if not n:
            return
        self._keep.append((self.src, self.bits, self.wbits))
        self.slot = np.full(self.nchunks, NONE, dtype=np.uint32)
        self.src = self.cfrom = np.zeros(0, dtype=np.uint32)
        self.bits = self.wbits = np.zeros(0, dtype=np.uint8)
        self._grow(max(64, n))
        self.src[:n] = sources
        self.bits[: n * self.gbytes] = rows.reshape(-1)
        written = rows if carried is None else rows & ~carried  # carried: not in wbits
        self.wbits[: n * self.gbytes] = written.reshape(-1)
        if origins is not None:
            self.cfrom[:n] = origins
        self.slot[np.asarray(chunks, dtype=np.int64)] = np.arange(n, dtype=np.uint32)
        self.used = self.active = n
        self._reinstall()

    def partial_chunks(self) -> PartialChunks:
        """The partial chunks now, copied (PartialChunks, with their provenance); the
        caller holds the image lock."""
        chunks = np.flatnonzero(self.slot != NONE) if self.active else np.zeros(0, np.int64)
        slots = self.slot[chunks].astype(np.int64)
        rows = self.bits[: self.used * self.gbytes].reshape(-1, self.gbytes)[slots]
        wrows = self.wbits[: self.used * self.gbytes].reshape(-1, self.gbytes)[slots]
        origins = self.cfrom[slots].copy()
        carried = rows & ~wrows
        carried[origins == NONE] = 0
        return PartialChunks(chunks, self.src[slots].copy(), rows, origins, carried)

    def row(self, k: int) -> U8:
        return self.bits[k * self.gbytes : (k + 1) * self.gbytes]

    def wrow(self, k: int) -> U8:
        return self.wbits[k * self.gbytes : (k + 1) * self.gbytes]

    @staticmethod
    def _set(row: U8, g0: int, g1: int) -> None:

        set_bits(row, g0, g1 - g0)

    def set_granules(self, k: int, g0: int, g1: int) -> None:
        """Granules g0..g1-1 are written (bits first: wbits stays a subset of bits)."""
        self._set(self.row(k), g0, g1)
        self._set(self.wrow(k), g0, g1)

    def carries(self, k: int) -> bool:
        """Slot k has carried granules (with an origin)."""
        return self.cfrom[k] != NONE and bool((self.row(k) & ~self.wrow(k)).any())

    def uncarry(self, k: int, g0: int, g1: int) -> None:
        """Granules g0..g1-1 are about to be rewritten: they lose their provenance."""
        self._set(self.wrow(k), g0, g1)

    def carry(self, v: int, k: int, held: int) -> None:
        """Copy-forward from `held` (before the new chunk is published): every granule
        written before now holds held's bytes (carried: wbits clear, origin `held`); the
        write's own granules get their wbits with their bits (set_granules). Granules
        past the end of the image stay in wbits."""
        wrow = self.wrow(k)
        wrow[:] = 0
        end_g = -(-(self.size - v * self.chunk_size) // self.gsize)
        if end_g < self.gpc:
            self._set(wrow, end_g, self.gpc)
        self.cfrom[k] = held

    def flags(self, k: int) -> Flags:
        """bool array of the slot's granule bits."""
        return np.unpackbits(self.row(k), bitorder="little")[: self.gpc].view(bool)

    def complete(self, k: int) -> bool:
        return bool(self.flags(k).all())

    def publish(self, v: int, k: int) -> None:
        self.slot[v] = k
        self.active += 1

    def drop(self, v: int) -> Optional[int]:
        """v is no longer partial; returns its source chunk (or None)."""
        k = self.slot_of(v)
        if k is None:
            return None
        self.slot[v] = NONE
        self.active -= 1
        return int(self.src[k])

    def entries(self) -> list[tuple[int, int]]:
        """[(virtual chunk, slot)] of the partial chunks, in chunk order."""
        if not self.active:
            return []
        vs = np.flatnonzero(self.slot != NONE)
        return [(int(v), int(self.slot[v])) for v in vs]

    def sources(self) -> I64:
        if not self.active:
            return np.zeros(0, dtype=np.int64)
        out: I64 = self.src[self.slot[self.slot != NONE]].astype(np.int64)
        return out

    def clear(self) -> None:
        """Forget every partial chunk (revert, or a pending revert at open)."""
        if self.active:
            self.slot[:] = NONE
            self.active = 0

    def mark_used(self, used: Flags) -> Flags:
        """Sources and the on-disk map are in use."""
        extra = [self.sources()]
        for a, n in (self.map_run, self.old_run):
            if n:
                extra.append(np.arange(a, a + n))
        idx = np.concatenate(extra)
        if len(idx):
            need = int(idx.max()) + 1
            if need > len(used):
                grown = np.zeros(need, dtype=bool)
                grown[: len(used)] = used
                used = grown
            used[idx] = True
        return used

    # ----- runs for extents ------------------------------------------------------------
    def host_runs(
        self, k: int, entry: int, start: int, stop: int, chunk_start: int, data_offset: int
    ) -> Iterator[tuple[int, int, int]]:
        """(s, e, host) runs of [start, stop) inside partial chunk (entry, slot k)."""
        cs, gs = self.chunk_size, self.gsize
        fl = self.flags(k)
        g0 = (start - chunk_start) // gs
        g1 = -(-(stop - chunk_start) // gs)
        for a, b, mine in flag_runs(fl[g0:g1]):
            s = max(start, chunk_start + (g0 + a) * gs)
            e = min(stop, chunk_start + (g0 + b) * gs)
            p = entry if mine else int(self.src[k])
            yield s, e, data_offset + p * cs + (s - chunk_start)

    # ----- replay ----------------------------------------------------------------------
    def forget(self, first: int, count: int) -> None:
        """A TABLE record remapped chunks [first, first+count): no longer partial."""
        if self.active:
            for v in np.flatnonzero(self.slot[first : first + count] != NONE):
                self.drop(first + int(v))

    def replay(self, table: U32, start: int, count: int, payload: tuple[int, int]) -> None:
        chunk, source = payload
        v = start // self.gpc
        if int(table[v]) != chunk:
            return  # the chunk was remapped later in the same window
        k = self.slot_of(v)
        if k is None or int(self.src[k]) != source:
            if k is not None:
                self.drop(v)
            k = self.new_slot(v, source)
            self.publish(v, k)
        g0 = start % self.gpc
        self.set_granules(k, g0, g0 + count)
        if self.complete(k):
            self.drop(v)

    # ----- on-disk map -----------------------------------------------------------------
    def encode(self, provenance: bool = False) -> bytes:
        """The partial map (docs/format.md section 10); with `provenance` (a snapshot's
        granule record), the provenance section after the entries when some granule is
        carried (then head flag bit 0 is set; without carried granules the record is the
        plain layout)."""
        entries = self.entries()
        pad = bytes(_pad8(self.gbytes) - self.gbytes)
        prov = []
        if provenance:
            for _v, k in entries:
                carried = self.row(k) & ~self.wrow(k)
                origin = int(self.cfrom[k])
                if origin == NONE or not carried.any():
                    origin, carried = NONE, np.zeros_like(carried)
                prov.append(ENTRY_HEAD.pack(origin, 0) + carried.tobytes() + pad)
            if all(ENTRY_HEAD.unpack_from(p)[0] == NONE for p in prov):
                prov = []
        flags = MAP_FLAG_PROVENANCE if prov else 0
        body = bytearray(MAP_HEAD.pack(MAP_MAGIC, self.active, self.gsize, flags))
        for v, k in entries:
            body += ENTRY_HEAD.pack(v, int(self.src[k]))
            body += self.row(k).tobytes() + pad
        for p in prov:
            body += p
        return bytes(body)

    def load(self, img: ImageCore, raw: bytes, where: int) -> None:
        """The partial map read at open (decode_map). Its provenance section is taken
        only after a clean shutdown: then no write followed the checkpoint that wrote
        it; after a crash a carried granule may have been written since (docs/format.md
        section 10, "Provenance")."""
        path = img.path
        try:
            chunks, sources, rows = decode_map(
                raw, self.nchunks, self.chunk_size, self.gsize, path, where
            )
            prov = decode_provenance(raw, len(chunks), self.chunk_size, self.gsize, path, where)
        except CorruptImageError as e:
            img.problem(e.offset, f"partial map: {e.what}")
            return
        if prov is None or img.header.clean_shutdown != 1:
            self.load_record(chunks, sources, rows)
        else:
            self.load_record(chunks, sources, rows, *prov)

    def write_map(self, img: ImageCore) -> None:
        """Checkpoint: the map goes to new chunks (the header write commits it)."""
        h = img.header
        if not self.active and not h.partial_map_offset:
            return
        self.old_run = self.map_run
        if self.active:
            raw = self.encode(provenance=True)
            self.map_provenance = bool(raw[12] & MAP_FLAG_PROVENANCE)
            n = -(-len(raw) // self.chunk_size)
            first = img.allocator.allocate_run(n)
            img.grow_frozen(first + n)
            off = img.header.data_offset + first * self.chunk_size
            img.write_meta(off, raw)
            self.map_run = (first, n)
            img.header = img.header.replace(
                partial_map_offset=off,
                partial_map_size=len(raw),
                partial_map_crc=zlib.crc32(raw),
                granule_size=self.gsize,
            )
        else:
            self.map_run = (0, 0)
            self.map_provenance = False
            img.header = img.header.replace(
                partial_map_offset=0, partial_map_size=0, partial_map_crc=0
            )

    def after_checkpoint(self, img: ImageCore) -> None:
        a, n = self.old_run
        self.old_run = (0, 0)
        if n:
            img.allocator.release_now(range(a, a + n))

    # ----- check -------------------------------------------------------------------------
    def validate(self, img: ImageCore) -> None:
        """After replay: every partial chunk maps an allocated chunk, its source lies in
        the file, is not mapped by the front and backs only this chunk."""
        if not self.active:
            return
        t = img.table
        seen = {}
        mapped = {int(x) for x in t[t < fmt.ZERO_CHUNK]}
        h = img.header
        where = h.partial_map_offset
        nphys = -(-(file_size(img.fd) - img.header.data_offset) // self.chunk_size)
        for v, k in self.entries():
            s = int(self.src[k])
            e = int(t[v])
            if e >= fmt.ZERO_CHUNK or s in mapped or s in seen or s >= nphys:
                img.problem(
                    where,
                    f"partial chunk {v} (entry {e}) has a bad source chunk "
                    f"{s} (unmapped, shared, or past the end of the file)",
                )
                self.drop(v)
                continue
            seen[s] = v

    # ----- the write path ---------------------------------------------------------------
    def takes(self, img: ImageCore, offset: int, length: int) -> bool:
        """True when a chunk under the range is partial or frozen (granular COW)."""
        snaps = img.snapshot_state
        if not self.active and (snaps is None or not snaps.has_snapshots()) or length == 0:
            return False
        cs = self.chunk_size
        for v in range(offset // cs, (offset + length - 1) // cs + 1):
            if self.slot_of(v) is not None:
                return True
            e = int(img.table[v])
            if e < fmt.ZERO_CHUNK and img.is_frozen(e):
                return True
        return False

    def write(self, img: ImageCore, offset: int, mv: memoryview) -> int:
        """A write touching partial or frozen chunks (img.lock held): chunk by chunk,
        one journal transaction for all. As everywhere (Image._apply), data goes to the
        chunks first and table entries and granule bits are published after the records
        are durable (writethrough) or queued (writeback)."""
        cs = self.chunk_size
        plan: Plan = {}
        records: Records = []
        afters: Afters = []
        slots: Slots = []
        end = offset + len(mv)
        pos = offset
        try:
            while pos < end:
                v = pos // cs
                stop = min(end, (v + 1) * cs)
                piece = mv[pos - offset : stop - offset]
                e = int(img.table[v])
                k = self.slot_of(v)
                if k is not None and img.is_frozen(e) and self.complete(k):
                    self._restart(img, v, e, pos, piece, plan, records, slots, afters)
                elif k is not None and img.is_frozen(e):
                    self._copy_forward(img, v, k, e, pos, piece, plan, records, afters)
                elif k is not None:
                    self._write_partial(img, v, k, e, pos, piece, records, afters)
                elif e < fmt.ZERO_CHUNK and img.is_frozen(e):
                    self._first_write(img, v, e, pos, piece, plan, records, slots)
                else:
                    img.prepare_chunks(pos, stop - pos, plan, records)
                    img.write_planned(pos, piece, plan)
                pos = stop
        except BaseException:
            self._unpublish(img, slots)
            img.abandon(plan)
            raise
        if not (plan or records):
            if img.writethrough:
                img.sync()
            return len(mv)
        try:
            img.apply(plan, records, lambda: _run_all(afters))
        except BaseException:
            self._unpublish(img, slots)
            raise
        return len(mv)

    def _unpublish(self, img: ImageCore, slots: Slots) -> None:
        """Slots of first writes whose table entry was never published."""
        for v, k in slots:
            if self.slot_of(v) == k and int(img.table[v]) == int(self.src[k]):
                self.drop(v)

    def _span(self, v: int, pos: int, n: int) -> tuple[int, int, int, int]:
        w0 = pos - v * self.chunk_size
        w1 = w0 + n
        return w0, w1, w0 >> self.gshift, -(-w1 // self.gsize)

    def _read_src(self, img: ImageCore, source: int, lo: int, hi: int) -> bytearray:
        buf = bytearray(hi - lo)
        img.chunk_map.pread_host(img.header.data_offset + source * self.chunk_size + lo, buf)
        return buf

    def _edges(
        self,
        img: ImageCore,
        source: int,
        w0: int,
        w1: int,
        g0: int,
        g1: int,
        need_head: bool,
        need_tail: bool,
    ) -> tuple[Piece, Piece]:
        """Head [g0*gs, w0) and tail [w1, g1*gs) copied from the source (one read when
        both lie in one granule)."""
        gs = self.gsize
        a, b = g0 * gs, g1 * gs
        head: Piece = b""
        tail: Piece = b""
        if need_head and need_tail and g1 - g0 == 1:
            both = self._read_src(img, source, a, b)
            return memoryview(both)[: w0 - a], memoryview(both)[w1 - a :]
        if need_head and w0 > a:
            head = self._read_src(img, source, a, w0)
        if need_tail and b > w1:
            tail = self._read_src(img, source, w1, b)
        return head, tail

    def _put(
        self, img: ImageCore, chunk: int, lo: int, pieces: Sequence[Piece], records: Records
    ) -> None:
        """One data write of pieces at chunk-relative lo; DATA_CRC in writethrough (replay
        must not trust the records if these bytes did not reach the disk)."""
        host = img.header.data_offset + chunk * self.chunk_size + lo
        img.chunk_map.pwritev(host, [p for p in pieces if len(p)])
        if img.writethrough:
            crc, n = 0, 0
            for p in pieces:
                crc = zlib.crc32(p, crc)
                n += len(p)
            records.append(data_crc_record(host, n, crc))

    def _first_write(
        self,
        img: ImageCore,
        v: int,
        source: int,
        pos: int,
        piece: memoryview,
        plan: Plan,
        records: Records,
        slots: Slots,
    ) -> None:
        """New chunk for held chunk `source`: only the touched granules are written. The
        slot goes live before the table entry: while the table still maps the source,
        every granule reads the source whatever its bit."""
        w0, w1, g0, g1 = self._span(v, pos, len(piece))
        head, tail = self._edges(
            img, source, w0, w1, g0, g1, w0 % self.gsize != 0, w1 % self.gsize != 0
        )
        new = img.allocator.allocate()
        plan[v] = new  # abandoned with the plan on failure
        img.grow_frozen(new)
        self._put(img, new, w0 - len(head), (head, piece, tail), records)
        if g0 == 0 and g1 >= self.gpc:
            return  # the whole chunk is written: not partial
        k = self.new_slot(v, source)
        self.set_granules(k, g0, g1)
        if self.complete(k):
            return  # the rest lies past the end of the image
        self.publish(v, k)
        slots.append((v, k))
        records.append(granule_record(v * self.gpc + g0, g1 - g0, new, source))

    def _write_partial(
        self,
        img: ImageCore,
        v: int,
        k: int,
        chunk: int,
        pos: int,
        piece: memoryview,
        records: Records,
        afters: Afters,
    ) -> None:
        w0, w1, g0, g1 = self._span(v, pos, len(piece))
        fl = self.flags(k)
        if fl[g0:g1].all():
            self.uncarry(k, g0, g1)  # before the bytes change: never a stale provenance
            img.chunk_map.pwritev(img.header.data_offset + chunk * self.chunk_size + w0, [piece])
            return
        source = int(self.src[k])
        gs = self.gsize
        head, tail = self._edges(
            img,
            source,
            w0,
            w1,
            g0,
            g1,
            bool(w0 % gs and not fl[g0]),
            bool(w1 % gs and not fl[g1 - 1]),
        )
        self._put(img, chunk, w0 - len(head), (head, piece, tail), records)
        records.append(granule_record(v * self.gpc + g0, g1 - g0, chunk, source))
        afters.append(lambda: self._granules_done(img, v, k, g0, g1))

    def _copy_forward(
        self,
        img: ImageCore,
        v: int,
        k: int,
        held: int,
        pos: int,
        piece: memoryview,
        plan: Plan,
        records: Records,
        afters: Afters,
    ) -> None:
        """First write into a partial chunk a snapshot holds (its N `held` is frozen, its
        source S too): a new chunk takes the written granules of `held` the write does
        not cover (copied), then the write; S stays the source of the same slot. The
        journal restates every bit of the chunk (a TABLE record ends a partial state at
        replay). Published as a first write: the table entry after the records, then the
        new bits (until then the new granules read S, the old contents)."""
        w0, w1, g0, g1 = self._span(v, pos, len(piece))
        gs, source = self.gsize, int(self.src[k])
        fl = self.flags(k)
        new = img.allocator.allocate()
        plan[v] = new  # abandoned with the plan on failure
        img.grow_frozen(new)
        carried = fl.copy()
        carried[g0:g1] = False
        for a, b, mine in flag_runs(carried):
            if mine:
                self._put(img, new, a * gs, (self._read_src(img, held, a * gs, b * gs),), records)
        head: Piece = b""
        tail: Piece = b""
        if w0 % gs:
            head = self._read_src(img, held if fl[g0] else source, g0 * gs, w0)
        if w1 % gs:
            tail = self._read_src(img, held if fl[g1 - 1] else source, w1, g1 * gs)
        self._put(img, new, w0 - len(head), (head, piece, tail), records)
        written = fl.copy()
        written[g0:g1] = True
        for a, b, mine in flag_runs(written):
            if mine:
                records.append(granule_record(v * self.gpc + a, b - a, new, source))
        # the copied granules hold held's bytes (while the table maps held, which is
        # frozen, no fast write reads wbits of this slot): their provenance
        self.carry(v, k, held)
        afters.append(lambda: self._forward_done(img, v, k, g0, g1))

    def _restart(
        self,
        img: ImageCore,
        v: int,
        held: int,
        pos: int,
        piece: memoryview,
        plan: Plan,
        records: Records,
        slots: Slots,
        afters: Afters,
    ) -> None:
        """First write into a complete chunk a snapshot holds (kept partial for the
        provenance of its carried granules): `held` reads whole, so it becomes the source
        of a new partial chunk, as in a first write (nothing is copied, and the granules
        not written read `held`: unchanged against the snapshot, no provenance needed).
        The old source leaves the front once the new entry is published. Every bit of
        the old state is set, so readers read `held` with or without it."""
        old = self.drop(v)
        afters.append(lambda: self._release_source(img, old))
        self._first_write(img, v, held, pos, piece, plan, records, slots)

    def _forward_done(self, img: ImageCore, v: int, k: int, g0: int, g1: int) -> None:
        """Published N2 in the table: once no reader still holds N from before (N's bytes
        under the new bits are not the chunk's), the new bits."""
        if self.wait is not None:
            self.wait()
        self._granules_done(img, v, k, g0, g1)

    def _granules_done(self, img: ImageCore, v: int, k: int, g0: int, g1: int) -> None:
        """Published: the granules read from the chunk; a complete chunk leaves its source,
        unless it has carried granules: then it stays partial with every bit set, so
        that the next snapshot records their provenance (_restart ends it)."""
        if self.slot_of(v) != k:
            return
        self.set_granules(k, g0, g1)
        if self.complete(k) and not self.carries(k):
            self._release_source(img, self.drop(v))

    def _release_source(self, img: ImageCore, source: Optional[int]) -> None:
        if source is not None and not img.is_frozen(source):
            img.allocator.release(source)  # only the front used it (its snapshot is gone)

    # ----- completion (revert) ----------------------------------------------------------
    def _copy_run(self, img: ImageCore, source: int, chunk: int, lo: int, hi: int) -> None:
        """Chunk-relative [lo, hi) of the source into the chunk: the source's data runs are
        copied, its holes punched (a sparse guest disk costs no data writes there; the
        punch also clears whatever a torn write left under clear bits)."""
        d, cs = img.header.data_offset, self.chunk_size
        src, dst = d + source * cs, d + chunk * cs
        for a, b, is_data in data_runs(img.fd, src + lo, src + hi):
            if is_data:
                buf = bytearray(b - a)
                img.chunk_map.pread_host(a, buf)
                img.chunk_map.pwritev(dst + a - src, [buf])
            else:
                try:
                    punch_hole(img.fd, dst + a - src, b - a)
                except OSError as e:
                    raise io_error(img.path, e, "punch hole") from e

    def detach(self, img: ImageCore) -> tuple[I64, list[int]]:
        """Revert: the front's partial chunks go. Readers may still pair a chunk with its
        slot, so each is completed first, then the slots are cleared once no reader still
        acts on a clear bit. A chunk only the front holds is completed in place (nothing
        is journaled: it is about to be released); one a snapshot holds is copied whole
        into a new chunk the table maps before the bits are set. Returns (the sources,
        those new chunks), for the caller to release."""
        sources = self.sources()
        todo = self.entries()
        temps: list[int] = []
        if not todo:
            return sources, temps
        for v, k in todo:
            chunk, source = int(img.table[v]), int(self.src[k])
            target = chunk
            if img.is_frozen(chunk):
                target = img.allocator.allocate()
                img.grow_frozen(target)
                temps.append(target)
            self._complete_into(img, self.flags(k), chunk, source, target)
            img.table[v] = target  # (target, old bits) reads as before
        if temps:
            # a reader that took a held N from the table before it changed must be done
            # before the bits are set: N's bytes under clear bits are not the chunk's
            img.allocator.quiesce(time.sleep)
        for _, k in todo:
            self.set_granules(k, 0, self.gpc)
        img.allocator.quiesce(time.sleep)
        self.clear()
        return sources, temps

    def complete_record(self, img: ImageCore, table: U32, record: Record) -> U32:
        """Revert to a snapshot with partial chunks: a copy of its table in which each
        of them maps a new whole chunk of the front, holding the snapshot's bytes (its
        chunk's written granules, its source's others). Lock-free readers can switch to
        whole chunks in one step; a pair cannot be installed under them atomically. An
        open under the revert marker takes the pairs themselves instead (no readers)."""
        chunks, sources, rows = record
        table = table.copy()
        for i, v in enumerate(chunks.tolist()):
            new = img.allocator.allocate()
            img.grow_frozen(new)
            fl = np.unpackbits(rows[i], bitorder="little")[: self.gpc].view(bool)
            self._complete_into(img, fl, int(table[v]), int(sources[i]), new)
            table[v] = new
        return table

    def _complete_into(
        self, img: ImageCore, flags: Flags, chunk: int, source: int, target: int
    ) -> None:
        """The whole chunk into `target`: written granules (set flags) from `chunk`, the
        others from `source`; runs already in place (target is chunk) are left alone."""
        gs = self.gsize
        for a, b, mine in flag_runs(flags):
            origin = chunk if mine else source
            if origin != target:
                self._copy_run(img, origin, target, a * gs, b * gs)


def decode_map(
    raw: bytes, nchunks: int, chunk_size: int, granule: int, path: str, offset: int
) -> Record:
    """(chunks, sources, rows) of an encoded partial map or granule record (the layout of
    docs/format.md section 10) read from host `offset` of `path`, decoded without a loop
    over the entries: chunks (int64, strictly increasing, each < nchunks), their sources
    (uint32, < MAX_PHYS_CHUNKS) and their bit rows (uint8, ceil(gpc / 8) bytes each).
    CorruptImageError naming the offset of the problem otherwise."""
    if len(raw) < MAP_HEAD.size:
        raise CorruptImageError(path, offset, f"{len(raw)} bytes, shorter than its head")
    magic, count, gsize, _r = MAP_HEAD.unpack_from(raw)
    gbytes = fr.partial_row_bytes(chunk_size, granule)
    esize = ENTRY_HEAD.size + _pad8(gbytes)
    if magic != MAP_MAGIC or gsize != granule:
        raise CorruptImageError(
            path, offset, f"magic {magic:#x} or granule size {gsize} is not {granule}"
        )
    sections = 2 if MAP_HEAD.unpack_from(raw)[3] & MAP_FLAG_PROVENANCE else 1
    if len(raw) != MAP_HEAD.size + sections * count * esize:
        raise CorruptImageError(path, offset + 4, f"{count} entries do not fill {len(raw)} bytes")
    body = np.frombuffer(raw, np.uint8, count * esize, MAP_HEAD.size).reshape(count, esize)
    head = np.ascontiguousarray(body[:, : ENTRY_HEAD.size]).view("<u4")
    chunks = head[:, 0].astype(np.int64)
    sources = head[:, 1].astype(np.uint32)
    bad = (chunks >= nchunks) | (sources >= fmt.MAX_PHYS_CHUNKS)
    bad[1:] |= chunks[1:] <= chunks[:-1]
    if bad.any():
        i = int(np.argmax(bad))
        raise CorruptImageError(
            path,
            offset + MAP_HEAD.size + i * esize,
            f"entry {i} (chunk {int(chunks[i])}, source {int(sources[i])}) is out of "
            f"range or out of order",
        )
    rows = np.ascontiguousarray(body[:, ENTRY_HEAD.size : ENTRY_HEAD.size + gbytes])
    return chunks, sources, rows


def decode_provenance(
    raw: bytes, count: int, chunk_size: int, granule: int, path: str, offset: int
) -> Optional[tuple[U32, U8]]:
    """(origins, carried rows) of a granule record's provenance section (docs/format.md
    section 10, "Provenance"), or None when its head has no provenance flag: per entry,
    the chunk its carried granules were copied from (uint32, NONE: none) and their bit
    row (uint8, like the entries' rows). The caller has decoded the entries (decode_map),
    which checked the length; CorruptImageError naming the offset otherwise."""
    flags = MAP_HEAD.unpack_from(raw)[3]
    if flags & ~MAP_FLAG_PROVENANCE:
        raise CorruptImageError(path, offset + 12, f"unknown flags {flags:#x}")
    if not flags:
        return None
    gbytes = fr.partial_row_bytes(chunk_size, granule)
    esize = ENTRY_HEAD.size + _pad8(gbytes)
    start = MAP_HEAD.size + count * esize
    body = np.frombuffer(raw, np.uint8, count * esize, start).reshape(count, esize)
    head = np.ascontiguousarray(body[:, : ENTRY_HEAD.size]).view("<u4")
    origins = head[:, 0].astype(np.uint32)
    bad = (origins >= fmt.MAX_PHYS_CHUNKS) & (origins != NONE)
    if bad.any():
        i = int(np.argmax(bad))
        raise CorruptImageError(
            path, offset + start + i * esize, f"provenance {i}: origin {int(origins[i])}"
        )
    rows = body[:, ENTRY_HEAD.size : ENTRY_HEAD.size + gbytes].copy()
    rows[origins == NONE] = 0
    return origins, rows


def check_record_table(
    chunks: I64,
    sources: U32,
    rows: U8,
    table: U32,
    path: str,
    offset: int,
    nphys: int = fmt.MAX_PHYS_CHUNKS,
) -> None:
    """A snapshot's granule record (at host `offset`) against the snapshot's lookup table:
    every entry's chunk maps a physical chunk N; its source lies below nphys (inside the
    file), is not a chunk the table maps and backs no other entry (CorruptImageError
    naming the entry otherwise)."""
    t = table[chunks]
    bad = (t >= fmt.ZERO_CHUNK) | (sources >= nphys)
    bad |= np.isin(sources, table[table < fmt.ZERO_CHUNK])
    if len(sources) > 1:
        order = np.argsort(sources, kind="stable")
        dup = np.zeros(len(sources), dtype=bool)
        dup[order[1:]] = sources[order[1:]] == sources[order[:-1]]
        bad |= dup
    if bad.any():
        i = int(np.argmax(bad))
        raise CorruptImageError(
            path,
            offset + MAP_HEAD.size + i * (ENTRY_HEAD.size + _pad8(rows.shape[1])),
            f"entry {i} (chunk {int(chunks[i])}, source {int(sources[i])}) does not fit "
            f"the lookup table (entry {int(t[i])}) or the file, or repeats a source",
        )


def attach_partial(img: ImageCore) -> None:
    """Open hook for images without a base: the partial map, if the header has one."""
    h = img.header
    st = PartialState(img.nchunks, img.chunk_size, img.size, h.granule_size or fmt.DEFAULT_GRANULE)
    img.partial = st
    off, size = img.header.partial_map_offset, img.header.partial_map_size
    if not off:
        return
    raw = img.read_meta(off, size)
    if zlib.crc32(raw) != img.header.partial_map_crc:
        img.problem(off, "partial map checksum mismatch")
        return
    if size < MAP_HEAD.size:
        img.problem(off, "partial map too short")
        return
    cs, d = img.chunk_size, img.header.data_offset
    st.map_run = ((off - d) // cs, -(-size // cs))
    st.map_provenance = bool(raw[12] & MAP_FLAG_PROVENANCE)
    st.load(img, raw, off)


def check_partial(img: ImageCore, result: CheckResult) -> None:
    """A partial chunk must map a chunk N (which a snapshot may hold too: the front's next
    write into it copies forward) other than its source, and its source must not be
    snapshot metadata. Found problems are not repaired (the bytes of the unwritten
    granules are only in S)."""
    st = img.partial
    if not isinstance(st, PartialState) or not st.active:
        return
    meta = np.zeros(0, dtype=bool)
    if img.snapshot_state is not None:
        meta = img.snapshot_state.meta_mask(0)
    for v, k in st.entries():
        e, s = int(img.table[v]), int(st.src[k])
        if e >= fmt.ZERO_CHUNK or e == s or (s < len(meta) and meta[s]):
            result.corruptions += 1
            result.messages.append(
                f"ERROR partial chunk {v} (chunk {e}, source {s}) is unmapped, "
                f"its own source, or reads snapshot metadata"
            )
