"""Backup data path rows of `fvd bench` (and bench/test_backup_bench.py):

* changed extents between two snapshots of a fully allocated image (1 TiB, 1 MiB chunks,
  10% of the chunks rewritten between the snapshots; --quick: 16 GiB);
* extents of a 16 TiB sparse image with 1,000 extents (--quick: 1 TiB);
* checksum throughput beside ovirt-imageio's `client.checksum()` of the same data as a
  raw file (ovirt-imageio reads it through qemu-nbd).

The fully allocated image takes a minute or two to build (one 1-byte write per chunk, so
the file stays sparse: about 4 KiB of disk per chunk). It is built once and kept in a
cache directory (FVD_BENCH_CACHE, default $TMPDIR/fvd-bench-cache) for later runs.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from typing import Callable, Optional, Sequence

import numpy as np

from fvd.bench.workloads import Result
from fvd.errors import FvdError
from fvd.image import Image, create
from fvd.image import open as open_image
from fvd.ops.changed import Geometry, Partial, State, compare
from fvd.units import GiB, KiB, MiB, TiB

CACHE_VERSION = 1

Show = Optional[Callable[[str], None]]  # progress messages


def cache_dir() -> str:
    d = os.environ.get("FVD_BENCH_CACHE") or os.path.join(tempfile.gettempdir(), "fvd-bench-cache")
    os.makedirs(d, exist_ok=True)
    return d


def _median_ms(
    fn: Callable[[], object], repeat: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median ms of `repeat` calls, by wall time or another clock."""
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) * 1e3


def _median_cpu_ms(fn: Callable[[], object], repeat: int) -> float:
    """CPU time of this process (less sensitive than wall time to a busy machine)."""
    return _median_ms(fn, repeat, time.process_time)


# ----- changed extents ------------------------------------------------------------------
def _cached_pair(path: str) -> bool:
    """True when `path` is a cached image with snapshots s1 and s2; a damaged entry, and
    a leftover `.building` file, are removed so the caller builds it again."""
    if os.path.exists(path + ".building"):
        os.unlink(path + ".building")
    if os.path.exists(path):
        try:
            with open_image(path) as img:
                if [s.name for s in img.snapshots()] == ["s1", "s2"]:
                    return True
        except (FvdError, OSError):
            pass
        os.unlink(path)
    return False


def _pair_image(
    path: str,
    size: int,
    chunk_size: int,
    rewrite: Callable[[Image, int], None],
    progress: Show = None,
) -> str:
    """The cached image `path`, built when missing: every chunk allocated (one 1-byte
    write each), snapshot s1, `rewrite(img, chunks)`, snapshot s2."""
    if _cached_pair(path):
        return path
    tmp = path + ".building"
    n = size // chunk_size
    create(tmp, size, chunk_size=chunk_size)
    with open_image(tmp, "r+") as img:  # writeback: flushed every 16384 chunks
        for v in range(n):
            img.write(v * chunk_size, b"\x01")
            if v % 16384 == 16383:  # bounded dirty data per flush
                img.flush()
                if progress and v % 65536 == 65535:
                    progress(f"building {path}: {v + 1}/{n} chunks")
        img.create_snapshot("s1")
        rewrite(img, n)
        img.create_snapshot("s2")
    os.rename(tmp, path)
    return path


def changed_image(
    size: int, chunk_size: int = MiB, fraction: float = 0.1, progress: Show = None
) -> str:
    """An image whose every chunk is allocated, snapshot s1, `fraction` of the chunks
    rewritten (each gets a new physical chunk), snapshot s2. Cached across runs."""
    path = os.path.join(cache_dir(), f"changed-v{CACHE_VERSION}-{size}-{chunk_size}-{fraction}.fvd")

    def rewrite(img: Image, n: int) -> None:
        # a rewrite that does not copy the old chunk: unmap it, then write (new chunk)
        for v in sorted(random.Random(1).sample(range(n), int(n * fraction))):
            img.write_zeroes(v * chunk_size, chunk_size)
            img.write(v * chunk_size, b"\x02")

    return _pair_image(path, size, chunk_size, rewrite, progress)


def granule_image(
    size: int, chunk_size: int = MiB, fraction: float = 0.1, granules: int = 4
) -> str:
    """As changed_image, but the rewrites between s1 and s2 are `granules` random 4 KiB
    writes into `fraction` of the chunks (partial chunks: s2 gets a granule record).
    Cached across runs. s2 holds the partial chunks as they are (nothing is copied), so
    the rewrites add only `granules` * 4 KiB per rewritten chunk."""
    name = f"granules-v{CACHE_VERSION}-{size}-{chunk_size}-{fraction}-{granules}.fvd"

    def rewrite(img: Image, n: int) -> None:
        rng = random.Random(3)
        gpc = chunk_size // (4 * KiB)
        for i, v in enumerate(sorted(rng.sample(range(n), int(n * fraction)))):
            for g in rng.sample(range(gpc), granules):
                img.write(v * chunk_size + g * 4 * KiB, b"\x02" * (4 * KiB))
            if i % 4096 == 4095:
                img.flush()

    path = os.path.join(cache_dir(), name)
    return _pair_image(path, size, chunk_size, rewrite)


def measure_changed(size: int, repeat: int = 7, progress: Show = None) -> list[Result]:
    path = changed_image(size, progress=progress)
    with open_image(path) as img:
        arr = img.changed_extents_array("s1", "s2")
        ms = _median_ms(lambda: img.changed_extents_array("s1", "s2"), repeat)
        ms_list = _median_ms(lambda: img.changed_extents("s1", "s2"), max(3, repeat // 2))
        ms_front = _median_ms(lambda: img.changed_extents_array("s1"), repeat)
        cpu = _median_cpu_ms(lambda: img.changed_extents_array("s1", "s2"), repeat)
    nchunks = size // MiB
    note = (
        f"{size // GiB} GiB, {nchunks} chunks all allocated, 10% rewritten between "
        f"s1 and s2: {len(arr)} ranges; changed_extents() {ms_list:.0f} ms; s1..front "
        f"{ms_front:.0f} ms; CPU time {cpu:.1f} ms"
    )
    return [Result("changed-extents", "fvd", ms, "ms", False, 1, ms / 1e3, {}, note)]


def table_compare_ms(
    nchunks: int = 1 << 20, fraction: float = 0.1, repeat: int = 7, granules: int = 0
) -> float:
    """The comparison alone (fvd.ops.changed.compare, no table reads) on tables shaped like
    the bench image's: every chunk allocated, `fraction` of them moved to new chunks.
    With `granules`, the moved chunks are the front's partial chunks over the old ones
    (granular copy-on-write) with that many random 4 KiB granules written each."""

    rng = np.random.default_rng(1)
    a = np.arange(nchunks, dtype=np.uint32)
    b = a.copy()
    moved = np.sort(rng.choice(nchunks, int(nchunks * fraction), replace=False))
    b[moved] = np.arange(nchunks, nchunks + len(moved), dtype=np.uint32)
    geo = Geometry(nchunks * MiB, MiB, 64 * KiB, 0)
    newer = State(b, None, 2)
    if granules:
        rows = np.zeros((len(moved), MiB // (32 * KiB)), dtype=np.uint8)  # 256 granules
        for _ in range(granules):
            g = rng.integers(0, 256, len(moved))
            rows[np.arange(len(moved)), g // 8] |= (1 << (g % 8)).astype(np.uint8)
        newer = State(b, None, None, Partial(moved, a[moved], rows, 4 * KiB))
    return _median_ms(lambda: compare(geo, State(a, None, 1), newer), repeat)


# ----- extents of a huge sparse image --------------------------------------------------
def sparse_image(size: int, nwrites: int = 1000) -> str:
    path = os.path.join(cache_dir(), f"sparse-v{CACHE_VERSION}-{size}-{nwrites}.fvd")
    if os.path.exists(path):
        return path
    tmp = path + ".building"
    if os.path.exists(tmp):
        os.unlink(tmp)
    create(tmp, size)
    rng = random.Random(2)
    with open_image(tmp, "r+") as img:
        for c in rng.sample(range(size // MiB), nwrites):
            img.write(c * MiB + rng.randrange(MiB - 4096), b"\x03" * 4096)
    os.rename(tmp, path)
    return path


def measure_sparse_extents(size: int, repeat: int = 7) -> list[Result]:
    path = sparse_image(size)
    with open_image(path) as img:
        arr = img.extents_array()
        ms = _median_ms(img.extents_array, repeat)
        ms_iter = _median_ms(lambda: list(img.extents()), repeat)
        cpu = _median_cpu_ms(img.extents_array, repeat)
    note = (
        f"{size // TiB} TiB sparse, 1,000 writes: {len(arr)} extents; "
        f"list(extents()) {ms_iter:.0f} ms; CPU time {cpu:.1f} ms"
    )
    return [Result("sparse-extents", "fvd", ms, "ms", False, 1, ms / 1e3, {}, note)]


# ----- checksum ---------------------------------------------------------------------------
class ChecksumBench:
    """img.checksum() beside ovirt-imageio's client.checksum() of the same data as a raw
    file (page cache warm for both), one pair of calls per round."""

    def __init__(self, workdir: str, nbytes: int) -> None:
        self.raw = os.path.join(workdir, f"checksum-{os.getpid()}.raw")
        self.path = os.path.join(workdir, f"checksum-{os.getpid()}.fvd")
        self.nbytes = nbytes
        self.ready = False
        self.verified = False

    def setup(self) -> None:
        create(self.path, self.nbytes)
        rng = random.Random(4)
        with open_image(self.path, "r+") as img, open(self.raw, "wb") as f:
            for off in range(0, self.nbytes, 4 * MiB):
                data = rng.randbytes(min(4 * MiB, self.nbytes - off))
                img.write(off, data)
                f.write(data)
        with open_image(self.path) as img:
            self.ours = img.checksum()
        self.ready = True

    def _fvd(self) -> Result:
        with open_image(self.path) as img:
            ms = _median_ms(img.checksum, 1)
        threads = min(4, os.cpu_count() or 1)
        note = f"{self.nbytes / MiB:.0f} MiB of data, blake2b, 4 MiB blocks, {threads} threads"
        return self._result("fvd", ms, note)

    def _ovirt(self) -> Result:
        try:
            from ovirt_imageio import client
        except ImportError:
            note = "ovirt-imageio is not installed (pip install ovirt-imageio)"
            return Result("checksum", "raw", None, "MiB/s", note=note)
        if not self.verified:  # once: the same answer, then time it
            theirs = client.checksum(self.raw)
            if theirs != self.ours:
                raise AssertionError(f"checksums differ: fvd {self.ours} ovirt-imageio {theirs}")
            self.verified = True
        ms = _median_ms(lambda: client.checksum(self.raw), 1)
        note = "ovirt-imageio client.checksum() of the raw file (qemu-nbd); equal checksums"
        return self._result("raw", ms, note)

    def _result(self, impl: str, ms: float, note: str) -> Result:
        mib = self.nbytes / MiB
        return Result("checksum", impl, mib / (ms / 1e3), "MiB/s", True, 1, ms / 1e3, {}, note)

    def one_round(self, rnd: int, members: Sequence[str] = ()) -> list[Result]:
        """fvd then ovirt-imageio (the other way round on odd rounds)."""
        if not self.ready:
            self.setup()
        if rnd % 2:
            theirs = self._ovirt()
            return [self._fvd(), theirs]
        return [self._fvd(), self._ovirt()]

    def close(self) -> None:
        for p in (self.raw, self.path):
            if os.path.exists(p):
                os.unlink(p)


def rows() -> list[tuple[str, str]]:
    return [
        ("changed-extents", "changed extents s1..s2"),
        ("sparse-extents", "extents_array, huge sparse"),
        ("checksum", "checksum (raw: ovirt-imageio)"),
    ]


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"changed": 16 * GiB, "sparse": TiB, "checksum": 64 * MiB, "repeat": 3}
    return {"changed": TiB, "sparse": 16 * TiB, "checksum": 512 * MiB, "repeat": 7}
