"""The interfaces between the image core and what sits on it (the `fvd.core` layer of
docs/architecture.md, under `fvd.features`).

The core calls its features only through these methods (features install themselves in
the core's slots `base_layer`, `bitmap`, `snapshot_state`, `partial` while it opens), and
the operations of `fvd.ops` read an image or a snapshot view only through `MappedDisk`.
Nothing here imports a feature: the dependency points down. The hooks are typed against
`fvd.core.image.ImageCore`, imported for the type checker only (no import at run time:
the core imports this module).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple, Optional, Protocol

import numpy as np
import numpy.typing as npt

from fvd.ondisk.fvd_records import ImageHeader
from fvd.types import CheckResult, Extent

if TYPE_CHECKING:
    from fvd.core.bitmap import Bitmap
    from fvd.core.image import ImageCore

Record = bytes  # a packed journal record (fvd.core.journal)
Table = npt.NDArray[np.uint32]  # virtual chunk -> physical chunk / UNALLOCATED / ZERO_CHUNK
Mask = npt.NDArray[np.bool_]  # one flag per physical chunk


class MappedDisk(Protocol):
    """What the read-side operations need: a lookup table over a data area, and where
    unallocated chunks read from. `fvd.core.image.ImageCore` and
    `fvd.features.snapshots.SnapshotView` implement it."""

    path: str
    size: int
    chunk_size: int
    block_size: int
    fd: int
    header: ImageHeader  # data_offset, the table encoding (a view: only those)
    table: Table
    base_layer: Optional[BaseHook]
    bitmap: Optional[Bitmap]  # of a base image
    partial: Optional[PartialHook]
    closed: bool

    @property
    def snapshot_state(self) -> Optional[SnapshotHook]:  # the image's (a view's too)
        ...

    @property
    def lock(self) -> AbstractContextManager[Any]:  # held: table, bits, partial stay still
        ...

    def check_open(self) -> None: ...

    def readinto(self, offset: int, buffer: Any) -> int: ...


class BaseHook(Protocol):
    """A base image under the core (fvd.features.base.BaseLayer)."""

    fast_read: bool  # the fast path reads the base itself (raw base)

    def attach_map(self) -> None: ...

    def readinto(self, offset: int, buffer: Any) -> int: ...

    def write(self, offset: int, data: memoryview) -> int: ...

    def zero_bits(self, first: int, last: int) -> list[Record]: ...

    # fvd.ops.extents: extents of a run the table maps to `host`, or leaves unallocated
    def segments_in_chunk(self, start: int, stop: int, host: int) -> Iterator[Extent]: ...

    def segments_below(self, start: int, stop: int) -> Iterator[Extent]: ...

    def before_close(self) -> None: ...

    def close(self) -> None: ...


class SnapshotHook(Protocol):
    """Internal snapshots (fvd.features.snapshots.SnapshotState)."""

    entries: list[Any]  # fvd.features.snapshots.Entry, in id order (fvd.ops.info)

    def has_snapshots(self) -> bool: ...

    def meta_mask(self, nphys: int) -> Mask: ...

    def mark_used(self, used: Mask) -> Mask: ...

    def copy_chunk(
        self, img: ImageCore, v: int, source: int, new: int, offset: int, length: int
    ) -> Iterable[Record]: ...

    def check(self, img: ImageCore, result: CheckResult, repair: bool) -> None: ...


class PartialChunks(NamedTuple):
    """Partial chunks (docs/format.md section 10), of the front or a snapshot's granule
    record: the virtual chunks (int64, sorted), their source chunks (uint32), their
    granule bit rows (uint8, ceil(gpc / 8) bytes each, granule g = bit g % 8 of byte
    g // 8); and provenance, None when not known: per chunk, the chunk its carried
    granules were copied from (uint32, 0xFFFFFFFF: none) and their rows."""

    chunks: np.ndarray
    sources: np.ndarray
    rows: np.ndarray
    origins: Optional[np.ndarray] = None
    carried: Optional[np.ndarray] = None


class PartialHook(Protocol):
    """Partly copied chunks after snapshots (fvd.features.granular.PartialState)."""

    active: int
    gpc: int  # granules per chunk
    map_provenance: bool  # the on-disk partial map has a provenance section

    def install(self, chunk_map: Any, quiesce: Callable[[], None]) -> None: ...

    def validate(self, img: ImageCore) -> None: ...

    def takes(self, img: ImageCore, offset: int, length: int) -> bool: ...

    def write(self, img: ImageCore, offset: int, data: memoryview) -> int: ...

    def forget(self, start: int, count: int) -> None: ...

    # fvd.ops.extents: the slot of a partial virtual chunk, and its (start, end, host) runs
    def slot_of(self, v: int) -> Optional[int]: ...

    def host_runs(
        self, k: int, entry: int, start: int, stop: int, chunk_start: int, data_offset: int
    ) -> Iterator[tuple[int, int, int]]: ...

    def replay(self, table: Table, start: int, count: int, payload: tuple[int, int]) -> None: ...

    # fvd.ops.changed: a copy of the partial chunks (the image lock held)
    def partial_chunks(self) -> PartialChunks: ...

    def mark_used(self, used: Mask) -> Mask: ...

    def drop(self, v: int) -> Optional[int]: ...

    def write_map(self, img: ImageCore) -> None: ...

    def after_checkpoint(self, img: ImageCore) -> None: ...


Attach = Callable[["ImageCore", tuple[str, ...], bool], None]  # attach(core, chain, copy_on_read)
