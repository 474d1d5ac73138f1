"""The metadata/TiB rows of `fvd bench`: what each contender stores to map 1 TiB."""

import os

import fvd
from fvd.bench.impls import Contender
from fvd.bench.qemu import qemu_measure_metadata
from fvd.bench.workloads import Result
from fvd.units import MiB, TiB


def qcow2_metadata_formula(virtual: int, cluster: int = 65536, refcount_bits: int = 16) -> int:
    """Bytes of qcow2 metadata for a fully allocated image (header, L1, L2, refcounts)."""
    clusters = -(-virtual // cluster)
    l2_entries = cluster // 8
    l2_tables = -(-clusters // l2_entries)
    l1 = -(-(l2_tables * 8) // cluster) * cluster
    l2 = l2_tables * cluster
    # refcounts cover data + metadata clusters; one fixed-point pass is enough here
    per_block = cluster * 8 // refcount_bits
    host_clusters = clusters + l2_tables + l1 // cluster + 1
    blocks = -(-host_clusters // per_block)
    table = -(-(blocks * 8) // cluster) * cluster
    return cluster + l1 + l2 + blocks * cluster + table


def fvd_metadata_formula(virtual: int, chunk: int = MiB) -> int:
    """The FVD lookup table: 4 bytes per chunk."""
    return 4 * -(-virtual // chunk)


def measure_metadata(contender: Contender, workdir: str) -> Result:
    """Metadata bytes per TiB of virtual disk, in MiB (computed, checked where possible)."""
    key = "metadata/TiB"
    name = contender.name
    reason = contender.available()
    if reason:
        return Result(key, name, None, "MiB", False, note=reason)
    if name in ("fvd", "fvd-py"):
        path = os.path.join(workdir, f"meta-{os.getpid()}.fvd")
        fvd.create(path, TiB, overwrite=True)
        try:
            with fvd.open(path, "r") as img:
                data_offset = img.info()["data-offset"]
                table = 4 * -(-img.size // img.chunk_size)
        finally:
            os.unlink(path)
        assert table == fvd_metadata_formula(TiB)
        return Result(
            key,
            name,
            data_offset / MiB,
            "MiB",
            False,
            note=f"table {table / MiB:.0f} MiB + header/journal; "
            f"whole metadata area before data_offset",
        )
    if name in ("qcow2", "qcow2-lazy"):
        return Result(
            key,
            name,
            qcow2_metadata_formula(TiB) / MiB,
            "MiB",
            False,
            note="formula: L1 + L2 (8 B/64 KiB cluster) + 16-bit refcounts",
        )
    if name in ("raw", "qemu-raw"):
        return Result(key, name, 0.0, "MiB", False)
    if name.startswith("qemu-qcow2"):
        return qemu_measure_metadata(key, name, TiB)
    return Result(key, name, None, "MiB", False)
