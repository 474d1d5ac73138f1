"""`fvd bench --workload scale`: a 16 TiB image with 1,000 scattered 4 KiB writes, fvd
beside qemu-img on a qcow2 of the same size and writes (issue 24, "small footprints").

Per round: create, open, snapshot create, check and map are timed (ms), with the RSS an
open adds, the metadata bytes a snapshot create writes and the disk space of an empty
image. qemu-img runs one command per process (its figures include the process start:
not like for like, so no ratio verdicts; fvd's own targets are limits).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from typing import Callable, Sequence

from fvd.bench.workloads import Result
from fvd.image import Image, create
from fvd.units import KiB, MiB, TiB

SIZE = 16 * TiB
WRITES = 1000
ROWS = [
    ("scale-create", "16 TiB: create (ms)"),
    ("scale-empty-disk", "16 TiB: empty image on disk"),
    ("scale-open", "16 TiB: open (ms)"),
    ("scale-open-rss", "16 TiB: RSS added by open"),
    ("scale-snapshot", "16 TiB: snapshot create (ms)"),
    ("scale-snapshot-bytes", "16 TiB: snapshot metadata written"),
    ("scale-check", "16 TiB: check (ms)"),
    ("scale-map", "16 TiB: map (ms)"),
]


def offsets(count: int = WRITES, seed: int = 24) -> list[int]:
    rng = random.Random(seed)
    return sorted({rng.randrange(SIZE // MiB) * MiB for _ in range(count)})


def _ms(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fvd_round(path: str, offs: Sequence[int]) -> dict[str, float]:
    if os.path.exists(path):
        os.unlink(path)
    out = {"scale-create": _ms(lambda: create(path, SIZE))}
    out["scale-empty-disk"] = os.stat(path).st_blocks * 512 / MiB
    with Image(path, "r+") as img:
        for off in offs:
            img.write(off, b"\xa5" * (4 * KiB))
    before = _rss()
    t = time.perf_counter()
    img = Image(path, "r+")
    out["scale-open"] = (time.perf_counter() - t) * 1e3
    out["scale-open-rss"] = (_rss() - before) / MiB
    with img:
        written = img.stats.metadata_bytes_written
        out["scale-snapshot"] = _ms(lambda: img.create_snapshot("s1"))
        out["scale-snapshot-bytes"] = (img.stats.metadata_bytes_written - written) / MiB
    with Image(path, "r") as ro:
        out["scale-map"] = _ms(ro.extents_array)
    out["scale-check"] = _ms(lambda: _fvd_check(path))
    return out


def _fvd_check(path: str) -> None:
    with Image(path, "r", _for_check=True) as img:
        result = img.check()
    if result.corruptions or result.leaks:
        raise RuntimeError(f"{path}: scale image does not check clean: {result.messages}")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _qemu_round(path: str, offs: Sequence[int]) -> dict[str, float]:
    if os.path.exists(path):
        os.unlink(path)
    out = {"scale-create": _ms(lambda: _run("qemu-img", "create", "-f", "qcow2", path, "16T"))}
    out["scale-empty-disk"] = os.stat(path).st_blocks * 512 / MiB
    cmds = [a for off in offs for a in ("-c", f"write -P 0xa5 {off} 4k")]
    _run("qemu-io", "-f", "qcow2", *cmds, path)
    out["scale-snapshot"] = _ms(lambda: _run("qemu-img", "snapshot", "-c", "s1", path))
    out["scale-check"] = _ms(lambda: _run("qemu-img", "check", path))
    out["scale-map"] = _ms(lambda: _run("qemu-img", "map", "--output=json", path))
    return out


UNITS = {"scale-empty-disk": "MiB", "scale-open-rss": "MiB", "scale-snapshot-bytes": "MiB"}


def measure_scale(workdir: str, qemu: bool) -> list[Result]:
    """One round: fvd's figures, and qemu-img's where it has the operation."""
    offs = offsets()
    figures = {"fvd": _fvd_round(os.path.join(workdir, "scale.fvd"), offs)}
    if qemu and shutil.which("qemu-img") and shutil.which("qemu-io"):
        figures["qemu-qcow2"] = _qemu_round(os.path.join(workdir, "scale.qcow2"), offs)
    for name in ("scale.fvd", "scale.qcow2"):
        if os.path.exists(os.path.join(workdir, name)):
            os.unlink(os.path.join(workdir, name))
    results = []
    for impl, values in figures.items():
        mine = impl == "fvd"  # qemu-img: a process per command, not like for like
        for key, value in values.items():
            unit = UNITS.get(key, "ms")
            note = f"{SIZE // TiB} TiB, {len(offs)} scattered 4 KiB writes"
            results.append(
                Result(key, impl, value, unit, False, 1, 0.0, note=note, like_for_like=mine)
            )
    return results
