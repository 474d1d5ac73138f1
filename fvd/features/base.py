"""Base images: copy-on-write, copy-on-read and the open/create hooks (docs/format.md,
"Base images"). Prefetch lives in fvd.features.prefetch.

Which layer holds a byte x of the image:
  * x >= base_size: the image (the base ends there).
  * bitmap bit of block x // block_size is 1 (``fresh`` copy): the image.
  * otherwise: the base.

Locking: ``img.lock`` (an RLock) serialises every path that changes the table, the
bitmap or the journal: the slow write path here, copy-on-read stores, prefetch steps,
write_zeroes and flush. Reads and fast-path writes (every touched block already durable
in the image) take no lock: a bit is set only after its data is written, and a block
whose bit is set is never written by copy-on-read or prefetch again.

Fast path (BaseLayer.attach_map): the image's ChunkMap views both bitmaps. Its write()
refuses (-1) a write touching a block whose ``stale`` bit is clear, so Image.write needs
no Python check. With a raw base and no copy-on-read its readinto() also splits reads by
``fresh`` bits and reads base runs from the base fd itself (Image.readinto is bound to
it), with the same runs and stats as BaseLayer.readinto. A read racing a prefetch or
copy-on-read store is still right: a store copies the base's bytes into the image before
the bit is set, so whichever source the read picks holds the same bytes. When the layer
goes (prefetch done, close) the map is detached first and the base fd is closed only once
no read is inside it (ChunkMap.base_users).
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any, Iterator, Optional, Protocol, Sequence, Union

import numpy as np
import numpy.typing as npt

from fvd.core import journal
from fvd.core.bitmap import Bitmap, get_bits
from fvd.core.image import ImageCore, drain_map
from fvd.errors import BaseImageError
from fvd.fileio import (
    AnyPolicy,
    BackingPolicy,
    RawFile,
    data_runs,
    detect_format,
    open_backing,
    pread_fill,
    resolve_relative,
)
from fvd.nbd_client import NbdClient, is_nbd_uri
from fvd.ondisk import format as fmt
from fvd.types import CheckResult, DiskReader, Extent
from fvd.units import flag_runs

CROSS_READ_LIMIT = 256 * 1024  # head and tail further apart are read separately

Piece = Union[bytes, bytearray, memoryview]
Store = tuple[int, memoryview]  # (virtual start, bytes) read from the base, to store
Run = tuple[int, int, bool]  # (start, end, in the image)


class Backend(Protocol):
    """An opened base: RawBase, ImageBase or NbdBase."""

    path: str
    size: int

    def readinto(self, offset: int, mv: memoryview) -> int: ...

    def extents(self, offset: int, length: int) -> Iterator[Extent]: ...

    def close(self) -> None: ...


# ----- base backends ------------------------------------------------------------------
class RawBase:
    """A raw base (fvd.fileio.RawFile: a regular file or a block device). Never probed
    for magic."""

    def __init__(self, raw: RawFile) -> None:
        self.raw = raw
        self.path = raw.path
        self.fd = raw.fd
        self.size = raw.size

    def readinto(self, offset: int, mv: memoryview) -> int:
        return pread_fill(self.fd, mv, offset)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Data and holes (SEEK_DATA/SEEK_HOLE), as `qemu-img map` reports a raw file."""
        for s, e, data in data_runs(self.fd, offset, offset + length):
            yield Extent(s, e - s, 0, True, not data, data, s)

    def close(self) -> None:
        self.raw.close()
        self.fd = -1


class ImageBase:
    """An FVD or qcow2 image opened read-only (its own base chain included)."""

    def __init__(self, img: DiskReader, path: str) -> None:
        self.img = img
        self.path = path
        self.size = img.size

    def readinto(self, offset: int, mv: memoryview) -> int:
        return self.img.readinto(offset, mv)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        yield from self.img.extents(offset, length)

    def close(self) -> None:
        self.img.close()


class NbdBase:
    """A raw base that is an NBD export (the name is its URI; see fvd.nbd_client)."""

    def __init__(self, uri: str) -> None:

        self.path = uri
        try:
            self.client = NbdClient(uri)
        except ValueError as e:
            raise BaseImageError(str(e)) from None
        self.size = self.client.size

    def readinto(self, offset: int, mv: memoryview) -> int:
        return self.client.readinto(offset, mv)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        for start, n, zero, data in self.client.extents(offset, length):
            yield Extent(start, n, 0, True, zero, data, None)

    def close(self) -> None:
        self.client.close()


def _open_backend(
    image_path: str, path: str, base_format: int, chain: tuple[str, ...], policy: BackingPolicy
) -> Backend:
    """The base `path` of `image_path` through the one backing-file opener
    (fvd.fileio.open_backing: policy, no blocking open, regular files and block
    devices only); an NBD URI after the policy allows it."""
    if base_format not in fmt.BASE_FORMAT_NAMES or base_format == fmt.BASE_NONE:
        raise BaseImageError(f"{path}: unknown base format {base_format}")
    name = fmt.BASE_FORMAT_NAMES[base_format]
    if is_nbd_uri(path):
        policy.admit(image_path, path)
        if base_format != fmt.BASE_RAW:
            raise BaseImageError(f"{path}: an NBD base is read as raw (-F raw)")
        return NbdBase(path)
    backend = open_backing(image_path, path, name, chain, policy)
    if isinstance(backend, RawFile):
        return RawBase(backend)
    return ImageBase(backend, path)


# ----- create / open hooks ---------------------------------------------------------------
def _check_name(base: str | os.PathLike[str]) -> tuple[str, bytes]:
    name = os.fspath(base)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not name:
        raise BaseImageError("base image path is empty")
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise BaseImageError(f"{name!r}: base image path contains control characters")
    try:
        raw = os.fsencode(name)
    except UnicodeError as e:
        raise BaseImageError(f"{name!r}: base image path cannot be encoded: {e}") from None
    if len(raw) > fmt.MAX_BASE_NAME:
        raise BaseImageError(
            f"{name[:60]}...: base image path longer than {fmt.MAX_BASE_NAME} bytes"
        )
    return name, raw


def describe_new_base(
    path: str | os.PathLike[str],
    base: str | os.PathLike[str],
    base_format: Optional[str],
    size: int,
    policy: AnyPolicy = "any",
) -> tuple[bytes, dict[str, int]]:
    """(base name bytes, header fields) for fvd.create(..., base=...). Without
    `base_format` the base's magic decides (fvd, qcow2, else raw)."""
    name, raw = _check_name(base)
    path = os.fspath(path)
    admit = BackingPolicy.of(policy, path)
    resolved = resolve_relative(path, name)
    admit.admit(path, resolved)
    if is_nbd_uri(resolved):
        base_format = base_format or "raw"
    elif not os.path.exists(resolved):
        raise BaseImageError(f"{resolved}: base image does not exist")
    elif os.path.realpath(resolved) == os.path.realpath(path):
        raise BaseImageError(f"{resolved}: an image cannot be its own base")
    elif base_format is None:
        base_format = _probe_base(path, resolved)
    if base_format not in fmt.BASE_FORMATS:
        raise ValueError(
            f"base_format must be one of {sorted(fmt.BASE_FORMATS)}, not {base_format!r}"
        )
    code = fmt.BASE_FORMATS[base_format]
    backend = _open_backend(path, resolved, code, (os.path.realpath(path),), admit)
    try:
        base_size = backend.size
    finally:
        backend.close()
    if base_size <= 0:
        raise BaseImageError(f"{resolved}: base image is empty")
    return raw, {
        "base_format": code,
        "base_size": base_size,
        "incompatible_features": fmt.INCOMPAT_BASE,
    }


def _probe_base(path: str, resolved: str) -> str:
    try:
        return detect_format(resolved)
    except BaseImageError:
        raise
    except OSError as e:
        raise BaseImageError(f"{resolved}: base image of {path} unreadable: {e}") from e


def attach_base(
    img: ImageCore,
    chain: tuple[str, ...],
    copy_on_read: bool,
    policy: BackingPolicy,
    skip: bool = False,
) -> None:
    """Open hook: bitmap always; the base itself unless prefetch finished (or `skip`:
    header facts only, nothing of the base opened)."""
    h = img.header
    name = os.fsdecode(img.read_meta(h.base_name_offset, h.base_name_size))
    resolved = resolve_relative(img.path, name)
    img.base_path = resolved
    img.backing_policy = policy  # snapshot views open the base later (after prefetch)
    raw = img.read_meta(img.header.bitmap_offset, img.header.bitmap_size)
    if img.header.clean_shutdown and zlib.crc32(raw) != img.header.bitmap_crc:
        img.problem(img.header.bitmap_offset, "base bitmap checksum mismatch")
    nblocks = -(-img.header.base_size // img.block_size)
    img.bitmap = Bitmap(raw, nblocks, img.header.bitmap_offset)
    if img.header.base_flags & fmt.BASE_FLAG_PREFETCHED or skip:
        return
    try:
        _attach_backend(img, chain, copy_on_read, resolved, policy)
    except BaseImageError as e:
        if not img.for_check:
            raise
        img.notes.append(f"base image not opened ({e}); the image was checked alone")


def _attach_backend(
    img: ImageCore,
    chain: tuple[str, ...],
    copy_on_read: bool,
    resolved: str,
    policy: BackingPolicy,
) -> None:
    policy.admit(img.path, resolved)
    if not is_nbd_uri(resolved) and not os.path.lexists(resolved):
        raise BaseImageError(f"{resolved}: base image of {img.path} does not exist")
    chain = tuple(chain) + (os.path.realpath(img.path),)
    backend = _open_backend(img.path, resolved, img.header.base_format, chain, policy)
    if backend.size != img.header.base_size:
        backend.close()
        raise BaseImageError(
            f"{resolved}: base image size changed from {img.header.base_size} "
            f"to {backend.size} bytes"
        )
    img.base_layer = BaseLayer(img, backend, resolved, copy_on_read and not img.read_only)


# ----- the layer -------------------------------------------------------------------------
class BaseLayer:
    """The base under an image (fvd.core.hooks.BaseHook). A snapshot view with a base
    holds one too, passing itself as `img` (it reads only: the read side of a core)."""

    def __init__(self, img: ImageCore, backend: Backend, path: str, copy_on_read: bool) -> None:
        self.img = img
        self.path = path
        self.copy_on_read = copy_on_read
        self.bs = img.block_size
        assert img.bitmap is not None  # a base comes with its bitmap (attach_base)
        self.bitmap: Bitmap = img.bitmap
        self.backend: Optional[Backend] = backend
        self.base_size = img.header.base_size
        self.bend = min(self.base_size, img.size)  # bytes below this may be in the base
        # reads served whole by the compiled fast path (ChunkMap.readinto)
        self.fast_read = isinstance(backend, RawBase) and not copy_on_read
        self.closing = False

    def attach_map(self) -> None:
        """Give the image's ChunkMap the bitmaps (and a raw base's fd): see module doc."""
        self.img.chunk_map.set_base(
            self.bitmap.fresh,
            self.bitmap.stale,
            self.bs,
            self.bend,
            self.backend.fd if isinstance(self.backend, RawBase) and self.fast_read else -1,
        )

    def detach_map(self) -> None:
        """The map stops using the base; returns once no read is inside the base fd."""
        m = getattr(self.img, "chunk_map", None)
        if m is None:
            return
        m.set_base(None, None, 0, 0, -1)
        while m.base_users:
            time.sleep(0.0001)

    # ----- reads ------------------------------------------------------------------------
    def base_read(self, offset: int, mv: memoryview) -> None:
        if self.backend is None:
            raise ValueError(f"{self.path}: the base image is closed")
        self.backend.readinto(offset, mv)
        st = self.img.stats
        st.base_reads += 1
        st.base_bytes_read += len(mv)

    def readinto(self, offset: int, buffer: Any) -> int:
        """Answer from the image and the base; copy-on-read stores what it read from the
        base afterwards. The bits and table entries are read while registered with the
        chunk map (a revert's grace periods wait for it), the store outside (it takes
        the image lock, which a revert holds while it waits)."""
        stores: list[Store] = []
        m = self.img.chunk_map
        token = m.enter()
        try:
            if self.closing:  # prefetch done or closing: the image answers
                return int(m.readinto(offset, buffer))
            n = self._readinto(offset, buffer, stores)
        finally:
            m.leave(token)
        for start, data in stores:
            self.store(start, data)
        return n

    def _readinto(self, offset: int, buffer: Any, stores: list[Store]) -> int:
        img = self.img
        mv = memoryview(buffer)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        length = len(mv)
        end = offset + length
        if offset < 0 or end > img.size:
            raise ValueError(f"I/O range [{offset}, {end}) outside the image (size {img.size})")
        bend = min(end, self.bend)
        if offset >= bend:
            return int(img.chunk_map.readinto(offset, mv))
        bs = self.bs
        b0 = offset // bs
        if end == bend and (end - 1) // bs == b0:  # inside one block of the base
            if self.bitmap.fresh[b0 >> 3] >> (b0 & 7) & 1:
                return int(img.chunk_map.readinto(offset, mv))
            if not self.copy_on_read:
                self.base_read(offset, mv)
                return length
        b1 = (bend - 1) // bs + 1
        flags = self.bitmap.fresh_bits(b0, b1)
        if flags.all():
            return int(img.chunk_map.readinto(offset, mv))
        pieces: list[Run] = []
        for a, b, present in flag_runs(flags):
            s, e = max(offset, (b0 + a) * bs), min(bend, (b0 + b) * bs)
            pieces.append((s, e, present))
        if bend < end:
            pieces.append((bend, end, True))
        # merge adjacent image pieces (the past-the-base tail)
        merged: list[Run] = []
        for p in pieces:
            if merged and p[2] and merged[-1][2] and merged[-1][1] == p[0]:
                merged[-1] = (merged[-1][0], p[1], True)
            else:
                merged.append(p)
        for s, e, present in merged:
            if present:
                img.chunk_map.readinto(s, mv[s - offset : e - offset])
            elif self.copy_on_read:
                stores.append(self._read_for_store(s, e, mv[s - offset : e - offset]))
            else:
                self.base_read(s, mv[s - offset : e - offset])
        return length

    def _read_for_store(self, s: int, e: int, out: memoryview) -> Store:
        """Copy-on-read: read whole blocks once and answer; returns (start, data) for
        the caller to store into the image."""
        bs = self.bs
        ws, we = s // bs * bs, min(-(-e // bs) * bs, self.bend)
        buf = bytearray(we - ws)
        bmv = memoryview(buf)
        self.base_read(ws, bmv)
        out[:] = bmv[s - ws : e - ws]
        return ws, bmv

    def store(self, start: int, data: memoryview) -> int:
        """Soft write of base data at block-aligned `start` into blocks still in the base.

        Allocation is journaled (the table maps the chunk); the bits are set in memory
        only (Bitmap.set_soft). Returns the number of bytes written."""
        img = self.img
        bs = self.bs
        written = 0
        with img.lock:
            if img.closed or img.base_layer is not self:
                return 0
            img.seal_overlapping(start, len(data))
            b0 = start // bs
            b1 = -(-(start + len(data)) // bs)
            flags = self.bitmap.fresh_bits(b0, b1)
            changes: dict[int, int] = {}
            extra: list[bytes] = []
            bits: list[tuple[int, int]] = []
            try:
                for a, b, present in flag_runs(flags):
                    if present:
                        continue
                    s, e = (b0 + a) * bs, min((b0 + b) * bs, start + len(data))
                    img.prepare_chunks(s, e - s, changes, extra)
                    self._write_pieces(s, [data[s - start : e - start]], False, changes)
                    bits.append((b0 + a, b - a))
                    written += e - s
            except BaseException:
                img.abandon(changes)
                raise

            def set_bits() -> None:  # after the table: a reader that sees a bit finds it
                for first, count in bits:
                    self.bitmap.set_soft(first, count)

            img.apply(changes, extra, set_bits)
        return written

    # ----- writes -----------------------------------------------------------------------
    def write(self, offset: int, mv: memoryview) -> int:
        with self.img.lock:
            self.img.check_open()
            return self._write_locked(offset, mv)

    def _write_locked(self, offset: int, mv: memoryview) -> int:
        img = self.img
        length = len(mv)
        end = offset + length
        if length == 0:
            return 0
        bs = self.bs
        hs, te = offset, end
        bits: Optional[tuple[int, int]] = None
        if offset < self.bend:
            b0, b1 = offset // bs, (min(end, self.bend) - 1) // bs + 1
            stale = self.bitmap.stale_bits(b0, b1)
            if not stale.all():
                bits = (b0, b1 - b0)
                if not stale[0] and offset % bs:
                    hs = b0 * bs
                if not stale[-1]:
                    te = max(end, min(b1 * bs, self.bend))
        head, tail = self._head_tail(offset, end, hs, te)  # base reads first: if the base
        changes, extra = img.prepare_chunks(hs, te - hs)  # fails, nothing is allocated
        try:
            img.seal_overlapping(hs, te - hs, changes)  # head and tail may be rewritten
            records = list(extra)
            want_crc = bits is not None and img.writethrough
            crcs = self._write_pieces(
                hs, [p for p in (head, mv, tail) if len(p)], want_crc, changes
            )
        except BaseException:
            img.abandon(changes)
            raise
        if bits is not None:
            records.append(journal.bitmap_record(*bits))
            records.extend(crcs)

        def set_bits() -> None:  # after the table: a reader that sees a bit finds the data
            if bits is not None:
                self.bitmap.set_range(*bits)

        if changes or records:
            img.apply(changes, records, set_bits)
        else:
            set_bits()
            if img.writethrough:
                img.sync()
        return length

    def _head_tail(self, offset: int, end: int, hs: int, te: int) -> tuple[Piece, Piece]:
        """The base's bytes of [hs, offset) and [end, te) (blocks the write covers only in
        part); one read when they are close."""
        head: Piece = b""
        tail: Piece = b""
        if hs < offset or te > end:
            if (
                hs < offset
                and te > end
                and te - hs - (end - offset) <= CROSS_READ_LIMIT
                and te - hs <= 2 * CROSS_READ_LIMIT
            ):
                both = bytearray(te - hs)
                self.base_read(hs, memoryview(both))
                bm = memoryview(both)
                head, tail = bm[: offset - hs], bm[end - hs :]
            else:
                if hs < offset:
                    head = bytearray(offset - hs)
                    self.base_read(hs, memoryview(head))
                if te > end:
                    tail = bytearray(te - end)
                    self.base_read(end, memoryview(tail))
        return head, tail

    def _write_pieces(
        self, start: int, pieces: Sequence[Piece], want_crc: bool, plan: dict[int, int]
    ) -> list[bytes]:
        """Write the concatenation of `pieces` at virtual `start` (chunks allocated in
        the table or in `plan`): one data write per physical chunk run. Returns data-crc
        records when asked."""
        img = self.img
        cs = img.chunk_size
        total = sum(len(p) for p in pieces)
        end = start + total
        records: list[bytes] = []
        pos = start
        views = [memoryview(p).cast("B") if not isinstance(p, memoryview) else p for p in pieces]
        while pos < end:
            seg_end = min(end, (pos // cs + 1) * cs)
            host = img.host_of(pos, plan)
            # extend across physically contiguous chunks
            while seg_end < end and img.host_of(seg_end, plan) == host + (seg_end - pos):
                seg_end = min(end, seg_end + cs)
            bufs = _slice(views, pos - start, seg_end - start)
            img.chunk_map.pwritev(host, bufs)
            if want_crc:
                crc = 0
                for b in bufs:
                    crc = zlib.crc32(b, crc)
                records.append(journal.data_crc_record(host, seg_end - pos, crc))
            pos = seg_end
        return records

    def zero_bits(self, first_chunk: int, last_chunk: int) -> list[bytes]:
        """Whole chunks [first, last) became ZERO_CHUNK: their blocks leave the base."""
        cs, bs = self.img.chunk_size, self.bs
        b0 = first_chunk * cs // bs
        b1 = min(-(-last_chunk * cs // bs), self.bitmap.nblocks)
        if b1 <= b0:
            return []
        self.bitmap.set_range(b0, b1 - b0)
        return [journal.bitmap_record(b0, b1 - b0)]

    # ----- extents ------------------------------------------------------------------------
    def _split(self, start: int, stop: int) -> list[Run]:
        """(s, e, in_image) pieces of [start, stop)."""
        bend = min(stop, self.bend)
        out: list[Run] = []
        if start < bend:
            bs = self.bs
            b0, b1 = start // bs, (bend - 1) // bs + 1
            for a, b, present in flag_runs(self.bitmap.fresh_bits(b0, b1)):
                out.append((max(start, (b0 + a) * bs), min(bend, (b0 + b) * bs), present))
        if bend < stop:
            out.append((max(start, bend), stop, True))
        return out

    def _base_extents(self, s: int, e: int) -> Iterator[Extent]:
        if self.backend is None:
            raise ValueError(f"{self.path}: the base image is closed")
        for x in self.backend.extents(s, e - s):
            yield Extent(x.start, x.length, x.depth + 1, x.present, x.zero, x.data, x.offset)

    def segments_in_chunk(self, start: int, stop: int, host: int) -> Iterator[Extent]:
        for s, e, in_image in self._split(start, stop):
            if in_image:
                yield Extent(s, e - s, 0, True, False, True, host + (s - start))
            else:
                yield from self._base_extents(s, e)

    def segments_below(self, start: int, stop: int) -> Iterator[Extent]:
        for s, e, in_image in self._split(start, stop):
            if in_image:
                yield Extent(s, e - s, 0, False, True, False, None)
            else:
                yield from self._base_extents(s, e)

    # ----- lifecycle / check --------------------------------------------------------------
    def before_close(self) -> None:
        pass

    def close(self) -> None:
        """Detach; the backend closes once no read that may use it is in flight."""
        self.closing = True
        self.detach_map()
        m = getattr(self.img, "chunk_map", None)
        if m is not None:
            drain_map(m)
        if self.backend is not None:
            self.backend.close()
            self.backend = None


def marked_unallocated(
    bits: npt.NDArray[np.uint8],
    nblocks: int,
    table: npt.NDArray[np.uint32],
    chunk_size: int,
    block_size: int,
) -> npt.NDArray[np.intp]:
    """Virtual chunks that are UNALLOCATED in `table` but have a bit set in `bits`."""

    if nblocks == 0:
        return np.zeros(0, dtype=np.int64)
    per = chunk_size // block_size
    nch = -(-nblocks // per)
    padded = np.zeros(nch * per, dtype=bool)
    padded[:nblocks] = get_bits(bits, 0, nblocks)
    marked = np.asarray(padded.reshape(nch, per).any(axis=1))
    unalloc = table[:nch] == fmt.UNALLOCATED
    return np.flatnonzero(marked[: len(unalloc)] & unalloc)


def check_bitmap(img: ImageCore, result: CheckResult, repair: bool) -> None:
    """A block marked in the image inside an unallocated chunk reads zeros, not the base."""
    bm = img.bitmap
    if bm is None or bm.nblocks == 0:
        return
    cs, bs = img.chunk_size, img.block_size
    per = cs // bs
    bad = marked_unallocated(bm.fresh, bm.nblocks, img.table, cs, bs)
    for v in bad.tolist():
        result.corruptions += 1
        result.messages.append(
            f"ERROR: bitmap marks blocks of unallocated chunk {v} as in "
            f"the image (they would read zeros instead of the base)"
        )
        if repair and not img.read_only:
            first = v * per
            bm.clear_range(first, min(per, bm.nblocks - first))
    if repair and len(bad) and not img.read_only:
        img.dirty_since_checkpoint = True
        img.checkpoint(clean=False)
        result.corruptions_fixed += len(bad)
        result.corruptions -= len(bad)


def _slice(views: list[memoryview], a: int, b: int) -> list[memoryview]:
    """Slices of the concatenated views covering [a, b)."""
    out: list[memoryview] = []
    pos = 0
    for v in views:
        n = len(v)
        lo, hi = max(a, pos), min(b, pos + n)
        if hi > lo:
            out.append(v[lo - pos : hi - pos])
        pos += n
    return out
