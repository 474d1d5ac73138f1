"""Pure-Python twin of fvd._fastpath: same classes, same behaviour, byte for byte.

Selected with FVD_PURE_PYTHON=1 or when the extension is not built.
"""
import os

UNALLOCATED = 0xFFFFFFFF
ZERO_CHUNK = 0xFFFFFFFE
MAX_IOV = 64
SYS_IOV_MAX = 1024          # iovecs per pwritev call (Linux UIO_MAXIOV)

STAT_FIELDS = ("data_reads", "data_bytes_read", "data_writes", "data_bytes_written",
               "metadata_reads", "metadata_bytes_read", "metadata_writes",
               "metadata_bytes_written", "flushes", "journal_records", "refcount_updates",
               "base_reads", "base_bytes_read")


class Stats:
    """Exact I/O counters since open."""
    __slots__ = STAT_FIELDS

    def __init__(self):
        for name in STAT_FIELDS:
            setattr(self, name, 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in STAT_FIELDS}

    def __repr__(self):
        return "Stats(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


def _full_pread(fd, view, offset):
    """pread until the view is full; bytes past end of file read as zeros."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = bytes(len(view) - done)
            break
        done += n


def _full_pwrite(fd, view, offset):
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _byte_view(buf, writable):
    mv = memoryview(buf)
    if mv.format == "B" and mv.ndim == 1 and mv.contiguous and not (writable and mv.readonly):
        return mv
    if not mv.contiguous:
        raise ValueError("buffer must be contiguous")
    mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
    if writable and mv.readonly:
        raise TypeError("buffer is read-only")
    return mv


class ChunkMap:
    """Translates virtual offsets through the one-level table and does the data I/O."""

    def __init__(self, fd, table, frozen, chunk_size, data_offset, size, stats):
        self.fd = fd
        self.table = table
        self.frozen = frozen
        self.chunk_size = chunk_size
        self.shift = chunk_size.bit_length() - 1
        self.data_offset = data_offset
        self.size = size
        self.stats = stats

    def set_frozen(self, frozen):
        self.frozen = frozen

    def set_table(self, table):
        self.table = table

    def _check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"I/O range [{offset}, {offset + length}) outside the image "
                             f"(size {self.size})")

    def _runs(self, offset, length):
        """Yield (buffer_pos, length, host_offset or None) runs, coalescing contiguous hosts."""
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
            host = None if e >= ZERO_CHUNK else self.data_offset + (e << shift) + within
            if run_len and ((host is None and run_host is None) or
                            (host is not None and run_host is not None and
                             run_host + run_len == host)):
                run_len += n
            else:
                if run_len:
                    yield run_pos, run_len, run_host
                run_pos, run_len, run_host = pos, n, host
            pos += n
        if run_len:
            yield run_pos, run_len, run_host

    def readinto(self, offset, buf):
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1 or mv.readonly or not mv.contiguous:
            mv = _byte_view(buf, True)
        length = len(mv)
        if offset < 0 or offset + length > self.size:
            self._check_range(offset, length)
        shift = self.shift
        if length and offset >> shift == (offset + length - 1) >> shift:
            # Common case, inside one chunk: one lookup, one pread.
            e = int(self.table[offset >> shift])
            if e < ZERO_CHUNK:
                host = self.data_offset + (e << shift) + (offset & (self.chunk_size - 1))
                if os.preadv(self.fd, [mv], host) < length:
                    _full_pread(self.fd, mv, host)
                self.stats.data_reads += 1
                self.stats.data_bytes_read += length
                return length
        for pos, n, host in self._runs(offset, length):
            piece = mv[pos:pos + n]
            if host is None:
                piece[:] = bytes(n)
            else:
                _full_pread(self.fd, piece, host)
                self.stats.data_reads += 1
                self.stats.data_bytes_read += n
        return length

    def writable(self, offset, length):
        """True when every chunk under the range is allocated and not held by a snapshot."""
        if length == 0:
            return True
        first, last = offset >> self.shift, (offset + length - 1) >> self.shift
        entries = self.table[first:last + 1]
        if (entries >= ZERO_CHUNK).any():
            return False
        held = entries[entries < len(self.frozen)]
        return not self.frozen[held].any()

    def write(self, offset, data):
        """Write into allocated, unshared chunks; returns -1 (nothing written) otherwise."""
        mv = _byte_view(data, False)
        length = len(mv)
        self._check_range(offset, length)
        if not self.writable(offset, length):
            return -1
        for pos, n, host in self._runs(offset, length):
            _full_pwrite(self.fd, mv[pos:pos + n], host)
            self.stats.data_writes += 1
            self.stats.data_bytes_written += n
        return length

    def host_offset(self, offset):
        """Host offset of a virtual offset, or -1 when its chunk has no data."""
        self._check_range(offset, 1)
        e = int(self.table[offset >> self.shift])
        if e >= ZERO_CHUNK:
            return -1
        return self.data_offset + (e << self.shift) + (offset & (self.chunk_size - 1))

    def pwritev(self, host_offset, buffers):
        """One data write of several buffers at a host offset (copy-on-write merges)."""
        if len(buffers) > MAX_IOV:
            raise ValueError("too many buffers")
        return _host_pwritev(self.fd, self.stats, host_offset, buffers)

    def pread_host(self, host_offset, buf):
        return _host_readinto(self.fd, self.stats, host_offset, buf)

    def translate(self, vchunks, out):
        """Batch translation: host offsets of chunk starts (-1 where no data)."""
        table, shift, base = self.table, self.shift, self.data_offset
        for i in range(len(vchunks)):
            e = int(table[vchunks[i]])
            out[i] = -1 if e >= ZERO_CHUNK else base + (e << shift)
        return len(out)


def _host_readinto(fd, stats, host_offset, buf):
    """One data read of a whole writable buffer at a host offset (zeros past EOF)."""
    mv = _byte_view(buf, True)
    n = len(mv)
    if os.preadv(fd, [mv], host_offset) < n:
        _full_pread(fd, mv, host_offset)
    stats.data_reads += 1
    stats.data_bytes_read += n
    return n


def _host_pwritev(fd, stats, host_offset, buffers):
    """One data write of the buffers, back to back, at a host offset."""
    views = [_byte_view(b, False) for b in buffers]
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        done += os.pwritev(fd, _skip(views, done)[:SYS_IOV_MAX], host_offset + done)
    stats.data_writes += 1
    stats.data_bytes_written += total
    return total


class HostFile:
    """Data I/O at host offsets with exact accounting, shared by the FVD chunk map and the
    QCOW2 baseline: one readinto / pwritev = one data read / write in `stats`."""

    def __init__(self, fd, stats):
        self.fd = fd
        self.stats = stats

    def readinto(self, host_offset, buf, limit=-1):
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

    def pwritev(self, host_offset, buffers):
        """One data write of the buffers, back to back, at host_offset."""
        return _host_pwritev(self.fd, self.stats, host_offset, buffers)


def _skip(views, n):
    """The views with the first n bytes dropped."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out
