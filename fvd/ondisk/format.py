"""On-disk layout of an FVD image (docs/format.md is the specification).

The header record is declared in fvd.ondisk.fvd_records; this module builds, parses and
validates it at open, checkpoint and close (nothing here runs per guest I/O) and lays
out the regions of a new image.
"""

from __future__ import annotations

import uuid
import zlib
from typing import Callable, Optional

from fvd.errors import CorruptImageError, UnsupportedFeatureError
from fvd.ondisk.fvd_records import (  # noqa: F401 (re-exported: the format's vocabulary)
    BASE_FLAG_PREFETCHED,
    BASE_FVD,
    BASE_NONE,
    BASE_QCOW2,
    BASE_RAW,
    HEADER_FIELDS,
    HEADER_OFFSET,
    HEADER_REGION,
    HEADER_SIZE,
    INCOMPAT_BASE,
    INCOMPAT_PARTIAL,
    INCOMPAT_PROVENANCE,
    INCOMPAT_SNAPSHOT_PARTIAL,
    INCOMPAT_SNAPSHOTS,
    INCOMPAT_SPARSE_TABLE,
    INCOMPAT_TABLELESS,
    MAGIC,
    MAGIC_BYTES,
    MAX_PHYS_CHUNKS,
    NO_UUID,
    TABLE_DTYPE,
    UNALLOCATED,
    VERSION,
    ZERO_CHUNK,
    Header,
    ImageHeader,
)
from fvd.ondisk.structs import span_struct, struct_of
from fvd.units import KiB, MiB

ALIGN = 4096  # every region starts on a 4 KiB boundary


KNOWN_INCOMPAT = (
    INCOMPAT_BASE
    | INCOMPAT_SNAPSHOTS
    | INCOMPAT_PARTIAL
    | INCOMPAT_SNAPSHOT_PARTIAL
    | INCOMPAT_PROVENANCE
    | INCOMPAT_TABLELESS
    | INCOMPAT_SPARSE_TABLE
)
# what a table-less image may not have: every one of them lives in or beside the table
TABLELESS_ZERO_FIELDS = (
    "table_offset",
    "table_size",
    "table_crc",
    "snapshot_table_offset",
    "snapshot_table_size",
    "nb_snapshots",
    "refcount_table_offset",
    "refcount_table_size",
    "partial_map_offset",
    "partial_map_size",
    "partial_map_crc",
    "granule_size",
)
KNOWN_COMPAT = 0

BASE_FORMATS = {"raw": BASE_RAW, "fvd": BASE_FVD, "qcow2": BASE_QCOW2}
BASE_FORMAT_NAMES = {v: k for k, v in BASE_FORMATS.items()}

MIN_CHUNK, MAX_CHUNK = 64 * KiB, 256 * MiB
MIN_BLOCK = 512
MIN_GRANULE = 512
DEFAULT_GRANULE = 4096  # granular copy-on-write: a 4 KiB-aligned write copies nothing
MAX_VIRTUAL_SIZE = 1 << 56
MAX_TABLE_ENTRIES = 1 << 31
MAX_BASE_NAME = 4095
DEFAULT_JOURNAL = 16 * MiB
MIN_JOURNAL = 64 * KiB
# A read-write open refuses journal_epoch >= MAX_WRITABLE_EPOCH: every checkpoint adds 1,
# and 2^63 checkpoints leave room below 2^64 that no real image ever reaches.
MAX_WRITABLE_EPOCH = 1 << 63

assert Header.sizeof() == HEADER_SIZE

# magic, version, header_size, header_crc: checked before the whole header is parsed
_S_PREFIX = span_struct(Header, "magic", "header_crc")[1]
_OFF_CRC, _S_CRC = span_struct(Header, "header_crc", "header_crc")
CRC_FIELD = slice(_OFF_CRC, _OFF_CRC + _S_CRC.size)
_HEADER_STRUCT = struct_of(Header)
Need = Callable[[bool, str, str], None]  # need(condition, field, what): raise unless


def image_uuid(h: Optional[ImageHeader]) -> Optional[str]:
    """The header's image UUID as a str, or None (no header, or an image written
    before uuids)."""
    if h is None or h.image_uuid == NO_UUID:
        return None
    return str(uuid.UUID(bytes=bytes(h.image_uuid)))


def snapshot_uuid(h: Optional[ImageHeader], snapshot_id: int, created_ns: int) -> Optional[str]:
    """A snapshot's UUID (docs/format.md section 8, "Snapshot identity"): UUID version 5
    of the image's UUID and the snapshot's id and creation time, which ids never reused
    make unique; None while the image has no UUID."""
    img = image_uuid(h)
    if img is None:
        return None
    return str(uuid.uuid5(uuid.UUID(img), f"fvd-snapshot {snapshot_id} {created_ns}"))


def new_image_uuid() -> bytes:
    return uuid.uuid4().bytes


def is_tableless(h: ImageHeader) -> bool:
    """A table-less image (docs/format.md, "Table-less images"): no lookup table."""
    return bool(h.incompatible_features & INCOMPAT_TABLELESS)


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def int_field(h: ImageHeader, name: str) -> int:
    """An integer field named at run time (region lists, error messages)."""
    value = getattr(h, name)
    if not isinstance(value, int):
        raise TypeError(f"header field {name!r} is not an integer")
    return value


def header_crc(raw: bytes | bytearray | memoryview) -> int:
    """crc32 of the header bytes with the checksum field read as zero."""
    raw = bytearray(raw[:HEADER_SIZE])
    _S_CRC.pack_into(raw, _OFF_CRC, 0)
    return zlib.crc32(raw)


def build_header(h: ImageHeader) -> bytes:
    """Serialise a header with its checksum (magic, version and header size are this
    code's whatever the record holds)."""
    # the struct twin of Header: a header is written at every checkpoint and snapshot
    # operation, where construct's interpreter costs ~0.15 ms a call (same bytes)
    h = h.replace(magic=MAGIC, version=VERSION, header_size=HEADER_SIZE, header_crc=0)
    raw = bytearray(_HEADER_STRUCT.pack(*[getattr(h, n) for n in HEADER_FIELDS]))
    _S_CRC.pack_into(raw, _OFF_CRC, header_crc(raw))
    return bytes(raw)


def parse_header(raw: bytes, path: str, file_size: int) -> ImageHeader:
    """Parse and validate a header; raises CorruptImageError / UnsupportedFeatureError."""
    if len(raw) < HEADER_SIZE:
        raise CorruptImageError(path, 0, f"file is {len(raw)} bytes, shorter than a header")
    magic, version, _size, stored = _S_PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise CorruptImageError(path, 0, "bad magic: not an FVD image")
    if version != VERSION:
        raise UnsupportedFeatureError(
            f"{path}: FVD version {version} is not supported (this code reads version {VERSION})"
        )
    if stored != header_crc(raw):
        raise CorruptImageError(path, _OFF_CRC, "header checksum mismatch")
    h = ImageHeader.from_bytes(raw)
    unknown = h.incompatible_features & ~KNOWN_INCOMPAT
    if unknown:
        raise UnsupportedFeatureError(f"{path}: unknown incompatible feature bits {unknown:#x}")
    validate_header(h, path, file_size)
    return h


def _need(cond: bool, path: str, offset: int, what: str) -> None:
    if not cond:
        raise CorruptImageError(path, offset, what)


# Byte offset of each header field, for error messages.
FIELD_OFFSET = HEADER_OFFSET


def validate_header(h: ImageHeader, path: str, file_size: int) -> None:
    """Check sizes and regions so later code can trust them."""

    def need(cond: bool, field: str, what: str) -> None:
        _need(cond, path, FIELD_OFFSET[field], what)

    _validate_geometry(h, need)
    has_base = _validate_base(h, need)
    _validate_regions(h, need, has_base)
    _validate_partial_map(h, need, file_size)


def _validate_geometry(h: ImageHeader, need: Need) -> None:
    """Header, chunk, block and virtual sizes, and the table region that covers them."""
    need(h.header_size == HEADER_SIZE, "header_size", "bad header size")
    cs, bs, vs = h.chunk_size, h.block_size, h.virtual_size
    need(
        is_power_of_two(cs) and MIN_CHUNK <= cs <= MAX_CHUNK,
        "chunk_size",
        f"chunk size {cs} is not a power of two in [{MIN_CHUNK}, {MAX_CHUNK}]",
    )
    need(
        is_power_of_two(bs) and MIN_BLOCK <= bs <= cs,
        "block_size",
        f"block size {bs} is not a power of two in [{MIN_BLOCK}, chunk size]",
    )
    need(0 < vs <= MAX_VIRTUAL_SIZE, "virtual_size", f"virtual size {vs} out of range")
    nchunks = -(-vs // cs)
    need(nchunks <= MAX_TABLE_ENTRIES, "virtual_size", "too many chunks")
    if is_tableless(h):
        _validate_tableless(h, need)
    else:
        need(h.table_size >= 4 * nchunks, "table_size", "table region smaller than the table")


def _validate_base(h: ImageHeader, need: Need) -> bool:
    """The base format and its fields; True when the image has a base."""
    bs = h.block_size
    need(
        h.base_format in (BASE_NONE, BASE_RAW, BASE_FVD, BASE_QCOW2),
        "base_format",
        f"unknown base format {h.base_format}",
    )
    has_base = h.base_format != BASE_NONE
    need(
        has_base == bool(h.incompatible_features & INCOMPAT_BASE),
        "incompatible_features",
        "base feature bit does not match the base format",
    )
    if has_base:
        need(0 < h.base_name_size <= MAX_BASE_NAME, "base_name_size", "bad base name size")
        need(
            h.bitmap_size * 8 * bs >= h.base_size,
            "bitmap_size",
            "bitmap too small for the base size",
        )
    return has_base


def _validate_regions(h: ImageHeader, need: Need, has_base: bool) -> None:
    """Journal size, then every metadata region: aligned, disjoint, before the data."""
    need(
        h.journal_size >= MIN_JOURNAL and h.journal_size % 512 == 0,
        "journal_size",
        "bad journal size",
    )
    regions = [("journal_offset", "journal_size")]
    if not is_tableless(h):
        regions.append(("table_offset", "table_size"))
    if has_base:
        regions += [("base_name_offset", "base_name_size"), ("bitmap_offset", "bitmap_size")]
    for off_field, size_field in regions:
        off, size = int_field(h, off_field), int_field(h, size_field)
        need(off >= HEADER_REGION and off % 512 == 0, off_field, f"{off_field} {off} is invalid")
        need(off + size <= h.data_offset, off_field, f"{off_field} region overlaps the data area")
    # regions may not share bytes: a table write would land in the bitmap or the journal
    spans = sorted((int_field(h, o), int_field(h, o) + int_field(h, n), o) for o, n in regions)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        need(
            end <= start,
            second,
            f"{second.replace('_offset', '')} region overlaps the "
            f"{first.replace('_offset', '')} region",
        )
    need(h.data_offset % ALIGN == 0, "data_offset", "data offset not aligned")


def _validate_partial_map(h: ImageHeader, need: Need, file_size: int) -> None:
    """Granule size, the partial-chunk map's place, and a file that holds the header's
    data offset."""
    cs = h.chunk_size
    gs = h.granule_size
    need(
        gs == 0 or (is_power_of_two(gs) and MIN_GRANULE <= gs <= cs and cs // gs <= 65536),
        "granule_size",
        f"granule size {gs} is not a power of two in [{MIN_GRANULE}, "
        f"chunk size] with at most 65536 granules per chunk",
    )
    po, ps = h.partial_map_offset, h.partial_map_size
    need((po == 0) == (ps == 0), "partial_map_offset", "partial map offset and size disagree")
    need(
        po == 0
        or (
            po >= h.data_offset
            and (po - h.data_offset) % cs == 0
            and po + ps <= file_size
            and gs > 0
        ),
        "partial_map_offset",
        f"partial map [{po}, {po + ps}) is outside the data area or the file ({file_size} bytes)",
    )
    need(
        h.data_offset <= file_size,
        "data_offset",
        f"file is truncated: {file_size} bytes, data area starts at {h.data_offset}",
    )


def _validate_tableless(h: ImageHeader, need: Need) -> None:
    """A table-less header: no table, snapshot or partial-map field, no bit of theirs."""
    for name in TABLELESS_ZERO_FIELDS:
        need(int_field(h, name) == 0, name, f"{name} must be 0 in a table-less image")
    others = (
        INCOMPAT_SNAPSHOTS
        | INCOMPAT_PARTIAL
        | INCOMPAT_SNAPSHOT_PARTIAL
        | INCOMPAT_PROVENANCE
        | INCOMPAT_SPARSE_TABLE
    )
    need(
        not h.incompatible_features & others,
        "incompatible_features",
        "a table-less image cannot hold snapshots or partial chunks",
    )


def layout(
    size: int,
    chunk_size: int,
    block_size: int,
    base_size: int = 0,
    base_name_size: int = 0,
    journal_size: Optional[int] = None,
    table: bool = True,
) -> dict[str, int]:
    """Region offsets and sizes for a new image (no table region with table=False);
    returns header fields."""
    nchunks = -(-size // chunk_size)
    pos = HEADER_REGION
    fields: dict[str, int] = {}
    if base_name_size:
        fields.update(base_name_offset=pos, base_name_size=base_name_size)
        pos += round_up(base_name_size, ALIGN)
        nblocks = -(-base_size // block_size)
        bitmap_size = round_up(-(-nblocks // 8), ALIGN)
        fields.update(bitmap_offset=pos, bitmap_size=bitmap_size, base_size=base_size)
        pos += bitmap_size
    if table:
        table_size = round_up(4 * nchunks, ALIGN)
        fields.update(table_offset=pos, table_size=table_size)
        pos += table_size
    if journal_size is None:
        journal_size = DEFAULT_JOURNAL
    journal_size = round_up(journal_size, 512)
    fields.update(journal_offset=pos, journal_size=journal_size)
    pos += journal_size
    fields["data_offset"] = round_up(pos, min(chunk_size, MiB))
    return fields
