"""qcow2 v2/v3 on-disk structures for the QCOW2 baseline (big-endian throughout).

`construct` parses and builds the header and the snapshot-table records; that only
happens at open, close and snapshot create/delete, never per guest I/O.  Per-I/O
metadata (L1, L2 tables, refcount blocks) lives in numpy arrays with '>u8' / '>u2' dtypes.
"""

import datetime
from dataclasses import dataclass, field

from construct import Bytes, Int16ub, Int32ub, Int64ub, Struct

from fvd.errors import CorruptImageError, UnsupportedFeatureError
from fvd.types import SnapshotInfo

MAGIC = b"QFI\xfb"
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
V3_HEADER_LENGTH = 112  # what QEMU 7.2 writes (104 + compression type + padding)
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024

# L1 / L2 / refcount-table entry bits (qcow2.rst; same values as QEMU's block/qcow2.h).
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# Feature bits (plain ints).
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0

# Header field offsets used for small in-place updates (as QEMU does them).
OFF_L1_SIZE = 36  # l1_size (u32) + l1_table_offset (u64): 12 bytes
OFF_REFTABLE = 48  # refcount_table_offset (u64) + clusters (u32): 12 bytes
OFF_SNAPSHOTS = 60  # nb_snapshots (u32) + snapshots_offset (u64): 12 bytes
OFF_INCOMPAT = 72

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

HeaderV2 = Struct(
    "magic" / Bytes(4),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)

HeaderV3Tail = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)

ExtensionHeader = Struct("type" / Int32ub, "length" / Int32ub)

SnapshotRecord = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)
SNAPSHOT_RECORD_SIZE = 40
SnapshotExtra = Struct("vm_state_size_large" / Int64ub, "disk_size" / Int64ub, "icount" / Int64ub)


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
    extensions: list = field(default_factory=list)  # [(type, bytes)] as found
    backing_file: str = ""  # as stored (relative to the image's directory)
    backing_format: str = ""  # from the 0xE2792ACA extension, "" when absent

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits


MAX_BACKING_NAME = 1023  # QEMU's limit


def build_header(h):
    """Header bytes; with a backing file also the backing-format extension, the end
    marker and the backing file name (QEMU's layout: name right after the extensions).
    Without one, the zero bytes after the header are the end marker."""
    name = h.backing_file.encode()
    tail = b""
    if name:
        if len(name) > MAX_BACKING_NAME:
            raise ValueError(f"backing file name longer than {MAX_BACKING_NAME} bytes")
        fmt = h.backing_format.encode()
        if fmt:
            tail += ExtensionHeader.build(dict(type=EXT_BACKING_FORMAT, length=len(fmt)))
            tail += fmt + bytes(-len(fmt) % 8)
        tail += bytes(8)  # end of extensions
    name_off = h.header_length + len(tail) if name else 0
    if name_off + len(name) > h.cluster_size:
        raise ValueError("backing file name does not fit in the header cluster")
    out = HeaderV2.build(
        dict(
            magic=MAGIC,
            version=h.version,
            backing_file_offset=name_off,
            backing_file_size=len(name),
            cluster_bits=h.cluster_bits,
            size=h.size,
            crypt_method=0,
            l1_size=h.l1_size,
            l1_table_offset=h.l1_table_offset,
            refcount_table_offset=h.refcount_table_offset,
            refcount_table_clusters=h.refcount_table_clusters,
            nb_snapshots=h.nb_snapshots,
            snapshots_offset=h.snapshots_offset,
        )
    )
    out += HeaderV3Tail.build(
        dict(
            incompatible_features=h.incompatible_features,
            compatible_features=h.compatible_features,
            autoclear_features=h.autoclear_features,
            refcount_order=h.refcount_order,
            header_length=h.header_length,
        )
    )
    out += bytes(h.header_length - len(out))  # compression type 0 + padding
    return out + tail + name


def parse_header(path, raw, file_size, creating=False):
    """Parse and validate cluster 0 (`raw` holds at least its first bytes)."""
    if len(raw) < 72:
        raise CorruptImageError(path, 0, "file too short for a qcow2 header (truncated)")
    if raw[:4] != MAGIC:
        raise CorruptImageError(path, 0, f"bad magic {bytes(raw[:4])!r}, not a qcow2 image")
    v2 = HeaderV2.parse(raw[:72])
    if v2.version not in (2, 3):
        raise UnsupportedFeatureError(f"{path}: qcow2 version {v2.version} is not supported")
    if not MIN_CLUSTER_BITS <= v2.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImageError(path, 20, f"cluster_bits {v2.cluster_bits} out of range 9..21")
    h = Header(
        version=v2.version,
        cluster_bits=v2.cluster_bits,
        size=v2.size,
        l1_size=v2.l1_size,
        l1_table_offset=v2.l1_table_offset,
        refcount_table_offset=v2.refcount_table_offset,
        refcount_table_clusters=v2.refcount_table_clusters,
        nb_snapshots=v2.nb_snapshots,
        snapshots_offset=v2.snapshots_offset,
        header_length=72,
    )
    cs = h.cluster_size
    if v2.version == 3:
        if len(raw) < 104:
            raise CorruptImageError(path, 72, "v3 header truncated")
        t = HeaderV3Tail.parse(raw[72:104])
        h.incompatible_features = t.incompatible_features
        h.compatible_features = t.compatible_features
        h.autoclear_features = t.autoclear_features
        h.refcount_order = t.refcount_order
        h.header_length = t.header_length
        if h.header_length < 104 or h.header_length % 8 or h.header_length > cs:
            raise CorruptImageError(path, 100, f"bad header_length {h.header_length}")
        if h.header_length > 104 and len(raw) > 104 and raw[104] != 0:
            if not h.incompatible_features & INCOMPAT_COMPRESSION:
                raise CorruptImageError(path, 104, "compression_type set without its feature bit")
    if v2.crypt_method:
        raise UnsupportedFeatureError(f"{path}: encrypted qcow2 images are not supported")
    if v2.backing_file_offset:
        h.backing_file = _backing_name(path, raw, v2, cs)
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
    _validate_tables(path, h, file_size, creating)
    h.extensions = parse_extensions(path, raw, h)
    for t, data in h.extensions:
        if t == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("utf-8", "replace")
    return h


def _backing_name(path, raw, v2, cs):
    off, size = v2.backing_file_offset, v2.backing_file_size
    if size == 0 or size > MAX_BACKING_NAME or off + size > cs or off + size > len(raw):
        raise CorruptImageError(
            path,
            8,
            f"backing file name at {off:#x} (+{size}) is "
            "empty, too long or outside the header cluster",
        )
    return bytes(raw[off : off + size]).decode("utf-8", "surrogateescape")


def _validate_tables(path, h, file_size, creating=False):
    cs = h.cluster_size
    l2_cover = cs * (cs // 8)
    need = -(-h.size // l2_cover)
    if h.l1_size < need and not creating:
        raise CorruptImageError(path, 36, f"L1 table too small: {h.l1_size} < {need} entries")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise CorruptImageError(path, 36, f"L1 table too large ({h.l1_size} entries)")
    _check_area(path, h.l1_table_offset, h.l1_size * 8, cs, file_size, 40, "L1 table")
    if h.refcount_table_clusters == 0:
        raise CorruptImageError(path, 56, "image has no refcount table")
    _check_area(
        path,
        h.refcount_table_offset,
        h.refcount_table_clusters * cs,
        cs,
        file_size,
        48,
        "refcount table",
    )
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImageError(path, 60, f"too many snapshots ({h.nb_snapshots})")
    if h.nb_snapshots:
        _check_area(
            path,
            h.snapshots_offset,
            SNAPSHOT_RECORD_SIZE * h.nb_snapshots,
            cs,
            file_size,
            64,
            "snapshot table",
        )


def _check_area(path, offset, length, cs, file_size, field_off, what):
    if length and (offset % cs or offset == 0):
        raise CorruptImageError(path, field_off, f"{what} offset {offset:#x} not cluster aligned")
    if length and offset + length > file_size:
        raise CorruptImageError(
            path,
            offset,
            f"{what} [{offset:#x}, +{length}) lies past the "
            f"end of the file ({file_size}): truncated",
        )


def parse_extensions(path, raw, h):
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


def parse_snapshot_table(path, raw, count, default_size, version):
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
        vm_size, disk_size = r.vm_state_size, default_size
        if len(extra) >= 8:
            vm_size = int.from_bytes(extra[:8], "big")
        if len(extra) >= 16:
            disk_size = int.from_bytes(extra[8:16], "big")
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
                l1_table_offset=r.l1_table_offset,
                l1_size=r.l1_size,
                vm_clock_nsec=r.vm_clock_nsec,
                date_sec=r.date_sec,
                date_nsec=r.date_nsec,
                extra=extra,
            )
        )
    return snaps, pos


def build_snapshot_table(snaps):
    out = bytearray()
    for s in snaps:
        sid, name = s.id.encode(), s.name.encode()
        out += SnapshotRecord.build(
            dict(
                l1_table_offset=s.l1_table_offset,
                l1_size=s.l1_size,
                id_str_size=len(sid),
                name_size=len(name),
                date_sec=s.date_sec,
                date_nsec=s.date_nsec,
                vm_clock_nsec=s.vm_clock_nsec,
                vm_state_size=min(s.vm_state_size, 0xFFFFFFFF),
                extra_data_size=len(s.extra),
            )
        )
        out += s.extra + sid + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def snapshot_extra(vm_state_size, disk_size):
    return SnapshotExtra.build(
        dict(vm_state_size_large=vm_state_size, disk_size=disk_size, icount=0xFFFFFFFFFFFFFFFF)
    )
