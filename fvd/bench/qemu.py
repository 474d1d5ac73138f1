"""Run the benchmark workloads through QEMU itself (qemu-img bench / qemu-io) for reference.

Workloads whose offsets are one arithmetic progression (`IoWorkload.stride()`) run in
`qemu-img bench`: the I/O loop runs inside QEMU and QEMU's own "Run completed in" time
is used, so nothing outside the loop is charged to QEMU. Random offsets cannot be given
to `qemu-img bench`; those workloads use qemu-io, timed as follows.

qemu-io time: wall time of one qemu-io process running the whole command script, minus the
median wall time of the same process with an empty script on the same image (process
start, image open and close). I/O counts: the same run repeated on a fresh image under
`strace -f`, minus the empty-script run under strace, divided by the number of ops.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from fvd.bench.impls import QemuContender, Unavailable
from fvd.bench.workloads import PATTERN, IoWorkload, Result, random_offsets

WRITE_CALLS = ("pwrite64", "pwritev", "pwritev2")
READ_CALLS = ("pread64", "preadv", "preadv2")
SYNC_CALLS = ("fdatasync", "fsync")
TRACED = WRITE_CALLS + READ_CALLS + SYNC_CALLS + ("fallocate",)

MIN_READ_OPS = 4096
MAX_PASSES = 8  # qemu-img bench runs of a workload that repeats its offsets
MIN_READ_BYTES = 1 << 30

_LINE = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(?:<\.\.\. (\w+) resumed>|(\w+)\()")
_RET = re.compile(r"\)\s+=\s+(-?\d+)")

Syscalls = dict[str, list[int]]  # syscall -> [calls, bytes]
Run = tuple[list[str], Optional[str]]  # (command, stdin text)


def run_tool(
    cmd: list[str], stdin_text: Optional[str] = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        cmd, input=stdin_text, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if check and p.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:3])}... failed ({p.returncode}): {p.stderr.strip()[:300]}"
        )
    return p


def create_image(contender: QemuContender, path: str, size: int) -> None:
    if contender.fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(size)
        return
    opts = "cluster_size=65536" + (",lazy_refcounts=on" if contender.lazy else "")
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, str(size)])


def script(
    workload: IoWorkload,
    offsets: Optional[Sequence[int]] = None,
    kind: Optional[str] = None,
    length: Optional[int] = None,
    flush_every: Optional[int] = None,
    pattern: Optional[int] = None,
) -> str:
    """qemu-io commands, one per line."""
    offsets = workload.offsets if offsets is None else offsets
    kind = kind or workload.kind
    length = length or workload.length
    every = workload.flush_every if flush_every is None else flush_every
    pat = PATTERN ^ 0xFF if pattern is None else pattern
    lines = []
    for i, off in enumerate(offsets, 1):
        if kind == "read":
            lines.append(f"read -q {off} {length}")
        else:
            lines.append(f"write -q -P {pat:#x} {off} {length}")
            if every and i % every == 0:
                lines.append("flush")
    if kind == "write" and every:
        lines.append("flush")
    return "\n".join(lines) + "\n"


def qemu_io_cmd(contender: QemuContender, path: str, cache: str) -> list[str]:
    return ["qemu-io", "-f", contender.fmt, "-t", cache, path]


def prepare(workload: IoWorkload, contender: QemuContender, path: str) -> None:
    create_image(contender, path, workload.size)
    if workload.pre_offsets:
        run_tool(
            qemu_io_cmd(contender, path, "writeback"),
            script(workload, workload.pre_offsets, "write", workload.pre_length, 0, PATTERN),
        )
    if workload.snapshot:
        if contender.fmt != "qcow2":
            raise Unavailable("raw files have no snapshots")
        run_tool(["qemu-img", "snapshot", "-c", "bench", path])


def _timed(cmd: list[str], text: Optional[str]) -> float:
    t0 = time.perf_counter()
    run_tool(cmd, text)
    return time.perf_counter() - t0


def strace_counts(cmd: list[str], text: Optional[str], workdir: str) -> Syscalls:
    """{syscall: [calls, bytes]} for one run under strace -f."""
    out = os.path.join(workdir, f"strace-{os.getpid()}.txt")
    try:
        run_tool(["strace", "-f", "-qq", "-e", "trace=" + ",".join(TRACED), "-o", out] + cmd, text)
        counts: Syscalls = {}
        with open(out) as f:
            for line in f:
                if "unfinished" in line:
                    continue
                m = _LINE.match(line)
                r = _RET.search(line)
                if not m or not r:
                    continue
                name = m.group(1) or m.group(2)
                c = counts.setdefault(name, [0, 0])
                c[0] += 1
                c[1] += max(int(r.group(1)), 0)
        return counts
    finally:
        _remove(out)


def summarise(run: Syscalls, base: Syscalls, ops: int) -> dict[str, float]:
    def total(names: Sequence[str], i: int) -> int:
        return sum(run.get(n, [0, 0])[i] - base.get(n, [0, 0])[i] for n in names)

    c = {
        "writes": total(WRITE_CALLS, 0),
        "bytes_written": total(WRITE_CALLS, 1),
        "flushes": total(SYNC_CALLS, 0),
        "reads": total(READ_CALLS, 0),
        "bytes_read": total(READ_CALLS, 1),
        "fallocates": total(("fallocate",), 0),
    }
    return {k: v / ops for k, v in c.items()}


_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def bench_cmd(
    workload: IoWorkload, contender: QemuContender, path: str, count: Optional[int] = None
) -> list[str]:
    """`qemu-img bench` running the workload's whole progression inside QEMU."""
    stride = workload.stride()
    assert stride is not None  # only workloads with a stride run here
    start, step, n, _ = stride
    cmd = [
        "qemu-img",
        "bench",
        "-f",
        contender.fmt,
        "-t",
        workload.cache,
        "-d",
        "1",
        "-c",
        str(n if count is None else count),
        "-s",
        str(workload.length),
        "-S",
        str(step),
        "-o",
        str(start),
    ]
    if workload.kind == "write":
        cmd += ["-w", f"--pattern={PATTERN ^ 0xFF}"]
        if workload.flush_every:
            cmd.append(f"--flush-interval={workload.flush_every}")
    return cmd + [path]


def bench_seconds(cmd: list[str]) -> float:
    p = subprocess.run(cmd, capture_output=True, text=True)
    m = _COMPLETED.search(p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(
            f"qemu-img bench failed ({p.returncode}): {(p.stderr or p.stdout).strip()[:300]}"
        )
    return float(m.group(1))


@dataclass(frozen=True)
class IoJob:
    """One I/O row through QEMU: what, by which contender, where, how often."""

    workload: IoWorkload
    contender: QemuContender
    workdir: str
    repeat: int = 1
    counts: bool = True  # also count the I/O (strace, one more run)

    def image(self, prefix: str) -> str:
        return os.path.join(self.workdir, f"{prefix}-{self.contender.name}-{os.getpid()}.img")


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _rounds(
    job: IoJob,
    path: str,
    one_round: Callable[[], float],
    empty_run: Run,
    counted_run: Run,
    counted_ops: int,
    note: str,
) -> tuple[list[float], dict[str, float], str]:
    """`job.repeat` timed rounds on fresh images, then exact I/O counts: `counted_run`
    minus `empty_run` (each a (cmd, stdin text)) under strace. -> (times, per_op, note)."""
    try:
        times = []
        for _ in range(job.repeat):
            prepare(job.workload, job.contender, path)
            times.append(one_round())
        per_op = {}
        if job.counts and shutil.which("strace"):
            prepare(job.workload, job.contender, path)
            b = strace_counts(*empty_run, job.workdir)
            r = strace_counts(*counted_run, job.workdir)
            per_op = summarise(r, b, counted_ops)
        elif job.counts:
            note += "; strace not found, no I/O counts"
        return times, per_op, note
    finally:
        _remove(path)


def _io_result(
    job: IoJob, times: list[float], ops: int, per_op: dict[str, float], note: str
) -> Result:
    w, name, t = job.workload, job.contender.name, statistics.median(times)
    if t <= 0:
        note += "; below the timer's resolution or process-start noise"
        return Result(w.key, name, None, w.unit, True, ops, t, per_op, note)
    value = ops / t if w.unit == "ops/s" else ops * w.length / (1 << 20) / t
    return Result(w.key, name, value, w.unit, True, ops, t, per_op, note)


def _measure_qemu_bench(job: IoJob) -> Result:
    """The workload through `qemu-img bench` (QEMU's in-process loop)."""
    w, c = job.workload, job.contender
    stride = w.stride()
    assert stride is not None  # only workloads with a stride run here
    _, _, n, passes = stride
    passes = min(passes, MAX_PASSES)  # one process per pass: the rate needs only a few
    path = job.image("qbench")
    cmd = bench_cmd(w, c, path)

    def one_round() -> float:
        if w.kind == "read":
            bench_seconds(cmd)  # "cached": one untimed pass
        return sum(bench_seconds(cmd) for _ in range(passes))

    empty = (bench_cmd(w, c, path, 0), None)
    note = "qemu-img bench: QEMU's in-process loop, its own timing"
    times, per_op, note = _rounds(job, path, one_round, empty, (cmd, None), n, note)
    return _io_result(job, times, n * passes, per_op, note)


def measure_io_qemu(
    workload: IoWorkload,
    contender: QemuContender,
    workdir: str,
    repeat: int = 1,
    counts: bool = True,
) -> Result:
    """One Result: through `qemu-img bench` where the offsets have a fixed step, else
    through qemu-io; a workload QEMU cannot run (snapshots of raw) gets its reason."""
    reason = contender.available()
    if reason:
        return Result(workload.key, contender.name, None, workload.unit, note=reason)
    measure = _measure_qemu_bench if workload.stride() is not None else _measure_qemu_io
    try:
        return measure(IoJob(workload, contender, workdir, repeat, counts))
    except Unavailable as e:
        return Result(workload.key, contender.name, None, workload.unit, note=str(e))


def _measure_qemu_io(job: IoJob) -> Result:
    """The workload as a qemu-io command script."""
    w = job.workload
    path = job.image("qemu")
    cmd = qemu_io_cmd(job.contender, path, w.cache)
    # reads are too cheap to see past process-start noise in one pass: repeat the list
    n = len(w.offsets)
    reps = 1
    if w.kind == "read":
        reps = max(1, min(-(-MIN_READ_OPS // n), -(-MIN_READ_BYTES // (n * w.length))))
    text = script(w) * reps

    def one_round() -> float:
        base = statistics.median(_timed(cmd, "") for _ in range(3))
        return _timed(cmd, text) - base

    # one pass of the script is enough for exact counts
    note = "qemu-io, one command per I/O: time minus an empty qemu-io run"
    times, per_op, note = _rounds(job, path, one_round, (cmd, ""), (cmd, script(w)), n, note)
    if reps > 1:
        note += f"; the {n} reads repeated {reps} times"
    return _io_result(job, times, n * reps, per_op, note)


def measure_snapshots_qemu(
    contender: QemuContender, workdir: str, count: int, data_ops: int
) -> list[Result]:
    """ms per `qemu-img snapshot -c` / `-d`, minus a `qemu-img snapshot -l` run."""
    kc, kd = f"snap-create-x{count}", f"snap-delete-x{count}"
    reason = contender.available() or (
        None if contender.fmt == "qcow2" else "raw files have no snapshots"
    )
    if reason:
        return [Result(k, contender.name, None, "ms", False, note=reason) for k in (kc, kd)]
    path = os.path.join(workdir, f"qsnap-{contender.name}-{os.getpid()}.img")
    try:
        create_image(contender, path, 8 << 30)
        offs = random_offsets(data_ops)
        run_tool(
            ["qemu-io", "-f", "qcow2", "-t", "writeback", path],
            "\n".join(f"write -q -P {PATTERN:#x} {o} 4096" for o in offs) + "\n",
        )
        base = statistics.median(
            _timed(["qemu-img", "snapshot", "-l", path], None) for _ in range(3)
        )
        tc = sum(
            _timed(["qemu-img", "snapshot", "-c", f"s{i}", path], None) - base for i in range(count)
        )
        td = sum(
            _timed(["qemu-img", "snapshot", "-d", f"s{i}", path], None) - base for i in range(count)
        )
    finally:
        _remove(path)
    note = "one qemu-img process per snapshot, minus a `snapshot -l` run"
    return [
        Result(kc, contender.name, max(tc, 0) / count * 1e3, "ms", False, count, tc, {}, note),
        Result(kd, contender.name, max(td, 0) / count * 1e3, "ms", False, count, td, {}, note),
    ]


def qemu_measure_metadata(key: str, name: str, virtual: int) -> Result:
    """qcow2 metadata for a fully allocated image, from `qemu-img measure`."""
    if shutil.which("qemu-img") is None:
        return Result(key, name, None, "MiB", False, note="qemu-img is not on PATH")
    p = subprocess.run(
        [
            "qemu-img",
            "measure",
            "--output=json",
            "--size",
            str(virtual),
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
        ],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        return Result(key, name, None, "MiB", False, note=p.stderr.strip()[:200])
    full = json.loads(p.stdout)["fully-allocated"]
    return Result(
        key,
        name,
        (full - virtual) / (1 << 20),
        "MiB",
        False,
        note="qemu-img measure: fully-allocated minus virtual size",
    )
