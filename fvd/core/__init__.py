"""Layer 3: the image core (file, header, lookup table, journal, allocator, locking).

`fvd.core.image.ImageCore` is an open image without features; base images, snapshots
and partial chunks (layer 4, `fvd.features`) plug into it through the hooks declared in
`fvd.core.hooks` and call only its public methods.
"""
