"""qcow2 v2/v3 header and snapshot table for the QCOW2 baseline (big-endian throughout).

The records are declared in fvd.ondisk.qcow2_records; this module builds, parses and
validates them, which only happens at open, close and snapshot create/delete, never per
guest I/O. Per-I/O metadata (L1, L2 tables, refcount blocks) lives in numpy arrays of
the entry dtypes declared there.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from fvd.errors import CorruptImageError, UnsupportedFeatureError
from fvd.ondisk.qcow2_records import (  # noqa: F401 (re-exported: the baseline's vocabulary)
    COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    HEADER_OFFSET,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    L1_DTYPE,
    L1E_RESERVED_MASK,
    L2_DTYPE,
    L2E_STD_RESERVED_MASK,
    MAGIC,
    OFF_CLUSTER_BITS,
    OFF_INCOMPAT,
    OFF_L1_SIZE,
    OFF_REFTABLE,
    OFF_SNAPSHOTS,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFBLOCK_DTYPE,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    REFTABLE_DTYPE,
    S_CLUSTER_BITS,
    S_INCOMPAT_UPDATE,
    S_L1_UPDATE,
    S_REFBLOCK_ENTRY,
    S_REFTABLE_ENTRY,
    S_REFTABLE_UPDATE,
    S_SNAPSHOT_EXTRA_FIELD,
    S_SNAPSHOTS_UPDATE,
    SNAPSHOT_EXTRA_OFFSET,
    SNAPSHOT_RECORD_SIZE,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    V3_MIN_HEADER_LENGTH,
    BackingFormatExtension,
    EndOfExtensions,
    Extension,
    ExtensionHeader,
    HeaderV2,
    HeaderV3Tail,
    SnapshotExtra,
    SnapshotRecord,
)
from fvd.types import SnapshotInfo

MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
_OFF = HEADER_OFFSET  # header field offsets, for error messages


@dataclass
class Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    extensions: list[tuple[int, bytes]] = field(default_factory=list)  # [(type, data)] as found
    backing_file: str = ""  # as stored (relative to the image's directory)
    backing_format: str = ""  # from the 0xE2792ACA extension, "" when absent

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


MAX_BACKING_NAME = 1023  # QEMU's limit

# The fields of the declarations that Header holds as stored. Of HeaderV2 it does not
# hold the magic, crypt_method (always 0) nor the backing name's offset and size (it
# holds the name itself).
_V2_FIELDS = tuple(
    c.name
    for c in HeaderV2.subcons
    if c.name not in ("magic", "backing_file_offset", "backing_file_size", "crypt_method")
)
_V3_FIELDS = tuple(c.name for c in HeaderV3Tail.subcons)
# The SnapshotRecord fields that SnapshotInfo holds as stored.
_SNAPSHOT_FIELDS = ("l1_table_offset", "l1_size", "date_sec", "date_nsec", "vm_clock_nsec")

# qemu-img create's layout of a new image: the header in cluster 0, a one-cluster
# refcount table in cluster 1, its first refcount block in cluster 2, the L1 table from
# cluster 3 on.
NEW_REFTABLE_CLUSTER, NEW_REFBLOCK_CLUSTER, NEW_L1_CLUSTER = 1, 2, 3


def new_header(
    cluster_bits: int,
    size: int,
    *,
    l1_size: int = 0,
    backing_file: str = "",
    backing_format: str = "",
    lazy_refcounts: bool = False,
) -> Header:
    """The version 3 header of a new image in qemu-img create's layout (above), with an
    L1 table of `l1_size` entries (none: offset 0) and no snapshots."""
    cs = 1 << cluster_bits
    return Header(
        version=3,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=NEW_L1_CLUSTER * cs if l1_size else 0,
        refcount_table_offset=NEW_REFTABLE_CLUSTER * cs,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        compatible_features=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
        backing_file=backing_file,
        backing_format=backing_format,
    )


def build_header(h: Header) -> bytes:
    """Header bytes; with a backing file also the backing-format extension, the end
    marker and the backing file name (QEMU's layout: name right after the extensions).
    Other extensions in `h.extensions` (types this code does not interpret, such as
    fvd's backup record, docs/format.md section 12) are kept, before the end marker, as
    QEMU keeps unknown ones. Without any, the zero bytes after the header are the end
    marker."""
    name = h.backing_file.encode()
    tail = b""
    if len(name) > MAX_BACKING_NAME:
        raise ValueError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
    fmt = h.backing_format.encode()
    if name and fmt:
        tail += BackingFormatExtension.build(dict(length=len(fmt), backing_format=fmt))
    for t, data in h.extensions:
        if t not in (EXT_END, EXT_BACKING_FORMAT):
            tail += Extension.build(dict(type=t, length=len(data), data=data))
    if tail or name:
        tail += EndOfExtensions.build({})
    name_off = h.header_length + len(tail) if name else 0
    if h.header_length + len(tail) + len(name) > h.cluster_size:
        raise ValueError("header extensions and backing file name do not fit in cluster 0")
    out: bytes = HeaderV2.build(  # construct is untyped: its build() gives Any
        dict(
            magic=MAGIC,
            backing_file_offset=name_off,
            backing_file_size=len(name),
            crypt_method=0,
            **{f: getattr(h, f) for f in _V2_FIELDS},
        )
    )
    out += HeaderV3Tail.build({f: getattr(h, f) for f in _V3_FIELDS})
    out += bytes(h.header_length - len(out))  # compression type 0 + padding
    return out + tail + name


def parse_header(path: str, raw: bytes, file_size: int, creating: bool = False) -> Header:
    """Parse and validate cluster 0 (`raw` holds at least its first bytes)."""
    if len(raw) < V2_HEADER_LENGTH:
        raise CorruptImageError(path, 0, "file too short for a qcow2 header (truncated)")
    if raw[:4] != MAGIC:
        raise CorruptImageError(path, 0, f"bad magic {bytes(raw[:4])!r}, not a qcow2 image")
    v2 = HeaderV2.parse(raw[:V2_HEADER_LENGTH])
    if v2.version not in (2, 3):
        raise UnsupportedFeatureError(f"{path}: qcow2 version {v2.version} is not supported")
    if not MIN_CLUSTER_BITS <= v2.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImageError(
            path, _OFF["cluster_bits"], f"cluster_bits {v2.cluster_bits} out of range 9..21"
        )
    h = Header(**{f: v2[f] for f in _V2_FIELDS}, header_length=V2_HEADER_LENGTH)
    cs = h.cluster_size
    if v2.version == 3:
        _parse_v3_fields(path, raw, h)
    if v2.crypt_method:
        raise UnsupportedFeatureError(f"{path}: encrypted qcow2 images are not supported")
    if v2.backing_file_offset:
        h.backing_file = _backing_name(path, raw, v2, cs)
    _refuse_unsupported(path, h)
    _validate_tables(path, h, file_size, creating)
    h.extensions = parse_extensions(path, raw, h)
    for t, data in h.extensions:
        if t == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("utf-8", "replace")
    return h


def _parse_v3_fields(path: str, raw: bytes, h: Header) -> None:
    """The version 3 fields after the v2 header, into `h` (checked)."""
    cs = h.cluster_size
    if len(raw) < V3_MIN_HEADER_LENGTH:
        raise CorruptImageError(path, V2_HEADER_LENGTH, "v3 header truncated")
    t = HeaderV3Tail.parse(raw[V2_HEADER_LENGTH:V3_MIN_HEADER_LENGTH])
    for f in _V3_FIELDS:
        setattr(h, f, t[f])
    if h.header_length < V3_MIN_HEADER_LENGTH or h.header_length % 8 or h.header_length > cs:
        raise CorruptImageError(path, _OFF["header_length"], f"bad header_length {h.header_length}")
    ct = _OFF["compression_type"]
    if h.header_length > ct and len(raw) > ct and raw[ct] != 0:
        if not h.incompatible_features & INCOMPAT_COMPRESSION:
            raise CorruptImageError(path, ct, "compression_type set without its feature bit")


def _refuse_unsupported(path: str, h: Header) -> None:
    """UnsupportedFeatureError for an incompatible feature or refcount width this
    implementation does not handle."""
    unknown = h.incompatible_features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    if unknown:
        names = {
            INCOMPAT_DATA_FILE: "external data file",
            INCOMPAT_COMPRESSION: "compression type",
            INCOMPAT_EXTL2: "extended L2 entries",
        }
        what = ", ".join(names.get(1 << b, f"bit {b}") for b in range(64) if unknown >> b & 1)
        raise UnsupportedFeatureError(f"{path}: unsupported incompatible feature(s): {what}")
    if h.refcount_order != 4:
        width = (
            f"{1 << h.refcount_order} bits"
            if h.refcount_order < 64
            else f"order {h.refcount_order}"
        )  # never build a 2^(2^32)-bit integer
        raise UnsupportedFeatureError(
            f"{path}: refcount width {width} (only 16-bit refcounts are supported)"
        )


def _backing_name(path: str, raw: bytes, v2: Any, cs: int) -> str:
    off, size = v2.backing_file_offset, v2.backing_file_size
    if size == 0 or size > MAX_BACKING_NAME or off + size > cs or off + size > len(raw):
        raise CorruptImageError(
            path,
            _OFF["backing_file_offset"],
            f"backing file name at {off:#x} (+{size}) is "
            "empty, too long or outside the header cluster",
        )
    return bytes(raw[off : off + size]).decode("utf-8", "surrogateescape")


def _validate_tables(path: str, h: Header, file_size: int, creating: bool = False) -> None:
    cs = h.cluster_size
    l2_cover = cs * (cs // 8)
    need = -(-h.size // l2_cover)
    if h.l1_size < need and not creating:
        raise CorruptImageError(
            path, _OFF["l1_size"], f"L1 table too small: {h.l1_size} < {need} entries"
        )
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise CorruptImageError(path, _OFF["l1_size"], f"L1 table too large ({h.l1_size} entries)")
    _check_area(
        path, h.l1_table_offset, h.l1_size * 8, cs, file_size, _OFF["l1_table_offset"], "L1 table"
    )
    if h.refcount_table_clusters == 0:
        raise CorruptImageError(
            path, _OFF["refcount_table_clusters"], "image has no refcount table"
        )
    _check_area(
        path,
        h.refcount_table_offset,
        h.refcount_table_clusters * cs,
        cs,
        file_size,
        _OFF["refcount_table_offset"],
        "refcount table",
    )
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImageError(
            path, _OFF["nb_snapshots"], f"too many snapshots ({h.nb_snapshots})"
        )
    if h.nb_snapshots:
        _check_area(
            path,
            h.snapshots_offset,
            SNAPSHOT_RECORD_SIZE * h.nb_snapshots,
            cs,
            file_size,
            _OFF["snapshots_offset"],
            "snapshot table",
        )


def _check_area(
    path: str, offset: int, length: int, cs: int, file_size: int, field_off: int, what: str
) -> None:
    if length and (offset % cs or offset == 0):
        raise CorruptImageError(path, field_off, f"{what} offset {offset:#x} not cluster aligned")
    if length and offset + length > file_size:
        raise CorruptImageError(
            path,
            offset,
            f"{what} [{offset:#x}, +{length}) lies past the "
            f"end of the file ({file_size}): truncated",
        )


def parse_extensions(path: str, raw: bytes, h: Header) -> list[tuple[int, bytes]]:
    """The header extensions as (type, data) pairs, in file order."""
    if h.version == 2:
        return []
    exts, pos, end = [], h.header_length, min(len(raw), h.cluster_size)
    while pos + 8 <= end:
        e = ExtensionHeader.parse(raw[pos : pos + 8])
        if e.type == EXT_END:
            break
        if pos + 8 + e.length > end:
            raise CorruptImageError(path, pos, f"header extension {e.type:#x} overruns cluster 0")
        exts.append((e.type, bytes(raw[pos + 8 : pos + 8 + e.length])))
        pos += 8 + (e.length + 7) // 8 * 8
    return exts


def parse_snapshot_table(
    path: str, raw: Union[bytes, bytearray], count: int, default_size: int, version: int
) -> tuple[list[SnapshotInfo], int]:
    snaps, pos = [], 0
    for _ in range(count):
        if pos + SNAPSHOT_RECORD_SIZE > len(raw):
            raise CorruptImageError(path, pos, "snapshot table truncated")
        r = SnapshotRecord.parse(raw[pos : pos + SNAPSHOT_RECORD_SIZE])
        pos += SNAPSHOT_RECORD_SIZE
        if r.extra_data_size > MAX_SNAPSHOT_EXTRA:
            raise CorruptImageError(path, pos, "snapshot extra data too large")
        end = pos + r.extra_data_size + r.id_str_size + r.name_size
        if end > len(raw):
            raise CorruptImageError(path, pos, "snapshot table entry truncated")
        extra = bytes(raw[pos : pos + r.extra_data_size])
        pos += r.extra_data_size
        sid = bytes(raw[pos : pos + r.id_str_size]).decode("utf-8", "replace")
        pos += r.id_str_size
        name = bytes(raw[pos : pos + r.name_size]).decode("utf-8", "replace")
        pos = (pos + r.name_size + 7) // 8 * 8
        if version == 3 and len(extra) < 16:
            raise CorruptImageError(path, pos, f"snapshot table entry {sid} is incomplete")
        vm_size = _extra_field(extra, "vm_state_size_large", r.vm_state_size)
        disk_size = _extra_field(extra, "disk_size", default_size)
        created = datetime.datetime.fromtimestamp(
            r.date_sec + r.date_nsec / 1e9, tz=datetime.timezone.utc
        )
        snaps.append(
            SnapshotInfo(
                id=sid,
                name=name,
                created=created,
                size=disk_size,
                vm_state_size=vm_size,
                extra=extra,
                **{f: r[f] for f in _SNAPSHOT_FIELDS},
            )
        )
    return snaps, pos


def _extra_field(extra: bytes, name: str, default: int) -> int:
    """A u64 field of a snapshot's extra data, or `default` when the extra data ends first."""
    off = SNAPSHOT_EXTRA_OFFSET[name]
    if len(extra) < off + S_SNAPSHOT_EXTRA_FIELD.size:
        return default
    value: int = S_SNAPSHOT_EXTRA_FIELD.unpack_from(extra, off)[0]
    return value


def build_snapshot_table(snaps: Sequence[SnapshotInfo]) -> bytes:
    out = bytearray()
    for s in snaps:
        sid, name = s.id.encode(), s.name.encode()
        out += SnapshotRecord.build(
            dict(
                id_str_size=len(sid),
                name_size=len(name),
                vm_state_size=min(s.vm_state_size, 0xFFFFFFFF),
                extra_data_size=len(s.extra),
                **{f: getattr(s, f) for f in _SNAPSHOT_FIELDS},
            )
        )
        out += s.extra + sid + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def snapshot_extra(vm_state_size: int, disk_size: int) -> bytes:
    extra: bytes = SnapshotExtra.build(
        dict(vm_state_size_large=vm_state_size, disk_size=disk_size, icount=0xFFFFFFFFFFFFFFFF)
    )
    return extra
