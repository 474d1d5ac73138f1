"""Header facts and allocation of an open image (`fvd info`)."""
import os

from . import _impl
from . import format as fmt


def image_info(img):
    h = img._header
    st = os.fstat(img._fd)
    info = {
        "filename": img.path,
        "format": "fvd",
        "version": h["version"],
        "virtual-size": img.size,
        "actual-size": st.st_blocks * 512,
        "file-length": st.st_size,
        "chunk-size": img.chunk_size,
        "block-size": img.block_size,
        "clean-shutdown": bool(h["clean_shutdown"]),
        "incompatible-features": h["incompatible_features"],
        "compatible-features": h["compatible_features"],
        "allocated-chunks": img.allocated_chunks,
        "table-size": h["table_size"],
        "journal-size": h["journal_size"],
        "data-offset": h["data_offset"],
        "implementation": _impl.IMPLEMENTATION,
    }
    if h["base_format"] != fmt.BASE_NONE:
        info["backing-filename"] = img.base
        info["backing-filename-format"] = fmt.BASE_FORMAT_NAMES[h["base_format"]]
        info["base-size"] = h["base_size"]
        info["base-prefetched"] = bool(h["base_flags"] & fmt.BASE_FLAG_PREFETCHED)
        chain = getattr(img._base, "chain_info", None)
        if chain:
            info["backing-chain"] = chain()
    if img._partial is not None and img._partial.active:
        info["partial-chunks"] = img._partial.active      # granular copy-on-write
    if img._snapshots is not None:
        info["snapshots"] = [s.as_dict() for s in img.snapshots()]
    return info
