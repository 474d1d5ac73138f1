"""Convert rows of `fvd bench`: fvd convert beside `qemu-img convert` on the same data.

Source: a sparse raw image with 30% of its MiBs random data (the rest holes). Imports
(raw->fvd, qcow2->fvd) are compared with `qemu-img convert` raw->qcow2 (column
qemu-qcow2), exports (fvd->raw, fvd->qcow2) with `qemu-img convert` qcow2->raw (column
qemu-raw). Values are MiB of virtual disk per second, one per round (`ConvertBench`;
the runner takes the median of the rounds and of the per-round ratios), each run
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


def _timed(fn: Callable[[], object], cleanup: Callable[[], object]) -> float:
    cleanup()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _qemu_img(*args: object) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


Name = Union[str, tuple[str, str]]  # a row key (fvd), or (qemu column, cache mode)


class ConvertBench:
    """The convert rows, one round at a time: sources made once, then every round runs
    each fvd row right after (or, every other round, right before) its qemu-img peer."""

    def __init__(
        self, workdir: str, mib: int, with_qemu: bool = True, keys: Optional[Sequence[str]] = None
    ) -> None:
        self.dir = os.path.join(workdir, "convert")
        self.mib = mib
        self.with_qemu = with_qemu and shutil.which("qemu-img") is not None
        self.rows = [r for r in ROWS if not keys or any(r[0].startswith(k) for k in keys)]
        self.cells: dict[Name, tuple[Callable[[], object], Callable[[], None]]] = {}

    def setup(self) -> None:
        d = self.dir
        os.makedirs(d, exist_ok=True)
        src = {fmt: os.path.join(d, f"src.{fmt}") for fmt in ("raw", "fvd", "qcow2")}
        make_source(src["raw"], self.mib)
        convert(src["raw"], src["fvd"])
        convert(src["raw"], src["qcow2"], dst_format="qcow2")
        self.out = os.path.join(d, "out")
        qemu_args = {
            "qemu-qcow2": ("-f", "raw", "-O", "qcow2", src["raw"], self.out),
            "qemu-raw": ("-f", "qcow2", "-O", "raw", src["qcow2"], self.out),
        }
        for key, _title, sfmt, dfmt, peer, cache in self.rows:
            clean = self._rm if cache == "writeback" else self._rm_synced
            if self.with_qemu and (peer, cache) not in self.cells:
                flags = ("-t", "writeback") if cache == "writeback" else ()
                run = functools.partial(_qemu_img, "convert", *flags, *qemu_args[peer])
                self.cells[peer, cache] = (run, clean)
            self.cells[key] = (
                functools.partial(
                    convert, src[sfmt], self.out, src_format=sfmt, dst_format=dfmt, cache=cache
                ),
                clean,
            )

    def _rm(self) -> None:
        if os.path.exists(self.out):
            os.unlink(self.out)

    def _rm_synced(self) -> None:  # -t unsafe leaves dirty pages: not the next run's cost
        self._rm()
        os.sync()

    def one_round(self, rnd: int, members: Sequence[str] = ()) -> list[Result]:
        """Every cell once (order reversed on odd rounds) -> Results, MiB/s."""
        if not self.cells:
            self.setup()
        names = list(self.cells)
        t = {name: _timed(*self.cells[name]) for name in (names[::-1] if rnd % 2 else names)}
        self._rm()
        results = []
        for key, _title, _s, _d, peer, cache in self.rows:
            results.append(
                self._result(key, "fvd", t[key], f"{self.mib} MiB, 30% data, -t {cache}")
            )
            if (peer, cache) in t:
                flag = "-t writeback " if cache == "writeback" else ""
                note = f"qemu-img convert {flag}{QEMU_WHAT[peer]}"
                results.append(self._result(key, peer, t[peer, cache], note))
        return results

    def _result(self, key: str, impl: str, seconds: float, note: str) -> Result:
        return Result(key, impl, self.mib / seconds, "MiB/s", True, 1, seconds, note=note)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
