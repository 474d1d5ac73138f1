"""The `fvd.ops` layer (docs/architecture.md): operations over an open image or snapshot
view: check and repair, extents, changed extents, info, checksum, file view."""
