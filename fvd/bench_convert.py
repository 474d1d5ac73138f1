"""Convert rows of `fvd bench`: fvd convert beside `qemu-img convert` on the same data.

Source: a sparse raw image with 30% of its MiBs random data (the rest holes). Imports
(raw->fvd, qcow2->fvd) are compared with `qemu-img convert` raw->qcow2 (column
qemu-qcow2), exports (fvd->raw, fvd->qcow2) with `qemu-img convert` qcow2->raw (column
qemu-raw). Values are MiB of virtual disk per second, median of `repeat` runs, each
ending with the output durable: fvd convert syncs its output before the rename, and
qemu-img runs with `-t writeback` (it flushes at exit). qemu-img's own default for
convert is `-t unsafe` (no flush at all: the data is still in the page cache when it
exits); that figure is kept in each qemu Result's note.
"""
import os
import random
import shutil
import statistics
import subprocess
import time

from .bench_workloads import MiB, Result

ROWS = [("convert-raw-fvd", "convert raw -> fvd", "raw", "fvd", "qemu-qcow2"),
        ("convert-qcow2-fvd", "convert qcow2 -> fvd", "qcow2", "fvd", "qemu-qcow2"),
        ("convert-fvd-raw", "convert fvd -> raw", "fvd", "raw", "qemu-raw"),
        ("convert-fvd-qcow2", "convert fvd -> qcow2", "fvd", "qcow2", "qemu-raw")]
DATA_FRACTION = 0.3


def make_source(path, mib, seed=11):
    """A sparse raw file of `mib` MiB, 30% of its MiBs random data."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
        for i in sorted(rng.sample(range(mib), max(1, int(mib * DATA_FRACTION)))):
            f.seek(i * MiB)
            f.write(os.urandom(MiB))


def _timed(fn, repeat, cleanup):
    times = []
    for _ in range(repeat):
        cleanup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _qemu_img(*args):
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def measure_convert(workdir, mib, repeat=1, with_qemu=True, keys=None):
    """Results (MiB/s of virtual disk) of every convert row, fvd and qemu-img."""
    from .convert import convert
    d = os.path.join(workdir, "convert")
    os.makedirs(d, exist_ok=True)
    src = {"raw": os.path.join(d, "src.raw"), "fvd": os.path.join(d, "src.fvd"),
           "qcow2": os.path.join(d, "src.qcow2")}
    make_source(src["raw"], mib)
    convert(src["raw"], src["fvd"])
    convert(src["raw"], src["qcow2"], dst_format="qcow2")
    out = os.path.join(d, "out")

    def rm():
        if os.path.exists(out):
            os.unlink(out)

    results = []
    qemu = with_qemu and shutil.which("qemu-img") is not None
    qemu_time = {}
    unsafe = {}
    if qemu:
        for peer, args in (("qemu-qcow2", ("-f", "raw", "-O", "qcow2", src["raw"], out)),
                           ("qemu-raw", ("-f", "qcow2", "-O", "raw", src["qcow2"], out))):
            qemu_time[peer] = _timed(lambda a=args: _qemu_img("convert", "-t", "writeback", *a),
                                     repeat, rm)
            unsafe[peer] = _timed(lambda a=args: _qemu_img("convert", *a), repeat, rm)
            os.sync()           # what -t unsafe left dirty must not slow the next run
    for key, _title, sfmt, dfmt, peer in ROWS:
        if keys and not any(key.startswith(k) for k in keys):
            continue
        t = _timed(lambda s=sfmt, d=dfmt: convert(src[s], out, src_format=s, dst_format=d),
                   repeat, rm)
        results.append(Result(key, "fvd", mib / t, "MiB/s", True, 1, t,
                              note=f"{mib} MiB, 30% data"))
        if peer in qemu_time:
            what = "raw->qcow2" if peer == "qemu-qcow2" else "qcow2->raw"
            results.append(Result(key, peer, mib / qemu_time[peer], "MiB/s", True, 1,
                                  qemu_time[peer],
                                  note=f"qemu-img convert -t writeback {what}; default "
                                       f"-t unsafe (no flush): {mib / unsafe[peer]:.0f} "
                                       f"MiB/s"))
    rm()
    shutil.rmtree(d, ignore_errors=True)
    return results
