"""`fvd measure` (qemu-img measure): `required` and `fully-allocated` bytes of a
conversion to qcow2 (qemu-img's figures) or fvd."""

from __future__ import annotations

from typing import Any, Optional

from fvd.convert import changed_ranges
from fvd.errors import ChainError
from fvd.imageio import RawImage, open_image
from fvd.ondisk import format as fmt
from fvd.ops import reshape
from fvd.types import StrPath
from fvd.units import KiB, MiB


def measure(
    image: StrPath,
    *,
    out_format: str = "qcow2",
    snapshot: Optional[str] = None,
    since: Optional[str] = None,
    image_format: Optional[str] = None,
    cluster_size: int = 64 * KiB,
    chunk_size: int = MiB,
    block_size: int = 64 * KiB,
) -> dict[str, int]:
    """Bytes a conversion of `image` (or its snapshot, or with `since` the incremental
    since that snapshot) to `out_format` needs: `required` for its data, and
    `fully-allocated` with every cluster / chunk, as `qemu-img measure` (qcow2 figures
    equal qemu-img's; fvd's are its layout plus one chunk per chunk touched)."""
    if out_format not in ("qcow2", "fvd", "raw"):
        raise ValueError(f"measure: unknown output format {out_format!r}")
    with open_image(image, image_format) as img:
        size = img.size
        if since is not None:
            if isinstance(img, RawImage):
                raise ChainError(f"{image}: a raw image has no snapshots (since={since!r})")
            runs = [(r.start, r.length) for r in changed_ranges(img, since, snapshot) if not r.zero]
        elif snapshot is not None:
            if isinstance(img, RawImage):
                raise ChainError(f"{image}: a raw image has no snapshots")
            with img.open_snapshot(snapshot) as view:
                runs = _data_runs(view.extents())
        else:
            runs = _data_runs(img.extents())
    if out_format == "raw":
        return {"required": size, "fully-allocated": size}
    if out_format == "qcow2":
        return _measure_qcow2(size, runs, cluster_size)
    return _measure_fvd(size, runs, chunk_size, block_size, overlay=since is not None)


def _data_runs(extents: Any) -> list[tuple[int, int]]:
    return [(e.start, e.length) for e in extents if e.data and not e.zero]


def _aligned_bytes(runs: list[tuple[int, int]], grain: int) -> int:
    """Bytes of the grains the runs touch, each grain once (qemu's measure loop)."""
    total, covered = 0, 0
    for start, length in runs:
        a = max(start // grain * grain, covered)
        b = -(-(start + length) // grain) * grain
        if b > a:
            total += b - a
            covered = b
    return total


def _measure_qcow2(size: int, runs: list[tuple[int, int]], cs: int) -> dict[str, int]:
    vsize = -(-size // 512) * 512
    full = qcow2_prealloc_size(vsize, cs)
    return {"required": full - vsize + _aligned_bytes(runs, cs), "fully-allocated": full}


def qcow2_prealloc_size(size: int, cs: int, refcount_order: int = 4) -> int:
    """QEMU's size of a fully preallocated qcow2 file: header cluster, L2 tables, L1
    table, refcount table and blocks (to their fixed point), and the data clusters."""
    aligned = -(-size // cs) * cs
    meta = cs
    nl2e = -(-(aligned // cs) // (cs // 8)) * (cs // 8)
    meta += nl2e * 8
    nl1e = -(-(nl2e * 8 // cs) // (cs // 8)) * (cs // 8)
    meta += nl1e * 8
    clusters = (meta + aligned) // cs
    per_block = cs * 8 // (1 << refcount_order)
    table = blocks = 0
    n, last = 0, -1
    while n != last:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // (cs // 8))
        n = clusters + blocks + table
    return meta + (blocks + table) * cs + aligned


def _measure_fvd(
    size: int, runs: list[tuple[int, int]], cs: int, bs: int, overlay: bool
) -> dict[str, int]:
    """fvd's layout (an overlay: a name slot and a bitmap for a base of the same size)
    plus one chunk per chunk touched."""
    layout = fmt.layout(size, cs, bs, size if overlay else 0, reshape.SLOT - 1 if overlay else 0)
    head = layout["data_offset"]
    return {
        "required": head + _aligned_bytes(runs, cs),
        "fully-allocated": head + -(-size // cs) * cs,
    }
