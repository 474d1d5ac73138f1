"""Allocation map of an image: the runs `qemu-img map --output=json` would report."""
from . import format as fmt
from .image import Extent


def image_extents(img, offset=0, length=None):
    """Iterate Extents covering [offset, offset+length) exactly, equal neighbours merged."""
    img._check_open()
    if length is None:
        length = img.size - offset
    if offset < 0 or length < 0 or offset + length > img.size:
        raise ValueError(f"range [{offset}, {offset + length}) outside the image")
    return _merge(_segments(img, offset, offset + length))


def _segments(img, start, end):
    cs = img.chunk_size
    data_offset = img._header["data_offset"]
    pos = start
    while pos < end:
        v = pos // cs
        stop = min(end, (v + 1) * cs)
        e = int(img._table[v])
        if e < fmt.ZERO_CHUNK:
            host = data_offset + e * cs + pos % cs
            if img._base is not None:
                yield from img._base.segments_in_chunk(pos, stop, host)
            elif getattr(img, "_partial", None) is not None and \
                    img._partial.slot_of(v) is not None:     # runs of N and its source
                for s, t, h in img._partial.host_runs(img._partial.slot_of(v), e, pos, stop,
                                                      v * cs, data_offset):
                    yield Extent(s, t - s, 0, True, False, True, h)
            else:
                yield Extent(pos, stop - pos, 0, True, False, True, host)
        elif e == fmt.ZERO_CHUNK:
            yield Extent(pos, stop - pos, 0, True, True, False, None)
        elif img._base is not None:
            yield from img._base.segments_below(pos, stop)
        else:
            yield Extent(pos, stop - pos, 0, False, True, False, None)
        pos = stop


def _merge(segments):
    cur = None
    for seg in segments:
        if cur is not None and _joins(cur, seg):
            cur = Extent(cur.start, cur.length + seg.length, cur.depth, cur.present, cur.zero,
                         cur.data, cur.offset)
            continue
        if cur is not None:
            yield cur
        cur = seg
    if cur is not None:
        yield cur


def _joins(a, b):
    if (a.depth, a.present, a.zero, a.data) != (b.depth, b.present, b.zero, b.data):
        return False
    if (a.offset is None) != (b.offset is None):
        return False
    return a.offset is None or a.offset + a.length == b.offset
