"""nbds:// and nbds+unix:// bases: fvd's NBD client with STARTTLS against real nbdkit
(--tls=require), X.509 certificates made at test time with the openssl CLI, on 127.0.0.1
and a unix socket only."""

import glob
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

import fvd
from fvd.nbd_client import NbdClient

from ..nbd_helpers import ROOT, Server, free_port, need_nbd_tools

pytestmark = pytest.mark.interop
SIZE = 1 << 20


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d, name):
    os.makedirs(d, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _issue(ca_dir, out_dir, role, ext):
    """role-cert.pem / role-key.pem in out_dir, signed by ca_dir's CA."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{role}.ext"), "w") as f:
        f.write(ext)
    key, csr = os.path.join(out_dir, f"{role}-key.pem"), os.path.join(out_dir, f"{role}.csr")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN=fvd-test-{role}", cwd=out_dir,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", os.path.join(ca_dir, "ca-cert.pem"),
        "-CAkey", os.path.join(ca_dir, "ca-key.pem"), "-CAcreateserial", "-days", "2",
        "-out", os.path.join(out_dir, f"{role}-cert.pem"),
        "-extfile", os.path.join(out_dir, f"{role}.ext"), cwd=out_dir,
    )  # fmt: skip


def _copy_ca(ca_dir, d):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(ca_dir, "ca-cert.pem"), "rb") as f:
        data = f.read()
    with open(os.path.join(d, "ca-cert.pem"), "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Directories as nbdkit and libnbd lay them out: server/ (ca-cert, server-cert,
    server-key), client/ (ca-cert, client-cert, client-key), ca-only/ (ca-cert) and
    wrong-ca/ (another CA's ca-cert)."""
    need_nbd_tools()
    if shutil.which("openssl") is None:
        reason = "the openssl CLI is missing (apt-get install openssl)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " - required when CI=true")
        pytest.skip(reason)
    root = str(tmp_path_factory.mktemp("certs"))
    ca, other = os.path.join(root, "ca"), os.path.join(root, "other-ca")
    _make_ca(ca, "fvd-test-ca")
    _make_ca(other, "fvd-other-ca")
    server = os.path.join(root, "server")
    _issue(ca, server, "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
           "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n")  # fmt: skip
    client = os.path.join(root, "client")
    _issue(
        ca, client, "client", "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n"
    )
    for d in (server, client):
        _copy_ca(ca, d)
    _copy_ca(ca, os.path.join(root, "ca-only"))
    _copy_ca(other, os.path.join(root, "wrong-ca"))
    return {k: os.path.join(root, k) for k in ("server", "client", "ca-only", "wrong-ca")}


@pytest.fixture
def base_raw(tmp_path):
    data = os.urandom(SIZE - 3000)
    path = tmp_path / "base.raw"
    path.write_bytes(data)
    return path, data


def nbdkit_tls(raw, certs, *, sock=None, tls="require", verify_peer=False):
    """nbdkit serving `raw` with TLS; over TCP on 127.0.0.1 unless `sock`."""
    args = ["nbdkit", "--foreground", "--exit-with-parent", f"--tls={tls}"]
    args += [f"--tls-certificates={certs['server']}"]
    args += ["--tls-verify-peer"] if verify_peer else []
    if sock is not None:
        args += ["--unix", sock, "file", raw]
        return Server(args, f"nbds+unix:///?socket={sock}", socket_path=sock)
    port = free_port()
    args += ["-i", "127.0.0.1", "-p", port, "file", raw]
    return Server(args, f"nbds://127.0.0.1:{port}/", port=port)


def test_tcp_tls_reads_and_an_image_over_it(tmp_path, base_raw, certs, impl):
    raw, data = base_raw
    srv = nbdkit_tls(raw, certs)
    try:
        uri = f"{srv.uri}?tls-certificates={certs['client']}"
        client = NbdClient(uri)
        buf = bytearray(len(data))
        client.readinto(0, buf)
        assert buf == data and client.size == len(data)
        client.close()
        image = tmp_path / "top.fvd"
        fvd.create(image, len(data), base=uri, base_format="raw", block_size=4096)
        with fvd.open(image, "r+", copy_on_read=True) as img:
            assert img.base == uri
            assert img.read(1000, 70000) == data[1000:71000]
            img.prefetch()
        srv.stop()
        with fvd.open(image) as img:
            assert img.read(0, len(data)) == data
    finally:
        srv.stop()


def test_unix_socket_tls_and_hostname(tmp_path, base_raw, certs):
    raw, data = base_raw
    sock = tmp_path / "t.sock"
    srv = nbdkit_tls(raw, certs, sock=sock)
    try:
        base = f"{srv.uri}&tls-certificates={certs['ca-only']}"
        for uri in (base, base + "&tls-hostname=localhost"):  # chain only / chain and name
            client = NbdClient(uri)
            assert client.size == len(data)
            buf = bytearray(4096)
            client.readinto(len(data) - 4096, buf)
            assert buf == data[-4096:]
            client.close()
        with pytest.raises(fvd.BaseImageError, match="certificate is not accepted.*Hostname"):
            NbdClient(base + "&tls-hostname=elsewhere.example")
    finally:
        srv.stop()


def test_wrong_ca_is_refused_unless_verification_is_off(base_raw, certs):
    raw, data = base_raw
    srv = nbdkit_tls(raw, certs)
    try:
        uri = f"{srv.uri}?tls-certificates={certs['wrong-ca']}"
        with pytest.raises(fvd.BaseImageError, match=r"127\.0\.0\.1.*certificate is not accepted"):
            NbdClient(uri)
        with pytest.raises(fvd.BaseImageError, match="certificate is not accepted"):
            NbdClient(srv.uri)  # the system CAs do not know the test CA
        client = NbdClient(uri + "&tls-verify-peer=0")
        buf = bytearray(100)
        client.readinto(0, buf)
        assert buf == data[:100]
        client.close()
    finally:
        srv.stop()


def test_plain_nbd_against_tls_required_and_nbds_against_no_tls(tmp_path, base_raw, certs):
    raw, _ = base_raw
    srv = nbdkit_tls(raw, certs)
    try:
        plain = srv.uri.replace("nbds://", "nbd://")
        with pytest.raises(fvd.BaseImageError, match="requires TLS: use an nbds://"):
            NbdClient(plain)
    finally:
        srv.stop()
    srv = nbdkit_tls(raw, certs, tls="off")
    try:
        with pytest.raises(fvd.BaseImageError, match="does not offer TLS"):
            NbdClient(f"{srv.uri}?tls-certificates={certs['client']}")
    finally:
        srv.stop()


def test_client_certificate_when_the_server_verifies_peers(base_raw, certs):
    raw, data = base_raw
    srv = nbdkit_tls(raw, certs, verify_peer=True)
    try:
        client = NbdClient(f"{srv.uri}?tls-certificates={certs['client']}")
        buf = bytearray(100)
        client.readinto(0, buf)
        assert buf == data[:100]
        client.close()
        with pytest.raises(fvd.BaseImageError, match=r"127\.0\.0\.1"):
            c = NbdClient(f"{srv.uri}?tls-certificates={certs['ca-only']}")
            c.readinto(0, bytearray(100))  # TLS 1.3: the refusal may come after the handshake
    finally:
        srv.stop()


PSK_CLIENT = """
import hashlib, sys
from fvd.nbd_client import NbdClient
c = NbdClient(sys.argv[1])
buf = bytearray(c.size)
c.readinto(0, buf)
c.close()
print(hashlib.sha256(buf).hexdigest())
"""


def _psk_python():
    """A Python with SSLContext.set_psk_client_callback (3.13+), or None."""
    candidates = [sys.executable, shutil.which("python3.13"), shutil.which("python3.14")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[3-9]*/bin/python3")))
    for exe in filter(None, candidates):
        probe = "import ssl; ssl.SSLContext.set_psk_client_callback"
        if subprocess.run([exe, "-c", probe], capture_output=True, check=False).returncode == 0:
            return exe
    return None


def _client_alone(tmp_path):
    """fvd.nbd_client with just what it imports from fvd (errors, units' sizes), for a
    Python without fvd's dependencies installed."""
    pkg = tmp_path / "alone" / "fvd"
    shutil.copytree(os.path.join(ROOT, "fvd", "nbd_client"), pkg / "nbd_client")
    shutil.copy(os.path.join(ROOT, "fvd", "errors.py"), pkg / "errors.py")
    (pkg / "units.py").write_text("KiB = 1 << 10\nMiB = 1 << 20\n")
    (pkg / "__init__.py").write_text("")
    return str(pkg.parent)


def test_psk(tmp_path, base_raw):
    """nbdkit --tls-psk: on Python 3.13+ the client reads the export with the key of
    tls-username (or the URI's user); before 3.13 a PSK URI is refused clearly."""
    need_nbd_tools()
    raw, data = base_raw
    psk = tmp_path / "keys.psk"
    psk.write_text(f"bob:{os.urandom(16).hex()}\nalice:{os.urandom(32).hex()}\n")
    sock = tmp_path / "p.sock"
    srv = Server(
        ["nbdkit", "-f", "--exit-with-parent", "--tls=require", f"--tls-psk={psk}",
         "--unix", sock, "file", raw],
        f"nbds+unix:///?socket={sock}&tls-psk-file={psk}",
        socket_path=sock,
    )  # fmt: skip
    try:
        if sys.version_info < (3, 13):
            with pytest.raises(fvd.BaseImageError, match="pre-shared key.*needs Python 3.13"):
                NbdClient(srv.uri + "&tls-username=alice")
        exe = _psk_python()
        if exe is None:
            pytest.skip("no Python 3.13+ to try PSK with")
        env = dict(os.environ, PYTHONPATH=_client_alone(tmp_path))
        want = hashlib.sha256(data).hexdigest()
        for uri in (
            srv.uri + "&tls-username=alice",
            srv.uri.replace("nbds+unix://", "nbds+unix://alice@"),
        ):
            r = subprocess.run(
                [exe, "-c", PSK_CLIENT, uri],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                cwd=tmp_path,
            )
            assert r.stdout.strip() == want, r.stderr
        r = subprocess.run(
            [exe, "-c", PSK_CLIENT, srv.uri + "&tls-username=carol"],
            capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert "BaseImageError" in r.stderr and "no valid key for 'carol'" in r.stderr
    finally:
        srv.stop()
