"""Every on-disk record of a qcow2 image (v2 and v3) as the baseline reads and writes it,
declared once with construct. Field names are those of QEMU's qcow2 specification
(docs/interop/qcow2.txt) and its block/qcow2.h. Big-endian throughout.

Entries of the L1, L2 and refcount tables are declared as BitStructs (most significant
bit first), and their masks are derived from those declarations. Per-I/O code keeps
numpy arrays of the entries (`*_DTYPE`) and the `struct.Struct` twins (`S_*`).
"""

from construct import (
    BitsInteger,
    BitStruct,
    Bytes,
    Const,
    Flag,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Padding,
    Struct,
    this,
)

from fvd.ondisk.structs import bit_mask, dtype_of, offsets, span_struct, struct_of

MAGIC = b"QFI\xfb"

# ----- header ---------------------------------------------------------------------------
HeaderV2 = Struct(
    "magic" / Const(MAGIC),
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
HeaderV3Tail = Struct(  # bytes 72..103, version 3 only
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)
# The v3 header as QEMU 7.2 writes it: the tail, the compression type, padding to 112.
Header = Struct(
    *HeaderV2.subcons,
    *HeaderV3Tail.subcons,
    "compression_type" / Int8ub,
    Padding(7),
)
HEADER_OFFSET = offsets(Header)  # byte offset of each field (error messages name it)
V2_HEADER_LENGTH = HeaderV2.sizeof()  # 72
V3_MIN_HEADER_LENGTH = V2_HEADER_LENGTH + HeaderV3Tail.sizeof()  # 104
V3_HEADER_LENGTH = Header.sizeof()  # 112

# Header fields updated in place, as QEMU does: (offset, struct) of the few bytes written.
OFF_L1_SIZE, S_L1_UPDATE = span_struct(Header, "l1_size", "l1_table_offset")
OFF_REFTABLE, S_REFTABLE_UPDATE = span_struct(
    Header, "refcount_table_offset", "refcount_table_clusters"
)
OFF_SNAPSHOTS, S_SNAPSHOTS_UPDATE = span_struct(Header, "nb_snapshots", "snapshots_offset")
OFF_INCOMPAT, S_INCOMPAT_UPDATE = span_struct(
    Header, "incompatible_features", "incompatible_features"
)
OFF_CLUSTER_BITS, S_CLUSTER_BITS = span_struct(Header, "cluster_bits", "cluster_bits")

# incompatible_features / compatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0

# ----- header extensions (v3; after header_length, 8-byte aligned, in cluster 0) ----------
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

ExtensionHeader = Struct("type" / Int32ub, "length" / Int32ub)
Extension = Struct(
    *ExtensionHeader.subcons,
    "data" / Bytes(this.length),
    Padding(lambda ctx: -ctx.length % 8),
)
BackingFormatExtension = Struct(
    "type" / Const(EXT_BACKING_FORMAT, Int32ub),
    "length" / Int32ub,
    "backing_format" / Bytes(this.length),  # "raw", "qcow2" ... no terminator
    Padding(lambda ctx: -ctx.length % 8),
)
EndOfExtensions = Struct("type" / Const(EXT_END, Int32ub), "length" / Const(0, Int32ub))
FeatureNameEntry = Struct("type" / Int8ub, "bit" / Int8ub, "name" / Bytes(46))
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved32" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)
CryptoExtension = Struct("offset" / Int64ub, "length" / Int64ub)

# ----- L1 / L2 / refcount-table entries (bits listed from bit 63 down) ---------------------
L1Entry = BitStruct(
    "copied" / Flag,  # refcount of the L2 table is exactly 1
    "reserved_high" / BitsInteger(7),
    "l2_offset" / BitsInteger(47),  # bits 9..55 of the L2 table's offset
    "reserved_low" / BitsInteger(9),
)
L2Entry = BitStruct(  # a standard (uncompressed) cluster descriptor
    "copied" / Flag,
    "compressed" / Flag,
    "reserved_high" / BitsInteger(6),
    "host_offset" / BitsInteger(47),  # bits 9..55 of the data cluster's offset
    "reserved_low" / BitsInteger(8),
    "zero" / Flag,  # reads as zeros (v3)
)
RefcountTableEntry = BitStruct(
    "refblock_offset" / BitsInteger(55),  # bits 9..63 of the refcount block's offset
    "reserved" / BitsInteger(9),
)
RefcountBlockEntry = Int16ub  # refcount_order 4, the only width the baseline supports

OFLAG_COPIED = bit_mask(L2Entry, "copied")
OFLAG_COMPRESSED = bit_mask(L2Entry, "compressed")
OFLAG_ZERO = bit_mask(L2Entry, "zero")
OFFSET_MASK = bit_mask(L2Entry, "host_offset")
L1E_RESERVED_MASK = bit_mask(L1Entry, "reserved_high") | bit_mask(L1Entry, "reserved_low")
L2E_STD_RESERVED_MASK = bit_mask(L2Entry, "reserved_high") | bit_mask(L2Entry, "reserved_low")
REFT_OFFSET_MASK = bit_mask(RefcountTableEntry, "refblock_offset")
REFT_RESERVED_MASK = bit_mask(RefcountTableEntry, "reserved")
assert bit_mask(L1Entry, "copied") == OFLAG_COPIED
assert bit_mask(L1Entry, "l2_offset") == OFFSET_MASK

L1_DTYPE = dtype_of(L1Entry)  # '>u8'
L2_DTYPE = dtype_of(L2Entry)
REFTABLE_DTYPE = dtype_of(RefcountTableEntry)
REFBLOCK_DTYPE = dtype_of(RefcountBlockEntry)  # '>u2'
S_REFTABLE_ENTRY = struct_of(Int64ub)
S_REFBLOCK_ENTRY = struct_of(RefcountBlockEntry)

# ----- snapshot table ---------------------------------------------------------------------
SnapshotRecord = Struct(  # QCowSnapshotHeader: the fixed part of an entry
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
SNAPSHOT_RECORD_SIZE = SnapshotRecord.sizeof()  # 40
SnapshotExtra = Struct(  # QCowSnapshotExtraData; v3 requires the first 16 bytes
    "vm_state_size_large" / Int64ub,
    "disk_size" / Int64ub,
    "icount" / Int64ub,
)
SNAPSHOT_EXTRA_OFFSET = offsets(SnapshotExtra)
S_SNAPSHOT_EXTRA_FIELD = struct_of(Int64ub)  # each extra field is a u64
# A whole entry: record, extra data, id string, name, zero-padded to a multiple of 8.
SnapshotEntry = Struct(
    *SnapshotRecord.subcons,
    "extra_data" / Bytes(this.extra_data_size),
    "id_str" / Bytes(this.id_str_size),
    "name" / Bytes(this.name_size),
    Padding(
        lambda ctx: (
            -(SNAPSHOT_RECORD_SIZE + ctx.extra_data_size + ctx.id_str_size + ctx.name_size) % 8
        )
    ),
)
