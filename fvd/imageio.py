"""Opening a disk image of any supported format (fvd, qcow2, raw) by name or by probe.

`fvd convert` and the command line (`-f fvd|qcow2|raw`) use this: fvd and qcow2 files
are recognised by their magic; a file with neither is raw, but only when no format was
given for a top-level image (a base is never probed as raw by fvd itself).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

import numpy as np

from fvd import qcow2
from fvd.errors import ChainError, ReadOnlyImageError, WrongFormatError
from fvd.fileio import (
    AnyPolicy,
    detect_format,
    full_pwrite,
    open_disk_file,
    pread_fill,
    punch_hole,
    raw_extents,
)
from fvd.image import Image
from fvd.ondisk import format as fmt
from fvd.qcow2 import Qcow2Image
from fvd.types import Closing, Extent, StrPath, extents_to_array

if TYPE_CHECKING:
    from typing_extensions import Buffer

FORMATS = ("fvd", "qcow2", "raw")
QCOW2_MAGIC = b"QFI\xfb"
FVD_MAGIC = fmt.MAGIC_BYTES


def probe(path: StrPath) -> str:
    """'fvd' or 'qcow2' by magic, else 'raw'. Raises OSError for unreadable paths and
    for anything but a regular file or a block device (never blocks on a FIFO)."""
    return detect_format(path)


def resolve_format(path: StrPath, given: Optional[str] = None) -> str:
    """The format to open `path` with: the one given (checked against the magic), or the
    probed one. A raw file asked for as fvd/qcow2 (or the other way round) is an error
    that says what the file looks like."""
    if given is not None and given not in FORMATS:
        raise ValueError(f"unknown format {given!r} (use one of {', '.join(FORMATS)})")
    seen = probe(path)
    if given is None or given == seen or given == "raw":
        return given or seen
    if seen == "raw":
        raise WrongFormatError(
            f"{path}: not a {given} image (no {given} magic; use -f raw for a raw file)"
        )
    article = "an" if seen == "fvd" else "a"
    raise WrongFormatError(f"{path}: is {article} {seen} image; use -f {seen}")


def open_image(
    path: StrPath,
    format: Optional[str] = None,
    mode: str = "r",
    *,
    force_share: bool = False,
    backing: AnyPolicy = "any",
) -> AnyImage:
    """An open image of the given (or probed) format: fvd.Image, fvd.qcow2.Qcow2Image
    or RawImage. All have size, read, readinto, extents, close. A file given as "raw"
    is raw whatever its magic; `backing` is the backing policy of its chain."""
    path = os.fspath(path)
    f = resolve_format(path, format)
    if f == "fvd":
        return Image(path, mode, force_share=force_share, backing=backing)
    if f == "qcow2":
        return qcow2.open(path, mode, backing=backing)
    return RawImage(path, mode)


class RawImage(Closing):
    """A raw file seen as an image: size is the file size."""

    format = "raw"
    base: Optional[str] = None

    def __init__(self, path: StrPath, mode: str = "r") -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        self.path = os.fspath(path)
        self.read_only = mode == "r"
        self._fd = open_disk_file(self.path, not self.read_only)
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def extents_array(self, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """extents() as an EXTENT_DTYPE array (fvd.types)."""
        return extents_to_array(self.extents(offset, length))

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: I/O on a closed image")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"{self.path}: I/O range [{offset}, {offset + length}) outside "
                f"the image (size {self.size})"
            )

    def readinto(self, offset: int, buf: Buffer) -> int:
        mv = memoryview(buf).cast("B")
        self._check_range(offset, len(mv))
        return pread_fill(self._fd, mv, offset)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: Buffer) -> int:
        """Write at offset (inside the file's size); returns the byte count."""
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        if self.read_only:
            raise ReadOnlyImageError(self.path)
        full_pwrite(self._fd, mv, offset)
        return len(mv)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros (a hole where the file system can punch one)."""
        self._check_range(offset, length)
        if self.read_only:
            raise ReadOnlyImageError(self.path)
        punch_hole(self._fd, offset, length)

    def resize(self, size: int, *, shrink: bool = False) -> None:
        """Truncate or extend the file; a shrink needs shrink=True and refuses to cut
        bytes that are not zeros."""
        self._check_open()
        if self.read_only:
            raise ReadOnlyImageError(self.path)
        if size < self.size:
            if not shrink:
                raise ChainError(f"{self.path}: shrinking needs shrink=True (--shrink)")
            self._refuse_cut(size)
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)
        self.size = size

    def _refuse_cut(self, size: int) -> None:
        buf = bytearray(1 << 20)
        for e in self.extents(size, self.size - size):
            for pos in range(e.start, e.start + e.length if e.data else e.start, len(buf)):
                mv = memoryview(buf)[: min(len(buf), e.start + e.length - pos)]
                self.readinto(pos, mv)
                if np.frombuffer(mv, dtype=np.uint8).any():
                    raise ChainError(
                        f"{self.path}: data at offset {pos} or after lies past the new size "
                        f"{size}; shrinking would lose it"
                    )

    def flush(self) -> None:
        if not self.read_only:
            os.fsync(self._fd)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        return raw_extents(self._fd, offset, length)

    def info(self) -> dict[str, Any]:
        st = os.fstat(self._fd)
        return {
            "filename": self.path,
            "format": "raw",
            "virtual-size": self.size,
            "actual-size": st.st_blocks * 512,
            "dirty-flag": False,
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


# What `open_image` returns: all have path, size, read, readinto, extents, info, close.
AnyImage = Union[Image, Qcow2Image, RawImage]
