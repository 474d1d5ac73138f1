"""The compiled ChunkMap and its pure-Python twin, driven by the same random operations
(tables, frozen chunks, partial-chunk slots, a base with its bitmaps, reads, writes, host
I/O, translation), give the same results, the same exceptions, the same counters and
leave the same bytes in their image files."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fvd import _purepath, _shared

_fastpath = pytest.importorskip("fvd._fastpath")

CS = 4096  # chunk size
GRANULE = 512
BLOCK = 512  # base bitmap block size
NV = 8  # virtual chunks
NPHYS = 6  # physical chunks in the file
NSLOTS = 3  # partial-chunk slots
DATA_OFFSET = 4096
SIZE = NV * CS - 1000  # a short last chunk
UNALLOCATED = 0xFFFFFFFF

entry = st.one_of(st.integers(0, NPHYS - 1), st.sampled_from([_shared.ZERO_CHUNK, UNALLOCATED]))
offset = st.integers(-10, SIZE + 10)
length = st.integers(0, 3 * CS)


def bits(n):
    return st.binary(min_size=n, max_size=n).map(lambda b: np.frombuffer(b, np.uint8).copy())


ops = st.one_of(
    st.tuples(st.just("readinto"), offset, length),
    st.tuples(st.just("write"), offset, length, st.integers(0, 255)),
    st.tuples(st.just("writable"), offset, length),
    st.tuples(st.just("host_offset"), offset),
    st.tuples(st.just("translate"), st.lists(st.integers(-1, NV), max_size=NV), st.booleans()),
    st.tuples(
        st.just("pwritev"),
        st.integers(DATA_OFFSET, DATA_OFFSET + NPHYS * CS),
        st.lists(st.integers(0, 700), max_size=70),
    ),
    st.tuples(st.just("pread_host"), st.integers(0, DATA_OFFSET + (NPHYS + 1) * CS), length),
    st.tuples(st.just("set_table"), st.lists(entry, min_size=NV, max_size=NV)),
    st.tuples(st.just("set_frozen"), bits(NPHYS).map(lambda a: a & 1)),
    st.tuples(
        st.just("set_partial"),
        st.lists(st.one_of(st.integers(0, NSLOTS - 1), st.just(_shared.NO_SLOT)), min_size=NV).map(
            lambda x: x[:NV]
        ),
        st.lists(st.integers(0, NPHYS - 1), min_size=NSLOTS, max_size=NSLOTS),
        bits(NSLOTS),
    ),
    st.tuples(st.just("set_base"), st.integers(0, SIZE), bits(NV * CS // BLOCK // 8), bits(8)),
    st.tuples(st.just("no_base")),
)


class Side:
    """One implementation's ChunkMap over its own copy of the image file."""

    def __init__(self, mod, path, image, base_fd):
        with open(path, "wb") as f:
            f.write(image)
        self.fd = os.open(path, os.O_RDWR)
        self.base_fd = base_fd
        self.mod = mod
        self.stats = mod.Stats()
        self.arrays = []  # the map views the arrays: keep them alive
        table = self.keep(np.full(NV, UNALLOCATED, np.uint32))
        frozen = self.keep(np.zeros(NPHYS, np.uint8))
        self.map = mod.ChunkMap(self.fd, table, frozen, CS, DATA_OFFSET, SIZE, self.stats)

    def keep(self, a):
        self.arrays.append(a)
        return a

    def apply(self, op):
        kind, args = op[0], op[1:]
        m = self.map
        if kind == "readinto":
            buf = bytearray(max(args[1], 0))
            return m.readinto(args[0], buf), bytes(buf)
        if kind == "write":
            return m.write(args[0], bytes([args[2]]) * args[1])
        if kind == "writable":
            return m.writable(*args)
        if kind == "host_offset":
            return m.host_offset(*args)
        if kind == "translate":
            v = np.array(args[0], np.int64)
            out = np.zeros(max(len(v) - args[1], 0), np.int64)  # sometimes one short
            return m.translate(v, out), out.tolist()
        if kind == "pwritev":
            return m.pwritev(args[0], [bytes([i & 0xFF]) * n for i, n in enumerate(args[1])])
        if kind == "pread_host":
            buf = bytearray(args[1])
            return m.pread_host(args[0], buf), bytes(buf)
        if kind == "set_table":
            return m.set_table(self.keep(np.array(args[0], np.uint32)))
        if kind == "set_frozen":
            return m.set_frozen(self.keep(args[0].copy()))
        if kind == "set_partial":
            slot, src, row = (self.keep(np.array(a, t)) for a, t in zip(args, "IIB"))
            return m.set_partial(slot, src, row, GRANULE)
        if kind == "set_base":
            bend, fresh, stale = args
            a, b = self.keep(fresh.copy()), self.keep(stale.copy())
            fd = self.base_fd if bend % 2 else -1  # both: the base read here, and not
            return m.set_base(a, b, BLOCK, bend, fd)
        return m.set_base(None, None, 0, 0)

    def outcome(self, op):
        try:
            out = self.apply(op)
        except (OSError, ValueError, IndexError, TypeError) as e:
            return ("raised", type(e).__name__, str(e))
        return ("ok", out)

    def image(self):
        size = os.fstat(self.fd).st_size
        return os.pread(self.fd, size, 0)


EXAMPLES = int(os.environ.get("FVD_TWIN_EXAMPLES", "60"))  # a soak: FVD_TWIN_EXAMPLES=2000


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=25), st.binary(min_size=64, max_size=64))
def test_same_operations_same_outcomes(tmp_path_factory, operations, seed):
    d = tmp_path_factory.mktemp("twin")
    image = (seed * ((DATA_OFFSET + NPHYS * CS) // 64 + 1))[: DATA_OFFSET + NPHYS * CS]
    base = str(d / "base")
    with open(base, "wb") as f:
        f.write(seed[::-1] * (NV * CS // 64))
    base_fd = os.open(base, os.O_RDONLY)
    sides = [
        Side(_fastpath, str(d / "c.img"), image, base_fd),
        Side(_purepath, str(d / "p.img"), image, base_fd),
    ]
    try:
        for i, op in enumerate(operations):
            got = [s.outcome(op) for s in sides]
            assert got[0] == got[1], f"op {i} {op[0]}: compiled {got[0]!r} pure {got[1]!r}"
            assert sides[0].stats.as_dict() == sides[1].stats.as_dict(), f"op {i} {op[0]}"
        assert sides[0].image() == sides[1].image()
    finally:
        for s in sides:
            os.close(s.fd)
        os.close(base_fd)
