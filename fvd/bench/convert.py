"""Convert rows of `fvd bench`: fvd convert beside `qemu-img convert`, like with like.

Every row compares fvd with qemu-img writing the *same output format* from the same
data (qemu-img cannot read fvd, so an fvd source is compared with qemu-img reading the
same data as qcow2). The peer column names the output: `qemu-qcow2` is `qemu-img convert
-O qcow2`, `qemu-raw` is `qemu-img convert -O raw`; each result's note names the exact
qemu-img command.

Sources: a sparse raw image laid out like a used file system (runs of 4 KiB .. 1 MiB,
about a third of the disk, some all-zero 4 KiB pages inside the data), the same data as
fvd and qcow2, and a 5-deep qcow2 chain over it (`chain`: the base plus 4 overlays of
scattered 4 KiB writes, the restore case). Values are MiB of virtual disk per second,
one per round in `fvd bench` (`ConvertBench`: the runner takes the median of the rounds
and of the per-round ratios), each run ending with the output durable (fvd syncs
before its rename, qemu-img runs with `-t writeback`: flush at exit); the `-t unsafe`
rows flush nothing (qemu-img convert's own default), the page cache is synced between
their runs outside the timing.

`python -m fvd.bench.convert [--mib N] [--repeat N]` prints the same comparison with
both commands spelled out, fvd timed as a library call and as a command.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence, Union

from fvd import qcow2
from fvd.bench.workloads import MiB, Result
from fvd.convert import convert

# (source, output format, peer column, the source qemu-img reads: the same data)
PAIRS = [
    ("raw", "fvd", "qemu-qcow2", "raw"),
    ("qcow2", "fvd", "qemu-qcow2", "qcow2"),
    ("fvd", "raw", "qemu-raw", "qcow2"),
    ("fvd", "qcow2", "qemu-qcow2", "qcow2"),
    ("raw", "qcow2", "qemu-qcow2", "raw"),
    ("chain", "raw", "qemu-raw", "chain"),
]
TITLES = {"chain": "5-deep qcow2 chain"}
# (key, title, source, output format, peer column, cache mode)
ROWS = [
    (
        f"convert-{s}-{d}" + ("" if cache == "writeback" else "-unsafe"),
        f"convert {TITLES.get(s, s)} -> {d}" + ("" if cache == "writeback" else ", -t unsafe"),
        s,
        d,
        peer,
        cache,
    )
    for cache in ("writeback", "unsafe")
    for s, d, peer, _q in PAIRS
]
QEMU_SOURCE = {s: q for s, _d, _p, q in PAIRS}
QEMU_WHAT = {"qemu-qcow2": "-O qcow2, same data", "qemu-raw": "-O raw, same data"}
DATA_FRACTION = 0.35
CHAIN_DEPTH = 5  # the base and 4 overlays
CHAIN_WRITES = 0.002  # each overlay: scattered 4 KiB writes over 0.2% of the 4 KiB pages


def make_source(path: str, mib: int, seed: int = 11) -> None:
    """A sparse raw file of `mib` MiB laid out like a used file system: data runs of
    4 KiB .. 1 MiB over about 35% of it; every 16th page of a run is zero half the time."""
    rng = random.Random(seed)
    size = mib * MiB
    pages = size // 4096
    with open(path, "wb") as f:
        f.truncate(size)
        filled = 0
        while filled < pages * DATA_FRACTION:
            n = min(pages, rng.choice((1, 2, 4, 8, 16, 32, 64, 128, 256)))
            at = rng.randrange(0, pages - n + 1)
            data = bytearray(os.urandom(n * 4096))
            for k in range(0, n, 16):
                if rng.random() < 0.5:
                    data[k * 4096 : (k + 1) * 4096] = bytes(4096)
            f.seek(at * 4096)
            f.write(data)
            filled += n


def make_chain(base_raw: str, folder: str, seed: int = 5) -> str:
    """A qcow2 chain of CHAIN_DEPTH images over the data of `base_raw` (the base made by
    qemu-img when it exists, else by fvd); returns the top. Overlays get scattered 4 KiB
    writes, as nightly backups of a running guest would."""
    base = os.path.join(folder, "chain0.qcow2")
    if shutil.which("qemu-img"):
        _qemu_img("convert", "-f", "raw", "-O", "qcow2", base_raw, base)
    else:
        convert(base_raw, base, dst_format="qcow2")
    rng = random.Random(seed)
    size = os.path.getsize(base_raw)
    top = base
    for depth in range(1, CHAIN_DEPTH):
        path = os.path.join(folder, f"chain{depth}.qcow2")
        qcow2.create(path, size, backing_file=os.path.basename(top), backing_format="qcow2")
        with qcow2.open(path, "r+") as img:
            for _ in range(max(1, int(size // 4096 * CHAIN_WRITES))):
                img.write(rng.randrange(0, size // 4096) * 4096, os.urandom(4096))
        top = path
    return top


def _qemu_img(*args: object) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def qemu_args(
    sources: dict[str, str], src: str, dst_format: str, cache: str, out: str
) -> list[str]:
    """The qemu-img convert arguments of a row's peer (same output format, same data)."""
    qsrc = QEMU_SOURCE[src]
    dst_format = "raw" if dst_format == "raw" else "qcow2"  # qemu-img writes no fvd
    flag = ["-t", "writeback"] if cache == "writeback" else []
    fmt = "raw" if qsrc == "raw" else "qcow2"
    return ["convert", *flag, "-f", fmt, "-O", dst_format, sources[qsrc], out]


def make_sources(folder: str, mib: int) -> dict[str, str]:
    """raw, fvd and qcow2 copies of one data set, and the qcow2 chain over it."""
    src = {f: os.path.join(folder, f"src.{f}") for f in ("raw", "fvd", "qcow2")}
    make_source(src["raw"], mib)
    convert(src["raw"], src["fvd"])
    convert(src["raw"], src["qcow2"], dst_format="qcow2")
    src["chain"] = make_chain(src["raw"], folder)
    return src


Cell = tuple[Callable[[], object], Callable[[], None]]
Row = tuple[str, str, str, str, str, str]  # an entry of ROWS


class ConvertBench:
    """The convert rows for `fvd bench`, one round at a time: sources made once, then
    every round runs each fvd row right after (or, every other round, right before) its
    qemu-img peer writing the same output format from the same data."""

    def __init__(
        self, workdir: str, mib: int, with_qemu: bool = True, keys: Optional[Sequence[str]] = None
    ) -> None:
        self.dir = os.path.join(workdir, "convert")
        self.mib = mib
        self.with_qemu = with_qemu and shutil.which("qemu-img") is not None
        self.rows = [r for r in ROWS if not keys or any(r[0].startswith(k) for k in keys)]
        self.cells: dict[Union[str, tuple[str, ...]], Cell] = {}
        self.peers: dict[str, tuple[str, ...]] = {}  # row key -> its qemu-img arguments

    def setup(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        src = make_sources(self.dir, self.mib)
        self.out = os.path.join(self.dir, "out")
        for key, _title, sfmt, dfmt, _peer, cache in self.rows:
            clean = self._rm if cache == "writeback" else self._rm_synced
            fmt = "qcow2" if sfmt == "chain" else sfmt
            run = functools.partial(
                convert, src[sfmt], self.out, src_format=fmt, dst_format=dfmt, cache=cache
            )
            self.cells[key] = (run, clean)
            if self.with_qemu:
                args = tuple(qemu_args(src, sfmt, dfmt, cache, self.out))
                self.peers[key] = args
                self.cells[args] = (functools.partial(_qemu_img, *args), clean)

    def _rm(self) -> None:
        if os.path.exists(self.out):
            os.unlink(self.out)

    def _rm_synced(self) -> None:  # -t unsafe leaves dirty pages: not the next run's cost
        self._rm()
        os.sync()

    def one_round(
        self, rnd: int, members: Sequence[str] = (), rows: Optional[frozenset[str]] = None
    ) -> list[Result]:
        """Every cell once (order reversed on odd rounds) -> Results, MiB/s; with `rows`,
        only those rows' cells."""
        if not self.cells:
            self.setup()
        mine = [r for r in self.rows if rows is None or r[0] in rows]
        names = [n for n in self.cells if n in {k for k, *_ in mine} | self._peers(mine)]
        t = {name: _timed(*self.cells[name]) for name in (names[::-1] if rnd % 2 else names)}
        self._rm()
        results = []
        for key, _title, _s, _d, peer, cache in mine:
            note = f"{self.mib} MiB, ~35% data, -t {cache}"
            results.append(self._result(key, "fvd", t[key], note))
            args = self.peers.get(key)
            if args is not None:
                cmd = "qemu-img " + " ".join(os.path.basename(a) for a in args)
                results.append(self._result(key, peer, t[args], cmd))
        return results

    def _peers(self, rows: list[Row]) -> set[tuple[str, ...]]:
        return {self.peers[r[0]] for r in rows if r[0] in self.peers}

    def _result(self, key: str, impl: str, seconds: float, note: str) -> Result:
        return Result(key, impl, self.mib / seconds, "MiB/s", True, 1, seconds, note=note)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _timed(fn: Callable[[], object], cleanup: Callable[[], object]) -> float:
    cleanup()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(
    cells: dict[Union[str, tuple[str, ...]], Cell], repeat: int
) -> dict[Union[str, tuple[str, ...]], float]:
    """Median seconds of every cell; round 1 of every cell, then round 2...: noise
    hits all alike."""
    times: dict[Union[str, tuple[str, ...]], list[float]] = {name: [] for name in cells}
    for _ in range(repeat):
        for name, (fn, cleanup) in cells.items():
            cleanup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def fvd_args(src: str, sfmt: str, dst_format: str, cache: str, out: str) -> list[str]:
    """The `fvd convert` arguments of a row (the command line twin of the library call)."""
    flag = ["-t", "unsafe"] if cache == "unsafe" else []
    fmt = "qcow2" if sfmt == "chain" else sfmt
    return ["convert", *flag, "-f", fmt, "-O", dst_format, src, out]


def compare(workdir: str, mib: int, repeat: int, keys: Optional[Sequence[str]] = None) -> str:
    """Like-for-like table: per row the fvd command, the qemu-img command, and their
    median seconds (fvd as a command and as a library call), interleaved rounds."""
    d = os.path.join(workdir, "convert-compare")
    os.makedirs(d, exist_ok=True)
    try:
        src = make_sources(d, mib)
        out = os.path.join(d, "out")

        def cleanup(cache: str) -> Callable[[], None]:
            def rm() -> None:
                if os.path.exists(out):
                    os.unlink(out)
                if cache == "unsafe":
                    os.sync()

            return rm

        cells: dict[Union[str, tuple[str, ...]], Cell] = {}
        rows = [r for r in ROWS if not keys or any(r[0].startswith(k) for k in keys)]
        env = _installed_env(d)
        for key, _title, sfmt, dfmt, _peer, cache in rows:
            fmt = "qcow2" if sfmt == "chain" else sfmt
            lib = functools.partial(
                convert, src[sfmt], out, src_format=fmt, dst_format=dfmt, cache=cache
            )
            cli = [sys.executable, "-m", "fvd.cli", *fvd_args(src[sfmt], sfmt, dfmt, cache, out)]
            qargs = tuple(qemu_args(src, sfmt, dfmt, cache, out))
            cells["lib", key] = (lib, cleanup(cache))
            cells["cli", key] = (functools.partial(_run, cli, env), cleanup(cache))
            cells[qargs] = (functools.partial(_qemu_img, *qargs), cleanup(cache))
        t = _interleaved(cells, repeat)
        lines = [
            f"fvd convert beside qemu-img convert: {mib} MiB virtual, median of {repeat} "
            "interleaved rounds; ratio = qemu-img seconds / fvd seconds (>= 1: fvd as fast)"
        ]
        for key, title, sfmt, dfmt, _peer, cache in rows:
            qargs = tuple(qemu_args(src, sfmt, dfmt, cache, out))
            q, c, lib_t = t[qargs], t["cli", key], t["lib", key]
            short = functools.partial(_short, d)
            lines += [
                f"{title}:",
                f"  fvd {short(fvd_args(src[sfmt], sfmt, dfmt, cache, out))}"
                f"  {c:.3f} s  {q / c:.2f}x",
                f"  fvd.convert(...) library call  {lib_t:.3f} s  {q / lib_t:.2f}x",
                f"  qemu-img {short(list(qargs))}  {q:.3f} s",
            ]
        return "\n".join(lines)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _short(folder: str, args: list[str]) -> str:
    return " ".join(os.path.relpath(a, folder) if a.startswith(folder) else a for a in args)


def _run(cmd: list[str], env: Optional[dict[str, str]] = None) -> None:
    subprocess.run(cmd, check=True, capture_output=True, env=env)


def _installed_env(folder: str) -> dict[str, str]:
    """The environment of the timed `fvd` commands: byte code cached (in `folder`), as
    for an installed package, even where PYTHONDONTWRITEBYTECODE is set (compiling
    every module costs ~0.4 s a run here); one untimed run fills the cache."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(folder, "pycache")
    _run([sys.executable, "-m", "fvd.cli", "--help"], env)
    return env


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fvd.bench.convert", description="fvd convert beside qemu-img convert"
    )
    p.add_argument("--mib", type=int, default=1024, help="virtual size (default 1024)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--rows", help="comma-separated row keys (prefixes), default all")
    p.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = p.parse_args(argv)
    if shutil.which("qemu-img") is None:
        print("qemu-img not found", file=sys.stderr)
        return 1
    keys = args.rows.split(",") if args.rows else None
    folder = args.dir or os.environ.get("TMPDIR", "/var/tmp")
    print(compare(folder, args.mib, args.repeat, keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
