"""The shared data I/O primitive (`HostFile`) and the QCOW2 baseline's one-cluster read
path through it. Both implementations via the autouse `impl` fixture."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fvd import _impl, qcow2
from fvd.units import KiB, MiB


def pattern(n, seed):
    return (np.arange(n, dtype=np.uint32) * 2654435761 + seed * 97).astype(np.uint8).tobytes()


@pytest.fixture
def hostfile(tmp_path):
    mod = _impl.module()
    fd = os.open(tmp_path / "host", os.O_RDWR | os.O_CREAT, 0o644)
    yield mod.HostFile(fd, mod.Stats()), fd
    os.close(fd)


def test_hostfile_readinto_and_pwritev(hostfile):
    hf, fd = hostfile
    assert hf.pwritev(10, [b"ab", b"", memoryview(b"xcde")[1:], bytearray(b"fg")]) == 7
    assert os.pread(fd, 100, 0) == bytes(10) + b"abcdefg"
    buf = bytearray(12)
    assert hf.readinto(8, buf) == 12  # past the end: zeros
    assert bytes(buf) == b"\0\0abcdefg\0\0\0"
    arr = np.zeros(2, dtype=np.uint32)  # any writable contiguous buffer
    assert hf.readinto(10, arr) == 8 and arr.tobytes() == b"abcdefg\0"
    s = hf.stats
    assert (s.data_reads, s.data_bytes_read, s.data_writes, s.data_bytes_written) == (2, 20, 1, 7)
    with pytest.raises((TypeError, BufferError)):
        hf.readinto(0, b"immutable")


def test_hostfile_readinto_limit(hostfile):
    hf, fd = hostfile
    os.pwrite(fd, b"0123456789", 0)
    buf = bytearray(4)
    assert hf.readinto(2, buf, 3) == -1 and buf == bytes(4)  # too long: untouched
    assert hf.readinto(2, bytearray(0), 3) == -1  # empty: not a read
    assert hf.readinto(2, buf, 4) == 4 and buf == b"2345"
    assert hf.stats.data_reads == 1


@pytest.mark.parametrize("count", [65, 3000])
def test_hostfile_pwritev_many_buffers_is_one_write(hostfile, count):
    hf, fd = hostfile
    data = pattern(count, 3)
    mv = memoryview(data)
    pieces = [mv[i : i + 1] for i in range(count)]  # adjacent in memory
    scattered = [bytes(mv[i : i + 1]) for i in range(count)]  # not adjacent
    assert hf.pwritev(0, pieces) == count
    assert hf.pwritev(count, scattered) == count
    assert os.pread(fd, 2 * count, 0) == data + data
    assert hf.stats.data_writes == 2 and hf.stats.data_bytes_written == 2 * count


def test_chunkmap_pwritev_limit_unchanged(impl):
    mod = _impl.module()
    cmap = mod.ChunkMap(
        -1, np.zeros(1, dtype=np.uint32), np.zeros(0, dtype=np.uint8), MiB, 0, MiB, mod.Stats()
    )
    with pytest.raises(ValueError):
        cmap.pwritev(0, [b"x"] * 65)


# ------------------------------------------------------------- qcow2 read path
def test_qcow2_one_cluster_read_is_one_data_read(tmp_path, impl):
    p = str(tmp_path / "a.qcow2")
    qcow2.create(p, 4 * MiB)
    data = pattern(3 * 65536, 1)
    with qcow2.open(p, "r+") as img:
        img.write(65536, data)
    with qcow2.open(p) as img:
        before = img.stats.as_dict()
        buf = bytearray(4096)
        assert img.readinto(65536 + 8192, buf) == 4096 and buf == data[8192:12288]
        after = img.stats.as_dict()
        assert after["data_reads"] - before["data_reads"] == 1
        assert after["data_bytes_read"] - before["data_bytes_read"] == 4096
        assert img.read(3 * MiB, 4096) == bytes(4096)  # unallocated: no I/O
        assert img.stats.data_reads == after["data_reads"]
        with pytest.raises(TypeError):
            img.readinto(65536, b"immutable")  # allocated, read-only
        with pytest.raises(ValueError):
            img.readinto(4 * MiB - 10, bytearray(11))
    with pytest.raises(ValueError):
        img.readinto(65536, bytearray(10))  # closed


def test_qcow2_read_past_unaligned_size(tmp_path, impl):
    """The last cluster runs past the image size: a read may not follow it there."""
    p = str(tmp_path / "b.qcow2")
    size = MiB + 512
    qcow2.create(p, size)
    with qcow2.open(p, "r+") as img:
        img.write(MiB, pattern(512, 2))
        assert img.read(MiB, 512) == pattern(512, 2)
        for off, n in ((MiB, 513), (size, 1), (size + 512, 512)):
            with pytest.raises(ValueError):
                img.readinto(off, bytearray(n))
        assert img.readinto(size, bytearray(0)) == 0


READ_OPS = st.lists(
    st.tuples(
        st.sampled_from(["w", "w", "z", "snap", "del", "reopen"]),
        st.integers(0, 255 * KiB),
        st.integers(1, 20 * KiB),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=READ_OPS,
    cluster_size=st.sampled_from([512, 4096, 65536]),
    probes=st.lists(st.integers(0, 256 * KiB - 1), min_size=8, max_size=8),
)
def test_qcow2_small_reads_follow_every_change(tmp_path, impl, ops, cluster_size, probes):
    """Reads inside one cluster (the fast path) after writes, zero writes, snapshot
    create / delete (COW) and reopen agree with a bytearray model."""
    size = 256 * KiB
    p = str(tmp_path / f"r{cluster_size}.qcow2")
    qcow2.create(p, size, cluster_size=cluster_size, overwrite=True)
    model, snaps, probes, made = bytearray(size), [], list(probes), 0
    img = qcow2.open(p, "r+")

    def probe():
        for q in probes:
            n = min(cluster_size - q % cluster_size, 700)
            assert img.read(q, n) == model[q : q + n]
            buf = bytearray(n)
            assert img.readinto(q, buf) == n and buf == model[q : q + n]

    try:
        probe()
        for kind, off, n, seed in ops:
            n = min(n, size - off)
            if kind == "w":
                img.write(off, pattern(n, seed))
                model[off : off + n] = pattern(n, seed)
            elif kind == "z":
                img.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            elif kind == "snap":
                made += 1
                snaps.append(f"s{made}")
                img.create_snapshot(snaps[-1])
            elif kind == "del" and snaps:
                img.delete_snapshot(snaps.pop(seed % len(snaps)))
            elif kind == "reopen":
                img.close()
                img = qcow2.open(p, "r+")
            probes += [off, off + n - 1]  # where mappings changed: re-read them later
            probe()
        assert img.read(0, size) == bytes(model)
        assert img.check().ok
    finally:
        img.close()


@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_qcow2_read_after_cow_of_a_read_cluster(tmp_path, impl, cluster_size):
    """A cluster read (its mapping looked up), then copied on write: the next read
    follows the new mapping; write_zeroes and overwrites likewise."""
    p = str(tmp_path / "c.qcow2")
    qcow2.create(p, 8 * cluster_size, cluster_size=cluster_size)
    cs = cluster_size
    with qcow2.open(p, "r+") as img:
        img.write(0, pattern(4 * cs, 1))
        img.create_snapshot("s")
        img.write(0, b"new0")  # L2 table copied on write
        assert img.read(cs, 4) == pattern(4 * cs, 1)[cs : cs + 4]
        img.write(cs, b"new1")  # data cluster copied on write
        assert img.read(cs, 4) == b"new1"
        assert img.read(cs + 4, 4) == pattern(4 * cs, 1)[cs + 4 : cs + 8]
        img.write_zeroes(2 * cs, cs)
        assert img.read(2 * cs + 100, 8) == bytes(8)
        img.write(2 * cs + 100, b"again")
        assert img.read(2 * cs + 100, 5) == b"again"
        img.delete_snapshot("s")
        img.write(3 * cs, b"own3")
        assert img.read(3 * cs, 4) == b"own3"
        assert img.check().ok
