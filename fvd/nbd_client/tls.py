"""TLS for nbds:// URIs: an ssl.SSLContext built from the URI's libnbd-style parameters.

``tls-certificates=DIR`` names a directory laid out as nbdkit and libnbd expect it:
``ca-cert.pem`` (the CA the server's certificate must chain to; required in DIR),
``client-cert.pem`` + ``client-key.pem`` (a client certificate, sent when both exist) and
``ca-crl.pem`` (optional revocation list). Without it the system's CA store is used, as
libnbd does. ``tls-verify-peer=0`` skips verification (a warning in the docs, as in
libnbd). The server's name is checked against ``tls-hostname``, else the URI's host; a
unix socket URI without ``tls-hostname`` has no name to check, so only the chain is
verified (libnbd does the same).

PSK (``tls-psk-file=FILE``, nbdkit's and libnbd's format: lines ``USERNAME:HEXKEY``)
needs ``SSLContext.set_psk_client_callback``, which Python's ssl gained in 3.13: there the
key of ``tls-username`` (else the URI's user, ``nbds://alice@host/``, else the login name,
as libnbd) is used and no certificate is involved; on older Pythons a PSK URI is refused
with an error saying so.
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import Optional

from fvd.errors import BaseImageError
from fvd.nbd_client.uri import NbdUri
from fvd.nbd_client.wire import Wire

try:
    import ssl

    SSL_ERROR: Optional[str] = None
except ImportError as e:  # nbdkit's embedded Python (fvd serve imports fvd) may not load
    ssl = None  # type: ignore[assignment]  # this interpreter's _ssl: TLS is unused there
    SSL_ERROR = str(e)


def client_context(u: NbdUri) -> ssl.SSLContext:
    """The context for u (BaseImageError naming the URI for unusable settings)."""
    if ssl is None:
        raise BaseImageError(f"{u.uri}: TLS is not available: {SSL_ERROR}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the NBD spec's floor
    try:
        if u.tls_psk_file is not None:
            _use_psk(ctx, u)
            return ctx
        _load(ctx, u)
    except (OSError, KeyError, ssl.SSLError) as e:  # KeyError: getpass without a user
        raise BaseImageError(f"{u.uri}: cannot set up TLS: {e}") from e
    if not u.tls_verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif server_hostname(u) is None:
        ctx.check_hostname = False  # the chain is still verified (CERT_REQUIRED)
    return ctx


MAX_PSK_FILE = 1 << 20


def _use_psk(ctx: ssl.SSLContext, u: NbdUri) -> None:
    if not hasattr(ctx, "set_psk_client_callback"):
        raise BaseImageError(
            f"{u.uri}: TLS with a pre-shared key (tls-psk-file) needs Python 3.13 or later "
            f"(SSLContext.set_psk_client_callback); this is Python "
            f"{sys.version_info.major}.{sys.version_info.minor}: use X.509 certificates "
            f"(tls-certificates) or a newer Python"
        )
    user = u.tls_username or u.user or getpass.getuser()
    key = _psk_key(u, user)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the key authenticates both ends
    ctx.set_ciphers("PSK")  # TLS 1.2; TLS 1.3 suites are not affected
    ctx.set_psk_client_callback(lambda _hint: (user, key))


def _psk_key(u: NbdUri, user: str) -> bytes:
    assert u.tls_psk_file is not None
    try:
        with open(u.tls_psk_file, "rb") as f:
            text = f.read(MAX_PSK_FILE).decode("utf-8", "replace")
    except OSError as e:
        raise BaseImageError(f"{u.uri}: tls-psk-file: {e}") from e
    for line in text.splitlines():
        name, _, hexkey = line.strip().partition(":")
        if name == user:
            try:
                return bytes.fromhex(hexkey)
            except ValueError:
                break
    raise BaseImageError(f"{u.uri}: tls-psk-file {u.tls_psk_file}: no valid key for {user!r}")


def _load(ctx: ssl.SSLContext, u: NbdUri) -> None:
    d = u.tls_certificates
    if d is None:
        ctx.load_default_certs()
        return
    ca = os.path.join(d, "ca-cert.pem")
    if not os.path.isfile(ca):
        raise BaseImageError(f"{u.uri}: tls-certificates: {ca} does not exist")
    ctx.load_verify_locations(cafile=ca)
    crl = os.path.join(d, "ca-crl.pem")
    if os.path.isfile(crl):
        ctx.load_verify_locations(cafile=crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    cert, key = os.path.join(d, "client-cert.pem"), os.path.join(d, "client-key.pem")
    if os.path.isfile(cert) and os.path.isfile(key):
        ctx.load_cert_chain(cert, key)


def server_hostname(u: NbdUri) -> str | None:
    if u.tls_hostname:
        return u.tls_hostname
    if u.kind == "tcp" and isinstance(u.where, tuple):
        return u.where[0]
    return None


def start(wire: Wire, u: NbdUri, ctx: ssl.SSLContext) -> None:
    """The TLS handshake on wire's socket (after NBD_OPT_STARTTLS was acknowledged),
    within the handshake's deadline; wire goes on over TLS."""
    wire.what = "TLS handshake"
    try:
        sock = ctx.wrap_socket(
            wire.sock, server_hostname=server_hostname(u), do_handshake_on_connect=False
        )
    except (OSError, ValueError) as e:
        wire.fail(f"cannot start TLS: {e}")
    wire.sock = sock
    sock.settimeout(wire.remaining())
    try:
        sock.do_handshake()
    except ssl.SSLCertVerificationError as e:
        wire.fail(f"the server's certificate is not accepted: {e.verify_message}")
    except TimeoutError:
        wire.remaining()
        wire.fail("TLS handshake timed out")
    except OSError as e:
        wire.fail(f"TLS handshake failed: {e}")
    wire.what = "handshake"
