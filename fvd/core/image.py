"""The image core: open, the write path around the fast path, journal, checkpoint.

`ImageCore` knows the header, lookup table, journal, allocator, locking and stats; base
images, snapshots and partial chunks plug in through the feature slots and hooks of
`fvd.core.hooks` (set by `attach` at open). Features call only the public methods and
attributes below; `fvd.image.Image` is the facade users hold.

Order of metadata writes (docs/format.md, "Crash consistency"):
  guest data  ->  journal transaction  ->  flush              (writethrough, per write)
  guest data  ->  flush -> journal transactions -> flush      (writeback, at flush())
  checkpoint: flush -> table (+bitmap) -> flush -> header(epoch+1) -> flush
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import numpy.typing as npt

from fvd import _impl, fileio
from fvd.core import tableless, tablestore
from fvd.core.allocator import ChunkAllocator, front_usage
from fvd.core.bitmap import Bitmap
from fvd.core.hooks import Attach, BaseHook, Mask, PartialHook, SnapshotHook, Table
from fvd.core.journal import (
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
from fvd.errors import (
    CorruptImageError,
    ImageIOError,
    ImageLockedError,
    ReadOnlyImageError,
    io_error,
)
from fvd.fileio import (
    BackingPolicy,
    file_size,
    full_pwrite,
    is_block_device,
    lock_image,
    open_disk_file,
    punch_hole,
    truncate_tail,
    writer_active,
)
from fvd.ondisk import format as fmt
from fvd.ondisk import sparse_table
from fvd.units import index_runs

# (host ranges, journal epoch, next sequence) of the last transaction's DATA_CRC records
CrcGuard = tuple[list[tuple[int, int]], int, int]
Transaction = list[tuple[int, int, int, Any]]  # (type, count, start, payload) records


def crc_guard(records: list[bytes], journal: Journal) -> Optional[CrcGuard]:
    """(host ranges, epoch, next_seq) of the DATA_CRC records of the transaction just
    appended, or None: while it stays the journal's last, replay checks those crcs."""
    ranges = []
    for rec in records:
        rtype, count, start = RECORD_HEAD.unpack_from(rec)
        if rtype == REC_DATA_CRC:
            ranges.append((start, start + count))
    return (ranges, journal.epoch, journal.next_seq) if ranges else None


CACHE_MODES = ("writeback", "writethrough", "unsafe")


def _parse_cache(cache: str) -> bool:
    """writeback: durable at flush(); writethrough: every write durable before it returns;
    unsafe: never flushed (as qemu-img's -t unsafe; a crash may lose anything)."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
    return cache == "writethrough"


class ImageCore:
    """An open FVD image without its features: see the module docstring.

    `attach(core, chain, copy_on_read)` (given by the facade) installs the feature slots
    `base_layer`, `bitmap`, `snapshot_state` and `partial` while the image opens, after
    the lookup table is read and before the journal is replayed."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: str = "r",
        *,
        cache: str = "writeback",
        copy_on_read: bool = False,
        force_share: bool = False,
        for_check: bool = False,
        chain: tuple[str, ...] = (),
        attach: Optional[Attach] = None,
    ) -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        if force_share and mode != "r":
            raise ValueError("force_share is for read-only opens")
        self.path = os.fspath(path)
        self.read_only = mode == "r"
        self.writethrough = _parse_cache(cache)
        self.unsafe = cache == "unsafe"
        self._attach = attach
        self.for_check = for_check
        self._init_state()
        self.fd: int = open_disk_file(self.path, not self.read_only)  # never blocks (FIFO)
        self.on_device = is_block_device(self.fd)  # docs/format.md, "Block devices"
        try:
            if not force_share:
                lock_image(self.fd, self.path, exclusive=not self.read_only)
                self._load(chain, copy_on_read)
            else:
                self._load_beside_writer(chain, copy_on_read)
        except BaseException as e:
            self._release()
            if isinstance(e, OSError):
                raise io_error(self.path, e, "open") from None
            raise
        self.closed = False
        if self.base_layer is None or self.base_layer.fast_read:
            # Reads go straight to the fast path: no Python frame of ours per read (with
            # a raw base it reads the base runs itself; see fvd.features.base).
            self.readinto = self.chunk_map.readinto  # type: ignore[method-assign]

    def _init_state(self) -> None:
        """The attributes an open fills in, as they are before it (and after a failed one)."""
        self.closed = True
        self.impl = _impl.module()
        self.stats = self.impl.Stats()
        self.problems: list[tuple[Optional[int], str, int]] = []
        self.notes: list[str] = []  # check mode: what could not be checked, and why
        self.crc_guard: Any = None  # see crc_guard() and _seal_overlapping
        self.base_layer: Optional[BaseHook] = None
        self.snapshot_state: Optional[SnapshotHook] = None
        self.bitmap: Optional[Bitmap] = None  # of a base image (fvd.features.base)
        self.partial: Optional[PartialHook] = (
            None  # fvd.features.granular.PartialState (images without a base)
        )
        self.lock = threading.RLock()  # table/bitmap/journal changes (fvd.features.base)
        self._pending: dict[int, int] = {}  # virtual chunk -> entry, not yet in the journal
        self._pending_bits: list[Any] = []  # (first_block, count) bitmap records not yet journaled
        self.dirty_since_checkpoint = False
        self._journal_broken = False  # a journal write failed: commit by checkpoint next
        self.size = self.chunk_size = self.block_size = self.nchunks = 0
        self.tableless = False  # fvd.core.tableless: no lookup table, identity mapping
        self.header = fmt.ImageHeader()
        # run-time facts of a base image (fvd.features.base): where the header's base
        # name resolved to, and the policy that admitted it (snapshot views open it later)
        self.base_path: Optional[str] = None
        self.backing_policy: Optional[BackingPolicy] = None
        self.table: np.ndarray = np.zeros(0, dtype=np.uint32)

    # ----- open -----------------------------------------------------------------
    def _load_beside_writer(
        self, chain: tuple[str, ...], copy_on_read: bool, attempts: int = 5
    ) -> None:
        """force_share: a reader may race a writer's journal append or checkpoint: retry,
        and if the image still looks damaged while a writer holds it, say so clearly."""
        for attempt in range(attempts):
            try:
                return self._load(chain, copy_on_read)
            except CorruptImageError:
                if not writer_active(self.fd):
                    raise
                if self.base_layer is not None:
                    self.base_layer.close()
                    self.base_layer = None
                self.stats = self.impl.Stats()
                time.sleep(0.01 * (attempt + 1))
        raise ImageLockedError(
            f"{self.path}: image is being written by another handle and "
            f"no consistent view could be read; retry later"
        )

    def _load(self, chain: tuple[str, ...], copy_on_read: bool) -> None:
        file_size = self.file_size()
        self._read_header(file_size)
        self.relocate: set[int] = set()  # check mode: virtual chunks repair copies to a new chunk
        self.lost = 0  # check mode: chunks past the end of the file
        self.table = self._read_table(file_size)
        self._reserved = np.zeros(-(-self.nchunks // (sparse_table.RESERVE // 4)), dtype=bool)
        self.frozen = np.zeros(0, dtype=np.uint8)
        self._load_features(chain, copy_on_read)
        replayed = self._replay(file_size) if not self.header.clean_shutdown else 0
        self._validate_table(file_size)
        self._install_map()
        self.journal = Journal(
            self.fd,
            self.header.journal_offset,
            self.header.journal_size,
            self.header.journal_epoch,
            self.stats,
        )
        self.allocator = self._new_allocator(file_size)
        if not self.read_only:
            self._claim(replayed)

    def _read_header(self, file_size: int) -> None:
        """The header, validated, and the geometry it gives."""
        raw = os.pread(self.fd, fmt.HEADER_SIZE, 0)
        self.stats.metadata_reads += 1
        self.stats.metadata_bytes_read += len(raw)
        h = self.header = fmt.parse_header(raw, self.path, file_size)
        if not self.read_only and h.journal_epoch >= fmt.MAX_WRITABLE_EPOCH:
            raise CorruptImageError(
                self.path,
                fmt.FIELD_OFFSET["journal_epoch"],
                f"journal epoch {h.journal_epoch} is too large for a "
                f"read-write open (limit {fmt.MAX_WRITABLE_EPOCH - 1})",
            )
        self.size = h.virtual_size
        self.chunk_size = h.chunk_size
        self.block_size = h.block_size
        self.nchunks = -(-self.size // self.chunk_size)
        self.tableless = fmt.is_tableless(h)

    def _install_map(self) -> None:
        """The fast path's chunk map over the table, with the features' views on it."""
        self.chunk_map = self.impl.ChunkMap(
            self.fd,
            self.table,
            self.frozen,
            self.chunk_size,
            self.header.data_offset,
            self.size,
            self.stats,
        )
        self.chunk_map.error = self.io_error
        if self.base_layer is not None:
            self.base_layer.attach_map()
        if self.partial is not None:
            self.partial.install(self.chunk_map, lambda: self.allocator.quiesce(time.sleep))

    def _claim(self, replayed: int) -> None:
        """A read-write open marks the image in use (check mode: before repair looks)."""
        if self.header.image_uuid == fmt.NO_UUID:
            # an older image: the header written below keeps its new uuid
            self.header = self.header.replace(image_uuid=fmt.new_image_uuid())
        if self.for_check:
            # repair decides what to write; nothing is scrubbed before it looked
            self.write_header(clean_shutdown=0)
            self.sync()
            self.dirty_since_checkpoint = bool(replayed or not self.header.clean_shutdown)
        else:
            self._start_writing(bool(replayed or not self.header.clean_shutdown))

    def file_size(self) -> int:
        """The image file's size; a block device's size (its st_size is 0)."""
        return file_size(self.fd)

    def _new_allocator(self, size: int) -> ChunkAllocator:
        """On a block device the device's size bounds the data area, and chunks past the
        end are zeroed before use (the device holds old bytes there, not holes)."""
        if not self.on_device:
            return ChunkAllocator(self.in_use(), self.punch_chunks, self.chunk_map)
        return ChunkAllocator(
            self.in_use(),
            self.punch_chunks,
            self.chunk_map,
            limit=self.device_chunks(size),
            prepare=self._prepare_device_chunks,
            full=f"block device full ({size} bytes)",
        )

    def device_chunks(self, size: int) -> int:
        return max(0, (size - self.header.data_offset) // self.chunk_size)

    def refresh_device_size(self) -> None:
        """A grown block device (losetup -c, lvextend): more chunks may be allocated."""
        if self.on_device and not self.read_only:
            with self.lock:
                size = self.file_size()
                self.allocator.limit = max(self.allocator.end, self.device_chunks(size))
                self.allocator.full = f"block device full ({size} bytes)"

    def _prepare_device_chunks(self, first: int, count: int) -> None:
        """Zero chunks past the end durably before any journal record can name them:
        after a crash such a chunk reads zeros, never the device's old bytes."""
        self.punch_chunks(first, count)
        self.sync()

    def _load_features(self, chain: tuple[str, ...], copy_on_read: bool) -> None:
        """Base image, snapshots, partial chunks: the facade's `attach` installs them."""
        self.bitmap = None
        if self._attach is not None:
            self._attach(self, chain, copy_on_read)

    def read_meta(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        self.stats.metadata_reads += 1
        self.stats.metadata_bytes_read += len(data)
        if len(data) < length:
            raise CorruptImageError(
                self.path, offset + len(data), "file is truncated inside a metadata region"
            )
        return data

    def _read_table(self, file_size: int) -> Table:
        if self.tableless:
            return tableless.identity_table(self.nchunks)
        if sparse_table.is_sparse(self.header):
            table, crc = tablestore.load(
                self, self.header.table_offset, self.nchunks, bool(self.header.clean_shutdown)
            )
        else:
            raw = self.read_meta(self.header.table_offset, 4 * self.nchunks)
            table = np.frombuffer(raw, dtype=fmt.TABLE_DTYPE).astype(np.uint32)
            crc = zlib.crc32(raw) if self.header.clean_shutdown else 0
        if self.header.clean_shutdown and crc != self.header.table_crc:
            self.problem(self.header.table_offset, "lookup table checksum mismatch")
        return table

    def problem(self, offset: Optional[int], what: str, count: int = 1) -> None:
        """A corruption: raise, unless check() is collecting them (`count` problems that
        one message stands for)."""
        if not self.for_check:
            raise CorruptImageError(self.path, offset, what)
        self.problems.append((offset, what, count))

    def _validate_table(self, file_size: int) -> None:
        """Every entry must point inside the file, no two chunks may share one, and none
        may point into snapshot metadata. In check mode every problem is counted; entries
        past the end read as zeros from then on, shared ones are copied by repair."""
        if self.tableless:
            return  # the identity, built at open
        t = self.table
        toff = self.header.table_offset
        data_offset = self.header.data_offset
        max_valid = max(0, -(-(file_size - data_offset) // self.chunk_size))
        # one pass over the table; the rest works on the allocated entries only (few in
        # a sparse 16 TiB image)
        idx = np.flatnonzero(t < fmt.ZERO_CHUNK)
        bad = idx[t[idx] >= max_valid]
        self._problem_list(
            bad,
            lambda v: (
                toff + 4 * v,
                f"table entry {int(t[v])} of chunk {v} points past the end of the file",
            ),
            "more table entries point past the end of the file (data lost)",
        )
        if len(bad):  # only reached in check mode: those chunks read as zeros now
            t[bad] = fmt.ZERO_CHUNK if self.bitmap is not None else fmt.UNALLOCATED
            self.lost = len(bad)
            idx = idx[t[idx] < fmt.ZERO_CHUNK]
        counts = np.bincount(t[idx]) if len(idx) else np.zeros(0, dtype=np.int64)
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
            self.relocate.update(dup.tolist())
        if self.snapshot_state is not None:
            meta = self.snapshot_state.meta_mask(max_valid)
            hit = idx[t[idx] < len(meta)]
            hit = hit[meta[t[hit]]]
            self._problem_list(
                hit,
                lambda v: (
                    toff + 4 * v,
                    f"table entry {int(t[v])} of chunk {v} points into snapshot metadata",
                ),
                "more table entries point into snapshot metadata",
            )
            self.relocate.update(hit.tolist())
        if self.partial is not None:
            self.partial.validate(self)

    def _problem_list(
        self,
        where: npt.NDArray[np.intp],
        describe: Callable[[int], tuple[int, str]],
        rest: str,
        shown: int = 10,
    ) -> None:
        """One problem per index (the first `shown` spelled out), all counted."""
        for v in where[:shown].tolist():
            self.problem(*describe(v))
        if len(where) > shown:
            off, _ = describe(int(where[shown]))
            self.problem(off, f"{len(where) - shown} {rest}", len(where) - shown)

    def _replay(self, file_size: int) -> int:
        """Apply the journal's committed transactions to the in-memory table and bitmap."""
        count = 0
        txs = []
        try:
            for tx in read_transactions(
                self.fd,
                self.path,
                self.header.journal_offset,
                self.header.journal_size,
                self.header.journal_epoch,
            ):
                txs.append(tx)
        except CorruptImageError as e:
            if not self.for_check:
                raise
            self.problem(
                e.offset, f"{e.what}: the journal is replayed up to there (later records are lost)"
            )
        for i, tx in enumerate(txs):
            if self._apply_transaction(tx, file_size, last=i == len(txs) - 1):
                count += 1
        return count

    def _bad_record(self, what: str) -> bool:
        """A journal record that no writer produces: refuse (check mode: drop its
        transaction)."""
        self.problem(self.header.journal_offset, what)
        return False

    def _apply_transaction(self, tx: Transaction, file_size: int, last: bool = True) -> bool:
        h = self.header
        data_offset, cs = h.data_offset, self.chunk_size
        data_end = data_offset + fmt.MAX_PHYS_CHUNKS * cs
        if self.tableless:
            data_end = tableless.data_end(h)
        for rtype, count, start, payload in tx:
            if rtype in (REC_TABLE, REC_GRANULE) and self.tableless:
                return self._bad_record("journal table record in a table-less image")
            if rtype == REC_TABLE and start + count > self.nchunks:
                return self._bad_record(
                    f"journal table record for chunks {start}..{start + count} is out of range"
                )
            if rtype == REC_BITMAP and (self.bitmap is None or start + count > self.bitmap.nblocks):
                return self._bad_record("journal bitmap record out of range")
            if rtype == REC_GRANULE and (
                self.partial is None
                or count == 0
                or start % self.partial.gpc + count > self.partial.gpc
                or start // self.partial.gpc >= self.nchunks
            ):
                return self._bad_record("journal granule record out of range")
            if rtype == REC_TABLE:
                for e in payload:
                    if fmt.MAX_PHYS_CHUNKS <= e < fmt.ZERO_CHUNK:
                        return self._bad_record(
                            f"journal table record holds the invalid entry {e:#x}"
                        )
                    if e < fmt.ZERO_CHUNK and last and data_offset + e * cs >= file_size:
                        # its data never reached the disk: torn write. Only the last
                        # transaction can be torn; an earlier one's chunk past the end
                        # was freed later and the file cut back (a later record remaps
                        # it), and dropping that transaction would lose its other records
                        return False
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
                    if start + count > file_size or range_crc(self.fd, start, count) != payload:
                        return False
        for rtype, count, start, payload in tx:
            if rtype == REC_TABLE:
                self.table[start : start + count] = payload
                if self.partial is not None:
                    self.partial.forget(start, count)
            elif rtype == REC_BITMAP and self.bitmap is not None:  # checked above
                self.bitmap.set_range(start, count)
            elif rtype == REC_GRANULE and self.partial is not None:  # checked above
                self.partial.replay(self.table, start, count, payload)
        return True

    def in_use(self) -> Mask:
        if self.tableless:  # every chunk is its own: all in use, nothing to allocate
            return np.ones(self.nchunks, dtype=bool)
        nphys = max(len(self.frozen), 1)
        used = front_usage(self.table, nphys) > 0
        if self.snapshot_state is not None:
            used = self.snapshot_state.mark_used(used)
        if self.partial is not None:
            used = self.partial.mark_used(used)
        return used

    def _start_writing(self, unclean: bool) -> None:
        """Mark the image in use; after a crash, checkpoint and clean up orphan chunks."""
        if unclean:
            self._scrub_free_chunks()
            self.dirty_since_checkpoint = True
            self.checkpoint(clean=False)
        else:
            self.write_header(clean_shutdown=0)
            self.sync()

    def _scrub_free_chunks(self) -> None:
        """Chunks a crash left half-allocated: punch free ones, cut the file's tail."""
        free = sorted(self.allocator.free)
        for first, count in index_runs(free):
            self.punch_chunks(first, count)
        truncate_tail(self.fd, self.header.data_offset + self.allocator.end * self.chunk_size)

    # ----- metadata writes ------------------------------------------------------
    def write_meta(self, offset: int, data: bytes) -> None:
        full_pwrite(self.fd, data, offset)
        self.stats.metadata_writes += 1
        self.stats.metadata_bytes_written += len(data)

    def sync(self) -> None:
        if self.unsafe:
            return
        os.fdatasync(self.fd)
        self.stats.flushes += 1

    def write_header(self, **changes: int | bytes) -> None:
        """The header with `changes` (and the feature bits they imply), written."""
        h = self.header.replace(**changes)
        self.header = h.replace(incompatible_features=self._feature_bits(h))
        self.write_meta(0, fmt.build_header(self.header))

    def _feature_bits(self, h: fmt.ImageHeader) -> int:
        bits = h.incompatible_features
        # Partial chunks may exist (or appear without another header write): refuse older
        # readers. Snapshots alone make first writes into held chunks partial.
        if self.partial is not None and (
            self.partial.active or h.partial_map_offset or bits & fmt.INCOMPAT_SNAPSHOTS
        ):
            bits |= fmt.INCOMPAT_PARTIAL
        else:
            bits &= ~fmt.INCOMPAT_PARTIAL
        # provenance: in the partial map, or in granule records (bit 3 with them; the
        # snapshot commits keep bit 4 while records may have it)
        if self.partial is not None and self.partial.map_provenance:
            bits |= fmt.INCOMPAT_PROVENANCE
        elif not bits & fmt.INCOMPAT_SNAPSHOT_PARTIAL:
            bits &= ~fmt.INCOMPAT_PROVENANCE
        return bits

    def punch_range(self, offset: int, length: int) -> None:
        """Guest range [offset, offset+length) of a table-less image reads as zeros."""
        punch_hole(self.fd, self.header.data_offset + offset, length)

    def reserve_table(self, first: int, stop: int) -> None:
        """Entries [first, stop) of a sparse table are about to be set: give their
        table pages file blocks now, so that a full file system fails this write, never
        a later checkpoint (or the next open's)."""
        if not sparse_table.is_sparse(self.header) or self.on_device:
            return
        page = sparse_table.RESERVE // 4
        todo = np.flatnonzero(~self._reserved[first // page : (stop - 1) // page + 1])
        for i in (todo + first // page).tolist():
            fileio.reserve(self.fd, self.header.table_offset + i * page * 4, page * 4)
            self._reserved[i] = True

    def punch_chunks(self, first: int, count: int) -> None:
        off = self.header.data_offset + first * self.chunk_size
        punch_hole(self.fd, off, count * self.chunk_size)

    def checkpoint(self, clean: bool) -> None:
        """Write the whole table (and bitmap), then a header with a new journal epoch."""
        try:
            self._checkpoint_steps(clean)
        except BaseException:
            self._journal_broken = True  # the header may name a newer epoch: redo it
            raise
        self._journal_broken = False
        self.allocator.commit_frees()

    def _checkpoint_steps(self, clean: bool) -> None:
        h = self.header
        if (
            clean
            and self.dirty_since_checkpoint
            and self.partial is not None
            and (self.partial.active or h.partial_map_offset)
        ):
            # the partial map moves and its old chunks are punched after the header: do
            # that under a header marked unclean, so a crash there opens with a scrub
            self.checkpoint(clean=False)
        self.sync()
        if self.dirty_since_checkpoint:
            if self.tableless:
                pass  # no table: nothing to write
            elif sparse_table.is_sparse(self.header):
                self.header = self.header.replace(
                    table_crc=tablestore.store(self, self.header.table_offset, self.table)
                )
            else:
                table = self.table.astype(fmt.TABLE_DTYPE).tobytes()
                self.write_meta(self.header.table_offset, table)
                self.header = self.header.replace(table_crc=zlib.crc32(table))
            if self.bitmap is not None:
                self.header = self.header.replace(bitmap_crc=self.bitmap.write(self))
            if self.partial is not None:
                self.partial.write_map(self)
            self.sync()
        self.write_header(journal_epoch=self.header.journal_epoch + 1, clean_shutdown=int(clean))
        self.sync()
        if self.partial is not None:
            self.partial.after_checkpoint(self)
        self.journal.restart(self.header.journal_epoch)
        self.dirty_since_checkpoint = False

    def commit_metadata(
        self, records: list[bytes], publish: Optional[Callable[[], None]] = None
    ) -> None:
        """Make records durable after the data they describe (journal or checkpoint).

        `publish()` (if given) puts the records' changes into the in-memory table and
        bitmap; it runs before a checkpoint, which writes those. After a failed journal
        write the next commit is a checkpoint: a new epoch voids whatever part of the
        failed transaction reached the disk."""
        self.dirty_since_checkpoint = True
        appended = False
        if not self._journal_broken:
            try:
                appended = self.journal.append(records)
                if appended:
                    self.crc_guard = crc_guard(records, self.journal)
                    self.sync()
            except BaseException:
                self._journal_broken = True
                self.crc_guard = None
                raise
        if not appended:
            self.crc_guard = None
            if publish is not None:
                publish()
            self.checkpoint(clean=False)
            return
        self.allocator.commit_frees()

    def apply(
        self,
        changes: dict[int, int],
        extra: Iterable[bytes] = (),
        after: Optional[Callable[[], None]] = None,
    ) -> None:
        """Planned table changes (data already in their chunks): durable per the cache
        mode, then visible to readers (the table, then `after()`: bitmap bits)."""
        done: list[bool] = []

        def publish() -> None:
            if not done:
                self._publish(changes)
                if after is not None:
                    after()
                done.append(True)

        if self.tableless and not changes and not extra:
            publish()  # nothing to record (copy-on-read: soft bits)
            return
        if self.writethrough:
            try:
                self.commit_metadata(table_records(changes) + list(extra), publish)
            except BaseException:
                if not done:
                    # maybe in a torn journal transaction: reusable after the next commit
                    for e in changes.values():
                        self.allocator.release(e)
                raise
        else:
            self._pending.update(changes)
            self._pending_bits.extend(extra)
        publish()

    def _publish(self, changes: dict[int, int]) -> None:
        t = self.table
        for v, e in changes.items():
            t[v] = e

    def abandon(self, changes: dict[int, int]) -> None:
        """Undo the allocations of a failed write: nothing points at them yet."""
        self.abandon_chunks(list(changes.values()))

    def abandon_chunks(self, indexes: list[int]) -> None:
        if not indexes:
            return
        self.allocator.abandon(indexes)
        end = self.header.data_offset + self.allocator.end * self.chunk_size
        try:
            if not self.allocator.retired:
                truncate_tail(self.fd, end)
        except OSError:
            pass  # a leak at most

    def io_error(self, err: int, what: str) -> ImageIOError:
        return ImageIOError(self.path, err, what)

    def _log(self, changes: dict[int, int], extra: Iterable[bytes] = ()) -> None:
        """Record table changes (and extra records) per the cache mode."""
        if self.writethrough:
            self.commit_metadata(table_records(changes) + list(extra))
        else:
            self._pending.update(changes)
            self._pending_bits.extend(extra)

    # ----- I/O ------------------------------------------------------------------
    def check_open(self) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: I/O on a closed image")

    def check_writable(self) -> None:
        self.check_open()
        if self.read_only:
            raise ReadOnlyImageError(self.path)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buffer: Any) -> int:
        """Fill `buffer` from `offset`; returns the number of bytes read."""
        if self.closed:
            self.check_open()
        base = self.base_layer
        if base is None or base.fast_read:
            return int(self.chunk_map.readinto(offset, buffer))
        try:
            return base.readinto(offset, buffer)
        except OSError as e:
            raise io_error(self.path, e, "read") from None

    def write(self, offset: int, data: Any) -> int:
        """Write any bytes-like object at any offset; returns the number of bytes."""
        if self.read_only or self.closed:
            self.check_writable()
        try:
            if self.crc_guard is not None:
                self.seal_overlapping(offset, memoryview(data).nbytes)
            n: int = self.chunk_map.write(offset, data)  # checks the base's stale bits itself
            if n < 0:
                n = self._write_slow(offset, memoryview(data).cast("B"))
            elif self.writethrough:
                self.sync()
        except OSError as e:
            raise io_error(self.path, e, "write") from None
        return n

    def seal_overlapping(
        self, offset: int, length: int, plan: Optional[dict[int, int]] = None
    ) -> None:
        """Before data that the crc-checked last transaction covers changes, seal it: an
        empty transaction, flushed, so replay never checks a crc the data no longer has
        (that would drop an acknowledged transaction). Virtual range in, host ranges
        compared: a range remapped since then no longer touches the covered bytes."""
        with self.lock:
            g = self.crc_guard
            if g is None:
                return
            ranges, epoch, seq = g
            j = self.journal
            if (epoch, seq) != (j.epoch, j.next_seq):
                self.crc_guard = None  # no longer the last transaction
                return
            if any(
                a < hb and ha < b
                for a, b in self._host_ranges(offset, length, plan)
                for ha, hb in ranges
            ):
                self.commit_metadata([])  # clears the guard: no crc records

    def _host_ranges(
        self, offset: int, length: int, plan: Optional[dict[int, int]] = None
    ) -> Iterator[tuple[int, int]]:
        """Host byte ranges of the allocated chunks under a virtual range (`plan`: chunk
        -> entry changes not yet in the table)."""
        cs, d = self.chunk_size, self.header.data_offset
        pos, end = max(offset, 0), min(offset + length, self.size)
        while pos < end:
            v = pos // cs
            stop = min(end, (v + 1) * cs)
            e = plan[v] if plan and v in plan else int(self.table[v])
            if e < fmt.ZERO_CHUNK:
                yield d + e * cs + pos % cs, d + e * cs + (stop - 1) % cs + 1
            pos = stop

    def _write_slow(self, offset: int, mv: memoryview) -> int:
        """A write that needs chunks allocated, copied from a snapshot, or the base."""
        length = len(mv)
        if offset < 0 or offset + length > self.size:
            raise ValueError(
                f"I/O range [{offset}, {offset + length}) outside the image (size {self.size})"
            )
        if self.base_layer is not None:
            return self.base_layer.write(offset, mv)
        with self.lock:  # allocation and the journal are shared by all writers
            self.check_open()
            if self.partial is not None and self.partial.takes(self, offset, length):
                return self.partial.write(self, offset, mv)  # fvd.features.granular
            changes, extra = self.prepare_chunks(offset, length)
            try:
                self.write_planned(offset, mv, changes)
            except BaseException:
                self.abandon(changes)
                raise
            self.apply(changes, extra)
        return length

    def prepare_chunks(
        self,
        offset: int,
        length: int,
        changes: Optional[dict[int, int]] = None,
        extra: Optional[list[bytes]] = None,
    ) -> tuple[dict[int, int], list[bytes]]:
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
                e = int(self.table[v])
                if e < fmt.ZERO_CHUNK and not self.is_frozen(e):
                    continue
                self.reserve_table(v, v + 1)
                new = self.allocator.allocate()
                mine[v] = new
                self.grow_frozen(new)
                if e < fmt.ZERO_CHUNK and self.snapshot_state is not None:  # frozen: held
                    extra.extend(self.snapshot_state.copy_chunk(self, v, e, new, offset, length))
        except BaseException:
            self.abandon(mine)
            raise
        changes.update(mine)
        return changes, extra

    def host_of(self, pos: int, plan: dict[int, int]) -> int:
        """Host offset of virtual `pos` in an allocated chunk, planned or in the table."""
        cs = self.chunk_size
        v = pos // cs
        e = plan.get(v)
        if e is None:
            e = int(self.table[v])
        return self.header.data_offset + e * cs + pos % cs

    def write_planned(self, offset: int, mv: memoryview, plan: dict[int, int]) -> None:
        """Write `mv` at virtual `offset` through the table with `plan` applied: one data
        write per physically contiguous run, as ChunkMap.write splits it."""
        cs, end, pos = self.chunk_size, offset + len(mv), offset
        while pos < end:
            host = self.host_of(pos, plan)
            stop = min(end, (pos // cs + 1) * cs)
            while stop < end and self.host_of(stop, plan) == host + (stop - pos):
                stop = min(end, stop + cs)
            self.chunk_map.pwritev(host, [mv[pos - offset : stop - offset]])
            pos = stop

    def is_frozen(self, e: int) -> bool:
        return e < len(self.frozen) and self.frozen[e]

    def grow_frozen(self, index: int) -> None:
        """Keep the frozen array covering every physical chunk index."""
        if index >= len(self.frozen):
            grown = np.zeros(max(2 * len(self.frozen), index + 1, 1024), dtype=np.uint8)
            grown[: len(self.frozen)] = self.frozen
            self.frozen = grown
            self.chunk_map.set_frozen(grown)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros; whole chunks are unmapped, not written."""
        self.check_writable()
        try:
            if self.tableless:
                tableless.write_zeroes(self, offset, length)
                return
            self._write_zeroes(offset, length)
        except OSError as e:
            raise io_error(self.path, e, "write_zeroes") from None

    def _write_zeroes(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"range [{offset}, {offset + length}) outside the image (size {self.size})"
            )
        cs = self.chunk_size
        end = offset + length
        head_end = min(end, -(-offset // cs) * cs)
        tail_start = max(head_end, end // cs * cs)
        for start, stop in ((offset, head_end), (tail_start, end)):
            if stop > start and self.chunk_has_content(start):
                self.write(start, bytes(stop - start))
        first, last = head_end // cs, tail_start // cs
        if last > first:
            with self.lock:
                self.check_open()
                self.unmap_chunks(first, last)

    def chunk_has_content(self, offset: int) -> bool:
        e = int(self.table[offset // self.chunk_size])
        return e < fmt.ZERO_CHUNK or self.base_layer is not None and e == fmt.UNALLOCATED

    def unmap_chunks(self, first: int, last: int) -> None:
        """Whole chunks [first, last) read as zeros from now on."""
        # With a base (even one no longer opened after prefetch) unmapped chunks become
        # ZERO: an UNALLOCATED chunk would fall through to the base.
        marker = fmt.ZERO_CHUNK if self.bitmap is not None else fmt.UNALLOCATED
        if marker != fmt.UNALLOCATED:
            self.reserve_table(first, last)
        changes = {}
        for v in range(first, last):
            e = int(self.table[v])
            if e == marker:
                continue
            if e < fmt.ZERO_CHUNK and not self.is_frozen(e):
                self.allocator.release(e)
            if self.partial is not None:
                source = self.partial.drop(v)
                if source is not None and not self.is_frozen(source):
                    self.allocator.release(source)
            self.table[v] = marker
            changes[v] = marker
        if changes:
            extra = self.base_layer.zero_bits(first, last) if self.base_layer is not None else []
            self._log(changes, extra)

    @property
    def metadata_pending(self) -> bool:
        """Table or bitmap records not yet journaled (writeback), or a journal to redo."""
        return bool(self._pending or self._pending_bits or self._journal_broken)

    def flush(self) -> None:
        """Everything written before is durable when this returns."""
        self.check_open()
        if self.read_only:
            return
        try:
            with self.lock:
                self.check_open()
                self._flush_locked()
        except OSError as e:
            raise io_error(self.path, e, "flush") from None

    def _flush_locked(self) -> None:
        if not (self._pending or self._pending_bits or self._journal_broken):
            self.sync()
            return
        pending, bits = self._pending, self._pending_bits
        records = table_records(pending) + list(bits)
        self._pending, self._pending_bits = {}, []
        try:
            self.sync()  # data before the records that point at it
            self.commit_metadata(records)
        except BaseException:
            self._pending, self._pending_bits = pending, bits  # the next flush retries
            raise

    # ----- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        """Flush, checkpoint and release the file. Safe while other threads use the
        image: calls already inside finish first, later ones raise ValueError."""
        with self.lock:
            if self.closed:
                return
            try:
                if not self.read_only:
                    self._flush_locked()
                    if self.base_layer is not None:
                        self.base_layer.before_close()
                    self.checkpoint(clean=True)
            except OSError as e:
                raise io_error(self.path, e, "close") from None
            finally:
                self.closed = True
                self.__dict__.pop("readinto", None)
                self._drain()
                self._release()

    def _drain(self) -> None:
        """No new call enters the chunk map; wait for those inside (fd still open)."""
        m = self.__dict__.get("chunk_map")
        if m is not None:
            m.closed = True
            drain_map(m)

    def _release(self) -> None:
        if self.base_layer is not None:
            self.base_layer.close()
        if self.fd >= 0:
            os.close(self.fd)  # also drops the flock
            self.fd = -1

    def crash(self) -> None:
        """Tests only: drop the handle as a crash would, without flushing anything."""
        self.closed = True
        self.__dict__.pop("readinto", None)
        self._release()

    def __enter__(self) -> ImageCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self.closed:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("r" if self.read_only else "r+")
        return f"<fvd.Image {self.path!r} size={self.size} {state}>"


def drain_map(m: Any, sleep: Callable[[float], object] = time.sleep) -> None:
    """Wait until no call that entered chunk map `m` before now is still inside it."""
    target = m.epoch + 2
    while m.epoch < target:
        if not m.try_advance():
            sleep(0.0001)
