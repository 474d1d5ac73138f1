"""fvd.qcow2, the QCOW2 refcount-on-write baseline: data round trips against a model,
refcounts, snapshots, exact I/O counts, corrupt and unsupported input.

Every test runs against both implementations through the `impl` fixture (tests/conftest.py
provides it; a local stand-in is defined below only when it does not).
"""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fvd import _impl, qcow2
from fvd.errors import CorruptImageError, UnsupportedFeatureError
from fvd.types import Extent
from fvd.units import KiB, MiB


def delta(img, before):
    """Stats changes since `before` (a dict from stats.as_dict())."""
    now = img.stats.as_dict()
    return {k: now[k] - before[k] for k in now}


def pattern(n, seed):
    return (np.arange(n, dtype=np.uint32) * 2654435761 + seed * 97).astype(np.uint8).tobytes()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "img.qcow2")


# --------------------------------------------------------------------- basics
def test_create_open_roundtrip(path, impl):
    qcow2.create(path, 8 * MiB)
    with qcow2.open(path, "r+") as img:
        assert img.size == 8 * MiB and img.cluster_size == 65536 and not img.read_only
        assert img.read(0, 4096) == bytes(4096)
        assert img.write(12345, b"hello world") == 11
    with qcow2.open(path) as img:
        assert img.read_only
        assert img.read(12340, 20) == bytes(5) + b"hello world" + bytes(4)
        assert img.check().ok
        assert type(img.stats).__module__.endswith(_impl.module().__name__.split(".")[-1])


def test_create_refuses_existing_file(path, impl):
    qcow2.create(path, MiB)
    with pytest.raises(FileExistsError):
        qcow2.create(path, MiB)
    qcow2.create(path, 2 * MiB, overwrite=True)
    with qcow2.open(path) as img:
        assert img.size == 2 * MiB


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(size=-1),
        dict(size=1000),
        dict(size=MiB, cluster_size=256),
        dict(size=MiB, cluster_size=3 * 4096),
        dict(size=MiB, cluster_size=4 * MiB),
    ],
)
def test_create_bad_arguments(path, impl, kwargs):
    with pytest.raises(ValueError):
        qcow2.create(path, **kwargs)


def test_bad_io_arguments(path, impl):
    qcow2.create(path, MiB)
    with qcow2.open(path, "r+") as img:
        with pytest.raises(ValueError):
            img.read(MiB - 10, 11)
        with pytest.raises(ValueError):
            img.write(-1, b"x")
        with pytest.raises(ValueError):
            img.write_zeroes(MiB, 1)
    with qcow2.open(path) as img:
        with pytest.raises(OSError):
            img.write(0, b"x")
        with pytest.raises(OSError):
            img.write_zeroes(0, 512)
        with pytest.raises(OSError):
            img.create_snapshot("s")
    img.close()  # idempotent
    with pytest.raises(ValueError):
        img.read(0, 1)
    with pytest.raises(ValueError):
        qcow2.open(path, "w")
    with pytest.raises(ValueError):
        qcow2.open(path, cache="none")


def test_readinto_any_buffer(path, impl):
    qcow2.create(path, MiB, cluster_size=4096)
    data = pattern(20000, 1)
    with qcow2.open(path, "r+") as img:
        img.write(3000, data)
        arr = np.zeros(5000, dtype=np.uint32)  # 20000 bytes, not a byte format
        assert img.readinto(3000, arr) == 20000
        assert arr.tobytes() == data
        ba = bytearray(100)
        img.readinto(3000 + 500, memoryview(ba)[10:60])
        assert ba[10:60] == data[500:550] and ba[:10] == bytes(10)
        with pytest.raises(TypeError):
            img.readinto(0, b"immutable")


# ------------------------------------------------------------ model round trip
OPS = st.lists(
    st.tuples(
        st.sampled_from(["w", "w", "w", "z", "snap", "del", "reopen"]),
        st.integers(0, 255 * KiB),
        st.integers(1, 40 * KiB),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=OPS,
    cluster_size=st.sampled_from([512, 4096]),
    cache=st.sampled_from(["writeback", "writethrough"]),
    lazy=st.booleans(),
)
def test_random_ops_match_model(tmp_path, impl, ops, cluster_size, cache, lazy):
    """Arbitrary-alignment writes, zero writes, snapshots and reopen against a bytearray;
    512 B / 4 KiB clusters cross L2 tables (32 KiB / 2 MiB) and refcount blocks often."""
    size = 256 * KiB
    p = str(tmp_path / f"m{cluster_size}.qcow2")
    qcow2.create(p, size, cluster_size=cluster_size, lazy_refcounts=lazy, overwrite=True)
    model, snaps = bytearray(size), {}
    img = qcow2.open(p, "r+", cache=cache)
    try:
        for kind, off, n, seed in ops:
            n = min(n, size - off)
            if kind == "w":
                data = pattern(n, seed)
                img.write(off, data)
                model[off : off + n] = data
            elif kind == "z":
                img.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            elif kind == "snap":
                name = f"s{len(snaps)}-{seed}"
                if name not in snaps:
                    img.create_snapshot(name, vm_state=pattern(seed * 37, seed))
                    snaps[name] = (bytes(model), pattern(seed * 37, seed))
            elif kind == "del" and snaps:
                name = sorted(snaps)[seed % len(snaps)]
                img.delete_snapshot(name)
                del snaps[name]
            elif kind == "reopen":
                img.close()
                img = qcow2.open(p, "r+", cache=cache)
        assert img.read(0, size) == bytes(model)
        assert {s.name for s in img.snapshots()} == set(snaps)
        for name, (_, vm) in snaps.items():
            assert img.read_vm_state(name) == vm
        result = img.check()
        assert result.ok, result
    finally:
        img.close()
    with qcow2.open(p) as img:
        assert img.read(0, size) == bytes(model)
        assert img.check().ok
        assert not img.dirty


def test_write_across_l2_and_refblock_boundaries(path, impl):
    # 512 B clusters: an L2 table maps 32 KiB, a refcount block covers 128 KiB of file
    qcow2.create(path, 4 * MiB, cluster_size=512)
    data = pattern(300 * KiB + 77, 5)
    with qcow2.open(path, "r+") as img:
        img.write(32 * KiB - 1000, data)
        assert img.read(32 * KiB - 1000, len(data)) == data
        assert img.stats.data_writes >= 10  # one pwrite per L2 span at most
        assert img.check().ok
    with qcow2.open(path) as img:
        assert img.read(32 * KiB - 1000, len(data)) == data
        assert img.read(0, 32 * KiB - 1000) == bytes(32 * KiB - 1000)


def test_refcount_table_grows(path, impl):
    # one refcount-table cluster at 512 B clusters covers 64 blocks x 256 clusters = 8 MiB
    qcow2.create(path, 1 * MiB, cluster_size=512)
    vm = pattern(9 * MiB, 3)
    with qcow2.open(path, "r+") as img:
        old = img._rt_offset
        img.write(0, b"x" * 1000)
        img.create_snapshot("big", vm_state=vm)
        assert img._rt_offset != old and img._rt_clusters > 1
        img.write(5000, b"y" * 3000)
        assert img.check().ok
    with qcow2.open(path, "r+") as img:
        assert img.read_vm_state("big") == vm
        assert img.read(0, 1000) == b"x" * 1000
        img.delete_snapshot("big")
        assert img.check().ok
        assert img.read(5000, 3000) == b"y" * 3000


# ------------------------------------------------------------------ zeroes
def test_write_zeroes_uses_zero_flag(path, impl):
    qcow2.create(path, MiB, cluster_size=4096)
    with qcow2.open(path, "r+") as img:
        img.write(0, b"\xff" * 64 * KiB)
        img.write_zeroes(4096 + 100, 3 * 4096)  # partial, 2 whole clusters, partial
        expect = bytearray(b"\xff" * 64 * KiB)
        expect[4096 + 100 : 4 * 4096 + 100] = bytes(3 * 4096)
        assert img.read(0, 64 * KiB) == bytes(expect)
        ext = [e for e in img.extents(0, 64 * KiB)]
        zero = [e for e in ext if e.zero and e.present]
        assert zero == [Extent(8192, 8192, 0, True, True, False, None)]
        assert img.check().ok  # the two clusters were freed
        # zeroing what is unallocated costs nothing
        before = img.stats.as_dict()
        img.write_zeroes(512 * KiB, 64 * KiB)
        img.flush()
        d = delta(img, before)
        assert d["data_writes"] == d["metadata_writes"] == d["flushes"] == 0


def test_extents_merge_and_cover(path, impl):
    qcow2.create(path, MiB, cluster_size=4096)
    with qcow2.open(path, "r+") as img:
        img.write(0, bytes(3 * 4096))  # three contiguous host clusters
        img.write(10 * 4096, b"x")
        ext = list(img.extents())
        assert sum(e.length for e in ext) == MiB
        assert ext[0].start == 0 and ext[0].length == 3 * 4096 and ext[0].data
        assert ext[1] == Extent(3 * 4096, 7 * 4096, 0, False, True, False, None)
        assert ext[2].data and ext[2].length == 4096
        for a, b in zip(ext, ext[1:]):
            assert a.start + a.length == b.start
        assert list(img.extents(100, 50)) == [
            dataclasses.replace(ext[0], start=100, length=50, offset=ext[0].offset + 100)
        ]


# -------------------------------------------------------------- exact costs
def _prepared(path, cache, lazy=False):
    """An image whose first L2 table exists; returns it open and a stats baseline."""
    qcow2.create(path, 64 * MiB, lazy_refcounts=lazy)
    with qcow2.open(path, "r+") as img:
        img.write(0, b"x" * 4096)
    img = qcow2.open(path, "r+", cache=cache)
    return img, img.stats.as_dict()


def test_cost_writethrough_allocating_write(path, impl):
    img, before = _prepared(path, "writethrough")
    with img:
        img.write(5 * 65536 + 4096, b"a" * 4096)
        d = delta(img, before)
        assert (d["data_writes"], d["metadata_writes"], d["flushes"]) == (1, 2, 2)
        assert d["data_bytes_written"] == 4096
        assert d["metadata_bytes_written"] == 2 * 65536  # refcount block + L2 table
        assert d["refcount_updates"] == 1


def test_cost_writeback_allocating_write_and_flush(path, impl):
    img, before = _prepared(path, "writeback")
    with img:
        for i in range(1, 11):
            img.write(i * 65536, b"a" * 4096)
        d = delta(img, before)
        assert (d["data_writes"], d["metadata_writes"], d["flushes"]) == (10, 0, 0)
        before = img.stats.as_dict()
        img.flush()
        d = delta(img, before)
        # dirty refcount block, flush, dirty L2 table, flush
        assert (d["data_writes"], d["metadata_writes"], d["flushes"]) == (0, 2, 2)
        before = img.stats.as_dict()
        img.flush()
        assert delta(img, before)["flushes"] == 0


@pytest.mark.parametrize("cache,flushes", [("writeback", 0), ("writethrough", 1)])
def test_cost_overwrite_of_owned_cluster(path, impl, cache, flushes):
    img, before = _prepared(path, cache)
    with img:
        img.write(100, b"b" * 1000)  # COPIED cluster: in place
        d = delta(img, before)
        assert (d["data_writes"], d["metadata_writes"], d["flushes"]) == (1, 0, flushes)
        assert d["refcount_updates"] == 0


def test_cost_new_l2_table_writethrough(path, impl):
    qcow2.create(path, 2 << 30)
    with qcow2.open(path, "r+", cache="writethrough") as img:
        before = img.stats.as_dict()
        img.write(1 << 30, b"c" * 4096)  # its L2 table (512 MiB each) is new
        d = delta(img, before)
    # l2_allocate: refblock+flush, L2+flush, L1 entry (8 B)+flush; then data, refblock+flush,
    # L2+flush
    assert (d["data_writes"], d["metadata_writes"], d["flushes"]) == (1, 5, 5)
    assert d["metadata_bytes_written"] == 4 * 65536 + 8
    assert d["refcount_updates"] == 2


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * MiB])
def test_cost_scales_with_cluster_size(path, impl, cluster_size):
    """Metadata is written in whole clusters: 2 MiB clusters write 4 MiB per allocation."""
    qcow2.create(path, 8 * MiB, cluster_size=cluster_size)
    with qcow2.open(path, "r+") as img:
        img.write(0, b"x")
    with qcow2.open(path, "r+", cache="writethrough") as img:
        before = img.stats.as_dict()
        img.write(2 * cluster_size, b"a" * 512)
        d = delta(img, before)
    assert (d["data_writes"], d["metadata_writes"], d["flushes"]) == (1, 2, 2)
    assert d["metadata_bytes_written"] == 2 * cluster_size


def test_cost_lazy_refcounts(path, impl):
    qcow2.create(path, 64 * MiB, lazy_refcounts=True)
    with qcow2.open(path, "r+") as img:
        img.write(0, b"x" * 4096)
    img = qcow2.open(path, "r+", cache="writethrough")
    assert img.dirty and img.stats.metadata_writes == 1 and img.stats.flushes == 1
    before = img.stats.as_dict()
    img.write(7 * 65536, b"a" * 4096)
    d = delta(img, before)
    assert (d["data_writes"], d["metadata_writes"], d["flushes"]) == (1, 1, 1)
    assert d["metadata_bytes_written"] == 65536  # the L2 table only
    before = img.stats.as_dict()
    img.close()  # refcount block, then the dirty bit
    d = delta(img, before)
    assert (d["metadata_writes"], d["flushes"]) == (2, 2)
    with qcow2.open(path) as img:
        assert not img.dirty and img.check().ok


def test_cost_first_write_after_snapshot(path, impl):
    qcow2.create(path, 16 * MiB)
    with qcow2.open(path, "r+") as img:
        img.write(0, b"a" * 3 * 65536)
        img.create_snapshot("s")
        before = img.stats.as_dict()
        img.write(4096, b"b" * 4096)
        d = delta(img, before)
        # L2 COW: refblock+flush, new L2+flush, L1 entry+flush; data COW: read 64 KiB,
        # one pwritev of head + data + tail
        assert (d["data_reads"], d["data_bytes_read"]) == (1, 65536)
        assert (d["data_writes"], d["data_bytes_written"]) == (1, 65536)
        assert (d["metadata_writes"], d["flushes"]) == (3, 3)
        before = img.stats.as_dict()
        img.flush()
        d = delta(img, before)
        # refblock (+1 new cluster) + flush, L2 + flush, refblock (-1 old cluster) + flush
        assert (d["metadata_writes"], d["flushes"]) == (3, 3)
        assert img.read(0, 3 * 65536) == b"a" * 4096 + b"b" * 4096 + b"a" * (3 * 65536 - 8192)
        assert img.check().ok


# --------------------------------------------------------------- snapshots
def test_snapshots_create_read_delete(path, impl):
    qcow2.create(path, 4 * MiB, cluster_size=4096)
    with qcow2.open(path, "r+") as img:
        img.write(0, b"1" * 100 * KiB)
        info = img.create_snapshot("first", vm_state=b"VM" * 5000)
        assert (info.name, info.id, info.size, info.vm_state_size) == ("first", "1", 4 * MiB, 10000)
        img.write(50 * KiB, b"2" * 100 * KiB)
        img.create_snapshot("second")
        with pytest.raises(ValueError):
            img.create_snapshot("second")
        with pytest.raises(ValueError):
            img.delete_snapshot("nope")
        assert img.check().ok
    with qcow2.open(path, "r+") as img:
        names = [(s.name, s.id, s.vm_state_size) for s in img.snapshots()]
        assert names == [("first", "1", 10000), ("second", "2", 0)]
        assert img.snapshots()[0].created.year >= 2024
        assert img.read_vm_state("first") == b"VM" * 5000
        assert img.read(0, 150 * KiB) == b"1" * 50 * KiB + b"2" * 100 * KiB
        img.delete_snapshot("first")
        assert img.check().ok
        img.write(0, b"3" * 4096)
        img.delete_snapshot("2")  # by id
        assert img.snapshots() == []
        assert img.check().ok
        assert img.read(0, 8192) == b"3" * 4096 + b"1" * 4096


def test_snapshot_shares_then_frees(path, impl):
    qcow2.create(path, 4 * MiB, cluster_size=4096)
    with qcow2.open(path, "r+") as img:
        img.write(0, b"a" * 40960)
        used = img._end_cluster()
        img.create_snapshot("s")
        assert img._refcount((int(img._l1[0]) & 0x00FFFFFFFFFFFE00) >> 12) == 2
        assert img._refcount(next(img.extents()).offset >> 12) == 2
        img.write(0, b"b" * 40960)  # every shared cluster copied
        img.delete_snapshot("s")  # the old ones are freed again
        assert img.check().ok
        img.write(100 * KiB, b"c" * 40960)  # and reused first-fit
        assert img._end_cluster() <= used + 30


# -------------------------------------------------------------- crash / lazy
def test_lazy_refcounts_crash_and_repair(path, impl):
    qcow2.create(path, 8 * MiB, cluster_size=4096, lazy_refcounts=True)
    img = qcow2.open(path, "r+", cache="writethrough")
    img.write(0, b"p" * 10000)
    img.write(3 * MiB, b"q" * 5000)
    img._abandon()  # no clean shutdown: refcounts stale
    with qcow2.open(path) as ro:
        assert ro.dirty
        assert not ro.check().ok
    with qcow2.open(path, "r+") as img:  # rebuilds, as QEMU does
        assert img.check().ok
        assert img.read(0, 10000) == b"p" * 10000
        assert img.read(3 * MiB, 5000) == b"q" * 5000
    with qcow2.open(path) as img:
        assert not img.dirty and img.check().ok


def test_check_finds_and_repairs_leak(path, impl):
    qcow2.create(path, MiB, cluster_size=4096)
    with qcow2.open(path, "r+") as img:
        img.write(0, b"z" * 8192)
        img._alloc_cluster()  # referenced by nothing: a leak
        r = img.check()
        assert (r.corruptions, r.leaks, r.ok) == (0, 1, False)
        r = img.check(repair=True)
        assert r.ok and r.leaks_fixed == 1
    with qcow2.open(path) as img:
        assert img.check().ok


def test_check_finds_missing_refcount(path, impl):
    qcow2.create(path, MiB, cluster_size=4096)
    with qcow2.open(path, "r+") as img:
        img.write(0, b"z" * 4096)
        host = next(img.extents()).offset
    with open(path, "r+b") as f:  # refcount block is cluster 2
        f.seek(2 * 4096 + 2 * (host // 4096))
        f.write(b"\x00\x00")
    with qcow2.open(path) as img:
        r = img.check()
        assert r.corruptions >= 1 and not r.ok
    with qcow2.open(path, "r+") as img:
        assert img.check(repair=True).ok


# --------------------------------------------------------------- bad input
def _image_with_data(path):
    qcow2.create(path, 4 * MiB, cluster_size=4096)
    with qcow2.open(path, "r+") as img:
        img.write(0, b"d" * 20000)
        return img._l1_offset


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_magic(path, impl):
    _image_with_data(path)
    _patch(path, 0, b"QFI\x00")
    with pytest.raises(CorruptImageError, match="magic"):
        qcow2.open(path)


def test_not_an_image(path, impl):
    Path(path).write_bytes(b"")
    with pytest.raises(CorruptImageError):
        qcow2.open(path)
    Path(path).write_bytes(b"x" * 70000)
    with pytest.raises(CorruptImageError):
        qcow2.open(path)


@pytest.mark.parametrize("keep", [50, 100, 4096 + 10, 3 * 4096 + 8, 5 * 4096])
def test_truncated(path, impl, keep):
    _image_with_data(path)
    os.truncate(path, keep)
    with pytest.raises(CorruptImageError) as e:
        with qcow2.open(path) as img:
            img.read(0, 20000)
    assert path in str(e.value)


@pytest.mark.parametrize("bit", [62, 56, 40, 3, 10])
def test_flipped_l1_entry(path, impl, bit):
    l1_off = _image_with_data(path)
    raw = bytearray(Path(path).read_bytes())
    e = int.from_bytes(raw[l1_off : l1_off + 8], "big") ^ (1 << bit)
    raw[l1_off : l1_off + 8] = e.to_bytes(8, "big")
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(CorruptImageError) as exc:
        qcow2.open(path)
    assert exc.value.offset == l1_off


def test_bad_l2_entry(path, impl):
    l1_off = _image_with_data(path)
    raw = Path(path).read_bytes()
    l2_off = int.from_bytes(raw[l1_off : l1_off + 8], "big") & 0x00FFFFFFFFFFFE00
    e = int.from_bytes(raw[l2_off : l2_off + 8], "big")
    _patch(path, l2_off, (e | 0x100).to_bytes(8, "big"))  # reserved bit
    with qcow2.open(path) as img:
        with pytest.raises(CorruptImageError):
            img.read(0, 10)
    _patch(path, l2_off, (e & ~0x00FFFFFFFFFFFE00 | 1 << 50).to_bytes(8, "big"))
    with qcow2.open(path) as img:
        with pytest.raises(CorruptImageError):
            img.read(0, 10)
    _patch(path, l2_off, (e | 1 << 62).to_bytes(8, "big"))  # compressed
    with qcow2.open(path) as img:
        with pytest.raises(UnsupportedFeatureError):
            img.read(0, 10)


@pytest.mark.parametrize(
    "offset,value,error",
    [
        (4, (4).to_bytes(4, "big"), UnsupportedFeatureError),  # version 4
        (72, (1 << 5).to_bytes(8, "big"), UnsupportedFeatureError),  # unknown incompatible
        (72, (1 << 4).to_bytes(8, "big"), UnsupportedFeatureError),  # extended L2
        (72, (1 << 2).to_bytes(8, "big"), UnsupportedFeatureError),  # external data file
        (32, (1).to_bytes(4, "big"), UnsupportedFeatureError),  # encryption
        (8, (200).to_bytes(8, "big"), CorruptImageError),  # backing name size 0
        (12, (5000).to_bytes(4, "big"), CorruptImageError),  # backing name at 5000
        (96, (3).to_bytes(4, "big"), UnsupportedFeatureError),  # 8-bit refcounts
        (20, (30).to_bytes(4, "big"), CorruptImageError),  # cluster_bits
        (36, (0).to_bytes(4, "big"), CorruptImageError),  # L1 too small
        (56, (0).to_bytes(4, "big"), CorruptImageError),  # no refcount table
        (40, (12345).to_bytes(8, "big"), CorruptImageError),  # unaligned L1
    ],
)
def test_bad_header_fields(path, impl, offset, value, error):
    _image_with_data(path)
    _patch(path, offset, value)
    with pytest.raises(error):
        qcow2.open(path)


def test_corrupt_bit_refuses_writing(path, impl):
    _image_with_data(path)
    _patch(path, 72, (2).to_bytes(8, "big"))
    with qcow2.open(path) as img:
        assert img.read(0, 4) == b"dddd"
    with pytest.raises(CorruptImageError):
        qcow2.open(path, "r+")


def test_version2_image_readable_and_writable(path, impl):
    """A v2 header (72 bytes, no feature words): readable, writable without zero flags."""
    qcow2.create(path, MiB, cluster_size=4096)
    raw = bytearray(Path(path).read_bytes())
    raw[4:8] = (2).to_bytes(4, "big")
    raw[72:112] = bytes(40)
    Path(path).write_bytes(bytes(raw))
    with qcow2.open(path, "r+") as img:
        img.write(0, b"v2" * 4096)
        img.write_zeroes(0, 4096)
        assert img.read(0, 8192) == bytes(4096) + b"v2" * 2048
        assert img.check().ok
