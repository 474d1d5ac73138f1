"""The FVD image: open/create, the write path around the fast path, journal, checkpoint.

Order of metadata writes (docs/format.md, "Crash consistency"):
  guest data  ->  journal transaction  ->  flush              (writethrough, per write)
  guest data  ->  flush -> journal transactions -> flush      (writeback, at flush())
  checkpoint: flush -> table (+bitmap) -> flush -> header(epoch+1) -> flush
"""

import errno
import os
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import _impl
from . import format as fmt
from .allocator import ChunkAllocator, front_usage, runs
from .diskops import DiskOps
from .errors import (
    CorruptImageError,
    FvdError,
    ImageIOError,
    ImageLockedError,
    io_error,
)
from .fileio import full_pwrite, lock_image, punch_hole, writer_active
from .journal import (
    REC_BITMAP,
    REC_DATA_CRC,
    REC_GRANULE,
    REC_TABLE,
    RECORD_HEAD,
    Journal,
    range_crc,
    read_transactions,
    table_records,
)


class ReadOnlyImageError(FvdError, OSError):
    """A write on an image opened read-only."""

    def __init__(self, path):
        OSError.__init__(self, errno.EBADF, "image is open read-only", str(path))


@dataclass(frozen=True)
class Extent:
    """One run of `Image.extents()`, in the vocabulary of `qemu-img map --output=json`."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: object  # host offset, or None

    def as_dict(self):
        d = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        return d


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    leaks_fixed: int = 0
    corruptions_fixed: int = 0
    messages: Optional[list] = None

    @property
    def ok(self):
        return self.corruptions == 0 and self.leaks == 0

    def as_dict(self):
        return {
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "leaks_fixed": self.leaks_fixed,
            "corruptions_fixed": self.corruptions_fixed,
            "ok": self.ok,
            "messages": list(self.messages or []),
        }


def crc_guard(records, journal):
    """(host ranges, epoch, next_seq) of the DATA_CRC records of the transaction just
    appended, or None: while it stays the journal's last, replay checks those crcs."""
    ranges = []
    for rec in records:
        rtype, count, start = RECORD_HEAD.unpack_from(rec)
        if rtype == REC_DATA_CRC:
            ranges.append((start, start + count))
    return (ranges, journal.epoch, journal.next_seq) if ranges else None


def _parse_cache(cache):
    if cache not in ("writeback", "writethrough"):
        raise ValueError(f"cache must be 'writeback' or 'writethrough', not {cache!r}")
    return cache == "writethrough"


def create(
    path,
    size,
    *,
    chunk_size=fmt.MiB,
    block_size=64 * fmt.KiB,
    base=None,
    base_format=None,
    compact=True,
    journal_size=None,
    overwrite=False,
):
    """Create a new, empty image file (see `fvd.base` for images over a base)."""
    size = int(size)
    if not 0 < size <= fmt.MAX_VIRTUAL_SIZE:
        raise ValueError(f"image size must be in (0, {fmt.MAX_VIRTUAL_SIZE}], not {size}")
    if not (fmt.is_power_of_two(chunk_size) and fmt.MIN_CHUNK <= chunk_size <= fmt.MAX_CHUNK):
        raise ValueError(
            f"chunk_size must be a power of two in [{fmt.MIN_CHUNK}, "
            f"{fmt.MAX_CHUNK}], not {chunk_size}"
        )
    if not (fmt.is_power_of_two(block_size) and fmt.MIN_BLOCK <= block_size <= chunk_size):
        raise ValueError(
            f"block_size must be a power of two in [{fmt.MIN_BLOCK}, chunk_size], not {block_size}"
        )
    if not compact:
        raise ValueError("only compact images (one-level lookup table) are supported")
    if -(-size // chunk_size) > fmt.MAX_TABLE_ENTRIES:
        raise ValueError("image too large for this chunk size")
    if journal_size is not None and journal_size < fmt.MIN_JOURNAL:
        raise ValueError(f"journal_size must be at least {fmt.MIN_JOURNAL}")
    header = {
        "virtual_size": size,
        "chunk_size": chunk_size,
        "block_size": block_size,
        "clean_shutdown": 1,
        "journal_epoch": 1,
        "next_snapshot_id": 1,
    }
    base_name = b""
    if base is not None:
        from .base import describe_new_base

        base_name, base_fields = describe_new_base(path, base, base_format, size)
        header.update(base_fields)
    header.update(
        fmt.layout(
            size, chunk_size, block_size, header.get("base_size", 0), len(base_name), journal_size
        )
    )
    nchunks = -(-size // chunk_size)
    table = np.full(nchunks, fmt.UNALLOCATED, dtype=fmt.TABLE_DTYPE).tobytes()
    header["table_crc"] = zlib.crc32(table)
    bitmap = bytes(header.get("bitmap_size", 0))
    header["bitmap_crc"] = zlib.crc32(bitmap)
    flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o644)
    try:
        os.pwrite(fd, fmt.build_header(header).ljust(fmt.HEADER_REGION, b"\0"), 0)
        if base_name:
            os.pwrite(fd, base_name, header["base_name_offset"])
        os.pwrite(fd, table, header["table_offset"])
        os.ftruncate(fd, header["data_offset"])
        os.fsync(fd)
    except BaseException as e:
        os.close(fd)
        os.unlink(path)
        if isinstance(e, OSError):
            raise io_error(path, e, "create") from None
        raise
    os.close(fd)


class Image(DiskOps):
    """An open FVD image. Use `fvd.open()` to get one."""

    def __init__(
        self,
        path,
        mode="r",
        *,
        cache="writeback",
        copy_on_read=False,
        force_share=False,
        _for_check=False,
        _chain=(),
    ):
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        if force_share and mode != "r":
            raise ValueError("force_share is for read-only opens")
        self.path = os.fspath(path)
        self.read_only = mode == "r"
        self._writethrough = _parse_cache(cache)
        self._closed = True
        self._impl = _impl.module()
        self.stats = self._impl.Stats()
        self._problems = []
        self._notes = []  # check mode: what could not be checked, and why
        self._crc_guard = None  # see crc_guard() and _seal_overlapping
        self._for_check = _for_check
        self._base = None
        self._snapshots = None
        self._partial = None  # fvd.granular.PartialState (images without a base)
        self._lock = threading.RLock()  # table/bitmap/journal changes (fvd.base)
        self._pending = {}  # virtual chunk -> entry, not yet in the journal
        self._pending_bits = []  # (first_block, count) bitmap records not yet journaled
        self._dirty_since_checkpoint = False
        self._journal_broken = False  # a journal write failed: commit by checkpoint next
        self._fd = os.open(self.path, os.O_RDONLY if self.read_only else os.O_RDWR)
        try:
            if not force_share:
                lock_image(self._fd, self.path, exclusive=not self.read_only)
                self._load(_chain, copy_on_read)
            else:
                self._load_beside_writer(_chain, copy_on_read)
        except BaseException as e:
            self._release()
            if isinstance(e, OSError):
                raise io_error(self.path, e, "open") from None
            raise
        self._closed = False
        if self._base is None or self._base.fast_read:
            # Reads go straight to the fast path: no Python frame of ours per read (with
            # a raw base it reads the base runs itself; see fvd.base).
            self.readinto = self._map.readinto

    # ----- open -----------------------------------------------------------------
    def _load_beside_writer(self, chain, copy_on_read, attempts=5):
        """force_share: a reader may race a writer's journal append or checkpoint: retry,
        and if the image still looks damaged while a writer holds it, say so clearly."""
        for attempt in range(attempts):
            try:
                return self._load(chain, copy_on_read)
            except CorruptImageError:
                if not writer_active(self._fd):
                    raise
                if self._base is not None:
                    self._base.close()
                    self._base = None
                self.stats = self._impl.Stats()
                time.sleep(0.01 * (attempt + 1))
        raise ImageLockedError(
            f"{self.path}: image is being written by another handle and "
            f"no consistent view could be read; retry later"
        )

    def _load(self, chain, copy_on_read):
        file_size = os.fstat(self._fd).st_size
        raw = os.pread(self._fd, fmt.HEADER_SIZE, 0)
        self.stats.metadata_reads += 1
        self.stats.metadata_bytes_read += len(raw)
        self._header = fmt.parse_header(raw, self.path, file_size)
        h = self._header
        if not self.read_only and h["journal_epoch"] >= fmt.MAX_WRITABLE_EPOCH:
            raise CorruptImageError(
                self.path,
                fmt.FIELD_OFFSET["journal_epoch"],
                f"journal epoch {h['journal_epoch']} is too large for a "
                f"read-write open (limit {fmt.MAX_WRITABLE_EPOCH - 1})",
            )
        self.size = h["virtual_size"]
        self.chunk_size = h["chunk_size"]
        self.block_size = h["block_size"]
        self._nchunks = -(-self.size // self.chunk_size)
        self._relocate = set()  # check mode: virtual chunks repair copies to a new chunk
        self._lost = 0  # check mode: chunks past the end of the file
        self._table = self._read_table(file_size)
        self._frozen = np.zeros(0, dtype=np.uint8)
        self._load_features(chain, copy_on_read)
        replayed = self._replay(file_size) if not h["clean_shutdown"] else 0
        self._validate_table(file_size)
        self._map = self._impl.ChunkMap(
            self._fd,
            self._table,
            self._frozen,
            self.chunk_size,
            h["data_offset"],
            self.size,
            self.stats,
        )
        self._map.error = self._io_error
        if self._base is not None:
            self._base.attach_map()
        if self._partial is not None:
            self._partial.install(self._map, lambda: self._alloc.quiesce(time.sleep))
        self._journal = Journal(
            self._fd, h["journal_offset"], h["journal_size"], h["journal_epoch"], self.stats
        )
        self._alloc = ChunkAllocator(self._in_use(), self._punch_chunks, self._map)
        if self.read_only:
            return
        if self._for_check:
            # repair decides what to write; nothing is scrubbed before it looked
            self._write_header(clean_shutdown=0)
            self._sync()
            self._dirty_since_checkpoint = bool(replayed or not h["clean_shutdown"])
        else:
            self._start_writing(replayed or not h["clean_shutdown"])

    def _load_features(self, chain, copy_on_read):
        """Base image and snapshots (their modules hook in here)."""
        h = self._header
        self._bitmap = None
        if h["base_format"] != fmt.BASE_NONE:
            from .base import attach_base

            attach_base(self, chain, copy_on_read)
        else:
            from .granular import attach_partial

            attach_partial(self)  # copy_on_read without a base: a no-op, as in QEMU
        if h["nb_snapshots"] or h["snapshot_table_offset"]:
            from .snapshots import attach_snapshots

            attach_snapshots(self)

    def _read_meta(self, offset, length):
        data = os.pread(self._fd, length, offset)
        self.stats.metadata_reads += 1
        self.stats.metadata_bytes_read += len(data)
        if len(data) < length:
            raise CorruptImageError(
                self.path, offset + len(data), "file is truncated inside a metadata region"
            )
        return data

    def _read_table(self, file_size):
        h = self._header
        raw = self._read_meta(h["table_offset"], 4 * self._nchunks)
        if h["clean_shutdown"] and zlib.crc32(raw) != h["table_crc"]:
            self._problem(h["table_offset"], "lookup table checksum mismatch")
        return np.frombuffer(raw, dtype=fmt.TABLE_DTYPE).astype(np.uint32)

    def _problem(self, offset, what, count=1):
        """A corruption: raise, unless check() is collecting them (`count` problems that
        one message stands for)."""
        if not self._for_check:
            raise CorruptImageError(self.path, offset, what)
        self._problems.append((offset, what, count))

    def _validate_table(self, file_size):
        """Every entry must point inside the file, no two chunks may share one, and none
        may point into snapshot metadata. In check mode every problem is counted; entries
        past the end read as zeros from then on, shared ones are copied by repair."""
        t = self._table
        toff = self._header["table_offset"]
        data_offset = self._header["data_offset"]
        max_valid = max(0, -(-(file_size - data_offset) // self.chunk_size))
        allocated = t < fmt.ZERO_CHUNK
        bad = np.flatnonzero(allocated & (t >= max_valid))
        self._problem_list(
            bad,
            lambda v: (
                toff + 4 * v,
                f"table entry {int(t[v])} of chunk {v} points past the end of the file",
            ),
            "more table entries point past the end of the file (data lost)",
        )
        if len(bad):  # only reached in check mode: those chunks read as zeros now
            t[bad] = fmt.ZERO_CHUNK if self._bitmap is not None else fmt.UNALLOCATED
            self._lost = len(bad)
        counts = front_usage(t, 0)
        shared = np.flatnonzero(counts > 1)
        if len(shared):
            order = np.argsort(t, kind="stable")
            st = t[order]
            dup = order[1:][(st[1:] == st[:-1]) & (st[1:] < fmt.ZERO_CHUNK)]
            dup.sort()
            self._problem_list(
                dup,
                lambda v: (
                    toff + 4 * v,
                    f"chunk {v} shares physical chunk {int(t[v])} with another",
                ),
                "more chunks share a physical chunk",
            )
            self._relocate.update(dup.tolist())
        if self._snapshots is not None:
            meta = self._snapshots.meta_mask(max_valid)
            hit = np.flatnonzero(allocated & (t < len(meta)))
            hit = hit[meta[t[hit]]]
            self._problem_list(
                hit,
                lambda v: (
                    toff + 4 * v,
                    f"table entry {int(t[v])} of chunk {v} points into snapshot metadata",
                ),
                "more table entries point into snapshot metadata",
            )
            self._relocate.update(hit.tolist())
        if self._partial is not None:
            self._partial.validate(self)

    def _problem_list(self, where, describe, rest, shown=10):
        """One problem per index (the first `shown` spelled out), all counted."""
        for v in where[:shown].tolist():
            self._problem(*describe(v))
        if len(where) > shown:
            off, _ = describe(int(where[shown]))
            self._problem(off, f"{len(where) - shown} {rest}", len(where) - shown)

    def _replay(self, file_size):
        """Apply the journal's committed transactions to the in-memory table and bitmap."""
        h = self._header
        count = 0
        txs = []
        try:
            for tx in read_transactions(
                self._fd, self.path, h["journal_offset"], h["journal_size"], h["journal_epoch"]
            ):
                txs.append(tx)
        except CorruptImageError as e:
            if not self._for_check:
                raise
            self._problem(
                e.offset, f"{e.what}: the journal is replayed up to there (later records are lost)"
            )
        for i, tx in enumerate(txs):
            if self._apply_transaction(tx, file_size, last=i == len(txs) - 1):
                count += 1
        return count

    def _bad_record(self, what):
        """A journal record that no writer produces: refuse (check mode: drop its
        transaction)."""
        self._problem(self._header["journal_offset"], what)
        return False

    def _apply_transaction(self, tx, file_size, last=True):
        h = self._header
        data_offset, cs = h["data_offset"], self.chunk_size
        data_end = data_offset + fmt.MAX_PHYS_CHUNKS * cs
        for rtype, count, start, payload in tx:
            if rtype == REC_TABLE and start + count > self._nchunks:
                return self._bad_record(
                    f"journal table record for chunks {start}..{start + count} is out of range"
                )
            if rtype == REC_BITMAP and (
                self._bitmap is None or start + count > self._bitmap.nblocks
            ):
                return self._bad_record("journal bitmap record out of range")
            if rtype == REC_GRANULE and (
                self._partial is None
                or count == 0
                or start % self._partial.gpc + count > self._partial.gpc
                or start // self._partial.gpc >= self._nchunks
            ):
                return self._bad_record("journal granule record out of range")
            if rtype == REC_TABLE:
                for e in payload:
                    if fmt.MAX_PHYS_CHUNKS <= e < fmt.ZERO_CHUNK:
                        return self._bad_record(
                            f"journal table record holds the invalid entry {e:#x}"
                        )
                    if e < fmt.ZERO_CHUNK and data_offset + e * cs >= file_size:
                        return False  # its data never reached the disk: torn write
            if rtype == REC_DATA_CRC:
                if not (data_offset <= start and start + count <= data_end):
                    return self._bad_record(
                        f"journal data-crc record [{start}, "
                        f"{start + count}) is outside the data area"
                    )
                if last:
                    # Only the last transaction can be torn: each earlier one was followed
                    # by a flush before the next was appended, and its data may since have
                    # been overwritten legitimately.
                    if start + count > file_size or range_crc(self._fd, start, count) != payload:
                        return False
        for rtype, count, start, payload in tx:
            if rtype == REC_TABLE:
                self._table[start : start + count] = payload
                if self._partial is not None:
                    self._partial.forget(start, count)
            elif rtype == REC_BITMAP:
                self._bitmap.set_range(start, count)
            elif rtype == REC_GRANULE:
                self._partial.replay(self._table, start, count, payload)
        return True

    def _in_use(self):
        nphys = max(len(self._frozen), 1)
        used = front_usage(self._table, nphys) > 0
        if self._snapshots is not None:
            used = self._snapshots.mark_used(used)
        if self._partial is not None:
            used = self._partial.mark_used(used)
        return used

    def _start_writing(self, unclean):
        """Mark the image in use; after a crash, checkpoint and clean up orphan chunks."""
        if unclean:
            self._scrub_free_chunks()
            self._dirty_since_checkpoint = True
            self._checkpoint(clean=False)
        else:
            self._write_header(clean_shutdown=0)
            self._sync()

    def _scrub_free_chunks(self):
        """Chunks a crash left half-allocated: punch free ones, cut the file's tail."""
        free = sorted(self._alloc.free)
        for first, count in runs(free):
            self._punch_chunks(first, count)
        end = self._header["data_offset"] + self._alloc.end * self.chunk_size
        if os.fstat(self._fd).st_size > end:
            os.ftruncate(self._fd, end)

    # ----- metadata writes ------------------------------------------------------
    def _write_meta(self, offset, data):
        full_pwrite(self._fd, data, offset)
        self.stats.metadata_writes += 1
        self.stats.metadata_bytes_written += len(data)

    def _sync(self):
        os.fdatasync(self._fd)
        self.stats.flushes += 1

    def _write_header(self, **changes):
        h = self._header
        h.update(changes)
        # Partial chunks may exist (or appear without another header write): refuse older
        # readers. Snapshots alone make first writes into held chunks partial.
        if self._partial is not None and (
            self._partial.active
            or h["partial_map_offset"]
            or h["incompatible_features"] & fmt.INCOMPAT_SNAPSHOTS
        ):
            h["incompatible_features"] |= fmt.INCOMPAT_PARTIAL
        else:
            h["incompatible_features"] &= ~fmt.INCOMPAT_PARTIAL
        self._write_meta(0, fmt.build_header(self._header))

    def _punch_chunks(self, first, count):
        off = self._header["data_offset"] + first * self.chunk_size
        punch_hole(self._fd, off, count * self.chunk_size)

    def _checkpoint(self, clean):
        """Write the whole table (and bitmap), then a header with a new journal epoch."""
        try:
            self._checkpoint_steps(clean)
        except BaseException:
            self._journal_broken = True  # the header may name a newer epoch: redo it
            raise
        self._journal_broken = False
        self._alloc.commit_frees()

    def _checkpoint_steps(self, clean):
        h = self._header
        if (
            clean
            and self._dirty_since_checkpoint
            and self._partial is not None
            and (self._partial.active or h["partial_map_offset"])
        ):
            # the partial map moves and its old chunks are punched after the header: do
            # that under a header marked unclean, so a crash there opens with a scrub
            self._checkpoint(clean=False)
        self._sync()
        if self._dirty_since_checkpoint:
            table = self._table.astype(fmt.TABLE_DTYPE).tobytes()
            self._write_meta(h["table_offset"], table)
            h["table_crc"] = zlib.crc32(table)
            if self._bitmap is not None:
                h["bitmap_crc"] = self._bitmap.write(self)
            if self._partial is not None:
                self._partial.write_map(self)
            self._sync()
        self._write_header(journal_epoch=h["journal_epoch"] + 1, clean_shutdown=int(clean))
        self._sync()
        if self._partial is not None:
            self._partial.after_checkpoint(self)
        self._journal.restart(h["journal_epoch"])
        self._dirty_since_checkpoint = False

    def _commit_metadata(self, records, publish=None):
        """Make records durable after the data they describe (journal or checkpoint).

        `publish()` (if given) puts the records' changes into the in-memory table and
        bitmap; it runs before a checkpoint, which writes those. After a failed journal
        write the next commit is a checkpoint: a new epoch voids whatever part of the
        failed transaction reached the disk."""
        self._dirty_since_checkpoint = True
        appended = False
        if not self._journal_broken:
            try:
                appended = self._journal.append(records)
                if appended:
                    self._crc_guard = crc_guard(records, self._journal)
                    self._sync()
            except BaseException:
                self._journal_broken = True
                self._crc_guard = None
                raise
        if not appended:
            self._crc_guard = None
            if publish is not None:
                publish()
            self._checkpoint(clean=False)
            return
        self._alloc.commit_frees()

    def _apply(self, changes, extra=(), after=None):
        """Planned table changes (data already in their chunks): durable per the cache
        mode, then visible to readers (the table, then `after()`: bitmap bits)."""
        done = []

        def publish():
            if not done:
                self._publish(changes)
                if after is not None:
                    after()
                done.append(True)

        if self._writethrough:
            try:
                self._commit_metadata(table_records(changes) + list(extra), publish)
            except BaseException:
                if not done:
                    # maybe in a torn journal transaction: reusable after the next commit
                    for e in changes.values():
                        self._alloc.release(e)
                raise
        else:
            self._pending.update(changes)
            self._pending_bits.extend(extra)
        publish()

    def _publish(self, changes):
        t = self._table
        for v, e in changes.items():
            t[v] = e

    def _abandon(self, changes):
        """Undo the allocations of a failed write: nothing points at them yet."""
        self._abandon_chunks(list(changes.values()))

    def _abandon_chunks(self, indexes):
        if not indexes:
            return
        self._alloc.abandon(indexes)
        end = self._header["data_offset"] + self._alloc.end * self.chunk_size
        try:
            if os.fstat(self._fd).st_size > end and not self._alloc.retired:
                os.ftruncate(self._fd, end)
        except OSError:
            pass  # a leak at most

    def _io_error(self, err, what):
        return ImageIOError(self.path, err, what)

    def _log(self, changes, extra=()):
        """Record table changes (and extra records) per the cache mode."""
        if self._writethrough:
            self._commit_metadata(table_records(changes) + list(extra))
        else:
            self._pending.update(changes)
            self._pending_bits.extend(extra)

    # ----- I/O ------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise ValueError(f"{self.path}: I/O on a closed image")

    def _check_writable(self):
        self._check_open()
        if self.read_only:
            raise ReadOnlyImageError(self.path)

    def read(self, offset, length):
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset, buffer):
        """Fill `buffer` from `offset`; returns the number of bytes read."""
        if self._closed:
            self._check_open()
        base = self._base
        if base is None or base.fast_read:
            return self._map.readinto(offset, buffer)
        try:
            return base.readinto(offset, buffer)
        except OSError as e:
            raise io_error(self.path, e, "read") from None

    def write(self, offset, data):
        """Write any bytes-like object at any offset; returns the number of bytes."""
        if self.read_only or self._closed:
            self._check_writable()
        try:
            if self._crc_guard is not None:
                self._seal_overlapping(offset, memoryview(data).nbytes)
            n = self._map.write(offset, data)  # checks the base's stale bits itself
            if n < 0:
                n = self._write_slow(offset, memoryview(data).cast("B"))
            elif self._writethrough:
                self._sync()
        except OSError as e:
            raise io_error(self.path, e, "write") from None
        return n

    def _seal_overlapping(self, offset, length, plan=None):
        """Before data that the crc-checked last transaction covers changes, seal it: an
        empty transaction, flushed, so replay never checks a crc the data no longer has
        (that would drop an acknowledged transaction). Virtual range in, host ranges
        compared: a range remapped since then no longer touches the covered bytes."""
        with self._lock:
            g = self._crc_guard
            if g is None:
                return
            ranges, epoch, seq = g
            j = self._journal
            if (epoch, seq) != (j.epoch, j.next_seq):
                self._crc_guard = None  # no longer the last transaction
                return
            if any(
                a < hb and ha < b
                for a, b in self._host_ranges(offset, length, plan)
                for ha, hb in ranges
            ):
                self._commit_metadata([])  # clears the guard: no crc records

    def _host_ranges(self, offset, length, plan=None):
        """Host byte ranges of the allocated chunks under a virtual range (`plan`: chunk
        -> entry changes not yet in the table)."""
        cs, d = self.chunk_size, self._header["data_offset"]
        pos, end = max(offset, 0), min(offset + length, self.size)
        while pos < end:
            v = pos // cs
            stop = min(end, (v + 1) * cs)
            e = plan[v] if plan and v in plan else int(self._table[v])
            if e < fmt.ZERO_CHUNK:
                yield d + e * cs + pos % cs, d + e * cs + (stop - 1) % cs + 1
            pos = stop

    def _write_slow(self, offset, mv):
        """A write that needs chunks allocated, copied from a snapshot, or the base."""
        length = len(mv)
        if offset < 0 or offset + length > self.size:
            raise ValueError(
                f"I/O range [{offset}, {offset + length}) outside the image (size {self.size})"
            )
        if self._base is not None:
            return self._base.write(offset, mv)
        with self._lock:  # allocation and the journal are shared by all writers
            self._check_open()
            if self._partial is not None and self._partial.takes(self, offset, length):
                return self._partial.write(self, offset, mv)  # fvd.granular
            changes, extra = self._prepare_chunks(offset, length)
            try:
                self._write_planned(offset, mv, changes)
            except BaseException:
                self._abandon(changes)
                raise
            self._apply(changes, extra)
        return length

    def _prepare_chunks(self, offset, length, changes=None, extra=None):
        """Plan a writable physical chunk for every chunk under the range.

        Returns (table changes, extra journal records), added to the given ones. A chunk
        a snapshot holds is copied (its bytes outside the write) into a fresh chunk first.
        Nothing is published: the caller writes the data to the planned chunks, then
        `_apply`s the changes, so no reader sees a chunk before its data (or `_abandon`s
        them on failure). Chunks already in `changes` are taken as planned.
        """
        changes = {} if changes is None else changes
        extra = [] if extra is None else extra
        if length == 0:
            return changes, extra
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        mine = {}
        try:
            for v in range(first, last + 1):
                if v in changes:
                    continue
                e = int(self._table[v])
                if e < fmt.ZERO_CHUNK and not self._is_frozen(e):
                    continue
                new = self._alloc.allocate()
                mine[v] = new
                self._grow_frozen(new)
                if e < fmt.ZERO_CHUNK:
                    extra.extend(self._snapshots.copy_chunk(self, v, e, new, offset, length))
        except BaseException:
            self._abandon(mine)
            raise
        changes.update(mine)
        return changes, extra

    def _host_of(self, pos, plan):
        """Host offset of virtual `pos` in an allocated chunk, planned or in the table."""
        cs = self.chunk_size
        v = pos // cs
        e = plan.get(v)
        if e is None:
            e = int(self._table[v])
        return self._header["data_offset"] + e * cs + pos % cs

    def _write_planned(self, offset, mv, plan):
        """Write `mv` at virtual `offset` through the table with `plan` applied: one data
        write per physically contiguous run, as ChunkMap.write splits it."""
        cs, end, pos = self.chunk_size, offset + len(mv), offset
        while pos < end:
            host = self._host_of(pos, plan)
            stop = min(end, (pos // cs + 1) * cs)
            while stop < end and self._host_of(stop, plan) == host + (stop - pos):
                stop = min(end, stop + cs)
            self._map.pwritev(host, [mv[pos - offset : stop - offset]])
            pos = stop

    def _is_frozen(self, e):
        return e < len(self._frozen) and self._frozen[e]

    def _grow_frozen(self, index):
        """Keep the frozen array covering every physical chunk index."""
        if index >= len(self._frozen):
            grown = np.zeros(max(2 * len(self._frozen), index + 1, 1024), dtype=np.uint8)
            grown[: len(self._frozen)] = self._frozen
            self._frozen = grown
            self._map.set_frozen(grown)

    def write_zeroes(self, offset, length):
        """Make the range read as zeros; whole chunks are unmapped, not written."""
        self._check_writable()
        try:
            self._write_zeroes(offset, length)
        except OSError as e:
            raise io_error(self.path, e, "write_zeroes") from None

    def _write_zeroes(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"range [{offset}, {offset + length}) outside the image (size {self.size})"
            )
        cs = self.chunk_size
        end = offset + length
        head_end = min(end, -(-offset // cs) * cs)
        tail_start = max(head_end, end // cs * cs)
        for start, stop in ((offset, head_end), (tail_start, end)):
            if stop > start and self._chunk_has_content(start):
                self.write(start, bytes(stop - start))
        first, last = head_end // cs, tail_start // cs
        if last > first:
            with self._lock:
                self._check_open()
                self._unmap_chunks(first, last)

    def _chunk_has_content(self, offset):
        e = int(self._table[offset // self.chunk_size])
        return e < fmt.ZERO_CHUNK or self._base is not None and e == fmt.UNALLOCATED

    def _unmap_chunks(self, first, last):
        """Whole chunks [first, last) read as zeros from now on."""
        # With a base (even one no longer opened after prefetch) unmapped chunks become
        # ZERO: an UNALLOCATED chunk would fall through to the base.
        marker = fmt.ZERO_CHUNK if self._bitmap is not None else fmt.UNALLOCATED
        changes = {}
        for v in range(first, last):
            e = int(self._table[v])
            if e == marker:
                continue
            if e < fmt.ZERO_CHUNK and not self._is_frozen(e):
                self._alloc.release(e)
            if self._partial is not None:
                source = self._partial.drop(v)
                if source is not None and not self._is_frozen(source):
                    self._alloc.release(source)
            self._table[v] = marker
            changes[v] = marker
        if changes:
            extra = self._base.zero_bits(first, last) if self._base is not None else []
            self._log(changes, extra)

    def flush(self):
        """Everything written before is durable when this returns."""
        self._check_open()
        if self.read_only:
            return
        try:
            with self._lock:
                self._check_open()
                self._flush_locked()
        except OSError as e:
            raise io_error(self.path, e, "flush") from None

    def _flush_locked(self):
        if not (self._pending or self._pending_bits or self._journal_broken):
            self._sync()
            return
        pending, bits = self._pending, self._pending_bits
        records = table_records(pending) + list(bits)
        self._pending, self._pending_bits = {}, []
        try:
            self._sync()  # data before the records that point at it
            self._commit_metadata(records)
        except BaseException:
            self._pending, self._pending_bits = pending, bits  # the next flush retries
            raise

    # ----- lifecycle -------------------------------------------------------------
    def close(self):
        """Flush, checkpoint and release the file. Safe while other threads use the
        image: calls already inside finish first, later ones raise ValueError."""
        with self._lock:
            if self._closed:
                return
            try:
                if not self.read_only:
                    self._flush_locked()
                    if self._base is not None:
                        self._base.before_close()
                    self._checkpoint(clean=True)
            except OSError as e:
                raise io_error(self.path, e, "close") from None
            finally:
                self._closed = True
                self.__dict__.pop("readinto", None)
                self._drain()
                self._release()

    def _drain(self):
        """No new call enters the chunk map; wait for those inside (fd still open)."""
        m = self.__dict__.get("_map")
        if m is not None:
            m.closed = True
            drain_map(m)

    def _release(self):
        if self._base is not None:
            self._base.close()
        if self._fd >= 0:
            os.close(self._fd)  # also drops the flock
            self._fd = -1

    def _crash(self):
        """Tests only: drop the handle as a crash would, without flushing anything."""
        self._closed = True
        self.__dict__.pop("readinto", None)
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    def __repr__(self):
        state = "closed" if self._closed else ("r" if self.read_only else "r+")
        return f"<fvd.Image {self.path!r} size={self.size} {state}>"

    # ----- introspection ------------------------------------------------------------
    @property
    def base(self):
        return self._header.get("_base_path")

    @property
    def allocated_chunks(self):
        return int(np.count_nonzero(self._table < fmt.ZERO_CHUNK))

    def info(self):
        """Header facts and allocation, as `fvd info --output=json` shows them."""
        from .info import image_info

        return image_info(self)

    def check(self, repair=False):
        from .check import check_image

        with self._lock:  # a consistent table, and released chunks reclaimed first
            if not self._closed:
                self._alloc.quiesce(time.sleep)
            return check_image(self, repair)

    # Snapshot API (fvd.snapshots implements it)
    def create_snapshot(self, name, vm_state=b""):
        from .snapshots import create_snapshot

        try:
            return create_snapshot(self, name, vm_state)
        except OSError as e:
            raise io_error(self.path, e, "snapshot create") from None

    def snapshots(self):
        from .snapshots import list_snapshots

        return list_snapshots(self)

    def delete_snapshot(self, name):
        from .snapshots import delete_snapshot

        try:
            return delete_snapshot(self, name)
        except OSError as e:
            raise io_error(self.path, e, "snapshot delete") from None

    def revert_to_snapshot(self, name):
        from .snapshots import revert_to_snapshot

        try:
            return revert_to_snapshot(self, name)
        except OSError as e:
            raise io_error(self.path, e, "snapshot revert") from None

    def open_snapshot(self, name):
        from .snapshots import open_snapshot

        try:
            return open_snapshot(self, name)
        except OSError as e:
            raise io_error(self.path, e, "snapshot open") from None

    def read_vm_state(self, name):
        from .snapshots import read_vm_state

        try:
            return read_vm_state(self, name)
        except OSError as e:
            raise io_error(self.path, e, "read vm_state") from None

    def prefetch(self, progress=None, **options):
        from .base import prefetch

        try:
            return prefetch(self, progress, **options)
        except OSError as e:
            raise io_error(self.path, e, "prefetch") from None


def drain_map(m, sleep=time.sleep):
    """Wait until no call that entered chunk map `m` before now is still inside it."""
    target = m.epoch + 2
    while m.epoch < target:
        if not m.try_advance():
            sleep(0.0001)


def open(path, mode="r", *, cache="writeback", copy_on_read=False, force_share=False):
    """Open an FVD image; mode "r" or "r+".

    Locking follows QEMU: a writer excludes every other handle, readers share. With
    `force_share=True` a reader opens beside a writer and sees the image as of the
    writer's last flush (best effort, like `qemu-img -U`): chunks the writer frees and
    reuses after this open may show the writer's newer data.
    """
    return Image(path, mode, cache=cache, copy_on_read=copy_on_read, force_share=force_share)
