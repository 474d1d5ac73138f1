"""Base images that are NBD exports (fvd.nbd_client), served by real nbdkit and qemu-nbd.
Skips without the tools, except under CI=true, where that is a failure."""

import os
import signal
import subprocess

import pytest

import fvd
from fvd.nbd_client import NbdClient, is_nbd_uri, parse_uri
from fvd.units import KiB, MiB

from ..nbd_helpers import Server, free_port, nbdkit_file, need_nbd_tools, run

pytestmark = pytest.mark.interop
SIZE = 4 * MiB


@pytest.fixture(autouse=True)
def _tools():
    need_nbd_tools()


@pytest.fixture
def base_raw(tmp_path):
    data = os.urandom(SIZE - 5000)  # not a multiple of the block size
    path = tmp_path / "base.raw"
    path.write_bytes(data)
    return path, data


def qemu_nbd(tmp_path, raw):
    """qemu-nbd serving a qcow2 copy of `raw` as export "disk" (read-only)."""
    qcow = tmp_path / "base.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    sock = tmp_path / "q.sock"
    return Server(
        ["qemu-nbd", "-r", "-f", "qcow2", "-x", "disk", "-k", sock, "-t", qcow],
        f"nbd+unix:///disk?socket={sock}",
        sock,
    )


def _parts(uri):
    u = parse_uri(uri)
    return u.kind, u.where, u.export


def test_uri_parsing():
    assert _parts("nbd+unix:///disk?socket=/run/a.sock") == ("unix", "/run/a.sock", "disk")
    assert _parts("nbd://127.0.0.1/") == ("tcp", ("127.0.0.1", 10809), "")
    assert _parts("nbd://h:99/a%20b") == ("tcp", ("h", 99), "a b")
    assert _parts("nbds://h/x") == ("tcp", ("h", 10809), "x")
    assert _parts("nbds+unix:///?socket=/s") == ("unix", "/s", "")
    u = parse_uri("nbds://h/x?tls-certificates=/c&tls-verify-peer=0&tls-hostname=n&timeout=2.5")
    assert (u.tls, u.tls_certificates, u.tls_verify_peer, u.tls_hostname) == (
        True,
        "/c",
        False,
        "n",
    )
    assert (u.timeout, u.connect_timeout) == (2.5, 30.0)
    assert parse_uri("nbd://h/x?connect-timeout=7").connect_timeout == 7
    assert not parse_uri("nbd://h/").tls
    for bad in (
        "nbd+unix:///x",
        "nbd:///x",
        "http://h/x",
        "nbd://h/x?tls-certificates=/c",  # TLS parameters need nbds
        "nbd://h/x?timeout=0",
        "nbd://h/x?timeout=abc",
        "nbd://h/x?connect-timeout=-1",
        "nbd://h/x?timeuot=5",  # unknown parameters are diagnosed (NBD URI standard)
        "nbd://h/x?timeout=1&timeout=2",
        "nbds://h/x?tls-verify-peer=maybe",
        "nbd://h/x?socket=/s",
        "nbd://h/" + "x" * 5000,
    ):
        with pytest.raises(ValueError):
            parse_uri(bad)
    assert is_nbd_uri("nbd://h/x") and is_nbd_uri("nbds+unix:///?socket=s")
    assert not is_nbd_uri("nbd.raw")


@pytest.mark.parametrize("server", ["nbdkit", "qemu-nbd"])
def test_reads_copy_on_read_and_prefetch(tmp_path, base_raw, server, impl):
    raw, data = base_raw
    srv = nbdkit_file(raw, tmp_path / "k.sock") if server == "nbdkit" else qemu_nbd(tmp_path, raw)
    image = tmp_path / "sub" / "top.fvd"
    image.parent.mkdir()
    try:
        fvd.create(image, SIZE, base=srv.uri, base_format="raw", block_size=4 * KiB)
        with fvd.open(image, "r+", copy_on_read=True) as img:
            assert img.base == srv.uri  # stored as given, never resolved
            img.write(100 * KiB + 7, b"w" * 9000)
            expect = bytearray(data + bytes(5000))
            expect[100 * KiB + 7 : 100 * KiB + 9007] = b"w" * 9000
            assert img.read(0, SIZE) == expect
            assert img.read(SIZE - 6000, 6000) == expect[-6000:]
            img.prefetch()
            assert img.stats.base_reads > 0
        srv.stop()
        # prefetched: the server is gone and never needed again
        with fvd.open(image) as img:
            assert img.read(0, SIZE) == expect
            assert img.info()["base-prefetched"] is True
            assert img.check().ok
    finally:
        srv.stop()


def test_tcp_uri_against_nbdkit(tmp_path, base_raw, impl):
    raw, data = base_raw
    port = free_port()
    srv = Server(
        ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", port, "file", raw],
        f"nbd://127.0.0.1:{port}/",
        port=port,
    )
    try:
        image = tmp_path / "top.fvd"
        fvd.create(image, SIZE, base=srv.uri, base_format="raw")
        with fvd.open(image) as img:
            assert img.read(0, len(data)) == data
        client = NbdClient(srv.uri, max_connections=2)
        assert client.size == len(data)
        client.close()
    finally:
        srv.stop()


def test_cli_create_takes_the_size_from_the_export(tmp_path, base_raw, impl):
    raw, data = base_raw
    srv = nbdkit_file(raw, tmp_path / "k.sock")
    try:
        image = tmp_path / "top.fvd"
        run(
            "python",
            "-m",
            "fvd.cli",
            "create",
            "-b",
            srv.uri,
            "-F",
            "raw",
            image,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        )
        with fvd.open(image) as img:
            assert img.size == len(data) and img.read(0, 4096) == data[:4096]
    finally:
        srv.stop()


def test_unknown_export_and_missing_server(tmp_path, base_raw, impl):
    raw, _ = base_raw
    with pytest.raises(fvd.BaseImageError, match="nbd\\+unix:///x\\?socket="):
        fvd.create(
            tmp_path / "a.fvd",
            SIZE,
            base=f"nbd+unix:///x?socket={tmp_path}/none",
            base_format="raw",
        )
    with pytest.raises(fvd.BaseImageError, match="raw"):
        fvd.create(tmp_path / "a.fvd", SIZE, base="nbd://127.0.0.1/x", base_format="fvd")
    srv = qemu_nbd(tmp_path, raw)
    try:
        bad = srv.uri.replace("/disk?", "/other?")
        with pytest.raises(fvd.BaseImageError, match="other"):
            fvd.create(tmp_path / "a.fvd", SIZE, base=bad, base_format="raw")
    finally:
        srv.stop()


def test_server_gone_mid_use_then_back(tmp_path, base_raw, impl):
    raw, data = base_raw
    sock = tmp_path / "k.sock"
    srv = nbdkit_file(raw, sock)
    image = tmp_path / "top.fvd"
    fvd.create(image, SIZE, base=srv.uri, base_format="raw", block_size=4 * KiB)
    expect = bytearray(data + bytes(5000))
    with fvd.open(image, "r+", copy_on_read=True) as img:
        assert img.read(0, 64 * KiB) == expect[: 64 * KiB]  # copied on read
        img.write(1 * MiB, b"x" * 4096)  # whole block: no base read
        expect[1 * MiB : 1 * MiB + 4096] = b"x" * 4096
        srv.stop(signal.SIGKILL)
        with pytest.raises(fvd.BaseImageError, match=f"socket={sock}"):
            img.read(2 * MiB, 4096)
        with pytest.raises(fvd.BaseImageError, match=f"socket={sock}"):
            img.prefetch()
        with pytest.raises(fvd.BaseImageError):
            img.write(3 * MiB + 100, b"y" * 10)  # needs the block's head
        # what the image holds still reads
        assert img.read(0, 64 * KiB) == expect[: 64 * KiB]
        assert img.read(1 * MiB, 4096) == expect[1 * MiB : 1 * MiB + 4096]
    srv = nbdkit_file(raw, sock)
    try:
        with fvd.open(image, "r+") as img:
            assert img.check().ok
            img.prefetch()  # resumes
            assert img.read(0, SIZE) == expect
        srv.stop()
        with fvd.open(image) as img:
            assert img.read(0, SIZE) == expect
    finally:
        srv.stop()


def test_concurrent_readers_share_the_pool(tmp_path, base_raw, impl):
    import threading

    raw, data = base_raw
    srv = nbdkit_file(raw, tmp_path / "k.sock")
    try:
        image = tmp_path / "top.fvd"
        fvd.create(image, SIZE, base=srv.uri, base_format="raw", block_size=4 * KiB)
        errors = []
        with fvd.open(image, "r+", copy_on_read=True) as img:

            def reader(seed):
                try:
                    for i in range(40):
                        off = (seed * 7919 + i * 104729) % (len(data) - 20000)
                        assert img.read(off, 20000) == data[off : off + 20000]
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert not errors, errors
    finally:
        srv.stop()


def test_nbdinfo_agrees_on_size(tmp_path, base_raw, impl):
    raw, data = base_raw
    srv = nbdkit_file(raw, tmp_path / "k.sock")
    try:
        out = subprocess.run(
            ["nbdinfo", "--size", srv.uri], capture_output=True, text=True, check=True
        ).stdout
        assert int(out) == NbdClient(srv.uri).size == len(data)
    finally:
        srv.stop()


@pytest.mark.parametrize("server", ["nbdkit", "qemu-nbd"])
def test_sparse_base_extents_and_reads(tmp_path, server, impl):
    """Block status (base:allocation) gives the base's holes to `extents()`; reads of
    holes (structured replies: OFFSET_HOLE chunks) come back as zeros."""
    raw = tmp_path / "sparse.raw"
    data = os.urandom(MiB)
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        f.write(data)
        f.seek(3 * MiB)
        f.write(data[: 64 * KiB])
    expect = raw.read_bytes()
    srv = nbdkit_file(raw, tmp_path / "k.sock") if server == "nbdkit" else qemu_nbd(tmp_path, raw)
    try:
        image = tmp_path / "top.fvd"
        fvd.create(image, SIZE, base=srv.uri, base_format="raw")
        with fvd.open(image) as img:
            assert img.read(0, SIZE) == expect
            runs = [(e.start, e.length, e.data, e.zero, e.depth) for e in img.extents()]
        assert runs == [
            (0, MiB, True, False, 1),
            (MiB, 2 * MiB, False, True, 1),
            (3 * MiB, 64 * KiB, True, False, 1),
            (3 * MiB + 64 * KiB, SIZE - 3 * MiB - 64 * KiB, False, True, 1),
        ]
    finally:
        srv.stop()


def test_prefetch_of_a_sparse_base_moves_only_its_data(tmp_path, impl):
    """nbdkit's file plugin sends holes as data; a large base read asks block status
    first and reads only what is not known to be zero (nbdkit's stats filter counts)."""
    raw = tmp_path / "sparse.raw"
    data = os.urandom(64 * KiB)
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        f.seek(2 * MiB)
        f.write(data)
    stats = tmp_path / "stats.txt"
    srv = nbdkit_file(raw, tmp_path / "k.sock", ("stats", [f"statsfile={stats}"]))
    image = tmp_path / "top.fvd"
    try:
        fvd.create(image, SIZE, base=srv.uri, base_format="raw")
        with fvd.open(image, "r+") as img:
            img.prefetch()
    finally:
        srv.stop()
    read = next(line for line in stats.read_text().splitlines() if line.startswith("read:"))
    assert "64.00 KiB" in read, read
    with fvd.open(image) as img:
        assert img.read(0, SIZE) == raw.read_bytes()


def test_request_deadline_against_a_slow_nbdkit(tmp_path, base_raw, impl):
    """nbdkit's delay filter holds every read 2 s: with timeout=0.5 in the URI the read
    fails with BaseImageError naming the deadline; with timeout=10 it completes."""
    raw, data = base_raw
    srv = nbdkit_file(raw, tmp_path / "k.sock", ("delay", ["rdelay=2"]))
    try:
        client = NbdClient(srv.uri + "&timeout=0.5")
        with pytest.raises(fvd.BaseImageError, match="read of 4096 bytes at 0: .*deadline"):
            client.readinto(0, bytearray(4096))
        client.close()
        client = NbdClient(srv.uri + "&timeout=10")
        buf = bytearray(4096)
        client.readinto(0, buf)
        assert buf == data[:4096]
        client.close()
    finally:
        srv.stop()
