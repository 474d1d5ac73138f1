"""`fvd serve` flushes: an NBD flush with no write since the last flush costs no
fdatasync (QEMU's NBD client sends two flushes after every O_DSYNC write), and a flush
after a write still reaches the disk. fdatasync calls of nbdkit are counted with strace."""

import os
import shutil
import signal
import subprocess
import time

import pytest

import fvd
from fvd.units import MiB

from ..nbd_helpers import SYSTEM_PYTHON, fvd_serve, need_nbd_tools, run

pytestmark = pytest.mark.interop


@pytest.fixture(autouse=True)
def _tools():
    need_nbd_tools()
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")


def fdatasyncs(pid, uri, nbd_commands):
    """fdatasync calls process `pid` (all its threads) makes while nbdsh runs the commands."""
    with subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=fdatasync", "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as tracer:
        wait_traced(pid, tracer.pid)
        run(SYSTEM_PYTHON, "-m", "nbd", "-u", uri, "-c", nbd_commands)
        tracer.send_signal(signal.SIGINT)
        _, err = tracer.communicate(timeout=60)
    return sum(1 for line in err.splitlines() if "fdatasync(" in line)


def wait_traced(pid, tracer_pid, timeout=30.0):
    """Until every thread of `pid` is traced by `tracer_pid`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tracers = set()
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status") as f:
                tracers |= {line.split()[1] for line in f if line.startswith("TracerPid:")}
        if tracers == {str(tracer_pid)}:
            return
        time.sleep(0.02)
    raise AssertionError(f"strace did not attach to {pid}")


def test_empty_flushes_cost_no_fdatasync(tmp_path, impl):
    image = tmp_path / "a.fvd"
    fvd.create(image, 8 * MiB)
    srv = fvd_serve(image, impl, socket_path=tmp_path / "s.sock")
    try:
        nbdkit = int(run("pgrep", "-P", srv.proc.pid).stdout.split()[0])
        write = 'h.pwrite(b"x" * 4096, {});'
        once = fdatasyncs(nbdkit, srv.uri, write.format(0) + "h.flush()")
        thrice = fdatasyncs(nbdkit, srv.uri, write.format(MiB) + "h.flush(); h.flush(); h.flush()")
        alone = fdatasyncs(nbdkit, srv.uri, "h.flush()")
        overwrite = fdatasyncs(nbdkit, srv.uri, write.format(0) + "h.flush()")
    finally:
        srv.stop()
    assert once >= 1 and thrice == once  # the 2nd and 3rd flush: nothing new to sync
    assert alone == 0
    assert overwrite >= 1  # a flush after a write still syncs
    with fvd.open(image) as img:
        assert img.read(0, 4096) == b"x" * 4096 and img.read(MiB, 4096) == b"x" * 4096
