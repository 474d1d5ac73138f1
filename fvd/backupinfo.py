"""What a backup holds, and whether a backing file can take an incremental backup
(docs/format.md section 12, "Backup record").

`fvd.convert` records in every output it makes from an image with an identity (an fvd
image's UUID, a snapshot's UUID) which image and which snapshots it holds: in an fvd
output, a backup record in the header region; in a qcow2 output, the same bytes as a
header extension QEMU ignores (and keeps); in a raw output (or when the extension does
not fit in a qcow2 header cluster), a sidecar file `DST.fvd-backup.json`.

Before an incremental convert (`since=S`, `backing=PREV`) copies anything,
`plan_backup` checks that PREV holds snapshot S of the same image, and refuses with
BackupChainError ("a full backup is needed") otherwise. `check_backup_chain` is the
same check for a library user; `backup_info` reads what a file holds.
"""

from __future__ import annotations

import json
import os
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Optional

from fvd import qcow2
from fvd.control import ControlClient
from fvd.errors import BackupChainError, CorruptImageError, SnapshotNotFoundError
from fvd.fileio import resolve_relative
from fvd.image import Image
from fvd.imageio import AnyImage, open_image, resolve_format
from fvd.ondisk import fvd_records as fr
from fvd.qcow2 import Qcow2Image
from fvd.qcow2.format import parse_header
from fvd.types import SnapshotInfo, StrPath

SIDECAR_SUFFIX = ".fvd-backup.json"
HEAD = fr.S_BACKUP_RECORD_HEAD
RECORD_MAX = fr.HEADER_REGION - fr.BACKUP_RECORD_OFFSET  # room in an fvd header region
# qcow2 snapshots have no UUID: theirs is derived from what QEMU stores for them
QCOW2_SNAPSHOT_NAMESPACE = uuid.UUID("6d9e3c52-0f0e-4c8a-9a55-4e4f8b1f2d20")
NO_UUID = bytes(16)


@dataclass(frozen=True)
class BackupInfo:
    """What a backup file holds: the source image's UUID (None for a qcow2 source), the
    snapshot it is a copy of (None: the live contents) and, for an incremental backup,
    the snapshot its backing file holds (`since`). Names are as they were at backup
    time; the UUIDs identify."""

    image_uuid: Optional[str]
    snapshot: Optional[str]
    snapshot_uuid: Optional[str]
    since: Optional[str] = None
    since_uuid: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "image-uuid": self.image_uuid,
            "snapshot": self.snapshot,
            "snapshot-uuid": self.snapshot_uuid,
            "since": self.since,
            "since-uuid": self.since_uuid,
        }

    def describe(self) -> str:
        what = f"snapshot {self.snapshot!r}" if self.snapshot else "live contents"
        return f"{what} of image {self.image_uuid or '(no uuid)'}"


# ----- the record ------------------------------------------------------------------------
def _uuid_bytes(text: Optional[str]) -> bytes:
    return NO_UUID if text is None else uuid.UUID(text).bytes


def _uuid_text(raw: bytes) -> Optional[str]:
    return None if raw == NO_UUID else str(uuid.UUID(bytes=raw))


def encode_record(info: BackupInfo) -> bytes:
    """The backup record's bytes (docs/format.md section 12)."""
    snap = (info.snapshot or "").encode("utf-8")
    since = (info.since or "").encode("utf-8")
    names = snap + since
    size = HEAD.size + len(names) + (-len(names) % 8)
    raw = bytearray(size)
    HEAD.pack_into(
        raw,
        0,
        fr.BACKUP_RECORD_MAGIC,
        0,
        size,
        fr.BACKUP_RECORD_VERSION,
        _uuid_bytes(info.image_uuid),
        _uuid_bytes(info.snapshot_uuid),
        _uuid_bytes(info.since_uuid),
        len(snap),
        len(since),
        0,
    )
    raw[HEAD.size : HEAD.size + len(names)] = names
    raw[4:8] = zlib.crc32(raw).to_bytes(4, "little")
    return bytes(raw)


def decode_record(raw: bytes, path: str, offset: int) -> Optional[BackupInfo]:
    """The record at the start of `raw`; None when there is none (no magic: zeros, an
    image made before backup records). CorruptImageError naming `offset` when the
    magic is there and the rest is not right."""
    if len(raw) < HEAD.size or int.from_bytes(raw[:4], "little") != fr.BACKUP_RECORD_MAGIC:
        return None
    (_m, crc, size, version, img, snap, since, nsnap, nsince, _r) = HEAD.unpack_from(raw)
    if not HEAD.size + nsnap + nsince <= size <= len(raw) or version != 1:
        raise CorruptImageError(path, offset, f"backup record: size {size} or version {version}")
    body = bytearray(raw[:size])
    body[4:8] = bytes(4)
    if zlib.crc32(body) != crc:
        raise CorruptImageError(path, offset, "backup record: checksum mismatch")
    try:
        snap_name = bytes(raw[HEAD.size : HEAD.size + nsnap]).decode("utf-8")
        since_name = bytes(raw[HEAD.size + nsnap : HEAD.size + nsnap + nsince]).decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptImageError(path, offset, "backup record: names are not UTF-8") from None
    return BackupInfo(
        _uuid_text(img),
        snap_name or None,
        _uuid_text(snap),
        since_name or None,
        _uuid_text(since),
    )


# ----- reading what a file holds ---------------------------------------------------------
def sidecar_path(path: StrPath) -> str:
    return os.fspath(path) + SIDECAR_SUFFIX


def _read_sidecar(path: str) -> Optional[BackupInfo]:
    side = sidecar_path(path)
    try:
        with open(side, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CorruptImageError(side, 0, f"backup sidecar: {e}") from None
    if not isinstance(data, dict) or data.get("format") != "fvd-backup":
        raise CorruptImageError(side, 0, "backup sidecar: not an fvd-backup record")
    keys = ("image-uuid", "snapshot", "snapshot-uuid", "since", "since-uuid")
    values = [data.get(k) for k in keys]
    if not all(v is None or isinstance(v, str) for v in values):
        raise CorruptImageError(side, 0, "backup sidecar: a field is not a string")
    return BackupInfo(*values)


def backup_info(path: StrPath, format: Optional[str] = None) -> Optional[BackupInfo]:
    """What the backup file `path` holds (its record, qcow2 extension or sidecar), or
    None when it records nothing (not made by `fvd convert` from an image with an
    identity)."""
    path = os.fspath(path)
    f = resolve_format(path, format)
    if f == "fvd":
        fd = os.open(path, os.O_RDONLY)
        try:
            raw = os.pread(fd, RECORD_MAX, fr.BACKUP_RECORD_OFFSET)
        finally:
            os.close(fd)
        info = decode_record(raw, path, fr.BACKUP_RECORD_OFFSET)
        if info is not None:
            return info
    elif f == "qcow2":
        with Qcow2Image(path, "r", _skip_backing=True) as q:
            exts = q.header_extensions
        for t, data in exts:
            if t == fr.QCOW2_EXT_FVD_BACKUP:
                return decode_record(data, path, 0)
    return _read_sidecar(path)


# ----- the source's identity ------------------------------------------------------------
def qcow2_snapshot_uuid(s: SnapshotInfo) -> str:
    """A qcow2 snapshot's identity: what QEMU stores for it (id, name, date, vm clock)."""
    key = f"{s.id}\0{s.name}\0{s.date_sec}.{s.date_nsec:09d}\0{s.vm_clock_nsec}"
    return str(uuid.uuid5(QCOW2_SNAPSHOT_NAMESPACE, key))


def snapshot_identity(img: AnyImage | ControlClient, name: str) -> Optional[str]:
    """The UUID of snapshot `name` of an open source image (None: it has none yet)."""
    snaps = img.snapshots() if hasattr(img, "snapshots") else []
    for s in snaps:
        if s.name == name:
            return qcow2_snapshot_uuid(s) if isinstance(img, Qcow2Image) else s.uuid
    where = img.image if isinstance(img, ControlClient) else img.path
    raise SnapshotNotFoundError(f"{where}: no snapshot named {name!r}")


def plan_backup(
    img: AnyImage | ControlClient,
    src: str,
    snapshot: Optional[str],
    since: Optional[str],
    backing_path: Optional[str],
    backing_format: Optional[str],
) -> Optional[BackupInfo]:
    """What a convert of `img` (`snapshot`, or the live contents; `since`: over the
    backup at `backing_path`) will hold; BackupChainError when the backing file does not
    hold snapshot `since` of this image. None: the source has no identity to record."""
    image_uuid: Optional[str] = getattr(img, "uuid", None)
    snap_uuid = snapshot_identity(img, snapshot) if snapshot is not None else None
    since_uuid = None
    if since is not None:
        since_uuid = snapshot_identity(img, since)
        _check_base(src, image_uuid, since, since_uuid, backing_path, backing_format)
    if image_uuid is None and snap_uuid is None:
        return None
    return BackupInfo(image_uuid, snapshot, snap_uuid, since, since_uuid)


def _check_base(
    src: str,
    image_uuid: Optional[str],
    since: str,
    since_uuid: Optional[str],
    backing_path: Optional[str],
    backing_format: Optional[str],
) -> None:
    if backing_path is None:
        return  # convert refuses since= without a backing file itself
    if since_uuid is None:
        raise BackupChainError(
            f"{src}: snapshot {since!r} has no uuid (an image written by older fvd gets "
            f"one at its first read-write open): a full backup is needed"
        )
    held = backup_info(backing_path, backing_format)
    if held is None:
        raise BackupChainError(
            f"{backing_path}: records no backup of {src} (not made by fvd convert "
            f"-l {since}): a full backup is needed"
        )
    if held.snapshot_uuid != since_uuid or held.image_uuid != image_uuid:
        raise BackupChainError(
            f"{backing_path}: holds {held.describe()}, not snapshot {since!r} "
            f"({since_uuid}) of {src}: a full backup is needed"
        )


def check_backup_chain(
    src: StrPath,
    since: str,
    backing: StrPath,
    *,
    src_format: Optional[str] = None,
    backing_format: Optional[str] = None,
) -> BackupInfo:
    """The check `fvd.convert(src, ..., since=since, backing=backing)` makes before it
    copies: returns what `backing` holds when it holds snapshot `since` of `src`, else
    raises BackupChainError ("a full backup is needed"). `backing` is a path as
    given (not relative to an output)."""
    src, backing = os.fspath(src), os.fspath(backing)
    img = open_image(src, src_format)
    try:
        since_uuid = snapshot_identity(img, since)
        _check_base(src, getattr(img, "uuid", None), since, since_uuid, backing, backing_format)
    finally:
        img.close()
    held = backup_info(backing, backing_format)
    assert held is not None  # _check_base refused otherwise
    return held


def verify_backup_chain(path: StrPath, format: Optional[str] = None) -> list[BackupInfo]:
    """What each file of the backup chain ending in `path` holds, newest first, after
    checking every link: each incremental's `since` snapshot is the one its backing file
    holds, of the same image, down to a full backup. BackupChainError naming the broken
    link otherwise (a file that records nothing, an incremental without its backing
    file, a backing file that holds another snapshot or image)."""
    out: list[BackupInfo] = []
    seen: set[str] = set()
    current: Optional[str] = os.fspath(path)
    fmt = format
    while current is not None:
        real = os.path.realpath(current)
        if real in seen:
            raise BackupChainError(f"{current}: the backing chain loops")
        seen.add(real)
        info = backup_info(current, fmt)
        if info is None:
            raise BackupChainError(f"{current}: records no backup (not made by fvd convert)")
        if (
            out
            and info.snapshot_uuid != out[-1].since_uuid
            or (out and info.image_uuid != out[-1].image_uuid)
        ):
            raise BackupChainError(
                f"{current}: holds {info.describe()}, but the backup above it was taken "
                f"since snapshot {out[-1].since!r} ({out[-1].since_uuid}): the chain is broken"
            )
        out.append(info)
        current, fmt = _backing_of(current, fmt)
        if info.since_uuid is None:
            return out  # a full backup ends the chain
        if current is None:
            raise BackupChainError(
                f"{out[-1].describe()}: an incremental since {info.since!r} without a "
                f"backing file: the chain is broken"
            )
    return out


def _backing_of(path: str, format: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(path, format) of the backing file of an fvd or qcow2 file, or (None, None)."""
    f = resolve_format(path, format)
    if f == "qcow2":
        with Qcow2Image(path, "r", _skip_backing=True) as q:
            name, fmt = q.backing_file, q.backing_format
        return (resolve_relative(path, name), fmt) if name else (None, None)
    if f == "fvd":
        with Image(path) as img:
            info = img.info()
        base = info.get("full-backing-filename")
        return (base, info.get("backing-filename-format")) if base else (None, None)
    return None, None


# ----- writing the record -----------------------------------------------------------------
def record_backup(tmp: str, dst_format: str, info: Optional[BackupInfo], unsafe: bool) -> bool:
    """Write `info` into the finished (closed) output `tmp`: True when it is in the
    file, False when it needs a sidecar (raw, or no room in a qcow2 header cluster)."""
    if info is None or dst_format == "raw":
        return info is None
    raw = encode_record(info)
    fd = os.open(tmp, os.O_RDWR)
    try:
        if dst_format == "fvd":
            os.pwrite(fd, raw, fr.BACKUP_RECORD_OFFSET)
        elif not _qcow2_extension(fd, tmp, raw):
            return False
        if not unsafe:
            os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _qcow2_extension(fd: int, path: str, record: bytes) -> bool:
    """Add the record as a header extension of a freshly written qcow2 file (the header
    cluster holds only the header, its extensions and the backing name)."""
    cs = 1 << min(int.from_bytes(os.pread(fd, 4, 20), "big"), 21)
    head = os.pread(fd, cs, 0)
    h = parse_header(path, head, os.fstat(fd).st_size)
    h.extensions = [(t, d) for t, d in h.extensions if t != fr.QCOW2_EXT_FVD_BACKUP]
    h.extensions.append((fr.QCOW2_EXT_FVD_BACKUP, record))
    try:
        new = qcow2.format.build_header(h)
    except ValueError:
        return False  # no room in cluster 0: the sidecar holds it
    os.pwrite(fd, new.ljust(cs, b"\0"), 0)
    return True


def write_sidecar(dst: str, info: Optional[BackupInfo], unsafe: bool) -> None:
    """The sidecar of `dst` (written whole to a temporary name, then renamed)."""
    if info is None:
        return
    side = sidecar_path(dst)
    tmp = f"{side}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(format="fvd-backup", version=1, **info.as_dict()), f, indent=2)
        f.write("\n")
        if not unsafe:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, side)


def drop_sidecar(dst: str) -> None:
    """A file about to replace `dst` must not inherit what the old one held."""
    try:
        os.unlink(sidecar_path(dst))
    except FileNotFoundError:
        pass


def resolve_backing(dst: str, backing: Optional[StrPath]) -> Optional[str]:
    """The backing file's path as the output will resolve it (relative to dst's folder)."""
    return None if backing is None else resolve_relative(dst, os.fspath(backing))
