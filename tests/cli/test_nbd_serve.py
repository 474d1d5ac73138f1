"""`fvd serve`: real nbdkit with fvd's plugin, real clients (qemu-img, qemu-io, nbdinfo,
nbdcopy), on a unix socket and on TCP 127.0.0.1. Skips without the tools, except under
CI=true, where that is a failure."""

import errno
import os

import pytest

import fvd
from fvd.nbd_client import NbdClient
from fvd.serve import python_path
from fvd.units import KiB, MiB

from ..nbd_helpers import SYSTEM_PYTHON, free_port, fvd_serve, need_nbd_tools, run

pytestmark = pytest.mark.interop
SIZE = 8 * MiB


@pytest.fixture(autouse=True)
def _tools():
    need_nbd_tools()


def fill(path):
    """An image with data, unaligned writes, a zeroed chunk and holes; returns its bytes."""
    fvd.create(path, SIZE, chunk_size=64 * KiB, block_size=4 * KiB)
    expect = bytearray(SIZE)
    with fvd.open(path, "r+") as img:
        for off, n, seed in (
            (0, 100 * KiB, 1),
            (1 * MiB + 123, 5000, 2),
            (3 * MiB, 256 * KiB, 3),
            (SIZE - 4 * KiB, 4 * KiB, 4),
        ):
            data = bytes((seed * 37 + i * 11 + (i >> 7)) & 0xFF for i in range(n))
            img.write(off, data)
            expect[off : off + n] = data
        img.write_zeroes(3 * MiB + 64 * KiB, 64 * KiB)
        expect[3 * MiB + 64 * KiB : 3 * MiB + 128 * KiB] = bytes(64 * KiB)
    return bytes(expect)


def nbd_map(uri):
    """nbdinfo --map as merged (start, length, type) runs."""
    out = []
    for line in run("nbdinfo", "--map", uri).stdout.splitlines():
        start, length, kind = (int(x) for x in line.split()[:3])
        _append(out, start, length, kind)
    return out


def fvd_map(path):
    out = []
    with fvd.open(path, force_share=True) as img:
        for e in img.extents():
            _append(out, e.start, e.length, (0 if e.data else 1) | (2 if e.zero else 0))
    return out


def _append(runs, start, length, kind):
    if runs and runs[-1][2] == kind and runs[-1][0] + runs[-1][1] == start:
        runs[-1] = (runs[-1][0], runs[-1][1] + length, kind)
    else:
        runs.append((start, length, kind))


def test_readonly_unix_socket_qemu_img_and_nbdinfo(tmp_path, impl):
    image = tmp_path / "a.fvd"
    expect = fill(image)
    raw = tmp_path / "expect.raw"
    raw.write_bytes(expect)
    srv = fvd_serve(image, impl, "-r", socket_path=tmp_path / "s.sock")
    try:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, raw)
        assert nbd_map(srv.uri) == fvd_map(image)
        info = run("nbdinfo", "--json", srv.uri).stdout
        assert '"is_read_only": true' in info and '"can_multi_conn": true' in info
        out = tmp_path / "copy.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, out)
        assert out.read_bytes() == expect
        r = run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k", srv.uri, ok=(0, 1))
        assert "failed" in (r.stdout + r.stderr).lower() or r.returncode
    finally:
        rc, _, err = srv.stop()
    assert rc == 0, err
    assert not (tmp_path / "s.sock").exists()  # nbdkit leaves it; fvd serve does not
    with fvd.open(image) as img:
        assert img.read(0, SIZE) == expect


def test_tcp_nbdcopy_to_and_from_the_export(tmp_path, impl):
    image = tmp_path / "a.fvd"
    fvd.create(image, SIZE)
    src = tmp_path / "src.raw"
    data = bytearray(os.urandom(SIZE))
    data[2 * MiB : 4 * MiB] = bytes(2 * MiB)  # nbdcopy zeroes it (sparse)
    src.write_bytes(data)
    srv = fvd_serve(image, impl, "--insecure", port=free_port())
    try:
        run("nbdcopy", src, srv.uri)
        back = tmp_path / "back.raw"
        run("nbdcopy", srv.uri, back)
        assert back.read_bytes() == data
    finally:
        rc, _, err = srv.stop()
    assert rc == 0, err
    with fvd.open(image) as img:
        assert img.read(0, SIZE) == data
        assert img.check().ok


def test_qemu_io_writes_read_back_after_stop(tmp_path, impl):
    image = tmp_path / "a.fvd"
    expect = bytearray(fill(image))
    srv = fvd_serve(image, impl, socket_path=tmp_path / "s.sock")
    try:
        run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4095 70000",
            "-c",
            "write -z 1M 1M",
            "-c",
            "write -z -u 5M 64k",
            "-c",
            "flush",
            srv.uri,
        )
        expect[4095 : 4095 + 70000] = b"\xab" * 70000
        expect[1 * MiB : 2 * MiB] = bytes(MiB)
        expect[5 * MiB : 5 * MiB + 64 * KiB] = bytes(64 * KiB)
        r = run("qemu-io", "-f", "raw", "-c", "read -P 0xab 4095 70000", srv.uri)
        assert "Pattern verification failed" not in r.stdout
        assert nbd_map(srv.uri)[0][2] == 0  # data at 0
    finally:
        rc, _, err = srv.stop()
    assert rc == 0, err
    with fvd.open(image) as img:
        assert img.read(0, SIZE) == bytes(expect)
        assert img.check().ok


def test_trim_and_fast_zero(tmp_path, impl):
    image = tmp_path / "a.fvd"
    fvd.create(image, SIZE, chunk_size=64 * KiB)
    with fvd.open(image, "r+") as img:
        img.write(0, b"\x55" * SIZE)
    srv = fvd_serve(image, impl, socket_path=tmp_path / "s.sock")
    try:
        # discard of whole chunks unmaps them; nbdinfo then shows a zero run there
        run("qemu-io", "-f", "raw", "-c", "discard 1M 1M", srv.uri)
        assert (1 * MiB, 1 * MiB, 3) in nbd_map(srv.uri)
        # fast zero: whole chunks succeed, a partial chunk holding data is ENOTSUP
        # nbdsh runs on the system Python (python3-libnbd), not on the one PATH finds first
        r = run(SYSTEM_PYTHON, "-m", "nbd", "-u", srv.uri, "-c", FAST_ZERO)
        assert r.stdout.split() in (["ok", "ENOTSUP"], ["ok", str(errno.ENOTSUP)]), r.stdout
    finally:
        srv.stop()
    with fvd.open(image) as img:
        assert img.read(1 * MiB, MiB) == bytes(MiB)
        assert img.read(0, MiB) == b"\x55" * MiB
        assert img.read(3 * MiB, 128 * KiB) == bytes(128 * KiB)
        assert img.read(4 * MiB + 100, 4096) == b"\x55" * 4096
        assert img.check().ok


FAST_ZERO = """
h.zero(128 * 1024, 3 << 20, nbd.CMD_FLAG_FAST_ZERO)
print("ok")
try:
    h.zero(4096, (4 << 20) + 100, nbd.CMD_FLAG_FAST_ZERO)
    print("zeroed")
except nbd.Error as e:
    print(e.errno)
"""


def test_snapshot_is_served_read_only(tmp_path, impl):
    image = tmp_path / "a.fvd"
    expect = fill(image)
    with fvd.open(image, "r+") as img:
        img.create_snapshot("s1")
        img.write(0, b"\xee" * MiB)
    raw = tmp_path / "expect.raw"
    raw.write_bytes(expect)
    srv = fvd_serve(image, impl, "-l", "s1", socket_path=tmp_path / "s.sock")
    try:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, raw)
        assert '"is_read_only": true' in run("nbdinfo", "--json", srv.uri).stdout
    finally:
        srv.stop()


def test_write_lock_and_force_share(tmp_path, impl):
    image = tmp_path / "a.fvd"
    expect = fill(image)
    raw = tmp_path / "expect.raw"
    raw.write_bytes(expect)
    srv = fvd_serve(image, impl, socket_path=tmp_path / "rw.sock")
    try:
        r = run(
            "python",
            "-m",
            "fvd.cli",
            "serve",
            "-r",
            "--socket",
            tmp_path / "ro.sock",
            image,
            ok=(1,),
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        )
        assert "a.fvd" in r.stderr and "writing" in r.stderr and "Traceback" not in r.stderr
        ro = fvd_serve(image, impl, "-r", "-U", socket_path=tmp_path / "ro.sock")
        try:
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", ro.uri, raw)
        finally:
            ro.stop()
    finally:
        srv.stop()


def test_missing_snapshot_is_one_line(tmp_path, impl):
    image = tmp_path / "a.fvd"
    fvd.create(image, SIZE)
    r = run(
        "python",
        "-m",
        "fvd.cli",
        "serve",
        "-l",
        "nope",
        "--socket",
        tmp_path / "s",
        image,
        ok=(1,),
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert r.stderr.count("\n") == 1 and "nope" in r.stderr


def test_shared_limits_clients(tmp_path, impl):
    image = tmp_path / "a.fvd"
    fvd.create(image, SIZE)
    srv = fvd_serve(image, impl, "-r", "--shared", "1", socket_path=tmp_path / "s.sock")
    try:
        first = NbdClient(srv.uri, max_connections=1)
        run("nbdinfo", "--size", srv.uri, ok=(1,))  # a second client is refused
        first.close()
        for _ in range(100):  # the server sees it leave
            if run("nbdinfo", "--size", srv.uri, ok=(0, 1)).returncode == 0:
                break
        else:
            raise AssertionError("the slot was not freed")
    finally:
        srv.stop()


def test_plugin_path_leaves_out_our_standard_library():
    import sysconfig

    paths = python_path()
    assert os.path.dirname(os.path.dirname(fvd.__file__)) == paths[0]
    assert sysconfig.get_paths()["stdlib"] not in paths
    assert any(os.path.isdir(os.path.join(p, "numpy")) for p in paths)
