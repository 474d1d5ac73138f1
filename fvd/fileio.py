"""File-level helpers used at open, close and free time (never per guest I/O)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from typing import TYPE_CHECKING, Iterator

from fvd.errors import ImageLockedError
from fvd.nbd_client import is_nbd_uri
from fvd.ondisk import format as fmt
from fvd.types import Extent, StrPath

if TYPE_CHECKING:
    from typing_extensions import Buffer

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make the range read as zeros and free its blocks; writes zeros where unsupported."""
    if length <= 0:
        return
    rc = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    end = min(offset + length, os.fstat(fd).st_size)
    zeros = bytes(1 << 20)
    while offset < end:
        n = min(len(zeros), end - offset)
        os.pwrite(fd, zeros[:n], offset)
        offset += n


def full_pwrite(fd: int, data: Buffer, offset: int) -> None:
    """pwrite all of `data`: a short write is continued, never silently dropped."""
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        n = os.pwrite(fd, mv[done:], offset + done)
        if n == 0:
            raise OSError(errno.EIO, "write made no progress")
        done += n


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
    """'fvd' or 'qcow2' by magic, else 'raw' (used only when no format is given)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == FVD_MAGIC:
        return "fvd"
    if magic == QCOW2_MAGIC:
        return "qcow2"
    return "raw"


def data_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_data) runs of a file's [start, end): holes found with SEEK_HOLE
    and SEEK_DATA; bytes past the end of the file are a hole. Without SEEK_DATA support
    everything is data."""
    size = os.fstat(fd).st_size
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
