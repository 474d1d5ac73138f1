"""The image core (file, header, lookup table, journal, allocator, locking): the
`fvd.core` layer of docs/architecture.md.

`fvd.core.image.ImageCore` is an open image without features; base images, snapshots
and partial chunks (`fvd.features`, the layer above) plug into it through the hooks declared in
`fvd.core.hooks` and call only its public methods.
"""
