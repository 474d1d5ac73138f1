"""The Image facade (the `fvd.image` layer of docs/architecture.md): what `fvd.open()`
returns and users hold.

It opens an `fvd.core.image.ImageCore`, attaches the features of the header (base image,
snapshots, partial chunks: `fvd.features`), and offers the public API (README,
docs/api) by calling the features and operations (`fvd.ops`) with the
core. The hot calls (`readinto`, `write`) are the core's own bound methods: no frame of
the facade per I/O.
"""

from __future__ import annotations

import errno
import os
import time
import zlib
from typing import Any, Callable, Optional

import numpy as np

from fvd import registry
from fvd.core import tableless
from fvd.core.image import ImageCore
from fvd.errors import (
    BaseImageError,
    ChainError,
    FvdError,
    ImageIOError,
    ReadOnlyImageError,
    io_error,
)
from fvd.features import base as base_feature
from fvd.features import prefetch as prefetch_feature
from fvd.features import snapshots as snap
from fvd.features.granular import attach_partial
from fvd.fileio import (
    AnyPolicy,
    BackingPolicy,
    file_size,
    format_of_magic,
    full_pwrite,
    is_block_device_path,
    open_for_rewrite,
    zero_device_range,
)
from fvd.ondisk import format as fmt
from fvd.ondisk.sparse_table import crc32_zeros
from fvd.ops import check as check_ops
from fvd.ops import reshape
from fvd.ops.diskops import DiskOps
from fvd.ops.info import allocated_chunks, image_info
from fvd.types import CheckResult, Closing, SnapshotInfo
from fvd.units import KiB, MiB

ANY_BACKING = BackingPolicy("any")


def attach_features(
    core: ImageCore,
    chain: tuple[str, ...],
    copy_on_read: bool,
    policy: BackingPolicy = ANY_BACKING,
    skip_base: bool = False,
) -> None:
    """The feature slots of `core`, as its header asks (called while it opens); the base
    as `policy` allows it (not at all with `skip_base`)."""
    h = core.header
    if h.base_format != fmt.BASE_NONE:
        base_feature.attach_base(core, chain, copy_on_read, policy, skip_base)
    elif not core.tableless:  # partial chunks come with snapshots: never table-less
        attach_partial(core)  # copy_on_read without a base: a no-op, as in QEMU
    if core.header.nb_snapshots or core.header.snapshot_table_offset:
        snap.attach_snapshots(core)


def create(
    path: str | os.PathLike[str],
    size: int,
    *,
    chunk_size: int = MiB,
    block_size: int = 64 * KiB,
    base: Optional[str | os.PathLike[str]] = None,
    base_format: Optional[str] = None,
    compact: bool = True,
    journal_size: Optional[int] = None,
    overwrite: bool = False,
    backing: AnyPolicy = "any",
    table: bool = True,
) -> None:
    """Create a new, empty image file, optionally over a base image (raw, fvd, qcow2 or
    an NBD URI). Without `base_format` the base's magic decides (fvd, qcow2, else raw):
    give it for a base you do not trust (`fvd create -b` requires -F). `backing`: which
    base files the new image's chain may use ("any", "same-dir", "none"). `table=False`:
    a table-less image (guest offset x at data_offset + x, the host file system
    allocates; no snapshots), see fvd.core.tableless."""
    size = int(size)
    _check_new_geometry(size, chunk_size, block_size, compact, table, journal_size)
    header = fmt.ImageHeader(
        virtual_size=size,
        chunk_size=chunk_size,
        block_size=block_size,
        clean_shutdown=1,
        journal_epoch=1,
        next_snapshot_id=1,
        image_uuid=fmt.new_image_uuid(),
    )
    base_name = b""
    if base is not None:
        base_name, base_fields = base_feature.describe_new_base(
            path, base, base_format, size, backing
        )
        header = header.replace(**base_fields)
    if not table:
        tableless_bit = header.incompatible_features | fmt.INCOMPAT_TABLELESS
        header = header.replace(incompatible_features=tableless_bit, next_snapshot_id=0)
    header = header.replace(
        **fmt.layout(
            size, chunk_size, block_size, header.base_size, len(base_name), journal_size, table
        )
    )
    _write_new_image(os.fspath(path), header, base_name, overwrite)


def _check_new_geometry(
    size: int,
    chunk_size: int,
    block_size: int,
    compact: bool,
    table: bool,
    journal_size: Optional[int],
) -> None:
    """ValueError unless create()'s sizes and switches describe an image fvd can make."""
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
    if not isinstance(table, bool):
        raise ValueError(f"table must be True or False, not {table!r}")
    if -(-size // chunk_size) > fmt.MAX_TABLE_ENTRIES:
        raise ValueError("image too large for this chunk size")
    if journal_size is not None and journal_size < fmt.MIN_JOURNAL:
        raise ValueError(f"journal_size must be at least {fmt.MIN_JOURNAL}")


def _write_new_image(path: str, header: fmt.ImageHeader, base_name: bytes, overwrite: bool) -> None:
    """Header, base name and an empty table (a table-less image: its data area, one
    hole), then fsync: the file is an image or absent."""
    nchunks = -(-header.virtual_size // header.chunk_size)
    has_table = not fmt.is_tableless(header)
    if has_table:
        # a sparse table (docs/format.md, "Sparse tables"): all unallocated is all zeros,
        # left as a hole in a file (zeroed on a device)
        header = header.replace(
            incompatible_features=header.incompatible_features | fmt.INCOMPAT_SPARSE_TABLE,
            table_crc=crc32_zeros(0, 4 * nchunks),
        )
    header = header.replace(bitmap_crc=zlib.crc32(bytes(header.bitmap_size)))
    if is_block_device_path(path):
        if not has_table:
            raise ValueError(
                f"{path}: table-less images (table=off) on block devices are not supported"
            )
        _write_new_image_on_device(path, header, base_name, overwrite)
        return
    fd = open_for_rewrite(path, overwrite)
    try:
        os.pwrite(fd, fmt.build_header(header).ljust(fmt.HEADER_REGION, b"\0"), 0)
        if base_name:
            os.pwrite(fd, base_name, header.base_name_offset)
        if has_table:
            os.ftruncate(fd, header.data_offset)  # the table: a hole
        else:
            os.ftruncate(fd, tableless.data_end(header))
        os.fsync(fd)
    except BaseException as e:
        os.close(fd)
        os.unlink(path)
        if isinstance(e, OSError):
            raise io_error(path, e, "create") from None
        raise
    os.close(fd)


def _write_new_image_on_device(
    path: str, header: fmt.ImageHeader, base_name: bytes, overwrite: bool
) -> None:
    """An image on a block device (docs/format.md, "Block devices"): the metadata
    regions are zeroed (a device does not read zeros: zeros are also the empty sparse
    table), the base name written, flushed, then the header. Opened O_EXCL: a mounted
    device is refused."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        raise io_error(path, e, "create") from None
    try:
        size = file_size(fd)
        if size < header.data_offset:
            raise ImageIOError(
                path,
                errno.ENOSPC,
                f"create: block device of {size} bytes cannot hold the metadata "
                f"({header.data_offset} bytes)",
            )
        if not overwrite and format_of_magic(os.pread(fd, 4, 0)) != "raw":
            raise ImageIOError(
                path, errno.EEXIST, "create: the device holds an image (overwrite replaces it)"
            )
        zero_device_range(fd, 0, header.data_offset)
        if base_name:
            full_pwrite(fd, base_name, header.base_name_offset)
        os.fsync(fd)
        full_pwrite(fd, fmt.build_header(header), 0)
        os.fsync(fd)
    except OSError as e:
        raise io_error(path, e, "create") from None
    finally:
        os.close(fd)


class Image(DiskOps, Closing):
    """An open FVD image. Use `fvd.open()` to get one."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: str = "r",
        *,
        cache: str = "writeback",
        copy_on_read: bool = False,
        force_share: bool = False,
        backing: AnyPolicy = "any",
        _for_check: bool = False,
        _chain: tuple[str, ...] = (),
        _skip_base: bool = False,
    ) -> None:
        policy = BackingPolicy.of(backing, path)

        def attach(core: ImageCore, chain: tuple[str, ...], copy_on_read: bool) -> None:
            attach_features(core, chain, copy_on_read, policy, _skip_base)

        core = ImageCore(
            path,
            mode,
            cache=cache,
            copy_on_read=copy_on_read,
            force_share=force_share,
            for_check=_for_check,
            chain=_chain,
            attach=attach,
        )
        self._core = core
        self._reopen_cache, self._reopen_cor = cache, copy_on_read
        self.path: str = core.path
        self.read_only: bool = core.read_only
        self.stats = core.stats
        self.size: int = core.size
        self.chunk_size: int = core.chunk_size
        self.block_size: int = core.block_size
        self.write = core.write  # type: ignore[method-assign]
        fast = core.__dict__.get("readinto")
        if fast is not None:
            self.readinto = fast  # type: ignore[method-assign]

    def _mapped(self) -> ImageCore:
        return self._core

    # ----- I/O (the hot calls are bound to the core in __init__) ---------------------
    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buffer: Any) -> int:
        """Fill `buffer` from `offset`; returns the number of bytes read."""
        return self._core.readinto(offset, buffer)

    def write(self, offset: int, data: Any) -> int:
        """Write any bytes-like object at any offset; returns the number of bytes."""
        return self._core.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros; whole chunks are unmapped, not written."""
        self._core.write_zeroes(offset, length)

    def flush(self) -> None:
        """Everything written before is durable when this returns."""
        self._core.flush()

    # ----- lifecycle -------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._core.closed

    def close(self) -> None:
        """Flush, checkpoint and release the file. Safe while other threads use the
        image: calls already inside finish first, later ones raise ValueError."""
        self.__dict__.pop("readinto", None)
        self._core.close()

    def _crash(self) -> None:
        """Tests only: drop the handle as a crash would, without flushing anything."""
        self.__dict__.pop("readinto", None)
        self._core.crash()

    def __repr__(self) -> str:
        return repr(self._core)

    # ----- introspection ---------------------------------------------------------------
    @property
    def fd(self) -> int:
        """The image file's descriptor (read-only use: fstat, identity checks)."""
        return int(self._core.fd)

    @property
    def base(self) -> Optional[str]:
        """Path (or NBD URI) of the base image, or None."""
        path = self._core.base_path
        return None if path is None else str(path)

    @property
    def base_size(self) -> Optional[int]:
        """Size of the base image as recorded at create / rebase, or None without one."""
        h = self._core.header
        return None if h.base_format == fmt.BASE_NONE else int(h.base_size)

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Give the image a new virtual size. Growing never moves data; the lookup table
        grows in place or into the journal region (docs/format.md section 11). Shrinking
        needs shrink=True and refuses when the cut part reads anything but zeros. Images
        with internal snapshots are refused (as qemu-img does for qcow2). No other thread
        may use the image meanwhile: the handle is closed and reopened."""
        if self.read_only:
            raise ReadOnlyImageError(self.path)
        size = int(size)
        if size < self.size:
            if not shrink:
                raise ChainError(f"{self.path}: shrinking needs shrink=True (--shrink)")
            self._zero_cut(size)
        if size == self.size:
            self._core.refresh_device_size()  # a grown block device: more room
            return
        self.close()
        try:
            reshape.resize_file(self.path, size)
        finally:
            Image.__init__(
                self, self.path, "r+", cache=self._reopen_cache, copy_on_read=self._reopen_cor
            )

    def _zero_cut(self, size: int) -> None:
        """Refuse unless [size, end) reads as zeros; then unmap it (whole chunks)."""
        buf = bytearray(MiB)
        for e in self.extents(size, self.size - size):
            if not e.data:
                continue
            for pos in range(e.start, e.start + e.length, MiB):
                n = min(MiB, e.start + e.length - pos)
                self.readinto(pos, memoryview(buf)[:n])
                if np.frombuffer(buf, dtype=np.uint8, count=n).any():
                    raise ChainError(
                        f"{self.path}: data at offset {pos} or after lies past the new size "
                        f"{size}; shrinking would lose it"
                    )
        self.write_zeroes(size, self.size - size)
        self.flush()

    @property
    def uuid(self) -> Optional[str]:
        """The image's UUID (stable for its life: docs/format.md section 2), or None for
        an image written by older fvd until its first read-write open gives it one."""
        uuid: Optional[str] = fmt.image_uuid(self._core.header)
        return uuid

    @property
    def table(self) -> bool:
        """False for a table-less image (created with table=False)."""
        return not self._core.tableless

    @property
    def allocated_chunks(self) -> int:
        """Chunks the table maps (table-less: chunks holding data in the file)."""
        return allocated_chunks(self._core)

    def info(self) -> dict[str, Any]:
        """Header facts and allocation, as `fvd info --output=json` shows them."""
        return image_info(self._core)

    def check(self, repair: bool = False) -> CheckResult:
        core = self._core
        with core.lock:  # a consistent table, and released chunks reclaimed first
            if not core.closed:
                core.allocator.quiesce(time.sleep)
            return check_ops.check_image(core, repair)

    # ----- snapshots (fvd.features.snapshots) ------------------------------------------
    def _need_table(self, what: str) -> None:
        if self._core.tableless:
            raise tableless.refuse(self.path, what)

    def create_snapshot(self, name: str, vm_state: bytes = b"") -> SnapshotInfo:
        self._need_table("a snapshot (create_snapshot)")
        with self._io("snapshot create"):
            return snap.create_snapshot(self._core, name, vm_state)

    def snapshots(self) -> list[SnapshotInfo]:
        return snap.list_snapshots(self._core)

    def delete_snapshot(self, name: str) -> None:
        self._need_table("delete_snapshot")
        with self._io("snapshot delete"):
            snap.delete_snapshot(self._core, name)

    def revert_to_snapshot(self, name: str) -> None:
        self._need_table("revert_to_snapshot")
        with self._io("snapshot revert"):
            snap.revert_to_snapshot(self._core, name)

    def open_snapshot(self, name: str) -> SnapshotImage:
        """A read-only view of snapshot `name`, usable while the image keeps being written."""
        self._need_table("open_snapshot")
        with self._io("snapshot open"):
            return SnapshotImage(snap.open_snapshot(self._core, name))

    def read_vm_state(self, name: str) -> bytes:
        self._need_table("read_vm_state")
        with self._io("read vm_state"):
            return snap.read_vm_state(self._core, name)

    # ----- base image (fvd.features.prefetch) ------------------------------------------
    def prefetch(
        self, progress: Optional[Callable[[int, int], None]] = None, **options: Any
    ) -> Any:
        """Copy every block still in the base into the image (see fvd.features.prefetch)."""
        with self._io("prefetch"):
            return prefetch_feature.prefetch(self._core, progress, **options)

    def _io(self, what: str) -> _IoErrors:
        return _IoErrors(self.path, what)


class _IoErrors:
    """An OSError inside becomes an ImageIOError naming the image and the operation."""

    def __init__(self, path: str, what: str) -> None:
        self.path, self.what = path, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: Any, e: Any, tb: Any) -> None:
        if isinstance(e, OSError) and not isinstance(e, FvdError):
            converted = io_error(self.path, e, self.what)
            if converted is not e:
                raise converted from None


class SnapshotImage(DiskOps, Closing):
    """A read-only view of one snapshot (`Image.open_snapshot()`), with the same read
    side as an image: read, readinto, extents, changed_extents, as_file, checksum."""

    read_only = True

    def __init__(self, view: snap.SnapshotView) -> None:
        self._view = view
        self.path: str = view.path
        self.name: str = view.name
        self.size: int = view.size
        self.chunk_size: int = view.chunk_size
        self.block_size: int = view.block_size
        self.stats = view.stats
        self.readinto = view.readinto  # type: ignore[method-assign]

    def _mapped(self) -> snap.SnapshotView:
        return self._view

    def _shown_snapshot(self) -> Optional[str]:
        return self._view.name

    def readinto(self, offset: int, buffer: Any) -> int:
        return self._view.readinto(offset, buffer)

    def read(self, offset: int, length: int) -> bytes:
        return self._view.read(offset, length)

    def write(self, offset: int, data: Any) -> int:
        return self._view.write(offset, data)

    @property
    def closed(self) -> bool:
        return self._view.closed

    def close(self) -> None:
        self._view.close()

    def __repr__(self) -> str:
        return repr(self._view)


def open(  # noqa: A001 - the public name of the contract
    path: str | os.PathLike[str],
    mode: str = "r",
    *,
    cache: str = "writeback",
    copy_on_read: bool = False,
    force_share: bool = False,
    backing: AnyPolicy = "any",
) -> Image:
    """Open an FVD image; mode "r" or "r+".

    `backing` says which base images its chain may use: "any" (default, as qemu-img),
    "same-dir" (only files in the image's own directory, symlinks and `..` resolved;
    no NBD) or "none" (an image with a base is refused). BaseImageError otherwise.

    Locking follows QEMU: a writer excludes every other handle, readers share. With
    `force_share=True` a reader opens beside a writer and sees the image as of the
    writer's last flush (best effort, like `qemu-img -U`): chunks the writer frees and
    reuses after this open may show the writer's newer data.
    """
    return Image(
        path,
        mode,
        cache=cache,
        copy_on_read=copy_on_read,
        force_share=force_share,
        backing=backing,
    )


def check_file(path: str | os.PathLike[str], repair: bool = False) -> CheckResult:
    """Open `path` in check mode (corruptions are collected, not raised) and check it;
    with repair, the result is ok only if the repaired file reopens and checks clean."""
    with Image(path, "r+" if repair else "r", _for_check=True) as img:
        result = img.check(repair)
    if repair:
        verify_reopen(os.fspath(path), result)
    return result


def verify_reopen(path: str, result: CheckResult) -> None:
    """After a repair: reopen as fvd.open would and check again; count what fails."""
    try:
        try:
            with Image(path, "r") as img:
                after = img.check()
        except BaseImageError:
            with Image(path, "r", _for_check=True) as img:  # the base alone is missing
                after = img.check()
    except FvdError as e:
        check_ops.reopen_failed(result, e)
        return
    check_ops.merge_reopen(result, after)


def _open_for_registry(path: str, mode: str = "r", **options: Any) -> Image:
    return Image(path, mode, **options)


registry.register("fvd", _open_for_registry)
