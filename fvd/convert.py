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

This module decides what to copy and where (arguments, policy, the plan, the output);
the copy loop itself is `fvd.copyloop`. A qcow2 output is laid out in one pass
(`fvd.qcow2.fresh`); an fvd overlay gets a compact geometry (`_overlay_geometry`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Union

from fvd import backupinfo
from fvd.control import ControlClient
from fvd.copyloop import CopyCounts, Progress, Range, copy_ranges
from fvd.errors import FvdError, ImageIOError
from fvd.fileio import (
    BACKING_POLICIES,
    AnyPolicy,
    open_for_rewrite,
    punch_hole,
    resolve_relative,
)
from fvd.image import Image, create
from fvd.imageio import FORMATS, AnyImage, RawImage, open_image
from fvd.qcow2 import Qcow2Image
from fvd.qcow2.fresh import FreshWriter
from fvd.types import FLAG_DATA, ConvertResult, DiskReader, StrPath
from fvd.units import KiB, parse_size

ZERO_GRAIN = 4096  # zero detection unit (qemu-img convert's default -S 4k)

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
) -> ConvertResult:
    """Convert `src` (fvd, qcow2 or raw; probed when src_format is None) into a new
    `dst` of `dst_format`, replacing any existing file at `dst` only on success.

    snapshot: read this internal snapshot of src instead of its current contents.
    since: copy only what changed between snapshot `since` and the source (needs
        `backing`, the previous backup, which the output uses as its base). Before
        anything is copied, BackupChainError ("a full backup is needed") unless
        `backing` holds snapshot `since` of this image (fvd.backupinfo); every output
        records what it holds (fvd.backup_info).
    options: fvd chunk_size/block_size/journal_size/table (False: table-less);
        qcow2 cluster_size/lazy_refcounts.
    progress(done_bytes, total_bytes) is called as the copy goes.
    Returns a ConvertResult: bytes read from src, data bytes written to dst, data
    extents copied and zero ranges (adjacent ones merged), seconds taken.
    cache: "writeback" (default): the output is flushed before it is renamed into place;
        "unsafe": nothing is flushed (qemu-img convert's default `-t unsafe`): faster,
        but after a power cut DST may hold anything.
    backing_policy: which backing files the source's chain may use, "any" (default),
        "same-dir" or "none" (`--backing`; `backing=` is the output's backing file).
        A source given as src_format="raw" is raw whatever its first bytes say.
    Errors of the output name `dst` (not its hidden temporary file, nor the source).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    backing, backing_policy = _policy_word(dst, backing, backing_policy)
    opts = _check_arguments(dst_format, options, cache, since, backing, backing_format)
    _check_paths(src, dst, backing)
    started = time.monotonic()
    img = open_image(src, src_format, force_share=force_share, backing=backing_policy)
    try:
        view = _source_view(img, src, snapshot)
        try:
            holds = _backup_policy(img, src, dst, snapshot, since, backing, backing_format)
            ranges = _plan(img, view, since, snapshot)
            out = _OutputSpec(dst, dst_format, backing, backing_format, opts, cache == "unsafe")
            counts = _write_output(view, out, ranges, progress, holds)
        finally:
            if view is not img:
                view.close()
    finally:
        img.close()
    return counts.result(started)


def _source_view(img: AnyImage, src: str, snapshot: str | None) -> DiskReader:
    """What convert reads: the image, or its snapshot `snapshot`."""
    if snapshot is None:
        return img
    if isinstance(img, RawImage):
        raise ValueError(f"{src}: a raw image has no snapshots (snapshot={snapshot!r})")
    view: DiskReader = img.open_snapshot(snapshot)
    return view


def _policy_word(
    dst: str, backing: StrPath | None, policy: AnyPolicy
) -> tuple[StrPath | None, AnyPolicy]:
    """`backing="none"|"same-dir"|"any"` names the source's backing policy (as for
    fvd.open) unless a file of that name lies beside DST, where `-B` names are resolved:
    then it is the output's backing file, as always."""
    if isinstance(backing, str) and backing in BACKING_POLICIES and policy == "any":
        if not os.path.lexists(resolve_relative(dst, backing)):
            return None, backing
    return backing, policy


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
) -> ConvertResult:
    """`convert()` of snapshot `snapshot` of an image that `fvd serve` holds (`client`:
    `fvd.connect(image)`): the changed extents come from its control socket, the data
    from the snapshot's NBD export, while the server keeps serving."""
    dst = os.fspath(dst)
    opts = _check_arguments(dst_format, options, cache, since, backing, backing_format)
    _check_paths(client.image, dst, backing)
    # the same identity check as a local convert: the server's snapshots carry their UUIDs
    holds = _backup_policy(client, client.image, dst, snapshot, since, backing, backing_format)
    started = time.monotonic()
    if since is not None:
        changed = client.changed_extents(since, snapshot)
    with client.open_export(snapshot) as view:
        if since is None:
            ranges = [Range(e.start, e.length, not e.data) for e in view.extents()]
        else:
            ranges = [Range(e.start, e.length, bool(e.zero) and not e.data) for e in changed]
        out = _OutputSpec(dst, dst_format, backing, backing_format, opts, cache == "unsafe")
        counts = _write_output(view, out, ranges, progress, holds)
    return counts.result(started)


def _backup_policy(
    img: AnyImage | ControlClient,
    src: str,
    dst: str,
    snapshot: str | None,
    since: str | None,
    backing: StrPath | None,
    backing_format: str | None,
) -> backupinfo.BackupInfo | None:
    """Before anything is copied: what the output will hold (fvd.backupinfo), and for an
    incremental convert the refusal (BackupChainError, "a full backup is needed") when
    the backing file does not hold snapshot `since` of this image."""
    base = backupinfo.resolve_backing(dst, backing)
    return backupinfo.plan_backup(img, src, snapshot, since, base, backing_format)


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
    opts = dst_options(dst_format, options)
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


def dst_options(dst_format: str, options: Mapping[str, object]) -> dict[str, Any]:
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
    if since is None and isinstance(view, Qcow2Image):  # a chain's map, in numpy
        return [
            Range(s, n, not f & FLAG_DATA, d, o if f & FLAG_DATA else None)
            for s, n, f, d, o in view.extents_array().tolist()
        ]
    if since is None:
        return [
            Range(e.start, e.length, not e.data, e.depth, e.offset if e.data else None)
            for e in view.extents()
        ]
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
        self.fd = open_for_rewrite(path, overwrite=True)  # created by _claim_temp
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
Output = Union[_RawOutput, FreshWriter, Image]


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
        q = FreshWriter(  # laid out in one pass, metadata written at close
            path,
            -(-size // 512) * 512,
            cluster_size=opts.get("cluster_size", 65536),
            lazy_refcounts=opts.get("lazy_refcounts", False),
            backing_file=backing,
            backing_format=backing_format,
            cache=cache,
            overwrite=True,  # the empty file _claim_temp made
        )
        return q, q.cs
    kwargs: dict[str, Any] = {
        k: opts[k] for k in ("chunk_size", "block_size", "journal_size", "table") if k in opts
    }
    if backing is not None:
        kwargs.update(base=backing, base_format=backing_format)
        kwargs = _overlay_geometry(kwargs)
    create(path, size, overwrite=True, **kwargs)  # over the empty file _claim_temp made
    image = Image(path, "r+", cache=cache)
    return image, image.block_size


OVERLAY_CHUNK = 64 * KiB  # an fvd overlay's chunk: its file grows by what changed
OVERLAY_JOURNAL = 256 * KiB  # an overlay's journal (the default 16 MiB is sized for guests)


def _overlay_geometry(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Chunk and journal sizes of an fvd overlay (an incremental backup) unless given:
    64 KiB chunks and a 256 KiB journal, so the file's size (apparent and allocated)
    follows the data it holds (the 64 KiB blocks that changed) plus its fixed regions,
    instead of a 1 MiB chunk per scattered change and a 16 MiB journal."""
    out = dict(kwargs)
    out.setdefault("chunk_size", max(OVERLAY_CHUNK, out.get("block_size", 0)))
    out.setdefault("journal_size", OVERLAY_JOURNAL)
    return out


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


class _NamedWriter:
    """The output as the copy loop writes it, its OSErrors naming DST (reads of the
    source keep their own errors)."""

    def __init__(self, out: Output, errors: _OutputErrors) -> None:
        self.out, self.errors = out, errors
        self.thread_safe_writes = getattr(out, "thread_safe_writes", True)

    def write(self, offset: int, data: Any) -> Any:
        with self.errors:
            return self.out.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        with self.errors:
            self.out.write_zeroes(offset, length)


class _OutputSpec(NamedTuple):
    """What convert writes: DST, its format, backing file and options, and whether the
    final flush is skipped (-t unsafe)."""

    dst: str
    dst_format: str
    backing: StrPath | None
    backing_format: str | None
    opts: dict[str, Any]
    unsafe: bool


def _write_output(
    view: DiskReader,
    spec: _OutputSpec,
    ranges: list[Range],
    progress: Progress,
    holds: backupinfo.BackupInfo | None = None,
) -> CopyCounts:
    """Copy `ranges` of `view` into a locked hidden temp file beside DST, record what it
    holds, rename it into place; every output error names DST."""
    dst = spec.dst
    remove_stale_temps(dst)
    errors = _OutputErrors(dst)
    with errors:
        tmp, lock_fd = _claim_temp(dst)
    try:
        counts = _fill_output(view, spec, tmp, ranges, progress, errors)
        with errors:
            in_file = backupinfo.record_backup(tmp, spec.dst_format, holds, spec.unsafe)
            backupinfo.drop_sidecar(dst)
            os.rename(tmp, dst)
            tmp = ""
            if not in_file:
                backupinfo.write_sidecar(dst, holds, spec.unsafe)
            if not spec.unsafe:
                fsync_dir(os.path.dirname(os.path.abspath(dst)))
        return counts
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        os.close(lock_fd)


def _fill_output(
    view: DiskReader,
    spec: _OutputSpec,
    tmp: str,
    ranges: list[Range],
    progress: Progress,
    errors: _OutputErrors,
) -> CopyCounts:
    """The output image at `tmp`, created and filled by the copy loop, then closed."""
    cache = "unsafe" if spec.unsafe else "writeback"
    with errors:
        out, grain = _open_output(
            tmp, spec.dst_format, view.size, spec.backing, spec.backing_format, spec.opts, cache
        )
    try:
        overlay = spec.backing is not None
        if overlay:
            ranges = _widen(ranges, grain, view.size)
        return copy_ranges(
            view,
            _NamedWriter(out, errors),
            ranges,
            overlay=overlay,
            progress=progress,
            grain=max(ZERO_GRAIN, grain) if overlay else ZERO_GRAIN,
            layers=view.layer_readers() if isinstance(view, Qcow2Image) else (),
        )
    finally:
        with errors:
            out.close()


def fsync_dir(folder: str) -> None:
    """Make a rename into `folder` durable (fvd.chain's commit renames so too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
