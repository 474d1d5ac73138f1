"""Convert rows of `fvd bench`: fvd convert beside `qemu-img convert` on the same data.

Source: a sparse raw image with 30% of its MiBs random data (the rest holes). Imports
(raw->fvd, qcow2->fvd) are compared with `qemu-img convert` raw->qcow2 (column
qemu-qcow2), exports (fvd->raw, fvd->qcow2) with `qemu-img convert` qcow2->raw (column
qemu-raw). Values are MiB of virtual disk per second, median of `repeat` runs, each
ending with the output durable: fvd convert syncs its output before the rename, and
qemu-img runs with `-t writeback` (it flushes at exit). The `-t unsafe` rows compare the
modes that flush nothing: `fvd convert -t unsafe` against qemu-img convert's own default
(`-t unsafe`); the page cache is synced between their runs, outside the timing.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import statistics
import subprocess
import time
from typing import Callable, Optional, Sequence, Union

from fvd.bench.workloads import MiB, Result
from fvd.convert import convert

PAIRS = [
    ("raw", "fvd", "qemu-qcow2"),
    ("qcow2", "fvd", "qemu-qcow2"),
    ("fvd", "raw", "qemu-raw"),
    ("fvd", "qcow2", "qemu-raw"),
]
# (key, title, source format, output format, qemu column, cache mode)
ROWS = [
    (
        f"convert-{s}-{d}" + ("" if cache == "writeback" else "-unsafe"),
        f"convert {s} -> {d}" + ("" if cache == "writeback" else ", -t unsafe"),
        s,
        d,
        peer,
        cache,
    )
    for cache in ("writeback", "unsafe")
    for s, d, peer in PAIRS
]
QEMU_WHAT = {"qemu-qcow2": "raw->qcow2", "qemu-raw": "qcow2->raw"}
DATA_FRACTION = 0.3


def make_source(path: str, mib: int, seed: int = 11) -> None:
    """A sparse raw file of `mib` MiB, 30% of its MiBs random data."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
        for i in sorted(rng.sample(range(mib), max(1, int(mib * DATA_FRACTION)))):
            f.seek(i * MiB)
            f.write(os.urandom(MiB))


def _timed(fn: Callable[[], object], repeat: int, cleanup: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        cleanup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _qemu_img(*args: object) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def measure_convert(
    workdir: str,
    mib: int,
    repeat: int = 1,
    with_qemu: bool = True,
    keys: Optional[Sequence[str]] = None,
) -> list[Result]:
    """Results (MiB/s of virtual disk) of every convert row, fvd and qemu-img."""

    d = os.path.join(workdir, "convert")
    os.makedirs(d, exist_ok=True)
    src = {
        "raw": os.path.join(d, "src.raw"),
        "fvd": os.path.join(d, "src.fvd"),
        "qcow2": os.path.join(d, "src.qcow2"),
    }
    make_source(src["raw"], mib)
    convert(src["raw"], src["fvd"])
    convert(src["raw"], src["qcow2"], dst_format="qcow2")
    out = os.path.join(d, "out")

    def rm() -> None:
        if os.path.exists(out):
            os.unlink(out)

    def rm_synced() -> None:  # -t unsafe leaves dirty pages: not the next run's cost
        rm()
        os.sync()

    # name -> (run, cleanup); rounds interleave every cell
    cells: dict[Union[str, tuple[str, str]], tuple[Callable[[], object], Callable[[], None]]] = {}
    if with_qemu and shutil.which("qemu-img") is not None:
        for peer, args in (
            ("qemu-qcow2", ("-f", "raw", "-O", "qcow2", src["raw"], out)),
            ("qemu-raw", ("-f", "qcow2", "-O", "raw", src["qcow2"], out)),
        ):
            cells[peer, "writeback"] = (
                functools.partial(_qemu_img, "convert", "-t", "writeback", *args),
                rm,
            )
            cells[peer, "unsafe"] = (functools.partial(_qemu_img, "convert", *args), rm_synced)
    rows = [r for r in ROWS if not keys or any(r[0].startswith(k) for k in keys)]
    for key, _title, sfmt, dfmt, _peer, cache in rows:
        cells[key] = (
            functools.partial(
                convert, src[sfmt], out, src_format=sfmt, dst_format=dfmt, cache=cache
            ),
            rm if cache == "writeback" else rm_synced,
        )
    times: dict[Union[str, tuple[str, str]], list[float]] = {name: [] for name in cells}
    for _ in range(repeat):  # round 1 of every cell, then round 2...: noise hits all
        for name, (fn, cleanup) in cells.items():
            times[name].append(_timed(fn, 1, cleanup))
    t = {name: statistics.median(v) for name, v in times.items()}
    results = []
    for key, _title, _s, _d, peer, cache in rows:
        results.append(
            Result(
                key,
                "fvd",
                mib / t[key],
                "MiB/s",
                True,
                1,
                t[key],
                note=f"{mib} MiB, 30% data, -t {cache}",
            )
        )
        if (peer, cache) in t:
            q = t[peer, cache]
            flag = "-t writeback " if cache == "writeback" else ""
            results.append(
                Result(
                    key,
                    peer,
                    mib / q,
                    "MiB/s",
                    True,
                    1,
                    q,
                    note=f"qemu-img convert {flag}{QEMU_WHAT[peer]}",
                )
            )
    rm()
    shutil.rmtree(d, ignore_errors=True)
    return results
