"""Header facts and allocation of an open image (`fvd info`), with qemu-img's key names
(`qemu-img info --output=json`) and fvd's own facts under "format-specific"."""

import os
from typing import Any

import numpy as np

from fvd import _impl
from fvd.core import tableless
from fvd.core.image import ImageCore
from fvd.fileio import data_runs, file_size, resolve_relative
from fvd.ondisk import format as fmt
from fvd.qcow2.image import Qcow2Image


def snapshot_dict(
    sid: object, name: str, vm_state_size: int, date_ns: int, vm_clock_ns: int = 0
) -> dict[str, Any]:
    """One snapshot as `qemu-img info --output=json` lists it."""
    return {
        "id": str(sid),
        "name": name,
        "vm-state-size": vm_state_size,
        "date-sec": date_ns // 10**9,
        "date-nsec": date_ns % 10**9,
        "vm-clock-sec": vm_clock_ns // 10**9,
        "vm-clock-nsec": vm_clock_ns % 10**9,
    }


def fvd_snapshot_dicts(img: ImageCore) -> list[dict[str, Any]]:
    """qemu-img's snapshot keys, and fvd's snapshot "uuid" (None without an image UUID)."""
    if img.snapshot_state is None:
        return []
    return [
        dict(
            snapshot_dict(e.id, e.name, e.vm_size, e.created_ns),
            uuid=fmt.snapshot_uuid(img.header, e.id, e.created_ns),
        )
        for e in img.snapshot_state.entries
    ]


def allocated_chunks(img: ImageCore) -> int:
    """Chunks the table maps; of a table-less image, chunks holding data in the file."""
    if not img.tableless:
        return int(np.count_nonzero(img.table < fmt.ZERO_CHUNK))
    cs, d = img.chunk_size, img.header.data_offset
    held = np.zeros(img.nchunks, dtype=bool)
    for s, e, is_data in data_runs(img.fd, d, tableless.data_end(img.header)):
        if is_data:
            held[(s - d) // cs : (e - 1 - d) // cs + 1] = True
    return int(np.count_nonzero(held))


def image_info(img: ImageCore) -> dict[str, Any]:
    st = os.fstat(img.fd)
    data = {
        "uuid": fmt.image_uuid(img.header),
        "version": img.header.version,
        "chunk-size": img.chunk_size,
        "block-size": img.block_size,
        "clean-shutdown": bool(img.header.clean_shutdown),
        "incompatible-features": img.header.incompatible_features,
        "compatible-features": img.header.compatible_features,
        "table": "off" if img.tableless else "on",
        "allocated-chunks": allocated_chunks(img),
        "total-chunks": img.nchunks,
        "image-end-offset": (
            tableless.data_end(img.header)
            if img.tableless
            else img.header.data_offset + img.allocator.end * img.chunk_size
        ),
        "table-size": img.header.table_size,
        "journal-size": img.header.journal_size,
        "data-offset": img.header.data_offset,
        "file-length": file_size(img.fd),
        "block-device": img.on_device,
        "implementation": _impl.IMPLEMENTATION,
    }
    info = {
        "filename": img.path,
        "format": "fvd",
        "virtual-size": img.size,
        # a device node has no blocks of its own: the space used is the image's end
        "actual-size": data["image-end-offset"] if img.on_device else st.st_blocks * 512,
        "cluster-size": img.chunk_size,
        "dirty-flag": not img.header.clean_shutdown,
    }
    if img.header.base_format != fmt.BASE_NONE:
        stored = os.fsdecode(img.read_meta(img.header.base_name_offset, img.header.base_name_size))
        info["backing-filename"] = stored
        info["full-backing-filename"] = img.base_path
        info["backing-filename-format"] = fmt.BASE_FORMAT_NAMES[img.header.base_format]
        data["base-size"] = img.header.base_size
        data["base-prefetched"] = bool(img.header.base_flags & fmt.BASE_FLAG_PREFETCHED)
        chain = getattr(img.base_layer, "chain_info", None)
        if chain:
            data["backing-chain"] = chain()
    if img.partial is not None and img.partial.active:
        data["partial-chunks"] = img.partial.active  # granular copy-on-write
    snaps = fvd_snapshot_dicts(img)
    if snaps:
        info["snapshots"] = snaps
    info["format-specific"] = {"type": "fvd", "data": data}
    # fvd's facts also stay at the top level (their names clash with no qemu-img key).
    for key, value in data.items():
        info.setdefault(key, value)
    return info


def qcow2_info(q: Qcow2Image) -> dict[str, Any]:
    """`qemu-img info` of a qcow2 image opened with fvd.qcow2."""
    st = os.fstat(q.fd)
    info = {
        "filename": q.path,
        "format": "qcow2",
        "virtual-size": q.size,
        "actual-size": st.st_blocks * 512,
        "cluster-size": q.cluster_size,
        "dirty-flag": q.dirty,
    }
    if q.backing_file:
        info["backing-filename"] = q.backing_file
        info["full-backing-filename"] = resolve_relative(q.path, q.backing_file)
        if q.backing_format:
            info["backing-filename-format"] = q.backing_format
    snaps = [
        snapshot_dict(
            s.id, s.name, s.vm_state_size, s.date_sec * 10**9 + s.date_nsec, s.vm_clock_nsec
        )
        for s in q.snapshots()
    ]
    if snaps:
        info["snapshots"] = snaps
    v3 = q.version == 3
    info["format-specific"] = {
        "type": "qcow2",
        "data": {
            "compat": "1.1" if v3 else "0.10",
            "lazy-refcounts": q.lazy_refcounts,
            "refcount-bits": 16,
            "corrupt": bool(q.incompatible_features & 2),
            "extended-l2": False,
        },
    }
    return info
