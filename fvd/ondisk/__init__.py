"""On-disk records, declared once with construct: fvd_records (FVD, docs/format.md) and
qcow2_records (the qcow2 baseline, QEMU's qcow2 spec); structs derives the struct.Struct,
field offsets and bit masks the per-I/O code uses from those declarations."""
