"""Read-side operations shared by `fvd.Image` and snapshot views (`fvd.SnapshotImage`):
extents, the backup data path (changed extents, file view, checksums). Each lives in its
own module; this mixin only gives both classes the same methods.

A class using it provides `_mapped()`: the object the operations read the mapping from
(an `fvd.core.image.ImageCore` or an `fvd.features.snapshots.SnapshotView`, both
`fvd.core.hooks.MappedDisk`s)."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import numpy as np

from fvd.core.hooks import MappedDisk
from fvd.ops import changed, checksum, extents, fileview
from fvd.types import Extent


class DiskOps:
    """Mixed into `fvd.image.Image` and `fvd.image.SnapshotImage`."""

    # What the class provides besides `_mapped()`, so that it is an `fvd.types.DiskView`.
    path: str
    size: int
    read_only: bool

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def readinto(self, offset: int, buffer: Any) -> int:
        raise NotImplementedError

    def write(self, offset: int, data: Any) -> int:
        raise NotImplementedError

    def _mapped(self) -> MappedDisk:
        raise NotImplementedError

    def _shown_snapshot(self) -> Optional[str]:
        """The snapshot whose contents this disk shows; None: the live front."""
        return None

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        """Extents covering the range exactly (qemu-img map's vocabulary), merged."""
        return extents.image_extents(self._mapped(), offset, length)

    def extents_array(self, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """The same extents as a numpy structured array (fvd.ops.extents.EXTENT_DTYPE)."""
        return extents.extents_array(self._mapped(), offset, length)

    def changed_extents(self, since: str, until: Optional[str] = None) -> Any:
        """Extents whose bytes may differ between snapshot `since` and `until` (or the
        contents this disk shows)."""
        return changed.changed_extents(self._mapped(), since, self._until(until))

    def changed_extents_array(self, since: str, until: Optional[str] = None) -> np.ndarray:
        return changed.changed_extents_array(self._mapped(), since, self._until(until))

    def _until(self, until: Optional[str]) -> Optional[str]:
        return until if until is not None else self._shown_snapshot()

    def as_file(self) -> fileview.ImageFile:
        """An io.RawIOBase over the virtual disk."""
        return fileview.as_file(self)

    def checksum(
        self,
        block_size: int = 4 << 20,
        algorithm: str = "blake2b",
        progress: Optional[Callable[[int, int], None]] = None,
        threads: Optional[int] = None,
    ) -> dict[str, Any]:
        """ovirt-imageio's checksum of the virtual disk."""
        return checksum.checksum(self, block_size, algorithm, progress=progress, threads=threads)


__all__ = ["DiskOps", "Extent"]
