"""Consistency check and repair of an image (`fvd check`).

Every problem is counted (messages are capped, counts are not). Repair fixes what it
can, then the image is checked again, so the result reports what is still wrong:
`corruptions_fixed` / `leaks_fixed` are the differences. `check_path` also reopens the
repaired file the way `fvd.open` does; a repair never reports success on an image that
then fails to open or to check clean (docs/format.md, "Validation, check and repair").
"""

import os

import numpy as np

from .allocator import runs
from .base import check_bitmap
from .errors import BaseImageError, FvdError
from .fileio import has_data
from .format import BASE_FLAG_PREFETCHED, ZERO_CHUNK
from .image import CheckResult, Image


def check_path(path, repair=False):
    """Open `path` in check mode (corruptions are collected, not raised) and check it."""
    with Image(path, "r+" if repair else "r", _for_check=True) as img:
        result = check_image(img, repair)
    if repair:
        _verify_reopen(path, result)
    return result


def check_image(img, repair=False):
    img._check_open()
    repair = repair and not img.read_only
    result = _scan(img, repair)
    if not repair:
        return result
    before_c = result.corruptions + result.corruptions_fixed
    before_l = result.leaks + result.leaks_fixed
    if not before_c and not before_l:
        return result
    after = _scan(img, False)
    after.messages = result.messages + ["After repair:"] + after.messages
    after.corruptions_fixed = max(0, before_c - after.corruptions)
    after.leaks_fixed = max(0, before_l - after.leaks)
    return after


def _scan(img, repair):
    result = CheckResult(messages=[])
    for offset, what, count in img._problems:
        result.corruptions += count
        result.messages.append(f"ERROR at offset {offset}: {what}")
    if img._snapshots is not None:
        img._snapshots.check(img, result, repair)
    if img._partial is not None:
        from .granular import check_partial

        check_partial(img, result)
    if repair:
        _repair_front(img, result)
    _check_leaks(img, result, repair)
    if img._bitmap is not None and not img._header["base_flags"] & BASE_FLAG_PREFETCHED:
        check_bitmap(img, result, repair)  # needs the bitmap, not the base itself
    result.messages.extend(img._notes)
    return result


def _repair_front(img, result):
    """Check-mode problems of the front: entries past the end already read as zeros in
    memory; chunks shared with another entry or with snapshot metadata get a copy of
    their bytes in a new chunk; then a checkpoint writes table, bitmap and header
    (a new journal epoch, so a damaged journal is left behind)."""
    if not img._problems and not img._relocate:
        return
    cs, d = img.chunk_size, img._header["data_offset"]
    with img._lock:
        for v in sorted(img._relocate):
            old = int(img._table[v])
            if old >= ZERO_CHUNK:
                continue
            new = img._alloc.allocate()
            img._grow_frozen(new)
            data = os.pread(img._fd, cs, d + old * cs)
            os.pwrite(img._fd, data.ljust(cs, b"\0"), d + new * cs)
            img._table[v] = new
            result.messages.append(f"Repair copies chunk {v} from physical chunk {old} to {new}")
        img._dirty_since_checkpoint = True
        img._checkpoint(clean=False)
    if img._lost:
        result.messages.append(
            f"Repair: {img._lost} chunks that pointed past the end of the "
            f"file now read as zeros (their data is lost)"
        )
    img._problems, img._relocate, img._lost = [], set(), 0


def _verify_reopen(path, result):
    """The repaired file must open as fvd.open opens it, and check clean."""
    try:
        try:
            with Image(path, "r") as img:
                after = check_image(img)
        except BaseImageError:
            with Image(path, "r", _for_check=True) as img:  # the base alone is missing
                after = check_image(img)
    except FvdError as e:
        result.corruptions = max(result.corruptions, 1)
        result.corruptions_fixed = 0
        result.messages.append(f"ERROR the repaired image does not open: {e}")
        return
    if after.corruptions > result.corruptions or after.leaks > result.leaks:
        result.messages.append("ERROR the repaired image does not check clean:")
        result.messages.extend(after.messages)
        result.corruptions = max(result.corruptions, after.corruptions)
        result.leaks = max(result.leaks, after.leaks)


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
    for first, count in runs(leaked)[:10]:
        result.messages.append(
            f"Leaked chunks {first}..{first + count - 1} (host offset {data_offset + first * cs})"
        )
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
