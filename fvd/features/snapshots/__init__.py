"""Internal snapshots: read-only copies of the lookup table plus a refcount table that
counts only the chunks read-only snapshots hold (docs/format.md, "Snapshots").

The writeable front is tracked by its one-level table and the journal alone: the
refcount table is read at open, written at snapshot create / delete / repair, and never
touched by guest writes. A chunk with refcount > 0 is *frozen*: the front copies it to a
fresh chunk on its first write there (`SnapshotMeta.copy_chunk`).

With a base image each snapshot also keeps a copy of the durable (stale) bitmap (entry
extra data: bitmap_offset, bitmap_crc). Views read the base for its clear bits, revert
restores it with the table, and prefetch keeps the base attached while some snapshot's
copy still has a clear bit below the base end (snapshots_need_base).

The modules, from the bottom up: `codec` (the snapshot table's bytes), `state` (the
metadata in memory), `refcounts` (the arithmetic and the frozen bits), `tables` (what a
snapshot holds, read and validated), `transaction` (the one copy-on-write commit),
`check` (check and repair), `attach` (open), `operations` (create, delete, revert) and
`view` (read-only views).
"""

from fvd.errors import RefcountOverflowError, SnapshotBusyError, SnapshotNotFoundError
from fvd.features.snapshots.attach import SnapshotState, attach_snapshots, state_of
from fvd.features.snapshots.check import store_refcounts
from fvd.features.snapshots.codec import (
    ENTRY,
    EXTRA_BITMAP,
    EXTRA_GRANULES,
    MAX_NAME,
    TABLE_HEAD,
    TABLE_MAGIC,
    Entry,
    check_name,
    encode_table,
    entry_size,
)
from fvd.features.snapshots.operations import (
    create_snapshot,
    delete_snapshot,
    list_snapshots,
    read_vm_state,
    revert_to_snapshot,
)
from fvd.features.snapshots.tables import (
    GranuleRecord,
    granule_record,
    lookup_table_problems,
    read_snapshot_bitmap,
    read_snapshot_table,
    snapshots_need_base,
)
from fvd.features.snapshots.transaction import in_use_end
from fvd.features.snapshots.view import SnapshotView, open_snapshot

__all__ = [
    "ENTRY",
    "EXTRA_BITMAP",
    "EXTRA_GRANULES",
    "MAX_NAME",
    "TABLE_HEAD",
    "TABLE_MAGIC",
    "Entry",
    "GranuleRecord",
    "RefcountOverflowError",
    "SnapshotBusyError",
    "SnapshotNotFoundError",
    "SnapshotState",
    "SnapshotView",
    "attach_snapshots",
    "check_name",
    "create_snapshot",
    "delete_snapshot",
    "encode_table",
    "entry_size",
    "granule_record",
    "in_use_end",
    "list_snapshots",
    "lookup_table_problems",
    "open_snapshot",
    "read_snapshot_bitmap",
    "read_snapshot_table",
    "read_vm_state",
    "revert_to_snapshot",
    "snapshots_need_base",
    "state_of",
    "store_refcounts",
]
