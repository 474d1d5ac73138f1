"""nbdkit Python plugin serving an FVD (or qcow2) image over NBD.

    nbdkit python /path/to/fvd/nbdkit_plugin.py file=IMAGE [snapshot=NAME] [readonly=true]
        [force_share=true] [format=fvd|qcow2] [backing=any|same-dir|none]
        [pythonpath=DIR:DIR...] [control=PATH|none] [uri=NBD-URI]

`fvd serve` builds this command line. nbdkit embeds its own Python (Debian's
/usr/bin/python3), not the interpreter fvd was installed into, so `fvd` and its
dependencies (numpy, construct) must be put on that interpreter's sys.path: the package's
own parent directory is added automatically, anything else comes from `pythonpath=` (or the
environment variable FVD_NBDKIT_PYTHONPATH), prepended to sys.path before fvd is imported.

One image handle per nbdkit process, opened in get_ready (so a locked image fails at
start-up, before the socket exists) and shared by every connection: fvd.Image calls are
safe from any thread, so the plugin uses nbdkit's parallel thread model. A qcow2 image
(fvd.qcow2 makes no such promise) is served with its calls serialised by a lock.

Exports (fvd images): "" is the image (or the snapshot given with snapshot=); every
snapshot is also a read-only export of its own name, with one view per connection.
The control socket (fvd.controlserver) lives in this process: `control=PATH`, by default
IMAGE.ctl for a read-write fvd image (`control=none`: no socket). It is bound in
get_ready and served by a thread started in after_fork (threads do not survive nbdkit's
fork into the background). `uri=` is the NBD URI of the default export, which the
control channel reports so clients can find the snapshot exports.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, TypeVar, Union

import nbdkit

if TYPE_CHECKING:  # fvd itself is imported in get_ready, once sys.path holds it
    from fvd.controlserver import ControlServer, Exports
    from fvd.image import Image, SnapshotImage
    from fvd.qcow2.image import Qcow2Image

    Served = Union[Image, SnapshotImage, Qcow2Image]

API_VERSION = 2
T = TypeVar("T")
Extent = tuple[int, int, int]  # (start, length, nbdkit extent type)


@dataclass
class _Params:
    """The plugin's key=value parameters (see the module doc)."""

    file: Optional[str] = None
    snapshot: Optional[str] = None
    readonly: bool = False
    force_share: bool = False
    format: str = "fvd"
    backing: str = "any"
    control: Optional[str] = "default"  # a path, "default" (IMAGE.ctl) or None
    uri: Optional[str] = None


@dataclass
class _State:
    image: Optional[Served] = None  # what the default export serves
    parent: Optional[Image] = None  # the image, when image is one of its snapshots
    lock: Optional[threading.Lock] = None  # serialises qcow2 calls
    exports: Optional[Exports] = None
    control: Optional[ControlServer] = None


_params = _Params()
_state = _State()
# Writes completed, and how many of them the last completed flush covered (QEMU's
# write_gen / flushed_gen): a flush with nothing new to make durable returns at once.
# QEMU's NBD client follows each O_DSYNC write with two flushes; the second one would
# otherwise cost an fdatasync for nothing (qemu-nbd skips it the same way).
_gen = {"written": 0, "flushed": 0}
_gen_lock = threading.Lock()


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _extend_path(paths: str) -> None:
    for p in reversed([p for p in paths.split(os.pathsep) if p]):
        if p not in sys.path:
            sys.path.insert(0, p)


# The package this file belongs to, then whatever the launcher asked for.
_extend_path(os.environ.get("FVD_NBDKIT_PYTHONPATH", ""))
_extend_path(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(key: str, value: str) -> None:
    if key == "file":
        _params.file = os.path.abspath(value)
    elif key == "snapshot":
        _params.snapshot = value
    elif key == "readonly":
        _params.readonly = _truthy(value)
    elif key == "force_share":
        _params.force_share = _truthy(value)
    elif key == "format":
        if value not in ("fvd", "qcow2"):
            raise ValueError(f"format must be fvd or qcow2, not {value!r}")
        _params.format = value
    elif key == "backing":
        if value not in ("any", "same-dir", "none"):
            raise ValueError(f"backing must be any, same-dir or none, not {value!r}")
        _params.backing = value
    elif key == "pythonpath":
        _extend_path(value)
    elif key == "control":
        _params.control = None if value in ("", "none") else os.path.abspath(value)
    elif key == "uri":
        _params.uri = value
    else:
        raise ValueError(
            f"unknown parameter {key!r} (file, snapshot, readonly, force_share, format, "
            f"backing, pythonpath, control, uri)"
        )


def config_complete() -> None:
    if not _params.file:
        raise ValueError("file=IMAGE is required")
    if _params.snapshot is not None:
        _params.readonly = True  # a snapshot is read-only by nature
    if _params.control == "default" and _params.format != "fvd":
        _params.control = None
    if _params.control is not None and _params.format != "fvd":
        raise ValueError("control= needs an fvd image (format=fvd)")


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def get_ready() -> None:
    try:
        import fvd
    except ImportError as e:
        raise RuntimeError(
            f"cannot import fvd in nbdkit's Python {sys.version.split()[0]} "
            f"({e}); pass pythonpath=DIR with fvd, numpy and construct"
        ) from e
    path = _params.file
    assert path is not None  # config_complete
    mode = "r" if _params.readonly else "r+"
    if _params.format == "qcow2":
        from fvd import qcow2

        _state.image = qcow2.open(path, mode, backing=_params.backing)
        _state.lock = threading.Lock()
        return
    img = fvd.open(
        path,
        mode,
        force_share=_params.force_share and mode == "r",
        backing=_params.backing,
    )
    _state.image = img
    if _params.snapshot is not None:
        _state.parent = img
        _state.image = img.open_snapshot(_params.snapshot)
    _start_exports(img)
    nbdkit.debug(f"fvd: serving {path} ({mode}, {fvd.IMPLEMENTATION})")


def _start_exports(img: Image) -> None:
    """The snapshot exports, and the control socket when asked for (bound now, so a bad
    path fails before nbdkit serves; its thread starts in after_fork)."""
    from fvd import controlserver
    from fvd.control import default_control_path

    exports = controlserver.Exports(img, _params.uri, _params.readonly)
    _state.exports = exports
    path = _params.control
    if path == "default":  # IMAGE.ctl when writable: what `fvd snapshot` and friends look for
        assert _params.file is not None  # config_complete
        path = None if _params.readonly else default_control_path(_params.file)
    if path is not None:
        server = controlserver.ControlServer(
            path, img, exports, read_only=_params.readonly, stop=nbdkit.shutdown
        )
        server.bind()
        _state.control = server


def after_fork() -> None:
    if _state.control is not None:
        _state.control.start()


def cleanup() -> None:
    server = _state.control
    _state.control = None
    if server is not None:
        server.close()
    image, parent = _state.image, _state.parent
    _state.image = _state.parent = None
    for img in (image, parent):
        if img is not None:
            img.close()


# ----- per connection --------------------------------------------------------------------
class _Handle:
    __slots__ = ("readonly", "image", "view")

    def __init__(self, readonly: bool, image: Served, view: Optional[SnapshotImage] = None) -> None:
        self.readonly = readonly
        self.image = image
        self.view = view  # a snapshot export's own view, closed with the connection


def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    exports = _state.exports
    if exports is None:
        return [("", _params.file or "")]
    return exports.listing()


def default_export(readonly: bool, is_tls: bool) -> str:
    return ""


def open(readonly: bool) -> _Handle:
    name = nbdkit.export_name()
    if not name:
        assert _state.image is not None  # get_ready
        return _Handle(readonly or _params.readonly, _state.image)
    exports = _state.exports
    if exports is None:
        nbdkit.set_error(errno.ENOENT)
        raise KeyError(f"no export {name!r}: only fvd images export their snapshots")
    try:
        view = exports.open(name)
    except KeyError:
        nbdkit.set_error(errno.ENOENT)
        raise
    return _Handle(True, view, view)


def close(h: _Handle) -> None:
    if h.view is not None and _state.exports is not None:
        _state.exports.close(h.view)


def _call(fn: Callable[..., T], *args: object) -> T:
    """Run fn(*args), serialised for images without a thread contract (qcow2)."""
    lock = _state.lock
    try:
        if lock is None:
            return fn(*args)
        with lock:
            return fn(*args)
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise
    except ValueError:
        nbdkit.set_error(errno.EINVAL)
        raise


def get_size(h: _Handle) -> int:
    return h.image.size


def can_write(h: _Handle) -> bool:
    return not h.readonly


def can_flush(h: _Handle) -> bool:
    return True


def can_trim(h: _Handle) -> bool:
    return not h.readonly


def can_zero(h: _Handle) -> bool:
    return not h.readonly


def can_fast_zero(h: _Handle) -> bool:
    return not h.readonly and _params.format == "fvd"


def can_fua(h: _Handle) -> int:
    return int(nbdkit.FUA_EMULATE)  # nbdkit follows a FUA write with flush()


def can_extents(h: _Handle) -> bool:
    return True


def can_multi_conn(h: _Handle) -> bool:
    # Every connection shares one image handle, so a flush on any connection makes every
    # completed write durable and all connections see the same bytes: safe for read-only
    # and read-write exports alike.
    return True


def can_cache(h: _Handle) -> int:
    return int(nbdkit.CACHE_NONE)


def block_size(h: _Handle) -> tuple[int, int, int]:
    return (1, 4096, 32 << 20)  # any alignment works; 4 KiB avoids read-modify-write


def pread(h: _Handle, buf: memoryview, offset: int, flags: int) -> None:
    _call(h.image.readinto, offset, buf)


def _gated(fn: Callable[..., T], *args: object) -> T:
    """A write through the gate of fvd.controlserver.WriteGate: entirely before or
    entirely after a snapshot taken through the control socket."""
    exports = _state.exports
    if exports is None:
        return _call(fn, *args)
    gate = exports.gate
    gate.enter()
    try:
        return _call(fn, *args)
    finally:
        gate.leave()


def _wrote() -> None:
    """Counted after the call, before nbdkit replies, even when it failed part way."""
    with _gen_lock:
        _gen["written"] += 1


def pwrite(h: _Handle, buf: memoryview, offset: int, flags: int) -> None:
    try:
        _gated(h.image.write, offset, buf)
    finally:
        _wrote()


def flush(h: _Handle, flags: int) -> None:
    image_flush: Optional[Callable[[], None]] = getattr(h.image, "flush", None)
    if image_flush is None:  # a snapshot view never changes: nothing to flush
        return
    with _gen_lock:
        seen = _gen["written"]
        if seen == _gen["flushed"]:
            return  # every completed write is durable already
    _call(image_flush)
    with _gen_lock:
        _gen["flushed"] = max(_gen["flushed"], seen)


def _zeroes(img: Served) -> Callable[[int, int], None]:
    """The image's write_zeroes (a snapshot view has none: nbdkit never zeroes one, its
    export is read-only)."""
    zeroes: Optional[Callable[[int, int], None]] = getattr(img, "write_zeroes", None)
    if zeroes is None:
        nbdkit.set_error(errno.EROFS)
        raise OSError(errno.EROFS, "a snapshot export is read-only")
    return zeroes


def zero(h: _Handle, count: int, offset: int, flags: int) -> None:
    img = h.image
    if flags & nbdkit.FLAG_FAST_ZERO and not _fast_zero_possible(img, offset, count):
        nbdkit.set_error(errno.ENOTSUP)
        raise OSError(errno.ENOTSUP, "zeroing this range would write data")
    try:
        _gated(_zeroes(img), offset, count)
    finally:
        _wrote()


def _fast_zero_possible(img: Served, offset: int, count: int) -> bool:
    """Whole chunks are unmapped (no data written); a partial chunk is fast only when it
    holds nothing yet (see Image.write_zeroes)."""
    cs: Optional[int] = getattr(img, "chunk_size", None)
    if cs is None:
        return False
    end = offset + count
    head_end = min(end, -(-offset // cs) * cs)
    tail_start = max(head_end, end // cs * cs)
    return not any(
        stop > start and _chunk_has_content(img, start // cs * cs, cs)
        for start, stop in ((offset, head_end), (tail_start, end))
    )


def _chunk_has_content(img: Served, start: int, cs: int) -> bool:
    """Anything but zeros may be in the chunk at `start` (mapped, or read from a base)."""
    return any(e.data for e in img.extents(start, min(cs, img.size - start)))


def trim(h: _Handle, count: int, offset: int, flags: int) -> None:
    # Trimmed bytes may read as anything: unmap the whole chunks inside, leave the rest.
    img = h.image
    cs: int = getattr(img, "chunk_size", 0) or getattr(img, "cluster_size", 65536)
    start, end = -(-offset // cs) * cs, (offset + count) // cs * cs
    if end > start:
        try:
            _gated(_zeroes(img), start, end - start)
        finally:
            _wrote()


def extents(h: _Handle, count: int, offset: int, flags: int) -> list[Extent]:
    """base:allocation: a hole is not data in the image (or its base); zero reads zeros."""
    img = h.image
    out: list[Extent] = []
    for e in _call(lambda: list(img.extents(offset, count))):
        kind = (0 if e.data else nbdkit.EXTENT_HOLE) | (nbdkit.EXTENT_ZERO if e.zero else 0)
        if out and out[-1][2] == kind:
            out[-1] = (out[-1][0], out[-1][1] + e.length, kind)
        else:
            out.append((e.start, e.length, kind))
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return out
