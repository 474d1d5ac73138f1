"""Read-only views of one snapshot: a read-only core over the snapshot's lookup table,
bitmap copy and granule record, with its own file descriptor (so it outlives the image
handle's base layer and stays usable while the image keeps being written)."""

from __future__ import annotations

import os
import threading
import zlib
from typing import Any, Optional, cast

import numpy as np

from fvd.core.bitmap import Bitmap
from fvd.core.hooks import BaseHook, PartialHook
from fvd.core.image import ImageCore, drain_map
from fvd.errors import BaseImageError, CorruptImageError, ReadOnlyImageError
from fvd.features.base import BaseLayer, _open_backend
from fvd.features.granular import PartialState
from fvd.features.snapshots.attach import SnapshotState, state_of
from fvd.features.snapshots.codec import Entry
from fvd.features.snapshots.tables import granule_record, lookup_table_problems, needs_base
from fvd.ondisk import format as fmt
from fvd.ondisk import sparse_table


class SnapshotView:
    """A read-only core (`fvd.core.hooks.MappedDisk`) showing one snapshot.

    With a base image: blocks whose bit is clear in the snapshot's bitmap (below the end
    of the base) read from the base, through the view's own read-only open of it; the
    rest as for the front. `snapshot_state` is the image's: views count themselves in
    it (a snapshot with open views cannot be deleted)."""

    read_only = True

    def __init__(self, img: ImageCore, entry: Entry) -> None:
        self.path: str = img.path
        self.name = entry.name
        self.snapshot_id = entry.id
        self.size: int = img.size
        self.chunk_size: int = img.chunk_size
        self.block_size: int = img.block_size
        self.nchunks: int = img.nchunks
        self.header: fmt.ImageHeader = img.header  # the image's facts at open
        self._state = state_of(img)
        self.snapshot_state: Optional[SnapshotState] = self._state
        self.lock = threading.RLock()  # nothing changes a view: for the core's readers
        self.base_layer: Optional[BaseHook] = None
        self.bitmap: Optional[Bitmap] = None
        self.partial: Optional[PartialHook] = None
        self.closed = True
        self.stats = img.impl.Stats()
        self.fd = os.open(img.path, os.O_RDONLY)
        try:
            self.table = self._read_table(img, entry)
            self.chunk_map = img.impl.ChunkMap(
                self.fd,
                self.table,
                np.ones(0, dtype=np.uint8),
                self.chunk_size,
                self.header.data_offset,
                self.size,
                self.stats,
            )
            self.chunk_map.error = img.io_error
            if img.bitmap is not None:
                self._attach_base(img, entry)
            self._attach_partial(entry)
        except BaseException:
            if self.base_layer is not None:
                self.base_layer.close()
            os.close(self.fd)
            raise
        self._count_view(+1)
        self.closed = False

    def _count_view(self, step: int) -> None:
        st = self._state
        with st.views_lock:
            left = st.views.get(self.snapshot_id, 0 if step > 0 else 1) + step
            if left:
                st.views[self.snapshot_id] = left
            else:
                st.views.pop(self.snapshot_id, None)

    def _read(self, offset: int, nbytes: int, crc: int, what: str) -> bytes:
        """Snapshot metadata read through the view's fd, its crc checked."""
        raw = os.pread(self.fd, nbytes, offset)
        self.stats.metadata_reads += 1
        self.stats.metadata_bytes_read += len(raw)
        if len(raw) != nbytes or zlib.crc32(raw) != crc:
            raise CorruptImageError(
                self.path, offset, f"snapshot {self.name!r}: {what} checksum mismatch or truncated"
            )
        return raw

    def _read_table(self, img: ImageCore, entry: Entry) -> np.ndarray:
        raw = self._read(entry.table_offset, 4 * img.nchunks, entry.table_crc, "lookup table")
        table = sparse_table.decode(raw, sparse_table.is_sparse(img.header))
        problems = lookup_table_problems(img, entry, table)
        if problems:
            raise CorruptImageError(img.path, problems[0].offset, problems[0].what)
        return table

    def _attach_partial(self, entry: Entry) -> None:
        """The snapshot's partial chunks (its granule record): reads split by their bits
        on the fast path, as the front's do."""
        if not (entry.granules_offset or entry.granules_bad):
            return
        granule = self.header.granule_size or fmt.DEFAULT_GRANULE
        d = self.header.data_offset
        rec = granule_record(self.fd, self.path, entry, self.table, self.chunk_size, granule, d)
        assert rec is not None
        self.stats.metadata_reads += 1
        self.stats.metadata_bytes_read += entry.granules_size
        ps = PartialState(self.nchunks, self.chunk_size, self.size, granule)
        ps.install(self.chunk_map)
        ps.load_record(*rec)  # with its provenance: partial_chunks() gives the record back
        self.partial = ps

    def _attach_base(self, img: ImageCore, entry: Entry) -> None:
        h = img.header
        raw = self._read(entry.bitmap_offset, h.bitmap_size, entry.bitmap_crc, "bitmap")
        if not needs_base(img, np.frombuffer(raw, dtype=np.uint8)):
            return  # every block is in the image: no base needed
        self.bitmap = Bitmap(raw, -(-h.base_size // self.block_size), 0)
        path, policy = img.base_path, img.backing_policy
        assert path is not None and policy is not None  # the image has a base (bitmap_size)
        backend = _open_backend(
            img.path, path, h.base_format, (os.path.realpath(img.path),), policy
        )
        if backend.size != h.base_size:
            backend.close()
            raise BaseImageError(
                f"{path}: base image size changed from {h.base_size} to {backend.size} bytes"
            )
        # BaseLayer uses only the read side of a core, which a view has (its doc)
        layer = BaseLayer(cast("ImageCore", self), backend, path, False)
        layer.attach_map()
        self.base_layer = layer

    def check_open(self) -> None:
        if self.closed:
            raise ValueError(f"{self.path}: I/O on a closed snapshot view")

    def readinto(self, offset: int, buffer: Any) -> int:
        self.check_open()
        if self.base_layer is not None and not self.base_layer.fast_read:
            return self.base_layer.readinto(offset, buffer)
        n: int = self.chunk_map.readinto(offset, buffer)
        return n

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset: int, data: Any) -> int:
        raise ReadOnlyImageError(self.path)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.chunk_map.closed = True
        drain_map(self.chunk_map)  # reads already inside finish on the open fd
        if self.base_layer is not None:
            self.base_layer.close()
            self.base_layer = None
        os.close(self.fd)
        self._count_view(-1)

    def __enter__(self) -> SnapshotView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<fvd snapshot view {self.path!r} {self.name!r}>"


def open_snapshot(img: ImageCore, name: str) -> SnapshotView:
    st = state_of(img)
    with img.lock:  # no delete between finding the entry and counting the view
        img.check_open()
        return SnapshotView(img, st.find(name, img.path))
