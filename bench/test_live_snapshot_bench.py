"""Snapshot create through `fvd serve`'s control socket (issue 21) beside the same create
in-process (`Image.create_snapshot`) on an identical image: what the control channel and
the write gate add. Each create follows a 64 KiB write and a flush (an NBD write by
qemu-io for the served one, which flushes when it disconnects). NBD writes wait at the
gate for the create's time.

    pytest -o addopts= -s bench/test_live_snapshot_bench.py --benchmark-only

Sizes: a 64 GiB image with 256 MiB written (1 MiB chunks: 65536 table entries), 10
creates each; a 64 MiB image with 8 MiB written and 3 creates under --benchmark-disable
(the CI smoke run). Medians are in extra_info; no timed assertions.
"""

import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest

import fvd
from fvd.control import default_control_path, is_live_socket

MiB = 1 << 20


def _image(path, size, written):
    fvd.create(path, size)
    block = bytes(range(256)) * 4096
    with fvd.open(path, "r+") as img:
        for i in range(written // MiB):  # spread over the image
            img.write(i * 37 % (size // MiB - 1) * MiB, block)


def _local(path, rounds):
    times = []
    with fvd.open(path, "r+") as img:
        for i in range(rounds):
            img.write(0, bytes([i + 1]) * 65536)
            img.flush()  # as qemu-io does when it closes its NBD connection
            t = time.perf_counter()
            img.create_snapshot(f"s{i}")
            times.append(time.perf_counter() - t)
    return times


def _served(path, sock, rounds):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fvd.cli", "serve", "--socket", sock, path],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not is_live_socket(default_control_path(path)):
            assert proc.poll() is None and time.monotonic() < deadline, "fvd serve did not start"
            time.sleep(0.05)
        times = []
        with fvd.connect(path) as client:
            for i in range(rounds):
                cmd = f"write -P {i + 1} 0 64k"
                subprocess.run(
                    ["qemu-io", "-f", "raw", "-c", cmd, f"nbd+unix:///?socket={sock}"],
                    check=True,
                    capture_output=True,
                )
                t = time.perf_counter()
                client.create_snapshot(f"s{i}")
                times.append(time.perf_counter() - t)
            client.stop()
        proc.wait(timeout=60)
        return times
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()


def test_snapshot_create_through_the_server(benchmark, tmp_path, smoke):
    if not (shutil.which("nbdkit") and shutil.which("qemu-io")):
        pytest.skip("needs nbdkit and qemu-io")
    size, written, rounds = (64 * MiB, 8 * MiB, 3) if smoke else (64 << 30, 256 * MiB, 10)
    local, served = str(tmp_path / "local.fvd"), str(tmp_path / "served.fvd")
    _image(local, size, written)
    shutil.copyfile(local, served)
    benchmark.group = "live-snapshot-create"
    result = {}

    def run():
        result["local"] = statistics.median(_local(local, rounds))
        result["served"] = statistics.median(_served(served, str(tmp_path / "s.sock"), rounds))

    benchmark.pedantic(run, rounds=1)
    benchmark.extra_info.update(
        {
            "size": size,
            "written": written,
            "local_median_ms": result["local"] * 1e3,
            "served_median_ms": result["served"] * 1e3,
        }
    )
    print(
        f"\nsnapshot create, median of {rounds}: in-process {result['local'] * 1e3:.1f} ms, "
        f"through fvd serve {result['served'] * 1e3:.1f} ms"
    )
