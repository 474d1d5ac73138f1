"""Disk full and I/O errors: a clear error naming the file, nothing acknowledged lost, the
image reopens and checks without corruption (leaks at most)."""

import errno
import os
import random

import pytest

import fvd
from fvd.units import KiB, MiB

from ..faults import (
    INJECT_SYSCALLS,
    block,
    injected,
    limit_file_size,
    run_child,
    small_tmpfs,
    strace_usable,
)

W = 64 * KiB


def _fill_until_error(path, cache, seed, flush_every=8, limit=None):
    """Child: random 64 KiB writes until one fails. Returns what was acknowledged."""
    if limit is not None:
        limit_file_size(limit)
    rng = random.Random(seed)
    img = fvd.open(path, "r+", cache=cache)
    acked, durable, failed, error = {}, {}, None, None
    for tag in range(100000):
        off = rng.randrange(img.size // W) * W
        try:
            img.write(off, block(seed, tag, W))
            acked[off] = tag
            if cache == "writethrough":
                durable[off] = tag
            elif tag % flush_every == flush_every - 1:
                img.flush()
                durable = dict(acked)
        except OSError as e:  # ImageIOError is one (old code: a bare OSError)
            failed = off
            error = {
                "type": type(e).__name__,
                "errno": getattr(e, "errno", None),
                "filename": getattr(e, "filename", None),
                "str": str(e),
                "oserror": isinstance(e, OSError),
            }
            break
    closed = None
    try:
        img.close()
        closed = True
    except OSError as e:
        closed = str(e)
    expect = acked if closed is True else durable
    expect = {off: tag for off, tag in expect.items() if off != failed}
    return {"error": error, "closed": closed, "expect": sorted(expect.items()), "failed": failed}


def _verify(path, seed, result):
    with fvd.open(path, "r+") as img:
        for off, tag in result["expect"]:
            assert img.read(off, W) == block(seed, tag, W), f"write at {off} lost"
        res = img.check()
        assert res.corruptions == 0, res.messages
    with fvd.open(path, "r+") as img:  # and once more after a clean close
        assert img.check().corruptions == 0


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_file_size_limit_leaves_no_entry_behind(tmp_path, cache):
    """Regression (issue 8, bug 2): the failing write left a table entry past the end of
    the file and the image did not reopen; the error was a bare OSError."""
    path = str(tmp_path / "full.fvd")
    fvd.create(path, 256 * MiB)
    limit = os.path.getsize(path) + 24 * MiB + 5 * KiB
    result = run_child(_fill_until_error, path, cache, 7, 8, limit)
    err = result["error"]
    assert err is not None, "the size limit was never hit"
    _verify(path, 7, result)
    assert err["type"] == "ImageIOError" and err["oserror"]
    assert err["errno"] == errno.EFBIG and err["filename"] == path, err
    assert path in err["str"] and "too large" in err["str"].lower()


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_enospc_on_small_tmpfs(cache):
    with small_tmpfs("40m") as d:
        if d is None:
            pytest.skip("cannot mount a tmpfs here")
        path = os.path.join(d, "full.fvd")
        fvd.create(path, 256 * MiB, journal_size=4 * MiB)
        result = run_child(_fill_until_error, path, cache, 11, 8)
        err = result["error"]
        assert err is not None and err["type"] == "ImageIOError"
        assert err["errno"] == errno.ENOSPC and err["filename"] == path, err
        # free some room so the check can run, as a user would
        with open(os.path.join(d, "pad"), "wb"):
            pass
        _verify(path, 11, result)


# ----- EIO injected into the running process (strace) ------------------------------
needs_strace = pytest.mark.skipif(
    not strace_usable(), reason="strace with fault injection not usable here"
)


def _prepared(tmp_path, base=False):
    path = str(tmp_path / "eio.fvd")
    kw = {}
    if base:
        bpath = str(tmp_path / "base.raw")
        with open(bpath, "wb") as f:
            f.writelines(block(99, i, MiB) for i in range(16))
        kw = {"base": bpath, "base_format": "raw"}
    fvd.create(path, 32 * MiB, **kw)
    with fvd.open(path, "r+") as img:
        for i in range(8):
            img.write(i * MiB + 4096, block(1, i, W))
        img.create_snapshot("before")
    return path


def _eio_child(path, cache, op, then_close):
    """Child: acknowledged writes, then `op` under injected EIO; then close or crash."""
    img = fvd.open(path, "r+", cache=cache)
    for i in range(8, 12):
        img.write(i * MiB + 4096, block(2, i, W))
    img.flush()  # everything up to here is acknowledged
    for i in range(12, 14):
        img.write(i * MiB, block(3, i, W))  # writeback: not yet durable
    error = None
    with injected("EIO", "pread64,preadv,preadv2" if op in ("read", "view") else INJECT_SYSCALLS):
        try:
            if op == "read":
                img.read(4096, 3 * MiB)
            elif op == "view":
                with img.open_snapshot("before") as view:
                    view.read(4096, 3 * MiB)
            elif op == "write":
                img.write(20 * MiB + 512, block(4, 20, 3 * MiB))
            elif op == "write_zeroes":
                img.write_zeroes(0, 2 * MiB)
            elif op == "flush":
                img.flush()
            elif op == "snapshot":
                img.create_snapshot("during")
            elif op == "prefetch":
                img.prefetch()
            elif op == "close":
                img.close()
        except fvd.FvdError as e:
            error = {
                "type": type(e).__name__,
                "errno": getattr(e, "errno", None),
                "filename": getattr(e, "filename", None),
                "str": str(e),
            }
    closed = False
    if then_close and op != "close":
        img.close()
        closed = True
    if not closed:
        img._crash()
    return {"error": error, "closed": closed}


@needs_strace
@pytest.mark.parametrize(
    "op,cache,then_close",
    [
        ("write", "writethrough", False),
        ("write", "writeback", True),
        ("write_zeroes", "writethrough", True),
        ("flush", "writeback", False),
        ("snapshot", "writeback", True),
        ("prefetch", "writethrough", False),
        ("close", "writeback", False),
        ("read", "writeback", True),
        ("view", "writethrough", False),
    ],
)
def test_eio(tmp_path, op, cache, then_close):
    path = _prepared(tmp_path, base=op == "prefetch")
    result = run_child(_eio_child, path, cache, op, then_close)
    err = result["error"]
    assert err is not None, f"{op}: no error under EIO"
    assert err["type"] == "ImageIOError" and err["errno"] == errno.EIO, err
    assert err["filename"] == path and path in err["str"], err
    with fvd.open(path, "r+") as img:
        for i in range(8):
            if op == "write_zeroes" and i < 2:
                continue  # the failed write_zeroes may or may not have happened
            assert img.read(i * MiB + 4096, W) == block(1, i, W)
        for i in range(8, 12):
            assert img.read(i * MiB + 4096, W) == block(2, i, W)
        if result["closed"]:
            for i in range(12, 14):
                assert img.read(i * MiB, W) == block(3, i, W)
        with img.open_snapshot("before") as view:
            for i in range(8):
                assert view.read(i * MiB + 4096, W) == block(1, i, W)
        res = img.check()
        assert res.corruptions == 0, res.messages
    with fvd.open(path, "r") as img:
        assert img.check().corruptions == 0
