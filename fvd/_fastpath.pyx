# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: binding=True, embedsignature=True, embedsignature.format=python
"""Compiled fast path: lookup-table translation and data I/O with the GIL released.

The lookup table is a numpy uint32 array owned by the Image and viewed here through a
typed memoryview; the loops below run in `noexcept nogil` code and coalesce virtual
ranges whose chunks are physically contiguous into one pread/pwrite.
fvd/_purepath.py is the pure-Python twin and must behave byte for byte the same.
fvd/_fastpath.pyi types this module; tests/native/test_impl_parity.py checks that the
three agree (binding=True makes methods introspectable, embedsignature puts each
__init__'s signature at the head of its docstring, which inspect cannot read from a cdef
class otherwise).
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.errno cimport errno, EINTR, EIO
from libc.stdint cimport uint8_t, uint32_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from posix.types cimport off_t

import numpy as np

from fvd import _shared

__all__ = ["STAT_FIELDS", "Stats", "ChunkMap", "HostFile", "held_mask"]

cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, off_t offset)
    ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, off_t offset)

# The values shared with the twin live in fvd/_shared.py (read once, at import).
cdef uint32_t ZERO_CHUNK = _shared.ZERO_CHUNK
cdef uint32_t NO_SLOT = _shared.NO_SLOT
cdef Py_ssize_t MAX_IOV = _shared.MAX_IOV
cdef int SYS_IOV_MAX = _shared.SYS_IOV_MAX
cdef enum:
    STACK_IOV = 64              # buffers a write takes without a malloc


def _shared_values():
    """The shared values as this module holds them (tests pin them to fvd._shared)."""
    return {"ZERO_CHUNK": ZERO_CHUNK, "NO_SLOT": NO_SLOT, "MAX_IOV": MAX_IOV,
            "SYS_IOV_MAX": SYS_IOV_MAX}

STAT_FIELDS = ("data_reads", "data_bytes_read", "data_writes", "data_bytes_written",
               "metadata_reads", "metadata_bytes_read", "metadata_writes",
               "metadata_bytes_written", "flushes", "journal_records", "refcount_updates",
               "base_reads", "base_bytes_read")


cdef class Stats:
    """Exact I/O counters since open."""
    cdef public long long data_reads, data_bytes_read, data_writes, data_bytes_written
    cdef public long long metadata_reads, metadata_bytes_read, metadata_writes
    cdef public long long metadata_bytes_written, flushes, journal_records, refcount_updates
    cdef public long long base_reads, base_bytes_read

    def __init__(self):
        """Every counter starts at 0."""

    def as_dict(self):
        return {name: getattr(self, name) for name in STAT_FIELDS}

    def __repr__(self):
        return "Stats(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


cdef int full_io(int fd, char *buf, size_t n, long long host, bint write) noexcept nogil:
    """pwrite (write) or pread until n bytes are done. 0 or errno. A read past end of
    file fills the rest with zeros; a write that makes no progress fails (EIO)."""
    cdef ssize_t done
    while n > 0:
        done = pwrite(fd, buf, n, host) if write else pread(fd, buf, n, host)
        if done < 0:
            if errno == EINTR:
                continue
            return errno
        if done == 0:
            if write:
                return EIO      # no progress: never spin
            memset(buf, 0, n)
            return 0
        buf += done
        n -= done
        host += done
    return 0


cdef inline int full_pread(int fd, char *buf, size_t n, long long host) noexcept nogil:
    return full_io(fd, buf, n, host, False)


cdef inline int full_pwrite(int fd, const char *buf, size_t n, long long host) noexcept nogil:
    return full_io(fd, <char *>buf, n, host, True)


cdef int full_pwritev(int fd, iovec *iov, int count, long long total,
                      long long host) noexcept nogil:
    """pwritev until `total` bytes are out (iov is consumed). 0 or errno."""
    cdef int first = 0
    cdef long long done = 0
    cdef ssize_t put
    while done < total:
        put = pwritev(fd, &iov[first], min(count - first, SYS_IOV_MAX), host + done)
        if put < 0:
            if errno == EINTR:
                continue
            return errno
        if put == 0:
            return EIO          # no progress: never spin
        done += put
        while first < count and <size_t>put >= iov[first].iov_len:
            put -= iov[first].iov_len
            first += 1
        if first < count:
            iov[first].iov_base = <char *>iov[first].iov_base + put
            iov[first].iov_len -= put
    return 0


cdef object io_error(object factory, int err, str what):
    """The exception for a failed data I/O: `factory(errno, what)` when the owner set
    one (fvd.Image names its file), else a plain OSError."""
    if factory is None:
        return OSError(err, what)
    return factory(err, what)


cdef long long host_readinto(int fd, Stats st, long long host, object buf,
                             object factory=None, long long limit=-1) except -2:
    """One data read of a whole writable buffer at a host offset (zeros past EOF). With
    limit >= 0, only a buffer of 1..limit bytes is read; otherwise nothing is done or
    counted and -1 returned."""
    cdef Py_buffer view
    cdef int err
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        if limit >= 0 and (view.len == 0 or view.len > limit):
            return -1
        with nogil:
            err = full_pread(fd, <char *>view.buf, view.len, host)
        if err:
            raise io_error(factory, err, "read failed")
        st.data_reads += 1
        st.data_bytes_read += view.len
        return view.len
    finally:
        PyBuffer_Release(&view)


cdef long long host_pwritev(int fd, Stats st, long long host, object buffers,
                            Py_ssize_t limit, object factory=None) except -1:
    """One data write of the buffers at a host offset (memory-adjacent ones share an
    iovec). At most `limit` buffers (-1: any number)."""
    cdef Py_buffer stack_views[STACK_IOV]
    cdef iovec stack_iov[STACK_IOV]
    cdef Py_buffer *views = stack_views
    cdef iovec *iov = stack_iov
    cdef Py_ssize_t nbuf = len(buffers)
    cdef int count = 0, niov = 0, i, err
    cdef long long total = 0
    if limit >= 0 and nbuf > limit:
        raise ValueError("too many buffers")
    if nbuf > STACK_IOV:
        views = <Py_buffer *>malloc(nbuf * sizeof(Py_buffer))
        iov = <iovec *>malloc(nbuf * sizeof(iovec))
        if views == NULL or iov == NULL:
            free(views)
            free(iov)
            raise MemoryError()
    try:
        for b in buffers:
            if count == nbuf:
                raise ValueError("buffer list changed size")
            PyObject_GetBuffer(b, &views[count], PyBUF_SIMPLE)
            count += 1
            if views[count - 1].len == 0:
                continue
            if niov and <char *>iov[niov - 1].iov_base + iov[niov - 1].iov_len == \
                    <char *>views[count - 1].buf:
                iov[niov - 1].iov_len += views[count - 1].len
            else:
                iov[niov].iov_base = views[count - 1].buf
                iov[niov].iov_len = views[count - 1].len
                niov += 1
            total += views[count - 1].len
        with nogil:
            err = full_pwritev(fd, iov, niov, total, host)
        if err:
            raise io_error(factory, err, "write failed")
        st.data_writes += 1
        st.data_bytes_written += total
        return total
    finally:
        for i in range(count):
            PyBuffer_Release(&views[i])
        if views != stack_views:
            free(views)
            free(iov)


cdef inline long long host_of(uint32_t e, int shift, long long data_offset,
                              long long within) noexcept nogil:
    if e >= ZERO_CHUNK:
        return -1
    return data_offset + ((<long long>e) << shift) + within


cdef struct BaseView:
    const uint8_t *bits         # fresh (reads) or stale (writes) bitmap; NULL: no base
    long long bend
    int bshift
    int fd


cdef inline bint bit_at(const uint8_t *arr, long long b) noexcept nogil:
    return (arr[b >> 3] >> (b & 7)) & 1


cdef struct PartView:
    # partial chunks (fvd.features.granular): slot per virtual chunk, source and bit row per slot
    const uint32_t *slot        # NULL: no partial chunk
    long long nslot
    const uint32_t *src
    const uint8_t *bits
    const uint8_t *wbits        # granules a write may take on the fast path (subset of bits)
    long long gbytes
    int gshift


cdef inline long long granule_run(const PartView *pv, uint32_t k, long long within,
                                  long long n, uint32_t *e) noexcept nogil:
    """Length of the run from `within` (at most n bytes) that one layer of partial chunk
    slot k answers; e[0] becomes the source chunk where the granules are unwritten."""
    cdef const uint8_t *row = pv.bits + <long long>k * pv.gbytes
    cdef long long g = within >> pv.gshift, stop = within + n, gend
    cdef bint b = bit_at(row, g)
    if not b:
        e[0] = pv.src[k]
    g += 1
    while (g << pv.gshift) < stop and bit_at(row, g) == b:
        g += 1
    gend = g << pv.gshift
    return (gend if gend < stop else stop) - within


cdef inline uint32_t slot_of(const PartView *pv, long long v) noexcept nogil:
    if pv.slot == NULL or v >= pv.nslot:
        return NO_SLOT
    return pv.slot[v]


cdef bint stale_ok(const BaseView *bv, long long offset, long long length) noexcept nogil:
    """Every block under the range below bend durably in the image (stale bit set)."""
    cdef long long b, last, stop
    if bv.bits == NULL or length == 0 or offset >= bv.bend:
        return True
    stop = offset + length
    if stop > bv.bend:
        stop = bv.bend
    b = offset >> bv.bshift
    last = (stop - 1) >> bv.bshift
    while b <= last:
        if (b & 7) == 0 and b + 7 <= last:
            if bv.bits[b >> 3] != 0xFF:
                return False
            b += 8
            continue
        if not bit_at(bv.bits, b):
            return False
        b += 1
    return True


cdef long long base_segment(const BaseView *bv, long long pos, long long end,
                            bint *image) noexcept nogil:
    """End of the run of [pos, end) answered by one layer; image[0]: which one. Image runs
    reaching bend continue to end (past the base is the image)."""
    cdef long long b, stop, lim
    cdef bint bit
    if pos >= bv.bend:
        image[0] = True
        return end
    lim = end if end < bv.bend else bv.bend
    b = pos >> bv.bshift
    bit = bit_at(bv.bits, b)
    image[0] = bit
    b += 1
    while True:
        stop = b << bv.bshift
        if stop >= lim:
            break
        if (b & 7) == 0 and ((b + 8) << bv.bshift) <= lim and \
                bv.bits[b >> 3] == (0xFF if bit else 0):
            b += 8
            continue
        if bit_at(bv.bits, b) != bit:
            return stop
        b += 1
    if bit and lim == bv.bend:
        return end
    return lim


cdef class ChunkMap:
    """Translates virtual offsets through the one-level table and does the data I/O.

    With a base image (set_base): the ``stale`` bitmap gates write() (every touched block
    below ``bend`` must be durably in the image, else -1), and for a raw base opened
    without copy-on-read (``base_fd`` >= 0) readinto() also answers the blocks still in
    the base, from the base file: one pread (one stats.base_reads) per contiguous base
    run, exactly as fvd.features.base.BaseLayer.readinto splits a read.
    """
    cdef public int fd
    cdef public object table, frozen, stats
    cdef uint32_t[::1] tab
    cdef uint8_t[::1] frz
    cdef Stats st
    cdef public long long chunk_size, data_offset, size
    cdef int shift
    # base image (set_base); bend == 0: no base
    cdef public object fresh, stale
    cdef uint8_t[::1] fresh_v, stale_v
    cdef public long long block_size, bend
    cdef public int base_fd
    cdef int bshift
    cdef readonly int base_users     # readinto calls inside the base fd right now
    # partial chunks (set_partial); the arrays are kept alive by fvd.features.granular
    cdef PartView pv
    cdef public object partial
    # Grace periods (see users_enter): readinto/write calls in flight, by epoch parity
    cdef long long users[2]
    cdef public long long epoch
    cdef public bint closed         # set by the owner's close: new calls raise ValueError
    cdef public object error        # factory(errno, what) -> exception, or None

    def __init__(self, int fd, table, frozen, long long chunk_size, long long data_offset,
                 long long size, Stats stats):
        """A map over `table` (uint32 per virtual chunk) and `frozen` (uint8 per physical
        chunk) of the image file `fd`; no base, no partial chunks until set_*."""
        self.fd = fd
        self.chunk_size = chunk_size
        self.shift = chunk_size.bit_length() - 1
        self.data_offset = data_offset
        self.size = size
        self.stats = self.st = stats
        self.set_table(table)
        self.set_frozen(frozen)
        self.set_base(None, None, 0, 0, -1)
        self.set_partial(None, None, None, 0)
        self.users[0] = self.users[1] = 0
        self.epoch = 0
        self.closed = False
        self.error = None

    cdef int users_enter(self) except -1:
        """Register a call that translates through the table (with the GIL held). A
        physical chunk released at epoch E is reused only once the epoch reached E + 2
        (try_advance), so no call that may still hold its old entry is in flight."""
        if self.closed:
            raise ValueError("I/O on a closed image")
        cdef int p = self.epoch & 1
        self.users[p] += 1
        return p

    def enter(self):
        """Register a caller that pairs bitmap bits with table entries itself (the base
        layer's Python reads); returns the token for leave()."""
        return self.users_enter()

    def leave(self, int token):
        self.users[token & 1] -= 1

    def try_advance(self):
        """Advance the epoch when no call registered two epochs ago is still in flight.
        Returns True when it advanced."""
        if self.users[(self.epoch + 1) & 1]:
            return False
        self.epoch += 1
        return True

    @property
    def users_in_flight(self):
        return self.users[0] + self.users[1]

    def set_partial(self, slot, src, bits, long long granule_size, wbits=None):
        """View the partial-chunk arrays of fvd.features.granular (uint32 slot per virtual chunk,
        NONE = 0xFFFFFFFF; uint32 source and a bit row per slot). `wbits` (rows like
        `bits`, a subset of them; default `bits`): the granules a write may go to without
        the slow path (a carried granule's first write clears its provenance there). The
        caller keeps every array it ever passed alive: calls in flight read them without
        the GIL."""
        cdef uint32_t[::1] sv, cv
        cdef uint8_t[::1] bv, wv
        self.pv.slot = NULL
        self.pv.nslot = 0
        self.partial = (slot, src, bits)
        if slot is None or len(slot) == 0 or len(src) == 0:
            return
        sv, cv, bv = slot, src, bits
        wv = bits if wbits is None else wbits
        self.pv.wbits = &wv[0]
        self.pv.gshift = granule_size.bit_length() - 1
        self.pv.gbytes = -(-(self.chunk_size >> self.pv.gshift) // 8)
        self.pv.src = &cv[0]
        self.pv.bits = &bv[0]
        self.pv.nslot = len(slot)
        self.pv.slot = &sv[0]

    def set_base(self, fresh, stale, long long block_size, long long bend, int base_fd=-1):
        """Bitmap views for a base image: ``fresh`` decides reads, ``stale`` fast writes
        (uint8 arrays, block b = bit b % 8 of byte b // 8). Bytes at or past ``bend``
        belong to the image. ``base_fd`` >= 0: a raw base read here; -1: reads stay
        image-only (the Python layer splits them). ``set_base(None, None, 0, 0)``: no base.
        The arrays are viewed, not copied: call again when Python replaces them."""
        if bend > 0 and (fresh is None or stale is None or block_size <= 0 or
                         block_size & (block_size - 1)):
            raise ValueError("a base needs both bitmaps and a power-of-two block size")
        if bend <= 0:
            fresh = stale = None
            bend, block_size, base_fd = 0, 0, -1
        if bend > 0:
            nbits = -(-bend // block_size)
            if len(fresh) * 8 < nbits or len(stale) * 8 < nbits:
                raise ValueError("bitmap shorter than the base")
            self.fresh_v = fresh
            self.stale_v = stale
        else:
            self.fresh_v = None
            self.stale_v = None
        self.fresh, self.stale = fresh, stale
        self.block_size, self.bend, self.base_fd = block_size, bend, base_fd
        self.bshift = block_size.bit_length() - 1 if block_size > 0 else 0

    def set_table(self, table):
        self.table = table
        self.tab = table

    def set_frozen(self, frozen):
        self.frozen = frozen
        self.frz = frozen

    cdef int check_range(self, long long offset, long long length) except -1:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"I/O range [{offset}, {offset + length}) outside the image "
                             f"(size {self.size})")
        return 0

    cdef int read_runs(self, const PartView *pv, char *buf, long long offset,
                       long long length, long long *calls) noexcept nogil:
        """Fill buf from the image; unallocated and zero chunks read as zeros; partial
        chunks split into runs by their granule bits."""
        cdef long long cs = self.chunk_size, pos = 0, n, within, host, v
        cdef long long run_pos = 0, run_len = 0, run_host = -2
        cdef int err
        cdef uint32_t e, k
        while pos < length:
            within = (offset + pos) & (cs - 1)
            n = cs - within
            if n > length - pos:
                n = length - pos
            v = (offset + pos) >> self.shift
            e = self.tab[v]
            if pv.slot != NULL and e < ZERO_CHUNK:
                k = slot_of(pv, v)
                if k != NO_SLOT:
                    n = granule_run(pv, k, within, n, &e)
            host = host_of(e, self.shift, self.data_offset, within)
            if run_len and ((host < 0 and run_host < 0) or
                            (host >= 0 and run_host >= 0 and run_host + run_len == host)):
                run_len += n
            else:
                if run_len:
                    err = self.flush_read(buf + run_pos, run_len, run_host, calls)
                    if err:
                        return err
                run_pos, run_len, run_host = pos, n, host
            pos += n
        if run_len:
            return self.flush_read(buf + run_pos, run_len, run_host, calls)
        return 0

    cdef int flush_read(self, char *buf, long long n, long long host,
                        long long *calls) noexcept nogil:
        if host < 0:
            memset(buf, 0, n)
            return 0
        calls[0] += 1
        calls[1] += n
        return full_pread(self.fd, buf, n, host)

    cdef bint all_writable(self, uint8_t[::1] frz, long long offset,
                           long long length) noexcept nogil:
        cdef long long v, first, last
        cdef uint32_t e
        if length == 0:
            return True
        first = offset >> self.shift
        last = (offset + length - 1) >> self.shift
        for v in range(first, last + 1):
            e = self.tab[v]
            if e >= ZERO_CHUNK:
                return False
            if e < <uint32_t>frz.shape[0] and frz[e]:
                return False        # held by a snapshot: copy on write
        return True

    cdef int read_based(self, BaseView *bv, const PartView *pv, char *buf, long long offset,
                        long long length, long long *calls) noexcept nogil:
        """Fill buf, image runs through the table, base runs from the base fd. calls[0:2]
        data reads/bytes, calls[2:4] base reads/bytes (counted once read)."""
        cdef long long pos = offset, stop, end = offset + length
        cdef bint image
        cdef int err
        while pos < end:
            stop = base_segment(bv, pos, end, &image)
            if image:
                err = self.read_runs(pv, buf + (pos - offset), pos, stop - pos, calls)
            else:
                err = full_pread(bv.fd, buf + (pos - offset), stop - pos, pos)
                if not err:
                    calls[2] += 1
                    calls[3] += stop - pos
            if err:
                return err
            pos = stop
        return 0

    cdef object base_view(self, BaseView *bv, bint stale):
        """Capture the base fields (with the GIL: set_base may run in another thread once
        it is released); returns the bitmap array, to be kept alive meanwhile."""
        bv.bend = self.bend
        bv.bshift = self.bshift
        bv.fd = self.base_fd
        bv.bits = NULL
        if self.bend == 0:
            return None
        if stale:
            bv.bits = &self.stale_v[0]
            return self.stale
        bv.bits = &self.fresh_v[0]
        return self.fresh

    cdef int write_runs(self, const char *buf, long long offset, long long length,
                        long long *calls) noexcept nogil:
        cdef long long cs = self.chunk_size, pos = 0, n, within, host
        cdef long long run_pos = 0, run_len = 0, run_host = -2
        cdef int err
        while pos < length:
            within = (offset + pos) & (cs - 1)
            n = cs - within
            if n > length - pos:
                n = length - pos
            host = host_of(self.tab[(offset + pos) >> self.shift], self.shift,
                           self.data_offset, within)
            if run_len and run_host + run_len == host:
                run_len += n
            else:
                if run_len:
                    calls[0] += 1
                    calls[1] += run_len
                    err = full_pwrite(self.fd, buf + run_pos, run_len, run_host)
                    if err:
                        return err
                run_pos, run_len, run_host = pos, n, host
            pos += n
        if run_len:
            calls[0] += 1
            calls[1] += run_len
            return full_pwrite(self.fd, buf + run_pos, run_len, run_host)
        return 0

    def readinto(self, long long offset, buf):
        cdef Py_buffer view
        cdef long long calls[4]
        cdef int err
        cdef BaseView bv
        cdef object keep = None
        cdef PartView pv
        cdef int p = self.users_enter()
        # Copied once registered (with the GIL): fvd.features.granular waits for the calls
        # registered before it installs grown arrays and before it uses them.
        pv = self.pv
        try:
            PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        except BaseException:
            self.users[p] -= 1
            raise
        try:
            self.check_range(offset, view.len)
            calls[0] = calls[1] = calls[2] = calls[3] = 0
            if self.base_fd >= 0 and offset < self.bend:
                keep = self.base_view(&bv, False)
                self.base_users += 1
                try:
                    with nogil:
                        err = self.read_based(&bv, &pv, <char *>view.buf, offset, view.len,
                                              calls)
                finally:
                    self.base_users -= 1
            else:
                with nogil:
                    err = self.read_runs(&pv, <char *>view.buf, offset, view.len, calls)
            self.st.data_reads += calls[0]
            self.st.data_bytes_read += calls[1]
            self.st.base_reads += calls[2]
            self.st.base_bytes_read += calls[3]
            if err:
                raise io_error(self.error, err, "read failed")
            return view.len
        finally:
            self.users[p] -= 1
            PyBuffer_Release(&view)

    cdef bint granules_written(self, const PartView *pv, long long offset,
                               long long length) noexcept nogil:
        """Every granule under the range of a partial chunk is written and carries no
        provenance (wbits; else the write must copy head / tail from the source and record
        its granules, or forget the granule's provenance: slow path)."""
        cdef long long pos = offset, end = offset + length, stop, v, g, g1, base
        cdef uint32_t k
        cdef const uint8_t *row
        if pv.slot == NULL or length == 0:
            return True
        while pos < end:
            v = pos >> self.shift
            base = v << self.shift
            stop = base + self.chunk_size
            if stop > end:
                stop = end
            k = slot_of(pv, v)
            if k != NO_SLOT:
                row = pv.wbits + <long long>k * pv.gbytes
                g = (pos - base) >> pv.gshift
                g1 = (stop - base - 1) >> pv.gshift
                while g <= g1:
                    if not bit_at(row, g):
                        return False
                    g += 1
            pos = stop
        return True

    def writable(self, long long offset, long long length):
        """True when every chunk under the range is allocated and not held by a snapshot,
        and every granule it touches in a partial chunk is written (ValueError outside
        the image)."""
        cdef PartView pv = self.pv
        self.check_range(offset, length)
        return self.all_writable(self.frz, offset, length) and \
            self.granules_written(&pv, offset, length)

    def write(self, long long offset, data):
        """Write into allocated, unshared chunks whose touched blocks are durably out of
        the base (stale bits); returns -1 (nothing written) otherwise."""
        cdef Py_buffer view
        cdef long long calls[2]
        cdef int err = 0
        cdef bint ok
        cdef BaseView bv
        cdef uint8_t[::1] frz
        cdef PartView pv
        cdef int p = self.users_enter()
        # Read only once registered: a snapshot create swaps in a frozen array, then waits
        # for the writes registered before it. Held here: the swap may free the old one.
        frz = self.frz
        pv = self.pv                    # likewise (fvd.features.granular grows its arrays so)
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except BaseException:
            self.users[p] -= 1
            raise
        try:
            self.check_range(offset, view.len)
            calls[0] = calls[1] = 0
            keep = self.base_view(&bv, True)
            with nogil:
                ok = stale_ok(&bv, offset, view.len) and \
                    self.all_writable(frz, offset, view.len) and \
                    self.granules_written(&pv, offset, view.len)
                if ok:
                    err = self.write_runs(<const char *>view.buf, offset, view.len, calls)
            self.st.data_writes += calls[0]
            self.st.data_bytes_written += calls[1]
            if err:
                raise io_error(self.error, err, "write failed")
            return view.len if ok else -1
        finally:
            self.users[p] -= 1
            PyBuffer_Release(&view)

    def host_offset(self, long long offset):
        """Host offset of a virtual offset, or -1 when its chunk has no data."""
        self.check_range(offset, 1)
        return host_of(self.tab[offset >> self.shift], self.shift, self.data_offset,
                       offset & (self.chunk_size - 1))

    def pwritev(self, long long host_offset, buffers):
        """One data write of several buffers at a host offset (copy-on-write merges)."""
        return host_pwritev(self.fd, self.st, host_offset, buffers, MAX_IOV, self.error)

    def pread_host(self, long long host_offset, buf):
        return host_readinto(self.fd, self.st, host_offset, buf, self.error)

    def translate(self, const int64_t[::1] vchunks, int64_t[::1] out):
        """Batch translation: host offsets of chunk starts (-1 where no data). Returns
        len(vchunks); ValueError for a chunk outside the table or a short `out`."""
        cdef Py_ssize_t i, n = vchunks.shape[0], bad = -1
        cdef int64_t limit = self.tab.shape[0]
        if out.shape[0] < n:
            raise ValueError(f"translate: out holds {out.shape[0]} entries, not {n}")
        with nogil:
            for i in range(n):
                if vchunks[i] < 0 or vchunks[i] >= limit:
                    bad = i
                    break
                out[i] = host_of(self.tab[vchunks[i]], self.shift, self.data_offset, 0)
        if bad >= 0:
            raise ValueError(f"translate: chunk {vchunks[bad]} outside the table ({limit})")
        return n


cdef class HostFile:
    """Data I/O at host offsets with exact accounting, shared by the FVD chunk map and the
    QCOW2 baseline: one readinto / pwritev = one data read / write in `stats`."""
    cdef public int fd
    cdef public object stats
    cdef Stats st

    def __init__(self, int fd, Stats stats):
        """Data I/O on `fd`, counted in `stats`."""
        self.fd = fd
        self.stats = self.st = stats

    def readinto(self, long long host_offset, buf, long long limit=-1):
        """Fill a writable contiguous buffer from host_offset (zeros past end of file).
        With limit >= 0, only a buffer of 1..limit bytes is read; otherwise nothing is
        done or counted and -1 returned (callers mapping one extent try this first)."""
        return host_readinto(self.fd, self.st, host_offset, buf, None, limit)

    def pwritev(self, long long host_offset, buffers):
        """One data write of the buffers, back to back, at host_offset."""
        return host_pwritev(self.fd, self.st, host_offset, buffers, -1)


cdef long long mapped_top(const uint32_t *t, Py_ssize_t nt) noexcept nogil:
    """The largest physical chunk the table maps + 1 (0: none)."""
    cdef Py_ssize_t i
    cdef uint32_t e
    cdef long long top = 0
    for i in range(nt):
        e = t[i]
        if e < ZERO_CHUNK and e >= top:
            top = <long long>e + 1
    return top


cdef bint mark_held(const uint32_t *t, Py_ssize_t nt, uint8_t *m, long long lim,
                    Py_ssize_t *count, long long *top) noexcept nogil:
    """m[e] = 1 for every mapped entry e below lim; count[0]: the mapped entries, top[0]:
    the largest marked + 1. True when an entry reaches lim (none is marked after it)."""
    cdef Py_ssize_t i, counted = 0
    cdef uint32_t e, zero = ZERO_CHUNK    # locals: the byte stores below alias globals
    cdef long long marked = 0
    cdef bint over = False
    for i in range(nt):
        e = t[i]
        if e < zero:
            counted += 1
            if e >= lim:
                over = True
            elif not over:
                m[e] = 1
                if e >= marked:
                    marked = <long long>e + 1
    count[0] = counted
    top[0] = marked
    return over


def held_mask(const uint32_t[::1] table, Py_ssize_t n, Py_ssize_t cap=-1):
    """(mask, count) for snapshot bookkeeping (fvd.snapshots): a uint8 array,
    max(n, largest mapped entry + 1) long, that is 1 at each physical chunk the lookup
    table maps, and how many entries map one. With cap >= 0 and an entry at or past cap,
    the mask is None (nothing that large is allocated). Without the GIL, in place of
    numpy's scatter through a converted index array: one pass with a cap (the mask can
    be allocated first), two without (the first finds the size)."""
    cdef Py_ssize_t nt = table.shape[0], count = 0
    cdef const uint32_t *t = &table[0] if nt else NULL
    cdef long long top = 0, lim = cap
    cdef uint8_t *m = NULL
    cdef uint8_t[::1] mv
    cdef bint over
    if cap < 0:
        with nogil:
            lim = mapped_top(t, nt)
    mask = np.zeros(max(n, lim), dtype=np.uint8)
    if len(mask):
        mv = mask
        m = &mv[0]
    with nogil:
        over = mark_held(t, nt, m, lim, &count, &top)
    if over:
        return None, count
    return (mask[:max(n, top)] if cap >= 0 else mask), count
