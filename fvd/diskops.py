"""Read-side operations shared by `Image` and snapshot views: extents, the backup data
path (changed extents, file view, checksums). Each lives in its own module; this mixin
only gives both classes the same methods."""


class DiskOps:
    """Mixed into `fvd.image.Image` and `fvd.snapshots.SnapshotView`."""

    def extents(self, offset=0, length=None):
        from .extents import image_extents

        return image_extents(self, offset, length)

    def extents_array(self, offset=0, length=None):
        from .extents import extents_array

        return extents_array(self, offset, length)

    def changed_extents(self, since, until=None):
        from .changed import changed_extents

        return changed_extents(self, since, until)

    def changed_extents_array(self, since, until=None):
        from .changed import changed_extents_array

        return changed_extents_array(self, since, until)

    def as_file(self):
        from .fileview import as_file

        return as_file(self)

    def checksum(self, block_size=4 << 20, algorithm="blake2b", progress=None, threads=None):
        from .checksum import checksum

        return checksum(self, block_size, algorithm, progress=progress, threads=threads)
