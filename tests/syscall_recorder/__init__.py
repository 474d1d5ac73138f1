"""Crash-cut recording at the syscall boundary (docs/testing.md, "Crash cuts").

`shim.c`, compiled at test time with gcc and LD_PRELOADed into a child pytest, logs every
pwrite/pwritev/write/copy_file_range/ftruncate/fallocate/fsync/fdatasync the process
makes on the image, whatever module makes it: CPython's `os`, the compiled fast path's
own pwritev, `fvd.fileio`'s ctypes fallocate (resolved through the global namespace so a
preload sees it). A test marked `syscall_recorded` is re-run by conftest in such a child;
there `WriteRecorder(path)` starts the shim's log and `stop()` reads it back.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import subprocess
import tempfile

SHIM_SOURCE = os.path.join(os.path.dirname(__file__), "shim.c")
HEAD = struct.Struct("<QQQ")


def shim_path() -> str:
    """The compiled shim (built once per source version, shared across runs)."""
    with open(SHIM_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), f"fvd-syscall-shim-{os.getuid()}-{digest}.so")
    if not os.path.exists(out):
        tmp = f"{out}.{os.getpid()}.tmp"
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", tmp, SHIM_SOURCE]
            + ["-ldl", "-lpthread"],
            check=True,
        )
        os.replace(tmp, out)
    return out


def _shim():
    """The preloaded shim's control functions, or None in a process without it."""
    glob = ctypes.CDLL(None)
    try:
        start, stop = glob.fvd_recorder_start, glob.fvd_recorder_stop
    except AttributeError:
        return None
    start.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    return start, stop


def loaded() -> bool:
    return _shim() is not None


def parse(blob: bytes) -> list[tuple[str, int, int | bytes | None]]:
    """The log as the tuples `tests.helpers.apply_ops` replays: ("w", offset, data),
    ("t", size, None), ("p", offset, length), ("a", offset, length), ("s", 0, None)."""
    ops: list[tuple[str, int, int | bytes | None]] = []
    pos = 0
    while pos < len(blob):
        kind, a, b = HEAD.unpack_from(blob, pos)
        pos += HEAD.size
        k = chr(kind)
        if k == "w":
            ops.append(("w", a, blob[pos : pos + b]))
            pos += b
        elif k in "pa":
            ops.append((k, a, b))
        elif k == "t":
            ops.append(("t", a, None))
        elif k == "s":
            ops.append(("s", 0, None))
        else:
            raise AssertionError(f"the image saw an fallocate mode {a:#x} no replay models")
    return ops


class WriteRecorder:
    """Every write-like syscall the process makes on `path` between creation and stop()."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        shim = _shim()
        if shim is None:
            raise RuntimeError("WriteRecorder needs the test marked @pytest.mark.syscall_recorded")
        self._stop = shim[1]
        self.log = f"{os.fspath(path)}.syscalls"
        self.ops: list[tuple[str, int, int | bytes | None]] = []
        if shim[0](os.fsencode(path), os.fsencode(self.log)) != 0:
            raise OSError(f"{self.log}: cannot start the syscall log")

    def stop(self) -> list[tuple[str, int, int | bytes | None]]:
        if self._stop() != 0:
            raise OSError(f"{self.log}: closing the syscall log failed")
        with open(self.log, "rb") as f:
            self.ops = parse(f.read())
        os.unlink(self.log)
        return self.ops

    @property
    def writes(self) -> list[tuple[str, int, int | bytes | None]]:
        """The ops that change the file (syncs left out)."""
        return [op for op in self.ops if op[0] != "s"]
