"""Crash cuts of the offline header changes (fvd.ops.reshape): resize (the table moving
into the journal region), rebase (new base name slot, rewritten bitmap) and commit's
emptying of the top. Every prefix of the recorded writes, applied to a copy taken
before the operation, must open (read-write, which replays and scrubs, then read-only)
as exactly the state before or the state after, and check clean."""

import hashlib
import os
import shutil

import pytest

import fvd
from fvd import chain
from fvd.ops import reshape

from ..helpers import apply_ops, pat
from ..syscall_recorder import WriteRecorder

MiB = 1 << 20
CS = 64 * 1024
pytestmark = pytest.mark.syscall_recorded


def state_of(path):
    """What a reader sees (size, base, the bytes of every range that may hold data) and
    whether the front holds any chunk."""
    with fvd.open(path) as img:
        windows = set()  # the 1 MiB windows a data range touches (the map may split anyhow)
        for e in img.extents():
            if e.data and not e.zero:
                windows.update(range(e.start // MiB, (e.start + e.length - 1) // MiB + 1))
        h = hashlib.sha256()
        for w in sorted(windows):
            data = img.read(w * MiB, min(MiB, img.size - w * MiB))
            if any(data):
                h.update(b"%d:" % w + data)
        return (img.size, img.base, img.base_size, img.allocated_chunks == 0, h.hexdigest())


def assert_cuts(tmp_path, path, operation):
    """Run `operation` recording its writes to `path`; check every cut of them."""
    pre = str(tmp_path / "pre.copy")
    shutil.copyfile(path, pre)
    before = state_of(path)
    rec = WriteRecorder(path)
    operation()
    ops = rec.stop()
    ops = [op for op in ops if op[0] != "s"]  # a cut after a sync is the cut before it
    after = state_of(path)
    assert before != after and len(ops) >= 2
    cut = os.path.join(os.path.dirname(path), "cut.fvd")
    seen = set()
    for k in range(len(ops) + 1):
        shutil.copyfile(pre, cut)
        apply_ops(cut, ops[:k])
        with fvd.open(cut, "r+") as img:
            assert img.check().ok, f"cut after {k} of {len(ops)} writes"
        state = state_of(cut)
        assert state in (before, after), f"cut after {k} of {len(ops)} writes"
        seen.add(state == after)
        with fvd.open(cut) as img:
            assert img.check().ok
    assert seen == {False, True}


def test_resize_moving_the_table_is_crash_safe(tmp_path):
    p = str(tmp_path / "r.fvd")
    fvd.create(p, MiB, chunk_size=CS, journal_size=MiB)
    with fvd.open(p, "r+") as img:
        img.write(4096, pat(1, 100_000))
    assert_cuts(tmp_path, p, lambda: reshape.resize_file(p, 1 << 30))
    with fvd.open(p) as img:
        assert img.info()["format-specific"]["data"]["table-size"] > 4096


def overlay(tmp_path, base_size=2 * MiB):
    b = str(tmp_path / "b.raw")
    with open(b, "wb") as f:
        f.write(pat(1, base_size))
    t = str(tmp_path / "t.fvd")
    fvd.create(t, 4 * MiB, base="b.raw", base_format="raw", chunk_size=CS, block_size=4096)
    with fvd.open(t, "r+") as img:
        img.write(100_000, pat(2, 5000))
        img.write(3 * MiB, pat(3, 7000))
    return b, t


@pytest.mark.parametrize("unsafe", [False, True])
@pytest.mark.parametrize("new_size", [3 * MiB + 1000, MiB - 512])
def test_rebase_is_crash_safe(tmp_path, impl, unsafe, new_size):
    b, t = overlay(tmp_path)
    with open(tmp_path / "n.raw", "wb") as f:
        f.write(pat(4, new_size))
    assert_cuts(
        tmp_path,
        t,
        lambda: chain.rebase(t, "n.raw", backing_format="raw", unsafe=unsafe),
    )


def test_emptying_the_top_is_crash_safe(tmp_path):
    b, t = overlay(tmp_path, 4 * MiB)
    chain.commit(t, drop=True)  # the base holds the top's data now; the top is intact

    assert_cuts(tmp_path, t, lambda: reshape.empty_front(t))
    with fvd.open(t) as img:
        assert img.allocated_chunks == 0


def test_emptying_a_top_with_snapshots_is_crash_safe(tmp_path):
    b, t = overlay(tmp_path, 4 * MiB)
    with fvd.open(t, "r+") as img:
        img.create_snapshot("kept")
    chain.commit(t, drop=True)

    def empty():
        assert reshape.empty_front(t)  # the snapshot's chunks stay: scrubbed at open
        fvd.open(t, "r+").close()

    assert_cuts(tmp_path, t, empty)
    with fvd.open(t) as img:
        assert img.allocated_chunks == 0
        with img.open_snapshot("kept") as view:
            assert view.read(100_000, 5000) == pat(2, 5000)
