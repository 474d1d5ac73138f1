"""fvd: the FVD ("Fast Virtual Disk") copy-on-write image format::

    import fvd
    fvd.create("disk.fvd", 8 << 30)
    with fvd.open("disk.fvd", "r+") as img:
        img.write(0, b"hello")

Layers (docs/architecture.md): errors/units/types -> on-disk records and the native fast
path -> image core and fvd.qcow2 -> features -> operations -> the Image facade -> convert
-> CLI, bench, serve.
"""

from fvd import _impl
from fvd import qcow2 as qcow2
from fvd.backupinfo import BackupInfo, backup_info, check_backup_chain, verify_backup_chain
from fvd.chain import commit, compare, measure, rebase
from fvd.control import ControlClient, connect
from fvd.convert import convert, convert_served
from fvd.errors import (
    BackupChainError,
    BaseImageError,
    ChainError,
    ControlError,
    CorruptImageError,
    FvdError,
    ImageIOError,
    ImageLockedError,
    ReadOnlyImageError,
    RefcountOverflowError,
    ServeError,
    SnapshotBusyError,
    SnapshotNotFoundError,
    TablelessError,
    UnsupportedFeatureError,
    WrongFormatError,
)
from fvd.image import Image, SnapshotImage, create, open
from fvd.types import CheckResult, ConvertResult, Extent, SnapshotInfo

__version__ = "0.1.0"


def __getattr__(name: str) -> str:
    # IMPLEMENTATION follows fvd._impl.select() so tests can switch it.
    if name == "IMPLEMENTATION":
        return _impl.IMPLEMENTATION
    raise AttributeError(f"module 'fvd' has no attribute {name!r}")


__all__ = [
    "create",
    "open",
    "convert",
    "connect",
    "convert_served",
    "ControlClient",
    "commit",
    "rebase",
    "compare",
    "measure",
    "ConvertResult",
    "ChainError",
    "backup_info",
    "check_backup_chain",
    "verify_backup_chain",
    "BackupInfo",
    "BackupChainError",
    "TablelessError",
    "Image",
    "SnapshotImage",
    "Extent",
    "CheckResult",
    "ConvertResult",
    "SnapshotInfo",
    "IMPLEMENTATION",
    "FvdError",
    "CorruptImageError",
    "ImageLockedError",
    "UnsupportedFeatureError",
    "BaseImageError",
    "ReadOnlyImageError",
    "ImageIOError",
    "SnapshotNotFoundError",
    "SnapshotBusyError",
    "RefcountOverflowError",
    "ServeError",
    "WrongFormatError",
    "ControlError",
]
