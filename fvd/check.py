"""Consistency check and repair of an image (`fvd check`)."""
import os

import numpy as np

from .allocator import runs
from .base import check_bitmap
from .fileio import has_data
from .format import BASE_FLAG_PREFETCHED
from .image import CheckResult, Image


def check_path(path, repair=False):
    """Open `path` in check mode (corruptions are collected, not raised) and check it."""
    with Image(path, "r+" if repair else "r", _for_check=True) as img:
        return check_image(img, repair)


def check_image(img, repair=False):
    img._check_open()
    result = CheckResult(messages=[])
    for offset, what in img._problems:
        result.corruptions += 1
        result.messages.append(f"ERROR at offset {offset}: {what}")
    _check_leaks(img, result, repair)
    if img._snapshots is not None:
        img._snapshots.check(img, result, repair)
    if img._partial is not None:
        from .granular import check_partial
        check_partial(img, result)
    if img._bitmap is not None and not img._header["base_flags"] & BASE_FLAG_PREFETCHED:
        check_bitmap(img, result, repair)     # needs the bitmap, not the base itself
    result.messages.extend(img._notes)
    return result


def _check_leaks(img, result, repair):
    """Unused chunks that still hold data, and file space past the last used chunk."""
    cs = img.chunk_size
    data_offset = img._header["data_offset"]
    used = img._in_use()
    file_size = os.fstat(img._fd).st_size
    nfile = max(0, -(-(file_size - data_offset) // cs))
    unused = np.flatnonzero(~used[:nfile]).tolist() + list(range(len(used), nfile))
    # A free chunk is a hole (punched when freed); one that still holds data is a leak.
    leaked = [i for i in unused if has_data(img._fd, data_offset + i * cs, cs)]
    for first, count in runs(leaked):
        result.messages.append(f"Leaked chunks {first}..{first + count - 1} "
                               f"(host offset {data_offset + first * cs})")
    result.leaks += len(leaked)
    if repair and leaked and not img.read_only:
        end = data_offset + img._alloc.end * cs
        for first, count in runs(leaked):
            img._punch_chunks(first, count)
        if file_size > end:
            os.ftruncate(img._fd, end)
        img._sync()
        result.leaks_fixed = len(leaked)
        result.leaks = 0
