"""Layer 2: the bytes on disk. Declarations of every FVD record (docs/format.md)."""
