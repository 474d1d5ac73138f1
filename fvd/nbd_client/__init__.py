"""A small NBD client: what a base image on another machine needs, nothing more.

Why our own: libnbd's Python binding (Debian python3-libnbd) is built for the system
interpreter only and cannot be imported from the Python fvd runs on (nor pip-installed);
a read-only base needs a few hundred lines of protocol, tested against nbdkit and qemu-nbd
and against a scripted hostile server (tests/nbd_hostile.py).

Protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md), modules:

* ``uri``: ``nbd://``, ``nbds://``, ``nbd+unix://``, ``nbds+unix://`` URIs, their TLS
  parameters (libnbd's names) and fvd's deadline parameters.
* ``handshake``: fixed newstyle, STARTTLS (``tls``), structured replies, base:allocation,
  NBD_OPT_GO (NBD_OPT_EXPORT_NAME fallback), every option reply bounded.
* ``wire``: a socket whose every operation has an overall deadline.
* ``replies``: read and block status replies checked against what the protocol allows.
* ``connection`` / ``pool``: one connection; NbdClient, the thread-safe pool.

The server is not trusted: every length it sends is bounded before anything is
allocated, every reply that is not exactly what the protocol allows for the request
raises BaseImageError (and its connection is dropped), and every request ends within its
deadline (docs/nbd.md, "Deadlines and bounds").
"""

from fvd.nbd_client.pool import NbdClient
from fvd.nbd_client.uri import NbdUri, is_nbd_uri, parse_uri

__all__ = ["NbdClient", "NbdUri", "is_nbd_uri", "parse_uri"]
