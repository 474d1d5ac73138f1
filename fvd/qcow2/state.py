"""The state the qcow2 mixins share with Qcow2Image, declared once so mypy checks it.

`Qcow2State` is the base of `RefcountMixin`, `ClusterMixin` and `SnapshotMixin`: it
declares the attributes `Qcow2Image._load` sets up and, for mypy only, the methods one
part calls on another (abstract, so mypy refuses to instantiate a Qcow2Image that lacks
one; at run time the class is empty and the mixins' own definitions are found first).
"""

from __future__ import annotations

from abc import abstractmethod
from array import array
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Iterable,
    Iterator,
    Optional,
    Protocol,
    Sequence,
    Union,
)

import numpy as np
import numpy.typing as npt

from fvd.errors import CorruptImageError
from fvd.qcow2.format import Header
from fvd.types import Extent, SnapshotInfo

if TYPE_CHECKING:
    from typing_extensions import Buffer

# L1, L2 and refcount tables: big-endian on disk ('>u8'), uint64 to numpy's types
Table = npt.NDArray[np.uint64]
RefBlock = npt.NDArray[np.uint16]  # '>u2'
# Cluster indexes as the refcount helpers take them: a list or an integer array
Clusters = Union[Sequence[int], npt.NDArray[np.integer[Any]]]
# A piece of a gathered write, as the write paths build them
Chunk = Union[bytes, bytearray, memoryview]


class Backing(Protocol):
    """A backing file as the qcow2 code reads it: a raw file (fvd.fileio.RawFile), a
    Qcow2Image or an fvd image, each opened read-only."""

    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, buf: Buffer) -> int: ...

    def extents(self, offset: int, length: int) -> Iterable[Extent]: ...

    def close(self) -> None: ...


class Qcow2State:
    """Declared attributes of an open qcow2 image (set in Qcow2Image.__init__/_load)."""

    path: str
    read_only: bool
    cache: str  # "writeback", "writethrough" or "unsafe"
    fd: int
    size: int  # virtual size in bytes
    cluster_size: int
    stats: Any  # fvd._impl Stats: the I/O counters
    _closed: bool
    _hf: Any  # fvd._impl HostFile: guest data I/O
    _header: Header
    _version: int
    _incompat: int
    _compat: int
    _lazy: bool  # lazy refcounts: refcount blocks written at close only
    _suspect: Optional[CorruptImageError] = None  # makes writing unsafe until repaired
    _backing: Optional[Backing] = None
    # geometry
    _cbits: int
    _cs: int
    _l2bits: int
    _l2mask: int
    _zeros: memoryview  # one cluster of zeros
    # file state
    _file_size: int
    _unsynced: bool  # written since the last flush
    _cow_pending: bool  # copied-on-write data not flushed yet
    # active tree and L2 cache (keyed by host offset)
    _l1: Table
    _l1_offset: int
    _l2: dict[int, Table]
    _l2_dirty: set[int]
    _fast_l2: dict[int, array[int]]  # read tables by L1 index (cluster.py)
    _fast_read: tuple[int, int, int, int, int, dict[int, array[int]], Callable[..., int]]
    # refcounts (refcount.py)
    _rt_offset: int
    _rt_clusters: int
    _reftable: Table
    _rb: dict[int, RefBlock]  # cached refcount blocks by index
    _rb_dirty: set[int]
    _deferred: list[int]  # cluster indexes freed once the L2 change is stable
    _free_idx: int
    # snapshots (snapshot.py)
    _snapshots: list[SnapshotInfo]
    _snapshots_offset: int
    _snap_table_len: int
    _snap_l1: dict[int, Table]  # snapshot L1 tables by offset

    if TYPE_CHECKING:
        # image.py
        @property
        @abstractmethod
        def closed(self) -> bool: ...
        @abstractmethod
        def flush(self) -> None: ...
        @abstractmethod
        def _meta_read(self, off: int, n: int) -> bytearray: ...
        @abstractmethod
        def _meta_write(self, off: int, data: Buffer) -> None: ...
        @abstractmethod
        def _data_readinto(self, host: int, view: memoryview) -> None: ...
        @abstractmethod
        def _data_writev(self, host: int, bufs: Sequence[Chunk]) -> None: ...
        @abstractmethod
        def _sync(self) -> None: ...
        @abstractmethod
        def _check_open(self) -> None: ...
        @abstractmethod
        def _check_writable(self) -> None: ...

        # refcount.py
        @abstractmethod
        def _refcount(self, idx: int) -> int: ...
        @abstractmethod
        def _refcounts_of(self, clusters: Clusters) -> npt.NDArray[np.int64]: ...
        @abstractmethod
        def _update_refcounts(self, clusters: Clusters, delta: int) -> None: ...
        @abstractmethod
        def _defer_free(self, host_offset: int) -> None: ...
        @abstractmethod
        def _apply_deferred(self) -> None: ...
        @abstractmethod
        def _alloc_cluster(self) -> int: ...
        @abstractmethod
        def _alloc_contiguous(self, n: int) -> int: ...
        @abstractmethod
        def _flush_refcount_cache(self) -> None: ...

        # cluster.py
        @abstractmethod
        def _l2_peek(self, off: int) -> Table: ...
        @abstractmethod
        def _l2_offset(self, l1: Table, i: int, l1_off: int) -> int: ...
        @abstractmethod
        def _read_tree(self, l1: Table, l1_off: int, offset: int, mv: memoryview) -> None: ...
        @abstractmethod
        def _flush_l2_cache(self) -> None: ...
        @abstractmethod
        def _extents(
            self,
            offset: int,
            length: int,
            l1: Optional[Table] = None,
            l1_off: Optional[int] = None,
        ) -> Iterator[Extent]: ...

        # snapshot.py
        @abstractmethod
        def _snapshot_l1(self, s: SnapshotInfo) -> Table: ...
