"""Exact extents (fvd.ops.extents): a raw base's holes as `qemu-img map` reports them for a
qcow2 overlay, bitmap-granular partial chunks, extents_array, runs instead of chunks;
prefetch skips base holes."""

import json
import os
import random
import shutil
import subprocess

import numpy as np
import pytest

import fvd
from fvd.types import EXTENT_DTYPE, FLAG_DATA, FLAG_PRESENT, FLAG_ZERO
from fvd.units import MiB

BLOCK = 64 * 1024


def sparse_base(path, size, data_at):
    """A raw file of `size` bytes that is a hole except 4 KiB of data at each offset."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in data_at:
            f.seek(off)
            f.write(random.Random(off).randbytes(4096))
    return path


def strip_offsets(extents):
    return [
        {k: v for k, v in e.items() if not (k == "offset" and e["depth"] == 0)} for e in extents
    ]


@pytest.mark.skipif(
    not shutil.which("qemu-img") or not shutil.which("qemu-io"),
    reason="qemu-img/qemu-io not installed",
)
def test_map_over_raw_base_matches_qemu_img_map_of_a_qcow2_overlay(tmp_path):
    base = sparse_base(str(tmp_path / "base.raw"), 16 * MiB, [2 * MiB, 7 * MiB + 8192, 15 * MiB])
    img = str(tmp_path / "img.fvd")
    qc = str(tmp_path / "img.qcow2")
    fvd.create(img, 16 * MiB, base=base, base_format="raw", block_size=BLOCK)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", qc], check=True
    )
    writes = [(0, 4096), (3 * MiB + 5000, 70000), (7 * MiB, 100)]  # partial chunks
    with fvd.open(img, "r+") as f:
        for off, n in writes:
            f.write(off, b"\x01" * n)
        f.write_zeroes(10 * MiB, 2 * MiB)
        ours = [e.as_dict() for e in f.extents()]
        arr = f.extents_array()
    for off, n in writes:
        subprocess.run(
            ["qemu-io", "-c", f"write -P 1 {off} {n}", qc], check=True, capture_output=True
        )
    subprocess.run(
        ["qemu-io", "-c", f"write -z {10 * MiB} {2 * MiB}", qc], check=True, capture_output=True
    )
    theirs = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", qc], check=True, capture_output=True, text=True
        ).stdout
    )

    # qemu reports its zero clusters as present, unallocated-in-chain as depth 1 holes;
    # compare the guest-visible classification (start, length, data, zero, depth>0)
    def classify(ext):
        out = []
        for e in ext:
            key = (e["data"], e["zero"], e["depth"] > 0)
            if out and out[-1][2] == key and out[-1][0] + out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"], key)
            else:
                out.append((e["start"], e["length"], key))
        return out

    assert classify(ours) == classify(theirs)
    assert arr.dtype == EXTENT_DTYPE
    assert arr["start"].tolist() == [e["start"] for e in ours]
    # base data extents keep their offsets in the base, like qemu-img map
    base_data = [e for e in ours if e["depth"] == 1 and e["data"]]
    assert [e["offset"] for e in base_data] == [e["start"] for e in base_data]


def test_partial_chunks_follow_the_bitmap_and_holes_are_zero(tmp_path):
    base = sparse_base(str(tmp_path / "base.raw"), 4 * MiB, [MiB])
    img = str(tmp_path / "img.fvd")
    fvd.create(img, 4 * MiB, base=base, base_format="raw", block_size=BLOCK)
    with fvd.open(img, "r+") as f:
        f.write(MiB + 10, b"x")  # one block of chunk 1 in the image
        ext = list(f.extents())
        got = [(e.start, e.length, e.depth, e.data, e.zero) for e in ext]
    assert got == [
        (0, MiB, 1, False, True),
        (MiB, BLOCK, 0, True, False),
        (MiB + BLOCK, 4 * MiB - MiB - BLOCK, 1, False, True),
    ]
    # the base's 4 KiB of data at 1 MiB is covered by the image block: no depth 1 data


def test_extents_array_flags_and_snapshot_views(tmp_path):
    img = str(tmp_path / "img.fvd")
    fvd.create(img, 64 * MiB)
    with fvd.open(img, "r+") as f:
        f.write(3 * MiB, b"a" * MiB)
        f.write_zeroes(8 * MiB, 2 * MiB)
        f.write(8 * MiB, b"b")  # ZERO chunk reallocated
        f.write_zeroes(9 * MiB, MiB)
        arr = f.extents_array()
        ext = list(f.extents())
        assert len(arr) == len(ext)
        for row, e in zip(arr.tolist(), ext):
            start, length, flags, depth, offset = row
            assert (start, length, depth) == (e.start, e.length, e.depth)
            assert bool(flags & FLAG_DATA) == e.data and bool(flags & FLAG_ZERO) == e.zero
            assert bool(flags & FLAG_PRESENT) == e.present
            assert offset == (-1 if e.offset is None else e.offset)
        part = f.extents_array(3 * MiB + 5, MiB)
        assert part["start"][0] == 3 * MiB + 5 and int(part["length"].sum()) == MiB
        f.create_snapshot("s")
        f.write(20 * MiB, b"c")
        with f.open_snapshot("s") as v:
            assert v.extents_array().tolist() == arr.tolist()
        with pytest.raises(ValueError):
            f.extents_array(-1)
        with pytest.raises(ValueError):
            f.extents_array(0, 65 * MiB)


def test_many_runs_of_a_huge_sparse_image(tmp_path):
    """1,000 writes in a 16 TiB image: runs from the table, checked against the writes."""
    img = str(tmp_path / "huge.fvd")
    fvd.create(img, 16 << 40, chunk_size=16 * MiB)
    rng = random.Random(5)
    chunks = sorted(rng.sample(range((16 << 40) // (16 * MiB)), 1000))
    with fvd.open(img, "r+") as f:
        for c in chunks:
            f.write(c * 16 * MiB, b"z")
        arr = f.extents_array()
    data = arr[(arr["flags"] & FLAG_DATA) != 0]
    starts = data["start"] // (16 * MiB)
    lengths = data["length"] // (16 * MiB)
    covered = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
    assert covered.tolist() == chunks
    assert int(arr["length"].sum()) == 16 << 40


def test_prefetch_skips_base_holes(tmp_path):
    size = 40 * MiB
    data_at = [i * MiB for i in range(0, 40, 10)] + [25 * MiB + 300 * 1024]
    base = sparse_base(str(tmp_path / "base.raw"), size, data_at)
    img = str(tmp_path / "img.fvd")
    fvd.create(img, size, base=base, base_format="raw", block_size=BLOCK)
    with open(base, "rb") as b:
        expect = b.read()
    with fvd.open(img, "r+") as f:
        f.write(21 * MiB + 7, b"w")  # a guest write in a hole chunk
        f.prefetch()
        read = f.stats.base_bytes_read
        assert f.base is not None and f._core.base_layer is None  # prefetched: base detached
    # each data spot costs at most one 4 MiB prefetch step around it; the holes nothing
    assert read <= 5 * BLOCK + BLOCK, read
    os.unlink(base)
    with fvd.open(img) as f:
        got = f.read(0, size)
        assert f.check().ok
    want = bytearray(expect)
    want[21 * MiB + 7] = ord("w")
    assert got == bytes(want)


def _naive_extents(img):
    """Per-chunk reference (the implementation before runs were vectorised)."""
    from fvd.ondisk import format as fmt
    from fvd.ops.extents import _merge
    from fvd.types import Extent

    cs, d = img.chunk_size, img._core.header.data_offset

    def segs():
        for v in range(-(-img.size // cs)):
            pos, stop = v * cs, min(img.size, (v + 1) * cs)
            e = int(img._core.table[v])
            if e < fmt.ZERO_CHUNK:
                part = img._core.partial
                if img._core.base_layer is not None:
                    yield from img._core.base_layer.segments_in_chunk(pos, stop, d + e * cs)
                elif part is not None and part.slot_of(v) is not None:
                    # a partial chunk (granular copy-on-write): runs of it and its source
                    for s, t, h in part.host_runs(part.slot_of(v), e, pos, stop, pos, d):
                        yield Extent(s, t - s, 0, True, False, True, h)
                else:
                    yield Extent(pos, stop - pos, 0, True, False, True, d + e * cs)
            elif e == fmt.ZERO_CHUNK:
                yield Extent(pos, stop - pos, 0, True, True, False, None)
            elif img._core.base_layer is not None:
                yield from img._core.base_layer.segments_below(pos, stop)
            else:
                yield Extent(pos, stop - pos, 0, False, True, False, None)

    return list(_merge(segs()))


@pytest.mark.parametrize("with_base", [False, True])
def test_runs_equal_the_per_chunk_reference(tmp_path, with_base):
    cs = 64 * 1024
    size = 64 * cs + 777
    kw = {}
    if with_base:
        kw = {
            "base": sparse_base(str(tmp_path / "b.raw"), 40 * cs + 5, [0, 7 * cs, 30 * cs + 4096]),
            "base_format": "raw",
        }
    img_path = str(tmp_path / "img.fvd")
    fvd.create(img_path, size, chunk_size=cs, block_size=4096, **kw)
    rng = random.Random(11)
    with fvd.open(img_path, "r+") as f:
        for _ in range(40):
            off = rng.randrange(size)
            n = min(rng.randrange(1, 3 * cs), size - off)
            if rng.random() < 0.3:
                f.write_zeroes(off, n)
            else:
                f.write(off, b"q" * n)
            if rng.random() < 0.2:
                f.create_snapshot(f"s{_}")  # frozen chunks get copied
            assert list(f.extents()) == _naive_extents(f)
