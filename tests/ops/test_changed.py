"""Changed extents between snapshots (fvd.ops.changed): never a missed change, nothing for
chunks with equal entries, zero flags, bad input; CLI `map --since/--until`."""

import json
import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import fvd
from fvd import cli
from fvd.features.snapshots import SnapshotNotFoundError
from fvd.ops.changed import FLAG_DATA, FLAG_ZERO

CS = 64 * 1024
BLOCK = 4096
SIZE = 8 * CS
BASE_SIZE = 5 * CS + 3000  # not block aligned; the image is larger than the base


def covered(arr, size):
    """(changed mask, zero-flagged mask) per byte."""
    changed = np.zeros(size, dtype=bool)
    zero = np.zeros(size, dtype=bool)
    for s, n, f in arr.tolist():
        changed[s : s + n] = True
        if f & FLAG_ZERO:
            zero[s : s + n] = True
    return changed, zero


def assert_sound(arr, older, newer, size):
    """Every byte that differs is reported; zero-flagged ranges read zeros; sorted,
    disjoint, merged."""
    a = np.frombuffer(older, dtype=np.uint8)
    b = np.frombuffer(newer, dtype=np.uint8)
    changed, zero = covered(arr, size)
    missed = np.flatnonzero((a != b) & ~changed)
    assert not len(missed), f"missed change at byte {int(missed[0])}: {arr.tolist()}"
    assert not b[zero].any(), "a range flagged zero does not read zeros"
    ends = arr["start"] + arr["length"]
    assert (arr["length"] > 0).all()
    assert (arr["start"][1:] >= ends[:-1]).all()
    assert set(arr["flags"].tolist()) <= {FLAG_DATA, FLAG_ZERO}


def make_base(tmp):
    data = random.Random(7).randbytes(BASE_SIZE)
    path = os.path.join(tmp, "base.raw")
    with open(path, "wb") as f:
        f.write(data)
    return path


class ChangedMachine(RuleBasedStateMachine):
    """Writes, zeroes, snapshots, reverts, reopens and crashes; after each step every
    pair (snapshot, later snapshot or front) is compared byte by byte."""

    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "img.fvd")
        self.img = None

    @initialize(with_base=st.booleans(), writethrough=st.booleans())
    def setup(self, with_base, writethrough):
        self.with_base = with_base
        self.cache = "writethrough" if writethrough else "writeback"
        kw = {}
        if self.with_base:
            kw = {"base": make_base(self.dir), "base_format": "raw"}
        fvd.create(self.path, SIZE, chunk_size=CS, block_size=BLOCK, **kw)
        self.img = fvd.open(self.path, "r+", cache=self.cache)
        self.names = []
        self.counter = 0

    def teardown(self):
        if self.img is not None:
            self.img.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * BLOCK), seed=st.integers(0, 255))
    def write(self, off, n, seed):
        n = min(n, SIZE - off)
        self.img.write(off, bytes([seed | 1]) * n)

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 2 * CS))
    def write_zeroes(self, off, n):
        self.img.write_zeroes(off, min(n, SIZE - off))

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, CS))
    def read_copy_on_read(self, off, n):
        if self.with_base:
            self.img.close()
            self.img = fvd.open(self.path, "r+", cache=self.cache, copy_on_read=True)
        self.img.read(off, min(n, SIZE - off))

    @precondition(lambda self: len(self.names) < 4)
    @rule()
    def snapshot(self):
        self.counter += 1
        name = f"s{self.counter}"
        self.img.create_snapshot(name)
        self.names.append(name)

    @precondition(lambda self: self.names)
    @rule(i=st.integers(0, 3))
    def revert(self, i):
        self.img.revert_to_snapshot(self.names[i % len(self.names)])

    @precondition(lambda self: len(self.names) > 1)
    @rule(i=st.integers(0, 3))
    def delete(self, i):
        self.img.delete_snapshot(self.names.pop(i % len(self.names)))

    @rule()
    def reopen(self):
        self.img.close()
        self.img = fvd.open(self.path, "r+", cache=self.cache)

    @rule()
    def crash_reopen(self):
        self.img._crash()
        self.img = fvd.open(self.path, "r+", cache=self.cache)

    @rule()
    def prefetch(self):
        if self.with_base:
            self.img.prefetch()

    @invariant()
    def never_misses_a_change(self):
        img = self.img
        if img is None:
            return
        contents = {}
        for name in self.names:
            with img.open_snapshot(name) as v:
                contents[name] = v.read(0, SIZE)
        front = img.read(0, SIZE)
        for i, since in enumerate(self.names):
            arr = img.changed_extents_array(since)
            assert_sound(arr, contents[since], front, SIZE)
            if not self.with_base:
                self.only_differing_entries(arr, since)
            for until in self.names[i:]:
                arr = img.changed_extents_array(since, until)
                assert_sound(arr, contents[since], contents[until], SIZE)
                if since == until:
                    assert len(arr) == 0
            with img.open_snapshot(self.names[-1]) as v:
                arr = v.changed_extents_array(since)
                assert_sound(arr, contents[since], contents[self.names[-1]], SIZE)

    def only_differing_entries(self, arr, since):
        """Without a base: a reported chunk has entries that differ and do not both read
        zeros (ZERO and UNALLOCATED are the same bytes)."""
        from fvd.features.snapshots import read_snapshot_table
        from fvd.ondisk import format as fmt

        old = read_snapshot_table(self.img._core, self.img._core.snapshot_state.find(since, ""))
        new = self.img._core.table
        for s, n, _f in arr.tolist():
            for v in range(s // CS, -(-(s + n) // CS)):
                a, b = int(old[v]), int(new[v])
                assert a != b and min(a, b) < fmt.ZERO_CHUNK, (v, a, b)


def test_state_machine(impl):
    n = int(os.environ.get("FVD_CHANGED_EXAMPLES", "25"))
    run_state_machine_as_test(
        ChangedMachine,
        settings=settings(
            max_examples=n,
            stateful_step_count=14,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


# ----- exact behaviour ----------------------------------------------------------------------
@pytest.fixture
def path(tmp_path):
    p = str(tmp_path / "img.fvd")
    fvd.create(p, SIZE, chunk_size=CS, block_size=BLOCK)
    return p


def test_equal_entries_report_nothing_and_zero_ranges_are_flagged(path):
    with fvd.open(path, "r+") as img:
        img.write(0, b"a" * (3 * CS))
        img.create_snapshot("s1")
        assert img.changed_extents_array("s1").tolist() == []
        img.write(CS + 5, b"b")  # chunk 1 copied: changed
        img.write_zeroes(2 * CS, CS)  # chunk 2 unmapped: zero
        img.write(6 * CS, b"c")  # chunk 6 new
        arr = img.changed_extents_array("s1")
        assert arr.tolist() == [
            (CS, CS, FLAG_DATA),
            (2 * CS, CS, FLAG_ZERO),
            (6 * CS, CS, FLAG_DATA),
        ]
        ext = img.changed_extents("s1")
        assert [(e.start, e.length, e.zero, e.data) for e in ext] == [
            (CS, CS, False, True),
            (2 * CS, CS, True, False),
            (6 * CS, CS, False, True),
        ]
        assert type(ext[0]) is type(next(iter(img.extents())))
        assert len(ext) == 3 and ext[1:][0] == ext[1] and (ext.array == arr).all()
        img.create_snapshot("s2")
        assert img.changed_extents_array("s1", "s2").tolist() == arr.tolist()
        assert img.changed_extents_array("s2").tolist() == []
        with img.open_snapshot("s2") as v:
            assert v.changed_extents_array("s1").tolist() == arr.tolist()
            img.write(7 * CS, b"d")  # the view's contents stay s2's
            assert v.changed_extents_array("s1").tolist() == arr.tolist()


def test_unallocated_and_zero_chunks_compare_equal(path):
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s1")
        img.write_zeroes(0, 2 * CS)  # UNALLOCATED -> stays zero-reading
        assert img.changed_extents_array("s1").tolist() == []


def test_base_bitmap_gives_block_granularity(tmp_path):
    base = make_base(str(tmp_path))
    p = str(tmp_path / "img.fvd")
    fvd.create(p, SIZE, chunk_size=CS, block_size=BLOCK, base=base, base_format="raw")
    with fvd.open(p, "r+") as img:
        img.write(10, b"x")  # block 0 of chunk 0 from the base
        img.create_snapshot("s1")
        img.write(BLOCK * 3 + 1, b"y")  # chunk 0 is frozen: copied, block 3 set
        arr = img.changed_extents_array("s1")
        # block 0 moved to the new chunk, block 3 left the base; the other blocks still
        # read the base in both states
        assert arr.tolist() == [(0, BLOCK, FLAG_DATA), (3 * BLOCK, BLOCK, FLAG_DATA)]
    with fvd.open(p, "r+", copy_on_read=True) as img:
        img.read(0, CS)  # soft bits: same bytes as the base
        assert img.changed_extents_array("s1").tolist() == arr.tolist()


def test_bad_input(path, tmp_path):
    with fvd.open(path, "r+") as img:
        with pytest.raises(SnapshotNotFoundError):
            img.changed_extents("nope")
        img.create_snapshot("s1")
        img.write(0, b"x")
        img.create_snapshot("s2")
        with pytest.raises(SnapshotNotFoundError):
            img.changed_extents("s1", "nope")
        with pytest.raises(ValueError, match="newer"):
            img.changed_extents("s2", "s1")
        with pytest.raises(ValueError):
            img.changed_extents(1)
        with img.open_snapshot("s1") as v:
            with pytest.raises(ValueError, match="newer"):
                v.changed_extents("s2")
    before = open(path, "rb").read()
    with fvd.open(path) as img, pytest.raises(SnapshotNotFoundError):
        img.changed_extents("nope")
    assert open(path, "rb").read() == before


def test_cli_map_since_until(path, capsys):
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s1")
        img.write(CS, b"x")
        img.create_snapshot("s2")
        img.write_zeroes(CS, CS)
    assert cli.main(["map", "--since", "s1", "--output=json", path]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main(["map", "--since", "s1", "--until", "s2", "--output=json", path]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == [
        {"start": CS, "length": CS, "depth": 0, "present": True, "zero": False, "data": True}
    ]
    assert cli.main(["map", "--since", "s1", "--until", "s2", path]) == 0
    assert f"{CS:#x}" in capsys.readouterr().out
    assert cli.main(["map", "--since", "nope", path]) == 1
    assert "nope" in capsys.readouterr().err
    assert cli.main(["map", "--until", "s2", path]) == 1
    assert "--since" in capsys.readouterr().err
