"""`fvd convert`: copy a disk image between fvd, qcow2 and raw (imports, exports,
full and incremental backups), as `qemu-img convert` does.

What is copied: the source's data extents (its map), read in large buffers; all-zero
4 KiB grains inside them are detected and not written (qemu-img's default `-S 4k`), so
the output stays sparse. Unallocated and zero ranges are never read.

Overlays (`backing=`): the output reads through its backing file where nothing was
written, so zero ranges must be written as zeros (write_zeroes) rather than skipped, and
every range is widened to the output's allocation grain (qcow2 cluster, fvd block) and
read from the source, so no partial grain is ever left to copy-on-write.
With `since=S` only the ranges that changed between snapshot S and the source (`-l T`,
or the live contents) are copied: an incremental backup over the previous backup.

The output is written to a hidden temporary file in DST's directory and renamed over
DST at the end; a failed convert removes it. SRC is only ever opened read-only.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import queue
import re
import secrets
import stat
import struct
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from fvd import qcow2
from fvd.control import ControlClient
from fvd.errors import FvdError, ImageIOError
from fvd.fileio import AnyPolicy, punch_hole, resolve_relative
from fvd.image import Image, create
from fvd.imageio import FORMATS, AnyImage, RawImage, open_image
from fvd.qcow2 import Qcow2Image
from fvd.types import DiskReader, StrPath
from fvd.units import MiB, parse_size

BUFFER = MiB  # per piece: 1 read, few writes; stays in the CPU cache
ZERO_GRAIN = 4096  # zero detection unit (qemu-img convert's default -S 4k)
COPY_THREADS = min(2, os.cpu_count() or 1)  # best measured on 2 cores


class Range(NamedTuple):
    start: int
    length: int
    zero: bool


Run = tuple[int, int, bool]  # (lo, hi, nonzero) inside a buffer
Progress = Optional[Callable[[int, int], None]]

DST_OPTIONS = {
    "fvd": ("chunk_size", "block_size", "journal_size", "table"),
    "qcow2": ("cluster_size", "lazy_refcounts"),
    "raw": (),
}


def convert(
    src: StrPath,
    dst: StrPath,
    *,
    src_format: str | None = None,
    dst_format: str = "fvd",
    snapshot: str | None = None,
    since: str | None = None,
    backing: StrPath | None = None,
    backing_format: str | None = None,
    progress: Progress = None,
    force_share: bool = False,
    cache: str = "writeback",
    backing_policy: AnyPolicy = "any",
    **options: object,
) -> None:
    """Convert `src` (fvd, qcow2 or raw; probed when src_format is None) into a new
    `dst` of `dst_format`, replacing any existing file at `dst` only on success.

    snapshot: read this internal snapshot of src instead of its current contents.
    since: copy only what changed between snapshot `since` and the source (needs
        `backing`, the previous backup, which the output uses as its base).
    options: fvd chunk_size/block_size/journal_size/table (False: table-less);
        qcow2 cluster_size/lazy_refcounts.
    progress(done_bytes, total_bytes) is called as the copy goes.
    cache: "writeback" (default): the output is flushed before it is renamed into place;
        "unsafe": nothing is flushed (qemu-img convert's default `-t unsafe`): faster,
        but after a power cut DST may hold anything.
    backing_policy: which backing files the source's chain may use, "any" (default),
        "same-dir" or "none" (`--backing`; `backing=` is the output's backing file).
        A source given as src_format="raw" is raw whatever its first bytes say.
    Errors of the output name `dst` (not its hidden temporary file, nor the source).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    opts = _check_arguments(dst_format, options, cache, since, backing, backing_format)
    _check_paths(src, dst, backing)
    img = open_image(src, src_format, force_share=force_share, backing=backing_policy)
    try:
        view: DiskReader = img
        if snapshot is not None:
            if isinstance(img, RawImage):
                raise ValueError(f"{src}: a raw image has no snapshots (snapshot={snapshot!r})")
            view = img.open_snapshot(snapshot)
        try:
            ranges = _plan(img, view, since, snapshot)
            _write_output(
                view,
                dst,
                dst_format,
                ranges,
                backing,
                backing_format,
                opts,
                progress,
                cache == "unsafe",
            )
        finally:
            if view is not img:
                view.close()
    finally:
        img.close()


def convert_served(
    client: ControlClient,
    dst: StrPath,
    *,
    snapshot: str,
    dst_format: str = "fvd",
    since: str | None = None,
    backing: StrPath | None = None,
    backing_format: str | None = None,
    progress: Progress = None,
    cache: str = "writeback",
    **options: object,
) -> None:
    """`convert()` of snapshot `snapshot` of an image that `fvd serve` holds (`client`:
    `fvd.connect(image)`): the changed extents come from its control socket, the data
    from the snapshot's NBD export, while the server keeps serving."""
    dst = os.fspath(dst)
    opts = _check_arguments(dst_format, options, cache, since, backing, backing_format)
    _check_paths(client.image, dst, backing)
    if since is not None:
        changed = client.changed_extents(since, snapshot)
    with client.open_export(snapshot) as view:
        if since is None:
            ranges = [Range(e.start, e.length, not e.data) for e in view.extents()]
        else:
            ranges = [Range(e.start, e.length, bool(e.zero) and not e.data) for e in changed]
        _write_output(
            view,
            dst,
            dst_format,
            ranges,
            backing,
            backing_format,
            opts,
            progress,
            cache == "unsafe",
        )


# ----- arguments ----------------------------------------------------------------------
def _check_arguments(
    dst_format: str,
    options: Mapping[str, object],
    cache: str,
    since: str | None,
    backing: StrPath | None,
    backing_format: str | None,
) -> dict[str, Any]:
    """The output's options, once the arguments are known to fit together."""
    if dst_format not in FORMATS:
        raise ValueError(f"unknown output format {dst_format!r} (use one of {', '.join(FORMATS)})")
    opts = _dst_options(dst_format, options)
    if cache not in ("writeback", "unsafe"):
        raise ValueError(f"cache must be 'writeback' or 'unsafe', not {cache!r}")
    if since is not None and backing is None:
        raise ValueError(
            "an incremental convert (since=) needs the previous backup as backing file (-B)"
        )
    if backing is not None and dst_format == "raw":
        raise ValueError("a raw output cannot have a backing file")
    if backing_format is not None and backing is None:
        raise ValueError("a backing format (-F) needs a backing file (-B)")
    return opts


def _dst_options(dst_format: str, options: Mapping[str, object]) -> dict[str, Any]:
    allowed = DST_OPTIONS[dst_format]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hint = f" ({dst_format} takes {', '.join(allowed)})" if allowed else ""
        raise ValueError(f"unknown option(s) for {dst_format} output: {', '.join(unknown)}{hint}")
    out: dict[str, Any] = {}  # sizes (int), lazy_refcounts (bool)
    for key, value in options.items():
        if key in ("lazy_refcounts", "table"):
            out[key] = _bool_option(key, value)
        else:
            out[key] = _size_option(key, value)
    return out


def _size_option(key: str, value: object) -> int:
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key} must be a positive size, not {value!r}")
    return value


def _bool_option(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{key} must be on or off, not {value!r}")


def _check_paths(src: str, dst: str, backing: StrPath | None = None) -> None:
    if backing is not None:
        if os.path.realpath(resolve_relative(dst, os.fspath(backing))) == os.path.realpath(dst):
            raise ValueError(f"{dst}: the output would replace its own backing file")
    if os.path.isdir(dst):
        raise IsADirectoryError(21, "is a directory", dst)
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise FileNotFoundError(2, "directory does not exist", dst)
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f"{dst}: the output would replace the source")


# ----- what to copy --------------------------------------------------------------------
def _plan(img: AnyImage, view: DiskReader, since: str | None, until: str | None) -> list[Range]:
    """Ranges (start, length, zero) to write, sorted and covering what must change."""
    if since is None:
        return [Range(e.start, e.length, not e.data) for e in view.extents()]
    return changed_ranges(img, since, until)


def changed_ranges(img: AnyImage, since: str, until: str | None = None) -> list[Range]:
    """Ranges (start, length, zero) whose bytes may differ between snapshot `since` and
    `until` (or the live contents): fvd's changed_extents, or qcow2 tree comparison."""
    if hasattr(img, "changed_extents"):
        changed = img.changed_extents(since, until)
    elif isinstance(img, Qcow2Image):
        return [Range(*r) for r in img.changed_ranges(since, until)]
    else:
        raise ValueError(f"{img.path}: a raw image has no snapshots (since={since!r})")
    return [Range(e.start, e.length, bool(e.zero) and not e.data) for e in changed]


def _widen(ranges: Iterable[Range], grain: int, size: int) -> list[Range]:
    """Ranges aligned to `grain` (clipped to size), overlapping ones merged; a merged
    range is zero only if every part was."""
    out: list[Range] = []
    for r in sorted(ranges):
        a = r.start // grain * grain
        b = min(size, -(-(r.start + r.length) // grain) * grain)
        if out and a <= out[-1].start + out[-1].length:
            last = out[-1]
            end = max(last.start + last.length, b)
            out[-1] = Range(last.start, end - last.start, last.zero and r.zero)
        else:
            out.append(Range(a, b - a, r.zero))
    return out


# ----- outputs ---------------------------------------------------------------------------
class _RawOutput:
    grain = 512

    def __init__(self, path: str, size: int, unsafe: bool = False) -> None:
        self.unsafe = unsafe
        self.fd = os.open(path, os.O_RDWR | os.O_TRUNC)  # created by _claim_temp
        self.path = path
        os.ftruncate(self.fd, size)

    def write(self, offset: int, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], offset + done)

    def write_zeroes(self, offset: int, length: int) -> None:
        punch_hole(self.fd, offset, length)

    def _sync(self) -> None:
        if not self.unsafe:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self._sync()
            finally:
                os.close(self.fd)
                self.fd = -1


# The writer `_open_output` gives.
Output = Union[_RawOutput, Qcow2Image, Image]


def _open_output(
    path: str,
    dst_format: str,
    size: int,
    backing: StrPath | None,
    backing_format: str | None,
    opts: dict[str, Any],
    cache: str = "writeback",
) -> tuple[Output, int]:
    """(writer, allocation grain) of a new output file at `path`."""
    if dst_format == "raw":
        raw = _RawOutput(path, size, unsafe=cache == "unsafe")
        return raw, raw.grain
    if dst_format == "qcow2":
        qcow2.create(
            path,
            -(-size // 512) * 512,
            cluster_size=opts.get("cluster_size", 65536),
            lazy_refcounts=opts.get("lazy_refcounts", False),
            backing_file=backing,
            backing_format=backing_format,
            overwrite=True,  # the empty file _claim_temp made
        )
        q = qcow2.open(path, "r+", cache=cache)
        return q, q.cluster_size  # q.thread_safe_writes is False: one writer thread
    kwargs: dict[str, Any] = {
        k: opts[k] for k in ("chunk_size", "block_size", "journal_size", "table") if k in opts
    }
    if backing is not None:
        kwargs.update(base=backing, base_format=backing_format)
    create(path, size, overwrite=True, **kwargs)  # over the empty file _claim_temp made
    image = Image(path, "r+", cache=cache)
    return image, image.block_size


# ----- the hidden temporary output ------------------------------------------------------
# `.NAME.convert-PID-HEX` beside DST, write-locked (an OFD lock, independent of the
# image's own flock) by the convert writing it for as long as it runs. A later convert
# to the same DST removes those nobody holds: their convert was killed.
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)


def _ofd_lock(fd: int) -> bool:
    """Write-lock the whole file on this open file description; False if another holds
    it. Without OFD locks (not Linux) every file counts as unlocked."""
    if _F_OFD_SETLK is None:
        return True
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _claim_temp(dst: str) -> tuple[str, int]:
    """(name, fd) of a new hidden temp file beside dst, already locked when its name
    appears: made unnamed (O_TMPFILE), locked, then linked in."""
    folder, name = os.path.split(os.path.abspath(dst))
    tmp = os.path.join(folder, f".{name}.convert-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)
    except (AttributeError, OSError):  # no O_TMPFILE here: named, then locked
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        _ofd_lock(fd)
        return tmp, fd
    try:
        _ofd_lock(fd)
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:  # linkat(..., AT_SYMLINK_FOLLOW): a dir fd makes os.link use linkat
            os.link(f"/proc/self/fd/{fd}", os.path.basename(tmp), dst_dir_fd=folder_fd)
        finally:
            os.close(folder_fd)
    except BaseException:
        os.close(fd)
        raise
    return tmp, fd


def remove_stale_temps(dst: str) -> list[str]:
    """Remove DST's hidden temp files left by killed converts (nobody holds their lock);
    returns their paths. A running convert's temp file is never touched."""
    folder, name = os.path.split(os.path.abspath(dst))
    pattern = re.compile(rf"\.{re.escape(name)}\.convert-\d+-[0-9a-f]+\Z")
    removed = []
    for entry in os.listdir(folder):
        if pattern.match(entry) and _remove_if_unheld(os.path.join(folder, entry)):
            removed.append(os.path.join(folder, entry))
    return removed


def _remove_if_unheld(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # gone meanwhile, a symlink, or not ours to open
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not _ofd_lock(fd):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class _OutputErrors:
    """An OSError of the output (its temporary file) names DST, the file the user asked
    for, and never the source."""

    def __init__(self, dst: str) -> None:
        self.dst = dst

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: Any, e: Any, tb: Any) -> None:
        if isinstance(e, OSError) and e.errno is not None:
            raise ImageIOError(self.dst, e.errno, "write failed") from e
        if isinstance(e, FvdError) and not isinstance(e, OSError):
            return None


def _write_output(
    view: DiskReader,
    dst: str,
    dst_format: str,
    ranges: list[Range],
    backing: StrPath | None,
    backing_format: str | None,
    opts: dict[str, Any],
    progress: Progress,
    unsafe: bool = False,
) -> None:
    remove_stale_temps(dst)
    errors = _OutputErrors(dst)
    with errors:
        tmp, lock_fd = _claim_temp(dst)
    try:
        cache = "unsafe" if unsafe else "writeback"
        with errors:
            out, grain = _open_output(
                tmp, dst_format, view.size, backing, backing_format, opts, cache
            )
        try:
            overlay = backing is not None
            if overlay:
                ranges = _widen(ranges, grain, view.size)
            zero_grain = max(ZERO_GRAIN, grain) if overlay else ZERO_GRAIN
            _copy(view, out, ranges, overlay, progress, zero_grain, errors)
        finally:
            with errors:
                out.close()
        with errors:
            os.rename(tmp, dst)
            tmp = ""
            if not unsafe:
                _fsync_dir(os.path.dirname(os.path.abspath(dst)))
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        os.close(lock_fd)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- the copy loop ---------------------------------------------------------------------
def _copy(
    view: DiskReader,
    out: Output,
    ranges: list[Range],
    overlay: bool,
    progress: Progress,
    grain: int,
    errors: _OutputErrors,
    threads: int = COPY_THREADS,
) -> None:
    """Copy the data ranges in BUFFER pieces on a few threads (reads, zero detection and
    fvd/raw writes release the GIL), each with its own reused buffer; skip (or, in an
    overlay, zero) the zero ranges and the all-zero grains found in the data. Writes to
    a qcow2 output stay on this thread (fvd.qcow2 is not thread-safe); to fvd and raw
    outputs the workers write themselves."""
    total = sum(r.length for r in ranges if not r.zero or overlay)
    state = {"done": 0}
    if progress is not None:
        progress(0, total)

    def advance(n: int) -> None:
        state["done"] += n
        if progress is not None:
            progress(state["done"], total)

    workers_write = getattr(out, "thread_safe_writes", True)
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(2 * threads):
        free.put(bytearray(BUFFER))

    def piece(pos: int, n: int) -> Optional[tuple[bytearray, list[Run]]]:
        buf = free.get()
        mv = memoryview(buf)[:n]
        view.readinto(pos, mv)
        runs = _nonzero_runs(mv, grain)
        if workers_write:
            with errors:
                _write_runs(out, pos, mv, runs, overlay)
            free.put(buf)
            return None
        return buf, runs

    pending: collections.deque[tuple[int, int, Future[Optional[tuple[bytearray, list[Run]]]]]] = (
        collections.deque()
    )

    def finish_one() -> None:
        pos, n, fut = pending.popleft()
        got = fut.result()
        if got is not None:
            buf, runs = got
            with errors:
                _write_runs(out, pos, memoryview(buf)[:n], runs, overlay)
            free.put(buf)
        advance(n)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fvd-convert") as pool:
        try:
            for r in ranges:
                if r.zero:
                    if overlay:
                        with errors:
                            out.write_zeroes(r.start, r.length)
                        advance(r.length)
                    continue
                for pos in range(r.start, r.start + r.length, BUFFER):
                    n = min(BUFFER, r.start + r.length - pos)
                    while len(pending) >= 2 * threads:
                        finish_one()
                    pending.append((pos, n, pool.submit(piece, pos, n)))
            while pending:
                finish_one()
        finally:
            for _, _, fut in pending:
                fut.cancel()


def _nonzero_runs(mv: memoryview, grain: int) -> list[Run]:
    """[(lo, hi, nonzero)] covering mv: runs of grains with and without a non-zero byte."""
    n = len(mv)
    whole = n // grain
    if whole:
        words = np.frombuffer(mv[: whole * grain], dtype=np.uint64)
        nz = words.reshape(whole, grain // 8).any(axis=1)
    else:
        nz = np.zeros(0, dtype=bool)
    if whole * grain < n:
        tail = mv[whole * grain :]
        nz = np.append(nz, tail != bytes(len(tail)))
    if nz.all():
        return [(0, n, True)]
    edges = np.flatnonzero(np.diff(np.concatenate(([False], nz, [False])).astype(np.int8)))
    runs: list[Run] = []
    prev = 0
    for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        lo, hi = a * grain, min(n, b * grain)
        if lo > prev:
            runs.append((prev, lo, False))
        runs.append((lo, hi, True))
        prev = hi
    if prev < n:
        runs.append((prev, n, False))
    return runs


def _write_runs(out: Output, offset: int, mv: memoryview, runs: list[Run], overlay: bool) -> None:
    """Write the non-zero runs; zero runs are skipped, or zeroed when the output is an
    overlay (its backing may hold data there)."""
    for lo, hi, nonzero in runs:
        if nonzero:
            out.write(offset + lo, mv[lo:hi])
        elif overlay:
            out.write_zeroes(offset + lo, hi - lo)
