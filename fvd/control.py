"""The control channel of `fvd serve`: its wire protocol, the client (`fvd.connect`),
and finding the server that holds an image.

Protocol 1 (docs/nbd.md, "The control protocol"), shaped after QEMU's QMP: a unix
socket (0600, never TCP); on connect the server sends one greeting line
``{"fvd": {"version": ..., "protocol": 1, "image": ..., "read-only": ...}}``; then each
request is one line of JSON ``{"execute": COMMAND, "arguments": {...}, "id": ANY}``
and gets one reply line ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``
(with the request's "id" echoed when it had one). Requests are at most MAX_REQUEST bytes;
replies at most MAX_REPLY.

The server side lives in fvd.controlserver (run inside nbdkit by fvd.nbdkit_plugin).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Optional
from urllib.parse import quote

from fvd.errors import (
    ControlError,
    CorruptImageError,
    FvdError,
    ImageIOError,
    ReadOnlyImageError,
    SnapshotBusyError,
    SnapshotNotFoundError,
)
from fvd.nbd_client import NbdClient, parse_uri
from fvd.types import CheckResult, Closing, Extent, SnapshotInfo, StrPath
from fvd.units import KiB, MiB

PROTOCOL = 1
SUFFIX = ".ctl"  # default control socket: IMAGE.ctl beside the image
MAX_REQUEST = 64 * KiB
MAX_REPLY = 256 * MiB  # changed extents of a very fragmented image fit
CONNECT_TIMEOUT = 30.0  # connect and greeting
SLOT_WAIT = 5.0  # connect() retries a server that is at its client limit this long
REPLY_TIMEOUT = 3600.0  # a checksum of a large image takes a while

# Error classes a server sends, and the exception the client raises for each; any other
# class raises ControlError (its `error_class` says which).
ERROR_TYPES: dict[str, type[FvdError]] = {
    "SnapshotNotFound": SnapshotNotFoundError,
    "SnapshotBusy": SnapshotBusyError,
    "CorruptImage": CorruptImageError,
}


def default_control_path(image: StrPath) -> str:
    """IMAGE.ctl, the control socket `fvd serve` opens beside a read-write image."""
    return os.path.abspath(os.fspath(image)) + SUFFIX


def error_class(error: BaseException) -> str:
    """The protocol's class of an exception raised by a command."""
    if isinstance(error, SnapshotNotFoundError):
        return "SnapshotNotFound"
    if isinstance(error, SnapshotBusyError):
        return "SnapshotBusy"
    if isinstance(error, CorruptImageError):
        return "CorruptImage"
    if isinstance(error, ReadOnlyImageError):
        return "ReadOnly"
    if isinstance(error, ControlError):
        return error.error_class
    if isinstance(error, (ImageIOError, OSError)):
        return "IOError"
    if isinstance(error, FvdError):
        return "ImageError"
    if isinstance(error, (ValueError, TypeError, KeyError)):
        return "InvalidArgument"
    return "InternalError"


def encode(message: object) -> bytes:
    """One protocol line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LineReader:
    """Newline-delimited messages from a socket, each at most `limit` bytes."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock, self.limit = sock, limit
        self.buf = bytearray()

    def readline(self) -> Optional[bytes]:
        """The next line without its newline; None at a clean end of stream. Raises
        ControlError("RequestTooLarge") when a line exceeds the limit."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                if end > self.limit:
                    break
                line = bytes(self.buf[:end])
                del self.buf[: end + 1]
                return line
            if len(self.buf) > self.limit:
                break
            chunk = self.sock.recv(64 * KiB)
            if not chunk:
                if self.buf:
                    raise ControlError("InvalidRequest", "connection closed inside a message")
                return None
            self.buf += chunk
        raise ControlError("RequestTooLarge", f"message longer than {self.limit} bytes")


def export_uri(base_uri: str, name: str) -> str:
    """The NBD URI of export `name` on the server whose default export is `base_uri`."""
    uri = parse_uri(base_uri)
    scheme = "nbds" if uri.tls else "nbd"
    path = quote(name, safe="")
    if uri.kind == "unix":
        return f"{scheme}+unix:///{path}?socket={quote(str(uri.where), safe='/')}"
    assert isinstance(uri.where, tuple)  # tcp: (host, port)
    host, port = uri.where
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}/{path}"


def is_live_socket(path: str) -> bool:
    """Something listens on the unix socket at `path`."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(CONNECT_TIMEOUT)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def find_server(image: StrPath) -> Optional[str]:
    """The control socket of a live `fvd serve` of `image` (IMAGE.ctl), or None."""
    path = default_control_path(image)
    return path if is_live_socket(path) else None


def connect(image_or_socket: StrPath, *, timeout: float = REPLY_TIMEOUT) -> ControlClient:
    """A client of the `fvd serve` holding an image: give the image (its control socket
    IMAGE.ctl is used) or the control socket itself (`fvd serve --control PATH`)."""
    path = os.path.abspath(os.fspath(image_or_socket))
    try:
        is_sock = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        is_sock = False
    sock_path = path if is_sock else default_control_path(path)
    deadline = time.monotonic() + SLOT_WAIT
    while True:
        try:
            return ControlClient(sock_path, timeout=timeout)
        except ControlError as e:
            # a slot frees as soon as the server sees another client hang up
            if e.error_class != "TooManyClients" or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


class ControlClient(Closing):
    """One connection to a server's control socket. Calls are serialised (one request,
    one reply), so a client may be shared by threads."""

    def __init__(self, path: str, *, timeout: float = REPLY_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(CONNECT_TIMEOUT)
        try:
            self._sock.connect(path)
            self._reader = LineReader(self._sock, MAX_REPLY)
            first = self._receive()
        except OSError as e:
            self._sock.close()
            raise ControlError(
                "NoServer", f"{path}: cannot reach an fvd serve control socket: {e.strerror or e}"
            ) from None
        except BaseException:
            self._sock.close()
            raise
        greeting = first.get("fvd")
        if not isinstance(greeting, dict) or greeting.get("protocol") != PROTOCOL:
            self._sock.close()
            if isinstance(first.get("error"), dict):  # refused, e.g. TooManyClients
                raise _error(first["error"])
            raise ControlError(
                "ProtocolError", f"{path}: not an fvd control socket of protocol {PROTOCOL}"
            )
        self.greeting: dict[str, Any] = greeting
        self.image: str = str(greeting.get("image", ""))
        self._sock.settimeout(timeout)
        self._next_id = 0

    def _receive(self) -> dict[str, Any]:
        line = self._reader.readline()
        if line is None:
            raise ControlError("Disconnected", f"{self.path}: the server closed the connection")
        try:
            message = json.loads(line)
        except ValueError:
            raise ControlError("ProtocolError", f"{self.path}: a reply is not JSON") from None
        if not isinstance(message, dict):
            raise ControlError("ProtocolError", f"{self.path}: a reply is not an object")
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run `command` on the server; its "return" value, or the error raised."""
        with self._lock:
            self._next_id += 1
            request = {"execute": command, "arguments": arguments, "id": self._next_id}
            try:
                self._sock.sendall(encode(request))
                reply = self._receive()
            except OSError as e:
                raise ControlError(
                    "Disconnected", f"{self.path}: {command}: {e.strerror or e}"
                ) from None
        if "error" in reply:
            raise _error(reply["error"])
        if reply.get("id") != request["id"] or "return" not in reply:
            raise ControlError("ProtocolError", f"{self.path}: {command}: unexpected reply")
        return reply["return"]

    # ----- the calls of fvd.Image ------------------------------------------------------
    def create_snapshot(self, name: str) -> SnapshotInfo:
        return snapshot_info(self.execute("snapshot-create", name=name))

    def delete_snapshot(self, name: str) -> None:
        self.execute("snapshot-delete", name=name)

    def snapshots(self) -> list[SnapshotInfo]:
        return [snapshot_info(d) for d in self.execute("query-snapshots")]

    def changed_extents(self, since: str, until: Optional[str] = None) -> list[Extent]:
        args = {"since": since} if until is None else {"since": since, "until": until}
        return [changed_extent(d) for d in self.execute("changed-extents", **args)]

    def checksum(
        self,
        snapshot: Optional[str] = None,
        block_size: int = 4 * MiB,
        algorithm: str = "blake2b",
    ) -> dict[str, Any]:
        """ovirt-imageio's checksum of the live image or of `snapshot`."""
        args: dict[str, Any] = {"block-size": block_size, "algorithm": algorithm}
        if snapshot is not None:
            args["snapshot"] = snapshot
        result: dict[str, Any] = self.execute("checksum", **args)
        return result

    def info(self) -> dict[str, Any]:
        """`fvd info --output=json` of the served image."""
        result: dict[str, Any] = self.execute("query-info")
        return result

    @property
    def uuid(self) -> Optional[str]:
        """The served image's UUID (as `Image.uuid`), from its info."""
        data = self.info().get("format-specific", {}).get("data", {})
        uuid = data.get("uuid")
        return None if uuid is None else str(uuid)

    def check(self) -> CheckResult:
        """A read-only check of the served image."""
        r = self.execute("check")
        return CheckResult(
            corruptions=int(r["corruptions"]), leaks=int(r["leaks"]), messages=list(r["messages"])
        )

    def flush(self) -> None:
        self.execute("flush")

    def exports(self) -> list[dict[str, Any]]:
        """The server's NBD exports: name, description, read-only, uri (when known)."""
        result: list[dict[str, Any]] = self.execute("query-exports")
        return result

    def open_export(self, name: str) -> RemoteDisk:
        """A reader (size, readinto, extents) of NBD export `name` of this server."""
        for e in self.exports():
            if e["name"] == name:
                if not e.get("uri"):
                    raise ControlError(
                        "NoExportUri",
                        f"{self.path}: the server does not know its NBD address "
                        f"(run it with fvd serve, or pass uri= to the plugin)",
                    )
                return RemoteDisk(NbdClient(str(e["uri"])), self.image)
        raise SnapshotNotFoundError(f"{self.image}: no export {name!r}")

    def stop(self) -> None:
        """Ask the server to exit (as SIGTERM would)."""
        self.execute("stop")

    def close(self) -> None:
        self._sock.close()


def _error(error: object) -> FvdError:
    if not isinstance(error, dict):
        return ControlError("ProtocolError", "malformed error reply")
    cls, desc = str(error.get("class", "")), str(error.get("desc", ""))
    exc_type = ERROR_TYPES.get(cls)
    if exc_type is CorruptImageError:
        return CorruptImageError(desc, None, "reported by the server")
    if exc_type is not None:
        return exc_type(desc)
    return ControlError(cls, desc)


def snapshot_dict(info: SnapshotInfo) -> dict[str, Any]:
    """A snapshot on the wire: name, id, created (ISO 8601), size, vm-state-size, uuid
    (the snapshot's identity, null for an image without a UUID)."""
    return {
        "name": info.name,
        "id": info.id,
        "created": info.created.isoformat(),
        "size": info.size,
        "vm-state-size": info.vm_state_size,
        "uuid": info.uuid,
    }


def snapshot_info(d: dict[str, Any]) -> SnapshotInfo:
    created = datetime.fromisoformat(d["created"])
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    uuid = d.get("uuid")
    return SnapshotInfo(
        d["name"],
        d["id"],
        created,
        int(d["size"]),
        int(d["vm-state-size"]),
        uuid=None if uuid is None else str(uuid),
    )


def changed_extent(d: dict[str, Any]) -> Extent:
    zero = bool(d["zero"])
    return Extent(int(d["start"]), int(d["length"]), 0, True, zero, not zero, None)


class RemoteDisk(Closing):
    """A read-only disk over an NBD export (a snapshot export of `fvd serve`): what
    `fvd.convert` copies from (size, readinto, extents, close)."""

    read_only = True

    def __init__(self, client: NbdClient, path: str) -> None:
        self._client = client
        self.path = path
        self.size: int = client.size
        self.uri = client.uri

    def readinto(self, offset: int, buffer: Any) -> int:
        return self._client.readinto(offset, buffer)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        """base:allocation of the export as extents (data, zero; depth 0)."""
        if length is None:
            length = self.size - offset
        for start, n, zero, data in self._client.extents(offset, length):
            yield Extent(start, n, 0, data, zero, data, None)

    def close(self) -> None:
        self._client.close()


def extent_dicts(extents: Iterable[Extent]) -> list[dict[str, Any]]:
    """Changed extents on the wire: start, length, zero (data is the rest)."""
    return [
        {"start": e.start, "length": e.length, "zero": bool(e.zero) and not e.data} for e in extents
    ]
