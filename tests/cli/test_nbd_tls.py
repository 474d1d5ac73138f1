"""`fvd serve` over TCP (issue 19): TLS with X.509 certificates and with PSK, made at
test time with the openssl CLI, on 127.0.0.1 only; real clients (nbdinfo, nbdcopy from
libnbd, qemu-img's TLS client); a read-write TCP export without TLS is refused unless
--insecure; the default bind address is localhost."""

import os
import shutil
import subprocess
import sys

import pytest

import fvd
from fvd.serve import build_command, describe
from fvd.units import MiB

from ..nbd_helpers import Server, free_port, fvd_serve, need_nbd_tools, run, serve_env

pytestmark = pytest.mark.interop
SIZE = 4 * MiB


@pytest.fixture(autouse=True)
def _tools():
    need_nbd_tools()
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl missing - required when CI=true")
        pytest.skip("openssl missing (apt-get install openssl)")


def openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(folder):
    """A CA (ca-cert.pem, ca-key.pem) in `folder`."""
    folder.mkdir()
    openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", folder / "ca-key.pem", "-out", folder / "ca-cert.pem", "-days", "2"),
        *("-subj", "/CN=fvd test CA", "-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    return folder


def server_certificates(tmp_path):
    """nbdkit's directory (ca-cert.pem, server-cert.pem, server-key.pem) for 127.0.0.1,
    a client directory with the right CA and one with another CA."""
    ca = make_ca(tmp_path / "ca")
    srv = tmp_path / "server"
    srv.mkdir()
    shutil.copy(ca / "ca-cert.pem", srv)
    openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
        *("-keyout", srv / "server-key.pem", "-out", tmp_path / "server.csr"),
        *("-subj", "/CN=localhost"),
    )
    ext = tmp_path / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n"
    )
    openssl(
        *("x509", "-req", "-in", tmp_path / "server.csr", "-CA", ca / "ca-cert.pem"),
        *("-CAkey", ca / "ca-key.pem", "-CAcreateserial", "-days", "2"),
        *("-out", srv / "server-cert.pem", "-extfile", ext),
    )
    client, wrong = tmp_path / "client", tmp_path / "wrong"
    client.mkdir()
    shutil.copy(ca / "ca-cert.pem", client)
    other = make_ca(tmp_path / "other-ca")
    wrong.mkdir()
    shutil.copy(other / "ca-cert.pem", wrong)
    return srv, client, wrong


def image_with_data(tmp_path):
    image = tmp_path / "a.fvd"
    fvd.create(image, SIZE)
    data = os.urandom(SIZE // 2) + bytes(SIZE // 2)
    with fvd.open(image, "r+") as img:
        img.write(0, data[: SIZE // 2])
    return image, data


def test_x509_tls_is_required_verified_and_carries_the_data(tmp_path, impl):
    srv_dir, client, wrong = server_certificates(tmp_path)
    image, data = image_with_data(tmp_path)
    port = free_port()
    srv = fvd_serve(image, impl, "--tls-certificates", srv_dir, port=port)
    nbds = f"nbds://127.0.0.1:{port}/?tls-certificates={client}"
    try:
        r = run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/", ok=(1,))  # plain: refused
        assert "TLS" in r.stderr
        r = run("nbdinfo", "--size", f"nbds://127.0.0.1:{port}/?tls-certificates={wrong}", ok=(1,))
        assert "certificate" in r.stderr.lower()
        assert run("nbdinfo", "--size", nbds).stdout.strip() == str(SIZE)
        back = tmp_path / "back.raw"
        run("nbdcopy", nbds, back)
        assert back.read_bytes() == data
        new = tmp_path / "new.raw"
        new.write_bytes(os.urandom(SIZE))
        run("nbdcopy", new, nbds)  # the export is read-write, over TLS
        qemu = (
            "--object",
            f"tls-creds-x509,id=tls0,dir={client},endpoint=client",
            "--image-opts",
            f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0",
        )
        out = run("qemu-img", "info", "--output=json", *qemu).stdout  # QEMU's TLS client
        assert f'"virtual-size": {SIZE}' in out
        qback = tmp_path / "qback.raw"
        run("qemu-img", "convert", "-O", "raw", *qemu, qback)
        assert qback.read_bytes() == new.read_bytes()
    finally:
        rc, _, err = srv.stop()
    assert rc == 0, err
    with fvd.open(image) as img:
        assert img.read(0, SIZE) == new.read_bytes()


def test_psk_tls(tmp_path, impl):
    image, data = image_with_data(tmp_path)
    keys, other = tmp_path / "keys.psk", tmp_path / "other.psk"
    keys.write_text(f"alice:{os.urandom(32).hex()}\n")
    other.write_text(f"alice:{os.urandom(32).hex()}\n")
    port = free_port()
    srv = fvd_serve(image, impl, "-r", "--tls-psk", keys, port=port)
    try:
        uri = f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={keys}"
        back = tmp_path / "back.raw"
        run("nbdcopy", uri, back)
        assert back.read_bytes() == data
        run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/", ok=(1,))
        run("nbdinfo", "--size", f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={other}", ok=(1,))
    finally:
        rc, _, err = srv.stop()
    assert rc == 0, err


def serve_cli(*argv):
    return subprocess.run(
        [sys.executable, "-m", "fvd.cli", "serve", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_read_write_tcp_without_tls_is_refused(tmp_path):
    image = tmp_path / "a.fvd"
    fvd.create(image, SIZE)
    r = serve_cli("--port", free_port(), image)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "--insecure" in r.stderr and str(image) in r.stderr
    r = serve_cli("--port", free_port(), "--tls-psk", tmp_path / "missing.psk", image)
    assert r.returncode == 1 and "missing.psk" in r.stderr and r.stderr.count("\n") == 1


def test_tcp_binds_localhost_unless_told(tmp_path, impl):
    image, data = image_with_data(tmp_path)
    port = free_port()
    args = [sys.executable, "-m", "fvd.cli", "serve", "-r", "--port", port, image]
    srv = Server(args, f"nbd://127.0.0.1:{port}/", port=port, env=serve_env(impl))
    try:
        assert run("nbdinfo", "--size", srv.uri).stdout.strip() == str(SIZE)
    finally:
        rc, _, err = srv.stop()
    assert rc == 0 and f"at nbd://localhost:{port}/" in err, err
    cmd = build_command("a.fvd", port=10809)
    assert cmd[cmd.index("--ipaddr") + 1] == "localhost"
    cmd = build_command("a.fvd", port=10809, bind="0.0.0.0", tls_certificates=str(tmp_path))
    assert cmd[cmd.index("--ipaddr") + 1] == "0.0.0.0"
    assert "--tls=require" in cmd and f"--tls-certificates={tmp_path}" in cmd
    assert "--tls" not in " ".join(build_command("a.fvd", socket="s.sock"))
    assert describe(None, 10809, None, tls=True) == "nbds://localhost:10809/"
