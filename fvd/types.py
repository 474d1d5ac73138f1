"""Result types shared by fvd images, snapshot views and the qcow2 baseline (layer 1).

One type per concept, so `fvd.Image` and `fvd.qcow2.Qcow2Image` give the same results;
and the duck types of open disks that operations take (`DiskView`, `DiskReader`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Optional, Protocol, TypeVar, Union

import numpy as np

StrPath = Union[str, "os.PathLike[str]"]  # a file name as open() takes it

_Closing = TypeVar("_Closing", bound="Closing")


class Closing:
    """`with x:` gives x and calls x.close() on the way out (images, views, clients)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Closing) -> _Closing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Extent:
    """One run of `extents()`, in the vocabulary of `qemu-img map --output=json`."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: Optional[int]  # host offset, or None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            d["offset"] = self.offset
        return d


@dataclass
class CheckResult:
    """What `check()` found (and, with repair, fixed). `ok`: nothing left to fix."""

    corruptions: int = 0
    leaks: int = 0
    leaks_fixed: int = 0
    corruptions_fixed: int = 0
    messages: list[str] = field(default_factory=list)
    copied_errors: int = 0  # qcow2: clusters whose COPIED flag disagrees with refcounts

    @property
    def ok(self) -> bool:
        return self.corruptions == 0 and self.leaks == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "leaks_fixed": self.leaks_fixed,
            "corruptions_fixed": self.corruptions_fixed,
            "ok": self.ok,
            "messages": list(self.messages or []),
        }


@dataclass
class SnapshotInfo:
    """One internal snapshot as `snapshots()` lists it (fvd: `id` is an int; qcow2: the
    id string QEMU stores; the qcow2 fields after `vm_state_size` are qcow2's own)."""

    name: str
    id: Any
    created: datetime
    size: int
    vm_state_size: int
    l1_table_offset: int = 0
    l1_size: int = 0
    vm_clock_nsec: int = 0
    date_sec: int = 0
    date_nsec: int = 0
    extra: bytes = field(default=b"", repr=False)
    # fvd: the snapshot's identity, never reused (docs/format.md section 8, "Snapshot
    # identity"); None for qcow2 and for an fvd image that has no UUID yet
    uuid: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "created": self.created.isoformat(),
            "size": self.size,
            "vm_state_size": self.vm_state_size,
            "uuid": self.uuid,
        }


@dataclass(frozen=True)
class ConvertResult:
    """What `fvd.convert` (and `fvd.commit`/`fvd.rebase`) did: bytes read from the source,
    bytes of data written to the output, data extents copied, zero ranges (known zero,
    never read), wall-clock seconds."""

    bytes_read: int
    bytes_written: int
    extents: int
    zero_ranges: int
    seconds: float


class DiskSource(Protocol):
    """An open virtual disk that `fvd.ops.checksum` reads: any format (`fvd.Image`,
    `fvd.SnapshotImage`, `fvd.qcow2.Qcow2Image` and its snapshot views, raw files)."""

    @property
    def path(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    def readinto(self, offset: int, buffer: Any) -> int: ...

    def extents_array(self, offset: int = 0, length: Optional[int] = None) -> np.ndarray: ...


class DiskView(DiskSource, Protocol):
    """An open virtual disk as `fvd.ops.fileview` sees it: `fvd.Image` and
    `fvd.SnapshotImage` (readable, and writable unless read-only)."""

    @property
    def read_only(self) -> bool: ...

    def write(self, offset: int, data: Any) -> int: ...


class DiskReader(Protocol):
    """A disk to copy from (`fvd.convert`): `fvd.Image`, `fvd.SnapshotImage`,
    `fvd.qcow2.Qcow2Image` and its snapshot views, `fvd.imageio.RawImage`."""

    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, buffer: Any) -> int: ...

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterable[Extent]: ...

    def close(self) -> None: ...


# extents_array(): one row per extent; offset -1 = none
EXTENT_DTYPE = np.dtype(
    [("start", "<u8"), ("length", "<u8"), ("flags", "<u4"), ("depth", "<u4"), ("offset", "<i8")]
)
FLAG_DATA = 1  # holds data (qemu-img map "data")
FLAG_ZERO = 2  # reads as zeros ("zero")
FLAG_PRESENT = 4  # the chain holds it ("present"); not set for unallocated ranges


def extents_to_array(extents: Iterable[Extent]) -> np.ndarray:
    """Extents as an EXTENT_DTYPE array (images whose extents are not tables: qcow2, raw)."""
    rows = [
        (
            e.start,
            e.length,
            (FLAG_DATA if e.data else 0)
            | (FLAG_ZERO if e.zero else 0)
            | (FLAG_PRESENT if e.present else 0),
            e.depth,
            -1 if e.offset is None else e.offset,
        )
        for e in extents
    ]
    return np.array(rows, dtype=EXTENT_DTYPE)
