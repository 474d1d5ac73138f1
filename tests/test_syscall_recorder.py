"""The crash-cut recorder sees every write-like syscall on the image, whoever makes it."""

import os

import pytest

import fvd
from fvd import _impl
from fvd.fileio import punch_hole

from .helpers import apply_ops, pat
from .syscall_recorder import WriteRecorder

pytestmark = pytest.mark.syscall_recorded


def test_every_kind_of_call_is_recorded_and_replays(tmp_path):
    path = str(tmp_path / "f")
    other = str(tmp_path / "other")
    with open(path, "wb") as f:
        f.write(pat(1, 1 << 16))
    with open(other, "wb") as f:
        f.write(pat(2, 4096))
    pre = str(tmp_path / "pre")
    with open(path, "rb") as f, open(pre, "wb") as g:
        g.write(f.read())
    fd = os.open(path, os.O_RDWR)
    src = os.open(other, os.O_RDWR)
    rec = WriteRecorder(path)
    os.pwrite(fd, b"abc", 10)
    os.pwritev(fd, [b"de", b"fg"], 100)
    os.pwrite(src, b"x", 0)  # another file is never recorded
    punch_hole(fd, 8192, 4096)  # fvd.fileio's ctypes fallocate
    os.copy_file_range(src, fd, 512, 0, 20000)
    os.ftruncate(fd, 70000)
    os.posix_fallocate(fd, 0, 80000)
    os.fdatasync(fd)
    with open(path, "r+b") as f:  # a buffered write: write() at the file position
        f.seek(30000)
        f.write(b"hij")
    ops = rec.stop()
    os.close(src)
    os.close(fd)
    assert [op[0] for op in ops] == ["w", "w", "p", "w", "t", "a", "s", "w"]
    assert ops[0] == ("w", 10, b"abc") and ops[1] == ("w", 100, b"defg")
    assert ops[2] == ("p", 8192, 4096) and ops[3] == ("w", 20000, b"x" + pat(2, 512)[1:])
    assert ops[7] == ("w", 30000, b"hij")
    apply_ops(pre, ops)
    with open(pre, "rb") as f, open(path, "rb") as g:
        assert f.read() == g.read()


def test_the_compiled_path_own_writes_are_recorded(tmp_path, impl):
    """Guest data the fast path writes from C (pwritev in nogil code) lands in the log."""
    path = str(tmp_path / "i.fvd")
    fvd.create(path, 1 << 20, chunk_size=64 * 1024)
    data = pat(3, 3 * 65536)
    with fvd.open(path, "r+") as img:
        rec = WriteRecorder(path)
        img.write(65536, data)
        img.flush()
        ops = rec.stop()
    assert _impl.IMPLEMENTATION == impl
    written = b"".join(op[2] for op in ops if op[0] == "w")
    assert data in written or all(
        data[i : i + 65536] in written for i in range(0, len(data), 65536)
    )
    assert ("s", 0, None) in ops
