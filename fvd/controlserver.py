"""The server side of `fvd serve`'s control channel (protocol: fvd.control, docs/nbd.md),
and the snapshot exports it shares with the NBD side.

Runs inside the nbdkit process, which holds the image: fvd.nbdkit_plugin binds the
socket at start-up (get_ready, so a bad path fails before nbdkit serves) and starts the
accept thread after nbdkit forks (after_fork). Every command calls the same `fvd.Image`
the NBD connections write through; its calls are thread-safe, and `create_snapshot` is a
point in time against writes from other threads (docs/concurrency.md), so a snapshot
taken here holds every NBD write acknowledged before the request and none sent after the
reply.

Bounds: a request line is at most MAX_REQUEST bytes (longer: an error, then the
connection is closed), at most `max_clients` connections at once (more are told so and
closed), and a connection idle for `idle_timeout` seconds is closed.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from collections import Counter
from typing import Any, Callable, Optional, TypeVar, Union

from fvd.control import (
    MAX_REQUEST,
    PROTOCOL,
    LineReader,
    encode,
    error_class,
    export_uri,
    extent_dicts,
    snapshot_dict,
)
from fvd.errors import ControlError, ServeError, SnapshotBusyError
from fvd.image import Image, SnapshotImage

MAX_CLIENTS = 8
_REQUEST_SHAPE = 'a request is {"execute": COMMAND, "arguments": {...}, "id": ANY}'
IDLE_TIMEOUT = 60.0
Reply = dict[str, Any]
T = TypeVar("T")


class Exports:
    """The NBD exports: "" (the default: the image, or the snapshot served with -l) and
    every snapshot by name, read-only. Each NBD connection to a snapshot export gets its
    own view (`open_snapshot`), so fvd refuses to delete a snapshot while one is open."""

    def __init__(self, image: Image, base_uri: Optional[str], default_read_only: bool) -> None:
        self.image = image
        self.gate = WriteGate()  # NBD writes to "" pass it; snapshot-create closes it
        self.base_uri = base_uri
        self.default_read_only = default_read_only
        self._readers: Counter[str] = Counter()
        self._lock = threading.Lock()

    def listing(self) -> list[tuple[str, str]]:
        """(name, description) of every export, for nbdkit's list_exports."""
        out = [("", f"{self.image.path} (live)")]
        out += [(s.name, f"snapshot {s.name} of {self.image.path}") for s in self.image.snapshots()]
        return out

    def describe(self) -> list[dict[str, Any]]:
        """query-exports: name, description, read-only, readers and the NBD uri."""
        return [
            {
                "name": name,
                "description": desc,
                "read-only": bool(name) or self.default_read_only,
                "readers": self.readers(name) if name else None,
                "uri": export_uri(self.base_uri, name) if self.base_uri else None,
            }
            for name, desc in self.listing()
        ]

    def open(self, name: str) -> SnapshotImage:
        view = self.image.open_snapshot(name)
        with self._lock:
            self._readers[name] += 1
        return view

    def close(self, view: SnapshotImage) -> None:
        try:
            view.close()
        finally:
            with self._lock:
                self._readers[view.name] -= 1

    def readers(self, name: str) -> int:
        with self._lock:
            return self._readers[name]


class WriteGate:
    """NBD writes pass the gate together; a snapshot create closes it: it waits for the
    writes inside to leave and holds new ones at the gate until the snapshot is taken.
    So a write is entirely before or entirely after the snapshot, even one that spans
    chunks (fvd's own point in time is per block)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inside = 0
        self._closed = False

    def enter(self) -> None:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._inside += 1

    def leave(self) -> None:
        with self._cond:
            self._inside -= 1
            if self._inside == 0 and self._closed:
                self._cond.notify_all()

    def run_closed(self, fn: Callable[[], T]) -> T:
        """fn() with no write inside and none let in; one closer at a time."""
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._closed = True
            while self._inside:
                self._cond.wait()
        try:
            return fn()
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


# command -> (method name, {argument: (type, required)})
Args = dict[str, tuple[Union[type, tuple[type, ...]], bool]]
COMMANDS: dict[str, tuple[str, Args]] = {
    "query-commands": ("_query_commands", {}),
    "query-info": ("_query_info", {}),
    "query-snapshots": ("_query_snapshots", {}),
    "query-exports": ("_query_exports", {}),
    "snapshot-create": ("_snapshot_create", {"name": (str, True)}),
    "snapshot-delete": ("_snapshot_delete", {"name": (str, True)}),
    "changed-extents": ("_changed_extents", {"since": (str, True), "until": (str, False)}),
    "checksum": (
        "_checksum",
        {"snapshot": (str, False), "block-size": (int, False), "algorithm": (str, False)},
    ),
    "check": ("_check", {}),
    "flush": ("_flush", {}),
    "stop": ("_stop", {}),
}


class ControlServer:
    """The control socket of one served image."""

    def __init__(
        self,
        path: str,
        image: Image,
        exports: Exports,
        *,
        read_only: bool,
        stop: Callable[[], None],
        max_clients: int = MAX_CLIENTS,
        idle_timeout: float = IDLE_TIMEOUT,
        max_request: int = MAX_REQUEST,
    ) -> None:
        self.path = os.path.abspath(path)
        self.image = image
        self.exports = exports
        self.read_only = read_only
        self._on_stop = stop
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.max_request = max_request
        self._slots = threading.BoundedSemaphore(max_clients)
        self._listener: Optional[socket.socket] = None
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()

    # ----- the socket -----------------------------------------------------------------
    def bind(self) -> None:
        """Listen at self.path (0600). A stale socket (nobody listening) is replaced; a
        live one or any other file is an error."""
        _remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # before listen(): nobody can connect while the mode is still the umask's
            os.chmod(self.path, 0o600)
            sock.listen(self.max_clients)
        except OSError as e:
            sock.close()
            raise ServeError(f"{self.path}: cannot open the control socket: {e.strerror}") from e
        self._listener = sock

    def start(self) -> None:
        """Accept connections on a daemon thread."""
        threading.Thread(target=self._accept_loop, name="fvd-control", daemon=True).start()

    def close(self) -> None:
        """Stop accepting, drop the connections, remove the socket file."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        except OSError:
            pass
        listener.close()
        with self._lock:
            for c in self._clients:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                _refuse(conn, f"at most {self.max_clients} control connections at once")
                continue
            threading.Thread(
                target=self._serve_client, args=(conn,), name="fvd-control-client", daemon=True
            ).start()

    def _serve_client(self, conn: socket.socket) -> None:
        with self._lock:
            self._clients.add(conn)
        try:
            conn.settimeout(self.idle_timeout)
            conn.sendall(encode(self.greeting()))
            reader = LineReader(conn, self.max_request)
            while True:
                try:
                    line = reader.readline()
                except ControlError as e:  # too large or cut: the stream cannot resync
                    conn.sendall(encode(_error_reply(e)))
                    return
                if line is None:
                    return
                reply, after = self.handle(line)
                conn.sendall(encode(reply))
                if after is not None:
                    after()
        except OSError:  # timeout, reset, or close() shutting it down
            return
        finally:
            with self._lock:
                self._clients.discard(conn)
            conn.close()
            self._slots.release()

    def greeting(self) -> Reply:
        return {
            "fvd": {
                "protocol": PROTOCOL,
                "image": self.image.path,
                "read-only": self.read_only,
                "commands": sorted(COMMANDS),
            }
        }

    # ----- requests -------------------------------------------------------------------
    def handle(self, line: bytes) -> tuple[Reply, Optional[Callable[[], None]]]:
        """The reply to one request line, and what to run after sending it (stop)."""
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
            return _error_reply(ControlError("ParseError", f"request is not JSON: {e}")), None
        if not isinstance(request, dict):
            return _error_reply(ControlError("InvalidRequest", _REQUEST_SHAPE)), None
        try:
            method, kwargs = self._parse(request)
            result = getattr(self, method)(**kwargs)
        except Exception as e:  # every failure is a reply; the connection stays usable
            reply = _error_reply(e)
        else:
            reply = {"return": {} if result is None else result}
        if "id" in request:
            reply["id"] = request["id"]
        after = self._on_stop if "return" in reply and request["execute"] == "stop" else None
        return reply, after

    def _parse(self, request: object) -> tuple[str, dict[str, Any]]:
        if not isinstance(request, dict) or not isinstance(request.get("execute"), str):
            raise ControlError("InvalidRequest", _REQUEST_SHAPE)
        extra = set(request) - {"execute", "arguments", "id"}
        if extra:
            raise ControlError("InvalidRequest", f"unknown request key(s): {', '.join(extra)}")
        name = request["execute"]
        if name not in COMMANDS:
            raise ControlError("CommandNotFound", f"the command {name!r} has not been found")
        method, spec = COMMANDS[name]
        args = request.get("arguments", {})
        if not isinstance(args, dict):
            raise ControlError("InvalidArgument", f"{name}: arguments must be an object")
        return method, _check_arguments(name, spec, args)

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise ControlError("ReadOnly", f"{self.image.path}: served read-only: cannot {what}")

    # ----- commands ---------------------------------------------------------------------
    def _query_commands(self) -> list[dict[str, str]]:
        return [{"name": name} for name in sorted(COMMANDS)]

    def _query_info(self) -> dict[str, Any]:
        return self.image.info()

    def _query_snapshots(self) -> list[dict[str, Any]]:
        return [snapshot_dict(s) for s in self.image.snapshots()]

    def _query_exports(self) -> list[dict[str, Any]]:
        return self.exports.describe()

    def _snapshot_create(self, name: str) -> dict[str, Any]:
        self._writable("create a snapshot")
        info = self.exports.gate.run_closed(lambda: self.image.create_snapshot(name))
        return snapshot_dict(info)

    def _snapshot_delete(self, name: str) -> None:
        self._writable("delete a snapshot")
        if self.exports.readers(name):
            raise self._busy(name)
        try:
            self.image.delete_snapshot(name)
        except SnapshotBusyError:  # a reader came meanwhile, or a checksum reads it
            raise self._busy(name) from None

    def _busy(self, name: str) -> SnapshotBusyError:
        readers = self.exports.readers(name)
        who = f"{readers} NBD connection(s) read its export" if readers else "a checksum reads it"
        return SnapshotBusyError(
            f"{self.image.path}: snapshot {name!r} is in use ({who}): "
            f"it can be deleted once they disconnect"
        )

    def _changed_extents(self, since: str, until: Optional[str] = None) -> list[dict[str, Any]]:
        return extent_dicts(self.image.changed_extents(since, until))

    def _checksum(
        self,
        snapshot: Optional[str] = None,
        block_size: int = 4 << 20,
        algorithm: str = "blake2b",
    ) -> dict[str, Any]:
        if snapshot is None:
            return self.image.checksum(block_size, algorithm)
        with self.image.open_snapshot(snapshot) as view:
            return view.checksum(block_size, algorithm)

    def _check(self) -> dict[str, Any]:
        return self.image.check(False).as_dict()

    def _flush(self) -> None:
        self.image.flush()

    def _stop(self) -> None:
        return None  # the reply goes out first, then handle() runs the stop callback


def _check_arguments(name: str, spec: Args, args: dict[str, Any]) -> dict[str, Any]:
    """Arguments as keyword arguments of the command's method ("block-size" ->
    block_size), checked against its spec."""
    unknown = sorted(set(args) - set(spec))
    if unknown:
        raise ControlError("InvalidArgument", f"{name}: unknown argument(s): {', '.join(unknown)}")
    out = {}
    for key, (kind, required) in spec.items():
        if key not in args:
            if required:
                raise ControlError("InvalidArgument", f"{name}: the argument {key!r} is missing")
            continue
        value = args[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ControlError(
                "InvalidArgument", f"{name}: {key!r} must be a {_type_name(kind)}, not {value!r}"
            )
        out[key.replace("-", "_")] = value
    return out


def _type_name(kind: Union[type, tuple[type, ...]]) -> str:
    return "string" if kind is str else "integer"


def _error_reply(error: BaseException) -> Reply:
    desc = str(error) or type(error).__name__
    if isinstance(error, KeyError) and not isinstance(error, ControlError) and error.args:
        desc = str(error.args[0])
    return {"error": {"class": error_class(error), "desc": desc.splitlines()[0]}}


def _refuse(conn: socket.socket, why: str) -> None:
    try:
        conn.settimeout(1.0)
        conn.sendall(encode(_error_reply(ControlError("TooManyClients", why))))
    except OSError:
        pass
    finally:
        conn.close()


def _remove_stale(path: str) -> None:
    """Unlink a socket nobody listens on; refuse a live one or another kind of file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ServeError(f"{path}: exists and is not a socket: not replacing it")
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except OSError:
            return
    raise ServeError(f"{path}: another server listens on this control socket")
