"""The exceptions fvd raises on purpose. Every one derives from FvdError."""

import errno
import os
from typing import Optional


class FvdError(Exception):
    """Base class of every error the library raises on purpose."""


class CorruptImageError(FvdError):
    """The file is not a valid image; the message names the file and the offset."""

    def __init__(self, path: object, offset: Optional[int], what: str) -> None:
        self.path = str(path)
        self.offset = offset
        self.what = what
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{self.path}: corrupt image{where}: {what}")


class ImageLockedError(FvdError):
    """Another open handle holds the image for writing."""


class UnsupportedFeatureError(FvdError):
    """The image uses a version or incompatible feature this code does not know."""


class BaseImageError(FvdError):
    """The base image is missing, unreadable, of the wrong size, or forms a loop."""


class ImageIOError(FvdError, OSError):
    """An I/O error of the host file (disk full, file too large, EIO...): names the file,
    what failed and why; ``errno`` is the host's error number."""

    def __init__(self, path: object, err: int, what: str) -> None:
        OSError.__init__(self, err, f"{what}: {os.strerror(err)}", str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def io_error(path: object, exc: BaseException, what: str) -> BaseException:
    """`exc` (an OSError) as an ImageIOError naming `path`; FvdErrors pass unchanged."""
    if isinstance(exc, FvdError) or not isinstance(exc, OSError) or exc.errno is None:
        return exc
    if exc.errno == errno.ENOSPC and exc.strerror and exc.strerror != os.strerror(exc.errno):
        what = f"{what} ({exc.strerror})"  # which space ran out: "block device full (...)"
    return ImageIOError(path, exc.errno, what)


class ReadOnlyImageError(FvdError, OSError):
    """A write on an image opened read-only."""

    def __init__(self, path: object) -> None:
        OSError.__init__(self, errno.EBADF, "image is open read-only", str(path))


class SnapshotNotFoundError(FvdError, KeyError):
    """No snapshot of that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SnapshotBusyError(FvdError):
    """The snapshot cannot be deleted while a view of it (open_snapshot) is open."""


class RefcountOverflowError(FvdError):
    """A chunk would be held by more than 65535 snapshots."""


class ServeError(FvdError):
    """nbdkit or its Python plugin is missing or cannot serve the image."""


class ControlError(FvdError):
    """The control socket of `fvd serve` refused a command or cannot be reached;
    `error_class` is the protocol's error class (docs/nbd.md), e.g. "CommandNotFound"."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class BackupChainError(FvdError):
    """An incremental backup's backing file does not hold the snapshot it starts from (of
    the same image): a full backup is needed (docs/format.md section 12)."""


class WrongFormatError(FvdError, ValueError):
    """The file is not an image of the format asked for (the message says what it is)."""


class ChainError(FvdError, ValueError):
    """A chain operation (commit, rebase, resize) cannot be done as asked: a shrink over
    data, an image with internal snapshots, a layout without room; the message says which."""


class TablelessError(FvdError, ValueError):
    """What needs the lookup table (snapshots, compact allocation, table-based changes of
    the layout) asked of a table-less image (created with table=False / -o table=off)."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(
            f"{path}: {what} needs the lookup table; the image was created with table=off"
        )
        self.path, self.what = path, what
