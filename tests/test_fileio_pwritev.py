"""fvd.fileio.full_pwritev: every byte of every buffer lands, whatever the kernel takes
per call (short writes, more buffers than one pwritev may carry)."""

import os

import pytest

from fvd import fileio
from fvd._shared import SYS_IOV_MAX


def test_more_buffers_than_one_call_takes(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        bufs = [bytes([i % 251]) * (i % 3) for i in range(3 * SYS_IOV_MAX + 5)]  # some empty
        want = b"".join(bufs)
        assert fileio.full_pwritev(fd, bufs, 100) == len(want)
        assert os.pread(fd, len(want), 100) == want
    finally:
        os.close(fd)


def test_short_writes_are_continued(tmp_path, monkeypatch):
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    real = os.pwritev
    calls = []

    def three_bytes_a_call(f, views, off):
        calls.append(len(views))
        return real(f, [bytes(views[0])[:3]], off)

    monkeypatch.setattr(fileio.os, "pwritev", three_bytes_a_call)
    try:
        assert fileio.full_pwritev(fd, [b"abcde", bytearray(b"fg"), memoryview(b"hijk")], 0) == 11
        assert os.pread(fd, 11, 0) == b"abcdefghijk"
        assert len(calls) == 5
    finally:
        os.close(fd)


def test_no_progress_is_an_error(tmp_path, monkeypatch):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    monkeypatch.setattr(fileio.os, "pwritev", lambda f, views, off: 0)
    try:
        with pytest.raises(OSError, match="no progress"):
            fileio.full_pwritev(fd, [b"x"], 0)
    finally:
        os.close(fd)
