"""NBD benchmarks: `fvd serve` against qemu-nbd, and prefetch over a slow link.

    python -m fvd.bench.nbd [--size-mb 1024] [--reads 2000] [--link-mb 64] [--dir DIR]

1. Sequential copy of the whole image out of the server with `nbdcopy URI null:`:
   `fvd serve -r` of an FVD image against `qemu-nbd -r -f qcow2` of the same data
   (best of `repeat` runs, page-cached files on both sides).
2. 4 KiB random reads over the unix socket, one at a time (fvd.nbd_client, one
   connection): median latency and reads/s, both servers.
3. Adaptive prefetch over a slow link: a raw base served by nbdkit with the `rate` filter
   (40 Mbit/s total) and the `delay` filter (5 ms per read); a foreground thread does random
   4 KiB reads of base blocks far from where prefetch starts. Median foreground latency
   alone, with a paced prefetch running (small steps, max_rate half the link), and with an
   unpaced prefetch (4 MiB steps, no limits); prefetch completion is checked.

bench/test_nbd_bench.py runs the same functions under pytest-benchmark (tiny in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Optional

import fvd
from fvd.image import Image
from fvd.nbd_client import NbdClient
from fvd.units import MiB

MODES = ("none", "paced", "unpaced", "paced-1conn", "unpaced-1conn")
SERVE = [sys.executable, "-m", "fvd.cli", "serve"]


class Unavailable(Exception):
    pass


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise Unavailable(f"not installed: {', '.join(missing)}")


def _wait(proc: subprocess.Popen[str], sock: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited {proc.returncode}: {proc.args!r}: "
                f"{proc.stderr.read() if proc.stderr else ''!r}"
            )
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


class _Server:
    def __init__(self, args: list[object], sock: str, env: dict[str, str] | None = None) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(
            [str(a) for a in args],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        _wait(self.proc, sock)

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def make_images(workdir: str, size: int) -> dict[str, Any]:
    """The same random data as raw, FVD and qcow2 files."""

    raw = os.path.join(workdir, "data.raw")
    image = os.path.join(workdir, "data.fvd")
    qcow = os.path.join(workdir, "data.qcow2")
    fvd.create(image, size, overwrite=True)
    rng = random.Random(1)
    with open(raw, "wb") as f, fvd.open(image, "r+") as img:
        for off in range(0, size, MiB):
            block = rng.randbytes(min(MiB, size - off))
            f.write(block)
            img.write(off, block)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow], check=True)
    return {"raw": raw, "fvd": image, "qcow2": qcow, "size": size}


def servers(
    images: dict[str, Any], workdir: str, impl: str = "cython"
) -> Iterator[tuple[str, Callable[[], _Server]]]:
    """(name, server) pairs: fvd serve of the FVD image, qemu-nbd of the qcow2 image."""
    env = dict(os.environ)
    env.pop("FVD_PURE_PYTHON", None)
    if impl == "python":
        env["FVD_PURE_PYTHON"] = "1"
    s1 = os.path.join(workdir, "fvd.sock")
    s2 = os.path.join(workdir, "qemu.sock")
    yield "fvd serve", lambda: _Server(SERVE + ["-r", "--socket", s1, images["fvd"]], s1, env)
    yield (
        "qemu-nbd",
        lambda: _Server(
            ["qemu-nbd", "-r", "-f", "qcow2", "-e", "16", "-k", s2, "-t", images["qcow2"]], s2
        ),
    )


def seq_copy(uri: str, repeat: int = 3) -> float:
    """Best wall time of `nbdcopy URI null:` in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(["nbdcopy", uri, "null:"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def random_reads(uri: str, size: int, count: int, seed: int = 7) -> list[float]:
    """Latency (s) of each of `count` random 4 KiB reads, one at a time."""

    client = NbdClient(uri, max_connections=1)
    rng = random.Random(seed)
    buf = bytearray(4096)
    lat = []
    try:
        for _ in range(count):
            off = rng.randrange(size // 4096) * 4096
            t0 = time.perf_counter()
            client.readinto(off, buf)
            lat.append(time.perf_counter() - t0)
    finally:
        client.close()
    return lat


def serve_rows(
    workdir: str, size: int, reads: int, repeat: int = 3, impl: str = "cython"
) -> list[dict[str, Any]]:
    require("nbdkit", "nbdcopy", "qemu-nbd", "qemu-img")
    images = make_images(workdir, size)
    rows = []
    for name, start in servers(images, workdir, impl):
        with start() as srv:
            seconds = seq_copy(srv.uri, repeat)
            lat = random_reads(srv.uri, size, reads)
        rows.append(
            {
                "server": name,
                "size": size,
                "copy_seconds": seconds,
                "copy_mib_s": size / MiB / seconds,
                "read4k_median_us": statistics.median(lat) * 1e6,
                "read4k_per_s": len(lat) / sum(lat),
            }
        )
    return rows


# ----- prefetch over a slow link ------------------------------------------------------------
def slow_base(raw: str, sock: str, rate: str, delay_ms: int) -> _Server:
    return _Server(
        [
            "nbdkit",
            "--foreground",
            "--exit-with-parent",
            "--unix",
            sock,
            "--filter=rate",
            "--filter=delay",
            "file",
            raw,
            f"rate={rate}",
            f"delay-read={delay_ms}ms",
        ],
        sock,
    )


def _foreground(
    img: Image, lo: int, hi: int, count: int, gap: float, out: list[float], stop: threading.Event
) -> None:
    rng = random.Random(3)
    buf = bytearray(4096)
    for _ in range(count):
        if stop.is_set():
            break
        off = rng.randrange(lo // 4096, hi // 4096) * 4096
        t0 = time.perf_counter()
        img.readinto(off, buf)
        out.append(time.perf_counter() - t0)
        time.sleep(gap)


def prefetch_case(
    workdir: str, raw: str, uri: str, mode: str, reads: int, link_bytes_s: float
) -> dict[str, object]:
    """mode: 'none' (foreground only), 'paced' or 'unpaced' prefetch beside it; '-1conn':
    the NBD client limited to one connection."""

    size = os.path.getsize(raw)
    image = os.path.join(workdir, f"top-{mode}.fvd")
    fvd.create(image, size, base=uri, base_format="raw", block_size=64 * 1024, overwrite=True)
    lat: list[float] = []
    stop = threading.Event()
    result: dict[str, object] = {"mode": mode}
    # "-1conn": what one shared connection with a lock would give: reads queue behind
    # the prefetch read in flight
    os.environ["FVD_NBD_CONNECTIONS"] = "1" if mode.endswith("-1conn") else "4"
    with fvd.open(image, "r+") as img:
        # foreground reads the last quarter; prefetch starts at the front
        fg = threading.Thread(
            target=_foreground, args=(img, size * 3 // 4, size, reads, 0.01, lat, stop)
        )
        t0 = time.perf_counter()
        fg.start()

        def progress(done: int, total: int) -> None:
            # past 70% prefetch nears the blocks the foreground reads: stop measuring
            if done >= 0.7 * total:
                stop.set()

        if mode.startswith("paced"):
            img.prefetch(progress, step=256 * 1024, max_rate=link_bytes_s / 2, min_rate=0)
        elif mode.startswith("unpaced"):
            img.prefetch(progress, step=4 * MiB, min_rate=0, max_rate=None)
        if mode != "none":
            result["prefetch_seconds"] = time.perf_counter() - t0
            result["prefetch_complete"] = img.info()["base-prefetched"]
        fg.join()
        stop.set()
    result.update(
        {
            "reads": len(lat),
            "median_ms": statistics.median(lat) * 1e3,
            "p90_ms": sorted(lat)[int(len(lat) * 0.9)] * 1e3,
        }
    )
    return result


def prefetch_rows(
    workdir: str, size: int, reads: int, rate: str = "40M", delay_ms: int = 5
) -> list[dict[str, object]]:
    require("nbdkit")
    raw = os.path.join(workdir, "base.raw")
    rng = random.Random(5)
    with open(raw, "wb") as f:
        f.writelines(rng.randbytes(min(MiB, size - off)) for off in range(0, size, MiB))
    link = _bits(rate) / 8
    rows = []
    sock = os.path.join(workdir, "slow.sock")
    with slow_base(raw, sock, rate, delay_ms) as srv:
        for mode in MODES:
            row = prefetch_case(workdir, raw, srv.uri, mode, reads, link)
            row.update({"base_size": size, "rate": rate, "delay_ms": delay_ms})
            rows.append(row)
    return rows


def _bits(rate: str) -> float:
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}
    return float(rate[:-1]) * mult[rate[-1]] if rate[-1] in mult else float(rate)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fvd.bench.nbd",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size-mb", type=int, default=1024, help="image size for serve rows")
    p.add_argument("--reads", type=int, default=2000, help="random 4 KiB reads per server")
    p.add_argument("--link-mb", type=int, default=64, help="base size for prefetch rows")
    p.add_argument("--fg-reads", type=int, default=300, help="foreground reads per case")
    p.add_argument("--rate", default="40M", help="link rate, bits/s (nbdkit rate filter)")
    p.add_argument("--delay-ms", type=int, default=5, help="per-read delay (delay filter)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", help="work directory (default: a temp dir)")
    p.add_argument("--output", choices=("text", "json"), default="text")
    p.add_argument("--skip", choices=("serve", "prefetch"), action="append", default=[])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        out: dict[str, list[dict[str, Any]]] = {}
        if "serve" not in args.skip:
            out["serve"] = serve_rows(d, args.size_mb * MiB, args.reads, args.repeat)
        if "prefetch" not in args.skip:
            out["prefetch"] = prefetch_rows(
                d, args.link_mb * MiB, args.fg_reads, args.rate, args.delay_ms
            )
    if args.output == "json":
        print(json.dumps(out, indent=2))
        return 0
    for r in out.get("serve", []):
        print(
            f"{r['server']:<10} copy {r['size'] // MiB} MiB: {r['copy_seconds']:.3f} s "
            f"({r['copy_mib_s']:.0f} MiB/s)   4K random read: median "
            f"{r['read4k_median_us']:.0f} us, {r['read4k_per_s']:.0f}/s"
        )
    for r in out.get("prefetch", []):
        extra = (
            ""
            if r["mode"] == "none"
            else (f"  prefetch {r['prefetch_seconds']:.1f} s, complete={r['prefetch_complete']}")
        )
        print(
            f"prefetch {r['mode']:<14} foreground 4K: median {r['median_ms']:.2f} ms, "
            f"p90 {r['p90_ms']:.2f} ms ({r['reads']} reads){extra}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
