"""Internal snapshots (fvd.features.snapshots): semantics, costs, bad input, crash cuts,
check."""

import errno
import os
import shutil
import threading

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
    counts_delta,
    pat,
)
from ..syscall_recorder import WriteRecorder

CS = 64 * 1024
SIZE = 8 * CS


@pytest.fixture
def path(tmp_path):
    p = str(tmp_path / "s.fvd")
    fvd.create(p, SIZE, chunk_size=CS, block_size=4096)
    return p


def assert_in_use_end(img):
    """The tail trim's shortcut agrees with the whole-table count of chunks in use."""
    used = np.flatnonzero(img._core.in_use())
    assert snap.in_use_end(img._core, 1 << 40) == (int(used[-1]) + 1 if len(used) else 0)


# ----- semantics --------------------------------------------------------------------------
def test_create_list_read_views_and_vm_state(path):
    with fvd.open(path, "r+") as img:
        img.write(0, pat(1, 3 * CS + 5))
        info = img.create_snapshot("s1", vm_state=pat(9, 3 * CS + 17))
        assert info.name == "s1" and info.id == 1 and info.size == SIZE
        assert info.vm_state_size == 3 * CS + 17
        assert info.created.tzinfo is not None
        img.write(CS - 3, b"X" * 10)
        img.create_snapshot("s2")
        assert [s.name for s in img.snapshots()] == ["s1", "s2"]
        assert [s.id for s in img.snapshots()] == [1, 2]
        d = img.snapshots()[0].as_dict()
        assert d["name"] == "s1" and d["vm_state_size"] == 3 * CS + 17
        with img.open_snapshot("s1") as v:
            assert v.read(0, 3 * CS + 5) == pat(1, 3 * CS + 5)
            assert v.read(3 * CS + 5, 10) == bytes(10)
            ext = list(v.extents())
            assert sum(e.length for e in ext) == SIZE
            with pytest.raises(OSError):
                v.write(0, b"x")
        assert img.read_vm_state("s1") == pat(9, 3 * CS + 17)
        assert img.read_vm_state("s2") == b""
        assert_clean(img)
    with fvd.open(path) as img:
        assert [s.name for s in img.snapshots()] == ["s1", "s2"]
        assert img._core.header.incompatible_features & fmt.INCOMPAT_SNAPSHOTS
        with img.open_snapshot("s2") as v:
            assert v.read(CS - 3, 10) == b"X" * 10
        assert img.read_vm_state("s1") == pat(9, 3 * CS + 17)
        assert_clean(img)


def test_revert_keeps_children_s1_s2_s3_revert_s1_write_s4(path):
    states = {}
    with fvd.open(path, "r+") as img:
        for i, name in enumerate(["s1", "s2", "s3"]):
            img.write(i * 1000, pat(i + 1, CS + 100))
            img.create_snapshot(name)
            states[name] = img.read(0, SIZE)
        img.write(5 * CS, b"front")
        img.revert_to_snapshot("s1")
        assert img.read(0, SIZE) == states["s1"]
        img.write(2 * CS + 7, b"after-revert")
        img.create_snapshot("s4")
        states["s4"] = img.read(0, SIZE)
        assert_clean(img)
    with fvd.open(path, "r+") as img:
        assert img.read(0, SIZE) == states["s4"]
        for name, data in states.items():
            with img.open_snapshot(name) as v:
                assert v.read(0, SIZE) == data, name
        img.revert_to_snapshot("s3")
        assert img.read(0, SIZE) == states["s3"]
        assert_clean(img)
    with fvd.open(path, "r+") as img:
        assert img.read(0, SIZE) == states["s3"]
        for name in list(states):
            img.delete_snapshot(name)
        assert img.snapshots() == []
        assert img.read(0, SIZE) == states["s3"]
        assert_clean(img)
    with fvd.open(path) as img:
        assert not img._core.header.incompatible_features & fmt.INCOMPAT_SNAPSHOTS
        assert img.read(0, SIZE) == states["s3"]
        assert_clean(img)


def test_delete_frees_chunks_that_are_reused_before_growing(path):
    with fvd.open(path, "r+") as img:
        img.write(0, pat(1, 4 * CS))
        img.create_snapshot("a")
        img.write(0, pat(2, 4 * CS))  # 4 copies: a holds the old 4 chunks
        used_before = int(img._core.in_use().sum())
        img.delete_snapshot("a")
        assert int(img._core.in_use().sum()) <= used_before - 4
        end = img._core.allocator.end
        img.write(4 * CS, pat(3, 4 * CS))  # new chunks come from the freed ones
        assert img._core.allocator.end == end
        assert img.read(0, 8 * CS) == pat(2, 4 * CS) + pat(3, 4 * CS)
        assert_clean(img)
    with fvd.open(path) as img:
        assert_clean(img)


def test_many_snapshots(path):
    n = 200
    with fvd.open(path, "r+") as img:
        for i in range(n):
            img.write((i * 4099) % (SIZE - 8), i.to_bytes(8, "little"))
            img.create_snapshot(f"snap-{i}")
        assert_clean(img)
    with fvd.open(path, "r+") as img:
        s = img.stats.as_dict()
        # header, table, snapshot table, refcounts, the front's partial map (no record)
        assert s["metadata_reads"] <= 5
        assert len(img.snapshots()) == n
        for i in (0, 150, n - 1):
            with img.open_snapshot(f"snap-{i}") as v:
                assert v.read((i * 4099) % (SIZE - 8), 8) == i.to_bytes(8, "little")
        for i in range(0, n, 2):
            img.delete_snapshot(f"snap-{i}")
        assert_clean(img)
    with fvd.open(path) as img:
        assert len(img.snapshots()) == n // 2
        assert_clean(img)


# ----- cost of writes: the refcount table is never touched -----------------------------------
@pytest.mark.parametrize("cache", ["writethrough", "writeback"])
def test_write_costs_do_not_depend_on_snapshot_count(tmp_path, cache):
    keys = (
        "metadata_writes",
        "metadata_bytes_written",
        "flushes",
        "refcount_updates",
        "journal_records",
        "data_writes",
        "data_bytes_written",
    )
    results = {}
    for nsnap in (0, 1, 100):
        p = str(tmp_path / f"n{nsnap}.fvd")
        fvd.create(p, SIZE, chunk_size=CS)
        with fvd.open(p, "r+", cache=cache) as img:
            img.write(0, pat(1, 2 * CS))
            for i in range(nsnap):
                img.create_snapshot(f"s{i}")
            img.flush()
            assert img.stats.refcount_updates == nsnap * 2  # 2 chunks per snapshot
            costs = []
            # first write into a held chunk (copy-on-write when snapshots exist), a second
            # write there, an allocating write, an overwrite of the front's own chunk
            for off, n in ((10, 100), (20, 50), (5 * CS, 4096), (5 * CS + 9, 10)):
                s0 = img.stats.as_dict()
                img.write(off, pat(off, n))
                if cache == "writeback":
                    img.flush()
                d = counts_delta(s0, img.stats.as_dict())
                costs.append({k: d.get(k, 0) for k in keys})
            assert img.stats.refcount_updates == nsnap * 2  # no write touched it
            results[nsnap] = costs
    assert results[1] == results[100]
    assert results[0][2:] == results[1][2:]
    zero = dict.fromkeys(keys, 0)
    if cache == "writethrough":
        # granular copy-on-write: the written 4 KiB granule only (its head and tail copied
        # from the held chunk), one journal sector (table entry, granule record, data crc)
        assert results[100][0] == {
            **zero,
            "metadata_writes": 1,
            "metadata_bytes_written": 512,
            "flushes": 1,
            "journal_records": 3,
            "data_writes": 1,
            "data_bytes_written": 4096,
        }
        # the second write lands inside the crc-checked granule: the transaction is sealed
        assert results[100][1] == {
            **zero,
            "metadata_writes": 1,
            "metadata_bytes_written": 512,
            "flushes": 2,
            "data_writes": 1,
            "data_bytes_written": 50,
        }
        assert results[100][2] == {
            **zero,
            "metadata_writes": 1,
            "metadata_bytes_written": 512,
            "flushes": 1,
            "journal_records": 1,
            "data_writes": 1,
            "data_bytes_written": 4096,
        }
    else:
        # writeback: flush() = data flush, one journal sector (table + granule), one flush
        assert results[0][1:] == results[1][1:]
        assert results[100][0] == {
            **zero,
            "metadata_writes": 1,
            "metadata_bytes_written": 512,
            "flushes": 2,
            "journal_records": 2,
            "data_writes": 1,
            "data_bytes_written": 4096,
        }
        assert results[100][1] == {**zero, "flushes": 1, "data_writes": 1, "data_bytes_written": 50}
    assert (
        results[100][3]
        == results[0][3]
        == {**zero, "flushes": 1, "data_writes": 1, "data_bytes_written": 10}
    )


def test_first_write_after_snapshot_copies_granule_edges_only(path):
    with fvd.open(path, "r+", cache="writethrough") as img:
        img.write(0, pat(1, CS))
        img.create_snapshot("s")
        s0 = img.stats.as_dict()
        img.write(100, b"y" * 100)
        d = counts_delta(s0, img.stats.as_dict())
        # head and tail of the 4 KiB granule in one read, one data write of the granule,
        # one journal sector (table entry, granule record, data crc)
        assert d == {
            "data_reads": 1,
            "data_bytes_read": 4096,
            "data_writes": 1,
            "data_bytes_written": 4096,
            "metadata_writes": 1,
            "metadata_bytes_written": 512,
            "flushes": 1,
            "journal_records": 3,
        }
        s0 = img.stats.as_dict()
        img.write(0, b"z" * CS)  # already the front's own (partial) chunk
        d = counts_delta(s0, img.stats.as_dict())
        # it overwrites the crc-checked granule: that transaction is sealed first; the
        # chunk is then complete (granule record + data crc)
        assert d == {
            "data_writes": 1,
            "data_bytes_written": CS,
            "flushes": 2,
            "metadata_writes": 2,
            "metadata_bytes_written": 1024,
            "journal_records": 2,
        }
        assert img._core.partial.active == 0
        s0 = img.stats.as_dict()
        img.write(0, b"w" * CS)  # seals the completing transaction once
        d = counts_delta(s0, img.stats.as_dict())
        assert d == {
            "data_writes": 1,
            "data_bytes_written": CS,
            "flushes": 2,
            "metadata_writes": 1,
            "metadata_bytes_written": 512,
        }
        s0 = img.stats.as_dict()
        img.write(0, b"w" * CS)  # an unshared chunk from now on
        d = counts_delta(s0, img.stats.as_dict())
        assert d == {"data_writes": 1, "data_bytes_written": CS, "flushes": 1}
        with img.open_snapshot("s") as v:
            assert v.read(0, CS) == pat(1, CS)
        assert img.read(0, CS) == b"w" * CS


# ----- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "x" * 256, "é" * 128, "a\0b", "tab\there", "\ud800"])
def test_bad_names(path, name):
    with fvd.open(path, "r+") as img:
        with pytest.raises(ValueError):
            img.create_snapshot(name)
        assert img.snapshots() == []


def test_non_str_name_and_duplicates_and_unknown(path):
    with fvd.open(path, "r+") as img:
        with pytest.raises(ValueError):
            img.create_snapshot(b"bytes")
        img.create_snapshot("x" * 255)
        img.create_snapshot("é" * 127)
        with pytest.raises(ValueError, match="already exists"):
            img.create_snapshot("x" * 255)
        for fn in (
            img.delete_snapshot,
            img.revert_to_snapshot,
            img.open_snapshot,
            img.read_vm_state,
        ):
            with pytest.raises(snap.SnapshotNotFoundError) as e:
                fn("nope")
            assert isinstance(e.value, fvd.FvdError) and isinstance(e.value, KeyError)
            assert "nope" in str(e.value)
    with fvd.open(path) as img:
        assert [s.name for s in img.snapshots()] == ["x" * 255, "é" * 127]
        with pytest.raises(OSError):
            img.create_snapshot("ro")


def test_snapshot_table_outside_the_file(path):
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s")
    with open(path, "r+b") as f:
        raw = bytearray(f.read(fmt.HEADER_SIZE))
        h = fmt.parse_header(bytes(raw), path, os.path.getsize(path))
        h = h.replace(snapshot_table_offset=1 << 40)
        f.seek(0)
        f.write(fmt.build_header(h))
    with pytest.raises(fvd.CorruptImageError) as e:
        fvd.open(path)
    assert path in str(e.value) and str(fmt.FIELD_OFFSET["snapshot_table_offset"]) in str(e.value)
    from fvd.image import check_file as check_path

    r = check_path(path)
    assert r.corruptions >= 1


def test_damaged_snapshot_metadata_is_reported(path):
    with fvd.open(path, "r+") as img:
        img.write(0, b"data")
        img.create_snapshot("s", vm_state=b"state" * 100)
        toff = img._core.header.snapshot_table_offset
        entry = img._core.snapshot_state.entries[0]
    with open(path, "r+b") as f:  # flip a byte of the vm_state
        f.seek(entry.vm_offset + 3)
        f.write(b"X")
    with fvd.open(path) as img:
        with pytest.raises(fvd.CorruptImageError, match="vm_state checksum"):
            img.read_vm_state("s")
    with open(path, "r+b") as f:  # flip a byte of the snapshot's table
        f.seek(entry.table_offset)
        f.write(b"\x07")
    with fvd.open(path) as img:
        with pytest.raises(fvd.CorruptImageError, match="lookup table checksum"):
            img.open_snapshot("s")
        assert img.check().corruptions >= 1
    with open(path, "r+b") as f:  # and of the snapshot table itself
        f.seek(toff + 40)
        f.write(b"\xff")
    with pytest.raises(fvd.CorruptImageError) as e:
        fvd.open(path)
    assert path in str(e.value) and str(toff) in str(e.value)


def test_refcount_overflow_is_refused(path, monkeypatch):
    monkeypatch.setattr(snap.refcounts, "REFCOUNT_MAX", 3)
    with fvd.open(path, "r+") as img:
        img.write(0, b"a")
        for i in range(3):
            img.create_snapshot(f"s{i}")
        with pytest.raises(snap.RefcountOverflowError, match="held by 3 snapshots"):
            img.create_snapshot("s3")
        assert len(img.snapshots()) == 3
        img.write(0, b"b" * CS)  # the front now has its own chunk (a whole one: no source)
        img.create_snapshot("s3")
        assert_clean(img)


def test_view_while_front_is_written_and_busy_delete(path):
    with fvd.open(path, "r+") as img:
        img.write(0, pat(1, SIZE))
        img.create_snapshot("s")
        view = img.open_snapshot("s")
        stop = threading.Event()
        errors = []

        def writer():
            for i in range(300):
                img.write((i * 7919) % (SIZE - 64), b"W" * 64)
            stop.set()

        t = threading.Thread(target=writer)
        t.start()
        reads = 0
        try:
            while not stop.is_set() or reads < 3:
                reads += 1
                if view.read(0, SIZE) != pat(1, SIZE):
                    errors.append("view changed")
        finally:
            t.join()
        assert img.read(0, 64) == b"W" * 64
        assert not errors
        with pytest.raises(snap.SnapshotBusyError):
            img.delete_snapshot("s")
        view.close()
        view.close()
        with pytest.raises(ValueError):
            view.read(0, 1)
        img.delete_snapshot("s")
        assert_clean(img)


def test_check_finds_and_repairs_refcount_errors(path):
    with fvd.open(path, "r+") as img:
        img.write(0, pat(1, 2 * CS))
        img.create_snapshot("s")
        add_leak(img)  # the front's own chunk stays in use
    with fvd.open(path, "r+") as img:
        r = img.check()
        assert r.leaks == 1 and r.corruptions == 0, r.messages
        r = img.check(repair=True)
        assert r.leaks == 0 and r.leaks_fixed == 1
        assert_clean(img)
    with fvd.open(path) as img:
        assert_clean(img)
        assert img.read(0, 2 * CS) == pat(1, 2 * CS)


SNAPSHOT_FIELDS = (
    "snapshot_table_offset",
    "snapshot_table_size",
    "nb_snapshots",
    "refcount_table_offset",
    "refcount_table_size",
    "next_snapshot_id",
)


def add_leak(img):
    """Count a chunk no snapshot holds (check -r leaks has something to fix)."""
    st = img._core.snapshot_state
    rc = st.refcount.copy()
    extra = img._core.allocator.allocate()
    img._core.grow_frozen(extra)
    rc = np.concatenate([rc, np.zeros(max(0, extra + 1 - len(rc)), np.uint16)])
    rc[extra] = 1
    snap.store_refcounts(img._core, st, rc)


@pytest.mark.parametrize("op", ["create", "delete", "revert", "repair"])
def test_a_failed_commit_header_write_changes_nothing(path, op):
    """Every snapshot commit (one transaction: fvd.features.snapshots.transaction) undoes
    itself when its header write fails: the header in memory is the old one, the new
    metadata chunks are given back, the snapshots are as before; after a reopen the
    image checks clean (nothing leaked) and reads as before."""
    with fvd.open(path, "r+") as img:
        img.write(0, pat(1, 2 * CS))
        img.create_snapshot("s")
        img.write(0, pat(2, CS))
        if op == "repair":
            add_leak(img)
        core = img._core
        before = {k: getattr(core.header, k) for k in SNAPSHOT_FIELDS}
        contents = img.read(0, SIZE)
        real = core.write_header

        def failing(**changes):
            if "snapshot_table_offset" in changes:  # the commit's header, not a checkpoint's
                raise OSError(errno.EIO, "injected")
            return real(**changes)

        core.write_header = failing
        with pytest.raises(OSError) as err:
            if op == "create":
                img.create_snapshot("t", vm_state=b"v" * 5000)
            elif op == "delete":
                img.delete_snapshot("s")
            elif op == "revert":
                img.revert_to_snapshot("s")
            else:
                img.check(repair=True)
        assert err.value.errno == errno.EIO
        core.write_header = real
        assert {k: getattr(core.header, k) for k in SNAPSHOT_FIELDS} == before
        assert [i.name for i in img.snapshots()] == ["s"]
        assert img.read(0, SIZE) == contents
    with fvd.open(path) as img:
        assert img.read(0, SIZE) == contents
        r = img.check()
        assert r.corruptions == 0 and r.leaks == (1 if op == "repair" else 0), r.messages


def test_check_finds_undercounted_chunk(path):
    with fvd.open(path, "r+") as img:
        img.write(0, pat(1, 2 * CS))
        img.create_snapshot("s")
        st = img._core.snapshot_state
        rc = st.refcount.copy()
        rc[int(np.flatnonzero(rc)[0])] = 0
        snap.store_refcounts(img._core, st, rc)
    with fvd.open(path, "r+") as img:
        r = img.check()
        assert r.corruptions == 1, r.messages
        r = img.check(repair=True)
        assert r.corruptions_fixed == 1
        assert_clean(img)


# ----- crash cutting ----------------------------------------------------------------------------


def model_of(img):
    return (
        img.read(0, SIZE),
        tuple((s.name, s.id, s.vm_state_size) for s in img.snapshots()),
        tuple(_view_bytes(img, s.name) for s in img.snapshots()),
    )


def _view_bytes(img, name):
    with img.open_snapshot(name) as v:
        return v.read(0, SIZE), img.read_vm_state(name)


def prepare(path):
    with fvd.open(path, "r+") as img:
        img.write(0, pat(1, 3 * CS))
        img.create_snapshot("s1", vm_state=b"vm1" * 100)
        img.write(CS, pat(2, 2 * CS))
        img.create_snapshot("s2")
        img.write(2 * CS + 5, pat(3, CS))


OPS = {
    "create": lambda img: img.create_snapshot("new", vm_state=pat(4, CS + 3)),
    "delete": lambda img: img.delete_snapshot("s1"),
    "delete_last": lambda img: img.delete_snapshot("s2"),
    "revert": lambda img: img.revert_to_snapshot("s1"),
}


@pytest.mark.syscall_recorded
@pytest.mark.parametrize("op", sorted(OPS))
def test_crash_at_every_write_of_an_operation(path, monkeypatch, op, tmp_path):
    prepare(path)
    with fvd.open(path, "r+", cache="writeback") as img:
        if op == "delete_last":
            img.delete_snapshot("s1")
        img.write(7 * CS, b"unflushed")  # flushed by the operation itself
        img.flush()
        before = model_of(img)
        pre = str(tmp_path / "pre.fvd")
        shutil.copyfile(path, pre)
        rec = WriteRecorder(path)
        OPS[op](img)
        rec.stop()
        after = model_of(img)
        img._crash()
    assert_every_cut_is_before_or_after(
        pre, rec.ops, before, after, model_of, str(tmp_path / "cut.fvd")
    )


# ----- hypothesis state machine -----------------------------------------------------------
class SnapshotMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "m.fvd")
        fvd.create(self.path, SIZE, chunk_size=CS, block_size=4096)
        self.img = fvd.open(self.path, "r+")
        self.front = bytearray(SIZE)
        self.snaps = {}
        self.counter = 0

    def teardown(self):
        self.img.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 2 * CS), seed=st.integers(0, 255))
    def write(self, off, n, seed):
        n = min(n, SIZE - off)
        data = pat(seed, n)
        self.img.write(off, data)
        self.front[off : off + n] = data

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 2 * CS))
    def write_zeroes(self, off, n):
        """Freed chunks: with deletes, the file is cut below chunks the journal may
        still name, and freed chunks are reused (crash_and_reopen replays)."""
        n = min(n, SIZE - off)
        self.img.write_zeroes(off, n)
        self.front[off : off + n] = bytes(n)

    @rule(vm=st.integers(0, 3))
    def create(self, vm):
        name = f"s{self.counter}"
        self.counter += 1
        self.img.create_snapshot(name, vm_state=pat(self.counter, vm * 1000))
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

    @rule()
    def reopen(self):
        self.img.close()
        self.img = fvd.open(self.path, "r+")
        assert self.img.check().ok

    @rule()
    def crash_and_reopen(self):
        self.img.flush()
        self.img._crash()
        self.img = fvd.open(self.path, "r+")

    @invariant()
    def contents(self):
        assert self.img.read(0, SIZE) == bytes(self.front)
        assert sorted(s.name for s in self.img.snapshots()) == sorted(self.snaps)
        for name, (data, vm) in self.snaps.items():
            with self.img.open_snapshot(name) as v:
                assert v.read(0, SIZE) == data
            assert self.img.read_vm_state(name) == vm
        assert_in_use_end(self.img)


def test_state_machine(impl):
    SnapshotMachine.TestCase.settings = settings(
        max_examples=int(os.environ.get("FVD_SNAPSHOT_EXAMPLES", "25")),
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    t = SnapshotMachine.TestCase("runTest")
    t.runTest()


def test_overwrite_after_copy_on_write_survives_a_power_cut(tmp_path, monkeypatch):
    """Writethrough: the copy of a snapshot-held chunk is journaled with crc records that
    replay checks on the last transaction. A later write into the copied range must seal
    that transaction first, or a power cut would make replay drop it and lose both the
    copy and every acknowledged write after it."""
    from ..helpers import DurableRecorder

    MiB = 1 << 20
    path = str(tmp_path / "cow.fvd")
    fvd.create(path, 4 * MiB)
    recorder = DurableRecorder(monkeypatch, path)
    img = fvd.open(path, "r+", cache="writethrough")
    img.write(0, b"A" * MiB)
    img.create_snapshot("s1")
    img.write(0, b"B" * 100)  # copies granule edges: crc-checked tx
    before = img.stats.as_dict()
    img.write(1000, b"C" * 1000)  # lands inside the copied bytes
    d = counts_delta(before, img.stats.as_dict())
    assert (d.get("data_writes"), d.get("metadata_writes"), d.get("flushes")) == (1, 1, 2)
    before = img.stats.as_dict()
    img.write(3000, b"D" * 1000)
    d = counts_delta(before, img.stats.as_dict())
    assert (d.get("data_writes"), d.get("metadata_writes", 0), d.get("flushes")) == (1, 0, 1)
    img._crash()
    recorder.power_cut()
    with fvd.open(path) as img:
        assert img.read(0, 4096) == (
            b"B" * 100 + b"A" * 900 + b"C" * 1000 + b"A" * 1000 + b"D" * 1000 + b"A" * 96
        )
        assert img.read(4096, MiB - 4096) == b"A" * (MiB - 4096)
        with img.open_snapshot("s1") as snap:
            assert snap.read(0, MiB) == b"A" * MiB


@pytest.mark.parametrize("cache", ["writethrough", "writeback"])
def test_replay_after_the_file_was_cut_below_a_journaled_chunk(path, cache):
    """A transaction maps chunks u and v; v's chunk X is freed later (write_zeroes) and a
    snapshot delete cuts the file below X and frees u's old chunk P, which the next write
    reuses. Replay after a crash must still apply the first transaction (X past the end
    of the file is not a torn write there: a flush followed it), else u falls back to P
    and two chunks share it ("chunk 3 shares physical chunk 1", the rare SIGKILL
    failure)."""
    with fvd.open(path, "r+") as img:
        img.write(0, pat(1, 2 * CS))  # chunks 0, 1 -> P0, P1 (checkpointed at close)
    img = fvd.open(path, "r+", cache=cache)
    img.create_snapshot("s1")
    img.write(CS, pat(2, 2 * CS))  # one transaction: chunk 1 leaves P1, chunk 2 new (X)
    img.flush()
    x = int(img._core.table[2])
    img.write_zeroes(2 * CS, CS)  # X freed
    img.delete_snapshot("s1")  # P1 freed; the file is cut below X
    assert os.path.getsize(path) <= img._core.header.data_offset + x * CS
    img.write(3 * CS, pat(3, CS))  # reuses P1
    img.flush()
    want = img.read(0, SIZE)
    img._crash()
    with fvd.open(path, "r+") as img:
        assert img.read(0, SIZE) == want
        assert_clean(img)
