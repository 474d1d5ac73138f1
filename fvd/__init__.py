"""fvd: the FVD ("Fast Virtual Disk") copy-on-write image format.

import fvd
fvd.create("disk.fvd", 8 << 30)
with fvd.open("disk.fvd", "r+") as img:
    img.write(0, b"hello")
"""

from . import _impl
from .convert import convert
from .errors import (
    BaseImageError,
    CorruptImageError,
    FvdError,
    ImageIOError,
    ImageLockedError,
    UnsupportedFeatureError,
)
from .image import CheckResult, Extent, Image, ReadOnlyImageError, create, open

__version__ = "0.1.0"


def __getattr__(name):
    # IMPLEMENTATION follows fvd._impl.select() so tests can switch it.
    if name == "IMPLEMENTATION":
        return _impl.IMPLEMENTATION
    raise AttributeError(f"module 'fvd' has no attribute {name!r}")


__all__ = [
    "create",
    "open",
    "Image",
    "Extent",
    "CheckResult",
    "IMPLEMENTATION",
    "FvdError",
    "CorruptImageError",
    "ImageLockedError",
    "UnsupportedFeatureError",
    "BaseImageError",
    "ReadOnlyImageError",
    "ImageIOError",
    "convert",
]
