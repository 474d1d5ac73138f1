"""Pure-Python twin of fvd._fastpath: same classes, same behaviour, byte for byte.

Selected with FVD_PURE_PYTHON=1 or when the extension is not built.
"""

# (as _annotations: the module's public names stay the compiled module's)
from __future__ import annotations as _annotations

import errno
import os
import typing

import numpy as np

from fvd._shared import MAX_IOV, NO_SLOT, SYS_IOV_MAX, ZERO_CHUNK

if typing.TYPE_CHECKING:  # annotations only
    from typing import Any, Callable, Iterator, Optional, Sequence, Union

    import numpy.typing as npt
    from _typeshed import ReadableBuffer, WriteableBuffer

    U8 = npt.NDArray[np.uint8]
    U32 = npt.NDArray[np.uint32]
    Bytes = Union[bytearray, memoryview]  # a writable byte buffer
    ErrorFactory = Callable[[int, str], BaseException]  # factory(errno, what) -> exception
    # (slot, src, bits, granule shift, row bytes, wbits) of the partial chunks (set_partial)
    PartialView = tuple[U32, U32, U8, int, int, U8]
    # (fresh, stale, block shift, base end, base fd) of the base (set_base)
    BaseView = tuple[Optional[U8], Optional[U8], int, int, int]

# The public surface, as fvd._fastpath's.
__all__ = ["STAT_FIELDS", "Stats", "ChunkMap", "HostFile", "held_mask"]

STAT_FIELDS = (
    "data_reads",
    "data_bytes_read",
    "data_writes",
    "data_bytes_written",
    "metadata_reads",
    "metadata_bytes_read",
    "metadata_writes",
    "metadata_bytes_written",
    "flushes",
    "journal_records",
    "refcount_updates",
    "base_reads",
    "base_bytes_read",
)


class Stats:
    """Exact I/O counters since open."""

    __slots__ = STAT_FIELDS
    data_reads: int
    data_bytes_read: int
    data_writes: int
    data_bytes_written: int
    metadata_reads: int
    metadata_bytes_read: int
    metadata_writes: int
    metadata_bytes_written: int
    flushes: int
    journal_records: int
    refcount_updates: int
    base_reads: int
    base_bytes_read: int

    def __init__(self) -> None:
        for name in STAT_FIELDS:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in STAT_FIELDS}

    def __repr__(self) -> str:
        return "Stats(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


def _full_pread(fd: int, view: Bytes, offset: int) -> None:
    """pread until the view is full; bytes past end of file read as zeros."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = bytes(len(view) - done)
            break
        done += n


def _full_pwrite(fd: int, view: Union[bytes, memoryview], offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "write failed")  # no progress: never spin
        done += n


def _io_error(factory: Optional[ErrorFactory], err: Optional[int], what: str) -> BaseException:
    """The exception for a failed data I/O (see fvd._fastpath.io_error)."""
    if err is None:  # an OSError raised without an errno (none of os.* does)
        err = errno.EIO
    return OSError(err, what) if factory is None else factory(err, what)


def _byte_view(buf: Any, writable: bool) -> memoryview:
    mv = memoryview(buf)
    if mv.format == "B" and mv.ndim == 1 and mv.contiguous and not (writable and mv.readonly):
        return mv
    if not mv.contiguous:
        raise ValueError("buffer must be contiguous")
    mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
    if writable and mv.readonly:
        raise TypeError("buffer is read-only")
    return mv


def _bit(arr: U8, b: int) -> int:
    return int(arr[b >> 3]) >> (b & 7) & 1


def _granule_run(pv: PartialView, k: int, within: int, n: int) -> tuple[int, int]:
    """(run length, written) of the run from `within` (at most n bytes) that one layer
    of partial chunk slot k answers (fvd._fastpath.granule_run)."""
    _, _, bits, gshift, gbytes, _ = pv
    base = k * gbytes
    g = within >> gshift
    stop = within + n
    b = int(bits[base + (g >> 3)]) >> (g & 7) & 1
    g += 1
    while (g << gshift) < stop and (int(bits[base + (g >> 3)]) >> (g & 7) & 1) == b:
        g += 1
    return min(g << gshift, stop) - within, b


class ChunkMap:
    """Translates virtual offsets through the one-level table and does the data I/O.

    With a base image (set_base): the ``stale`` bitmap gates write() (every touched block
    below ``bend`` must be durably in the image, else -1), and for a raw base opened
    without copy-on-read (``base_fd`` >= 0) readinto() also answers the blocks still in
    the base, from the base file: one pread (one stats.base_reads) per contiguous base
    run, exactly as fvd.features.base.BaseLayer.readinto splits a read.
    """

    _pv: Optional[PartialView]  # read once per call: set_partial swaps it whole
    _bv: BaseView  # read once per call: set_base swaps it whole
    error: Optional[ErrorFactory]  # the owner's factory of I/O errors

    def __init__(
        self,
        fd: int,
        table: npt.NDArray[np.uint32],
        frozen: npt.NDArray[np.uint8],
        chunk_size: int,
        data_offset: int,
        size: int,
        stats: Stats,
    ) -> None:
        self.fd = fd
        self.table = table
        self.frozen = frozen
        self.chunk_size = chunk_size
        self.shift = chunk_size.bit_length() - 1
        self.data_offset = data_offset
        self.size = size
        self.stats = stats
        self._users: list[int] = []  # one item per readinto inside the base fd (append/pop: atomic)
        self.set_base(None, None, 0, 0, -1)
        self.set_partial(None, None, None, 0)
        # Grace periods (fvd._fastpath.ChunkMap.users_enter): calls in flight by epoch
        # parity, one list item each (append/pop are atomic under the GIL)
        self._inflight: tuple[list[None], list[None]] = ([], [])
        self.epoch = 0
        self.closed = False
        self.error = None

    def enter(self) -> int:
        """Register a caller that pairs bitmap bits with table entries itself (the base
        layer's Python reads); returns the token for leave()."""
        if self.closed:
            raise ValueError("I/O on a closed image")
        p = self.epoch & 1
        self._inflight[p].append(None)
        return p

    def leave(self, token: int) -> None:
        self._inflight[token & 1].pop()

    def try_advance(self) -> bool:
        """Advance the epoch when no call registered two epochs ago is still in flight.
        Returns True when it advanced."""
        if self._inflight[(self.epoch + 1) & 1]:
            return False
        self.epoch += 1
        return True

    @property
    def users_in_flight(self) -> int:
        return len(self._inflight[0]) + len(self._inflight[1])

    def set_partial(
        self,
        slot: npt.NDArray[np.uint32] | None,
        src: npt.NDArray[np.uint32] | None,
        bits: npt.NDArray[np.uint8] | None,
        granule_size: int,
        wbits: npt.NDArray[np.uint8] | None = None,
    ) -> None:
        """View the partial-chunk arrays of fvd.features.granular (uint32 slot per virtual chunk,
        NONE = 0xFFFFFFFF; uint32 source and a bit row per slot). `wbits` (rows like
        `bits`, a subset of them; default `bits`): the granules a write may go to without
        the slow path (a carried granule's first write clears its provenance there)."""
        self.partial = (slot, src, bits)
        if slot is None or len(slot) == 0:
            self._pv = None
            return
        if src is None or bits is None:
            raise TypeError("set_partial: src and bits are arrays when slot is one")
        if len(src) == 0:
            self._pv = None
            return
        gshift = granule_size.bit_length() - 1
        wbits = bits if wbits is None else wbits
        self._pv = (slot, src, bits, gshift, -(-(self.chunk_size >> gshift) // 8), wbits)

    def _partial_slot(self, pv: Optional[PartialView], v: int) -> int:
        """Slot of virtual chunk v, or -1 (pv captured once per call)."""
        if pv is None:
            return -1
        k = int(pv[0][v])
        return -1 if k == NO_SLOT else k

    def _granules_written(self, pv: Optional[PartialView], offset: int, length: int) -> bool:
        if pv is None or length == 0:
            return True
        shift, cs = self.shift, self.chunk_size
        pos, end = offset, offset + length
        _, _, _, gshift, gbytes, bits = pv
        while pos < end:
            v = pos >> shift
            base = v << shift
            stop = min(base + cs, end)
            k = self._partial_slot(pv, v)
            if k >= 0:
                row = k * gbytes
                for g in range((pos - base) >> gshift, ((stop - base - 1) >> gshift) + 1):
                    if not int(bits[row + (g >> 3)]) >> (g & 7) & 1:
                        return False
            pos = stop
        return True

    @property
    def base_users(self) -> int:
        """readinto calls inside the base fd right now."""
        return len(self._users)

    def set_base(
        self,
        fresh: npt.NDArray[np.uint8] | None,
        stale: npt.NDArray[np.uint8] | None,
        block_size: int,
        bend: int,
        base_fd: int = -1,
    ) -> None:
        """Bitmap views for a base image: ``fresh`` decides reads, ``stale`` fast writes
        (uint8 arrays, block b = bit b % 8 of byte b // 8). Bytes at or past ``bend``
        belong to the image. ``base_fd`` >= 0: a raw base read here; -1: reads stay
        image-only (the Python layer splits them). ``set_base(None, None, 0, 0)``: no base.
        The arrays are viewed, not copied: call again when Python replaces them."""
        if bend > 0 and (
            fresh is None or stale is None or block_size <= 0 or block_size & (block_size - 1)
        ):
            raise ValueError("a base needs both bitmaps and a power-of-two block size")
        if bend <= 0:
            fresh = stale = None
            bend, block_size, base_fd = 0, 0, -1
        else:
            nbits = -(-bend // block_size)
            assert fresh is not None and stale is not None  # refused above
            if len(fresh) * 8 < nbits or len(stale) * 8 < nbits:
                raise ValueError("bitmap shorter than the base")
        self.fresh, self.stale = fresh, stale
        self.block_size, self.bend, self.base_fd = block_size, bend, base_fd
        self.bshift = block_size.bit_length() - 1 if block_size > 0 else 0
        # read once by readinto/write: a set_base in another thread swaps it whole
        self._bv = (fresh, stale, self.bshift, bend, base_fd)

    def _stale_ok(self, offset: int, length: int) -> bool:
        """Every block under the range below bend durably in the image (stale bit set)."""
        _, arr, sh, bend, _ = self._bv
        if arr is None or bend == 0 or length == 0 or offset >= bend:
            return True
        b, last = offset >> sh, (min(offset + length, bend) - 1) >> sh
        while b <= last:
            if b & 7 == 0 and b + 7 <= last:
                if arr[b >> 3] != 0xFF:
                    return False
                b += 8
                continue
            if not _bit(arr, b):
                return False
            b += 1
        return True

    @staticmethod
    def _segment(arr: U8, sh: int, bend: int, pos: int, end: int) -> tuple[int, bool]:
        """(stop, image): the run of [pos, end) answered by one layer. Image runs
        reaching bend continue to end (past the base is the image)."""
        if pos >= bend:
            return end, True
        lim = min(end, bend)
        b = pos >> sh
        bit = _bit(arr, b)
        full = 0xFF if bit else 0
        b += 1
        while True:
            stop = b << sh
            if stop >= lim:
                break
            if b & 7 == 0 and (b + 8) << sh <= lim and arr[b >> 3] == full:
                b += 8
                continue
            if _bit(arr, b) != bit:
                return stop, bool(bit)
            b += 1
        return (end if bit and lim == bend else lim), bool(bit)

    def _read_based(
        self,
        offset: int,
        mv: memoryview,
        fresh: U8,
        bshift: int,
        bend: int,
        base_fd: int,
        pv: Optional[PartialView],
    ) -> int:
        """Base fields (and the partial view `pv`) passed in: set_base may run in
        another thread meanwhile."""
        pos, end = offset, offset + len(mv)
        b = offset >> bshift
        if end <= bend and (end - 1) >> bshift == b:
            # Common case, inside one block below the base end: one bit, one pread.
            if int(fresh[b >> 3]) >> (b & 7) & 1:
                return self._read_image(offset, mv, pv)
            if os.preadv(base_fd, [mv], offset) < len(mv):
                _full_pread(base_fd, mv, offset)
            self.stats.base_reads += 1
            self.stats.base_bytes_read += len(mv)
            return len(mv)
        while pos < end:
            stop, image = self._segment(fresh, bshift, bend, pos, end)
            piece = mv[pos - offset : stop - offset]
            if image:
                self._read_image(pos, piece, pv)
            else:
                _full_pread(base_fd, piece, pos)
                self.stats.base_reads += 1
                self.stats.base_bytes_read += stop - pos
            pos = stop
        return len(mv)

    def set_frozen(self, frozen: npt.NDArray[np.uint8]) -> None:
        self.frozen = frozen

    def set_table(self, table: npt.NDArray[np.uint32]) -> None:
        self.table = table

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"I/O range [{offset}, {offset + length}) outside the image (size {self.size})"
            )

    def _runs(
        self, offset: int, length: int, pv: Optional[PartialView] = None
    ) -> Iterator[tuple[int, int, Optional[int]]]:
        """Yield (buffer_pos, length, host_offset or None) runs, coalescing contiguous hosts
        (partial chunks split by their granule bits)."""
        cs, shift = self.chunk_size, self.shift
        run_pos = run_len = 0
        run_host = None
        pos = 0
        while pos < length:
            voff = offset + pos
            v = voff >> shift
            within = voff & (cs - 1)
            n = min(cs - within, length - pos)
            e = int(self.table[v])
            if pv is not None and e < ZERO_CHUNK:
                k = self._partial_slot(pv, v)
                if k >= 0:
                    n, mine = _granule_run(pv, k, within, n)
                    if not mine:
                        e = int(pv[1][k])
            host = None if e >= ZERO_CHUNK else self.data_offset + (e << shift) + within
            if run_len and (
                (host is None and run_host is None)
                or (host is not None and run_host is not None and run_host + run_len == host)
            ):
                run_len += n
            else:
                if run_len:
                    yield run_pos, run_len, run_host
                run_pos, run_len, run_host = pos, n, host
            pos += n
        if run_len:
            yield run_pos, run_len, run_host

    def readinto(self, offset: int, buf: WriteableBuffer) -> int:
        if self.closed:
            raise ValueError("I/O on a closed image")
        users = self._inflight[self.epoch & 1]
        users.append(None)  # registered, as enter() does (inlined: hot path)
        try:
            if (
                type(buf) is bytearray
                and self._bv[4] < 0
                and 0 <= offset <= self.size - len(buf)
                and self._read_in_one_chunk(offset, buf, self._pv) >= 0
            ):
                return len(buf)  # the common case, no base fd: one lookup, one pread
            return self._readinto(offset, buf)
        except OSError as e:
            raise _io_error(self.error, e.errno, "read failed") from None
        finally:
            users.pop()

    def _readinto(self, offset: int, buf: WriteableBuffer) -> int:
        mv: Union[bytearray, memoryview]
        if type(buf) is bytearray:  # the common case, without a memoryview
            mv = buf
        else:
            mv = memoryview(buf)
            if mv.format != "B" or mv.ndim != 1 or mv.readonly or not mv.contiguous:
                mv = _byte_view(buf, True)
        length = len(mv)
        if offset < 0 or offset + length > self.size:
            self._check_range(offset, length)
        if not length:
            return 0  # nothing read, nothing counted (as the compiled path)
        fresh, _, bshift, bend, base_fd = self._bv
        if base_fd >= 0 and offset < bend and fresh is not None:  # (set_base: a raw base)
            self._users.append(1)
            try:
                return self._read_based(
                    offset, memoryview(mv), fresh, bshift, bend, base_fd, self._pv
                )
            finally:
                self._users.pop()
        return self._read_image(offset, memoryview(mv), self._pv)

    def _read_in_one_chunk(self, offset: int, buf: Bytes, pv: Optional[PartialView]) -> int:
        """The common case, a range inside one whole chunk of data: one lookup, one
        pread. The bytes read, or -1 when the range is not that case (nothing done)."""
        length, shift = len(buf), self.shift
        v = offset >> shift
        if not length or v != (offset + length - 1) >> shift:
            return -1
        if pv is not None and pv[0][v] != NO_SLOT:
            return -1
        e = self.table.item(v)
        if e >= ZERO_CHUNK:
            return -1
        host = self.data_offset + (e << shift) + (offset & (self.chunk_size - 1))
        if os.preadv(self.fd, [buf], host) < length:
            _full_pread(self.fd, memoryview(buf), host)
        stats = self.stats
        stats.data_reads += 1
        stats.data_bytes_read += length
        return length

    def _read_image(self, offset: int, mv: memoryview, pv: Optional[PartialView] = None) -> int:
        length = len(mv)
        if self._read_in_one_chunk(offset, mv, pv) >= 0:
            return length
        for pos, n, host in self._runs(offset, length, pv):
            piece = mv[pos : pos + n]
            if host is None:
                piece[:] = bytes(n)
            else:
                _full_pread(self.fd, piece, host)
                self.stats.data_reads += 1
                self.stats.data_bytes_read += n
        return length

    def writable(self, offset: int, length: int) -> bool:
        """True when every chunk under the range is allocated and not held by a snapshot,
        and every granule it touches in a partial chunk is written."""
        self._check_range(offset, length)
        if length == 0:
            return True
        first, last = offset >> self.shift, (offset + length - 1) >> self.shift
        entries = self.table[first : last + 1]
        if (entries >= ZERO_CHUNK).any():
            return False
        frozen = self.frozen
        held = entries[entries < len(frozen)]
        return not frozen[held].any() and self._granules_written(self._pv, offset, length)

    def write(self, offset: int, data: ReadableBuffer) -> int:
        """Write into allocated, unshared chunks whose touched blocks are durably out of
        the base (stale bits); returns -1 (nothing written) otherwise."""
        p = self.enter()
        try:
            return self._write(offset, data)
        except OSError as e:
            raise _io_error(self.error, e.errno, "write failed") from None
        finally:
            self._inflight[p].pop()

    def _write(self, offset: int, data: ReadableBuffer) -> int:
        mv = data if type(data) is bytes else _byte_view(data, False)
        length = len(mv)
        if offset < 0 or offset + length > self.size:
            self._check_range(offset, length)
        shift = self.shift
        if (
            length
            and offset >> shift == (offset + length - 1) >> shift
            and self._bv[4] < 0
            and self._bv[3] == 0
        ):
            # Common case, inside one chunk of an image without a base: one lookup.
            e = self.table.item(offset >> shift)
            frozen = self.frozen
            if e >= ZERO_CHUNK or (e < len(frozen) and frozen[e]):
                return -1
            pv = self._pv
            if pv is not None and not self._granules_written(pv, offset, length):
                return -1
            _full_pwrite(
                self.fd, mv, self.data_offset + (e << shift) + (offset & (self.chunk_size - 1))
            )
            stats = self.stats
            stats.data_writes += 1
            stats.data_bytes_written += length
            return length
        if not (self._stale_ok(offset, length) and self.writable(offset, length)):
            return -1
        mv = memoryview(mv)
        for pos, n, host in self._runs(offset, length):
            assert host is not None  # writable(): every chunk under the range is allocated
            _full_pwrite(self.fd, mv[pos : pos + n], host)
            self.stats.data_writes += 1
            self.stats.data_bytes_written += n
        return length

    def host_offset(self, offset: int) -> int:
        """Host offset of a virtual offset, or -1 when its chunk has no data."""
        self._check_range(offset, 1)
        e = int(self.table[offset >> self.shift])
        if e >= ZERO_CHUNK:
            return -1
        return self.data_offset + (e << self.shift) + (offset & (self.chunk_size - 1))

    def pwritev(self, host_offset: int, buffers: Sequence[ReadableBuffer]) -> int:
        """One data write of several buffers at a host offset (copy-on-write merges)."""
        if len(buffers) > MAX_IOV:
            raise ValueError("too many buffers")
        return _host_pwritev(self.fd, self.stats, host_offset, buffers, self.error)

    def pread_host(self, host_offset: int, buf: WriteableBuffer) -> int:
        return _host_readinto(self.fd, self.stats, host_offset, buf, self.error)

    def translate(self, vchunks: npt.NDArray[np.int64], out: npt.NDArray[np.int64]) -> int:
        """Batch translation: host offsets of chunk starts (-1 where no data). Returns
        len(vchunks); ValueError for a chunk outside the table or a short `out`."""
        table, shift, base = self.table, self.shift, self.data_offset
        n, limit = len(vchunks), len(table)
        if len(out) < n:
            raise ValueError(f"translate: out holds {len(out)} entries, not {n}")
        for i in range(n):
            v = int(vchunks[i])
            if not 0 <= v < limit:
                raise ValueError(f"translate: chunk {v} outside the table ({limit})")
            e = int(table[v])
            out[i] = -1 if e >= ZERO_CHUNK else base + (e << shift)
        return len(vchunks)


def _host_readinto(
    fd: int,
    stats: Stats,
    host_offset: int,
    buf: WriteableBuffer,
    factory: Optional[ErrorFactory] = None,
) -> int:
    """One data read of a whole writable buffer at a host offset (zeros past EOF)."""
    mv = _byte_view(buf, True)
    n = len(mv)
    try:
        if os.preadv(fd, [mv], host_offset) < n:
            _full_pread(fd, mv, host_offset)
    except OSError as e:
        raise _io_error(factory, e.errno, "read failed") from None
    stats.data_reads += 1
    stats.data_bytes_read += n
    return n


def _host_pwritev(
    fd: int,
    stats: Stats,
    host_offset: int,
    buffers: Sequence[ReadableBuffer],
    factory: Optional[ErrorFactory] = None,
) -> int:
    """One data write of the buffers, back to back, at a host offset."""
    views = [_byte_view(b, False) for b in buffers]
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        try:
            n = os.pwritev(fd, _skip(views, done)[:SYS_IOV_MAX], host_offset + done)
        except OSError as e:
            raise _io_error(factory, e.errno, "write failed") from None
        if n == 0:
            raise _io_error(factory, errno.EIO, "write failed")  # no progress
        done += n
    stats.data_writes += 1
    stats.data_bytes_written += total
    return total


class HostFile:
    """Data I/O at host offsets with exact accounting, shared by the FVD chunk map and the
    QCOW2 baseline: one readinto / pwritev = one data read / write in `stats`."""

    def __init__(self, fd: int, stats: Stats) -> None:
        self.fd = fd
        self.stats = stats

    def readinto(self, host_offset: int, buf: WriteableBuffer, limit: int = -1) -> int:
        """Fill a writable contiguous buffer from host_offset (zeros past end of file).
        With limit >= 0, only a buffer of 1..limit bytes is read; otherwise nothing is
        done or counted and -1 returned (callers mapping one extent try this first)."""
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1 or mv.readonly or not mv.contiguous:
            mv = _byte_view(buf, True)
        n = len(mv)
        if limit >= 0 and (n == 0 or n > limit):
            return -1
        if os.preadv(self.fd, [mv], host_offset) < n:
            _full_pread(self.fd, mv, host_offset)
        stats = self.stats
        stats.data_reads += 1
        stats.data_bytes_read += n
        return n

    def pwritev(self, host_offset: int, buffers: Sequence[ReadableBuffer]) -> int:
        """One data write of the buffers, back to back, at host_offset."""
        return _host_pwritev(self.fd, self.stats, host_offset, buffers)


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """The views with the first n bytes dropped."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


def held_mask(
    table: npt.NDArray[np.uint32], n: int, cap: int = -1
) -> tuple[npt.NDArray[np.uint8] | None, int]:
    """(mask, count) for snapshot bookkeeping (fvd.snapshots): a uint8 array,
    max(n, largest mapped entry + 1) long, that is 1 at each physical chunk the lookup
    table maps, and how many entries map one. With cap >= 0 and an entry at or past cap,
    the mask is None (nothing that large is allocated)."""
    valid = table < ZERO_CHUNK
    count = int(np.count_nonzero(valid))
    top = int(table.max(where=valid, initial=0)) + 1 if count else 0
    if cap >= 0 and top > cap:
        return None, count
    n = max(n, top)
    mask = np.zeros(n + 1, dtype=np.uint8)
    if count:
        mask[np.minimum(table, n)] = 1  # unmapped entries land on the spare slot n
    return mask[:n], count
