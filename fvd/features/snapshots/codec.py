"""The snapshot table (docs/format.md section 8): its entries in memory, and their
encoding, by the field names of the declarations in `fvd.ondisk.fvd_records`."""

from __future__ import annotations

import operator
import struct
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple, Optional, Sequence

from fvd.ondisk import format as fmt
from fvd.ondisk import fvd_records as fr
from fvd.ondisk.structs import field_names, span_struct
from fvd.types import SnapshotInfo

TABLE_MAGIC = fr.SNAPSHOT_TABLE_MAGIC
TABLE_HEAD = fr.S_SNAPSHOT_TABLE_HEAD
ENTRY = fr.S_SNAPSHOT_ENTRY_HEAD
EXTRA_BITMAP = fr.S_SNAPSHOT_EXTRA_BITMAP  # extra data of an entry, with a base
EXTRA_GRANULES = fr.S_SNAPSHOT_EXTRA_GRANULES  # extra data of an entry, without a base
assert TABLE_HEAD.size == 32 and ENTRY.size == 64 and EXTRA_BITMAP.size == 16
assert EXTRA_GRANULES.size == 24
ENTRY_OFFSET = fr.SNAPSHOT_ENTRY_OFFSET  # field offsets in an entry, for error messages
MAX_NAME = 255
_OFF_CRC, _S_CRC = span_struct(fr.SnapshotTableHead, "crc", "crc")
_NAMES = {
    s: field_names(con)
    for s, con in (
        (TABLE_HEAD, fr.SnapshotTableHead),
        (ENTRY, fr.SnapshotEntryHead),
        (EXTRA_BITMAP, fr.SnapshotExtraBitmap),
        (EXTRA_GRANULES, fr.SnapshotExtraGranules),
    )
}


# the fields of each layout in declared order, picked from a dict in C (a table of 1,000
# snapshots is encoded at every create and delete)
_ORDER = {s: operator.itemgetter(*names) for s, names in _NAMES.items()}


def unpack(layout: struct.Struct, raw: bytes, pos: int = 0) -> dict[str, int]:
    """The fields of a record at `pos` of `raw`, by their declared names."""
    return dict(zip(_NAMES[layout], layout.unpack_from(raw, pos)))


def pack(layout: struct.Struct, **fields: int) -> bytes:
    """A record from its fields by name (fields left out are 0: reserved)."""
    full = dict.fromkeys(_NAMES[layout], 0)
    full.update(fields)
    return layout.pack(*_ORDER[layout](full))


@dataclass
class Entry:
    """One snapshot of the table, in memory."""

    id: int
    created_ns: int
    size: int
    table_offset: int
    table_crc: int
    name: str
    vm_offset: int
    vm_size: int
    vm_crc: int
    bitmap_offset: int = 0  # copy of the base bitmap (images with a base), else 0
    bitmap_crc: int = 0
    granules_offset: int = 0  # granule record (images without a base), else 0
    granules_size: int = 0
    granules_crc: int = 0
    granules_bad: Optional[tuple[int, str]] = None  # (offset, why) of a record not usable
    granules_provenance: bool = False  # its record, written by this open, has provenance

    def info(self, header: Optional[fmt.ImageHeader] = None) -> SnapshotInfo:
        """The public SnapshotInfo; its uuid derives from the image header's UUID."""
        created = datetime.fromtimestamp(self.created_ns / 1e9, tz=timezone.utc)
        suid = fmt.snapshot_uuid(header, self.id, self.created_ns)
        return SnapshotInfo(self.name, self.id, created, self.size, self.vm_size, uuid=suid)


class TableHead(NamedTuple):
    """The fields of a snapshot table's head that open uses."""

    magic: int
    crc: int
    nb_snapshots: int
    refcount_crc: int
    revert_id: int
    revert_epoch: int


def pad8(n: int) -> int:
    return (n + 7) & ~7


def extra_size(e: Entry) -> int:
    """Bytes of extra data the entry has on disk (a bitmap copy or a granule record)."""
    if e.bitmap_offset:
        return EXTRA_BITMAP.size
    return EXTRA_GRANULES.size if e.granules_offset else 0


def entry_size(e: Entry) -> int:
    return ENTRY.size + extra_size(e) + pad8(len(e.name.encode("utf-8")))


# The entry's fields in declared order, pinned to the declaration: encode_entry packs them
# by position (a table of 1,000 snapshots is encoded at every create and delete).
ENTRY_FIELDS = (
    "id",
    "created_ns",
    "virtual_size",
    "table_offset",
    "table_crc",
    "name_size",
    "extra_size",
    "vm_state_offset",
    "vm_state_size",
    "vm_state_crc",
    "reserved",
)
assert tuple(_NAMES[ENTRY]) == ENTRY_FIELDS


def encode_entry(e: Entry) -> bytes:
    name = e.name.encode("utf-8")
    out = ENTRY.pack(
        e.id,
        e.created_ns,
        e.size,
        e.table_offset,
        e.table_crc,
        len(name),
        extra_size(e),
        e.vm_offset,
        e.vm_size,
        e.vm_crc,
        0,
    )
    if e.bitmap_offset:
        out += pack(EXTRA_BITMAP, bitmap_offset=e.bitmap_offset, bitmap_crc=e.bitmap_crc)
    elif e.granules_offset:
        out += pack(
            EXTRA_GRANULES,
            granules_offset=e.granules_offset,
            granules_size=e.granules_size,
            granules_crc=e.granules_crc,
        )
    return out + name.ljust(pad8(len(name)), b"\0")


def encode_table(
    entries: Sequence[Entry], refcount_crc: int, revert_id: int = 0, revert_epoch: int = 0
) -> bytes:
    head = pack(
        TABLE_HEAD,
        magic=TABLE_MAGIC,
        nb_snapshots=len(entries),
        refcount_crc=refcount_crc,
        revert_id=revert_id,
        revert_epoch=revert_epoch,
    )
    raw = bytearray(head + b"".join(encode_entry(e) for e in entries))
    _S_CRC.pack_into(raw, _OFF_CRC, zlib.crc32(raw))
    return bytes(raw)


def decode_head(raw: bytes) -> Optional[TableHead]:
    """The head of a snapshot table, or None when its magic or checksum is wrong."""
    head = TableHead(**unpack(TABLE_HEAD, raw))
    check = bytearray(raw)
    _S_CRC.pack_into(check, _OFF_CRC, 0)
    if head.magic != TABLE_MAGIC or zlib.crc32(check) != head.crc:
        return None
    return head


def check_name(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"snapshot name must be a str, not {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"snapshot name {name!r} is not valid UTF-8") from None
    if not 1 <= len(raw) <= MAX_NAME:
        raise ValueError(f"snapshot name must be 1..{MAX_NAME} UTF-8 bytes, not {len(raw)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"snapshot name {name!r} contains control characters")
    return name
