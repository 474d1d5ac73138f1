"""fvd.qcow2 against QEMU's own tools (qemu-img / qemu-io, Debian qemu-utils).

Images the baseline writes must pass `qemu-img check` (exit 0) and compare equal to a raw
file holding the expected contents; images QEMU writes must read back byte-exact.
Skips when qemu-img is missing, except under CI=true, where that is a failure.
"""

import json
import os
import shutil
import subprocess

import pytest

from fvd import qcow2
from fvd.units import KiB, MiB

pytestmark = pytest.mark.interop

QEMU_IMG, QEMU_IO = shutil.which("qemu-img"), shutil.which("qemu-io")


@pytest.fixture(autouse=True)
def _need_qemu():
    if QEMU_IMG and QEMU_IO:
        return
    reason = "qemu-img / qemu-io not installed (apt-get install -y qemu-utils)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " - required when CI=true")
    print("SKIP:", reason)
    pytest.skip(reason)


def run(*args, ok=(0,)):
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode in ok, f"{args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def qemu_check(path):
    """`qemu-img check` result as a dict; asserts exit 0 (no corruptions, no leaks)."""
    r = run(QEMU_IMG, "check", "--output=json", "-f", "qcow2", str(path), ok=(0, 2, 3))
    info = json.loads(r.stdout) if r.stdout.strip() else {}
    assert r.returncode == 0, f"qemu-img check exit {r.returncode}: {r.stdout}{r.stderr}"
    assert not info.get("corruptions") and not info.get("leaks")
    return info


def qemu_compare(path, expected, tmp_path):
    raw = tmp_path / "expected.raw"
    raw.write_bytes(bytes(expected))
    r = run(QEMU_IMG, "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw), ok=(0, 1))
    assert r.returncode == 0, r.stdout + r.stderr


def pattern(n, seed):
    return bytes((i * 131 + seed * 7 + (i >> 9)) & 0xFF for i in range(n))


def fill(img, size, seed):
    """A fixed mix of unaligned writes, zero writes and a snapshot-free overwrite."""
    model = bytearray(size)
    writes = [
        (0, 5000),
        (70 * KiB - 3, 9000),
        (size // 2 + 123, 130 * KiB),
        (size - 4097, 4097),
        (300 * KiB, 1),
    ]
    for i, (off, n) in enumerate(writes):
        data = pattern(n, seed + i)
        img.write(off, data)
        model[off : off + n] = data
    img.write_zeroes(size // 2 + 64 * KiB, 64 * KiB)
    model[size // 2 + 64 * KiB : size // 2 + 128 * KiB] = bytes(64 * KiB)
    img.write(2000, b"over")
    model[2000:2004] = b"over"
    return model


# --------------------------------------------------------- baseline -> QEMU
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_baseline_images_pass_qemu_check(tmp_path, impl, cluster_size, cache):
    path = tmp_path / "b.qcow2"
    size = 4 * MiB
    qcow2.create(str(path), size, cluster_size=cluster_size)
    with qcow2.open(str(path), "r+", cache=cache) as img:
        model = fill(img, size, cluster_size)
    info = qemu_check(path)
    assert info["allocated-clusters"] > 0
    qemu_compare(path, model, tmp_path)
    meta = json.loads(run(QEMU_IMG, "info", "--output=json", str(path)).stdout)
    assert meta["virtual-size"] == size and meta["cluster-size"] == cluster_size
    assert meta["format-specific"]["data"]["compat"] == "1.1"


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_lazy_refcounts_clean_close(tmp_path, impl, cache):
    path = tmp_path / "lazy.qcow2"
    qcow2.create(str(path), 4 * MiB, cluster_size=4096, lazy_refcounts=True)
    with qcow2.open(str(path), "r+", cache=cache) as img:
        model = fill(img, 4 * MiB, 3)
    qemu_check(path)
    qemu_compare(path, model, tmp_path)
    meta = json.loads(run(QEMU_IMG, "info", "--output=json", str(path)).stdout)
    assert meta["format-specific"]["data"]["lazy-refcounts"] is True
    assert meta.get("dirty-flag") is False


def test_lazy_refcounts_crash_then_repair(tmp_path, impl):
    path = tmp_path / "crash.qcow2"
    qcow2.create(str(path), 4 * MiB, cluster_size=65536, lazy_refcounts=True)
    img = qcow2.open(str(path), "r+", cache="writethrough")
    model = fill(img, 4 * MiB, 9)
    img._abandon()  # simulated crash: no clean shutdown
    meta = json.loads(run(QEMU_IMG, "info", "-U", "--output=json", str(path)).stdout)
    assert meta.get("dirty-flag") is True
    r = run(QEMU_IMG, "check", str(path), ok=(0, 2, 3))
    assert r.returncode != 0  # refcounts really are stale
    with qcow2.open(str(path), "r+") as img:  # repaired on open, as QEMU does
        assert img.read(0, 4 * MiB) == bytes(model)
    qemu_check(path)
    qemu_compare(path, model, tmp_path)


def test_snapshots_visible_to_qemu(tmp_path, impl):
    path = tmp_path / "snap.qcow2"
    size = 2 * MiB
    qcow2.create(str(path), size, cluster_size=4096)
    with qcow2.open(str(path), "r+") as img:
        first = fill(img, size, 1)
        img.create_snapshot("alpha", vm_state=b"S" * 10000)
        img.write(0, b"after" * 1000)
        second = bytearray(first)
        second[:5000] = b"after" * 1000
        img.create_snapshot("beta")
        img.create_snapshot("gamma")
        img.delete_snapshot("beta")
        img.write(1 * MiB, b"late" * 100)
        second[MiB : MiB + 400] = b"late" * 100
    qemu_check(path)
    qemu_compare(path, second, tmp_path)
    listing = run(QEMU_IMG, "snapshot", "-l", str(path)).stdout
    assert "alpha" in listing and "gamma" in listing and "beta" not in listing
    assert "9.77 KiB" in listing or "10000" in listing or "9.8" in listing
    snap_raw = tmp_path / "alpha.raw"
    run(QEMU_IMG, "convert", "-O", "raw", "-l", "snapshot.name=alpha", str(path), str(snap_raw))
    assert snap_raw.read_bytes() == bytes(first)
    with qcow2.open(str(path), "r+") as img:
        img.delete_snapshot("alpha")
        img.delete_snapshot("gamma")
    qemu_check(path)
    qemu_compare(path, second, tmp_path)


def test_convert_equals_our_reads(tmp_path, impl):
    path = tmp_path / "conv.qcow2"
    qcow2.create(str(path), 3 * MiB, cluster_size=4096)
    with qcow2.open(str(path), "r+") as img:
        fill(img, 3 * MiB, 4)
        img.create_snapshot("s")
        img.write(10, b"cow")
    out = tmp_path / "conv.raw"
    run(QEMU_IMG, "convert", "-O", "raw", str(path), str(out))
    with qcow2.open(str(path)) as img:
        assert out.read_bytes() == img.read(0, img.size)


def test_map_matches_qemu(tmp_path, impl):
    path = tmp_path / "map.qcow2"
    qcow2.create(str(path), 2 * MiB, cluster_size=65536)
    with qcow2.open(str(path), "r+") as img:
        img.write(0, b"x" * 65536 * 2)
        img.write(5 * 65536, b"y" * 65536)
        img.write(8 * 65536, b"z" * 65536 * 3)
        img.write_zeroes(9 * 65536, 65536)
        ours = [(e.start, e.length, e.data, e.zero, e.present, e.offset) for e in img.extents()]
    theirs = json.loads(run(QEMU_IMG, "map", "--output=json", str(path)).stdout)
    theirs = [
        (e["start"], e["length"], e["data"], e["zero"], e["present"], e.get("offset"))
        for e in theirs
    ]
    assert ours == theirs


# --------------------------------------------------------- QEMU -> baseline
def qemu_io(path, *cmds):
    args = [QEMU_IO, "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(*args, str(path))


@pytest.mark.parametrize(
    "opts",
    [
        "cluster_size=65536",
        "cluster_size=4096",
        "cluster_size=512",
        "cluster_size=65536,lazy_refcounts=on",
        "compat=0.10",
    ],
)
def test_qemu_written_images_read_exactly(tmp_path, impl, opts):
    path = tmp_path / "q.qcow2"
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", opts, str(path), "4M")
    qemu_io(
        path,
        "write -P 0xab 0 64k",
        "write -P 0xcd 100k 7k",
        "write -P 0x11 1000k 300k",
        "write -z 1100k 64k",
    )
    run(QEMU_IMG, "snapshot", "-c", "snap1", str(path))
    qemu_io(path, "write -P 0xef 4k 4k", "write -P 0x22 3M 65k")
    raw = tmp_path / "q.raw"
    run(QEMU_IMG, "convert", "-O", "raw", str(path), str(raw))
    with qcow2.open(str(path)) as img:
        assert img.read(0, img.size) == raw.read_bytes()
        assert [s.name for s in img.snapshots()] == ["snap1"]
        assert img.check().ok
    # and we can keep writing them, QEMU still agrees
    expected = bytearray(raw.read_bytes())
    with qcow2.open(str(path), "r+", cache="writethrough") as img:
        img.write(6000, b"ours" * 3000)
        expected[6000:18000] = b"ours" * 3000
        img.create_snapshot("mine")
        img.delete_snapshot("snap1")
        img.write(3 * MiB + 10, b"more")
        expected[3 * MiB + 10 : 3 * MiB + 14] = b"more"
    qemu_check(path)
    qemu_compare(path, expected, tmp_path)
    listing = run(QEMU_IMG, "snapshot", "-l", str(path)).stdout
    assert "mine" in listing and "snap1" not in listing


def test_qemu_snapshot_of_our_image_reads_back(tmp_path, impl):
    path = tmp_path / "mixed.qcow2"
    qcow2.create(str(path), 2 * MiB, cluster_size=4096)
    with qcow2.open(str(path), "r+") as img:
        model = fill(img, 2 * MiB, 6)
    run(QEMU_IMG, "snapshot", "-c", "theirs", str(path))
    qemu_io(path, "write -P 0x5a 0 8k")
    model[:8192] = b"\x5a" * 8192
    with qcow2.open(str(path), "r+") as img:
        assert img.read(0, len(model)) == bytes(model)
        assert [s.name for s in img.snapshots()] == ["theirs"]
        img.delete_snapshot("theirs")
        assert img.check().ok
    qemu_check(path)
    qemu_compare(path, model, tmp_path)


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_crash_without_lazy_refcounts_leaves_at_most_leaks(tmp_path, impl, cache):
    """Refcount-before-L2 ordering: a crash at any point may leak clusters, never corrupt."""
    path = tmp_path / "crash2.qcow2"
    qcow2.create(str(path), 4 * MiB, cluster_size=4096)
    img = qcow2.open(str(path), "r+", cache=cache)
    fill(img, 4 * MiB, 2)
    img.create_snapshot("s")
    img.write(0, b"after" * 3000)
    img.write_zeroes(64 * KiB, 64 * KiB)
    img._abandon()
    r = run(QEMU_IMG, "check", str(path), ok=(0, 3))
    if r.returncode == 3:
        with qcow2.open(str(path), "r+") as img:
            assert img.check(repair=True).ok
    qemu_check(path)
