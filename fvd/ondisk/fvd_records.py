"""Every on-disk record of an FVD image, declared once with construct.

docs/format.md is the specification; the field names here are its field names, and each
layout table there carries an ``<!-- ondisk: Name -->`` marker naming the declaration
below (tests/ondisk/test_records.py checks offsets, types and names against the tables). All
integers are little-endian.

Code that packs or parses a record per I/O (a journal sector on every writethrough
allocation) uses the `struct.Struct` derived from the declaration (`S_*` below, made by
fvd.ondisk.structs.struct_of): same bytes, struct's speed, one declaration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any

from construct import (
    Array,
    Bytes,
    Const,
    Error,
    GreedyRange,
    Int16ul,
    Int32ul,
    Int64ul,
    Padded,
    Padding,
    Pass,
    Struct,
    Switch,
    this,
)

from fvd import _shared
from fvd.ondisk.structs import dtype_of, offsets, record_fields, record_struct, struct_of

SECTOR = 512


def _sized(*names: str) -> list[Any]:
    """Fields of bytes, each as long as the record's `<name>_size` field says."""
    return [name / Bytes(this[f"{name}_size"]) for name in names]


def _row(name: str) -> tuple[Any, Any]:
    """A bit row of the partial map (`row_bytes` long: parse and build with
    row_bytes=partial_row_bytes(...)), zero-padded to a multiple of 8 bytes."""
    return name / Bytes(this._params.row_bytes), Padding(lambda ctx: -ctx._params.row_bytes % 8)


# ----- 2. Header (offset 0, one checksummed sector) ---------------------------------------
MAGIC = 0x5143F5A9  # on disk: A9 F5 43 51 (the 2011 FVD magic)
VERSION = 2
HEADER_SIZE = 512  # bytes covered by the header checksum (one sector: atomic)
HEADER_REGION = 4096  # the header region; the rest is reserved zeros
MAGIC_BYTES = Int32ul.build(MAGIC)  # what a format probe looks for at offset 0

# incompatible_features: a reader that does not know a bit must refuse the image
INCOMPAT_BASE = 1 << 0  # unwritten blocks come from a base image
INCOMPAT_SNAPSHOTS = 1 << 1  # chunks may be shared with snapshots (copy on write)
INCOMPAT_PARTIAL = 1 << 2  # partly copied chunks may exist (fvd.granular)
INCOMPAT_SNAPSHOT_PARTIAL = 1 << 3  # snapshots hold partial chunks (granule records)
INCOMPAT_PROVENANCE = 1 << 4  # granule records may carry a provenance section
INCOMPAT_TABLELESS = 1 << 5  # no lookup table: guest offset x at data_offset + x
INCOMPAT_SPARSE_TABLE = 1 << 6  # lookup tables stored inverted: unallocated is zeros (a hole)
# base_format
BASE_NONE, BASE_RAW, BASE_FVD, BASE_QCOW2 = 0, 1, 2, 3
# base_flags
BASE_FLAG_PREFETCHED = 1 << 0  # every base block is in the image; the base is not opened

U32 = Annotated[int, Int32ul]
U64 = Annotated[int, Int64ul]
NO_UUID = bytes(16)  # header image_uuid of an image written by fvd before uuids


@dataclass(frozen=True)
class ImageHeader:
    """The header (section 2), declared once: each field with the spec's name and its
    construct type, in on-disk order. `Header` (the construct record) is made from these
    annotations, so parsing goes through construct; an update is `h.replace(...)`."""

    magic: Annotated[int, Const(MAGIC, Int32ul)] = MAGIC
    version: U32 = VERSION
    header_size: U32 = HEADER_SIZE
    header_crc: U32 = 0
    incompatible_features: U64 = 0
    compatible_features: U64 = 0
    virtual_size: U64 = 0
    chunk_size: U32 = 0
    block_size: U32 = 0
    clean_shutdown: U32 = 0
    base_format: U32 = 0
    base_name_offset: U64 = 0
    base_name_size: U32 = 0
    base_flags: U32 = 0
    base_size: U64 = 0
    bitmap_offset: U64 = 0
    bitmap_size: U64 = 0
    table_offset: U64 = 0
    table_size: U64 = 0
    journal_offset: U64 = 0
    journal_size: U64 = 0
    journal_epoch: U64 = 0
    snapshot_table_offset: U64 = 0
    snapshot_table_size: U64 = 0
    nb_snapshots: U32 = 0
    reserved: U32 = 0
    refcount_table_offset: U64 = 0
    refcount_table_size: U64 = 0
    data_offset: U64 = 0
    next_snapshot_id: U64 = 0
    table_crc: U32 = 0
    bitmap_crc: U32 = 0
    partial_map_offset: U64 = 0
    partial_map_size: U64 = 0
    partial_map_crc: U32 = 0
    granule_size: U32 = 0
    # RFC 4122 bytes; zeros: none yet (older images)
    image_uuid: Annotated[bytes, Bytes(16)] = NO_UUID

    @classmethod
    def from_bytes(cls, raw: bytes) -> ImageHeader:
        """The record in the first HEADER_SIZE bytes of `raw`, through the construct
        declaration; nothing is validated (fvd.ondisk.format.parse_header does that)."""
        fields = Header.parse(raw[:HEADER_SIZE])
        return cls(**{name: fields[name] for name in HEADER_FIELDS})

    def replace(self, **changes: int | bytes) -> ImageHeader:
        """A copy with `changes` (field names) applied. A plain copy of the fields, not
        dataclasses.replace (whose __init__ of 40 frozen fields costs ~40 us a call: a
        snapshot create or delete replaces the header several times)."""
        unknown = changes.keys() - _HEADER_FIELD_SET
        if unknown:
            raise TypeError(f"ImageHeader has no field {sorted(unknown)[0]!r}")
        new = object.__new__(ImageHeader)
        new.__dict__.update(self.__dict__, **changes)
        return new


HEADER_FIELDS = record_fields(ImageHeader)  # the field names, in on-disk order
_HEADER_FIELD_SET = frozenset(f.name for f in dataclasses.fields(ImageHeader))
Header = record_struct(ImageHeader, HEADER_SIZE)  # the construct record: reserved zeros pad it
HEADER_OFFSET = offsets(Header)  # byte offset of each field (error messages name it)

# ----- 3. Lookup table: one entry per virtual chunk -----------------------------------------
TableEntry = Int32ul
UNALLOCATED = 0xFFFFFFFF  # reads from the base image (or zeros without one)
ZERO_CHUNK = _shared.ZERO_CHUNK  # 0xFFFFFFFE: reads as zeros, never from the base
MAX_PHYS_CHUNKS = 0xFFFFFFF0  # physical chunk indexes are below this
LookupTable = GreedyRange(TableEntry)
TABLE_DTYPE = dtype_of(TableEntry)  # numpy arrays of lookup tables: '<u4'

# ----- 4. Journal: 512-byte self-checking sectors ---------------------------------------------
JOURNAL_MAGIC = 0x4A445646  # "FVDJ"
JournalSectorHead = Struct(
    "magic" / Const(JOURNAL_MAGIC, Int32ul),
    "crc" / Int32ul,  # crc32 of the sector with this field read as 0
    "epoch" / Int64ul,
    "seq" / Int64ul,
    "tx_remaining" / Int16ul,
    "nrecords" / Int16ul,
    "reserved" / Int32ul,
)
JournalRecordHead = Struct("type" / Int32ul, "count" / Int32ul, "start" / Int64ul)

REC_TABLE, REC_BITMAP, REC_DATA_CRC, REC_GRANULE = 1, 2, 3, 4
TablePayload = Array(this.count, TableEntry)  # `count` lookup-table entries
BitmapPayload = Pass  # none: bits start .. start + count - 1 become 1
DataCrcPayload = Struct("crc" / Int32ul)
GranulePayload = Struct("front_chunk" / Int32ul, "source_chunk" / Int32ul)
JOURNAL_RECORDS = {
    REC_TABLE: ("TABLE", TablePayload),
    REC_BITMAP: ("BITMAP", BitmapPayload),
    REC_DATA_CRC: ("DATA_CRC", DataCrcPayload),
    REC_GRANULE: ("GRANULE", GranulePayload),
}
JournalRecord = Struct(
    *JournalRecordHead.subcons,
    "payload" / Switch(this.type, {t: p for t, (_, p) in JOURNAL_RECORDS.items()}, default=Error),
)
# A whole sector, records included, zero-padded (the crc is computed by fvd.journal).
JournalSector = Padded(
    SECTOR, Struct(*JournalSectorHead.subcons, "records" / Array(this.nrecords, JournalRecord))
)

# ----- 8. Snapshots --------------------------------------------------------------------------
SNAPSHOT_TABLE_MAGIC = 0x53445646  # "FVDS"
SnapshotTableHead = Struct(
    "magic" / Const(SNAPSHOT_TABLE_MAGIC, Int32ul),
    "crc" / Int32ul,  # crc32 of the whole table with this field read as 0
    "nb_snapshots" / Int32ul,
    "refcount_crc" / Int32ul,
    "revert_id" / Int64ul,
    "revert_epoch" / Int64ul,
)
SnapshotEntryHead = Struct(
    "id" / Int64ul,
    "created_ns" / Int64ul,
    "virtual_size" / Int64ul,
    "table_offset" / Int64ul,
    "table_crc" / Int32ul,
    "name_size" / Int16ul,
    "extra_size" / Int16ul,
    "vm_state_offset" / Int64ul,
    "vm_state_size" / Int64ul,
    "vm_state_crc" / Int32ul,
    "reserved" / Int32ul,
)
# Extra data of an entry in an image with a base (the first 16 extra bytes).
SnapshotExtraBitmap = Struct(
    "bitmap_offset" / Int64ul, "bitmap_crc" / Int32ul, "reserved" / Int32ul
)
# Extra data of an entry in an image without a base: where its granule record lies (the
# partial chunks the front had when the snapshot was taken, encoded as a PartialMap).
SnapshotExtraGranules = Struct(
    "granules_offset" / Int64ul,
    "granules_size" / Int64ul,
    "granules_crc" / Int32ul,
    "reserved" / Int32ul,
)
SnapshotEntry = Struct(
    *SnapshotEntryHead.subcons,
    *_sized("extra", "name"),
    Padding(lambda ctx: -ctx.name_size % 8),
)
SNAPSHOT_TABLE_HEAD_OFFSET = offsets(SnapshotTableHead)
SNAPSHOT_ENTRY_OFFSET = offsets(SnapshotEntry)  # up to `extra` (the first variable field)
SNAPSHOT_EXTRA_BITMAP_OFFSET = offsets(SnapshotExtraBitmap)  # from the start of extra
SNAPSHOT_EXTRA_GRANULES_OFFSET = offsets(SnapshotExtraGranules)  # from the start of extra
SnapshotTable = Struct(
    *SnapshotTableHead.subcons, "entries" / Array(this.nb_snapshots, SnapshotEntry)
)

RefcountEntry = Int16ul  # refcount table: one per physical chunk, cut after the last nonzero
REFCOUNT_MAX = 0xFFFF
RefcountTable = GreedyRange(RefcountEntry)
REFCOUNT_DTYPE = dtype_of(RefcountEntry)  # '<u2'

# ----- 10. Partial map ----------------------------------------------------------------------
PARTIAL_MAP_MAGIC = 0x50445646  # "FVDP"
PartialMapHead = Struct(
    "magic" / Const(PARTIAL_MAP_MAGIC, Int32ul),
    "count" / Int32ul,
    "granule_size" / Int32ul,
    "flags" / Int32ul,  # bit 0: a provenance section follows the entries (records only)
)
PARTIAL_MAP_FLAG_PROVENANCE = 1 << 0
# One per entry, in the entries' order, after them (granule records with flag bit 0).
ProvenanceEntry = Struct("origin_chunk" / Int32ul, "reserved" / Int32ul, *_row("carried"))
PartialMapEntryHead = Struct("virtual_chunk" / Int32ul, "source_chunk" / Int32ul)
# An entry with its bit row; parse / build with row_bytes=partial_row_bytes(...).
PartialMapEntry = Struct(*PartialMapEntryHead.subcons, *_row("bits"))
PartialMap = Struct(*PartialMapHead.subcons, "entries" / Array(this.count, PartialMapEntry))


# ----- 11. Backup record -------------------------------------------------------------------
BACKUP_RECORD_MAGIC = 0x42445646  # "FVDB"
BACKUP_RECORD_OFFSET = 512  # in an fvd image: the header region after the header
BACKUP_RECORD_VERSION = 1
QCOW2_EXT_FVD_BACKUP = 0x46564442  # the same bytes as a qcow2 header extension ("FVDB")
BackupRecordHead = Struct(
    "magic" / Const(BACKUP_RECORD_MAGIC, Int32ul),
    "crc" / Int32ul,  # crc32 of the `size` bytes with this field read as 0
    "size" / Int32ul,
    "version" / Int32ul,
    "image_uuid" / Bytes(16),
    "snapshot_uuid" / Bytes(16),
    "since_uuid" / Bytes(16),
    "snapshot_name_size" / Int16ul,
    "since_name_size" / Int16ul,
    "reserved" / Int32ul,
)
BackupRecord = Struct(
    *BackupRecordHead.subcons,
    *_sized("snapshot_name", "since_name"),
    Padding(lambda ctx: -(ctx.snapshot_name_size + ctx.since_name_size) % 8),
)


def partial_row_bytes(chunk_size: int, granule_size: int) -> int:
    """Bytes of one bit row of the partial map: ceil(granules per chunk / 8)."""
    return -(-(chunk_size // granule_size) // 8)


# ----- struct twins for the code that packs / parses these per I/O --------------------------
S_JOURNAL_SECTOR_HEAD = struct_of(JournalSectorHead)
S_JOURNAL_RECORD_HEAD = struct_of(JournalRecordHead)
S_TABLE_ENTRY = struct_of(TableEntry)
S_DATA_CRC = struct_of(DataCrcPayload)
S_GRANULE = struct_of(GranulePayload)
S_SNAPSHOT_TABLE_HEAD = struct_of(SnapshotTableHead)
S_SNAPSHOT_ENTRY_HEAD = struct_of(SnapshotEntryHead)
S_SNAPSHOT_EXTRA_BITMAP = struct_of(SnapshotExtraBitmap)
S_SNAPSHOT_EXTRA_GRANULES = struct_of(SnapshotExtraGranules)
S_PARTIAL_MAP_HEAD = struct_of(PartialMapHead)
S_PARTIAL_MAP_ENTRY_HEAD = struct_of(PartialMapEntryHead)
S_BACKUP_RECORD_HEAD = struct_of(BackupRecordHead)

# The records docs/format.md lays out, by the name its <!-- ondisk: ... --> markers use.
RECORDS = {
    "Header": Header,
    "TableEntry": TableEntry,
    "JournalSectorHead": JournalSectorHead,
    "JournalRecordHead": JournalRecordHead,
    "TablePayload": TablePayload,
    "DataCrcPayload": DataCrcPayload,
    "GranulePayload": GranulePayload,
    "SnapshotTableHead": SnapshotTableHead,
    "SnapshotEntry": SnapshotEntry,
    "SnapshotExtraBitmap": SnapshotExtraBitmap,
    "SnapshotExtraGranules": SnapshotExtraGranules,
    "RefcountEntry": RefcountEntry,
    "PartialMapHead": PartialMapHead,
    "PartialMapEntry": PartialMapEntry,
    "ProvenanceEntry": ProvenanceEntry,
    "BackupRecord": BackupRecord,
}
