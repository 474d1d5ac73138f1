"""`fvd rebase` (qemu-img rebase): a new backing file; safe mode copies what would
read differently, -u changes only the header."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Optional

import numpy as np

from fvd import qcow2
from fvd.chain.layers import (
    BUFFER,
    Progress,
    chain_of,
    read_padded,
    same_bytes,
)
from fvd.copyloop import CopyCounts
from fvd.errors import ChainError
from fvd.fileio import resolve_relative
from fvd.image import Image
from fvd.imageio import AnyImage, open_image, resolve_format
from fvd.ondisk import format as fmt
from fvd.ops import reshape
from fvd.types import ConvertResult, StrPath


def rebase(
    image: StrPath,
    backing: str,
    *,
    backing_format: Optional[str] = None,
    unsafe: bool = False,
    progress: Progress = None,
    image_format: Optional[str] = None,
) -> ConvertResult:
    """Make `backing` (stored as given: relative to the image's directory) the backing
    file of `image`, as `qemu-img rebase`. Safe mode (default): wherever the image's own
    layer does not answer, the old chain's bytes are compared with the new backing
    file's and copied into the image where they differ, so the image reads the same
    before and after. unsafe=True (`-u`): only the header changes."""
    started, tally = time.monotonic(), CopyCounts()
    path = os.fspath(image)
    fmt_name = resolve_format(path, image_format)
    if fmt_name == "raw":
        raise ChainError(f"{path}: a raw image has no backing file")
    resolved = resolve_relative(path, backing)
    if not os.path.exists(resolved):
        raise ChainError(f"{resolved}: backing file does not exist")
    bfmt = resolve_format(resolved, backing_format)
    me = os.path.realpath(path)
    if any(os.path.realpath(layer.path) == me for layer in chain_of(resolved, bfmt)):
        raise ChainError(f"{resolved}: would make {path} its own backing file (a loop)")
    with open_image(resolved, bfmt) as new:
        new_size = new.size
        if not unsafe:
            _copy_differences(path, fmt_name, new, progress, tally)
        elif fmt_name == "fvd":
            _keep_cut_block(path, new, tally)
    if fmt_name == "fvd":
        reshape.set_base(path, os.fsencode(backing), fmt.BASE_FORMATS[bfmt], new_size)
    else:
        qcow2.set_backing(path, backing, bfmt)
    return tally.result(started)


def _copy_differences(
    path: str, fmt_name: str, new: AnyImage, progress: Progress, tally: CopyCounts
) -> None:
    with open_image(path, fmt_name, "r+") as img:
        if isinstance(img, Image) and img.snapshots():
            raise ChainError(f"{path}: cannot rebase an image with internal snapshots")
        ranges = _candidates(img, new)
        cut = _cut_block(img, new)
        total = sum(b - a for a, b in ranges)
        done = 0
        bufs = (bytearray(BUFFER), bytearray(BUFFER))
        for a, b in ranges:
            step = b - a if (a, b) == cut else BUFFER  # the cut block in one piece
            if step > BUFFER:
                bufs = (bytearray(step), bytearray(step))
            for pos in range(a, b, step):
                n = min(step, b - pos)
                _copy_if_different(img, new, pos, n, bufs, tally)
                done += n
                if progress is not None:
                    progress(done, total)
        img.flush()


def _copy_if_different(
    img: AnyImage,
    new: AnyImage,
    pos: int,
    n: int,
    bufs: tuple[bytearray, bytearray],
    tally: CopyCounts,
) -> None:
    old, nw = memoryview(bufs[0])[:n], memoryview(bufs[1])[:n]
    img.readinto(pos, old)
    read_padded(new, pos, nw)
    tally.bytes_read += 2 * n
    if not same_bytes(bufs[0], bufs[1], n):
        _store(img, pos, old, tally)


Span = tuple[int, int]


def _data_spans(img: AnyImage, size: int) -> list[Span]:
    """[start, end) of the ranges that may read non-zero bytes, in order."""
    if size <= 0:
        return []
    return [(e.start, e.start + e.length) for e in img.extents(0, size) if e.data and not e.zero]


def _union(a: list[Span], b: list[Span]) -> list[Span]:
    out: list[Span] = []
    for s, e in sorted(a + b):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _intersect(a: list[Span], b: list[Span]) -> list[Span]:
    """Both sorted and disjoint: the parts in both."""
    out: list[Span] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _keep_cut_block(path: str, new: AnyImage, tally: CopyCounts) -> None:
    """-u on an fvd image whose old base ends inside a block whose head reads the base
    and whose tail the image holds: past a longer new base the whole block would read
    the new base. The block's head gets the new base's bytes (its tail stays) and so
    becomes the image's, which is what -u means for both parts."""
    with Image(path, "r+") as img:
        old, bs = img.base_size or 0, img.block_size
        if not old % bs or new.size <= old or old >= img.size:
            return
        start = old // bs * bs
        end = min(start + bs, img.size)
        parts = list(img.extents(start, end - start))
        if parts[0].depth == 0 or not (parts[-1].depth == 0 and parts[-1].present):
            return
        head = memoryview(bytearray(old - start))
        read_padded(new, start, head)
        img.write(start, head)
        tally.bytes_written += len(head)
        tally.extents += 1


def _not_owned(img: AnyImage) -> Iterator[Span]:
    """Ranges the image's own layer does not answer (they read the backing chain)."""
    for e in img.extents():
        if not (e.depth == 0 and e.present):
            yield e.start, e.start + e.length


def _cut_block(img: AnyImage, new: AnyImage) -> Optional[Span]:
    """fvd: the block the old base's end cuts, when its head reads the base and a longer
    new base would cover its tail too (the block has one bit: then all of it reads the
    new base). It is compared, and copied if it differs, whole and as one piece (a
    write of the tail alone would set no bit)."""
    if not isinstance(img, Image) or not img.base_size or not img.base_size % img.block_size:
        return None
    if new.size <= img.base_size:
        return None
    start = img.base_size // img.block_size * img.block_size
    end = min(start + img.block_size, img.size)
    if start >= img.size or next(iter(img.extents(start, end - start))).depth == 0:
        return None
    return start, end


def _candidates(img: AnyImage, new: AnyImage) -> list[Span]:
    """What safe rebase compares: not answered by the image itself, and non-zero on one
    side at least (zeros on both sides are equal); the cut block whole and alone."""
    data = _union(_data_spans(img, img.size), _data_spans(new, min(new.size, img.size)))
    ranges = _intersect(_union(list(_not_owned(img)), []), data)
    cut = _cut_block(img, new)
    if cut is None:
        return ranges
    out: list[Span] = []
    for s, e in ranges:
        out += [(a, b) for a, b in ((s, min(e, cut[0])), (max(s, cut[1]), e)) if a < b]
    return sorted(out + [cut])


def _store(img: AnyImage, pos: int, data: memoryview, tally: CopyCounts) -> None:
    if not np.frombuffer(data, dtype=np.uint8).any():
        img.write_zeroes(pos, len(data))
        tally.zero_ranges += 1
        return
    img.write(pos, data)
    tally.bytes_written += len(data)
    tally.extents += 1
