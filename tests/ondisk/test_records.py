"""The on-disk record declarations (fvd/ondisk): round trips, struct twins, known byte
vectors cross-checked against files the library (and qemu-img) writes, sizes from the
spec, and docs/format.md's layout tables checked against the declarations."""

import dataclasses
import os
import re
import shutil
import subprocess
import uuid
import zlib
from pathlib import Path

import construct
import pytest

import fvd
from fvd import qcow2
from fvd.backupinfo import BackupInfo, decode_record, encode_record
from fvd.core import journal
from fvd.features import snapshots
from fvd.features.granular import PartialState, decode_map, decode_provenance
from fvd.ondisk import format as fmt
from fvd.ondisk import fvd_records as fr
from fvd.ondisk import qcow2_records as qr
from fvd.ondisk.structs import (
    array_struct,
    bit_mask,
    dtype_of,
    field_names,
    offset_of,
    offsets,
    span_struct,
    struct_of,
)
from fvd.qcow2 import format as qcow2_format

KiB, MiB = 1 << 10, 1 << 20
SPEC = Path(__file__).resolve().parents[2] / "docs" / "format.md"
QEMU_IMG = shutil.which("qemu-img")


def fixed_records(module):
    """{name: declaration} of the module's fixed-size construct Structs."""
    out = {}
    for name, obj in vars(module).items():
        if isinstance(obj, construct.Struct):
            try:
                obj.sizeof()
            except construct.SizeofError:
                continue
            out[f"{module.__name__.split('.')[-1]}.{name}"] = obj
    return out


FIXED = {**fixed_records(fr), **fixed_records(qr)}


def sample_values(con):
    """Distinct nonzero values for every field of a fixed-size record (consts as declared)."""
    values = {}
    for i, sc in enumerate(con.subcons):
        if not sc.name:
            continue
        inner = sc.subcon
        if isinstance(inner, construct.Const):
            values[sc.name] = inner.value
        elif isinstance(inner, construct.Bytes):
            values[sc.name] = bytes((i * 7 + j) % 251 + 1 for j in range(inner.length))
        else:
            bits = 8 * inner.sizeof()
            values[sc.name] = (0x0123456789ABCDEF * (i + 1) + i) % (1 << bits) or 1
    return values


# ----- generic: every fixed-size record ---------------------------------------------------


def test_every_fixed_record_found():
    assert "fvd_records.Header" in FIXED and "qcow2_records.Header" in FIXED
    assert "fvd_records.SnapshotEntryHead" in FIXED and "qcow2_records.SnapshotRecord" in FIXED


@pytest.mark.parametrize("name", sorted(FIXED))
def test_round_trip_and_struct_twin(name):
    """build -> parse -> equal, and the derived struct packs the same bytes in the
    declared field order."""
    con = FIXED[name]
    values = sample_values(con)
    raw = con.build(values)
    assert len(raw) == con.sizeof()
    parsed = {k: v for k, v in con.parse(raw).items() if not k.startswith("_")}
    assert parsed == values
    st = struct_of(con)
    assert st.size == con.sizeof()
    names = field_names(con)
    assert sorted(names) == sorted(values)
    assert st.pack(*(values[n] for n in names)) == raw
    assert dict(zip(names, st.unpack(raw))) == values
    for n in names:  # offsets point at each field's bytes
        single = span_struct(con, n, n)[1]
        assert single.unpack_from(raw, offset_of(con, n))[0] == values[n]


def test_struct_of_refuses_variable_records():
    for con in (fr.SnapshotEntry, fr.PartialMapEntry, qr.Extension, fr.JournalRecord):
        with pytest.raises(TypeError):
            struct_of(con)


def test_helpers():
    assert offsets(fr.SnapshotEntry)["extra"] == 64  # stops at the first variable field
    assert "name" not in offsets(fr.SnapshotEntry)
    off, st = span_struct(qr.Header, "l1_size", "l1_table_offset")
    assert (off, st.format, st.size) == (36, ">LQ", 12)
    with pytest.raises(ValueError):
        span_struct(qr.Header, "l1_table_offset", "l1_size")
    assert array_struct(fr.TableEntry, 3).pack(1, 2, 3) == bytes.fromhex("010000000200000003000000")
    assert dtype_of(fr.TableEntry) == "<u4" and dtype_of(fr.RefcountEntry) == "<u2"
    assert dtype_of(qr.L2Entry) == ">u8" and dtype_of(qr.RefcountBlockEntry) == ">u2"
    with pytest.raises(TypeError):
        dtype_of(fr.Header)


# ----- sizes stated by the spec -----------------------------------------------------------


@pytest.mark.parametrize(
    "con, size",
    [
        (fr.Header, 512),
        (fr.JournalSectorHead, 32),
        (fr.JournalRecordHead, 16),
        (fr.SnapshotTableHead, 32),
        (fr.SnapshotEntryHead, 64),
        (fr.SnapshotExtraBitmap, 16),
        (fr.SnapshotExtraGranules, 24),
        (fr.PartialMapHead, 16),
        (fr.PartialMapEntryHead, 8),
        (fr.TableEntry, 4),
        (fr.RefcountEntry, 2),
        (fr.GranulePayload, 8),
        (fr.DataCrcPayload, 4),
        (qr.HeaderV2, 72),
        (qr.Header, 112),
        (qr.SnapshotRecord, 40),
        (qr.SnapshotExtra, 24),
        (qr.FeatureNameEntry, 48),
        (qr.L1Entry, 8),
        (qr.L2Entry, 8),
        (qr.RefcountTableEntry, 8),
    ],
)
def test_sizes_match_the_spec(con, size):
    assert con.sizeof() == size


def test_record_sizes_stated_in_prose():
    assert len(journal.granule_record(1, 1, 2, 3)) == 24  # "24 bytes with the head"
    assert journal.TABLE_ENTRIES_PER_SECTOR == 116  # "at most 116 per sector"
    one = dict(virtual_chunk=1, source_chunk=2, bits=bytes(32))
    row = fr.partial_row_bytes(1 * MiB, 4096)
    assert row == 32 and len(fr.PartialMapEntry.build(one, row_bytes=row)) == 40


def test_qcow2_masks_are_qemus():
    """The masks derived from the BitStruct declarations equal block/qcow2.h's."""
    assert qr.OFLAG_COPIED == 1 << 63
    assert qr.OFLAG_COMPRESSED == 1 << 62
    assert qr.OFLAG_ZERO == 1
    assert qr.OFFSET_MASK == 0x00FFFFFFFFFFFE00  # L1E_OFFSET_MASK, L2E_OFFSET_MASK
    assert bit_mask(qr.L1Entry, "l2_offset") == 0x00FFFFFFFFFFFE00
    assert qr.L1E_RESERVED_MASK == 0x7F000000000001FF
    assert qr.L2E_STD_RESERVED_MASK == 0x3F000000000001FE
    assert qr.REFT_OFFSET_MASK == 0xFFFFFFFFFFFFFE00
    assert qr.REFT_RESERVED_MASK == 0x1FF
    assert (qr.OFF_L1_SIZE, qr.OFF_REFTABLE, qr.OFF_SNAPSHOTS, qr.OFF_INCOMPAT) == (36, 48, 60, 72)
    # every bit of an entry belongs to exactly one field
    for entry in (qr.L1Entry, qr.L2Entry, qr.RefcountTableEntry):
        masks = [bit_mask(entry, sc.name) for sc in entry.subcon.subcons]
        assert sum(masks) == (1 << 64) - 1 and all(
            a & b == 0 for a in masks for b in masks if a != b
        )


@pytest.mark.parametrize("entry", [qr.L1Entry, qr.L2Entry, qr.RefcountTableEntry])
def test_bit_entries_round_trip(entry):
    """Each field built alone lands exactly under its mask, and parses back."""
    for sc in entry.subcon.subcons:
        values = {s.name: (False if s.sizeof() == 1 else 0) for s in entry.subcon.subcons}
        values[sc.name] = True if sc.sizeof() == 1 else (1 << sc.sizeof()) - 1
        raw = entry.build(values)
        assert int.from_bytes(raw, "big") == bit_mask(entry, sc.name)
        parsed = {k: v for k, v in entry.parse(raw).items() if not k.startswith("_")}
        assert parsed == values


# ----- FVD: known byte vectors, cross-checked with files the library writes ----------------

# The header of fvd.create(path, 64 MiB, chunk_size=1 MiB, block_size=64 KiB,
# journal_size=64 KiB), written out field by field from docs/format.md section 2.
HEADER_VECTOR = bytes.fromhex(
    "a9f54351"  # 0 magic
    "02000000"  # 4 version 2
    "00020000"  # 8 header_size 512
    "14000b10"  # 12 header_crc
    "4000000000000000"  # 16 incompatible_features: bit 6, sparse table
    "0000000000000000"  # 24 compatible_features
    "0000000400000000"  # 32 virtual_size 64 MiB
    "00001000"  # 40 chunk_size 1 MiB
    "00000100"  # 44 block_size 64 KiB
    "01000000"  # 48 clean_shutdown
    "00000000"  # 52 base_format
    "0000000000000000"  # 56 base_name_offset
    "00000000"  # 64 base_name_size
    "00000000"  # 68 base_flags
    "0000000000000000"  # 72 base_size
    "0000000000000000"  # 80 bitmap_offset
    "0000000000000000"  # 88 bitmap_size
    "0010000000000000"  # 96 table_offset 4096
    "0010000000000000"  # 104 table_size 4096
    "0020000000000000"  # 112 journal_offset 8192
    "0000010000000000"  # 120 journal_size 64 KiB
    "0100000000000000"  # 128 journal_epoch 1
    "0000000000000000"  # 136 snapshot_table_offset
    "0000000000000000"  # 144 snapshot_table_size
    "00000000"  # 152 nb_snapshots
    "00000000"  # 156 reserved
    "0000000000000000"  # 160 refcount_table_offset
    "0000000000000000"  # 168 refcount_table_size
    "0000100000000000"  # 176 data_offset 1 MiB
    "0100000000000000"  # 184 next_snapshot_id 1
    "5885960d"  # 192 table_crc: 64 UNALLOCATED entries, stored as zeros
    "00000000"  # 196 bitmap_crc
    "0000000000000000"  # 200 partial_map_offset
    "0000000000000000"  # 208 partial_map_size
    "00000000"  # 216 partial_map_crc
    "00000000"  # 220 granule_size
    "00112233445566778899aabbccddeeff"  # 224 image_uuid (fvd.create: a random one)
).ljust(512, b"\0")


def header_dict(raw):
    return {k: v for k, v in fr.Header.parse(raw).items() if not k.startswith("_")}


def header_record(raw):
    return fr.ImageHeader.from_bytes(raw)


def test_header_record_is_the_construct_declaration():
    """The typed record's fields are the construct record's, in order, with the spec's
    names (the table of docs/format.md section 2 is checked against Header above)."""
    assert fr.HEADER_FIELDS == tuple(sc.name for sc in fr.Header.subcons if sc.name)
    assert fr.Header.sizeof() == fr.HEADER_SIZE
    h = fr.ImageHeader.from_bytes(HEADER_VECTOR)
    assert header_dict(HEADER_VECTOR) == {n: getattr(h, n) for n in fr.HEADER_FIELDS}
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.virtual_size = 1  # type: ignore[misc]
    assert h.replace(virtual_size=1).virtual_size == 1 and h.virtual_size == 64 * MiB
    with pytest.raises(TypeError):
        h.replace(no_such_field=1)


def test_header_vector(tmp_path):
    d = header_dict(HEADER_VECTOR)
    h = header_record(HEADER_VECTOR)
    assert h.magic == fmt.MAGIC and h.virtual_size == 64 * MiB
    assert h.table_crc == zlib.crc32(bytes(4 * 64))  # sparse: unallocated is zeros
    assert fr.Header.build(d) == HEADER_VECTOR
    assert fmt.build_header(h) == HEADER_VECTOR  # the checksum is the spec's
    assert fmt.parse_header(HEADER_VECTOR, "vector", 2 * MiB).journal_offset == 8192
    path = tmp_path / "a.fvd"
    fvd.create(str(path), 64 * MiB, chunk_size=MiB, block_size=64 * KiB, journal_size=64 * KiB)
    with open(path, "rb") as f:
        region = f.read(fmt.HEADER_REGION)
    made = header_record(region[:512])
    assert uuid.UUID(bytes=made.image_uuid).version == 4  # random, per image
    assert region[:512] == fmt.build_header(h.replace(image_uuid=made.image_uuid))
    assert region[512:] == bytes(fmt.HEADER_REGION - 512)  # reserved zeros


# A transaction of one of each record type (section 4): epoch 5, first seq 2.
SECTOR_VECTOR = bytes.fromhex(
    "4656444a"  # magic "FVDJ"
    "f7cd0185"  # crc
    "0500000000000000"  # epoch 5
    "0200000000000000"  # seq 2
    "0000"  # tx_remaining 0
    "0400"  # nrecords 4
    "00000000"  # reserved
    "01000000"
    "02000000"
    "0300000000000000"
    "07000000"
    "08000000"  # TABLE 3..4 = 7, 8
    "02000000"
    "02000000"
    "0500000000000000"  # BITMAP blocks 5..6
    "03000000"
    "00100000"
    "0000100000000000"
    "efbeadde"  # DATA_CRC 4096 B at 1 MiB
    "04000000"
    "03000000"
    "6400000000000000"
    "09000000"
    "0b000000"  # GRANULE 100..102 9/11
).ljust(512, b"\0")


def test_journal_sector_vector():
    records = [
        journal.table_records({3: 7, 4: 8})[0],
        journal.bitmap_record(5, 2),
        journal.data_crc_record(MiB, 4096, 0xDEADBEEF),
        journal.granule_record(100, 3, 9, 11),
    ]
    assert journal.pack_transaction(records, 5, 2) == SECTOR_VECTOR
    check = bytearray(SECTOR_VECTOR)
    check[4:8] = bytes(4)
    assert zlib.crc32(check) == 0x8501CDF7
    s = fr.JournalSector.parse(SECTOR_VECTOR)
    assert (s.epoch, s.seq, s.tx_remaining, s.nrecords) == (5, 2, 0, 4)
    got = [(r.type, r.count, r.start, r.payload) for r in s.records]
    assert got == [
        (fr.REC_TABLE, 2, 3, [7, 8]),
        (fr.REC_BITMAP, 2, 5, None),
        (fr.REC_DATA_CRC, 4096, MiB, dict(crc=0xDEADBEEF)),
        (fr.REC_GRANULE, 3, 100, dict(front_chunk=9, source_chunk=11)),
    ]
    assert fr.JournalSector.build(s) == SECTOR_VECTOR
    # and the parser fvd uses at replay reads the same
    parsed = journal._records(SECTOR_VECTOR, 4, "vector", 0)
    assert [p[:3] for p in parsed] == [g[:3] for g in got]
    assert parsed[3][3] == (9, 11) and parsed[2][3] == 0xDEADBEEF


def test_journal_sector_in_a_file(tmp_path):
    """The first journal sector of a writethrough allocation, read from the file."""
    path = str(tmp_path / "j.fvd")
    fvd.create(path, 64 * MiB, chunk_size=MiB, journal_size=64 * KiB)
    with fvd.open(path, "r+", cache="writethrough") as img:
        img.write(3 * MiB, b"x" * 4096)
        with open(path, "rb") as f:
            h = header_record(f.read(512))
            assert h.clean_shutdown == 0  # open for writing
            f.seek(h.journal_offset)
            raw = f.read(512)
        s = fr.JournalSector.parse(raw)
        assert (s.magic, s.epoch, s.seq, s.tx_remaining) == (
            fr.JOURNAL_MAGIC,
            h.journal_epoch,
            0,
            0,
        )
        assert [(r.type, r.count, r.start, list(r.payload)) for r in s.records] == [
            (fr.REC_TABLE, 1, 3, [0])
        ]
        check = bytearray(raw)
        crc_at = offset_of(fr.JournalSectorHead, "crc")
        check[crc_at : crc_at + 4] = bytes(4)
        assert zlib.crc32(check) == s.crc
        assert fr.JournalSector.build(s) == raw


def entry(name="s1", **kw):
    fields = dict(
        id=1,
        created_ns=1_700_000_000_123_456_789,
        size=64 * MiB,
        table_offset=4 * MiB,
        table_crc=0x0CC1D286,
        name=name,
        vm_offset=5 * MiB,
        vm_size=2,
        vm_crc=0x0BBFD16A,
    )
    fields.update(kw)
    return snapshots.Entry(**fields)


# One snapshot entry (section 8), name "s1": 64 fixed bytes + name padded to 8.
ENTRY_VECTOR = bytes.fromhex(
    "0100000000000000"  # id 1
    "15cd853dfe9c9717"  # created_ns 1700000000123456789
    "0000000400000000"  # virtual_size 64 MiB
    "0000400000000000"  # table_offset 4 MiB
    "86d2c10c"  # table_crc
    "0200"  # name_size 2
    "0000"  # extra_size 0
    "0000500000000000"  # vm_state_offset 5 MiB
    "0200000000000000"  # vm_state_size 2
    "6ad1bf0b"  # vm_state_crc
    "00000000"  # reserved
    "7331000000000000"  # "s1", zero-padded
)


def test_snapshot_entry_vector():
    raw = snapshots.encode_table([entry()], refcount_crc=0x1234)
    head = fr.SnapshotTableHead.parse(raw)
    assert (head.nb_snapshots, head.refcount_crc, head.revert_id) == (1, 0x1234, 0)
    assert raw[32:] == ENTRY_VECTOR
    e = fr.SnapshotEntry.parse(ENTRY_VECTOR)
    assert (e.id, e.created_ns, e.virtual_size, e.name, e.extra) == (
        1,
        1_700_000_000_123_456_789,
        64 * MiB,
        b"s1",
        b"",
    )
    assert fr.SnapshotEntry.build(e) == ENTRY_VECTOR
    assert snapshots.entry_size(entry()) == len(ENTRY_VECTOR)
    t = fr.SnapshotTable.parse(raw)
    assert fr.SnapshotTable.build(t) == raw
    check = bytearray(raw)
    check[4:8] = bytes(4)
    assert zlib.crc32(check) == head.crc


def test_snapshot_entry_with_bitmap_extra():
    e = entry("base snap", bitmap_offset=7 * MiB, bitmap_crc=0xCAFEF00D)
    raw = snapshots.encode_table([e], refcount_crc=0)
    parsed = fr.SnapshotTable.parse(raw).entries[0]
    assert parsed.extra_size == 16 and parsed.name == b"base snap"
    extra = fr.SnapshotExtraBitmap.parse(parsed.extra)
    assert (extra.bitmap_offset, extra.bitmap_crc, extra.reserved) == (7 * MiB, 0xCAFEF00D, 0)
    assert len(raw) == 32 + snapshots.entry_size(e) == 32 + 64 + 16 + 16


def test_snapshot_entry_with_granules_extra():
    """An image without a base: 24 bytes of extra data naming the granule record, laid
    out as SnapshotExtraGranules (section 8), parsed back by the reader."""
    e = entry("g", granules_offset=7 * MiB, granules_size=56, granules_crc=0xCAFEF00D)
    raw = snapshots.encode_table([e], refcount_crc=0)
    parsed = fr.SnapshotTable.parse(raw).entries[0]
    assert parsed.extra_size == 24 and parsed.name == b"g"
    assert parsed.extra == bytes.fromhex(
        "0000700000000000"  # granules_offset 7 MiB
        "3800000000000000"  # granules_size 56
        "0df0feca"  # granules_crc
        "00000000"  # reserved
    )
    extra = fr.SnapshotExtraGranules.parse(parsed.extra)
    assert (extra.granules_offset, extra.granules_size, extra.granules_crc) == (
        7 * MiB,
        56,
        0xCAFEF00D,
    )
    assert fr.SnapshotExtraGranules.build(extra) == parsed.extra
    assert len(raw) == 32 + snapshots.entry_size(e) == 32 + 64 + 24 + 8
    assert snapshots.EXTRA_GRANULES is fr.S_SNAPSHOT_EXTRA_GRANULES


def test_granule_record_round_trip():
    """A granule record is a partial map (PartialState.encode); decode_map reads back what
    the PartialMap declaration builds, and refuses what does not fit."""
    raw = encoded_partial_state(((1, 30, (4, 5)), (6, 31, (0, 200))))
    row = fr.partial_row_bytes(MiB, 4096)
    m = fr.PartialMap.parse(raw, row_bytes=row)
    chunks, sources, rows = decode_map(raw, 8, MiB, 4096, "rec", 0)
    assert chunks.tolist() == [e.virtual_chunk for e in m.entries] == [1, 6]
    assert sources.tolist() == [e.source_chunk for e in m.entries] == [30, 31]
    assert [r.tobytes() for r in rows] == [e.bits for e in m.entries]
    assert fr.PartialMap.build(m, row_bytes=row) == raw
    for bad, at in ((raw[:-8], 4), (raw[:12], 0), (b"X" + raw[1:], 0)):
        with pytest.raises(fvd.CorruptImageError) as err:
            decode_map(bad, 8, MiB, 4096, "rec", 1000)
        assert err.value.offset == 1000 + at and err.value.path == "rec"
    with pytest.raises(fvd.CorruptImageError) as err:
        decode_map(raw, 6, MiB, 4096, "rec", 0)  # chunk 6 past the end of a 6-chunk image
    assert err.value.offset == 16 + 40  # the second entry
    with pytest.raises(fvd.CorruptImageError):
        decode_map(raw, 8, MiB, 8192, "rec", 0)  # another granule size


def test_snapshot_table_in_a_file(tmp_path):
    path = str(tmp_path / "s.fvd")
    fvd.create(path, 64 * MiB, chunk_size=MiB)
    with fvd.open(path, "r+") as img:
        img.write(0, b"y" * 8192)
        img.create_snapshot("first", vm_state=b"vm")
        img.create_snapshot("second")
        with open(path, "rb") as f:
            h = header_record(f.read(512))
            f.seek(h.snapshot_table_offset)
            raw = f.read(h.snapshot_table_size)
            f.seek(h.refcount_table_offset)
            rc = f.read(h.refcount_table_size)
        t = fr.SnapshotTable.parse(raw)
        assert t.nb_snapshots == h.nb_snapshots == 2
        assert [(e.id, e.name) for e in t.entries] == [(1, b"first"), (2, b"second")]
        assert t.entries[0].vm_state_size == 2 and t.entries[1].vm_state_size == 0
        assert all(e.virtual_size == 64 * MiB for e in t.entries)
        assert t.refcount_crc == zlib.crc32(rc)
        assert list(fr.RefcountTable.parse(rc)) == [2]  # chunk 0 held by both snapshots
        assert fr.SnapshotTable.build(t) == raw
        assert [(s.id, s.name, s.size) for s in img.snapshots()] == [
            (1, "first", 64 * MiB),
            (2, "second", 64 * MiB),
        ]
    # what encode_table writes for these entries is what the file holds
    entries = [
        snapshots.Entry(
            e.id,
            e.created_ns,
            e.virtual_size,
            e.table_offset,
            e.table_crc,
            e.name.decode(),
            e.vm_state_offset,
            e.vm_state_size,
            e.vm_state_crc,
        )
        for e in t.entries
    ]
    assert snapshots.encode_table(entries, t.refcount_crc) == raw


def encoded_partial_state(entries):
    """PartialState.encode of 1 MiB chunks with (virtual chunk, source, (g0, g1)) each."""
    st = PartialState(nchunks=8, chunk_size=MiB, size=8 * MiB)
    for v, source, (g0, g1) in entries:
        k = st.new_slot(v, source)
        st.set_granules(k, g0, g1)
        st.publish(v, k)
    return st.encode()


def test_partial_map_encoding():
    """PartialState.encode lays out what PartialMap declares, and parses back."""
    raw = encoded_partial_state(((2, 40, (0, 3)), (5, 41, (10, 256))))
    row = fr.partial_row_bytes(MiB, 4096)
    m = fr.PartialMap.parse(raw, row_bytes=row)
    assert (m.magic, m.count, m.granule_size, m.flags) == (fr.PARTIAL_MAP_MAGIC, 2, 4096, 0)
    assert [(e.virtual_chunk, e.source_chunk) for e in m.entries] == [(2, 40), (5, 41)]
    assert m.entries[0].bits == b"\x07" + bytes(31)
    assert m.entries[1].bits == bytes([0, 0xFC]) + b"\xff" * 30
    assert len(raw) == 16 + 2 * 40
    assert fr.PartialMap.build(m, row_bytes=row) == raw


def test_provenance_section_encoding():
    """With carried granules, encode(provenance=True) sets flag bit 0 and appends one
    ProvenanceEntry per entry (origin, carried row: bits & ~wbits); decode_provenance
    reads them back. Without carried granules the record is the plain layout."""
    st = PartialState(nchunks=8, chunk_size=MiB, size=8 * MiB)
    for v, source in ((2, 40), (5, 41)):
        k = st.new_slot(v, source)
        st.set_granules(k, 0, 4)
        st.publish(v, k)
    assert st.encode(provenance=True) == st.encode()  # nothing carried
    k = st.slot_of(5)
    st.carry(5, k, 77)  # granules 0..3 were copied from chunk 77
    st.set_granules(k, 9, 10)  # the copy-forward's own write
    raw = st.encode(provenance=True)
    row = fr.partial_row_bytes(MiB, 4096)
    esize = fr.PartialMapEntry.sizeof(row_bytes=row)
    assert fr.PartialMap.parse(raw, row_bytes=row).flags == fr.PARTIAL_MAP_FLAG_PROVENANCE
    assert len(raw) == 16 + 2 * 2 * esize
    first = fr.ProvenanceEntry.parse(raw[16 + 2 * esize :], row_bytes=row)
    second = fr.ProvenanceEntry.parse(raw[16 + 3 * esize :], row_bytes=row)
    assert (first.origin_chunk, first.carried) == (0xFFFFFFFF, bytes(32))
    assert (second.origin_chunk, second.carried) == (77, b"\x0f" + bytes(31))
    origins, carried = decode_provenance(raw, 2, MiB, 4096, "x", 0)
    assert origins.tolist() == [0xFFFFFFFF, 77] and carried[1].tobytes() == b"\x0f" + bytes(31)


def test_backup_record_encoding():
    """fvd.backupinfo.encode_record lays out what BackupRecord declares, parses back and
    round-trips through decode_record."""
    ids = [str(uuid.UUID(int=n)) for n in (1, 2, 3)]
    info = BackupInfo(ids[0], "nightly-2", ids[1], "nightly-1", ids[2])
    raw = encode_record(info)
    r = fr.BackupRecord.parse(raw)
    assert (r.magic, r.size, r.version) == (fr.BACKUP_RECORD_MAGIC, len(raw), 1)
    assert r.image_uuid == uuid.UUID(ids[0]).bytes and r.since_uuid == uuid.UUID(ids[2]).bytes
    assert (r.snapshot_name, r.since_name) == (b"nightly-2", b"nightly-1")
    assert len(raw) == 72 + 24 and raw[:4] == b"FVDB"
    assert zlib.crc32(raw[:4] + bytes(4) + raw[8:]) == r.crc
    assert decode_record(raw, "x", 0) == info
    assert decode_record(bytes(100), "x", 0) is None  # zeros: no record


# ----- qcow2: known byte vectors, cross-checked with fvd.qcow2 and qemu-img ---------------

# The header of a 64 MiB image with 64 KiB clusters, as QEMU 7.2 and fvd.qcow2 write it.
QCOW2_HEADER_VECTOR = bytes.fromhex(
    "514649fb"  # 0 magic "QFI\xfb"
    "00000003"  # 4 version 3
    "0000000000000000"  # 8 backing_file_offset
    "00000000"  # 16 backing_file_size
    "00000010"  # 20 cluster_bits 16
    "0000000004000000"  # 24 size 64 MiB
    "00000000"  # 32 crypt_method
    "00000001"  # 36 l1_size 1
    "0000000000030000"  # 40 l1_table_offset: cluster 3
    "0000000000010000"  # 48 refcount_table_offset: cluster 1
    "00000001"  # 56 refcount_table_clusters
    "00000000"  # 60 nb_snapshots
    "0000000000000000"  # 64 snapshots_offset
    "0000000000000000"  # 72 incompatible_features
    "0000000000000000"  # 80 compatible_features
    "0000000000000000"  # 88 autoclear_features
    "00000004"  # 96 refcount_order 4
    "00000070"  # 100 header_length 112
    "00"  # 104 compression_type
    "00000000000000"  # 105 padding
)


def qcow2_header(raw):
    return {k: v for k, v in qr.Header.parse(raw).items() if not k.startswith("_")}


def test_qcow2_header_vector(tmp_path):
    h = qcow2_header(QCOW2_HEADER_VECTOR)
    assert (h["cluster_bits"], h["size"], h["header_length"]) == (16, 64 * MiB, 112)
    assert qr.Header.build(h) == QCOW2_HEADER_VECTOR
    hdr = qcow2_format.parse_header("vector", QCOW2_HEADER_VECTOR + bytes(8), 4 * 64 * KiB)
    assert qcow2_format.build_header(hdr) == QCOW2_HEADER_VECTOR
    path = str(tmp_path / "a.qcow2")
    qcow2.create(path, 64 * MiB, cluster_size=64 * KiB)
    with open(path, "rb") as f:
        raw = f.read(64 * KiB)
    assert raw[:112] == QCOW2_HEADER_VECTOR
    assert qr.EndOfExtensions.parse(raw[112:120]).type == qr.EXT_END
    # the refcount table and block written by create, read through their declarations
    rt = qr.RefcountTableEntry.parse(open(path, "rb").read()[64 * KiB :][:8])
    assert rt.refblock_offset << 9 == 2 * 64 * KiB and rt.reserved == 0
    block = open(path, "rb").read()[2 * 64 * KiB :][:8]
    assert [qr.RefcountBlockEntry.parse(block[i : i + 2]) for i in range(0, 8, 2)] == [1, 1, 1, 1]


def test_qcow2_snapshot_entry_round_trip():
    info = qcow2_format.SnapshotInfo(
        id="1",
        name="snap",
        created=None,
        size=64 * MiB,
        vm_state_size=5,
        l1_table_offset=0x50000,
        l1_size=1,
        vm_clock_nsec=7,
        date_sec=1_700_000_000,
        date_nsec=123,
        extra=qcow2_format.snapshot_extra(5, 64 * MiB),
    )
    raw = qcow2_format.build_snapshot_table([info])
    e = qr.SnapshotEntry.parse(raw)
    assert (e.l1_table_offset, e.id_str, e.name, e.extra_data_size) == (0x50000, b"1", b"snap", 24)
    extra = qr.SnapshotExtra.parse(e.extra_data)
    assert (extra.vm_state_size_large, extra.disk_size, extra.icount) == (5, 64 * MiB, 2**64 - 1)
    assert qr.SnapshotEntry.build(e) == raw and len(raw) % 8 == 0
    snaps, end = qcow2_format.parse_snapshot_table("t", raw, 1, 0, 3)
    assert end == len(raw) and (snaps[0].vm_state_size, snaps[0].size) == (5, 64 * MiB)


def test_qcow2_backing_format_extension(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    path = str(tmp_path / "o.qcow2")
    qcow2.create(path, MiB, backing_file=str(base), backing_format="raw")
    raw = open(path, "rb").read(64 * KiB)
    h = qcow2_header(raw)
    ext = qr.BackingFormatExtension.parse(raw[h["header_length"] :])
    assert ext.backing_format == b"raw" and ext.length == 3
    pos = h["header_length"] + 16  # 8-byte head, "raw", 5 bytes of padding
    assert qr.EndOfExtensions.parse(raw[pos : pos + 8]).type == qr.EXT_END
    name = raw[h["backing_file_offset"] :][: h["backing_file_size"]]
    assert name == str(base).encode()


def qemu_img(*args):
    if not QEMU_IMG:
        reason = "qemu-img not installed (apt-get install -y qemu-utils)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " - required when CI=true")
        pytest.skip(reason)
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True)


@pytest.mark.interop
def test_qcow2_header_vector_is_qemus(tmp_path):
    path = str(tmp_path / "q.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, "64M")
    raw = open(path, "rb").read(64 * KiB)
    assert raw[:112] == QCOW2_HEADER_VECTOR
    # QEMU adds a feature-name table: its entries name the bits declared here
    exts, pos = [], 112
    while True:
        e = qr.Extension.parse(raw[pos:])
        if e.type == qr.EXT_END:
            break
        exts.append(e)
        pos += qr.ExtensionHeader.sizeof() + e.length + (-e.length % 8)
    table = next(e for e in exts if e.type == qr.EXT_FEATURE_TABLE)
    size = qr.FeatureNameEntry.sizeof()
    names = {}
    for i in range(0, len(table.data), size):
        f = qr.FeatureNameEntry.parse(table.data[i : i + size])
        names[(f.type, 1 << f.bit)] = f.name.rstrip(b"\0").decode()
    assert names[(0, qr.INCOMPAT_DIRTY)] == "dirty bit"
    assert names[(0, qr.INCOMPAT_CORRUPT)] == "corrupt bit"
    assert names[(0, qr.INCOMPAT_DATA_FILE)] == "external data file"
    assert names[(0, qr.INCOMPAT_COMPRESSION)] == "compression type"
    assert names[(0, qr.INCOMPAT_EXTL2)] == "extended L2 entries"
    assert names[(1, qr.COMPAT_LAZY_REFCOUNTS)] == "lazy refcounts"


@pytest.mark.interop
def test_qcow2_records_read_qemus_snapshot_and_backing(tmp_path):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    path = str(tmp_path / "q.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", path, "1M")
    qemu_img("snapshot", "-c", "snap one", path)
    # QEMU's file may end right after the last entry's name, before its padding
    raw = open(path, "rb").read() + bytes(8)
    h = qcow2_header(raw)
    ext = qr.Extension.parse(raw[h["header_length"] :])
    assert (ext.type, ext.data) == (qr.EXT_BACKING_FORMAT, b"raw")
    assert qr.BackingFormatExtension.parse(raw[h["header_length"] :]).backing_format == b"raw"
    assert h["nb_snapshots"] == 1
    e = qr.SnapshotEntry.parse(raw[h["snapshots_offset"] :])
    assert (e.id_str, e.name) == (b"1", b"snap one")
    extra = qr.SnapshotExtra.parse(e.extra_data.ljust(24, b"\0"))
    assert extra.disk_size == MiB and extra.vm_state_size_large == e.vm_state_size == 0
    l1 = qr.L1Entry.parse(raw[e.l1_table_offset :][:8])
    assert l1.reserved_high == l1.reserved_low == 0
    # what we would write for the same entry is what QEMU wrote
    snaps, _ = qcow2_format.parse_snapshot_table(path, raw[h["snapshots_offset"] :], 1, 0, 3)
    built = qcow2_format.build_snapshot_table(snaps)
    assert built == raw[h["snapshots_offset"] :][: len(built)]


# ----- docs/format.md: every record has a declaration, and they agree ---------------------

MARKER = re.compile(r"<!-- ondisk: (\w+)(?: (subset|at \d+))? -->")
TYPE_SIZE = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}


def spec_lines():
    return SPEC.read_text().splitlines()


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def spec_tables():
    """(index of the header line, [rows as cell lists]) of every markdown table."""
    lines, out, i = spec_lines(), [], 0
    while i < len(lines):
        if lines[i].startswith("|"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            out.append((start, [cells(x) for x in lines[start:i] if not set(x) <= set("|-: ")]))
        i += 1
    return out


def is_layout(header):
    return "off" in header[0] and "type" in header


def field_name(cell):
    m = re.match(r"`(\w+)`", cell)
    return m.group(1) if m else cell


def declared_fields(con):
    """{name: subcon} of a record's named fields (a Const's inner field)."""
    out = {}
    for sc in con.subcons:
        if sc.name:
            inner = sc.subcon
            out[sc.name] = inner.subcon if isinstance(inner, construct.Const) else inner
    return out


def markers():
    lines = spec_lines()
    return [(i, m) for i, line in enumerate(lines) if (m := MARKER.fullmatch(line.strip()))]


def test_every_layout_table_has_a_declaration():
    """Each table with offset and type columns sits right under an ondisk marker naming a
    declaration; its offsets, types and field names are the declaration's."""
    lines = spec_lines()
    tables = [(start, rows) for start, rows in spec_tables() if is_layout(rows[0])]
    assert len(tables) >= 9
    for start, rows in tables:
        m = MARKER.fullmatch(lines[start - 1].strip())
        assert m, f"docs/format.md:{start + 1}: layout table without an ondisk marker"
        con = fr.RECORDS[m.group(1)]
        base = int(m.group(2)[3:]) if m.group(2) and m.group(2).startswith("at") else 0
        fields = declared_fields(con)
        header = rows[0]
        col = {name: header.index(name) for name in ("type", "field")}
        seen = []
        for row in rows[1:]:
            off, typ, name = row[0], row[col["type"]], field_name(row[col["field"]])
            where = f"docs/format.md table at line {start + 1}, field {name!r}"
            if typ == "-":
                continue  # reserved bytes or content past the record
            assert name in fields, f"{where}: not declared in {m.group(1)}"
            seen.append(name)
            sc = fields[name]
            if typ in TYPE_SIZE:
                assert isinstance(sc, construct.FormatField), where
                assert sc.sizeof() == TYPE_SIZE[typ] and sc.fmtstr[0] == "<", where
            else:
                assert typ == "bytes" and isinstance(sc, construct.Bytes), where
            if off.isdigit():
                assert offset_of(con, name) + base == int(off), where
        if m.group(2) != "subset":
            assert sorted(seen) == sorted(fields), f"table at line {start + 1} vs {m.group(1)}"


def test_every_record_is_in_the_spec():
    """Every declaration in RECORDS is documented: by a marker, or (journal payloads) in
    the record-type table, whose types, names and payload fields are checked here."""
    lines = spec_lines()
    documented = set()
    for i, m in markers():
        con = fr.RECORDS[m.group(1)]
        documented.add(m.group(1))
        following = lines[i + 1]
        if not following.startswith("|"):  # an array of integers, described in prose
            assert f"u{8 * con.sizeof()}" in following and con.fmtstr[0] == "<", following
    types = [rows for _, rows in spec_tables() if rows[0][:2] == ["type", "name"]]
    assert len(types) == 1
    rows = types[0][1:]
    assert sorted(int(r[0]) for r in rows) == sorted(fr.JOURNAL_RECORDS)
    for r in rows:
        name, payload = fr.JOURNAL_RECORDS[int(r[0])]
        assert r[1] == name
        key = next((k for k, v in fr.RECORDS.items() if v is payload), None)
        if isinstance(payload, construct.Struct):
            text = r[-1]
            spots = [
                text.index(f"u{8 * sc.sizeof()} `{fname}`")  # ValueError: not documented
                for fname, sc in declared_fields(payload).items()
            ]
            assert spots == sorted(spots), f"{name}: payload fields out of order"
            documented.add(key)
        elif isinstance(payload, construct.Array):
            assert f"`count` u{8 * payload.subcon.sizeof()}" in r[-1]
            documented.add(key)
        else:
            assert r[-1].startswith("none"), r
    assert sorted(documented) == sorted(fr.RECORDS)
    assert journal.RECORD_HEAD is fr.S_JOURNAL_RECORD_HEAD  # the code uses these
    assert snapshots.ENTRY is fr.S_SNAPSHOT_ENTRY_HEAD


def test_tableless_header_rules_match_the_spec():
    """Section 13's table of fixed header values: its zero fields are exactly the ones
    open checks, and bit 5 is INCOMPAT_TABLELESS."""
    lines = spec_lines()
    start = lines.index("## 13. Table-less images")
    tables = [rows for i, rows in spec_tables() if i > start and is_layout(rows[0])]
    rows = tables[0][1:]
    zero = [r[2] for r in rows if r[3] == "0"]
    assert sorted(zero) == sorted(fmt.TABLELESS_ZERO_FIELDS)
    flags = next(r for r in rows if r[2] == "incompatible_features")
    assert "bit 5" in flags[3] and f"{fmt.INCOMPAT_TABLELESS:#04x}" in flags[3]
    assert fmt.INCOMPAT_TABLELESS == 1 << 5 and fmt.INCOMPAT_TABLELESS & fmt.KNOWN_INCOMPAT
