"""fvd.convert: every source kind to every output format, checked by qemu-img.

Oracle: a raw file holding the expected guest bytes; `qemu-img compare` of each output
(fvd outputs through a raw export) against it, and `qemu-img check` of qcow2 outputs.
"""

import hashlib
import os
import shutil
import subprocess

import pytest

import fvd
from fvd import qcow2
from fvd.units import MiB

SIZE = 6 * MiB

# qemu-img is the oracle: only the tests that call it need it
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def qemu_img(*args, check=True):
    r = subprocess.run(["qemu-img", *map(str, args)], check=False, capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def du(path):
    return os.stat(path).st_blocks * 512


def pattern(seed, n):
    return (hashlib.blake2b(str(seed).encode()).digest() * (n // 64 + 1))[:n]


# Writes that give data, zero grains inside data, holes and partial blocks.
WRITES = [
    (0, pattern(1, 70000)),
    (MiB + 4096, pattern(2, 3 * 65536)),
    (2 * MiB, pattern(3, 4096) + bytes(8192) + pattern(4, 4096)),
    (5 * MiB - 100, pattern(5, 200)),
]


def expected_bytes(writes=WRITES, size=SIZE, base=b""):
    ref = bytearray(base.ljust(size, b"\0"))
    for off, data in writes:
        ref[off : off + len(data)] = data
    return ref


def write_ref(tmp_path, data, name="ref.raw"):
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return p


def make_raw(tmp_path):
    p = tmp_path / "src.raw"
    with open(p, "wb") as f:
        f.truncate(SIZE)
        for off, data in WRITES:
            f.seek(off)
            f.write(data)
    return p, expected_bytes()


def make_qcow2(tmp_path):
    p = tmp_path / "src.qcow2"
    qcow2.create(str(p), SIZE)
    with qcow2.open(str(p), "r+") as q:
        for off, data in WRITES:
            q.write(off, data)
    return p, expected_bytes()


def make_qemu_snapshot(tmp_path):
    """A qemu-img-created qcow2 with an internal snapshot; returns the snapshot's
    contents (the front moves on after it)."""
    p = tmp_path / "qemu.qcow2"
    raw, ref = make_raw(tmp_path)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, p)
    qemu_img("snapshot", "-c", "snap1", p)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x55 0 128k", "-c", "write -z 1M 1M", str(p)],
        check=True,
        capture_output=True,
    )
    return p, ref


def make_fvd(tmp_path, **kw):
    p = tmp_path / "src.fvd"
    fvd.create(p, SIZE, chunk_size=256 * 1024, block_size=16384, **kw)
    with fvd.open(p, "r+") as img:
        for off, data in WRITES:
            img.write(off, data)
    return p


def make_fvd_front(tmp_path):
    return make_fvd(tmp_path), expected_bytes()


def make_fvd_snapshot(tmp_path):
    p = make_fvd(tmp_path)
    with fvd.open(p, "r+") as img:
        img.create_snapshot("s1")
        img.write(0, b"\x77" * 300000)
        img.write_zeroes(MiB, 2 * MiB)
    return p, expected_bytes()


def make_fvd_with_base(tmp_path):
    base = tmp_path / "golden.raw"
    base_data = pattern(9, 3 * MiB + 512)
    base.write_bytes(base_data)
    p = make_fvd(tmp_path, base=str(base), base_format="raw")
    return p, expected_bytes(base=base_data)


SOURCES = {
    "raw": (make_raw, None),
    "qcow2": (make_qcow2, None),
    "qemu-snapshot": (make_qemu_snapshot, "snap1"),
    "fvd": (make_fvd_front, None),
    "fvd-snapshot": (make_fvd_snapshot, "s1"),
    "fvd-base": (make_fvd_with_base, None),
}


def assert_same(tmp_path, out, fmt, ref):
    """qemu-img compare of `out` (an fvd output through its raw export) with ref."""
    if fmt == "fvd":
        export = tmp_path / "export.raw"
        fvd.convert(out, export, dst_format="raw")
        out, fmt = export, "raw"
    if fmt == "qcow2":
        qemu_img("check", out)
    qemu_img("compare", "-f", fmt, "-F", "raw", out, ref)


@needs_qemu_img
@pytest.mark.parametrize("dst_format", ["fvd", "raw", "qcow2"])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_matrix(tmp_path, source, dst_format):
    make, snapshot = SOURCES[source]
    src, ref_bytes = make(tmp_path)
    ref = write_ref(tmp_path, ref_bytes)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / f"out.{dst_format}"
    seen = []
    fvd.convert(
        src,
        out,
        dst_format=dst_format,
        snapshot=snapshot,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before  # SRC untouched
    assert seen[-1][0] == seen[-1][1] and seen[0][0] == 0
    assert_same(tmp_path, out, dst_format, ref)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@needs_qemu_img
@pytest.mark.parametrize("dst_format", ["fvd", "raw", "qcow2"])
def test_output_is_as_sparse_as_qemu_img(tmp_path, dst_format):
    src = tmp_path / "sparse.raw"
    with open(src, "wb") as f:  # 30% random MiBs, with zero 4K grains inside
        f.truncate(32 * MiB)
        for i in range(0, 32, 3):
            f.seek(i * MiB)
            f.write(pattern(i, 256 * 1024) + bytes(256 * 1024) + pattern(-i, 4096))
    ours = tmp_path / f"ours.{dst_format}"
    fvd.convert(src, ours, dst_format=dst_format)
    theirs = tmp_path / "theirs"
    qemu_img("convert", "-f", "raw", "-O", "raw" if dst_format == "raw" else "qcow2", src, theirs)
    assert du(ours) <= du(theirs) * 1.01
    assert_same(tmp_path, ours, dst_format, src)


@needs_qemu_img
def test_options(tmp_path):
    src, ref = make_raw(tmp_path)
    fvd.convert(src, tmp_path / "a.fvd", chunk_size="64K", block_size=4096)
    with fvd.open(tmp_path / "a.fvd") as img:
        assert (img.chunk_size, img.block_size) == (65536, 4096)
    fvd.convert(
        src, tmp_path / "a.qcow2", dst_format="qcow2", cluster_size="4K", lazy_refcounts="on"
    )
    info = qemu_img("info", "--output=json", tmp_path / "a.qcow2").stdout
    assert '"cluster-size": 4096' in info and '"lazy-refcounts": true' in info
    assert_same(tmp_path, tmp_path / "a.qcow2", "qcow2", write_ref(tmp_path, ref))
    for bad in (
        {"cluster_size": "3K"},
        {"chunk_size": 1},
        {"nope": 1},
        {"lazy_refcounts": "maybe"},
    ):
        fmt = "fvd" if "chunk_size" in bad else "qcow2"
        with pytest.raises(ValueError):
            fvd.convert(src, tmp_path / "bad.out", dst_format=fmt, **bad)
        assert not (tmp_path / "bad.out").exists()
    for fmt in ("fvd", "raw", "qcow2"):  # qemu-img's -t unsafe: no flush
        fvd.convert(src, tmp_path / f"u.{fmt}", dst_format=fmt, cache="unsafe")
        assert_same(tmp_path, tmp_path / f"u.{fmt}", fmt, write_ref(tmp_path, ref))
    with pytest.raises(ValueError):
        fvd.convert(src, tmp_path / "x.raw", cache="none")
    with pytest.raises(ValueError):
        fvd.convert(src, tmp_path / "x.raw", dst_format="vmdk")
    with pytest.raises(ValueError):
        fvd.convert(src, tmp_path / "x.raw", since="s1")  # needs -B
    with pytest.raises(ValueError):
        fvd.convert(src, src, dst_format="raw")  # onto itself
    with pytest.raises(ValueError):  # onto its backing
        fvd.convert(src, tmp_path / "a.fvd", backing="a.fvd")
    assert (tmp_path / "a.fvd").exists()


def test_failed_convert_leaves_no_output(tmp_path):
    src, _ = make_raw(tmp_path)
    before = src.read_bytes()
    dst = tmp_path / "out.fvd"
    dst.write_bytes(b"previous backup")

    def boom(done, total):
        if done:
            raise RuntimeError("interrupted")

    for fmt in ("fvd", "raw", "qcow2"):
        with pytest.raises(RuntimeError):
            fvd.convert(src, dst, dst_format=fmt, progress=boom)
        assert dst.read_bytes() == b"previous backup"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fvd", "src.raw"]
    assert src.read_bytes() == before
    with pytest.raises(fvd.FvdError):
        fvd.convert(tmp_path / "src.raw", dst, src_format="qcow2")
    with pytest.raises(FileNotFoundError):
        fvd.convert(tmp_path / "missing.raw", tmp_path / "o.fvd")
    with pytest.raises(FileNotFoundError):
        fvd.convert(src, tmp_path / "no" / "o.fvd")


def test_locked_source(tmp_path):
    p = make_fvd(tmp_path)
    with fvd.open(p, "r+") as img:
        img.write(0, b"live")
        with pytest.raises(fvd.ImageLockedError):
            fvd.convert(p, tmp_path / "o.raw", dst_format="raw")
        img.flush()
        fvd.convert(p, tmp_path / "o.raw", dst_format="raw", force_share=True)
    assert (tmp_path / "o.raw").read_bytes()[:4] == b"live"


@needs_qemu_img
def test_qcow2_overlay_written_by_fvd(tmp_path):
    """fvd.qcow2 writes and reads backing-file fields; qemu-img agrees."""
    base = tmp_path / "base.qcow2"
    raw, ref = make_raw(tmp_path)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, base)
    ov = tmp_path / "ov.qcow2"
    qcow2.create(str(ov), SIZE, backing_file="base.qcow2", backing_format="qcow2")
    with qcow2.open(str(ov), "r+") as q:
        q.write(1000, b"x" * 5000)
        q.write_zeroes(MiB, 128 * 1024)
        q.write_zeroes(2 * MiB + 100, 300)
        ref[1000:6000] = b"x" * 5000
        ref[MiB : MiB + 128 * 1024] = bytes(128 * 1024)
        ref[2 * MiB + 100 : 2 * MiB + 400] = bytes(300)
        assert q.read(0, SIZE) == ref
        assert {e.depth for e in q.extents()} == {0, 1}
    qemu_img("check", ov)
    qemu_img("compare", ov, write_ref(tmp_path, ref))
    info = qemu_img("info", "--output=json", ov).stdout
    assert '"backing-filename-format": "qcow2"' in info
    qov = tmp_path / "qov.qcow2"  # and an overlay qemu-img made
    qemu_img("create", "-f", "qcow2", "-b", "ov.qcow2", "-F", "qcow2", qov)
    subprocess.run(
        ["qemu-io", "-c", "write -P 7 64k 64k", str(qov)], check=True, capture_output=True
    )
    ref[65536:131072] = b"\7" * 65536
    with qcow2.open(str(qov)) as q:
        assert q.backing_file == "ov.qcow2" and q.read(0, SIZE) == ref
    fvd.convert(qov, tmp_path / "flat.fvd")
    assert_same(tmp_path, tmp_path / "flat.fvd", "fvd", write_ref(tmp_path, ref))


def _restore_and_compare(tmp_path, newest, fmt, ref):
    """Restore = convert of the newest overlay; the chain equals the snapshot."""
    restored = tmp_path / "restored.raw"
    if restored.exists():
        restored.unlink()
    if fmt == "qcow2":
        qemu_img("check", newest)
        qemu_img("compare", newest, ref)  # qemu reads the chain itself
        qemu_img("convert", "-O", "raw", newest, restored)
    else:
        fvd.convert(newest, restored, dst_format="raw")
    qemu_img("compare", "-f", "raw", "-F", "raw", restored, ref)


def _own_data(path, fmt):
    """Bytes the overlay itself holds (depth 0 data extents)."""
    opener = fvd.open if fmt == "fvd" else qcow2.open
    with opener(str(path)) as img:
        return [(e.start, e.length) for e in img.extents() if e.data and e.depth == 0]


@needs_qemu_img
@pytest.mark.parametrize("fmt", ["fvd", "qcow2"])
def test_incremental_backup_chain(tmp_path, fmt):
    vm = tmp_path / "vm.fvd"
    size = 8 * MiB
    fvd.create(vm, size, chunk_size=64 * 1024, block_size=16384)
    changes = [
        lambda img: [img.write(i * MiB, pattern(i, 300000)) for i in range(8)],
        lambda img: (
            img.write(MiB + 5000, b"a" * 10000),
            img.write_zeroes(3 * MiB, 65536),
            img.write(7 * MiB + 100, b"b" * 100),
        ),
        lambda img: (img.write_zeroes(0, MiB), img.write(2 * MiB, pattern(50, 200000))),
        lambda img: (
            img.write_zeroes(4 * MiB, 2 * MiB),
            img.write(5 * MiB, b"c" * 4096),
            img.write_zeroes(MiB + 4096, 512),
        ),
    ]
    ext = {"fvd": "fvd", "qcow2": "qcow2"}[fmt]
    previous = None
    for n, change in enumerate(changes):
        with fvd.open(vm, "r+") as img:
            change(img)
            if n < 3:
                img.create_snapshot(f"s{n}")
        snap = f"s{n}" if n < 3 else None  # the last backup is of the live image
        ref = tmp_path / f"ref{n}.raw"
        fvd.convert(vm, ref, dst_format="raw", snapshot=snap)
        out = tmp_path / f"backup{n}.{ext}"
        if previous is None:
            fvd.convert(vm, out, dst_format=fmt, snapshot=snap)
        else:
            fvd.convert(
                vm,
                out,
                dst_format=fmt,
                snapshot=snap,
                since=f"s{n - 1}",
                backing=previous.name,
                backing_format=fmt,
            )
            with fvd.open(vm) as img:
                changed = img.changed_extents(f"s{n - 1}", snap)
            grain = 65536
            allowed = set()
            for e in changed:
                allowed.update(range(e.start // grain, -(-(e.start + e.length) // grain)))
            own = _own_data(out, fmt)
            held = {g for s, n_ in own for g in range(s // grain, -(-(s + n_) // grain))}
            assert held <= allowed  # only changed data
            assert sum(n_ for _, n_ in own) < size // 4
        _restore_and_compare(tmp_path, out, fmt, ref)
        previous = out
    info = qemu_img("info", "--backing-chain", previous).stdout if fmt == "qcow2" else ""
    assert fmt == "fvd" or info.count("image:") == 4


@needs_qemu_img
def test_incremental_from_qemu_snapshots_by_cli(tmp_path, capsys):
    """A qcow2 written by QEMU: --since compares its snapshot trees; CLI end to end."""
    from fvd.cli import main

    src, _ = make_qemu_snapshot(tmp_path)  # snap1, then writes in the front
    subprocess.run(["qemu-img", "snapshot", "-c", "snap2", str(src)], check=True)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x66 3M 64k", str(src)], check=True, capture_output=True
    )
    full, inc = tmp_path / "full.fvd", tmp_path / "inc.fvd"
    assert main(["convert", "-l", "snap1", str(src), str(full)]) == 0
    assert (
        main(
            [
                "convert",
                "-f",
                "qcow2",
                "-l",
                "snap2",
                "--since",
                "snap1",
                "-B",
                "full.fvd",
                "-F",
                "fvd",
                str(src),
                str(inc),
            ]
        )
        == 0
    )
    assert main(["map", "--since", "snap1", "--until", "snap2", "--output=json", str(src)]) == 0
    import json

    changed = json.loads(capsys.readouterr().out)
    assert [(e["start"], e["length"], e["zero"]) for e in changed] == [
        (0, 128 * 1024, False),
        (MiB, MiB, True),
    ]
    ref = tmp_path / "snap2.raw"
    qemu_img("convert", "-l", "snap2", "-O", "raw", src, ref)
    assert_same(tmp_path, inc, "fvd", ref)
    assert sum(n for _, n in _own_data(inc, "fvd")) <= 128 * 1024
