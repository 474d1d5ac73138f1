"""QCOW2 baseline: a refcount-on-write image writing real qcow2 v3 files.

This is the comparison peer for FVD. It follows the write ordering of QEMU's qcow2
driver (notes §2): an allocating write puts the guest data out, makes the refcount
increment stable before the L2 entry that uses it, and frees replaced clusters only
once the L2 change is stable. Metadata is written in whole cache entries (a cluster for
L2 tables and refcount blocks). `cache="writethrough"` flushes after every write
(QEMU's BlockBackend behaviour); `cache="writeback"` defers metadata to `flush()`.

    img = fvd.qcow2.create("x.qcow2", 1 << 30)
    with fvd.qcow2.open("x.qcow2", "r+", cache="writethrough") as img:
        img.write(0, b"hello")

Split by concern like QEMU's block/qcow2-*.c: qcow2_format (header, snapshot table),
qcow2_refcount (refcounts, allocation, check/rebuild), qcow2_cluster (mapping, I/O),
qcow2_snapshot (internal snapshots).
"""

from __future__ import annotations

import errno
import fcntl
import os as _os
import struct
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import numpy as np

from fvd import _impl, registry
from fvd.errors import BaseImageError, ChainError, CorruptImageError, UnsupportedFeatureError
from fvd.fileio import (
    AnyPolicy,
    BackingPolicy,
    RawFile,
    detect_format,
    open_backing,
    open_disk_file,
    pread_fill,
    resolve_relative,
)
from fvd.qcow2.chainmap import chain_extents
from fvd.qcow2.cluster import ClusterMixin
from fvd.qcow2.format import (
    COMPAT_LAZY_REFCOUNTS,
    EXT_BITMAPS,
    HEADER_OFFSET,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1_DTYPE,
    L1E_RESERVED_MASK,
    MAGIC,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    NEW_L1_CLUSTER,
    NEW_REFBLOCK_CLUSTER,
    OFF_CLUSTER_BITS,
    OFF_INCOMPAT,
    OFF_L1_SIZE,
    OFFSET_MASK,
    REFT_OFFSET_MASK,
    REFTABLE_DTYPE,
    S_CLUSTER_BITS,
    S_INCOMPAT_UPDATE,
    S_L1_UPDATE,
    S_REFBLOCK_ENTRY,
    S_REFTABLE_ENTRY,
    Header,
    build_header,
    new_header,
    parse_header,
)
from fvd.qcow2.refcount import RefcountMixin
from fvd.qcow2.snapshot import SnapshotMixin
from fvd.qcow2.state import Backing, Chunk, Table
from fvd.types import CheckResult, Closing, Extent, StrPath, extents_to_array

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["create", "open", "Qcow2Image", "set_backing"]

S_SIZE = struct.Struct(">Q")  # the header's size field


def create(
    path: StrPath,
    size: int,
    *,
    cluster_size: int = 65536,
    lazy_refcounts: bool = False,
    overwrite: bool = False,
    backing_file: Optional[StrPath] = None,
    backing_format: Optional[str] = None,
    backing: AnyPolicy = "any",
) -> None:
    """Create an empty qcow2 v3 image (16-bit refcounts).

    Layout as `qemu-img create`: header, refcount table, one refcount block, L1 table.
    Refuses to replace an existing file unless overwrite=True (FileExistsError).
    `backing_file` (stored as given; a relative name is relative to the image's
    directory) and `backing_format` ("qcow2", "raw" or "fvd"; probed when None) make an
    overlay whose unallocated clusters read from the backing file (opened, with its
    chain, as the backing policy `backing` allows: "any", "same-dir" or "none")."""
    check_create_sizes(size, cluster_size)
    cs, cbits = cluster_size, cluster_size.bit_length() - 1
    policy = BackingPolicy.of(backing, path)
    backing_file, backing_format = new_backing(path, backing_file, backing_format, policy)
    h = new_header(
        cbits,
        size,
        backing_file=backing_file,
        backing_format=backing_format,
        lazy_refcounts=lazy_refcounts,
    )
    flags = _os.O_RDWR | _os.O_CREAT | (_os.O_TRUNC if overwrite else _os.O_EXCL)
    fd = _os.open(path, flags, 0o644)
    try:
        used = NEW_L1_CLUSTER  # clusters 0, 1, 2: header, refcount table, refcount block
        image = bytearray(used * cs)
        hdr = build_header(h)
        image[: len(hdr)] = hdr
        rb = NEW_REFBLOCK_CLUSTER * cs
        S_REFTABLE_ENTRY.pack_into(image, h.refcount_table_offset, rb)  # reftable[0] -> block
        one = S_REFBLOCK_ENTRY.pack(1)
        image[rb : rb + used * len(one)] = one * used
        _os.pwrite(fd, bytes(image), 0)
        _os.fdatasync(fd)
    finally:
        _os.close(fd)
    img = Qcow2Image(path, "r+", "writeback", _creating=True, backing=policy)
    try:
        img._resize_l1(-(-size // (cs * (cs // 8))))
    finally:
        img.close()


def check_create_sizes(size: int, cluster_size: int) -> None:
    """ValueError for a size or cluster size qcow2 cannot hold."""
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative integer, not {size!r}")
    if size % 512:
        raise ValueError(f"size {size} is not a multiple of 512")
    if (
        not isinstance(cluster_size, int)
        or cluster_size & (cluster_size - 1)
        or not (1 << MIN_CLUSTER_BITS) <= cluster_size <= (1 << MAX_CLUSTER_BITS)
    ):
        raise ValueError(f"cluster_size must be a power of two in 512..2M, not {cluster_size}")


def new_backing(
    path: StrPath,
    backing_file: Optional[StrPath],
    backing_format: Optional[str],
    policy: BackingPolicy,
) -> tuple[str, str]:
    """(name, format) to store for a new overlay; the backing file must exist."""
    if backing_file is None:
        if backing_format is not None:
            raise ValueError("backing_format given without backing_file")
        return "", ""

    name = _os.fspath(backing_file)
    resolved = resolve_relative(path, name)
    policy.admit(_os.fspath(path), resolved)
    if not _os.path.exists(resolved):
        raise BaseImageError(f"{resolved}: backing file does not exist")
    if backing_format is None:
        backing_format = detect_format(resolved)
    if backing_format not in BACKING_FORMATS:
        raise ValueError(f"backing_format must be one of {BACKING_FORMATS}, not {backing_format!r}")
    return name, backing_format


BACKING_FORMATS = ("qcow2", "raw", "fvd")


def _open_backing(
    img: Qcow2Image, name: str, fmt: str, chain: tuple[str, ...], policy: BackingPolicy
) -> Backing:
    """The backing file of `img`, opened read-only (its own chain included) by the
    opener fvd's base images use too (fvd.fileio.open_backing)."""
    backing: Backing = open_backing(
        img.path, resolve_relative(img.path, name), fmt or None, chain, policy
    )
    return backing


def set_backing(path: StrPath, backing_file: str, backing_format: str) -> None:
    """Point a closed qcow2 image at another backing file (qemu-img rebase's header
    update): the header, backing-format extension and name are rewritten in one write
    (atomic when they fit in one 512-byte sector, as with names up to ~350 bytes), then
    synced. Other header extensions (fvd's backup record, the feature table) are kept
    byte for byte, as QEMU keeps extensions it does not interpret."""
    if backing_format not in BACKING_FORMATS:
        raise ValueError(f"backing_format must be one of {BACKING_FORMATS}, not {backing_format!r}")
    fd = _os.open(path, _os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ChainError(f"{path}: image is in use elsewhere") from None
        size = _os.fstat(fd).st_size
        h = parse_header(_os.fspath(path), _os.pread(fd, 1 << MAX_CLUSTER_BITS, 0), size)
        if h.version != 3:
            raise UnsupportedFeatureError(f"{path}: qcow2 version {h.version}: rebase needs v3")
        h.backing_file, h.backing_format = backing_file, backing_format
        raw = build_header(h)
        _os.pwrite(fd, raw + bytes(-len(raw) % 512), 0)
        _os.fdatasync(fd)
    finally:
        _os.close(fd)


def open(  # noqa: A001 - mirrors fvd.open
    path: StrPath, mode: str = "r", *, cache: str = "writeback", backing: AnyPolicy = "any"
) -> Qcow2Image:
    """Open a qcow2 image; mode "r" or "r+", cache "writeback", "writethrough" or "unsafe"
    (never flushed, as qemu-img's -t unsafe). `backing`: which backing files the chain
    may use, "any", "same-dir" or "none" (fvd.fileio.BackingPolicy)."""
    return Qcow2Image(path, mode, cache, backing=backing)


class Qcow2Image(RefcountMixin, ClusterMixin, SnapshotMixin, Closing):
    """An open qcow2 image. See the module docstring; its attributes (path, read_only,
    cache, fd, size, cluster_size, stats and the private state) are declared in
    fvd.qcow2.state.Qcow2State."""

    thread_safe_writes = False  # writes from one thread at a time (fvd.convert's writer)

    def __init__(
        self,
        path: StrPath,
        mode: str = "r",
        cache: str = "writeback",
        *,
        _creating: bool = False,
        _chain: tuple[str, ...] = (),
        _skip_backing: bool = False,
        backing: AnyPolicy = "any",
    ) -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        if cache not in ("writeback", "writethrough", "unsafe"):
            raise ValueError(
                f"cache must be 'writeback', 'writethrough' or 'unsafe', not {cache!r}"
            )
        self.path = str(path)
        self.read_only = mode == "r"
        self.cache = cache
        impl = _impl.module()
        self.stats = impl.Stats()
        self._closed = True
        policy = BackingPolicy.of(backing, self.path)
        self.fd = open_disk_file(self.path, not self.read_only)
        self._closed = False
        self._hf = impl.HostFile(self.fd, self.stats)  # guest data I/O, as FVD's
        try:
            self._load(_creating)
            if self._header.backing_file and not _skip_backing:
                self._backing = _open_backing(
                    self,
                    self._header.backing_file,
                    self._header.backing_format,
                    tuple(_chain) + (_os.path.realpath(path),),
                    policy,
                )
        except BaseException:
            _os.close(self.fd)
            self._closed = True
            raise

    # ------------------------------------------------------------- opening
    def _load(self, creating: bool) -> None:
        self._file_size = _os.fstat(self.fd).st_size
        self._unsynced = self._cow_pending = False
        head = min(self._file_size, 1 << MAX_CLUSTER_BITS)
        raw = self._meta_read(0, min(head, 4096)) if head else b""
        if len(raw) >= OFF_CLUSTER_BITS + S_CLUSTER_BITS.size and raw[:4] == MAGIC:
            cbits = S_CLUSTER_BITS.unpack_from(raw, OFF_CLUSTER_BITS)[0]
            if MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS and (1 << cbits) > len(raw):
                raw += self._meta_read(len(raw), min(head, 1 << cbits) - len(raw))
        h = parse_header(self.path, bytes(raw), self._file_size, creating=creating)
        self._header = h
        self._version, self._cbits, self._cs = h.version, h.cluster_bits, h.cluster_size
        self._l2bits = self._cbits - 3
        self._l2mask = (1 << self._l2bits) - 1
        self.size, self.cluster_size = h.size, h.cluster_size
        self._zeros = memoryview(bytes(self._cs))
        self._incompat, self._compat = h.incompatible_features, h.compatible_features
        self._l1_offset = h.l1_table_offset
        l1raw = self._meta_read(h.l1_table_offset, 8 * h.l1_size) if h.l1_size else b""
        self._l1 = np.frombuffer(bytes(l1raw), dtype=L1_DTYPE).copy()
        self._check_l1(self._l1, h.l1_table_offset)
        self._rt_offset, self._rt_clusters = h.refcount_table_offset, h.refcount_table_clusters
        rtraw = self._meta_read(self._rt_offset, self._rt_clusters * self._cs)
        self._reftable = np.frombuffer(bytes(rtraw), dtype=REFTABLE_DTYPE).copy()
        self._rb, self._rb_dirty, self._deferred, self._free_idx = {}, set(), [], 0
        self._l2, self._l2_dirty, self._snap_l1 = {}, set(), {}
        self._fast_l2 = {}
        self._fast_read = (
            self._cbits,
            self._l2bits,
            self._l2mask,
            self._cs,
            self.size,
            self._fast_l2,
            self._hf.readinto,
        )
        self._load_snapshots(h.nb_snapshots, h.snapshots_offset)
        self._check_overlaps()
        self._lazy = False
        if not self.read_only:
            self._open_for_writing(h)

    def _check_l1(self, l1: Table, l1_off: int) -> None:
        l1u = l1.astype(np.uint64)
        bad = np.flatnonzero(l1u & np.uint64(L1E_RESERVED_MASK))
        if bad.size:
            raise CorruptImageError(
                self.path, l1_off + 8 * int(bad[0]), "L1 entry has reserved bits set"
            )
        offs = l1u & np.uint64(OFFSET_MASK)
        bad = np.flatnonzero(
            (offs % np.uint64(self._cs) != 0)
            | (offs + np.uint64(self._cs) > np.uint64(self._file_size)) & (offs != 0)
        )
        if bad.size:
            i = int(bad[0])
            raise CorruptImageError(
                self.path,
                l1_off + 8 * i,
                f"L1 entry {i} points to {int(offs[i]):#x}: unaligned or past the end of the file",
            )

    def _check_overlaps(self) -> None:
        """Metadata areas may not share clusters, and no active L2 table or refcount
        block may live in one: a write there would land in the L1 or refcount table."""
        cs, cb = self._cs, self._cbits
        areas = [
            (0, cs, 0, "header"),
            (self._l1_offset, 8 * len(self._l1), 40, "L1 table"),
            (self._rt_offset, self._rt_clusters * cs, 48, "refcount table"),
        ]
        if self._snapshots:
            areas.append((self._snapshots_offset, self._snap_table_len, 64, "snapshot table"))
        taken: dict[int, str] = {}  # cluster -> the area in it
        for off, n, field, what in areas:
            for c in range(off >> cb, -(-(off + n) // cs) if n else off >> cb):
                if c in taken:
                    raise CorruptImageError(
                        self.path, field, f"{what} overlaps the {taken[c]} (cluster {c})"
                    )
                taken[c] = what
        meta = np.fromiter(taken, dtype=np.int64)
        rt = self._reftable.astype(np.uint64) & np.uint64(REFT_OFFSET_MASK)
        rbc = (rt >> np.uint64(cb)).astype(np.int64)
        self._check_targets(
            self._rt_offset,
            rt,
            rbc,
            meta,
            lambda i, c: f"refcount block {i} lies in {taken[c]}",
            "two refcount table entries share the refcount block",
        )
        l1 = self._l1.astype(np.uint64) & np.uint64(OFFSET_MASK)
        self._check_targets(
            self._l1_offset,
            l1,
            (l1 >> np.uint64(cb)).astype(np.int64),
            np.concatenate([meta, rbc[rt != 0]]),
            lambda i, c: f"L1 entry {i} points into metadata (cluster {c})",
            "two L1 entries share the L2 table",
        )

    def _check_targets(
        self,
        table_offset: int,
        entries: np.ndarray,
        targets: np.ndarray,
        forbidden: np.ndarray,
        inside: Callable[[int, int], str],
        shared: str,
    ) -> None:
        """The clusters `targets` that a table's nonzero `entries` point at may not be
        `forbidden` (message `inside(index, cluster)`) nor one cluster twice (`shared`)."""
        live = entries != 0
        hit = np.flatnonzero(np.isin(targets, forbidden) & live)
        if hit.size:
            i = int(hit[0])
            raise CorruptImageError(self.path, table_offset + 8 * i, inside(i, int(targets[i])))
        uniq, cnt = np.unique(targets[live], return_counts=True)
        if (cnt > 1).any():
            c = int(uniq[cnt > 1][0])
            raise CorruptImageError(self.path, table_offset, f"{shared} at cluster {c}")

    def _metadata_refcounts_ok(self) -> None:
        """Before a writer trusts the refcounts: every metadata cluster (header, tables,
        refcount blocks, L2 tables) must count at least 1, or the allocator would hand
        it out for data. Costs refcount-block reads only, no L2 reads."""
        cs, cb = self._cs, self._cbits
        clusters = [
            np.arange(0, 1),
            np.arange(self._rt_offset >> cb, (self._rt_offset >> cb) + self._rt_clusters),
        ]
        areas = [(self._l1_offset, 8 * len(self._l1))]
        if self._snapshots:
            areas.append((self._snapshots_offset, self._snap_table_len))
            areas += [(s.l1_table_offset, 8 * s.l1_size) for s in self._snapshots]
        for off, n in areas:
            if n:
                clusters.append(np.arange(off >> cb, -(-(off + n) // cs)))
        rt = self._reftable.astype(np.uint64) & np.uint64(REFT_OFFSET_MASK)
        clusters.append((rt[rt != 0] >> np.uint64(cb)).astype(np.int64))
        l1 = self._l1.astype(np.uint64) & np.uint64(OFFSET_MASK)
        clusters.append((l1[l1 != 0] >> np.uint64(cb)).astype(np.int64))
        c = np.unique(np.concatenate(clusters).astype(np.int64))
        zero = c[self._refcounts_of(c) == 0]
        if zero.size:
            raise CorruptImageError(
                self.path,
                int(zero[0]) << cb,
                f"metadata cluster {int(zero[0])} has refcount 0 (run check -r all)",
            )

    def _open_for_writing(self, h: Header) -> None:
        if self._incompat & INCOMPAT_CORRUPT:
            raise CorruptImageError(
                self.path, OFF_INCOMPAT, "image is marked corrupt; open it read-only"
            )
        if any(t == EXT_BITMAPS for t, _ in h.extensions):
            raise UnsupportedFeatureError(
                f"{self.path}: persistent bitmaps are not supported for writing"
            )
        if h.autoclear_features:
            self._meta_write(88, bytes(8))  # bits we do not maintain are cleared
            self._sync()
        self._lazy = bool(self._compat & COMPAT_LAZY_REFCOUNTS)
        if not self._incompat & INCOMPAT_DIRTY:
            try:
                self._metadata_refcounts_ok()
            except CorruptImageError as e:
                self._suspect = e  # writes refuse until check(repair=True) fixed it
        if self._incompat & INCOMPAT_DIRTY:
            self._rebuild_refcounts()  # as QEMU does after a crash
            self._fix_copied()
            if not self._lazy:
                self._set_incompat(self._incompat & ~INCOMPAT_DIRTY)
        elif self._lazy:
            self._set_incompat(self._incompat | INCOMPAT_DIRTY)

    def _set_incompat(self, bits: int) -> None:
        if self._version == 2:
            return
        self._meta_write(OFF_INCOMPAT, S_INCOMPAT_UPDATE.pack(bits))
        self._sync()
        self._incompat = bits

    def _resize_l1(self, n: int) -> None:
        """Give the active L1 table n entries: new table written + flushed, then one
        synchronous 12-byte header write (l1_size, l1_table_offset), old table freed."""
        old_off, old_n = self._l1_offset, len(self._l1)
        if n == old_n:
            return
        l1 = np.zeros(n, dtype=L1_DTYPE)
        k = min(n, old_n)
        l1[:k] = self._l1[:k]
        off = self._alloc_contiguous(max(1, -(-8 * n // self._cs))) if n else 0
        self.flush()
        if n:
            self._meta_write(off, l1.tobytes())
            self._sync()
        self._meta_write(OFF_L1_SIZE, S_L1_UPDATE.pack(n, off))
        self._sync()
        self._l1, self._l1_offset = l1, off
        self._fast_l2.clear()
        if old_n:
            nold = max(1, -(-8 * old_n // self._cs))
            self._update_refcounts(np.arange(nold) + (old_off >> self._cbits), -1)
        self.flush()

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Grow (L1 first, then the 8-byte size field, each synced) or, with shrink=True,
        cut bytes that read as zeros (zeroed first, so their clusters are freed). The
        area a grow exposes reads zeros, also over a longer backing file (as QEMU)."""
        self._check_writable()
        if not isinstance(size, int) or size <= 0 or size % 512:
            raise ChainError(f"{self.path}: qcow2 size must be a positive multiple of 512")
        if self._snapshots:
            raise ChainError(
                f"{self.path}: cannot resize an image with internal snapshots; delete them first"
            )
        old = self.size
        if size < old:
            if not shrink:
                raise ChainError(f"{self.path}: shrinking needs shrink=True (--shrink)")
            self._refuse_cut(size)
            self.write_zeroes(size, old - size)
        self.flush()
        cover = self._cs * (self._cs // 8)
        if -(-size // cover) > len(self._l1):
            self._resize_l1(-(-size // cover))
        self._meta_write(HEADER_OFFSET["size"], S_SIZE.pack(size))
        self._sync()
        self._header.size = self.size = size
        self._fast_read = self._fast_read[:4] + (size,) + self._fast_read[5:]
        self._fast_l2.clear()
        backing_size = self._backing.size if self._backing is not None else 0
        if size > old and backing_size > old:
            self.write_zeroes(old, min(size, backing_size) - old)
            self.flush()

    def _refuse_cut(self, size: int) -> None:
        """A shrink cuts nothing but zeros: else ChainError naming the first data."""
        buf = bytearray(1 << 20)
        for e in self.extents(size, self.size - size):
            end = e.start + e.length if e.data and not e.zero else e.start
            for pos in range(e.start, end, len(buf)):
                mv = memoryview(buf)[: min(len(buf), end - pos)]
                self.readinto(pos, mv)
                if np.frombuffer(mv, dtype=np.uint8).any():
                    raise ChainError(
                        f"{self.path}: data at offset {pos} or after lies past the new size "
                        f"{size}; shrinking would lose it"
                    )

    # ------------------------------------------------------------ raw I/O
    def _meta_read(self, off: int, n: int) -> bytearray:
        buf = bytearray(n)
        mv, done = memoryview(buf), 0
        while done < n:
            got = _os.preadv(self.fd, [mv[done:]], off + done)
            if got == 0:
                raise CorruptImageError(
                    self.path, off + done, "metadata past the end of the file (truncated)"
                )
            done += got
        self.stats.metadata_reads += 1
        self.stats.metadata_bytes_read += n
        return buf

    def _meta_write(self, off: int, data: Buffer) -> None:
        mv, done = memoryview(data), 0
        while done < len(mv):
            done += _os.pwrite(self.fd, mv[done:], off + done)
        self.stats.metadata_writes += 1
        self.stats.metadata_bytes_written += len(mv)
        self._unsynced = True
        self._file_size = max(self._file_size, off + len(mv))

    # Guest data goes through the same HostFile primitive (and Stats) as FVD's chunk
    # map: one call = one counted pread / pwritev; only the metadata policy differs.
    def _data_readinto(self, host: int, view: memoryview) -> None:
        self._hf.readinto(host, view)

    def _data_writev(self, host: int, bufs: Sequence[Chunk]) -> None:
        total = self._hf.pwritev(host, bufs)
        self._unsynced = True
        self._file_size = max(self._file_size, host + total)

    def _sync(self) -> None:
        if self.cache == "unsafe":
            return
        _os.fdatasync(self.fd)
        self.stats.flushes += 1
        self._unsynced = self._cow_pending = False

    # ------------------------------------------------------------- checks
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: I/O on a closed image")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise OSError(errno.EBADF, f"{self.path}: image is open read-only")
        if self._suspect is not None:
            raise self._suspect

    def _check_range(self, offset: int, length: int) -> None:
        if not isinstance(offset, int) or not isinstance(length, int):
            raise TypeError("offset and length must be integers")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.path}: I/O range [{offset}, {offset + length}) outside "
                f"the image (size {self.size})"
            )

    # ------------------------------------------------------------- public I/O
    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length if isinstance(length, int) and length > 0 else 0)
        self._check_range(offset, length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf: Buffer) -> int:
        """Fill any writable contiguous buffer with guest data from `offset`."""
        # Fast path: inside one allocated cluster whose L2 table is cached: one lookup in
        # the native-endian read table, one HostFile.readinto bounded to that cluster.
        if type(offset) is int and offset >= 0 and not self._closed:
            cbits, l2bits, l2mask, cs, size, tables, hread = self._fast_read
            cidx = offset >> cbits
            table = tables.get(cidx >> l2bits)
            if table is None and offset < size:
                table = self._build_fast_l2(cidx >> l2bits)
            if table is not None:
                host = table[cidx & l2mask]
                if host:
                    within = offset & (cs - 1)
                    room = cs - within
                    if offset + room > size:
                        room = size - offset
                    if room > 0:
                        try:
                            n: int = hread(host + within, buf, room)
                        except (BufferError, TypeError, ValueError):
                            n = -1  # odd buffer: the checks below report it
                        if n >= 0:
                            return n
        self._check_open()
        mv = _byte_view(buf, writable=True)
        self._check_range(offset, len(mv))
        self._read_tree(self._l1, self._l1_offset, offset, mv)
        return len(mv)

    def write(self, offset: int, data: Buffer) -> int:
        """Write any bytes-like object at any offset; returns the byte count."""
        self._check_writable()
        mv = _byte_view(data, writable=False)
        self._check_range(offset, len(mv))
        cover, pos = self._cs << self._l2bits, 0
        while pos < len(mv):
            g = offset + pos
            span = min(len(mv) - pos, cover - g % cover)
            self._write_span(g, mv[pos : pos + span])
            pos += span
        if self.cache == "writethrough" and len(mv):
            self.flush()
        return len(mv)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros: whole clusters get the v3 zero flag
        (their clusters are freed), partial clusters are written with zeros."""
        self._check_writable()
        self._check_range(offset, length)
        cs, cover = self._cs, self._cs << self._l2bits
        pos, end = offset, offset + length
        while pos < end:
            cend = min(end, (pos | (cs - 1)) + 1)
            if pos % cs == 0 and cend - pos == cs:
                span_end = min(end & ~(cs - 1), (pos // cover + 1) * cover)
                self._zero_clusters(pos, span_end)
                pos = span_end
            else:
                if not self._reads_zero(pos):
                    self._write_span(pos, self._zeros[: cend - pos])
                pos = cend
        if self.cache == "writethrough" and length:
            self.flush()

    def flush(self) -> None:
        """Everything written before is durable when this returns: dirty refcount blocks
        (not with lazy refcounts), flush, dirty L2 tables, flush, deferred frees."""
        self._check_open()
        if self.read_only:
            return
        self._flush_l2_cache()
        if not self._lazy:
            self._flush_refcount_cache()
        if self._unsynced:
            self._sync()

    def close(self) -> None:
        """Clean shutdown (idempotent): flush; with lazy refcounts also write the refcount
        blocks and clear the dirty bit."""
        if self._closed:
            return
        try:
            if not self.read_only:
                self.flush()
                if self._incompat & INCOMPAT_DIRTY:
                    self._flush_refcount_cache()
                    self._set_incompat(self._incompat & ~INCOMPAT_DIRTY)
        finally:
            _os.close(self.fd)
            self._closed = True
            if self._backing is not None:
                self._backing.close()

    def layer_readers(self) -> list[Optional[Callable[[int, memoryview], int]]]:
        """Per depth of the chain (0: this file, 1: its backing file ...), a function
        read(host_offset, buffer) filling the buffer from that layer's file, at the
        offsets `extents()` gives for data at that depth (zeros past the file's end);
        None for a layer only its image can read (an fvd backing file), and nothing
        past it. For copying a whole chain without per-cluster lookups."""
        self._check_open()
        out: list[Optional[Callable[[int, memoryview], int]]] = [_file_reader(self.fd)]
        b = self._backing
        if isinstance(b, Qcow2Image):
            out += b.layer_readers()
        elif isinstance(b, RawFile):
            out.append(_file_reader(b.fd))
        elif b is not None:
            out.append(None)
        return out

    @property
    def backing_file(self) -> Optional[str]:
        """The backing file name as stored in the header, or None."""
        return self._header.backing_file or None

    @property
    def backing_format(self) -> Optional[str]:
        return self._header.backing_format or None

    @property
    def header_extensions(self) -> list[tuple[int, bytes]]:
        """The header extensions as (type, data), in file order (the end marker left out)."""
        return list(self._header.extensions)

    def _abandon(self) -> None:
        """Close the file without the clean-shutdown path (tests: simulated crash)."""
        if not self._closed:
            _os.close(self.fd)
            self._closed = True

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                _os.close(self.fd)
            except OSError:
                pass
            self._closed = True

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("r" if self.read_only else "r+")
        return f"<Qcow2Image {self.path!r} size={self.size} cluster={self._cs} {state}>"

    # ------------------------------------------------------------- map / check
    @property
    def closed(self) -> bool:
        return self._closed

    def extents_array(self, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """extents() as an EXTENT_DTYPE array (fvd.types). The whole of a qcow2 chain
        is mapped with numpy, all layers at once (fvd.qcow2.chainmap)."""
        self._check_open()
        if offset == 0 and length in (None, self.size):
            whole = chain_extents(self)
            if whole is not None:
                return whole
        return extents_to_array(self.extents(offset, length))

    @property
    def version(self) -> int:
        """qcow2 version: 2 (compat 0.10) or 3 (compat 1.1)."""
        return self._version

    @property
    def incompatible_features(self) -> int:
        return self._incompat

    @property
    def image_end_offset(self) -> int:
        """End of the last cluster in use (qemu-img check's image-end-offset)."""
        end: int = self._end_cluster()
        return end * self.cluster_size

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self._compat & COMPAT_LAZY_REFCOUNTS)

    @property
    def dirty(self) -> bool:
        return bool(self._incompat & INCOMPAT_DIRTY)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        """Extents (start, length, data, zero, depth, offset, present) covering the
        range, adjacent equal ones merged: the vocabulary of `qemu-img map`."""
        self._check_open()
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        extents: Iterator[Extent] = self._extents(offset, length)
        return extents

    def check(self, repair: bool = False) -> CheckResult:
        """Compare refcounts with what the metadata implies, as `qemu-img check` does.
        With repair=True, rebuild refcounts and COPIED flags, then check again."""
        self._check_open()
        if repair and self.read_only:
            raise OSError(errno.EBADF, f"{self.path}: image is open read-only")
        if not self.read_only:
            self.flush()
        counts, errors = self._compute_refcounts()
        stored = self._stored_refcounts(len(counts))
        copied = self._copied_errors()
        result = CheckResult(
            corruptions=len(errors) + int((stored < counts).sum()) + copied,
            leaks=int((stored > counts).sum()),
            copied_errors=copied,
            messages=list(errors),
        )
        if repair and (not result.ok or self._suspect is not None):
            self._rebuild_refcounts()
            self._suspect = None
            self._fix_copied()
            self.flush()
            after = self.check()
            after.corruptions_fixed = result.corruptions - after.corruptions
            after.leaks_fixed = result.leaks - after.leaks
            return after
        return result


def _file_reader(fd: int) -> Callable[[int, memoryview], int]:
    def read(host: int, mv: memoryview) -> int:
        return pread_fill(fd, mv, host)

    return read


def _byte_view(buf: Buffer, writable: bool) -> memoryview:
    mv = memoryview(buf)
    if not mv.contiguous:
        raise ValueError("buffer must be contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if writable and mv.readonly:
        raise TypeError("buffer is read-only")
    return mv


registry.register("qcow2", lambda path, mode="r", **options: Qcow2Image(path, mode, **options))
