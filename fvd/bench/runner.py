"""`fvd bench`: FVD against the qcow2 baseline, a plain file and QEMU, in one table.

The CLI calls `add_arguments(parser)` on its `bench` subparser and `run(args) -> int`.
Workloads live in fvd.bench.workloads (shared with the pytest-benchmark suite in bench/),
contenders in fvd.bench.impls, the QEMU runner in fvd.bench.qemu.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

import fvd
from fvd import _impl
from fvd.bench import backup as bb
from fvd.bench import impls, metadata
from fvd.bench import qemu as bench_qemu
from fvd.bench import workloads as wl
from fvd.bench.backup import rows as backup_rows
from fvd.bench.convert import ROWS as CONVERT_ROWS
from fvd.bench.convert import measure_convert
from fvd.units import parse_size

DEFAULT_IMPLS = impls.NAMES
# the python twin runs only the core rows of issue 2 (it is the fallback, not a contender)
PY_ROWS = ("alloc4k-wt", "read4k", "seqread1m", "seqwrite1m")

# a cell to measure: (progress title, row key, contender, measure -> its Results)
Job = tuple[str, str, impls.Contender, Callable[[], list[wl.Result]]]
Want = Callable[[str], bool]  # is this row key wanted
Target = dict[str, Any]  # one of the targets: target, measured, value, status


# rows of the table, in order: (key, title)
def row_titles(scale: wl.Scale) -> list[tuple[str, str]]:
    rows = [(w.key, w.title) for w in wl.io_workloads(scale)]
    for k in scale.snapshots:
        rows.append((f"snap-create-x{k}", f"snapshot create, {k} snaps"))
        rows.append((f"snap-delete-x{k}", f"snapshot delete, {k} snaps"))

    rows += [(key, f"{title} ({scale.convert_mib} MiB)") for key, title, *_ in CONVERT_ROWS]
    rows += [
        ("open", "open (r), allocated image"),
        ("metadata/TiB", "metadata per TiB"),
        ("translate", "translate chunk index"),
    ]

    return rows + backup_rows()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `fvd bench` options to an argparse (sub)parser."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, one repetition: finishes in well under a minute",
    )
    parser.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="text table (default) or machine-readable JSON",
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw a bar chart (needs matplotlib: pip install 'fvd[plot]')",
    )
    parser.add_argument(
        "--ops", type=int, help="random 4 KiB operations per workload (default 2048, quick 256)"
    )
    parser.add_argument(
        "--size",
        metavar="BYTES",
        help="sequential I/O volume, 1 MiB ops (suffixes K M G; default 256M, quick 64M)",
    )
    parser.add_argument(
        "--flush-every",
        type=int,
        metavar="N",
        help="writeback rows flush every N writes (default 16)",
    )
    parser.add_argument(
        "--repeat", type=int, help="fresh runs per cell; the median is shown (default 3, quick 1)"
    )
    parser.add_argument(
        "--snapshots",
        metavar="K,K...",
        help="snapshot counts to time (default 1,100,1000; quick 1,20)",
    )
    parser.add_argument(
        "--impl", metavar="NAME,...", help="implementations (columns): " + ",".join(DEFAULT_IMPLS)
    )
    parser.add_argument(
        "--workload",
        metavar="KEY,...",
        help="only these rows (prefix match on the row key, e.g. alloc,read4k)",
    )
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU columns")
    parser.add_argument(
        "--load",
        metavar="FILE.json",
        help="print (or --plot) a run saved with --output=json; measures nothing",
    )
    parser.add_argument(
        "--dir",
        metavar="DIR",
        help="where to put temporary images (default: the current directory;"
        " use the disk you want measured)",
    )
    return parser


def scale_from_args(args: argparse.Namespace) -> wl.Scale:
    scale = wl.Scale.quick() if getattr(args, "quick", False) else wl.Scale()
    if getattr(args, "ops", None):
        scale.ops = args.ops
    if getattr(args, "size", None):
        scale.seq_mib = max(1, parse_size(args.size) // wl.MiB)
    if getattr(args, "flush_every", None):
        scale.flush_every = args.flush_every
    if getattr(args, "repeat", None):
        scale.repeat = args.repeat
    if getattr(args, "snapshots", None):
        scale.snapshots = tuple(int(k) for k in args.snapshots.split(",") if k.strip())
    return scale


# ----- machine description --------------------------------------------------------------
def machine_info(workdir: str) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    fs = ""
    try:
        best = ""
        real = os.path.realpath(workdir)
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fs = mnt, f"{typ} ({dev} on {mnt})"
    except OSError:
        pass
    qemu = ""
    if shutil.which("qemu-img"):
        try:
            qemu = subprocess.run(
                ["qemu-img", "--version"], capture_output=True, text=True
            ).stdout.splitlines()[0]
        except (OSError, IndexError):
            pass

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "filesystem": fs,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fvd": fvd.__version__,
        "fvd_implementation": _impl.IMPLEMENTATION,
        "qemu": qemu,
    }


# ----- running -------------------------------------------------------------------------
def _progress(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def _fmt_value(r: Optional[wl.Result]) -> str:
    if r is None or r.value is None:
        return "-"
    v = r.value
    if r.unit in ("ops/s", "lookups/s"):
        for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
            if v >= div:
                return f"{v / div:.3g}{suf}"
        return f"{v:.3g}"
    if r.unit == "MiB/s":
        return f"{v:.0f}M/s" if v >= 100 else f"{v:.3g}M/s"
    if r.unit == "ms":
        return f"{v:.3g}ms"
    if r.unit == "MiB":
        return f"{v:.4g}M"
    return f"{v:.3g}"


def run_all(
    scale: wl.Scale,
    names: Sequence[str],
    workdir: str,
    keys: Optional[Sequence[str]] = None,
    progress: bool = True,
) -> list[wl.Result]:
    """Every (workload, implementation) cell -> list of Result."""
    contenders = [impls.BY_NAME[n] for n in names]
    want = (lambda k: True) if not keys else (lambda k: any(k.startswith(p) for p in keys))
    results, errors = [], []
    previous = _impl.IMPLEMENTATION
    jobs: list[Job] = []
    # Repetitions are interleaved (round 1 of every cell, then round 2...) so that a slow
    # spell of a shared disk hits every implementation alike; medians are merged below.
    for rep in range(scale.repeat):
        tag = f" (round {rep + 1}/{scale.repeat})" if scale.repeat > 1 else ""
        for w in wl.io_workloads(scale):
            if want(w.key):
                for c in contenders:
                    if c.name == "fvd-py" and not w.key.startswith(PY_ROWS):
                        continue
                    jobs.append(
                        (
                            w.title + tag,
                            w.key,
                            c,
                            functools.partial(_io_cell, w, c, workdir, rep),
                        )
                    )
    for k in scale.snapshots:
        if want(f"snap-create-x{k}") or want(f"snap-delete-x{k}"):
            for c in contenders:
                jobs.append(
                    (
                        f"snapshots x{k}",
                        f"snap-create-x{k}",
                        c,
                        functools.partial(_snapshot_cell, c, workdir, k, scale.snap_data_ops),
                    )
                )
    if want("convert") and "fvd" in names:
        qemu = any(n.startswith("qemu-") for n in names)
        jobs.append(
            (
                "convert",
                "convert",
                impls.BY_NAME["fvd"],
                lambda: measure_convert(workdir, scale.convert_mib, scale.repeat, qemu, keys),
            )
        )
    if want("open"):
        for c in contenders:
            if c.python:
                jobs.append(
                    (
                        "open",
                        "open",
                        c,
                        functools.partial(
                            lambda c: [wl.measure_open(c, workdir, scale.open_ops)], c
                        ),
                    )
                )
    if want("metadata"):
        for c in contenders:
            jobs.append(
                (
                    "metadata/TiB",
                    "metadata/TiB",
                    c,
                    functools.partial(lambda c: [metadata.measure_metadata(c, workdir)], c),
                )
            )
    if want("translate"):
        for c in contenders:
            if c.name in ("fvd", "fvd-py"):
                jobs.append(
                    (
                        "translate",
                        "translate",
                        c,
                        functools.partial(lambda c: [wl.measure_translate(c, scale)], c),
                    )
                )
    jobs += _backup_jobs(scale, names, workdir, want)
    try:
        for i, (title, key, c, job) in enumerate(jobs, 1):
            t0 = time.perf_counter()
            try:
                out = job()
            except Exception as e:
                # one broken cell must not lose the whole table; the note says why
                out = [wl.Result(key, c.name, None, "", note=f"error: {type(e).__name__}: {e}")]
                errors.append(out[0])
                _progress(True, f"fvd bench: {c.name} failed on {title}: {type(e).__name__}: {e}")
            results.extend(out)
            shown = ", ".join(_fmt_value(r) if r.value is not None else "n/a" for r in out)
            _progress(
                progress,
                f"[{i}/{len(jobs)}] {title}: {c.name} {shown} ({time.perf_counter() - t0:.1f}s)",
            )
    finally:
        _impl.select(previous)
    return merge_rounds(results)


def _io_cell(w: wl.IoWorkload, c: impls.Contender, workdir: str, rep: int) -> list[wl.Result]:
    """One round of an I/O row: in this process, or through QEMU (I/O counted in round 1)."""
    if c.python:
        return [wl.measure_io(w, c, workdir, 1)]
    result: wl.Result = _qemu().measure_io_qemu(w, c, workdir, 1, counts=rep == 0)
    return [result]


def _snapshot_cell(c: impls.Contender, workdir: str, count: int, data_ops: int) -> list[wl.Result]:
    if c.python:
        return wl.measure_snapshots(c, workdir, count, data_ops)
    results: list[wl.Result] = _qemu().measure_snapshots_qemu(c, workdir, count, data_ops)
    return results


def _backup_jobs(scale: wl.Scale, names: Sequence[str], workdir: str, want: Want) -> list[Job]:
    """Rows of the backup data path (fvd.bench.backup): fvd only, and ovirt-imageio's
    checksum in the raw column."""

    if "fvd" not in names:
        return []
    fvd_c = impls.BY_NAME["fvd"]
    sz = bb.sizes(scale.ops < wl.Scale().ops)  # --quick: smaller images
    show = lambda msg: _progress(True, msg)  # noqa: E731
    jobs: list[Job] = []
    if want("changed-extents"):
        jobs.append(
            (
                "changed extents",
                "changed-extents",
                fvd_c,
                lambda: bb.measure_changed(sz["changed"], sz["repeat"], show),
            )
        )
    if want("sparse-extents"):
        jobs.append(
            (
                "sparse extents",
                "sparse-extents",
                fvd_c,
                lambda: bb.measure_sparse_extents(sz["sparse"], sz["repeat"]),
            )
        )
    if want("checksum"):
        jobs.append(
            (
                "checksum",
                "checksum",
                fvd_c,
                lambda: bb.measure_checksum(workdir, sz["checksum"], sz["repeat"]),
            )
        )
    return jobs


def merge_rounds(results: list[wl.Result]) -> list[wl.Result]:
    """One Result per (workload, implementation): median value and time over the rounds,
    I/O counts from the round that has them."""
    groups: dict[tuple[str, str], list[wl.Result]] = {}
    for r in results:
        groups.setdefault((r.workload, r.impl), []).append(r)
    merged = []
    for rs in groups.values():
        if len(rs) == 1:
            merged.append(rs[0])
            continue
        ok = [r for r in rs if r.value is not None]
        if not ok:
            merged.append(rs[0])
            continue
        first = ok[0]
        counts = next((r.counts for r in ok if r.counts), {})
        merged.append(
            wl.Result(
                first.workload,
                first.impl,
                statistics.median(r.value for r in ok if r.value is not None),
                first.unit,
                first.higher_is_better,
                first.ops,
                statistics.median(r.seconds for r in ok),
                counts,
                (first.note + "; " if first.note else "") + f"median of {len(ok)} rounds",
            )
        )
    return merged


def _qemu() -> ModuleType:

    return bench_qemu


# ----- reporting -----------------------------------------------------------------------
def advantage(fvd_result: Optional[wl.Result], other: Optional[wl.Result]) -> Optional[float]:
    """How many times better FVD is than `other` (>1: FVD better)."""
    if fvd_result is None or other is None or not fvd_result.value or not other.value:
        return None
    if other.higher_is_better:
        return fvd_result.value / other.value
    return other.value / fvd_result.value


def _counts_cell(r: Optional[wl.Result], kind: str = "write") -> str:
    c = r.counts if r else None
    if not c:
        return ""

    def n(x: float) -> str:
        return f"{x:.3g}"

    def b(x: float) -> str:
        for div, suf in ((1 << 20, "M"), (1 << 10, "K")):
            if x >= div * 0.995:
                return f"{x / div:.3g}{suf}"
        return f"{x:.0f}"

    parts = []
    if c.get("writes"):
        parts.append(f"w{n(c['writes'])}/{b(c['bytes_written'])}")
    if c.get("flushes"):
        parts.append(f"f{n(c['flushes'])}")
    if c.get("metadata_writes"):
        parts.append(f"m{n(c['metadata_writes'])}")
    if c.get("refcount_updates"):
        parts.append(f"rc{n(c['refcount_updates'])}")
    if c.get("fallocates"):
        parts.append(f"fa{n(c['fallocates'])}")
    if c.get("reads"):
        parts.append(f"r{n(c['reads'])}/{b(c['bytes_read'])}")
    return " ".join(parts)


def index(results: list[wl.Result]) -> dict[tuple[str, str], wl.Result]:
    return {(r.workload, r.impl): r for r in results}


def text_table(
    results: list[wl.Result],
    scale: wl.Scale,
    names: Sequence[str],
    info: dict[str, Any],
    workdir: str,
    quick: bool = False,
) -> str:
    idx = index(results)
    rows = [(k, t) for k, t in row_titles(scale) if any((k, n) in idx for n in names)]
    cols = [n for n in names if any((k, n) in idx for k, _ in rows)]
    lw = max([len(t) for _, t in rows] + [20]) + 2
    cells = {}
    for key, _ in rows:
        f = idx.get((key, "fvd"))
        for n in cols:
            r = idx.get((key, n))
            cell = _fmt_value(r)
            a = advantage(f, r) if n != "fvd" else None
            if a is not None:
                cell += f" {a:.2f}x"
            cells[key, n] = (cell, _counts_cell(r))
    cw = {
        n: max([len(n)] + [max(len(v), len(c)) for (k, m), (v, c) in cells.items() if m == n]) + 2
        for n in cols
    }
    out = []
    out.append(
        f"fvd bench{' --quick' if quick else ''}: "
        f"fvd {info['fvd']} ({info['fvd_implementation']}), {info['nproc']} CPUs, "
        f"{info['cpu']}, {info['filesystem'] or workdir}"
    )
    out.append(
        f"8 GiB sparse images; {scale.ops} random 4K writes, {scale.reads} 4K reads, "
        f"{scale.seq_mib} MiB sequential in 1 MiB ops; wt = writethrough, "
        f"wb/N = writeback + flush every N writes; "
        f"median of {scale.repeat} (reads: best of 5 passes)"
    )
    out.append(
        "cells: value and FVD's advantage (x>1: FVD better); 2nd line: I/O per op "
        "(w writes/bytes, f flushes, m metadata writes, rc refcount updates, "
        "fa fallocate, r reads/bytes)"
    )
    out.append("")
    out.append("workload".ljust(lw) + "".join(n.ljust(cw[n]) for n in cols))
    out.append("-" * (lw + sum(cw.values())))
    for key, title in rows:
        line = title.ljust(lw)
        cline = "  I/O per op".ljust(lw)
        for n in cols:
            v, c = cells[key, n]
            line += v.ljust(cw[n])
            cline += c.ljust(cw[n])
        out.append(line.rstrip())
        if cline.strip() != "I/O per op":
            out.append(cline.rstrip())
    notes: dict[str, set[str]] = {}
    for r in results:
        if r.value is None and r.note:
            notes.setdefault(r.note, set()).add(r.impl)
    if notes:
        out.append("")
        out.append("not measured:")
        for note, who in notes.items():
            out.append(f"  {', '.join(sorted(who))}: {note}")
    out.append("")
    out.append("targets:")
    for t in targets(results):
        out.append(f"  [{t['status']:>4}] {t['target']}: {t['measured']}")
    return "\n".join(out)


def targets(results: list[wl.Result]) -> list[Target]:
    """The issue's targets, each with its measured ratio and met / MISS / n/a."""
    idx = index(results)
    out: list[Target] = []

    def ratio(key: str, a: str, b: str, minimum: float, text: str) -> None:
        ra, rb = idx.get((key, a)), idx.get((key, b))
        x = None
        if ra and rb and ra.value and rb.value:
            x = ra.value / rb.value if ra.higher_is_better else rb.value / ra.value
        out.append(
            {
                "target": text,
                "measured": "n/a" if x is None else f"{x:.2f}x",
                "value": x,
                "status": "n/a" if x is None else ("met" if x >= minimum else "MISS"),
            }
        )

    f = idx.get(("alloc4k-wt", "fvd"))
    q = idx.get(("alloc4k-wt", "qcow2"))
    if f and f.counts:
        ok = f.counts["metadata_writes"] <= 1 and f.counts["flushes"] <= 1
        extra = ""
        if q and q.counts:
            extra = (
                f" (qcow2 baseline: {q.counts['metadata_writes']:.3g} metadata writes, "
                f"{q.counts['flushes']:.3g} flushes)"
            )
        out.append(
            {
                "target": "FVD alloc 4K wt: <=1 metadata write and <=1 flush per write",
                "measured": f"{f.counts['metadata_writes']:.3g} metadata writes, "
                f"{f.counts['flushes']:.3g} flushes{extra}",
                "value": None,
                "status": "met" if ok else "MISS",
            }
        )
    ratio("alloc4k-wt", "fvd", "qcow2", 1.5, "FVD alloc 4K wt >= 1.5x qcow2 baseline")
    ratio(
        "alloc4k-wt",
        "fvd",
        "qemu-qcow2",
        1.8,
        "FVD alloc 4K wt >= 1.8x QEMU qcow2 (qemu-img bench)",
    )
    ratio(
        "alloc4k-wt",
        "fvd",
        "qemu-qcow2-lazy",
        1.3,
        "FVD alloc 4K wt >= 1.3x QEMU qcow2 lazy_refcounts (qemu-img bench)",
    )
    ratio("cow4k-wt", "fvd", "qcow2", 1.5, "FVD 1st write after snapshot wt >= 1.5x qcow2 baseline")
    ratio(
        "cow4k-wt",
        "fvd",
        "qemu-qcow2",
        1.3,
        "FVD 1st write after snapshot wt >= 1.3x QEMU qcow2 (qemu-img bench)",
    )
    ratio("alloc4k-wt", "fvd", "raw", 0.8, "FVD alloc 4K wt >= 0.8x raw pwrite+fdatasync")
    ratio("overwrite4k-wt", "fvd", "qcow2", 0.9, "FVD overwrite 4K wt within 10% of qcow2")
    ratio("read4k", "fvd", "qcow2", 0.9, "FVD read 4K within 10% of qcow2")
    ratio("alloc4k-wt", "qcow2", "qemu-qcow2", 0.5, "qcow2 baseline within 2x of QEMU qcow2")

    for key, title, _s, _d, peer, cache in CONVERT_ROWS:
        what = ("-t writeback " if cache == "writeback" else "") + (
            "raw->qcow2" if peer == "qemu-qcow2" else "qcow2->raw"
        )
        ratio(key, "fvd", peer, 1.0, f"fvd {title[8:]} >= 1.0x qemu-img convert {what}")
    tr = idx.get(("translate", "fvd"))
    out.append(
        {
            "target": "cython translation >= 50M lookups/s",
            "measured": "n/a" if not (tr and tr.value) else f"{tr.value / 1e6:.0f}M/s",
            "value": tr.value if tr else None,
            "status": "n/a" if not (tr and tr.value) else ("met" if tr.value >= 50e6 else "MISS"),
        }
    )
    ratio("translate", "fvd", "fvd-py", 10, "cython translation >= 10x python twin")
    ratio("read4k", "fvd", "raw", 0.9, "cython readinto 4K >= 0.9x os.preadv")
    ratio("read4k", "fvd-py", "raw", 0.5, "python twin readinto 4K >= 0.5x os.preadv")
    ratio("seqread1m", "fvd", "raw", 0.9, "FVD sequential 1M read >= 0.9x plain file")
    key = next((r.workload for r in results if r.workload.startswith("seqwrite1m")), "seqwrite1m")
    ratio(key, "fvd", "raw", 0.9, "FVD sequential 1M write >= 0.9x plain file")
    for k, text in (
        ("changed-extents", "changed extents, 10% of chunks rewritten < 50 ms"),
        ("sparse-extents", "extents_array of a huge sparse image < 50 ms"),
    ):
        r = idx.get((k, "fvd"))
        v = r.value if r else None
        out.append(
            {
                "target": text,
                "measured": "n/a" if v is None else f"{v:.1f} ms",
                "value": v,
                "status": "n/a" if v is None else ("met" if v < 50 else "MISS"),
            }
        )
    ratio("checksum", "fvd", "raw", 1.0, "checksum >= 1.0x ovirt-imageio's of the raw file")
    return out


def plot(results: list[wl.Result], names: Sequence[str], scale: wl.Scale, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = index(results)
    rows = [(k, t) for k, t in row_titles(scale) if idx.get((k, "fvd")) and idx[(k, "fvd")].value]
    cols = [n for n in names if any(idx.get((k, n)) and idx[(k, n)].value for k, _ in rows)]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 5))
    width = 0.8 / max(len(cols), 1)
    for j, n in enumerate(cols):
        ys = []
        for k, _ in rows:
            r, f = idx.get((k, n)), idx[(k, "fvd")]
            a = advantage(f, r) if n != "fvd" else 1.0
            ys.append(1 / a if a else 0)  # relative performance, FVD = 1
        ax.bar([i + j * width for i in range(len(rows))], ys, width, label=n)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([t for _, t in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("performance relative to FVD (higher is better)")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("fvd bench")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load(path: str) -> tuple[list[wl.Result], wl.Scale, list[str], dict[str, Any], float]:
    """(results, scale, names, info, seconds) of a run saved with --output=json."""
    with open(path) as f:
        doc = json.load(f)
    results = [
        wl.Result(
            r["workload"],
            r["impl"],
            r["value"],
            r["unit"],
            r["higher_is_better"],
            r["ops"],
            r["seconds"],
            r["counts_per_op"],
            r["note"],
        )
        for r in doc["results"]
    ]
    sc = dict(doc["scale"])
    sc["snapshots"] = tuple(sc.get("snapshots", ()))
    return results, wl.Scale(**sc), doc["implementations"], doc["machine"], doc["seconds"]


def _show_saved(args: argparse.Namespace) -> int:
    try:
        results, scale, names, info, elapsed = load(args.load)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"fvd bench: {args.load}: cannot load a saved run ({e})", file=sys.stderr)
        return 1
    if args.output == "json":
        with open(args.load) as f:
            sys.stdout.write(f.read())
    else:
        print(
            text_table(
                results,
                scale,
                names,
                info,
                info.get("filesystem", ""),
                getattr(args, "quick", False),
            )
        )
        print(f"\n(total {elapsed:.1f} s)")
    if getattr(args, "plot", None):
        plot(results, names, scale, args.plot)
    return 0


def run(args: argparse.Namespace) -> int:
    """`fvd bench`; returns the exit code."""
    if getattr(args, "plot", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fvd bench: --plot needs matplotlib (pip install 'fvd[plot]')", file=sys.stderr)
            return 1
    if getattr(args, "load", None):
        return _show_saved(args)
    names = DEFAULT_IMPLS
    if getattr(args, "impl", None):
        names = [n.strip() for n in args.impl.split(",") if n.strip()]
        bad = [n for n in names if n not in impls.BY_NAME]
        if bad:
            print(
                f"fvd bench: unknown implementation {bad[0]!r} (choose from "
                f"{', '.join(DEFAULT_IMPLS)})",
                file=sys.stderr,
            )
            return 2
        if "fvd" not in names:
            names = ["fvd"] + names
    if getattr(args, "no_qemu", False):
        names = [n for n in names if not n.startswith("qemu-")]
    keys = None
    if getattr(args, "workload", None):
        keys = [k.strip() for k in args.workload.split(",") if k.strip()]
    try:
        scale = scale_from_args(args)
    except ValueError as e:
        print(f"fvd bench: {e}", file=sys.stderr)
        return 2
    parent = getattr(args, "dir", None) or os.getcwd()
    if not os.path.isdir(parent):
        print(f"fvd bench: {parent}: not a directory", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="fvd-bench-", dir=parent)
    try:
        info = machine_info(workdir)
        t0 = time.perf_counter()
        results = run_all(scale, names, workdir, keys, progress=True)
        elapsed = time.perf_counter() - t0
    except KeyboardInterrupt:
        print("fvd bench: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.output == "json":
        doc = {
            "machine": info,
            "scale": vars(scale),
            "implementations": names,
            "seconds": elapsed,
            "results": [r.as_dict() for r in results],
            "targets": targets(results),
        }
        json.dump(doc, sys.stdout, indent=2, default=list)
        print()
    else:
        print(text_table(results, scale, names, info, parent, getattr(args, "quick", False)))
        print(f"\n(total {elapsed:.1f} s)")
    failed = [r for r in results if r.note.startswith("error:")]
    if getattr(args, "plot", None):
        plot(results, names, scale, args.plot)
        print(f"fvd bench: wrote {args.plot}", file=sys.stderr)
    if args.output == "json":
        failed = [r for r in results if r.note.startswith("error:")]
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    """Standalone entry point: python -m fvd.bench."""
    parser = add_arguments(argparse.ArgumentParser(prog="fvd bench"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
