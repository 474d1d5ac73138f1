"""TLS for nbds:// URIs: an ssl.SSLContext built from the URI's libnbd-style parameters.

``tls-certificates=DIR`` names a directory laid out as nbdkit and libnbd expect it:
``ca-cert.pem`` (the CA the server's certificate must chain to; required in DIR),
``client-cert.pem`` + ``client-key.pem`` (a client certificate, sent when both exist) and
``ca-crl.pem`` (optional revocation list). Without it the system's CA store is used, as
libnbd does. ``tls-verify-peer=0`` skips verification (a warning in the docs, as in
libnbd). The server's name is checked against ``tls-hostname``, else the URI's host; a
unix socket URI without ``tls-hostname`` has no name to check, so only the chain is
verified (libnbd does the same).

PSK (``tls-psk-file``) needs ``SSLContext.set_psk_client_callback``, which Python's ssl
gained in 3.13; this client refuses PSK with a clear error instead of half supporting it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fvd.errors import BaseImageError
from fvd.nbd_client.uri import NbdUri

if TYPE_CHECKING:  # ssl is imported when TLS is used: nbdkit's embedded Python may lack it
    import ssl


def client_context(u: NbdUri) -> ssl.SSLContext:
    """The context for u (BaseImageError naming the URI for unusable settings)."""
    import ssl

    if u.tls_psk_file is not None or u.tls_username is not None:
        raise BaseImageError(
            f"{u.uri}: TLS with a pre-shared key (tls-psk-file) is not supported by fvd's NBD "
            f"client: Python's ssl module has no PSK client support before 3.13 "
            f"(SSLContext.set_psk_client_callback); use X.509 certificates (tls-certificates)"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the NBD spec's floor
    try:
        _load(ctx, u)
    except (OSError, ssl.SSLError) as e:
        raise BaseImageError(f"{u.uri}: cannot load TLS certificates: {e}") from e
    if not u.tls_verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif server_hostname(u) is None:
        ctx.check_hostname = False  # the chain is still verified (CERT_REQUIRED)
    return ctx


def _load(ctx: ssl.SSLContext, u: NbdUri) -> None:
    import ssl

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
