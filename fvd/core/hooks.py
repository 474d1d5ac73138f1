"""The interfaces between the image core and what sits on it (the `fvd.core` layer of
docs/architecture.md, under `fvd.features`).

The core calls its features only through these methods (features install themselves in
the core's slots `base_layer`, `bitmap`, `snapshot_state`, `partial` while it opens), and
the operations of `fvd.ops` read an image or a snapshot view only through `MappedDisk`.
Nothing here imports a feature: the dependency points down.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Protocol

import numpy as np

from fvd.types import CheckResult, Extent

Record = Any  # a packed journal record (fvd.core.journal)


class MappedDisk(Protocol):
    """What the read-side operations need: a lookup table over a data area, and where
    unallocated chunks read from. `fvd.core.image.ImageCore` and
    `fvd.features.snapshots.SnapshotView` implement it."""

    path: str
    size: int
    chunk_size: int
    block_size: int
    fd: int
    header: dict[str, Any]  # at least "data_offset"
    table: np.ndarray  # virtual chunk -> physical chunk / UNALLOCATED / ZERO_CHUNK
    base_layer: Optional[BaseHook]
    bitmap: Any  # fvd.core.bitmap.Bitmap of a base image, or None
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

    def meta_mask(self, nphys: int) -> np.ndarray: ...

    def mark_used(self, used: np.ndarray) -> np.ndarray: ...

    def copy_chunk(
        self, img: Any, v: int, source: int, new: int, offset: int, length: int
    ) -> Iterable[Record]: ...

    def check(self, img: Any, result: CheckResult, repair: bool) -> None: ...


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

    def validate(self, img: Any) -> None: ...

    def takes(self, img: Any, offset: int, length: int) -> bool: ...

    def write(self, img: Any, offset: int, data: memoryview) -> int: ...

    def forget(self, start: int, count: int) -> None: ...

    # fvd.ops.extents: the slot of a partial virtual chunk, and its (start, end, host) runs
    def slot_of(self, v: int) -> Optional[int]: ...

    def host_runs(
        self, k: int, entry: int, start: int, stop: int, chunk_start: int, data_offset: int
    ) -> Iterator[tuple[int, int, int]]: ...

    def replay(self, table: np.ndarray, start: int, count: int, payload: Any) -> None: ...

    # fvd.ops.changed: a copy of the partial chunks (the image lock held)
    def partial_chunks(self) -> PartialChunks: ...

    def mark_used(self, used: np.ndarray) -> np.ndarray: ...

    def drop(self, v: int) -> Optional[int]: ...

    def write_map(self, img: Any) -> None: ...

    def after_checkpoint(self, img: Any) -> None: ...


Attach = Callable[[Any, tuple[str, ...], bool], None]  # attach(core, chain, copy_on_read)
