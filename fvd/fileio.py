"""File-level helpers used at open, close and free time (never per guest I/O)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

from fvd import registry
from fvd._shared import SYS_IOV_MAX
from fvd.errors import BaseImageError, FvdError, ImageIOError, ImageLockedError
from fvd.nbd_client import is_nbd_uri
from fvd.ondisk import format as fmt
from fvd.types import Extent, StrPath

if TYPE_CHECKING:
    from typing_extensions import Buffer

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
# The process's global namespace, not libc's own handle: a symbol an LD_PRELOAD library
# interposes (the crash-cut recorder, tests/syscall_recorder) is the one called.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


# Block device ioctls (linux/fs.h): _IO(0x12, 127), _IOR(0x12, 114, u64). Not BLKDISCARD:
# a free chunk must read zeros, and what a discarded range reads is up to the device.
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def is_block_device_path(path: StrPath) -> bool:
    """True when `path` names an existing block device (symlinks followed)."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def file_size(fd: int) -> int:
    """Bytes in the file: st_size, or a block device's size (its st_size is 0)."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size
    raw = fcntl.ioctl(fd, BLKGETSIZE64, bytes(8))
    return int.from_bytes(raw, "little")


def truncate_tail(fd: int, end: int) -> None:
    """Give the file's bytes past `end` back to the file system. A block device keeps
    its size: nothing to do there (its free chunks are zeroed when freed)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size > end:
        os.ftruncate(fd, end)


def extend_to(fd: int, end: int) -> None:
    """A regular file reaches at least `end` (the new bytes: a hole). A block device
    already has its size."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size < end:
        os.ftruncate(fd, end)


def _device_range_ioctl(fd: int, request: int, offset: int, length: int) -> bool:
    """An ioctl over the byte range [offset, offset + length) (BLKZEROOUT); False where
    the device (or its alignment) does not support it."""
    arg = offset.to_bytes(8, "little") + length.to_bytes(8, "little")
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True


def zero_device_range(fd: int, offset: int, length: int) -> None:
    """A block device range reads as zeros: BLKZEROOUT (the kernel may unmap it, a loop
    device punches its backing file), else zeros written."""
    if length > 0 and not _device_range_ioctl(fd, BLKZEROOUT, offset, length):
        _write_zeros(fd, offset, offset + length)


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate file blocks for a range (fallocate, the file's size unchanged) so later
    writes there cannot fail with ENOSPC; a no-op where unsupported or on a device."""
    if length <= 0 or is_block_device(fd):
        return
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make the range read as zeros and free its blocks; writes zeros where unsupported.
    On a block device: BLKZEROOUT (fallback: zeros written)."""
    if length <= 0:
        return
    if is_block_device(fd):
        zero_device_range(fd, offset, length)
        return
    rc = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    _write_zeros(fd, offset, min(offset + length, file_size(fd)))


def _write_zeros(fd: int, offset: int, end: int) -> None:
    zeros = bytes(1 << 20)
    while offset < end:
        n = min(len(zeros), end - offset)
        full_pwrite(fd, zeros[:n], offset)
        offset += n


def open_for_rewrite(path: str, overwrite: bool) -> int:
    """An fd of `path` to write a new image into: created (O_EXCL unless `overwrite`), or
    an existing file emptied. An already-empty file is not truncated: on ext4 a truncate
    to zero marks the file for auto_da_alloc, and its close() then starts writeback of
    everything written (tens of ms per GiB that `-t unsafe` meant to skip)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (0 if overwrite else os.O_EXCL), 0o644)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def full_pwrite(fd: int, data: Buffer, offset: int) -> None:
    """pwrite all of `data`: a short write is continued, never silently dropped."""
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        n = os.pwrite(fd, mv[done:], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "write made no progress")
        done += n


def full_pwritev(fd: int, bufs: Sequence[Buffer], offset: int) -> int:
    """pwritev all of `bufs` at `offset`, at most SYS_IOV_MAX buffers a call; a short
    write is continued, never silently dropped. Returns the bytes written."""
    views = [memoryview(b).cast("B") for b in bufs]
    views = [v for v in views if len(v)]
    done = 0
    while views:
        n = os.pwritev(fd, views[:SYS_IOV_MAX], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "write made no progress")
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return done


def pread_fill(fd: int, mv: memoryview, offset: int) -> int:
    """Fill memoryview `mv` from `offset`; bytes past the end of the file read as zeros
    (a raw file shorter than its virtual size)."""
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            mv[done:] = bytes(len(mv) - done)
            break
        done += n
    return len(mv)


def lock_image(fd: int, path: str, exclusive: bool) -> None:
    """QEMU's discipline on the open file description: one writer and no readers, or any
    number of readers. A conflicting open fails at once with ImageLockedError."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        if exclusive:
            raise ImageLockedError(
                f"{path}: image is in use elsewhere (open for writing or reading)"
            ) from None
        raise ImageLockedError(
            f"{path}: image is open for writing elsewhere (force_share=True"
            f", or -U on the command line, gives a best-effort view)"
        ) from None


def writer_active(fd: int) -> bool:
    """True when a writer holds the image's lock (a shared lock cannot be had)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def has_data(fd: int, offset: int, length: int) -> bool:
    """True when the range holds allocated file blocks (SEEK_DATA)."""
    try:
        pos = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return False
        raise
    return pos < offset + length


QCOW2_MAGIC = b"QFI\xfb"
FVD_MAGIC = fmt.MAGIC.to_bytes(4, "little")


def resolve_relative(image_path: StrPath, name: str) -> str:
    """A base or backing name as stored in `image_path`: relative to its directory."""
    if os.path.isabs(name) or is_nbd_uri(name):  # a URI is never a relative path
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def detect_format(path: StrPath) -> str:
    """'fvd' or 'qcow2' by magic, else 'raw' (used only when no format is given). Never
    blocks: a FIFO or other special file is refused (OSError/ImageIOError)."""
    fd = open_disk_file(os.fspath(path))
    try:
        return format_of_magic(os.pread(fd, 4, 0))
    finally:
        os.close(fd)


def format_of_magic(magic: bytes) -> str:
    if magic == FVD_MAGIC:
        return "fvd"
    if magic == QCOW2_MAGIC:
        return "qcow2"
    return "raw"


# ----- opening image and backing files ------------------------------------------------------
def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_disk_file(path: str, writable: bool = False, *, backing_of: Optional[str] = None) -> int:
    """Open an image (or, with `backing_of`, a backing file of that image) without ever
    blocking: O_NONBLOCK, so a FIFO cannot stall the open, then fstat refuses everything
    but a regular file or a block device. Block devices are accepted: opening one never
    waits for a peer and it has a fixed size. Errors name the file: BaseImageError for a
    backing file, ImageIOError (EINVAL) for an image."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOCTTY
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            what = f"{_kind(mode)}, not a regular file or block device"
            if backing_of is not None:
                raise BaseImageError(f"{path}: backing file of {backing_of} is {what}")
            raise ImageIOError(path, errno.EINVAL, f"{what}, cannot be an image")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


BACKING_POLICIES = ("any", "same-dir", "none")


@dataclass(frozen=True)
class BackingPolicy:
    """Which backing files an image may use, along its whole chain (README, "Untrusted
    images"): "any" (as qemu-img), "same-dir" (only files in the top image's directory,
    symlinks and `..` resolved; no NBD) or "none" (no backing file at all)."""

    mode: str = "any"
    directory: Optional[str] = None  # same-dir: the top image's directory, resolved

    @classmethod
    def of(cls, backing: Union[str, BackingPolicy], image_path: StrPath) -> BackingPolicy:
        """The policy for an image opened at `image_path` (a policy passes unchanged)."""
        if isinstance(backing, BackingPolicy):
            return backing
        if backing not in BACKING_POLICIES:
            raise ValueError(
                f"backing must be one of {', '.join(BACKING_POLICIES)}, not {backing!r}"
            )
        if backing != "same-dir":
            return cls(backing)
        folder = os.path.dirname(os.path.abspath(os.fspath(image_path)))
        return cls(backing, os.path.realpath(folder))

    def admit(self, image_path: str, resolved: str) -> None:
        """Refuse, by name and before anything is opened, a backing file the policy does
        not allow (BaseImageError naming both files)."""
        if self.mode == "any":
            return
        if self.mode == "none":
            raise BaseImageError(f"{image_path}: backing file {resolved} refused (--backing=none)")
        if is_nbd_uri(resolved):
            raise BaseImageError(
                f"{image_path}: NBD backing {resolved} refused: not a file beside the "
                f"image (--backing=same-dir)"
            )
        self._inside(image_path, resolved, os.path.realpath(resolved))

    def confirm(self, fd: int, image_path: str, resolved: str) -> None:
        """The file really opened (`fd`) obeys the policy too: a name swapped between
        admit() and the open is caught here, before anything is read through it."""
        if self.mode != "same-dir":
            return
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            real = os.path.realpath(resolved)
        self._inside(image_path, resolved, real)

    def _inside(self, image_path: str, resolved: str, real: str) -> None:
        if os.path.dirname(real) != self.directory:
            where = "" if real == resolved else f" (really {real})"
            raise BaseImageError(
                f"{image_path}: backing file {resolved}{where} refused: outside "
                f"{self.directory} (--backing=same-dir)"
            )


AnyPolicy = Union[str, BackingPolicy]


class RawFile:
    """A raw backing file opened by open_backing: `fd`, `size`, reads past its end
    are zeros."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd
        self.size = os.lseek(fd, 0, os.SEEK_END)

    def readinto(self, offset: int, buf: Buffer) -> int:
        return pread_fill(self.fd, memoryview(buf).cast("B"), offset)

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        return raw_extents(self.fd, offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_backing(
    image_path: str,
    resolved: str,
    fmt: Optional[str],
    chain: tuple[str, ...],
    policy: BackingPolicy,
) -> Any:
    """The backing file `resolved` of `image_path`, opened read-only: a RawFile for
    "raw", or an fvd/qcow2 image (through fvd.registry, its own chain under the same
    policy); `fmt` None probes the magic of the opened file. The one opener of fvd's
    bases and qcow2's backing files: the policy is asked first, the open never blocks,
    only regular files and block devices are used, and the file really opened is
    checked against the policy. `chain` holds the real paths above (loops refused).
    Every error is a BaseImageError naming the file."""
    policy.admit(image_path, resolved)
    real = os.path.realpath(resolved)
    if real in chain:
        raise BaseImageError(
            f"{resolved}: backing file loop (it is {image_path} itself or one of its bases)"
        )
    try:
        fd = open_disk_file(resolved, backing_of=image_path)
    except OSError as e:
        raise BaseImageError(
            f"{resolved}: cannot open backing file of {image_path}: {e.strerror or e}"
        ) from e
    try:
        policy.confirm(fd, image_path, resolved)
        fmt = fmt or format_of_magic(os.pread(fd, 4, 0))
        if fmt == "raw":
            return RawFile(resolved, fd)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    try:
        image = registry.open_image(fmt, resolved, "r", _chain=chain + (real,), backing=policy)
    except BaseImageError:
        raise
    except (OSError, FvdError) as e:
        raise BaseImageError(f"{resolved}: cannot open backing file of {image_path}: {e}") from e
    try:
        policy.confirm(image.fd, image_path, resolved)
    except BaseException:
        image.close()
        raise
    return image


def data_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_data) runs of a file's [start, end): holes found with SEEK_HOLE
    and SEEK_DATA; bytes past the end of the file are a hole. Without SEEK_DATA support
    everything is data."""
    size = file_size(fd)
    pos = start
    while pos < end:
        if pos >= size:
            yield pos, end, False
            return
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            yield pos, end, True
            return
        if hole > pos:
            stop = min(hole, end)
            yield pos, stop, True
            pos = stop
            continue
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole up to the end of the file
            data = size
        stop = min(data, end)
        yield pos, stop, False
        pos = stop


def raw_extents(fd: int, offset: int, length: int) -> Iterator[Extent]:
    """Data and hole runs of a file (qemu-img map's view of a raw file: data extents at
    depth 0, holes zero). Past EOF counts as a hole."""
    for s, e, data in data_runs(fd, offset, offset + length):
        yield Extent(s, e - s, 0, True, not data, data, s if data else None)
