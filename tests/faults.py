"""Fault injection helpers for tests: a forked child under RLIMIT_FSIZE, syscall errors
injected into the running process by strace, a small tmpfs."""

import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from contextlib import contextmanager


def block(seed, tag, length):
    """Recognisable bytes of one write: a header naming (seed, tag), then filler."""
    head = f"{seed}:{tag}:".encode().ljust(32, b".")
    return (head * (length // len(head) + 1))[:length]


def run_child(fn, *args, timeout=120):
    """Run fn(*args) in a forked child; returns what it returned (a JSON value), or raises
    with the child's traceback."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            out = {"ok": fn(*args)}
        except BaseException:  # noqa: BLE001
            out = {"error": traceback.format_exc()}
            code = 1
        try:
            with os.fdopen(w, "w") as f:
                json.dump(out, f)
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        deadline = time.monotonic() + timeout
        data = f.read()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    out = json.loads(data) if data else {"error": f"child died (status {status})"}
    if "error" in out:
        raise AssertionError("child failed:\n" + out["error"])
    return out["ok"]


def limit_file_size(nbytes):
    """In a child: writes past nbytes fail with EFBIG instead of killing the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def strace_usable():
    exe = shutil.which("strace")
    if exe is None:
        return False
    try:
        p = subprocess.run(
            [
                exe,
                "-qq",
                "-o",
                "/dev/null",
                "-e",
                "trace=fdatasync",
                "-e",
                "inject=fdatasync:error=EIO",
                "true",
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


INJECT_SYSCALLS = "pwrite64,pwritev,pwritev2,fdatasync,fsync,fallocate,ftruncate"


@contextmanager
def injected(err="EIO", syscalls=INJECT_SYSCALLS):
    """In the calling process, make every listed syscall fail with `err` until the block
    ends (strace attached to this process; it is detached on exit)."""
    me = os.getpid()
    with tempfile.TemporaryFile() as log:
        # (only traced syscalls can be injected; the trace itself goes nowhere)
        tracer = subprocess.Popen(
            [
                "strace",
                "-qq",
                "-o",
                "/dev/null",
                "-p",
                str(me),
                "-e",
                f"trace={syscalls}",
                "-e",
                f"inject={syscalls}:error={err}",
            ],
            stdout=log,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 20
            while _tracer_pid() == 0:
                if time.monotonic() > deadline or tracer.poll() is not None:
                    raise RuntimeError("strace could not attach")
                time.sleep(0.01)
            time.sleep(0.2)  # attached: let it finish setting up
            yield
        finally:
            tracer.send_signal(signal.SIGTERM)  # strace detaches on SIGTERM
            tracer.wait(30)
            while _tracer_pid() != 0:
                time.sleep(0.01)


def _tracer_pid():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


@contextmanager
def small_tmpfs(size="40m"):
    """A tmpfs of `size` (root and a kernel that allows it), else None."""
    d = tempfile.mkdtemp(prefix="fvd-tmpfs-")
    try:
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d],
            capture_output=True,
            check=False,
        )
    except OSError:
        p = None
    if p is None or p.returncode != 0:
        os.rmdir(d)
        yield None
        return
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], capture_output=True, check=False)
        os.rmdir(d)
