"""Internal snapshots of an image with a base image (docs/format.md 7 and 8): each snapshot
keeps a copy of the bitmap, views read the base for its clear bits, revert restores the
bitmap, stores never touch frozen chunks, prefetch keeps a base snapshots still need."""

import os
import random
import shutil
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import fvd
from fvd.features import snapshots as snap
from fvd.ondisk import format as fmt

from ..helpers import (
    assert_clean,
    assert_every_cut_is_before_or_after,
    pat,
)
from ..helpers import counts_delta as delta
from ..syscall_recorder import WriteRecorder

CS = 64 * 1024
BLOCK = 4096
SIZE = 8 * CS
BASE_SIZE = 5 * CS + 3000  # not block aligned; the image is larger than the base


def make_base(tmp, kind, seed=1):
    """A base of BASE_SIZE bytes; returns (path, content as seen through it)."""
    data = bytearray(random.Random(seed).randbytes(BASE_SIZE))
    raw = os.path.join(tmp, "base.raw")
    with open(raw, "wb") as f:
        f.write(data)
    if kind == "raw":
        return raw, data
    path = os.path.join(tmp, "base.fvd")
    fvd.create(path, BASE_SIZE, chunk_size=CS, block_size=BLOCK)
    content = bytearray(BASE_SIZE)
    with fvd.open(path, "r+") as b:  # chunks 0, 2, 4 hold data, 1 and 3 are holes
        for c in (0, 2, 4):
            n = min(CS, BASE_SIZE - c * CS)
            b.write(c * CS, data[c * CS : c * CS + n])
            content[c * CS : c * CS + n] = data[c * CS : c * CS + n]
    os.unlink(raw)
    return path, content


def make_image(tmp, kind, **kw):
    base, content = make_base(tmp, kind)
    path = os.path.join(tmp, "img.fvd")
    fvd.create(
        path,
        SIZE,
        chunk_size=CS,
        block_size=BLOCK,
        base=os.path.basename(base),
        base_format=kind,
        **kw,
    )
    model = bytearray(SIZE)
    model[:BASE_SIZE] = content
    return path, base, model


def views_of(img):
    out = {}
    for s in img.snapshots():
        with img.open_snapshot(s.name) as v:
            out[s.name] = v.read(0, SIZE)
    return out


def frozen_bytes(img):
    """Raw bytes of every chunk a snapshot holds, read from the file."""
    held = np.flatnonzero(img._core.snapshot_state.refcount)
    d = img._core.header.data_offset
    with open(img.path, "rb") as f:
        out = {}
        for p in held.tolist():
            f.seek(d + p * CS)
            out[p] = f.read(CS)
    return out


@pytest.fixture(params=["raw", "fvd"])
def kind(request):
    return request.param


# ----- semantics ----------------------------------------------------------------------------
def test_snapshot_revert_and_views_over_a_base(tmp_path, kind):
    path, base, model = make_image(str(tmp_path), kind)
    snaps = {}
    with fvd.open(path, "r+") as img:
        img.write(100, b"a" * 50)  # block 0 in the image, the rest in the base
        img.write(BASE_SIZE - 10, b"edge" * 10)  # across the end of the base
        model[100:150] = b"a" * 50
        model[BASE_SIZE - 10 : BASE_SIZE + 30] = b"edge" * 10
        img.create_snapshot("s1", vm_state=b"vm")
        snaps["s1"] = bytes(model)
        e = img._core.snapshot_state.entries[0]
        assert e.bitmap_offset and e.bitmap_offset % CS == img._core.header.data_offset % CS
        # copy-on-write of a frozen chunk, for a block that is still in the base
        img.write(5 * BLOCK + 3, b"b" * 10)
        model[5 * BLOCK + 3 : 5 * BLOCK + 13] = b"b" * 10
        img.write(3 * CS, b"c" * CS)  # a chunk not in the snapshot at all
        model[3 * CS : 4 * CS] = b"c" * CS
        img.create_snapshot("s2")
        snaps["s2"] = bytes(model)
        img.write_zeroes(0, 2 * CS)
        model[: 2 * CS] = bytes(2 * CS)
        assert img.read(0, SIZE) == model
        assert views_of(img) == snaps
        with img.open_snapshot("s1") as v:
            ext = list(v.extents())
            assert sum(x.length for x in ext) == SIZE
            assert any(x.depth == 1 for x in ext)  # runs read from the base
        assert_clean(img)
        img.revert_to_snapshot("s1")
        assert img.read(0, SIZE) == snaps["s1"]
        assert views_of(img) == snaps
        img.write(6 * BLOCK, b"after")  # after revert: block 6 reads the base again
        model[:] = snaps["s1"]
        model[6 * BLOCK : 6 * BLOCK + 5] = b"after"
        assert img.read(0, SIZE) == model
        assert_clean(img)
    with fvd.open(path, "r+") as img:
        assert img.read(0, SIZE) == model
        assert views_of(img) == snaps
        assert img.read_vm_state("s1") == b"vm"
        img.revert_to_snapshot("s2")
        assert img.read(0, SIZE) == snaps["s2"]
        img.delete_snapshot("s1")
        img.delete_snapshot("s2")
        assert img.read(0, SIZE) == snaps["s2"]
        assert_clean(img)
    with fvd.open(path) as img:
        assert not img._core.header.incompatible_features & fmt.INCOMPAT_SNAPSHOTS
        assert img.read(0, SIZE) == snaps["s2"]
        assert_clean(img)


def test_view_outlives_the_image_handle(tmp_path, kind):
    path, base, model = make_image(str(tmp_path), kind)
    img = fvd.open(path, "r+")
    img.write(CS + 7, b"x" * 9)
    model[CS + 7 : CS + 16] = b"x" * 9
    img.create_snapshot("s")
    v = img.open_snapshot("s")
    img.close()
    assert v.read(0, SIZE) == model  # its own read-only open of the base
    v.close()


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_stores_never_write_into_frozen_chunks(tmp_path, kind, cache):
    path, base, model = make_image(str(tmp_path), kind)
    with fvd.open(path, "r+", cache=cache) as img:
        for c in range(5):  # one block of each base chunk
            img.write(c * CS + BLOCK, b"w" * 100)
            model[c * CS + BLOCK : c * CS + BLOCK + 100] = b"w" * 100
        img.create_snapshot("s")
        snap_model = bytes(model)
        held = frozen_bytes(img)
        assert len(held) == 5
    with fvd.open(path, "r+", cache=cache, copy_on_read=True) as img:
        assert img.read(0, SIZE) == model  # copy-on-read stores into frozen chunks
        assert frozen_bytes(img) == held
        img.write(2 * CS + 3 * BLOCK + 1, b"g" * 5)  # a guest copy-on-write from the base
        model[2 * CS + 3 * BLOCK + 1 : 2 * CS + 3 * BLOCK + 6] = b"g" * 5
        assert frozen_bytes(img) == held
        img.prefetch(min_rate=0, step=2 * BLOCK)
        assert frozen_bytes(img) == held
        assert img.read(0, SIZE) == model
        with img.open_snapshot("s") as v:
            assert v.read(0, SIZE) == snap_model
        assert_clean(img)


def test_prefetch_keeps_the_base_while_a_snapshot_needs_it(tmp_path, kind):
    path, base, model = make_image(str(tmp_path), kind)
    with fvd.open(path, "r+") as img:
        img.write(0, b"z" * 10)
        model[:10] = b"z" * 10
        img.create_snapshot("old")  # reads most blocks from the base
        old = bytes(model)
        assert img.prefetch(min_rate=0) > 0
        assert img._core.base_layer is not None
        assert not img._core.header.base_flags & fmt.BASE_FLAG_PREFETCHED
        assert img._core.bitmap.stale_bits(
            0, img._core.bitmap.nblocks
        ).all()  # the front is complete
        img.create_snapshot("full")  # never needs the base
        s0 = img.stats.as_dict()
        img.write(4 * CS + 5, b"fast")  # fast path: block durably in the image
        model[4 * CS + 5 : 4 * CS + 9] = b"fast"
        d = delta(s0, img.stats.as_dict())
        assert d.get("base_reads", 0) == 0 and d.get("metadata_writes", 0) == 0
        assert img.read(0, SIZE) == model
        assert_clean(img)
    with fvd.open(path, "r+") as img:
        assert img._core.base_layer is not None
        with img.open_snapshot("old") as v:
            assert v.read(0, SIZE) == old
        img.delete_snapshot("old")
        assert img.prefetch(min_rate=0) == 0  # nothing to copy, now it completes
        assert img._core.base_layer is None
        assert img._core.header.base_flags & fmt.BASE_FLAG_PREFETCHED
    os.rename(base, base + ".gone")
    with fvd.open(path, "r+") as img:
        assert img.read(0, SIZE) == model
        with img.open_snapshot("full") as v:
            assert v.read(0, SIZE) == old
        img.create_snapshot("after")
        img.revert_to_snapshot("full")
        assert_clean(img)


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_write_costs_with_snapshots_over_a_base(tmp_path, cache):
    """Writes into the front's own chunks cost the same with and without snapshots, and
    no write touches the refcount table."""
    keys = (
        "metadata_writes",
        "metadata_bytes_written",
        "flushes",
        "refcount_updates",
        "journal_records",
        "data_writes",
        "data_bytes_written",
        "base_reads",
    )
    results = {}
    for nsnap in (0, 3):
        tmp = str(tmp_path / f"n{nsnap}")
        os.mkdir(tmp)
        path, base, model = make_image(tmp, "raw")
        with fvd.open(path, "r+", cache=cache) as img:
            img.write(0, pat(1, 2 * CS))
            for i in range(nsnap):
                img.create_snapshot(f"s{i}")
            img.write(0, pat(2, 2 * CS))  # the front's own copies now
            img.flush()
            rc = img.stats.refcount_updates
            assert rc == nsnap * 2
            costs = []
            # overwrite of an own chunk; allocating copy-on-write from the base; a second
            # write to that block; a write past the base
            for off, n in ((10, 100), (3 * CS + 5, 100), (3 * CS + 200, 10), (6 * CS, 4096)):
                s0 = img.stats.as_dict()
                img.write(off, pat(off, n))
                if cache == "writeback":
                    img.flush()
                d = delta(s0, img.stats.as_dict())
                costs.append({k: d.get(k, 0) for k in keys})
            assert img.stats.refcount_updates == rc
            results[nsnap] = costs
    assert results[0] == results[3]
    assert all(c["refcount_updates"] == 0 for c in results[3])


# ----- check ----------------------------------------------------------------------------------
def _rewrite_entry_bitmap(path, mutate, fix_crc=True):
    """Change the first snapshot's bitmap copy on disk (optionally keeping its crc valid)."""
    with fvd.open(path) as img:
        e = img._core.snapshot_state.entries[0]
        toff, tsize = (
            img._core.header.snapshot_table_offset,
            img._core.header.snapshot_table_size,
        )
        bsize = img._core.header.bitmap_size
    with open(path, "r+b") as f:
        f.seek(e.bitmap_offset)
        bits = bytearray(f.read(bsize))
        mutate(bits)
        f.seek(e.bitmap_offset)
        f.write(bits)
        if fix_crc:
            f.seek(toff)
            table = bytearray(f.read(tsize))
            pos = snap.TABLE_HEAD.size + snap.ENTRY.size + 8  # bitmap_crc of entry 0
            table[pos : pos + 4] = struct.pack("<I", zlib.crc32(bits))
            table[4:8] = b"\0\0\0\0"
            table[4:8] = struct.pack("<I", zlib.crc32(table))
            f.seek(toff)
            f.write(table)


def test_check_verifies_snapshot_bitmaps(tmp_path):
    path, base, model = make_image(str(tmp_path), "raw")
    with fvd.open(path, "r+") as img:
        img.write(0, b"a")
        img.create_snapshot("s")
        assert_clean(img)

    def set_chunk3(bits):  # chunk 3 is unallocated in the snapshot
        bits[3 * CS // BLOCK // 8] |= 1

    _rewrite_entry_bitmap(path, set_chunk3)
    with fvd.open(path) as img:
        r = img.check()
        assert r.corruptions == 1 and "unallocated chunk 3" in " ".join(r.messages)

    def flip(bits):
        bits[0] ^= 2

    _rewrite_entry_bitmap(path, flip, fix_crc=False)
    with fvd.open(path) as img:
        r = img.check()
        assert r.corruptions == 1 and "bitmap checksum" in " ".join(r.messages)
        with pytest.raises(fvd.CorruptImageError, match="bitmap checksum"):
            img.open_snapshot("s")
    with fvd.open(path, "r+") as img:
        with pytest.raises(fvd.CorruptImageError, match="bitmap checksum"):
            img.revert_to_snapshot("s")
        img.delete_snapshot("s")
        assert_clean(img)


def test_entry_format_is_as_documented(tmp_path):
    path, base, model = make_image(str(tmp_path), "raw")
    with fvd.open(path, "r+") as img:
        img.create_snapshot("abc")
        h = img._core.header
        e = img._core.snapshot_state.entries[0]
    with open(path, "rb") as f:
        f.seek(h.snapshot_table_offset)
        raw = f.read(h.snapshot_table_size)
        f.seek(e.bitmap_offset)
        bits = f.read(h.bitmap_size)
    assert len(raw) == 32 + 64 + 16 + 8
    ent = raw[32:]
    assert struct.unpack_from("<HH", ent, 36) == (3, 16)  # name_size, extra_size
    assert struct.unpack_from("<QII", ent, 64) == (e.bitmap_offset, zlib.crc32(bits), 0)
    assert ent[80:88] == b"abc\0\0\0\0\0"


# ----- crash cutting ----------------------------------------------------------------------------
def _model(img):
    return (
        img.read(0, SIZE),
        tuple(s.name for s in img.snapshots()),
        tuple(sorted(views_of(img).items())),
    )


def _prepare(path, model):
    with fvd.open(path, "r+") as img:
        img.write(100, pat(1, CS))
        img.create_snapshot("s1", vm_state=b"vm1" * 100)
        img.write(CS + 5, pat(2, 2 * CS))
        img.create_snapshot("s2")
        img.write(3 * CS + 9, pat(3, 100))


OPS = {
    "create": lambda img: img.create_snapshot("new", vm_state=pat(4, CS + 3)),
    "delete": lambda img: img.delete_snapshot("s1"),
    "revert": lambda img: img.revert_to_snapshot("s1"),
    "revert_s2": lambda img: img.revert_to_snapshot("s2"),
}


@pytest.mark.syscall_recorded
@pytest.mark.parametrize("op", sorted(OPS))
def test_crash_at_every_write_over_a_base(tmp_path, monkeypatch, op):
    tmp = str(tmp_path / "d")
    os.mkdir(tmp)
    path, base, model = make_image(tmp, "raw")
    _prepare(path, model)
    with fvd.open(path, "r+", copy_on_read=True) as img:
        img.read(4 * CS, CS)  # soft bits, not in the stale bitmap
        img.write(2 * BLOCK + 1, b"unflushed")
        img.flush()
        before = _model(img)
        pre = str(tmp_path / "pre.fvd")
        shutil.copyfile(path, pre)
        rec = WriteRecorder(path)
        OPS[op](img)
        rec.stop()
        after = _model(img)
        img._crash()
    assert_every_cut_is_before_or_after(
        pre, rec.ops, before, after, _model, os.path.join(tmp, "cut.fvd")
    )


# ----- hypothesis state machine -------------------------------------------------------------------
class BaseSnapshotMachine(RuleBasedStateMachine):
    kind = "raw"
    cache = "writeback"

    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp()
        self.path, self.base, base_model = make_image(self.dir, self.kind)
        self.cor = False
        self.img = fvd.open(self.path, "r+", cache=self.cache)
        self.front = bytearray(base_model)
        self.snaps = {}
        self.counter = 0
        self.seed = 0

    def teardown(self):
        self.img.close()
        with fvd.open(self.path) as img:
            assert img.read(0, SIZE) == self.front
            assert_clean(img)
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 2 * CS))
    def write(self, off, n):
        n = min(n, SIZE - off)
        self.seed += 1
        data = pat(self.seed, n)
        self.img.write(off, data)
        self.front[off : off + n] = data

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * CS))
    def zeroes(self, off, n):
        n = min(n, SIZE - off)
        self.img.write_zeroes(off, n)
        self.front[off : off + n] = bytes(n)

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 2 * CS))
    def read(self, off, n):  # with copy-on-read this stores base blocks
        n = min(n, SIZE - off)
        assert self.img.read(off, n) == self.front[off : off + n]

    @rule(vm=st.integers(0, 2))
    def create(self, vm):
        name = f"s{self.counter}"
        self.counter += 1
        r0 = self.img.stats.refcount_updates
        self.img.create_snapshot(name, vm_state=pat(self.counter, vm * 1000))
        assert self.img.stats.refcount_updates - r0 == self.img.allocated_chunks
        self.snaps[name] = (bytes(self.front), pat(self.counter, vm * 1000))

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.delete_snapshot(name)
        del self.snaps[name]

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def revert(self, data):
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.img.revert_to_snapshot(name)
        self.front[:] = self.snaps[name][0]

    @rule(step=st.sampled_from([BLOCK, 3 * BLOCK, CS]))
    def prefetch(self, step):
        held = frozen_bytes(self.img) if self.img._core.snapshot_state is not None else {}
        r0 = self.img.stats.refcount_updates
        self.img.prefetch(min_rate=0, step=step)
        assert self.img.stats.refcount_updates == r0
        after = frozen_bytes(self.img) if self.img._core.snapshot_state is not None else {}
        assert {p: b for p, b in after.items() if p in held} == {
            p: b for p, b in held.items() if p in after
        }
        assert self.img.read(0, SIZE) == self.front
        if self.img._core.base_layer is None:
            # completed: no snapshot may need the base any more
            assert self.img._core.header.base_flags & fmt.BASE_FLAG_PREFETCHED
            moved = self.base + ".away"
            os.rename(self.base, moved)
            try:
                self._check_views()
                self.img.close()
                self.img = fvd.open(self.path, "r+", cache=self.cache)
                assert self.img.read(0, SIZE) == self.front
                self._check_views()
            finally:
                os.rename(moved, self.base)
        else:
            assert self.snaps  # only a snapshot keeps the base attached

    @rule(cor=st.booleans())
    def reopen(self, cor):
        self.img.close()
        self.cor = cor
        self.img = fvd.open(self.path, "r+", cache=self.cache, copy_on_read=cor)
        assert self.img.check().ok

    @rule(cor=st.booleans())
    def crash_and_reopen(self, cor):
        self.img.flush()
        self.img._crash()
        self.cor = cor
        self.img = fvd.open(self.path, "r+", cache=self.cache, copy_on_read=cor)

    def _check_views(self):
        assert sorted(s.name for s in self.img.snapshots()) == sorted(self.snaps)
        for name, (data, vm) in self.snaps.items():
            with self.img.open_snapshot(name) as v:
                assert v.read(0, SIZE) == data, name
            assert self.img.read_vm_state(name) == vm

    @invariant()
    def contents(self):
        assert self.img.read(0, SIZE) == bytes(self.front)
        self._check_views()


@pytest.mark.parametrize(
    "kind,cache",
    [("raw", "writeback"), ("fvd", "writethrough"), ("raw", "writethrough"), ("fvd", "writeback")],
)
def test_state_machine_over_a_base(impl, kind, cache):
    machine = type("M", (BaseSnapshotMachine,), {"kind": kind, "cache": cache})
    machine.TestCase.settings = settings(
        max_examples=int(os.environ.get("FVD_BASE_EXAMPLES", "8")),
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    t = machine.TestCase("runTest")
    t.runTest()


def test_copy_on_read_copy_then_guest_write_survives_a_crash():
    """Found by the state machine: a copy-on-read store copies a snapshot-held chunk
    (crc-checked transaction); a guest write then changes copied bytes; the transaction
    must be sealed first or replay drops it and the guest write is lost."""
    machine = type("M", (BaseSnapshotMachine,), {"kind": "raw", "cache": "writethrough"})()
    try:
        machine.write(off=0, n=1)
        machine.create(vm=0)
        machine.crash_and_reopen(cor=True)
        machine.contents()  # stores base blocks: copies the held chunk
        machine.write(off=0, n=1)
        machine.crash_and_reopen(cor=False)
        machine.contents()
    finally:
        machine.teardown()


def test_snapshot_table_crossing_a_chunk_boundary(tmp_path):
    """The new entry's bitmap-copy extra data counts when the commit sizes the snapshot
    table: a table that grows past a chunk boundary only through it gets its second
    chunk (it used to overlap the refcount table written after it: checksum mismatch
    at the next open). 743 entries of 88 bytes after the 32-byte head end at 65416;
    an entry with a 48-byte name takes 64 + 48 bytes, 16 more with its extra data."""
    path, _, _ = make_image(str(tmp_path), "raw")
    with fvd.open(path, "r+", cache="unsafe") as img:  # no fdatasync: 744 commits
        img.write(0, b"x")
        for i in range(743):
            img.create_snapshot(f"s{i:06d}")
        img.create_snapshot("n" * 48)
        toff = img._core.header.snapshot_table_offset
        assert img._core.header.snapshot_table_size == 65416 + 64 + 16 + 48 > CS
        assert img._core.header.refcount_table_offset == toff + 2 * CS
    with fvd.open(path) as img:
        assert len(img.snapshots()) == 744
        assert_clean(img)
