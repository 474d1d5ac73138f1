"""The QCOW2 baseline: real qcow2 version 3 files with refcount-on-write allocation.

`fvd.qcow2.create()` and `fvd.qcow2.open()` give a `Qcow2Image` with the same I/O,
snapshot, extents and check API as `fvd.Image` (docs/qcow2-baseline.md). Modules:
`format` (on-disk records), `cluster` (L1/L2 lookup and allocation), `refcount`
(refcount table and blocks), `snapshot` (internal snapshots), `image` (the open image),
`state` (the attributes and methods those parts share, declared for mypy), `chainmap`
(the map of a whole chain in numpy), `fresh` (a new file written in one pass by
`fvd convert`).
"""

from fvd.qcow2.image import BACKING_FORMATS, Qcow2Image, create, open, set_backing
from fvd.types import Extent

__all__ = ["BACKING_FORMATS", "Extent", "Qcow2Image", "create", "open", "set_backing"]
