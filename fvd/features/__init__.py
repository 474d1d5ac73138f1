"""The `fvd.features` layer (docs/architecture.md): features over the image core: base
images (copy-on-write, copy-on-read, prefetch), internal snapshots and snapshot views,
partial chunks after snapshots."""
