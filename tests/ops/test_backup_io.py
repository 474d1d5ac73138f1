"""File-like views (fvd.ops.fileview) and blkhash checksums (fvd.ops.checksum) compared with
ovirt-imageio itself; bad input and a vanished base."""

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile

import pytest

import fvd
from fvd import cli
from fvd.features.snapshots import SnapshotNotFoundError
from fvd.ops.checksum import checksum as compute_checksum
from fvd.units import MiB

SIZE = 21 * MiB + 12288  # not a multiple of the 4 MiB checksum block

ovirt_client = pytest.importorskip("ovirt_imageio.client")
need_qemu = pytest.mark.skipif(
    not shutil.which("qemu-nbd") or not shutil.which("qemu-img"),
    reason="ovirt-imageio reads images through qemu-nbd",
)
_OVIRT = {}


def ovirt_checksum(tmp_path, content, fmt="raw", **kw):
    """ovirt_imageio.client.checksum() of `content` stored as raw or qcow2 (cached: the
    answer does not depend on the fvd implementation under test)."""
    key = (hashlib.sha256(content).hexdigest(), fmt, tuple(sorted(kw.items())))
    if key not in _OVIRT:
        raw = str(tmp_path / "ref.raw")
        with open(raw, "wb") as f:
            f.write(content)
        path = raw
        if fmt == "qcow2":
            path = str(tmp_path / "ref.qcow2")
            subprocess.run(
                ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path], check=True
            )
        _OVIRT[key] = ovirt_client.checksum(path, **kw)
    return _OVIRT[key]


def fill(img):
    """Data, holes, zeroes, a partial last block; returns the expected content."""
    want = bytearray(SIZE)
    rng = random.Random(3)
    for off, n in ((0, 4096), (3 * MiB + 100, 2 * MiB), (9 * MiB, MiB), (SIZE - 5000, 5000)):
        data = rng.randbytes(n)
        img.write(off, data)
        want[off : off + n] = data
    img.write(13 * MiB, bytes(MiB))  # allocated zeros
    img.write_zeroes(9 * MiB + 4096, 8192)
    want[9 * MiB + 4096 : 9 * MiB + 12288] = bytes(8192)
    return bytes(want)


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "img.fvd")
    fvd.create(path, SIZE)
    with fvd.open(path, "r+") as img:
        content = fill(img)
    return path, content


# ----- as_file --------------------------------------------------------------------------
def test_as_file_with_the_standard_library(image, tmp_path):
    path, content = image
    with fvd.open(path) as img:
        raw = img.as_file()
        assert isinstance(raw, io.RawIOBase)
        assert raw.readable() and raw.seekable() and not raw.writable()
        with io.BufferedReader(raw, 1 << 16) as buf:
            assert buf.read(10) == content[:10]
            buf.seek(3 * MiB + 90)
            assert buf.read(20) == content[3 * MiB + 90 : 3 * MiB + 110]
            assert buf.seek(-100, io.SEEK_END) == SIZE - 100
            assert buf.read() == content[-100:]
            assert buf.read(5) == b""  # end of the disk
        with img.as_file() as f:
            out = io.BytesIO()
            shutil.copyfileobj(f, out, 1 << 20)
            assert out.getvalue() == content
            f.seek(0)
            assert (
                hashlib.file_digest(f, "sha256").hexdigest() == hashlib.sha256(content).hexdigest()
            )
            f.seek(0)
            tar = str(tmp_path / "disk.tar")
            with tarfile.open(tar, "w") as t:
                info = tarfile.TarInfo("disk.raw")
                info.size = SIZE
                t.addfile(info, f)
            with tarfile.open(tar) as t:
                assert t.extractfile("disk.raw").read() == content
            with pytest.raises(io.UnsupportedOperation):
                f.write(b"x")
            with pytest.raises(ValueError):
                f.seek(-1)
        assert raw.closed  # BufferedReader closed it
        raw = img.as_file()
        raw.close()
        with pytest.raises(ValueError):
            raw.read(1)
        assert img.read(0, 4) == content[:4]  # the image stays open


def test_as_file_writes_on_r_plus_and_snapshot_views(image):
    path, content = image
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s")
        with img.as_file() as f:
            assert f.writable()
            f.seek(MiB)
            assert f.write(b"hello") == 5
            assert f.tell() == MiB + 5
            f.flush()
            f.seek(SIZE - 2)
            with pytest.raises(OSError):
                f.write(b"abc")  # past the end of the disk
        assert img.read(MiB, 5) == b"hello"
        with img.open_snapshot("s") as v, v.as_file() as f:
            assert not f.writable()
            assert f.read() == content


# ----- checksum -------------------------------------------------------------------------
@need_qemu
def test_checksum_equals_ovirt_imageio_raw_and_qcow2(image, tmp_path):
    path, content = image
    with fvd.open(path) as img:
        ours = img.checksum()
        before = img.stats.data_reads
        small = img.checksum(block_size=1 * MiB, threads=1)
        reads = img.stats.data_reads - before
        sha = img.checksum(algorithm="sha256", block_size=2 * MiB)
    assert ours == ovirt_checksum(tmp_path, content)
    assert ours == ovirt_checksum(tmp_path, content, "qcow2")
    assert small == ovirt_checksum(tmp_path, content, block_size=1 * MiB)
    assert sha == ovirt_checksum(tmp_path, content, algorithm="sha256", block_size=2 * MiB)
    assert set(ours) == {"algorithm", "block_size", "checksum"}
    # 1 MiB blocks holding data: 0, 3, 4, 5, 9, 13 (allocated zeros), 21 (the tail);
    # one read each (no chunk of them is split), holes and ZERO chunks never read
    assert reads == 7


@need_qemu
def test_checksum_cli_of_qcow2_raw_and_qcow2_snapshots(tmp_path, capsys):
    """`fvd checksum` takes every format (-f probed), and a qcow2 snapshot (-l): equal to
    ovirt-imageio's checksum of the same content."""
    from ovirt_imageio.client import checksum as ovirt

    q, r = str(tmp_path / "a.qcow2"), str(tmp_path / "r.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", q, "8M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 7 1M 64k", q], check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s", q], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 9 3M 4k", q], check=True, capture_output=True)
    with open(r, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"x" * 5000)
    snap = str(tmp_path / "s.raw")
    subprocess.run(["qemu-img", "convert", "-l", "s", "-O", "raw", q, snap], check=True)
    for args, source in (([q], q), ([r], r), (["-l", "s", q], snap)):
        assert cli.main(["checksum", "--output=json", *args]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["checksum"] == ovirt(source)["checksum"], args


@need_qemu
def test_checksum_of_snapshots_and_a_base(tmp_path):
    base = str(tmp_path / "base.raw")
    rng = random.Random(9)
    with open(base, "wb") as f:  # 90% hole, some data
        f.truncate(SIZE)
        f.seek(6 * MiB)
        f.write(rng.randbytes(MiB + 77))
    with open(base, "rb") as f:
        base_content = f.read()
    path = str(tmp_path / "img.fvd")
    fvd.create(path, SIZE, base=base, base_format="raw")
    with fvd.open(path, "r+") as img:
        img.write(6 * MiB + 10, b"over")
        img.create_snapshot("s1")
        img.write(SIZE - 3, b"end")
        img.write_zeroes(6 * MiB + 65536, 65536)
        with img.open_snapshot("s1") as v:
            snap = v.checksum()
            snap_content = v.read(0, SIZE)
        before = img.stats.base_bytes_read
        front = img.checksum()
        read = img.stats.base_bytes_read - before
        front_content = img.read(0, SIZE)
    assert snap_content[: 6 * MiB] == base_content[: 6 * MiB]
    assert snap == ovirt_checksum(tmp_path, snap_content)
    assert front == ovirt_checksum(tmp_path, front_content)
    assert snap != front
    # the base is read only inside the two 4 MiB blocks that hold data (base data at
    # 6 MiB, the write near the end); its holes elsewhere are not read
    assert 0 < read <= 2 * 4 * MiB, read
    assert cli.main(["checksum", "-l", "s1", "--output=json", path]) == 0


def test_checksum_cli_and_bad_input(image, capsys, tmp_path):
    path, content = image
    assert cli.main(["checksum", "--output=json", "-p", path]) == 0
    out = json.loads(capsys.readouterr().out)
    with fvd.open(path) as img:
        assert out == img.checksum()
        for bad in (0, -4096, 1000, 4096.0, True):
            with pytest.raises(ValueError):
                img.checksum(block_size=bad)
        with pytest.raises(ValueError):
            img.checksum(algorithm="nope")
        with pytest.raises(SnapshotNotFoundError):
            img.open_snapshot("nope")
    assert cli.main(["checksum", path]) == 0
    assert capsys.readouterr().out.split() == [out["checksum"], path]
    assert cli.main(["checksum", "-l", "nope", path]) == 1
    assert "nope" in capsys.readouterr().err
    assert cli.main(["checksum", "--block-size", "1000", path]) == 1
    assert "4096" in capsys.readouterr().err


def test_checksum_does_not_depend_on_threads(image):
    path, _ = image
    with fvd.open(path) as img:
        one = compute_checksum(img, 1 << 20, threads=1)
        assert compute_checksum(img, 1 << 20, threads=3) == one
        with pytest.raises(ValueError):
            compute_checksum(img, 1 << 20, threads=0)


def test_vanished_base_is_a_base_image_error_and_nothing_changes(tmp_path):
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(b"b" * MiB)
    path = str(tmp_path / "img.fvd")
    fvd.create(path, 2 * MiB, base=base, base_format="raw")
    with fvd.open(path, "r+") as img:
        img.write(0, b"x")
        img.create_snapshot("s1")
    before = open(path, "rb").read()
    with fvd.open(path) as img:
        os.unlink(base)
        with pytest.raises(fvd.BaseImageError):
            img.open_snapshot("s1")  # the view opens the base itself
        assert img.changed_extents_array("s1").tolist() == []  # tables only
        assert img.checksum()["checksum"]  # the image's own base handle still works
    with pytest.raises(fvd.BaseImageError):
        fvd.open(path)
    assert cli.main(["checksum", path]) == 1
    assert open(path, "rb").read() == before
