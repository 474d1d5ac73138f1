"""Shared test helpers: durable-state recording for simulated crashes."""

import json
import os
import shutil
import signal
import time


class DurableRecorder:
    """Copies the image file at every fdatasync: the state a power cut would leave.

    A crash is then simulated by putting the last copy back (every write since the last
    flush is dropped), which is the harshest outcome a real disk may give.
    """

    def __init__(self, monkeypatch, path):
        self.path = str(path)
        self.copy = self.path + ".durable"
        self.syncs = 0
        real = os.fdatasync

        def fdatasync(fd):
            real(fd)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                shutil.copyfile(self.path, self.copy)
                self.syncs += 1

        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def snapshot_now(self):
        shutil.copyfile(self.path, self.copy)

    def power_cut(self):
        shutil.copyfile(self.copy, self.path)


def pattern(seed, length):
    """Deterministic non-trivial bytes."""
    return bytes((seed * 131 + i * 7 + (i >> 8)) & 0xFF for i in range(length))


def run_and_kill(child, delay, *args):
    """Fork; the child runs child(*args, write_fd) and reports JSON lines ending in "]"
    through a pipe; SIGKILL it after `delay` seconds; return the lines it got out."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            child(*args, w)
        finally:
            os._exit(1)
    os.close(w)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return [json.loads(x) for x in f.read().splitlines() if x.endswith("]")]
