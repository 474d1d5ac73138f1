"""fvd.qcow2.fresh.FreshWriter: a new qcow2 laid out in one pass (what `fvd convert -O
qcow2` writes). Oracles: `qemu-img check` (clean: no leaks, no corruptions) and
`qemu-img compare` with a raw file holding the expected bytes."""

import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from fvd import qcow2
from fvd.qcow2.fresh import FreshWriter
from fvd.units import KiB, MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def qemu_img(*args):
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def check_equal(tmp_path, path, want, fmt="raw"):
    ref = tmp_path / "want.raw"
    ref.write_bytes(bytes(want))
    out = qemu_img("check", "--output=json", path)
    assert '"leaks"' not in out and '"corruptions"' not in out, out
    qemu_img("compare", "-f", "qcow2", "-F", fmt, path, ref)


@pytest.mark.parametrize(
    "cluster_size,size",
    [(65536, 8 * MiB), (4096, 6 * MiB + 512), (512, 12 * MiB)],  # 512: a new refcount table
)
def test_scattered_writes_from_threads(tmp_path, cluster_size, size):
    rng = random.Random(cluster_size)
    want = bytearray(size)
    writes = []
    for _ in range(300):
        n = rng.choice((512, 4096, 5000, 70000))
        off = rng.randrange(0, size - n) // 512 * 512
        data = os.urandom(n)
        writes.append((off, data))
    # non-overlapping pieces (convert never writes a byte twice)
    taken = bytearray(size)
    chosen = []
    for off, data in writes:
        if not any(taken[off : off + len(data)]):
            taken[off : off + len(data)] = b"\1" * len(data)
            want[off : off + len(data)] = data
            chosen.append((off, data))
    path = tmp_path / "new.qcow2"
    w = FreshWriter(path, size, cluster_size=cluster_size, cache="unsafe")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda x: w.write(*x), chosen))
    w.close()
    check_equal(tmp_path, path, want)
    with qcow2.open(path) as img:  # our reader agrees
        assert img.read(0, size) == bytes(want)


def test_overlay_whole_clusters_and_zero_flags(tmp_path):
    size = 4 * MiB
    base = tmp_path / "base.raw"
    base_bytes = os.urandom(size)
    base.write_bytes(base_bytes)
    want = bytearray(base_bytes)
    path = tmp_path / "top.qcow2"
    w = FreshWriter(path, size, backing_file="base.raw", backing_format="raw")
    w.write(MiB, b"\x05" * 128 * KiB)
    want[MiB : MiB + 128 * KiB] = b"\x05" * 128 * KiB
    w.write_zeroes(2 * MiB, 192 * KiB)
    want[2 * MiB : 2 * MiB + 192 * KiB] = bytes(192 * KiB)
    with pytest.raises(ValueError, match="whole clusters"):
        w.write(3 * MiB + 512, b"x" * 512)
    w.close()
    check_equal(tmp_path, path, want)
    assert "base.raw" in qemu_img("info", path)


def test_zeroing_written_data_and_empty_image(tmp_path):
    path = tmp_path / "z.qcow2"
    w = FreshWriter(path, MiB)
    w.write(0, b"\x09" * 8192)
    w.write_zeroes(4096, 4096)
    w.close()
    w.close()  # idempotent
    check_equal(tmp_path, path, b"\x09" * 4096 + bytes(MiB - 4096))
    empty = tmp_path / "e.qcow2"
    FreshWriter(empty, MiB).close()
    check_equal(tmp_path, empty, bytes(MiB))


def test_refcount_table_outgrown(tmp_path):
    """512-byte clusters: create()'s one-cluster refcount table counts 64 blocks of 256
    clusters (8 MiB); 10 MiB of data needs a bigger table, written after the data."""
    size = 10 * MiB
    data = os.urandom(size)
    path = tmp_path / "big.qcow2"
    w = FreshWriter(path, size, cluster_size=512)
    for off in range(0, size, MiB):
        w.write(off, data[off : off + MiB])
    w.close()
    with qcow2.open(path) as img:
        assert img.read(0, size) == data
    check_equal(tmp_path, path, data)
    info = qemu_img("info", path)
    assert "cluster_size: 512" in info


def test_overlay_last_cluster_cut_short(tmp_path):
    """A virtual size that ends inside a cluster: the last write of an overlay may end
    there (fvd convert rounds a qcow2's size up to 512 bytes)."""
    size = MiB + 64 * KiB + 1024
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(size))
    want = bytearray(base.read_bytes())
    path = tmp_path / "top.qcow2"
    w = FreshWriter(path, size, backing_file="base.raw", backing_format="raw")
    tail = MiB + 64 * KiB
    with pytest.raises(ValueError, match="whole clusters"):
        w.write(tail, b"\x01" * 512)  # would hide the backing file's next 512 bytes
    w.write(tail, b"\x01" * 1000)  # ends in the last sector: the rest is past the source
    want[tail : tail + 1000] = b"\x01" * 1000
    w.close()
    with qcow2.open(path) as img:
        assert img.read(tail, 1000) == bytes(want[tail : tail + 1000])
