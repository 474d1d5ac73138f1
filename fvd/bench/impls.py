"""Benchmark contenders: one adapter per implementation, all with the same surface.

Every adapter has write / readinto / flush / close / stats (and create_snapshot /
delete_snapshot where the format has them). `fvd.bench.workloads` drives them; the
`fvd bench` command and the pytest-benchmark suite in bench/ both use these.

Implementations that are not there yet (fvd.qcow2, FVD snapshots) are reported as
unavailable with a reason, never as a crash.
"""

from __future__ import annotations

import os
import shutil
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Protocol

import fvd
from fvd import _impl, qcow2

if TYPE_CHECKING:
    from typing_extensions import Buffer


class Handle(Protocol):
    """An open image of a contender: `fvd.Image`, `fvd.qcow2.Qcow2Image`, `RawFile`."""

    @property
    def stats(self) -> Any: ...  # fvd._impl Stats, or an object with the same counters

    def write(self, offset: int, data: Any) -> int: ...

    def readinto(self, offset: int, buffer: Any) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def create_snapshot(self, name: str) -> object: ...

    def delete_snapshot(self, name: str) -> object: ...


class Unavailable(Exception):
    """This contender cannot run this workload (missing module, missing tool...)."""


class RawFile:
    """A plain (sparse) file through os.pwrite / os.preadv / os.fdatasync."""

    def __init__(self, path: str, cache: str) -> None:
        self._fd = os.open(path, os.O_RDWR)
        self._writethrough = cache == "writethrough"
        self.stats = _impl.new_stats()  # the same counters as img.stats
        self.size = os.fstat(self._fd).st_size

    def write(self, offset: int, data: Buffer) -> int:
        n = os.pwrite(self._fd, data, offset)
        st = self.stats
        st.data_writes += 1
        st.data_bytes_written += n
        if self._writethrough:
            os.fdatasync(self._fd)
            st.flushes += 1
        return n

    def readinto(self, offset: int, buf: Buffer) -> int:
        n = os.preadv(self._fd, [buf], offset)
        st = self.stats
        st.data_reads += 1
        st.data_bytes_read += n
        return n

    def flush(self) -> None:
        os.fdatasync(self._fd)
        self.stats.flushes += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def create_snapshot(self, name: str) -> NoReturn:
        raise Unavailable("raw files have no snapshots")

    delete_snapshot = create_snapshot


class Contender:
    """One implementation: how to create an image and open it with a cache mode."""

    name = ""
    label = ""
    python = False  # runs in this process (False: QEMU via subprocess)
    only_rows: Optional[tuple[str, ...]] = None  # row key prefixes it runs (None: all)

    def available(self) -> Optional[str]:
        """None when usable, otherwise the reason it is not."""
        return None

    def create(self, path: str, size: int) -> None:
        raise NotImplementedError

    def open(self, path: str, cache: str) -> Handle:
        raise NotImplementedError

    def open_read_only(self, path: str) -> Handle:
        return self.open(path, "writeback")


class FvdContender(Contender):
    python = True

    def __init__(self, implementation: str = "cython") -> None:
        self.implementation = implementation
        self.name = "fvd" if implementation == "cython" else "fvd-py"
        self.label = f"FVD ({implementation})"

    def available(self) -> Optional[str]:
        if self.implementation not in _impl.MODULES:
            return f"the {self.implementation} fast path is not built"
        return None

    def _select(self) -> None:
        _impl.select(self.implementation)

    def create(self, path: str, size: int) -> None:

        fvd.create(path, size, overwrite=True)

    def open(self, path: str, cache: str) -> Handle:

        self._select()
        return fvd.open(path, "r+", cache=cache)

    def open_read_only(self, path: str) -> Handle:

        self._select()
        return fvd.open(path, "r")


def qcow2_module() -> ModuleType:
    """fvd.qcow2 (the baseline contender)."""
    return qcow2


class TablelessContender(FvdContender):
    """fvd with table=False (fvd.core.tableless): the host file system allocates."""

    only_rows = ("alloc4k-wt",)  # the target row: later rounds measure only target rows

    def __init__(self) -> None:
        super().__init__("cython")
        self.name = "fvd-tableless"
        self.label = "FVD table-less (cython)"

    def create(self, path: str, size: int) -> None:
        fvd.create(path, size, overwrite=True, table=False)


class Qcow2Contender(Contender):
    python = True

    def __init__(self, lazy: bool) -> None:
        self.lazy = lazy
        self.name = "qcow2-lazy" if lazy else "qcow2"
        self.label = "qcow2 baseline" + (" (lazy refcounts)" if lazy else "")

    def available(self) -> Optional[str]:
        try:
            qcow2_module()
        except Unavailable as e:
            return str(e)
        return None

    def create(self, path: str, size: int) -> None:
        qcow2_module().create(
            path, size, cluster_size=65536, lazy_refcounts=self.lazy, overwrite=True
        )

    def open(self, path: str, cache: str) -> Handle:
        handle: Handle = qcow2_module().open(path, "r+", cache=cache)
        return handle

    def open_read_only(self, path: str) -> Handle:
        handle: Handle = qcow2_module().open(path, "r")
        return handle


class RawContender(Contender):
    name = "raw"
    label = "raw file (pwrite/preadv)"
    python = True

    def create(self, path: str, size: int) -> None:
        with open(path, "wb") as f:
            f.truncate(size)

    def open(self, path: str, cache: str) -> Handle:
        return RawFile(path, cache)


class QemuContender(Contender):
    """QEMU itself on a real qcow2 or raw file: `qemu-img bench` where the workload's
    offsets have a fixed step, else qemu-io (see fvd.bench.qemu)."""

    python = False

    def __init__(self, fmt: str, lazy: bool = False) -> None:
        self.fmt = fmt
        self.lazy = lazy
        self.name = "qemu-" + fmt + ("-lazy" if lazy else "")
        self.label = f"QEMU {fmt}" + (" lazy_refcounts" if lazy else "")

    def available(self) -> Optional[str]:
        for tool in ("qemu-io", "qemu-img"):
            if shutil.which(tool) is None:
                return f"{tool} is not on PATH"
        return None


ALL: list[Contender] = [
    FvdContender("cython"),
    FvdContender("python"),
    TablelessContender(),
    Qcow2Contender(False),
    Qcow2Contender(True),
    RawContender(),
    QemuContender("qcow2"),
    QemuContender("qcow2", lazy=True),
    QemuContender("raw"),
]
BY_NAME = {c.name: c for c in ALL}
NAMES = [c.name for c in ALL]
