"""`fvd commit` (qemu-img commit): an overlay's data into its backing file, then the
overlay emptied."""

from __future__ import annotations

import os
import time
from typing import Optional

from fvd import qcow2
from fvd.chain.layers import (
    BUFFER,
    Layer,
    Progress,
    chain_of,
    lock_shared,
)
from fvd.convert import fsync_dir
from fvd.copyloop import CopyCounts
from fvd.errors import ChainError
from fvd.fileio import pread_fill
from fvd.image import Image
from fvd.imageio import AnyImage, open_image
from fvd.nbd_client import is_nbd_uri
from fvd.ondisk import format as fmt
from fvd.ops import reshape
from fvd.qcow2 import Qcow2Image
from fvd.types import ConvertResult, Extent, StrPath


def commit(
    top: StrPath,
    *,
    base: Optional[StrPath] = None,
    progress: Progress = None,
    drop: bool = False,
    top_format: Optional[str] = None,
) -> ConvertResult:
    """Write the data of `top` (and of the layers above `base`) into its backing file
    (or `base`, deeper in its chain), as `qemu-img commit`; only ranges those layers hold
    are read and written, their zeros become zeros in the base. Then `top` is emptied
    (its ranges read the base again) unless `drop` (`-d`) or `base` is given (`-b`
    implies `-d`, as in qemu-img). The backing file grows when it is smaller than top."""
    started, tally = time.monotonic(), CopyCounts()
    chain = chain_of(top, top_format)
    if len(chain) < 2:
        raise ChainError(f"{top}: has no backing file to commit into")
    depth = 1 if base is None else _depth_of(chain, os.fspath(base))
    if is_nbd_uri(chain[depth].path):
        raise ChainError(f"{chain[depth].path}: cannot commit into an NBD export")
    empty = base is None and not drop
    fds = [lock_shared(layer.path) for layer in chain[:depth]]
    try:
        with open_image(chain[0].path, chain[0].format) as img:
            size = img.size
            if empty and isinstance(img, Qcow2Image) and img.snapshots():
                raise ChainError(f"{top}: has internal snapshots; emptying it would drop them: -d")
            plan = [e for e in img.extents() if e.depth < depth and e.present]
        grown = _copy_plan(plan, fds, chain, chain[depth], size, progress, tally)
    finally:
        for fd in fds:
            os.close(fd)
    above, target = chain[depth - 1], chain[depth]
    if grown and above.format == "fvd":
        # an fvd overlay records its base's size: the grown base is still its base
        reshape.set_base(
            above.path, os.fsencode(target.stored_name), fmt.BASE_FORMATS[target.format], size
        )
    if empty:
        _empty(chain[0])
    return tally.result(started)


def _depth_of(chain: list[Layer], base: str) -> int:
    real = os.path.realpath(base)
    for i, layer in enumerate(chain):
        if os.path.realpath(layer.path) == real:
            if i == 0:
                raise ChainError(f"{base}: is the top image itself, not one of its backing files")
            return i
    raise ChainError(f"{base}: is not in the backing chain of {chain[0].path}")


def _copy_plan(
    plan: list[Extent],
    fds: list[int],
    chain: list[Layer],
    target: Layer,
    size: int,
    progress: Progress,
    tally: CopyCounts,
) -> bool:
    """Copy each extent from the file of the layer that holds it into the target;
    True when the target had to grow to the top's size."""
    total = sum(e.length for e in plan)
    done = 0
    grown = False
    with open_image(target.path, target.format, "r+") as out:
        if out.size < size:
            _grow(out, size)
            grown = True
        buf = bytearray(BUFFER)
        for e in plan:
            if e.zero or not e.data:
                out.write_zeroes(e.start, e.length)
                tally.zero_ranges += 1
            else:
                if e.offset is None:
                    raise ChainError(f"{chain[e.depth].path}: data at {e.start} has no offset")
                _copy_extent(fds[e.depth], e, out, buf, tally)
            done += e.length
            if progress is not None:
                progress(done, total)
        out.flush()
    return grown


def _grow(out: AnyImage, size: int) -> None:
    out.resize(-(-size // 512) * 512 if isinstance(out, Qcow2Image) else size)


def _copy_extent(fd: int, e: Extent, out: AnyImage, buf: bytearray, tally: CopyCounts) -> None:
    assert e.offset is not None
    tally.extents += 1
    for pos in range(0, e.length, BUFFER):
        n = min(BUFFER, e.length - pos)
        mv = memoryview(buf)[:n]
        pread_fill(fd, mv, e.offset + pos)
        out.write(e.start + pos, mv)
        tally.bytes_read += n
        tally.bytes_written += n


def _empty(top: Layer) -> None:
    """The top's ranges read its backing file again (crash-safe: see each format)."""
    if top.format == "fvd":
        if reshape.empty_front(top.path):
            Image(top.path, "r+").close()  # the unclean open scrubs the unused chunks
        return
    with qcow2.open(top.path) as q:  # a fresh overlay renamed over the old one
        backing, bfmt, cs = q.backing_file, q.backing_format, q.cluster_size
        lazy, size = q.lazy_refcounts, q.size
    tmp = os.path.join(
        os.path.dirname(os.path.abspath(top.path)),
        f".{os.path.basename(top.path)}.empty-{os.getpid()}",
    )
    qcow2.create(
        tmp,
        size,
        cluster_size=cs,
        lazy_refcounts=lazy,
        overwrite=True,
        backing_file=backing,
        backing_format=bfmt,
    )
    os.rename(tmp, top.path)
    fsync_dir(os.path.dirname(os.path.abspath(top.path)))
