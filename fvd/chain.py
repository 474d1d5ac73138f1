"""Chain operations as qemu-img names them: commit, rebase, compare, measure, resize.

They work on fvd, qcow2 and raw images and any chain of them (an fvd overlay over a
qcow2 backing file, and so on), and read only what the maps say holds data: holes are
never read. Layer 12, over convert (measure uses convert's changed ranges).

* commit(top): the data the top (and, with base=, the layers between) holds is written
  into the backing file, then the top is emptied (qemu-img commit; -d keeps it).
* rebase(image, backing): safe mode copies into the image what would read differently
  through the new backing file, then the header names it; unsafe only the header.
* compare(a, b): qemu-img compare's result and messages.
* measure(image): qemu-img measure's `required` and `fully-allocated` for a conversion.
* resize(path, size): `Image.resize` / `Qcow2Image.resize` by file name.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from fvd import qcow2
from fvd.convert import changed_ranges
from fvd.errors import ChainError
from fvd.fileio import pread_fill, resolve_relative
from fvd.image import Image
from fvd.imageio import AnyImage, RawImage, open_image, probe, resolve_format
from fvd.nbd_client import is_nbd_uri
from fvd.ondisk import format as fmt
from fvd.ops import reshape
from fvd.qcow2 import Qcow2Image
from fvd.types import ConvertResult, Extent, StrPath
from fvd.units import KiB, MiB

BUFFER = MiB
SECTOR = 512  # qemu-img compare reports mismatches per 512-byte sector
Progress = Optional[Callable[[int, int], None]]


# ----- the chain ------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    path: str
    format: str
    stored_name: str = ""  # the name the layer above stores for it


def backing_of(img: AnyImage) -> Optional[Layer]:
    """The backing file of an open image as its header names it, or None."""
    if isinstance(img, RawImage):
        return None
    info = img.info() if isinstance(img, Image) else _qcow2_backing(img)
    full = info.get("full-backing-filename")
    if not full:
        return None
    return Layer(
        str(full),
        str(info.get("backing-filename-format") or probe(full)),
        str(info.get("backing-filename", full)),
    )


def _qcow2_backing(q: Qcow2Image) -> dict[str, Any]:
    if not q.backing_file:
        return {}
    return {
        "full-backing-filename": resolve_relative(q.path, q.backing_file),
        "backing-filename": q.backing_file,
        "backing-filename-format": q.backing_format,
    }


def chain_of(path: StrPath, format: Optional[str] = None) -> list[Layer]:
    """The layers from `path` down to the bottom, top first."""
    layers = [Layer(os.fspath(path), resolve_format(path, format))]
    seen = {os.path.realpath(layers[0].path)}
    while True:
        with open_image(layers[-1].path, layers[-1].format) as img:
            below = backing_of(img)
        if below is None:
            return layers
        if is_nbd_uri(below.path):  # a remote raw base: the bottom, not a file
            return layers + [Layer(below.path, "raw", below.stored_name)]
        real = os.path.realpath(below.path)
        if real in seen:
            raise ChainError(f"{below.path}: backing chain loops")
        seen.add(real)
        layers.append(below)


def _lock_shared(path: str) -> int:
    """A read-only fd holding a shared lock: no writer can change the layer meanwhile."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ChainError(f"{path}: image is open for writing elsewhere") from None
    return fd


@dataclass
class _Tally:
    start: float = field(default_factory=time.monotonic)
    read: int = 0
    written: int = 0
    extents: int = 0
    zeros: int = 0

    def result(self) -> ConvertResult:
        return ConvertResult(
            self.read, self.written, self.extents, self.zeros, time.monotonic() - self.start
        )


# ----- commit ---------------------------------------------------------------------------
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
    tally = _Tally()
    chain = chain_of(top, top_format)
    if len(chain) < 2:
        raise ChainError(f"{top}: has no backing file to commit into")
    depth = 1 if base is None else _depth_of(chain, os.fspath(base))
    if is_nbd_uri(chain[depth].path):
        raise ChainError(f"{chain[depth].path}: cannot commit into an NBD export")
    empty = base is None and not drop
    fds = [_lock_shared(layer.path) for layer in chain[:depth]]
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
    return tally.result()


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
    tally: _Tally,
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
                tally.zeros += 1
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


def _copy_extent(fd: int, e: Extent, out: AnyImage, buf: bytearray, tally: _Tally) -> None:
    assert e.offset is not None
    tally.extents += 1
    for pos in range(0, e.length, BUFFER):
        n = min(BUFFER, e.length - pos)
        mv = memoryview(buf)[:n]
        pread_fill(fd, mv, e.offset + pos)
        out.write(e.start + pos, mv)
        tally.read += n
        tally.written += n


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
    _fsync_dir(os.path.dirname(os.path.abspath(top.path)))


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- rebase ---------------------------------------------------------------------------
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
    tally = _Tally()
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
    return tally.result()


def _copy_differences(
    path: str, fmt_name: str, new: AnyImage, progress: Progress, tally: _Tally
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
    img: AnyImage, new: AnyImage, pos: int, n: int, bufs: tuple[bytearray, bytearray], tally: _Tally
) -> None:
    old, nw = memoryview(bufs[0])[:n], memoryview(bufs[1])[:n]
    img.readinto(pos, old)
    _read_padded(new, pos, nw)
    tally.read += 2 * n
    if not _same(bufs[0], bufs[1], n):
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


def _keep_cut_block(path: str, new: AnyImage, tally: _Tally) -> None:
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
        _read_padded(new, start, head)
        img.write(start, head)
        tally.written += len(head)
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


def _read_padded(img: AnyImage, pos: int, mv: memoryview) -> None:
    """Read `img` at pos; bytes past its end read as zeros (a shorter backing file)."""
    n = max(0, min(len(mv), img.size - pos))
    if n:
        img.readinto(pos, mv[:n])
    mv[n:] = bytes(len(mv) - n)


def _store(img: AnyImage, pos: int, data: memoryview, tally: _Tally) -> None:
    if not np.frombuffer(data, dtype=np.uint8).any():
        img.write_zeroes(pos, len(data))
        tally.zeros += 1
        return
    img.write(pos, data)
    tally.written += len(data)
    tally.extents += 1


# ----- compare --------------------------------------------------------------------------
@dataclass
class Comparison:
    """compare_images' verdict: identical, qemu-img's message, and its warnings."""

    identical: bool
    message: str
    warnings: list[str] = field(default_factory=list)


def compare(
    a: StrPath,
    b: StrPath,
    *,
    strict: bool = False,
    a_format: Optional[str] = None,
    b_format: Optional[str] = None,
) -> bool:
    """True when the two images (any formats, any chains) read the same, as
    `qemu-img compare` (strict: sizes and allocation must match too)."""
    return compare_images(a, b, strict=strict, a_format=a_format, b_format=b_format).identical


def compare_images(
    a: StrPath,
    b: StrPath,
    *,
    strict: bool = False,
    a_format: Optional[str] = None,
    b_format: Optional[str] = None,
) -> Comparison:
    """The comparison with qemu-img's messages ("Images are identical.", "Content
    mismatch at offset N!", ...). Ranges both maps call zero are never read."""
    with open_image(a, a_format) as ia, open_image(b, b_format) as ib:
        warnings = []
        if ia.size != ib.size:
            if strict:
                return Comparison(False, "Strict mode: Image size mismatch!")
            warnings.append("Warning: Image size mismatch!")
        with _LayerReader(ia) as ra, _LayerReader(ib) as rb:
            verdict = _compare_common(ra, rb, min(ia.size, ib.size), strict)
            if verdict is None:
                longer = ra if ia.size > ib.size else rb
                verdict = _compare_tail(longer, min(ia.size, ib.size))
        if verdict is not None:
            return Comparison(False, verdict, warnings)
        return Comparison(True, "Images are identical.", warnings)


class _LayerReader:
    """Reads an image's data extents straight from the file of the layer that holds
    them (one pread per piece, at the extent's host offset), so a chain costs no
    per-cluster lookups; anything without an offset goes through the image."""

    def __init__(self, img: AnyImage) -> None:
        self.img = img
        self.fds: list[int] = []
        layers = [Layer(img.path, img.format if isinstance(img, RawImage) else "")]
        if not isinstance(img, RawImage):
            layers = _layers_of_open(img)
        for layer in layers:
            self.fds.append(os.open(layer.path, os.O_RDONLY))

    def __enter__(self) -> _LayerReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            os.close(fd)

    def extents(self, start: int, length: int) -> Iterator[Extent]:
        return iter(self.img.extents(start, length)) if length else iter(())

    def read(self, e: Extent, pos: int, mv: memoryview) -> None:
        if e.offset is None or not e.data or e.depth >= len(self.fds):
            self.img.readinto(pos, mv)
        else:
            pread_fill(self.fds[e.depth], mv, e.offset + pos - e.start)


def _layers_of_open(img: Union[Image, Qcow2Image]) -> list[Layer]:
    """The files of an open image's chain, top first (as its extents' depths count)."""
    layers = [Layer(img.path, "")]
    below = backing_of(img)
    while below is not None and not is_nbd_uri(below.path):  # NBD: read through the image
        layers.append(below)
        if below.format == "raw":
            break
        with open_image(below.path, below.format) as lower:
            below = backing_of(lower)
    return layers


Piece = tuple[int, int, Extent, Extent]  # start, end, and the extent of each side there


def _paired(ra: _LayerReader, rb: _LayerReader, size: int) -> Iterator[Piece]:
    """[start, end) pieces where neither map changes, with both sides' extents."""
    xa, xb = ra.extents(0, size), rb.extents(0, size)
    a, b = next(xa, None), next(xb, None)
    pos = 0
    while a is not None and b is not None and pos < size:
        end = min(a.start + a.length, b.start + b.length)
        yield pos, end, a, b
        pos = end
        if a.start + a.length == end:
            a = next(xa, None)
        if b.start + b.length == end:
            b = next(xb, None)


def _status(e: Extent) -> tuple[bool, bool, bool]:
    return e.present, e.zero, e.data and not e.zero


def _compare_common(ra: _LayerReader, rb: _LayerReader, size: int, strict: bool) -> Optional[str]:
    bufs = (bytearray(BUFFER), bytearray(BUFFER))
    for s, e, xa, xb in _paired(ra, rb, size):
        if strict and _status(xa) != _status(xb):
            return f"Strict mode: Offset {s} block status mismatch!"
        bad = _compare_range(ra, rb, s, e, xa, xb, bufs)
        if bad is not None:
            return f"Content mismatch at offset {bad}!"
    return None


def _compare_tail(longer: _LayerReader, common: int) -> Optional[str]:
    """The part only the longer image has must read as zeros."""
    buf = bytearray(BUFFER)
    for ext in longer.extents(common, longer.img.size - common):
        if ext.data and not ext.zero:
            bad = _first_nonzero(longer, ext, ext.start, ext.start + ext.length, buf)
            if bad is not None:
                return f"Content mismatch at offset {bad}!"
    return None


def _compare_range(
    ra: _LayerReader,
    rb: _LayerReader,
    s: int,
    e: int,
    xa: Extent,
    xb: Extent,
    bufs: tuple[bytearray, bytearray],
) -> Optional[int]:
    """The first differing sector's offset in [s, e), or None."""
    da, db = _status(xa)[2], _status(xb)[2]
    if not da and not db:
        return None
    if da != db:
        return (
            _first_nonzero(ra, xa, s, e, bufs[0]) if da else _first_nonzero(rb, xb, s, e, bufs[0])
        )
    for pos in range(s, e, BUFFER):
        n = min(BUFFER, e - pos)
        ma, mb = memoryview(bufs[0])[:n], memoryview(bufs[1])[:n]
        ra.read(xa, pos, ma)
        rb.read(xb, pos, mb)
        if not _same(bufs[0], bufs[1], n):
            x = np.frombuffer(ma, dtype=np.uint8) != np.frombuffer(mb, dtype=np.uint8)
            return pos + int(np.argmax(x)) // SECTOR * SECTOR
    return None


def _same(a: bytearray, b: bytearray, n: int) -> bool:
    """The first n bytes equal. A whole bytearray compares with memcmp; a part through
    numpy views in 8-byte words (a memoryview compares byte by byte, ~300x slower, and
    slicing copies)."""
    if n == len(a) == len(b):
        return a == b
    dtype = np.uint64 if n % 8 == 0 else np.uint8
    count = n // np.dtype(dtype).itemsize
    x = np.frombuffer(a, dtype=dtype, count=count)
    return bool(np.array_equal(x, np.frombuffer(b, dtype=dtype, count=count)))


def _first_nonzero(r: _LayerReader, ext: Extent, s: int, e: int, buf: bytearray) -> Optional[int]:
    for pos in range(s, e, BUFFER):
        n = min(BUFFER, e - pos)
        mv = memoryview(buf)[:n]
        r.read(ext, pos, mv)
        arr = np.frombuffer(mv, dtype=np.uint8)
        if arr.any():
            return pos + int(np.argmax(arr != 0)) // SECTOR * SECTOR
    return None


# ----- measure --------------------------------------------------------------------------
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


# ----- resize ---------------------------------------------------------------------------
def resize(
    image: StrPath, size: int, *, shrink: bool = False, image_format: Optional[str] = None
) -> None:
    """Resize an image file of any format (raw: truncate, refusing to cut data)."""
    with open_image(os.fspath(image), image_format, "r+") as img:
        img.resize(size, shrink=shrink)
