"""Types of the compiled fast path (fvd/_fastpath.pyx). fvd/_purepath.py is its twin with
the same names and signatures; tests/native/test_impl_parity.py checks all three agree."""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from _typeshed import ReadableBuffer, WriteableBuffer
from typing_extensions import disjoint_base

__all__ = ["STAT_FIELDS", "Stats", "ChunkMap", "HostFile", "held_mask"]

STAT_FIELDS: tuple[str, ...]

# owner-supplied factory for I/O errors: factory(errno, what) -> exception
_ErrorFactory = Callable[[int, str], BaseException]

@disjoint_base  # a cdef class: no multiple inheritance with another
class Stats:
    """Exact I/O counters since open."""

    data_reads: int
    data_bytes_read: int
    data_writes: int
    data_bytes_written: int
    metadata_reads: int
    metadata_bytes_read: int
    metadata_writes: int
    metadata_bytes_written: int
    flushes: int
    journal_records: int
    refcount_updates: int
    base_reads: int
    base_bytes_read: int
    def __init__(self) -> None: ...
    def as_dict(self) -> dict[str, int]: ...

@disjoint_base
class ChunkMap:
    """Translates virtual offsets through the one-level table and does the data I/O."""

    fd: int
    table: npt.NDArray[np.uint32]
    frozen: npt.NDArray[np.uint8]
    stats: Stats
    chunk_size: int
    data_offset: int
    size: int
    fresh: npt.NDArray[np.uint8] | None
    stale: npt.NDArray[np.uint8] | None
    block_size: int
    bend: int
    base_fd: int
    partial: tuple[Any, Any, Any]
    epoch: int
    closed: bool
    error: _ErrorFactory | None
    def __init__(
        self,
        fd: int,
        table: npt.NDArray[np.uint32],
        frozen: npt.NDArray[np.uint8],
        chunk_size: int,
        data_offset: int,
        size: int,
        stats: Stats,
    ) -> None: ...
    @property
    def base_users(self) -> int: ...
    @property
    def users_in_flight(self) -> int: ...
    def enter(self) -> int: ...
    def leave(self, token: int) -> None: ...
    def try_advance(self) -> bool: ...
    def set_partial(
        self,
        slot: npt.NDArray[np.uint32] | None,
        src: npt.NDArray[np.uint32] | None,
        bits: npt.NDArray[np.uint8] | None,
        granule_size: int,
        wbits: npt.NDArray[np.uint8] | None = None,
    ) -> None: ...
    def set_base(
        self,
        fresh: npt.NDArray[np.uint8] | None,
        stale: npt.NDArray[np.uint8] | None,
        block_size: int,
        bend: int,
        base_fd: int = -1,
    ) -> None: ...
    def set_table(self, table: npt.NDArray[np.uint32]) -> None: ...
    def set_frozen(self, frozen: npt.NDArray[np.uint8]) -> None: ...
    def readinto(self, offset: int, buf: WriteableBuffer) -> int: ...
    def writable(self, offset: int, length: int) -> bool: ...
    def write(self, offset: int, data: ReadableBuffer) -> int: ...
    def host_offset(self, offset: int) -> int: ...
    def pwritev(self, host_offset: int, buffers: Sequence[ReadableBuffer]) -> int: ...
    def pread_host(self, host_offset: int, buf: WriteableBuffer) -> int: ...
    def translate(self, vchunks: npt.NDArray[np.int64], out: npt.NDArray[np.int64]) -> int: ...

@disjoint_base
class HostFile:
    """Data I/O at host offsets with exact accounting (FVD chunk map and QCOW2 baseline)."""

    fd: int
    stats: Stats
    def __init__(self, fd: int, stats: Stats) -> None: ...
    def readinto(self, host_offset: int, buf: WriteableBuffer, limit: int = -1) -> int: ...
    def pwritev(self, host_offset: int, buffers: Sequence[ReadableBuffer]) -> int: ...

def held_mask(
    table: npt.NDArray[np.uint32], n: int, cap: int = -1
) -> tuple[npt.NDArray[np.uint8] | None, int]: ...
