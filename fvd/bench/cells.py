"""What `fvd bench` measures, as cells: one (row, contender) measurement per round.

`CELL_FACTORIES` is the table of row groups: each factory turns the run's `Context`
into `Cell`s. A cell's `measure(round)` returns the `Result`s of one round (a group cell
such as convert returns every row and contender it covers). To add a row group, write a
factory and append it here; name its rows in `fvd.bench.table.row_titles` (see the
docstring of fvd.bench.table for targets).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from fvd.bench import backup as bb
from fvd.bench import impls, metadata, scale, table
from fvd.bench import qemu as bench_qemu
from fvd.bench import workloads as wl
from fvd.bench.convert import ConvertBench

# the Python twin runs only the core rows of issue 2 (it is the fallback, not a contender)
PY_ROWS = ("alloc4k-wt", "read4k", "seqread1m", "seqwrite1m")

# (round index, contenders to measure) -> that round's results
Measure = Callable[[int, Sequence[str]], list[wl.Result]]


@dataclass
class Cell:
    """One measurement per round: of one contender, or of several together (`members`:
    in-process I/O rows interleave their operations; convert and checksum cells time
    fvd and its peer command in turn)."""

    key: str  # the row it belongs to (cells of one row run back to back)
    title: str  # for progress lines
    members: tuple[str, ...]  # contenders; later rounds may keep only the needed ones
    measure: Measure
    repeat: bool = True  # False: round 0 only (not like-for-like, or exact)
    fixed: bool = False  # members always measured together (convert, checksum)
    rows: set[str] = field(default_factory=set)  # row keys it measured (shared by copies)
    # a cell of several rows: its measure of only these rows (later rounds skip the
    # rows whose verdicts are settled)
    narrow: Optional[Callable[[frozenset[str]], Measure]] = None

    @property
    def impl(self) -> str:
        return ",".join(self.members)


@dataclass
class Context:
    scale: wl.Scale
    names: Sequence[str]
    workdir: str
    keys: Optional[Sequence[str]] = None  # row key prefixes wanted (None: all)
    closers: list[Callable[[], None]] = field(default_factory=list)  # run at the end
    show: Optional[Callable[[str], None]] = None  # lasting progress messages

    def want(self, key: str) -> bool:
        return not self.keys or any(key.startswith(p) for p in self.keys)

    def contenders(self, key: str = "") -> list[impls.Contender]:
        """The run's contenders for row `key` (without one: those that run every row)."""
        out = [impls.BY_NAME[n] for n in self.names]
        return [c for c in out if c.only_rows is None or (key and key.startswith(c.only_rows))]


def _qemu_io_round(
    w: wl.IoWorkload,
    c: impls.QemuContender,
    workdir: str,
    counts: bool,
    rnd: int,
    members: Sequence[str],
) -> list[wl.Result]:
    """One round of an I/O row through QEMU (I/O counted in round 0). Random offsets run
    one qemu-io command per I/O: marked not like-for-like."""
    result = bench_qemu.measure_io_qemu(w, c, workdir, 1, counts=counts and rnd == 0)
    result.like_for_like = w.stride() is not None
    return [result]


def _paired_round(
    w: wl.IoWorkload, workdir: str, rnd: int, members: Sequence[str]
) -> list[wl.Result]:
    """One round of the in-process contenders of an I/O row, operations interleaved."""
    order = list(members)[::-1] if rnd % 2 else list(members)
    return wl.measure_io_paired(w, [impls.BY_NAME[n] for n in order], workdir)


def io_cells(ctx: Context) -> list[Cell]:
    cells = []
    for w in wl.io_workloads(ctx.scale):
        if not ctx.want(w.key):
            continue
        local = tuple(
            c.name
            for c in ctx.contenders(w.key)
            if c.python
            and (c.name != "fvd-py" or w.key.startswith(PY_ROWS))
            and not (w.snapshot and c.name == "raw")  # raw files have no snapshots
        )
        if local:
            measure = functools.partial(_paired_round, w, ctx.workdir)
            cells.append(Cell(w.key, w.title, local, measure))
        for c in ctx.contenders():
            like = w.stride() is not None
            if isinstance(c, impls.QemuContender) and (like or not ctx.scale.like_only):
                if w.snapshot and c.fmt == "raw":
                    continue  # raw files have no snapshots
                counts = ctx.scale.qemu_counts
                measure = functools.partial(_qemu_io_round, w, c, ctx.workdir, counts)
                cells.append(Cell(w.key, w.title, (c.name,), measure, repeat=like))
    return cells


def _snapshot_round(
    c: impls.Contender, workdir: str, count: int, data_ops: int, rnd: int, members: Sequence[str]
) -> list[wl.Result]:
    if c.python:
        return wl.measure_snapshots(c, workdir, count, data_ops)
    assert isinstance(c, impls.QemuContender)
    results = bench_qemu.measure_snapshots_qemu(c, workdir, count, data_ops)
    for r in results:  # one qemu-img process per snapshot
        r.like_for_like = False
    return results


def snapshot_cells(ctx: Context) -> list[Cell]:
    cells = []
    for k in ctx.scale.snapshots:
        key = f"snap-create-x{k}"
        if not (ctx.want(key) or ctx.want(f"snap-delete-x{k}")):
            continue
        for c in ctx.contenders():
            if c.name == "raw" or c.name == "qemu-raw":
                continue  # raw files have no snapshots
            if not c.python and ctx.scale.like_only:
                continue  # one qemu-img process per snapshot: not like-for-like
            measure = functools.partial(_snapshot_round, c, ctx.workdir, k, ctx.scale.snap_data_ops)
            cells.append(Cell(key, f"snapshots x{k}", (c.name,), measure, repeat=c.python))
    return cells


def convert_cells(ctx: Context) -> list[Cell]:
    if not ctx.want("convert") or "fvd" not in ctx.names:
        return []
    qemu = any(n.startswith("qemu-") for n in ctx.names)
    bench = ConvertBench(ctx.workdir, ctx.scale.convert_mib, qemu, ctx.keys)
    ctx.closers.append(bench.close)

    def narrow(rows: frozenset[str]) -> Measure:
        return functools.partial(bench.one_round, rows=rows)

    return [Cell("convert", "convert", ("fvd",), bench.one_round, fixed=True, narrow=narrow)]


def _open_round(
    c: impls.Contender, workdir: str, ops: int, rnd: int, members: Sequence[str]
) -> list[wl.Result]:
    return [wl.measure_open(c, workdir, ops)]


def _metadata_round(
    c: impls.Contender, workdir: str, rnd: int, members: Sequence[str]
) -> list[wl.Result]:
    return [metadata.measure_metadata(c, workdir)]


def _translate_round(
    c: impls.Contender, scale: wl.Scale, rnd: int, members: Sequence[str]
) -> list[wl.Result]:
    return [wl.measure_translate(c, scale)]


def simple_cells(ctx: Context) -> list[Cell]:
    """open (in-process contenders), metadata size (exact: once), translation rate."""
    s, d, p = ctx.scale, ctx.workdir, functools.partial
    cells = []
    for c in ctx.contenders():
        if ctx.want("open") and c.python:
            cells.append(Cell("open", "open", (c.name,), p(_open_round, c, d, s.open_ops)))
    for c in ctx.contenders():
        if ctx.want("metadata"):
            m = p(_metadata_round, c, d)
            cells.append(Cell("metadata/TiB", "metadata/TiB", (c.name,), m, repeat=False))
    for c in ctx.contenders():
        if ctx.want("translate") and c.name in ("fvd", "fvd-py"):
            cells.append(Cell("translate", "translate", (c.name,), p(_translate_round, c, s)))
    return cells


def _changed_round(
    size: int, repeat: int, show: Optional[Callable[[str], None]], rnd: int, m: Sequence[str]
) -> list[wl.Result]:
    return bb.measure_changed(size, repeat, show)


def _sparse_round(size: int, repeat: int, rnd: int, m: Sequence[str]) -> list[wl.Result]:
    return bb.measure_sparse_extents(size, repeat)


def backup_cells(ctx: Context) -> list[Cell]:
    """The backup data path (fvd.bench.backup): fvd only, and ovirt-imageio's checksum
    in the raw column."""
    if "fvd" not in ctx.names:
        return []
    sz = bb.sizes(ctx.scale.ops < wl.Scale().ops)  # --quick: smaller images
    p, fvd = functools.partial, ("fvd",)
    cells = []
    if ctx.want("changed-extents"):
        m = p(_changed_round, sz["changed"], sz["repeat"], ctx.show)
        cells.append(Cell("changed-extents", "changed extents", fvd, m))
    if ctx.want("sparse-extents"):
        m = p(_sparse_round, sz["sparse"], sz["repeat"])
        cells.append(Cell("sparse-extents", "sparse extents", fvd, m))
    if ctx.want("checksum"):
        bench = bb.ChecksumBench(ctx.workdir, sz["checksum"])
        ctx.closers.append(bench.close)
        cells.append(Cell("checksum", "checksum", fvd, bench.one_round, fixed=True))
    return cells


def _scale_round(workdir: str, qemu: bool, rnd: int, m: Sequence[str]) -> list[wl.Result]:
    return scale.measure_scale(workdir, qemu)


def scale_cells(ctx: Context) -> list[Cell]:
    """16 TiB footprints (fvd.bench.scale): fvd and qemu-img in one cell per round."""
    if not table.opt_in(ctx.keys) or not ctx.want("scale") or "fvd" not in ctx.names:
        return []  # opt-in: only `--workload scale` runs it
    qemu = any(n.startswith("qemu-") for n in ctx.names)
    members = ("fvd", "qemu-qcow2") if qemu else ("fvd",)
    m = functools.partial(_scale_round, ctx.workdir, qemu)
    return [Cell("scale", "16 TiB scale", members, m, fixed=True)]


CELL_FACTORIES: list[Callable[[Context], list[Cell]]] = [
    io_cells,
    snapshot_cells,
    convert_cells,
    simple_cells,
    backup_cells,
    scale_cells,
]
