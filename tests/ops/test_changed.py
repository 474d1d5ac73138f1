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
from fvd.features.snapshots import SnapshotNotFoundError, read_snapshot_table
from fvd.ondisk import format as fmt
from fvd.ondisk import fvd_records as fr
from fvd.ops import changed
from fvd.ops.changed import FLAG_DATA, FLAG_ZERO, Geometry, Partial, State, compare

CS = 64 * 1024
BLOCK = 4096
G = 4096  # granule size fvd writes
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


def _key(e):
    return int(e) if e < fmt.ZERO_CHUNK else -1  # a physical chunk, or -1 for zeros


def _flags(raw, gpc):
    return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:gpc].astype(bool)


def _state(img, e):
    """(table, {v: (source, granule flags)}, is the front, {v: (origin, carried flags)})
    of a snapshot entry (its granule record and provenance section decoded with the
    construct declarations, not fvd's decoder) or of the front (None: its partial
    chunks)."""
    core = img._core
    gpc = img.chunk_size // (core.header.granule_size or fmt.DEFAULT_GRANULE)
    rec, prov = {}, {}
    if e is None:
        part = core.partial
        if part is not None:
            for v, k in part.entries():
                rec[v] = (int(part.src[k]), part.flags(k).copy())
                carried = _flags((part.row(k) & ~part.wrow(k)).tobytes(), gpc)
                prov[v] = (int(part.cfrom[k]), carried)
        return core.table.copy(), rec, True, prov
    table = read_snapshot_table(core, e)
    if e.granules_offset:
        raw = os.pread(core.fd, e.granules_size, e.granules_offset)
        row_bytes = fr.partial_row_bytes(img.chunk_size, G)
        head = fr.PartialMapHead.parse(raw)
        m = fr.PartialMap.parse(raw, row_bytes=row_bytes)
        for ent in m.entries:
            rec[ent.virtual_chunk] = (ent.source_chunk, _flags(ent.bits, gpc))
        if head.flags & fr.PARTIAL_MAP_FLAG_PROVENANCE:
            esize = fr.PartialMapEntry.sizeof(row_bytes=row_bytes)
            at = fr.PartialMapHead.sizeof() + len(m.entries) * esize
            for i, ent in enumerate(m.entries):
                p = fr.ProvenanceEntry.parse(raw[at + i * esize :], row_bytes=row_bytes)
                prov[ent.virtual_chunk] = (p.origin_chunk, _flags(p.carried, gpc))
    return table, rec, False, prov


def _granule_keys(state, v, gpc):
    """Per granule of virtual chunk v, the physical chunk the state reads it from (-1:
    zeros): a partial chunk's N at its set bits and its source S elsewhere (records are
    exact), else the table's entry for every granule."""
    table, rec = state[0], state[1]
    k = _key(table[v])
    keys = np.full(gpc, k, dtype=np.int64)
    if v in rec and k != -1:
        source, flags = rec[v]
        keys[~flags[:gpc]] = source
    return keys


def _carried_same(older_keys, newer, v, gpc):
    """Granules of chunk v that the newer state carries from the chunk the older state
    reads there (docs/format.md section 10, "Provenance"): equal bytes."""
    table, rec, prov = newer[0], newer[1], newer[3]
    same = np.zeros(gpc, dtype=bool)
    if v in prov and v in rec and _key(table[v]) != -1:
        origin, carried = prov[v]
        same = carried & rec[v][1][:gpc] & (older_keys == origin)
    return same


def walk_reference(img, since, until):
    """Granule by granule, the changed granules fvd.ops.changed reports (docs/format.md,
    "Changed extents between snapshots"): where the two states read a granule from
    different physical chunks (or one of them reads zeros). No state between them is
    consulted. Returns (changed, zero) bool arrays of shape (nchunks, gpc)."""
    core = img._core
    entries = core.snapshot_state.entries
    first = next(e for e in entries if e.name == since)
    last = next(e for e in entries if e.name == until) if until is not None else None
    a, b = _state(img, first), _state(img, last)
    nchunks = -(-img.size // img.chunk_size)
    gpc = img.chunk_size // (core.header.granule_size or fmt.DEFAULT_GRANULE)
    changed = np.zeros((nchunks, gpc), dtype=bool)
    zero = np.zeros((nchunks, gpc), dtype=bool)
    for v in range(nchunks):
        ka, kb = _granule_keys(a, v, gpc), _granule_keys(b, v, gpc)
        changed[v] = (ka != kb) & ~_carried_same(ka, b, v, gpc)
        zero[v] = kb == -1
    return changed, changed & zero


def assert_exact(arr, img, since, until):
    """Without a base, fvd.ops.changed reports exactly the reference's granules, and flags
    exactly those that read zeros in the newer state."""
    changed, zero = walk_reference(img, since, until)
    gs = img.chunk_size // changed.shape[1]
    want = np.repeat(changed.ravel(), gs)[: img.size]
    want_zero = np.repeat(zero.ravel(), gs)[: img.size]
    got, got_zero = covered(arr, img.size)
    assert np.array_equal(got, want), (since, until, arr.tolist())
    assert np.array_equal(got_zero, want_zero), (since, until, arr.tolist())


class WrittenModel:
    """What the guest did, granule by granule (black box): which chunks are allocated,
    and per interval between snapshots which granules writes touched and which chunks
    were zeroed whole. Between adjacent states with nothing but writes, zeroes and
    clean reopens between them, changed extents are exactly: a chunk the older state
    held, the touched granules (the whole chunk once zeroed whole); a chunk it did not
    hold, the whole chunk if the newer state holds one."""

    def __init__(self, nchunks, gpc):
        self.nchunks, self.gpc = nchunks, gpc
        self.alloc = np.zeros(nchunks, dtype=bool)
        self.snaps = {}  # name -> alloc when taken
        self.ended = {}  # name -> the interval that ended with it
        self.begin()

    def begin(self):
        self.cur = {
            "held": self.alloc.copy(),
            "touched": np.zeros((self.nchunks, self.gpc), dtype=bool),
            "reset": np.zeros(self.nchunks, dtype=bool),
            "clean": True,
        }

    def _touch(self, off, n):
        gs = SIZE // self.nchunks // self.gpc
        for g in range(off // gs, -(-(off + n) // gs)):
            self.cur["touched"][g // self.gpc, g % self.gpc] = True

    def write(self, off, n):
        self._touch(off, n)
        cs = SIZE // self.nchunks
        self.alloc[off // cs : -(-(off + n) // cs)] = True

    def zeroes(self, off, n):
        cs = SIZE // self.nchunks
        end = off + n
        head_end = min(end, -(-off // cs) * cs)
        tail_start = max(head_end, end // cs * cs)
        for a, b in ((off, head_end), (tail_start, end)):
            if b > a and self.alloc[a // cs]:
                self._touch(a, b - a)
        self.alloc[head_end // cs : tail_start // cs] = False
        self.cur["reset"][head_end // cs : tail_start // cs] = True

    def snapshot(self, name):
        self.snaps[name] = self.alloc.copy()
        self.ended[name] = self.cur
        self.begin()

    def revert(self, name):
        self.alloc = self.snaps[name].copy()
        self.cur["clean"] = False

    def delete(self, names, i):
        """names: the snapshots in order, before `i` is removed."""
        name = names[i]
        del self.snaps[name]
        del self.ended[name]
        if i + 1 < len(names):
            self.ended[names[i + 1]]["clean"] = False
        else:
            self.cur["clean"] = False

    def unclean(self):
        self.cur["clean"] = False

    def expected(self, name):
        """(changed, zero) per granule between the snapshot before `name` (or before the
        front when name is None) and it; None when the interval was not clean."""
        iv = self.cur if name is None else self.ended[name]
        if not iv["clean"]:
            return None
        end = self.alloc if name is None else self.snaps[name]
        whole = np.where(iv["held"], iv["reset"], end)
        changed = iv["touched"] & iv["held"][:, None] | whole[:, None]
        return changed, changed & ~end[:, None]


def make_base(tmp):
    data = random.Random(7).randbytes(BASE_SIZE)
    path = os.path.join(tmp, "base.raw")
    with open(path, "wb") as f:
        f.write(data)
    return path


class ChangedMachine(RuleBasedStateMachine):
    """Writes, zeroes, snapshots, reverts, reopens and crashes; after each step every
    pair (snapshot, later snapshot or front) is compared byte by byte (never a missed
    change), without a base against the granule-by-granule reference, and between
    adjacent states with only writes between them against the model of what was written
    (granule precise, also between two snapshots: their granule records)."""

    def __init__(self):
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "img.fvd")
        self.img = None

    @initialize(with_base=st.booleans(), writethrough=st.booleans())
    def setup(self, with_base, writethrough):
        self.start(with_base, writethrough)

    def start(self, with_base, writethrough):
        self.with_base = with_base
        self.cache = "writethrough" if writethrough else "writeback"
        kw = {}
        if self.with_base:
            kw = {"base": make_base(self.dir), "base_format": "raw"}
        fvd.create(self.path, SIZE, chunk_size=CS, block_size=BLOCK, **kw)
        self.img = fvd.open(self.path, "r+", cache=self.cache)
        self.names = []
        self.counter = 0
        self.model = WrittenModel(SIZE // CS, CS // G)

    def teardown(self):
        if self.img is not None:
            self.img.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 3 * BLOCK), seed=st.integers(0, 255))
    def write(self, off, n, seed):
        n = min(n, SIZE - off)
        self.img.write(off, bytes([seed | 1]) * n)
        self.model.write(off, n)

    @precondition(lambda self: self.names)
    @rule(g=st.integers(0, SIZE // BLOCK - 1), k=st.integers(1, 3), seed=st.integers(0, 255))
    def write_granules(self, g, k, seed):
        """Aligned granules after a snapshot: chunks go (and stay) partial."""
        n = min(k * BLOCK, SIZE - g * BLOCK)
        self.img.write(g * BLOCK, bytes([seed | 1]) * n)
        self.model.write(g * BLOCK, n)

    @rule(off=st.integers(0, SIZE - 1), n=st.integers(1, 2 * CS))
    def write_zeroes(self, off, n):
        self.img.write_zeroes(off, min(n, SIZE - off))
        self.model.zeroes(off, min(n, SIZE - off))

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
        self.model.snapshot(name)

    @precondition(lambda self: self.names)
    @rule(i=st.integers(0, 3))
    def revert(self, i):
        self.img.revert_to_snapshot(self.names[i % len(self.names)])
        self.model.revert(self.names[i % len(self.names)])

    @precondition(lambda self: len(self.names) > 1)
    @rule(i=st.integers(0, 3))
    def delete(self, i):
        self.model.delete(self.names, i % len(self.names))
        self.img.delete_snapshot(self.names.pop(i % len(self.names)))

    @rule()
    def reopen(self):
        self.img.close()
        self.img = fvd.open(self.path, "r+", cache=self.cache)

    @rule()
    def crash_reopen(self):
        self.img._crash()
        self.img = fvd.open(self.path, "r+", cache=self.cache)
        # unflushed writes may be gone: the model of this interval is not exact
        self.model.unclean()
        self.model.alloc = self.img._core.table < fmt.ZERO_CHUNK

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
        later = self.names[1:] + [None]
        for i, since in enumerate(self.names):
            arr = img.changed_extents_array(since)
            assert_sound(arr, contents[since], front, SIZE)
            if not self.with_base:
                assert_exact(arr, img, since, None)
                self.assert_model(arr, since, later[i], i + 1 == len(self.names))
            for until in self.names[i:]:
                arr = img.changed_extents_array(since, until)
                assert_sound(arr, contents[since], contents[until], SIZE)
                if not self.with_base:
                    assert_exact(arr, img, since, until)
                    self.assert_model(arr, since, until, until == later[i])
                if since == until:
                    assert len(arr) == 0
            with img.open_snapshot(self.names[-1]) as v:
                arr = v.changed_extents_array(since)
                assert_sound(arr, contents[since], contents[self.names[-1]], SIZE)
                # the view is a read-only core: its live state is its snapshot's
                live = changed.changed_extents_array(v._mapped(), since, None)
                assert live.tolist() == arr.tolist()

    def assert_model(self, arr, since, until, adjacent):
        """Adjacent states (until: the state right after since, None for the front),
        nothing but writes between them: the model's granules, plus at most the granules
        since's record had written in a partial chunk (the front's first write after the
        snapshot copies them forward into a new chunk: same bytes, another chunk)."""
        want = self.model.expected(until) if adjacent else None
        if want is None:
            return
        entry = next(e for e in self.img._core.snapshot_state.entries if e.name == since)
        carried = np.zeros_like(want[0])
        for v, (_, flags) in _state(self.img, entry)[1].items():
            carried[v] = flags[: carried.shape[1]]
        changed, zero = covered(arr, SIZE)
        want_changed = np.repeat(want[0].ravel(), G)
        extra = changed & ~want_changed
        assert not (want_changed & ~changed).any(), (until, arr.tolist())
        assert not (extra & ~np.repeat(carried.ravel(), G)).any(), (until, arr.tolist())
        assert np.array_equal(zero, np.repeat(want[1].ravel(), G)), (until, arr.tolist())


class PartialChunkMachine(ChangedMachine):
    """No base, every chunk written, then a snapshot: from the start, a write into a
    chunk the snapshot holds makes a partial chunk (granular copy-on-write)."""

    @initialize(writethrough=st.booleans())
    def setup(self, writethrough):
        self.start(False, writethrough)
        self.img.write(0, random.Random(3).randbytes(SIZE))
        self.model.write(0, SIZE)
        self.snapshot()


@pytest.mark.parametrize("machine", [ChangedMachine, PartialChunkMachine])
def test_state_machine(impl, machine):
    n = int(os.environ.get("FVD_CHANGED_EXAMPLES", "25"))
    run_state_machine_as_test(
        machine,
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
        img.write(CS, b"b" * CS)  # chunk 1 rewritten whole (not partial): changed
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


# ----- partial chunks: granule precision ------------------------------------------------


def test_a_write_into_a_held_chunk_is_reported_at_granule_precision(path):
    """Snapshot, then 4 KiB into a fully written chunk: exactly that granule, not the
    chunk; an unaligned write: the granules it touches; adjacent granules merge."""
    with fvd.open(path, "r+") as img:
        img.write(0, b"a" * SIZE)
        img.create_snapshot("s1")
        img.write(CS + 3 * G, b"b" * G)
        assert img._core.partial.active == 1
        assert img.changed_extents_array("s1").tolist() == [(CS + 3 * G, G, FLAG_DATA)]
        img.write(CS + 4 * G + 100, b"c" * 10)  # granule 4, next to granule 3
        img.write(5 * CS - 10, b"d" * 20)  # last granule of chunk 4, first of chunk 5
        img.write(7 * CS + 9 * G + 1, b"e" * (2 * G))  # granules 9..11 of chunk 7
        assert img.changed_extents_array("s1").tolist() == [
            (CS + 3 * G, 2 * G, FLAG_DATA),
            (5 * CS - G, 2 * G, FLAG_DATA),
            (7 * CS + 9 * G, 3 * G, FLAG_DATA),
        ]
        ext = img.changed_extents("s1")
        assert [(e.start, e.length, e.data, e.zero) for e in ext][0] == (
            CS + 3 * G,
            2 * G,
            True,
            False,
        )


def test_granules_after_reopen_crash_and_with_writeback(path):
    """The partial state from the map (after close) and from the journal (after a crash)
    gives the same granules; writeback reports what reads see before a flush."""
    want = [(2 * CS + G, G, FLAG_DATA), (3 * CS, 2 * G, FLAG_DATA)]
    with fvd.open(path, "r+", cache="writeback") as img:
        img.write(0, b"a" * SIZE)
        img.create_snapshot("s1")
        img.write(2 * CS + G, b"b" * G)
        img.write(3 * CS, b"b" * (2 * G))
        assert img.changed_extents_array("s1").tolist() == want
    with fvd.open(path, "r+", cache="writethrough") as img:
        assert img._core.partial.active == 2
        assert img.changed_extents_array("s1").tolist() == want
        img.write(3 * CS + 5 * G, b"c" * G)
        img._crash()
    with fvd.open(path) as img:
        assert img.changed_extents_array("s1").tolist() == want + [(3 * CS + 5 * G, G, FLAG_DATA)]


def test_two_snapshots_and_writes_between_them(path):
    """s1; write A; s2 (holds the partial chunk as it is: its granule record says which
    granule the front wrote); write B into the same chunk (copied forward: A's granule is
    carried into a new chunk, with its provenance). Since s2: B's granule only (the
    carried A holds s2's bytes); s1..s2: A's granule; since s1: A's and B's. A chunk both
    snapshots hold,
    written after s2: its granule, since either. Deleting s2 changes nothing since s1:
    the two states alone decide."""
    with fvd.open(path, "r+") as img:
        img.write(0, b"a" * SIZE)
        img.create_snapshot("s1")
        img.write(CS + 2 * G, b"A" * G)
        img.create_snapshot("s2")
        assert img._core.partial.active == 1  # s2 holds it, partial
        assert img.changed_extents_array("s2").tolist() == []
        assert img.changed_extents_array("s1", "s2").tolist() == [(CS + 2 * G, G, FLAG_DATA)]
        img.write(CS + 5 * G, b"B" * G)
        img.write(4 * CS + 7 * G, b"C" * G)  # chunk 4: held by s1 and s2 alike
        both = [
            (CS + 2 * G, G, FLAG_DATA),
            (CS + 5 * G, G, FLAG_DATA),
            (4 * CS + 7 * G, G, FLAG_DATA),
        ]
        assert img.changed_extents_array("s2").tolist() == both[1:]
        assert img.changed_extents_array("s1").tolist() == both
        with img.open_snapshot("s2") as v:  # a view compares two snapshots
            assert v.changed_extents_array("s1").tolist() == [(CS + 2 * G, G, FLAG_DATA)]
        img.delete_snapshot("s2")  # chunk 1's source stays held by s1 and the front
        assert img.changed_extents_array("s1").tolist() == both
        img.revert_to_snapshot("s1")
        assert img.changed_extents_array("s1").tolist() == []


def test_completion_zeroes_and_the_end_of_the_image(tmp_path):
    """A partial chunk whose every granule was written is an ordinary chunk (reported
    whole); zeroes written into granules are data (they are in the new chunk), a whole
    chunk zeroed is a zero range; the last chunk's granules stop at the image's end."""
    size = 3 * CS + 5000  # the last chunk has 2 granules, the second one short
    p = str(tmp_path / "img.fvd")
    fvd.create(p, size, chunk_size=CS)
    with fvd.open(p, "r+") as img:
        img.write(0, b"a" * size)
        img.create_snapshot("s1")
        img.write(3 * CS + G + 8, b"z" * 8)  # only the short granule
        assert img.changed_extents_array("s1").tolist() == [(3 * CS + G, 5000 - G, FLAG_DATA)]
        img.write_zeroes(G, 2 * G)  # granules of chunk 0: written (zeros) into the new chunk
        img.write(CS, b"x" * (CS - G))
        img.write(2 * CS - G, b"y" * G)  # chunk 1 now complete: not partial
        img.write_zeroes(2 * CS, CS)  # chunk 2 unmapped
        assert img._core.partial.active == 2
        assert img.changed_extents_array("s1").tolist() == [
            (G, 2 * G, FLAG_DATA),
            (CS, CS, FLAG_DATA),
            (2 * CS, CS, FLAG_ZERO),
            (3 * CS + G, 5000 - G, FLAG_DATA),
        ]


def test_many_partial_chunks_match_the_reference(tmp_path):
    """Thousands of partial chunks (the vectorised path), random granules, with chunks
    rewritten whole, zeroed and new among them: exactly the reference's granules."""
    import random

    rng = random.Random(5)
    n = 4096
    p = str(tmp_path / "img.fvd")
    fvd.create(p, n * CS, chunk_size=CS)
    with fvd.open(p, "r+") as img:
        for v in range(0, n, 2):
            img.write(v * CS, b"a" * CS)
        img.create_snapshot("s1")
        for _ in range(3 * n):
            off = rng.randrange(n * CS - 3 * G)
            img.write(off, b"b" * rng.randint(1, 3 * G))
        for v in rng.sample(range(n), 50):
            img.write_zeroes(v * CS, CS)
        for v in rng.sample(range(n), 50):
            img.write(v * CS, b"c" * CS)
        assert img._core.partial.active > n // 4
        arr = img.changed_extents_array("s1")
        assert_exact(arr, img, "s1", None)
        assert len(arr) > n // 4


def test_cli_map_since_reports_granules(path, capsys):
    with fvd.open(path, "r+") as img:
        img.write(0, b"a" * SIZE)
        img.create_snapshot("s1")
        img.write(CS + G, b"x" * 10)
    assert cli.main(["map", "--since", "s1", "--output=json", path]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == [
        {"start": CS + G, "length": G, "depth": 0, "present": True, "zero": False, "data": True}
    ]


@pytest.mark.parametrize(
    "chunk_size,granule", [(CS, CS), (CS, 16384), (CS, 4096), (1 << 20, 4096), (256 << 10, 512)]
)
def test_granule_refinement_matches_a_per_granule_reference(chunk_size, granule):
    """fvd.ops.changed.compare on random tables and partial chunks (sources equal to the
    older entry or not, entries equal to it, zero entries, rows of any width, an image
    end inside a granule) against keys computed granule by granule."""

    rng = np.random.default_rng(chunk_size + granule)
    gpc = chunk_size // granule
    gbytes = -(-gpc // 8)
    for _ in range(20):
        n = int(rng.integers(1, 200))
        size = n * chunk_size - int(rng.integers(0, chunk_size))
        older = rng.choice(np.array([5, 6, 7, 8, fmt.ZERO_CHUNK, fmt.UNALLOCATED], np.uint32), n)
        newer = older.copy()
        change = rng.random(n) < 0.5
        newer[change] = rng.choice(np.array([5, 9, 10, fmt.ZERO_CHUNK], np.uint32), n)[change]
        vs = np.flatnonzero(rng.random(n) < 0.6)
        same = (rng.random(len(vs)) < 0.7) & (older[vs] < fmt.ZERO_CHUNK)
        sources = np.where(same, older[vs], rng.integers(5, 12, len(vs))).astype(np.uint32)
        rows = rng.integers(0, 256, (len(vs), gbytes), dtype=np.uint8)
        sparse = rng.random(len(vs)) < 0.5
        rows[sparse] &= rng.integers(0, 256, (int(sparse.sum()), gbytes), dtype=np.uint8)
        geo = Geometry(size, chunk_size, 4096, 0)
        a = State(older, None, 1)
        b = State(newer, None, None, Partial(vs, sources, rows, granule))
        arr = compare(geo, a, b)
        # the reference, granule by granule
        bits = np.unpackbits(rows, axis=1, bitorder="little")[:, :gpc].astype(bool)
        keys_a = older.astype(np.int64)
        keys_a[older >= fmt.ZERO_CHUNK] = -1
        keys_b = newer.astype(np.int64)
        keys_b[newer >= fmt.ZERO_CHUNK] = -1
        keys_a, keys_b = np.repeat(keys_a, gpc), np.repeat(keys_b, gpc)
        for i, v in enumerate(vs.tolist()):
            if newer[v] < fmt.ZERO_CHUNK:
                keys_b[v * gpc : (v + 1) * gpc][~bits[i]] = int(sources[i])
        ngran = -(-size // granule)
        want = (keys_a != keys_b)[:ngran]
        want_zero = want & (keys_b[:ngran] == -1)
        got = np.zeros(ngran, dtype=bool)
        got_zero = np.zeros(ngran, dtype=bool)
        for s, length, f in arr.tolist():
            assert s % granule == 0 and ((s + length) % granule == 0 or s + length == size)
            got[s // granule : -(-(s + length) // granule)] = True
            got_zero[s // granule : -(-(s + length) // granule)] = bool(f & FLAG_ZERO)
        assert np.array_equal(got, want)
        assert np.array_equal(got_zero, want_zero)
        ends = arr["start"] + arr["length"]
        assert (arr["start"][1:] >= ends[:-1]).all() and (arr["length"] > 0).all()
