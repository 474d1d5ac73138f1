"""Consistency check and repair of an image (`fvd check`).

Every problem is counted (messages are capped, counts are not). Repair fixes what it
can, then the image is checked again, so the result reports what is still wrong:
`corruptions_fixed` / `leaks_fixed` are the differences. `check_path` also reopens the
repaired file the way `fvd.open` does; a repair never reports success on an image that
then fails to open or to check clean (docs/format.md, "Validation, check and repair").
"""

import os

import numpy as np

from fvd.core.image import ImageCore
from fvd.features.base import check_bitmap
from fvd.features.granular import check_partial
from fvd.fileio import file_size, has_data, truncate_tail
from fvd.ondisk.format import BASE_FLAG_PREFETCHED, ZERO_CHUNK
from fvd.types import CheckResult
from fvd.units import index_runs


def check_image(img: ImageCore, repair: bool = False) -> CheckResult:
    img.check_open()
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


def _scan(img: ImageCore, repair: bool) -> CheckResult:
    result = CheckResult(messages=[])
    for offset, what, count in img.problems:
        result.corruptions += count
        result.messages.append(f"ERROR at offset {offset}: {what}")
    if img.snapshot_state is not None:
        img.snapshot_state.check(img, result, repair)
    if img.partial is not None:
        check_partial(img, result)
    if repair:
        _repair_front(img, result)
    _check_leaks(img, result, repair)
    if img.bitmap is not None and not img.header.base_flags & BASE_FLAG_PREFETCHED:
        check_bitmap(img, result, repair)  # needs the bitmap, not the base itself
    result.messages.extend(img.notes)
    return result


def _repair_front(img: ImageCore, result: CheckResult) -> None:
    """Check-mode problems of the front: entries past the end already read as zeros in
    memory; chunks shared with another entry or with snapshot metadata get a copy of
    their bytes in a new chunk; then a checkpoint writes table, bitmap and header
    (a new journal epoch, so a damaged journal is left behind)."""
    if not img.problems and not img.relocate:
        return
    cs, d = img.chunk_size, img.header.data_offset
    with img.lock:
        for v in sorted(img.relocate):
            old = int(img.table[v])
            if old >= ZERO_CHUNK:
                continue
            new = img.allocator.allocate()
            img.grow_frozen(new)
            data = os.pread(img.fd, cs, d + old * cs)
            os.pwrite(img.fd, data.ljust(cs, b"\0"), d + new * cs)
            img.table[v] = new
            result.messages.append(f"Repair copies chunk {v} from physical chunk {old} to {new}")
        img.dirty_since_checkpoint = True
        img.checkpoint(clean=False)
    if img.lost:
        result.messages.append(
            f"Repair: {img.lost} chunks that pointed past the end of the "
            f"file now read as zeros (their data is lost)"
        )
    img.problems, img.relocate, img.lost = [], set(), 0


def reopen_failed(result: CheckResult, error: BaseException) -> None:
    """A repaired image that does not open: not ok, whatever the repair counted."""
    result.corruptions = max(result.corruptions, 1)
    result.corruptions_fixed = 0
    result.messages.append(f"ERROR the repaired image does not open: {error}")


def merge_reopen(result: CheckResult, after: CheckResult) -> None:
    """What a check of the reopened, repaired image still finds counts against it."""
    if after.corruptions > result.corruptions or after.leaks > result.leaks:
        result.messages.append("ERROR the repaired image does not check clean:")
        result.messages.extend(after.messages)
        result.corruptions = max(result.corruptions, after.corruptions)
        result.leaks = max(result.leaks, after.leaks)


def _chunk_not_zero(fd: int, offset: int, length: int) -> bool:
    return bool(np.frombuffer(os.pread(fd, length, offset), dtype=np.uint8).any())


def _check_leaks(img: ImageCore, result: CheckResult, repair: bool) -> None:
    """Unused chunks that still hold data, and file space past the last used chunk."""
    cs = img.chunk_size
    data_offset = img.header.data_offset
    used = img.in_use()
    if img.on_device:
        # The device is not the image's to the end: the data area stops at the last
        # chunk allocated, and a free chunk (zeroed when freed) holds no holes to find.
        nfile = img.allocator.end
        holds_data = _chunk_not_zero
    else:
        nfile = max(0, -(-(file_size(img.fd) - data_offset) // cs))
        holds_data = has_data
    unused = np.flatnonzero(~used[:nfile]).tolist() + list(range(len(used), nfile))
    # A free chunk is a hole (punched when freed); one that still holds data is a leak.
    leaked = [i for i in unused if holds_data(img.fd, data_offset + i * cs, cs)]
    for first, count in index_runs(leaked)[:10]:
        result.messages.append(
            f"Leaked chunks {first}..{first + count - 1} (host offset {data_offset + first * cs})"
        )
    result.leaks += len(leaked)
    if repair and leaked and not img.read_only:
        end = data_offset + img.allocator.end * cs
        for first, count in index_runs(leaked):
            img.punch_chunks(first, count)
        truncate_tail(img.fd, end)
        img.sync()
        result.leaks_fixed = len(leaked)
        result.leaks = 0
