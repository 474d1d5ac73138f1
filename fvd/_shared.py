"""The one home of the values fvd._fastpath and its twin fvd._purepath both use.

The compiled module reads these at import (tests/native/test_impl_parity.py pins what it
holds to them); fvd.ondisk.fvd_records re-exports the on-disk one.
"""

ZERO_CHUNK = 0xFFFFFFFE  # lookup-table entry: reads as zeros, never from the base
NO_SLOT = 0xFFFFFFFF  # partial-slot entry: the chunk has no partial record
MAX_IOV = 64  # most buffers one ChunkMap.pwritev takes (a copy-on-write merge)
SYS_IOV_MAX = 1024  # iovecs per pwritev call (Linux UIO_MAXIOV)
