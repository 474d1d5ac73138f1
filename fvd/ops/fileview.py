"""A file-like view of an image or a snapshot view: `img.as_file()`.

An `io.RawIOBase`, so `io.BufferedReader`, `shutil.copyfileobj`, `hashlib.file_digest`
and `tarfile.addfile` work on it. The position is the view's own (several views of one
image do not share it); reads and writes go to the image's positional calls, which are
safe from any thread. Closing the view does not close the image.
"""

from __future__ import annotations

import io
import os
import threading
from typing import TYPE_CHECKING, Optional, Protocol, cast

from fvd.types import DiskView

if TYPE_CHECKING:
    from typing_extensions import Buffer


class _Flushable(Protocol):
    def flush(self) -> None: ...


class ImageFile(io.RawIOBase):
    """Raw, seekable byte stream over the virtual disk of `owner`."""

    def __init__(self, owner: DiskView) -> None:
        super().__init__()
        if owner.closed:
            raise ValueError(f"{owner.path}: I/O on a closed image")
        self._owner = owner
        self._pos = 0
        self._lock = threading.Lock()  # position updates from several threads
        self.name: Optional[str] = getattr(owner, "path", None)

    # ----- capabilities ---------------------------------------------------------------
    def readable(self) -> bool:
        self._checkClosed()
        return True

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    def writable(self) -> bool:
        self._checkClosed()
        return not self._owner.read_only

    @property
    def mode(self) -> str:
        return "rb" if self._owner.read_only else "r+b"

    # ----- position -------------------------------------------------------------------
    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        with self._lock:
            if whence == io.SEEK_SET:
                pos = offset
            elif whence == io.SEEK_CUR:
                pos = self._pos + offset
            elif whence == io.SEEK_END:
                pos = self._owner.size + offset
            else:
                raise ValueError(f"invalid whence {whence!r}")
            if pos < 0:
                raise ValueError(f"negative seek position {pos}")
            self._pos = pos
            return pos

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    # ----- I/O ------------------------------------------------------------------------
    def readinto(self, buffer: Buffer) -> int:
        self._checkClosed()
        mv = memoryview(buffer)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        with self._lock:
            pos = self._pos
            n = max(0, min(len(mv), self._owner.size - pos))
            if n:
                self._owner.readinto(pos, mv[:n])
            self._pos = pos + n
        return n

    def readall(self) -> bytes:
        self._checkClosed()
        n = max(0, self._owner.size - self._pos)
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def write(self, data: Buffer) -> int:
        self._checkClosed()
        if self._owner.read_only:
            raise io.UnsupportedOperation(f"{self.name}: image is open read-only")
        mv = memoryview(data)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        with self._lock:
            pos = self._pos
            if pos + len(mv) > self._owner.size:
                raise OSError(
                    28,
                    os.strerror(28) + f": write past the end of the image "
                    f"(size {self._owner.size})",
                    self.name,
                )
            n = self._owner.write(pos, mv)
            self._pos = pos + n
        return n

    def flush(self) -> None:
        if self.closed or self._owner.closed:
            return
        if not self._owner.read_only:
            cast(_Flushable, self._owner).flush()  # a writable owner is an fvd.Image

    def truncate(self, size: Optional[int] = None) -> int:
        raise io.UnsupportedOperation("a virtual disk has a fixed size")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("an image view has no file descriptor")

    def __repr__(self) -> str:
        return f"<fvd.ops.fileview.ImageFile {self.name!r} pos={self._pos}>"


def as_file(owner: DiskView) -> ImageFile:
    return ImageFile(owner)
