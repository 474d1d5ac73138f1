"""Benchmark workloads: one definition of each, shared by `fvd bench` and bench/ (pytest).

A workload is a plain description (offsets, lengths, cache mode, flush policy, what to do
before the timed part). `IoCase` runs it against an in-process contender in three steps
-- setup (untimed), run (timed), finish (I/O counts, cleanup) -- which is exactly the shape
`benchmark.pedantic(setup=..., target=...)` wants. `fvd.bench.qemu` runs the same
description through qemu-io.
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

from fvd import _impl
from fvd.bench.impls import Contender, Handle, Unavailable
from fvd.units import GiB, KiB, MiB

DISK = 8 * GiB
PATTERN = 0xAB
READ_PASSES = 5  # in-process read workloads: best of this many passes

# per-operation counters reported beside every time (keys of img.stats, summed sensibly)
Counts = dict[str, Union[int, float]]  # img.stats as a dict (or deltas of one)

COUNT_KEYS = (
    "writes",
    "bytes_written",
    "metadata_writes",
    "flushes",
    "refcount_updates",
    "journal_records",
    "reads",
    "bytes_read",
)


def per_op_counts(before: Counts, after: Counts, ops: int) -> dict[str, float]:
    """Stats deltas divided by ops, with writes = data + metadata writes (a counter a
    contender does not keep counts 0)."""

    def d(*keys: str) -> float:
        return sum(after.get(k, 0) - before.get(k, 0) for k in keys)

    total = {
        "writes": d("data_writes", "metadata_writes"),
        "bytes_written": d("data_bytes_written", "metadata_bytes_written"),
        "metadata_writes": d("metadata_writes"),
        "flushes": d("flushes"),
        "refcount_updates": d("refcount_updates"),
        "journal_records": d("journal_records"),
        "reads": d("data_reads", "metadata_reads"),
        "bytes_read": d("data_bytes_read", "metadata_bytes_read"),
    }
    return {k: (v / ops if ops else 0.0) for k, v in total.items()}


def stats_dict(stats: Any) -> Counts:
    return dict(stats.as_dict() if hasattr(stats, "as_dict") else vars(stats))


@dataclass
class Result:
    workload: str
    impl: str
    value: Optional[float]  # None when not measured
    unit: str
    higher_is_better: bool = True
    ops: int = 0
    seconds: float = 0.0
    counts: dict[str, float] = field(default_factory=dict)  # per operation
    note: str = ""
    # per-round values, index = round (None: not run that round); paired across a row
    samples: list[Optional[float]] = field(default_factory=list)
    like_for_like: bool = True  # False: QEMU one command per process (no verdicts)
    # in-process contenders measured together: the median slice's figure per round, a
    # figure one disk stall cannot move; ratios between two such results use it
    typical: Optional[float] = None
    typical_samples: list[Optional[float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: every field (counts as `counts_per_op`, no `typical`: the
        rounds' figures are in `typical_samples`) and how many rounds ran."""
        d = dataclasses.asdict(self)
        d["counts_per_op"] = d.pop("counts")
        del d["typical"]
        d["rounds"] = sum(v is not None for v in self.samples)
        return d


@dataclass
class Scale:
    """Sizes of a run. `quick` keeps `fvd bench --quick` under a minute: fewer operations
    per cell, the same targets, rounds added until `budget` seconds are used."""

    ops: int = 2048  # random 4 KiB operations (writes)
    reads: int = 16384  # random 4 KiB reads (cheap: many more)
    read_passes: int = 4  # sequential 1 MiB reads: passes over the data
    seq_mib: int = 256  # MiB for sequential 1 MiB I/O
    translate: int = 1 << 20  # lookups for the translation rate (cython)
    translate_py: int = 1 << 18  # lookups for the python twin
    snapshots: tuple[int, ...] = (1, 100, 1000)
    snap_data_ops: int = 256  # allocated 4 KiB writes under the snapshots
    open_ops: int = 2048  # allocated chunks when timing open
    repeat: int = 5  # paired rounds at least (5: a 90% interval of the median needs them)
    flush_every: int = 16
    convert_mib: int = 1024  # virtual size of the convert rows' image (~35% data)
    budget: float = 0.0  # seconds: more rounds while the run has not used them up
    max_rounds: int = 15
    like_only: bool = False  # leave out QEMU cells that cannot be like-for-like
    qemu_counts: bool = True  # count QEMU's I/O under strace (round 0)
    other_rounds: int = 0  # rounds at least for rows without a target (0: `repeat`)
    sure_rounds: int = 0  # rounds run even past the budget (0: all of `repeat`)
    grace: float = 0.0  # seconds past the budget the rounds up to `repeat` may use

    @classmethod
    def quick(cls) -> Scale:
        return cls(
            ops=64,
            reads=4096,
            seq_mib=32,
            translate=1 << 20,
            translate_py=1 << 16,
            snapshots=(1, 10),
            snap_data_ops=32,
            open_ops=256,
            repeat=5,
            convert_mib=128,
            budget=45.0,
            max_rounds=40,  # rounds for the targets still open, while the budget lasts
            sure_rounds=2,  # a loaded machine: rounds 3-5 for the rows they fit (budget)
            grace=7.0,  # ... within 52 s; extra rounds stop at 45 s
            like_only=True,
            qemu_counts=False,
            other_rounds=1,
        )

    def scaled(self, factor: float) -> Scale:
        """Every count multiplied by factor (at least 1): FVD_BENCH_SCALE for CI."""

        def s(n: float) -> int:
            return max(1, int(n * factor))

        out = dataclasses.replace(self)
        for k in ("ops", "reads", "seq_mib", "translate", "translate_py", "snap_data_ops"):
            setattr(out, k, s(getattr(self, k)))
        out.open_ops, out.convert_mib = s(self.open_ops), s(self.convert_mib)
        out.snapshots = tuple(sorted({s(k) for k in self.snapshots}))
        return out


# ----- I/O workloads -------------------------------------------------------------------
@dataclass
class IoWorkload:
    key: str
    title: str
    kind: str  # "write" or "read"
    length: int
    offsets: list[int]
    cache: str = "writethrough"
    flush_every: int = 0  # writeback: flush every N writes (and once at the end)
    pre_offsets: Sequence[int] = ()  # written (untimed) before, `pre_length` each
    pre_length: int = 4 * KiB
    snapshot: bool = False  # take a snapshot after the pre writes
    size: int = DISK
    unit: str = "ops/s"
    needs_snapshots: bool = False

    def stride(self) -> Optional[tuple[int, int, int, int]]:
        """(start, step, count, passes) when the offsets are one arithmetic progression,
        possibly repeated whole (read passes): `qemu-img bench` can then run the loop
        inside QEMU. None otherwise (random offsets go through qemu-io)."""
        offs = self.offsets
        if not offs:
            return None
        step = offs[1] - offs[0] if len(offs) > 1 else MiB
        n = len(offs)
        for k in range(1, n):
            if offs[k] == offs[0]:
                n = k
                break
        if step <= 0 or len(offs) % n:
            return None
        one = [offs[0] + i * step for i in range(n)]
        if offs != one * (len(offs) // n) or one[-1] + self.length > self.size:
            return None
        return offs[0], step, n, len(offs) // n

    @property
    def mode(self) -> str:
        return "wt" if self.cache == "writethrough" else f"wb/{self.flush_every}"

    def value(self, seconds: float) -> Optional[float]:
        n = len(self.offsets)
        if seconds <= 0:
            return None
        if self.unit == "MiB/s":
            return n * self.length / MiB / seconds
        return n / seconds


def random_offsets(n: int, size: int = DISK, seed: int = 1) -> list[int]:
    """n random 4 KiB-aligned offsets, each in a different 1 MiB chunk (so: allocating)."""
    rng = random.Random(seed)
    n = min(n, size // MiB)
    chunks = rng.sample(range(size // MiB), n)
    return [c * MiB + rng.randrange(MiB // (4 * KiB)) * 4 * KiB for c in chunks]


def strided_offsets(n: int, size: int = DISK, step: int = MiB) -> list[int]:
    """n offsets one `step` apart: one 4 KiB op per 1 MiB chunk, each allocating on first
    write, and expressible as `qemu-img bench -o 0 -S 1M` so QEMU runs the loop itself."""
    return [i * step for i in range(min(n, size // step))]


def io_workloads(scale: Scale) -> list[IoWorkload]:
    """The I/O rows, in table order (the keys are what targets and --workload name)."""
    offs = strided_offsets(scale.ops)
    fe = scale.flush_every
    w = []
    for kind, pre in (("alloc", ()), ("overwrite", offs)):
        for cache, every, tag in (("writethrough", 0, "wt"), ("writeback", fe, f"wb/{fe}")):
            title = f"{kind} 4K random {tag}"
            w.append(
                IoWorkload(f"{kind}4k-{tag}", title, "write", 4 * KiB, offs, cache, every, pre)
            )
    return w + _read_and_sequential(scale, offs) + [_cow_workload(offs)]


def _read_and_sequential(scale: Scale, offs: list[int]) -> list[IoWorkload]:
    rng = random.Random(3)
    reads = [rng.choice(offs) for _ in range(scale.reads)]
    strided = offs * max(1, scale.reads // len(offs))
    seq = [i * MiB for i in range(scale.seq_mib)]
    fe = scale.flush_every
    wb = "writeback"
    return [
        IoWorkload("read4k", "read 4K random (cached)", "read", 4 * KiB, reads, wb, 0, offs),
        IoWorkload(
            "read4k-strided", "read 4K strided 1M (cached)", "read", 4 * KiB, strided, wb, 0, offs
        ),
        IoWorkload(
            f"seqwrite1m-wb/{fe}", f"write 1M sequential wb/{fe}", "write", MiB, seq, wb, fe,
            unit="MiB/s",
        ),
        IoWorkload(
            "seqread1m", "read 1M sequential (cached)", "read", MiB, seq * scale.read_passes, wb,
            0, pre_offsets=seq, pre_length=MiB, unit="MiB/s",
        ),
    ]  # fmt: skip


def _cow_workload(offs: list[int]) -> IoWorkload:
    return IoWorkload(
        "cow4k-wt",
        "1st write after snapshot wt",
        "write",
        4 * KiB,
        offs,
        "writethrough",
        0,
        pre_offsets=offs,
        snapshot=True,
        needs_snapshots=True,
    )


def _fill(handle: Handle, offsets: Sequence[int], length: int) -> None:
    data = bytes([PATTERN]) * length
    for off in offsets:
        handle.write(off, data)
    handle.flush()


def snapshot_error(e: BaseException) -> Optional[Unavailable]:
    """Map 'snapshots not written yet' to Unavailable; re-raise real errors."""
    if isinstance(e, (ImportError, NotImplementedError, AttributeError)):
        return Unavailable(f"snapshots not available ({type(e).__name__}: {e})")
    return None


class IoCase:
    """One fresh run of an I/O workload against an in-process contender."""

    def __init__(self, workload: IoWorkload, contender: Contender, workdir: str) -> None:
        self.w = workload
        self.c = contender
        self.path = os.path.join(workdir, f"bench-{contender.name}-{os.getpid()}-{id(self)}.img")
        self.handle: Optional[Handle] = None

    def setup(self) -> IoCase:
        """Create the image, do the untimed part, open it for the timed part."""
        w, c = self.w, self.c
        reason = c.available()
        if reason:
            raise Unavailable(reason)
        c.create(self.path, w.size)
        if w.pre_offsets or w.snapshot:
            h = c.open(self.path, "writeback")
            try:
                _fill(h, w.pre_offsets, w.pre_length)
                if w.snapshot:
                    try:
                        h.create_snapshot("bench")
                    except Exception as e:
                        err = snapshot_error(e)
                        if err is None:
                            raise
                        raise err from None
            finally:
                h.close()
        self.handle = c.open(self.path, w.cache)
        if w.kind == "read":  # "cached": one untimed pass warms the page cache
            buf = bytearray(w.length)
            for off in sorted(set(w.offsets)):
                self.handle.readinto(off, buf)
        self.data = bytes([PATTERN ^ 0xFF]) * w.length
        self.buf = bytearray(w.length)
        self.before = stats_dict(self.handle.stats)
        return self

    def run(self) -> int:
        """The timed part; returns the number of operations."""
        w, h = self.w, self.handle
        assert h is not None  # opened by setup()
        offs = w.offsets
        if w.kind == "read":
            buf, readinto = self.buf, h.readinto
            for off in offs:
                readinto(off, buf)
        else:
            data, write = self.data, h.write
            n = w.flush_every
            if n:
                flush = h.flush
                i = 0
                for off in offs:
                    write(off, data)
                    i += 1
                    if i == n:
                        flush()
                        i = 0
                flush()
            else:
                for off in offs:
                    write(off, data)
        return len(offs)

    def run_range(self, lo: int, hi: int) -> int:
        """Operations lo..hi of the timed part (run() in slices: flushes fall where run()
        puts them, every `flush_every` writes and once after the last)."""
        w, h = self.w, self.handle
        assert h is not None  # opened by setup()
        if w.kind == "read":
            buf, readinto = self.buf, h.readinto
            for off in w.offsets[lo:hi]:
                readinto(off, buf)
            return hi - lo
        data, write, n = self.data, h.write, w.flush_every
        for i, off in enumerate(w.offsets[lo:hi], lo + 1):
            write(off, data)
            if n and i % n == 0:
                h.flush()
        if n and hi == len(w.offsets):
            h.flush()
        return hi - lo

    def verify(self) -> bool:
        """After run(): the data the workload wrote (or read) is what it should be."""
        if not self.w.offsets:
            return True
        if self.w.kind == "read":
            return self.buf == bytes([PATTERN]) * self.w.length
        buf = bytearray(self.w.length)
        assert self.handle is not None  # opened by setup()
        self.handle.readinto(self.w.offsets[-1], buf)
        return buf == self.data

    def finish(self) -> dict[str, float]:
        """Per-op I/O counts of the timed part; closes and removes the image."""
        counts = {}
        if self.handle is not None:
            after = stats_dict(self.handle.stats)
            counts = per_op_counts(self.before, after, len(self.w.offsets))
            self.handle.close()
            self.handle = None
        self.cleanup()
        return counts

    def cleanup(self) -> None:
        _discard(self)


def _discard(run: Union[IoCase, SnapshotCase]) -> None:
    """Close a run's handle (if still open) and remove its image file."""
    if run.handle is not None:
        try:
            run.handle.close()
        except Exception:
            pass
        run.handle = None
    try:
        os.unlink(run.path)
    except FileNotFoundError:
        pass


def measure_io(workload: IoWorkload, contender: Contender, workdir: str, repeat: int = 1) -> Result:
    """Median of `repeat` fresh runs -> Result."""
    times: list[float] = []
    counts: dict[str, float] = {}
    for _ in range(repeat):
        case = IoCase(workload, contender, workdir)
        try:
            case.setup()
            # reads leave no state behind: best of several passes on one image
            passes = READ_PASSES if workload.kind == "read" else 1
            best = None
            for _ in range(passes):
                t0 = time.perf_counter()
                case.run()
                t = time.perf_counter() - t0
                best = t if best is None else min(best, t)
            assert best is not None  # passes >= 1
            times.append(best)
            c = case.finish()
            if passes > 1:
                c = {k: v / passes for k, v in c.items()}
            counts = counts or c
        except Unavailable as e:
            case.cleanup()
            return Result(workload.key, contender.name, None, workload.unit, note=str(e))
        except BaseException:
            case.cleanup()
            raise
    t = statistics.median(times)
    return Result(
        workload.key,
        contender.name,
        workload.value(t),
        workload.unit,
        True,
        len(workload.offsets),
        t,
        counts,
    )


def slices(n: int, parts: int, multiple: int) -> list[tuple[int, int]]:
    """About `parts` consecutive (lo, hi) ranges covering 0..n, bounds on `multiple`s."""
    step = max(multiple, -(-n // parts // multiple) * multiple)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _timed_slices(cases: list[IoCase], passes: int) -> dict[str, tuple[float, float]]:
    """(seconds, typical seconds) per contender for the whole offset list. Writes run in
    slices taken in turn: seconds is their sum, typical the median slice's seconds per op
    times the ops (one stall of the shared disk during one slice does not move it).
    Reads run as whole passes in turn: the best pass, both figures. The order rotates
    each time so no one always goes first."""
    w = cases[0].w
    n = len(w.offsets)
    parts = slices(n, 1 if w.kind == "read" else 8, w.flush_every or 1)
    per_op: dict[str, list[float]] = {case.c.name: [] for case in cases}
    best: dict[str, tuple[float, float]] = {}
    for p in range(passes):
        for j, (lo, hi) in enumerate(parts):
            k = (p + j) % len(cases)
            for case in cases[k:] + cases[:k]:
                t0 = time.perf_counter()
                case.run_range(lo, hi)
                per_op[case.c.name].append((time.perf_counter() - t0) / (hi - lo))
        for name, times in per_op.items():
            total = sum(t * (hi - lo) for t, (lo, hi) in zip(times, parts))
            pair = (total, statistics.median(times) * n)
            best[name] = min(best.get(name, pair), pair)
            times.clear()
    return best


def measure_io_paired(
    workload: IoWorkload, contenders: Sequence[Contender], workdir: str
) -> list[Result]:
    """One round of an I/O row for several in-process contenders at once, their
    operations interleaved in slices so a slow spell of the disk hits all of them."""
    cases, out = [], []
    try:
        for c in contenders:
            case = IoCase(workload, c, workdir)
            try:
                cases.append(case.setup())
            except Unavailable as e:
                case.cleanup()
                out.append(Result(workload.key, c.name, None, workload.unit, note=str(e)))
        passes = READ_PASSES if workload.kind == "read" else 1
        times = _timed_slices(cases, passes) if cases else {}
        for case in cases:
            (t, typical), counts = times[case.c.name], case.finish()
            if passes > 1:
                counts = {k: v / passes for k, v in counts.items()}
            n = len(workload.offsets)
            r = Result(
                workload.key, case.c.name, workload.value(t), workload.unit, True, n, t, counts
            )
            r.typical = workload.value(typical)
            out.append(r)
    finally:
        for case in cases:
            case.cleanup()
    return out


# ----- translation rate (core target of issue 2) -----------------------------------------
def translate_case(
    implementation: str, lookups: int, nchunks: int = 8192, seed: int = 4
) -> tuple[Any, np.ndarray, np.ndarray]:
    """A ChunkMap over a fully allocated table and `lookups` random chunk indexes."""
    mod = _impl.MODULES.get(implementation)
    if mod is None:
        raise Unavailable(f"the {implementation} fast path is not built")
    table = np.random.default_rng(seed).permutation(nchunks).astype(np.uint32)
    frozen = np.zeros(nchunks, dtype=np.uint8)
    cmap = mod.ChunkMap(-1, table, frozen, MiB, 1 << 16, nchunks * MiB, mod.Stats())
    vchunks = np.random.default_rng(seed + 1).integers(0, nchunks, lookups, dtype=np.int64)
    out = np.empty(lookups, dtype=np.int64)
    return cmap, vchunks, out


def check_translation(cmap: Any, vchunks: np.ndarray, out: np.ndarray) -> bool:
    expect = cmap.data_offset + cmap.table[vchunks].astype(np.int64) * cmap.chunk_size
    return bool(np.array_equal(out, expect))


def measure_translate(contender: Contender, scale: Scale) -> Result:
    impl = "cython" if contender.name == "fvd" else "python"
    lookups = scale.translate if impl == "cython" else scale.translate_py
    try:
        cmap, vchunks, out = translate_case(impl, lookups)
    except Unavailable as e:
        return Result("translate", contender.name, None, "lookups/s", note=str(e))
    best = None
    for _ in range(3):  # best of 3 within a round
        t0 = time.perf_counter()
        cmap.translate(vchunks, out)
        t = time.perf_counter() - t0
        best = t if best is None else min(best, t)
    assert best is not None  # at least one round
    if not check_translation(cmap, vchunks, out):
        raise AssertionError(f"{impl} translate gave wrong host offsets")
    return Result("translate", contender.name, lookups / best, "lookups/s", True, lookups, best, {})


# ----- snapshots ------------------------------------------------------------------------
class SnapshotCase:
    """An image with data; the timed parts create then delete `count` snapshots."""

    def __init__(self, contender: Contender, workdir: str, count: int, data_ops: int) -> None:
        self.c = contender
        self.count = count
        self.data_ops = data_ops
        self.path = os.path.join(workdir, f"snap-{contender.name}-{os.getpid()}-{id(self)}.img")
        self.handle: Optional[Handle] = None

    def setup(self) -> SnapshotCase:
        reason = self.c.available()
        if reason:
            raise Unavailable(reason)
        if self.c.name == "raw":
            raise Unavailable("raw files have no snapshots")
        self.c.create(self.path, DISK)
        h = self.c.open(self.path, "writeback")  # the data is not what is timed
        try:
            _fill(h, random_offsets(self.data_ops), 4 * KiB)
        finally:
            h.close()
        self.handle = self.c.open(self.path, "writethrough")
        if not hasattr(self.handle, "create_snapshot"):
            raise Unavailable("no create_snapshot")
        self.before = stats_dict(self.handle.stats)
        return self

    def create_all(self) -> int:
        assert self.handle is not None  # opened by setup()
        cs = self.handle.create_snapshot
        try:
            for i in range(self.count):
                cs(f"s{i}")
        except Exception as e:
            err = snapshot_error(e)
            if err is None:
                raise
            raise err from None
        return self.count

    def delete_all(self) -> int:
        assert self.handle is not None  # opened by setup()
        ds = self.handle.delete_snapshot
        for i in range(self.count):
            ds(f"s{i}")
        return self.count

    def counts(self) -> dict[str, float]:
        assert self.handle is not None  # opened by setup()
        after = stats_dict(self.handle.stats)
        c = per_op_counts(self.before, after, self.count)
        self.before = after
        return c

    def cleanup(self) -> None:
        _discard(self)


def measure_snapshots(
    contender: Contender, workdir: str, count: int, data_ops: int
) -> list[Result]:
    """Two Results: ms per create and ms per delete with `count` snapshots."""
    kc, kd = f"snap-create-x{count}", f"snap-delete-x{count}"
    case = SnapshotCase(contender, workdir, count, data_ops)
    try:
        case.setup()
        t0 = time.perf_counter()
        case.create_all()
        tc = time.perf_counter() - t0
        cc = case.counts()
        t0 = time.perf_counter()
        case.delete_all()
        td = time.perf_counter() - t0
        cd = case.counts()
    except Unavailable as e:
        return [Result(k, contender.name, None, "ms", False, note=str(e)) for k in (kc, kd)]
    finally:
        case.cleanup()
    return [
        Result(kc, contender.name, tc / count * 1e3, "ms", False, count, tc, cc),
        Result(kd, contender.name, td / count * 1e3, "ms", False, count, td, cd),
    ]


# ----- open time ------------------------------------------------------------------------
def measure_open(contender: Contender, workdir: str, data_ops: int, repeat: int = 5) -> Result:
    key = "open"
    reason = contender.available()
    if reason:
        return Result(key, contender.name, None, "ms", False, note=reason)
    path = os.path.join(workdir, f"open-{contender.name}-{os.getpid()}.img")
    try:
        contender.create(path, DISK)
        h = contender.open(path, "writeback")
        _fill(h, random_offsets(data_ops), 4 * KiB)
        h.close()
        times, counts = [], {}
        for _ in range(max(repeat, 3)):
            t0 = time.perf_counter()
            h = contender.open_read_only(path)
            times.append(time.perf_counter() - t0)
            after = stats_dict(h.stats)
            counts = per_op_counts({k: 0 for k in after}, after, 1)
            h.close()
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    t = statistics.median(times)
    return Result(
        key,
        contender.name,
        t * 1e3,
        "ms",
        False,
        1,
        t,
        counts,
        note=f"{data_ops} chunks/clusters allocated",
    )


# ----- metadata size --------------------------------------------------------------------
