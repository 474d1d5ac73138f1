"""Table-less images (docs/format.md section 13): the header bit, the identity layout
checked by qemu-img through a raw view of the data area, exact I/O counts per write,
punched zeroes, SEEK_DATA extents, refusals, and crash cut points of every operation
that writes metadata."""

import os
import random
import shutil
import struct
import subprocess

import pytest

import fvd
from fvd.core import journal
from fvd.ondisk import format as fmt
from fvd.units import KiB, MiB

from ..helpers import (
    apply_ops,
    assert_clean,
    make_raw,
    pat,
    stats_delta,
)
from ..syscall_recorder import WriteRecorder

QEMU_IMG = shutil.which("qemu-img")
CS, BS = 64 * KiB, 16 * KiB


def _header(path):
    with open(path, "rb") as f:
        return fmt.parse_header(f.read(fmt.HEADER_SIZE), path, os.path.getsize(path))


@pytest.fixture
def plain(tmp_path):
    path = str(tmp_path / "t.fvd")
    fvd.create(path, 4 * MiB, chunk_size=CS, block_size=BS, table=False)
    return path


@pytest.fixture
def based(tmp_path):
    """A table-less overlay of 4 MiB over a 3 MiB + 5000 byte raw base."""
    base = str(tmp_path / "b.raw")
    content = make_raw(base, 3 * MiB + 5000)
    path = str(tmp_path / "o.fvd")
    fvd.create(
        path,
        4 * MiB,
        chunk_size=CS,
        block_size=BS,
        base=base,
        base_format="raw",
        table=False,
    )
    return path, bytes(content).ljust(4 * MiB, b"\0")


def test_header_bytes_and_file_layout(plain):
    raw = open(plain, "rb").read(fmt.HEADER_SIZE)
    (incompat,) = struct.unpack_from("<Q", raw, 16)
    assert incompat == fmt.INCOMPAT_TABLELESS == 0x20
    h = _header(plain)
    assert all(fmt.int_field(h, name) == 0 for name in fmt.TABLELESS_ZERO_FIELDS)
    assert os.path.getsize(plain) == h.data_offset + 4 * MiB
    assert os.stat(plain).st_blocks * 512 <= 64 * KiB  # header only: the rest is a hole
    assert h.journal_offset == fmt.HEADER_REGION  # no table region before it
    assert h.data_offset == fmt.round_up(h.journal_offset + h.journal_size, CS)


def test_an_older_reader_refuses_the_image(plain, monkeypatch):
    monkeypatch.setattr(fmt, "KNOWN_INCOMPAT", fmt.KNOWN_INCOMPAT & ~fmt.INCOMPAT_TABLELESS)
    with pytest.raises(fvd.UnsupportedFeatureError, match="0x20"):
        fvd.open(plain)


@pytest.mark.parametrize("field", ["table_size", "nb_snapshots", "granule_size"])
def test_open_refuses_a_table_field_in_a_tableless_header(plain, field):
    h = _header(plain)
    h = h.replace(**{field: 4096})
    with open(plain, "r+b") as f:
        f.write(fmt.build_header(h))
    with pytest.raises(fvd.CorruptImageError, match=f"{field} must be 0"):
        fvd.open(plain)


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")
def test_data_area_is_the_guest_disk_for_qemu_img(plain, tmp_path):
    """qemu-img reads the data area as a raw image (offset = data_offset): it equals a
    raw file written with the same operations."""
    ref = str(tmp_path / "ref.raw")
    model = bytearray(4 * MiB)
    rng = random.Random(7)
    with fvd.open(plain, "r+") as img:
        for i in range(40):
            off, n = rng.randrange(4 * MiB - 9000), rng.randrange(1, 9000)
            if i % 5 == 4:
                img.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                data = pat(i, n)
                img.write(off, data)
                model[off : off + n] = data
        assert img.read(0, 4 * MiB) == model
    with open(ref, "wb") as f:
        f.write(model)
    d = _header(plain).data_offset
    opts = f"driver=raw,offset={d},size={4 * MiB},file.driver=file,file.filename={plain}"
    r = subprocess.run(
        [QEMU_IMG, "compare", "--image-opts", opts, f"driver=raw,file.filename={ref}"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    with fvd.open(plain) as img:
        assert img.read(0, 4 * MiB) == model
        assert_clean(img)


def test_writethrough_write_without_base_is_one_write_and_one_flush(plain):
    with fvd.open(plain, "r+", cache="writethrough") as img:
        for off in (0, 5 * CS + 4096, 3 * MiB):  # each the first write of its chunk
            before = img.stats.as_dict()
            img.write(off, pat(1, 4096))
            assert stats_delta(img, before) == {
                "data_writes": 1,
                "data_bytes_written": 4096,
                "flushes": 1,
            }


def test_writes_with_base_cost_one_journal_sector_only_the_first_time(based):
    path, want = based
    with fvd.open(path, "r+", cache="writethrough") as img:
        before = img.stats.as_dict()
        img.write(BS + 100, pat(2, 4096))  # first write into block 1: copy-on-write
        d = stats_delta(img, before)
        assert (d["data_writes"], d["metadata_writes"], d["flushes"]) == (1, 1, 1)
        assert d["metadata_bytes_written"] == 512 and d["base_reads"] == 1
        assert d["data_bytes_written"] == BS  # head + data + tail: the whole block
        img.write(5 * BS, pat(3, 4096))  # another block: the last transaction moves on
        before = img.stats.as_dict()
        img.write(BS + 8192, pat(4, 4096))  # later write into block 1
        assert stats_delta(img, before) == {
            "data_writes": 1,
            "data_bytes_written": 4096,
            "flushes": 1,
        }
        want = bytearray(want)
        want[BS + 100 : BS + 4196] = pat(2, 4096)
        want[5 * BS : 5 * BS + 4096] = pat(3, 4096)
        want[BS + 8192 : BS + 12288] = pat(4, 4096)
        assert img.read(0, 4 * MiB) == want
    with fvd.open(path) as img:
        assert img.read(0, 4 * MiB) == want
        assert_clean(img)


def test_write_zeroes_punches_holes(plain):
    with fvd.open(plain, "r+") as img:
        img.write(0, pat(5, 2 * MiB))
        used = os.stat(plain).st_blocks
        img.write_zeroes(100, 2 * MiB - 200)
        assert os.stat(plain).st_blocks < used - (1 * MiB) // 512
        assert img.read(0, 100) == pat(5, 100)
        assert img.read(100, 2 * MiB - 200) == bytes(2 * MiB - 200)
        assert img.read(2 * MiB - 100, 100) == pat(5, 2 * MiB)[-100:]
        assert_clean(img)


def test_write_zeroes_over_a_base(based):
    path, want = based
    start, n = BS // 2, 5 * BS  # head and tail blocks in part, four whole blocks
    with fvd.open(path, "r+", cache="writethrough") as img:
        img.write_zeroes(start, n)
        img.write_zeroes(3 * MiB, 5000)  # the block the base's end cuts
        img.write_zeroes(3 * MiB + 64 * KiB, 64 * KiB)  # past the base: a punch
    want = bytearray(want)
    want[start : start + n] = bytes(n)
    want[3 * MiB : 3 * MiB + 5000] = bytes(5000)
    with fvd.open(path) as img:
        assert img.read(0, 4 * MiB) == want
        assert_clean(img)


def test_extents_come_from_the_file_and_the_bitmap(based):
    path, want = based
    with fvd.open(path, "r+") as img:
        img.write(2 * BS, pat(6, BS))
        img.write_zeroes(4 * BS, 2 * BS)
        img.write(3 * MiB + 128 * KiB, pat(7, 4096))
        ext = list(img.extents())
        covered = 0
        for e in ext:
            assert e.start == covered
            covered += e.length
        assert covered == 4 * MiB
        at = {e.start: e for e in ext}
        assert at[2 * BS].depth == 0 and at[2 * BS].data and at[2 * BS].length == BS
        assert at[2 * BS].offset == _header(path).data_offset + 2 * BS
        assert at[4 * BS].depth == 0 and at[4 * BS].zero and not at[4 * BS].data
        assert at[0].depth == 1 and at[3 * BS].depth == 1  # the base answers
        tail = [e for e in ext if e.start >= 3 * MiB + 64 * KiB]
        assert any(e.data and e.depth == 0 for e in tail)
        assert all(e.present for e in ext)
        arr = img.extents_array()
        assert arr["start"].tolist() == [e.start for e in ext]


def test_refusals_name_the_option(plain, tmp_path):
    with fvd.open(plain, "r+") as img:
        assert img.table is False
        with pytest.raises(fvd.TablelessError, match="table=off") as e:
            img.create_snapshot("s")
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
        assert plain in str(e.value)
        assert img.snapshots() == []
        for call in (img.delete_snapshot, img.revert_to_snapshot, img.open_snapshot):
            with pytest.raises(fvd.TablelessError, match="table=off"):
                call("s")
    with pytest.raises(ValueError, match="table must be True or False"):
        fvd.create(str(tmp_path / "x.fvd"), MiB, table="off")


def test_resize_grows_and_shrinks_the_file(plain):
    d = _header(plain).data_offset
    with fvd.open(plain, "r+") as img:
        img.write(4 * MiB - 10, b"end-bytes!")
        img.resize(6 * MiB)
        assert os.path.getsize(plain) == d + 6 * MiB
        assert img.read(4 * MiB - 10, 20) == b"end-bytes!" + bytes(10)
        img.write_zeroes(4 * MiB - 10, 10)
        img.resize(3 * MiB, shrink=True)
        assert os.path.getsize(plain) == d + 3 * MiB
        assert_clean(img)


def test_copy_on_read_and_prefetch(based):
    path, want = based
    with fvd.open(path, "r+", copy_on_read=True, cache="writethrough") as img:
        before = img.stats.as_dict()
        assert img.read(BS, 100) == want[BS : BS + 100]
        d = stats_delta(img, before)
        assert d.get("metadata_writes", 0) == 0  # soft bits: no journal write
        img.prefetch()
        assert img.read(0, 4 * MiB) == want
    with fvd.open(path) as img:
        assert img.info()["format-specific"]["data"]["base-prefetched"]
        assert img.read(0, 4 * MiB) == want
        assert_clean(img)


def test_a_table_record_in_the_journal_is_refused(based):
    path, _ = based
    with fvd.open(path, "r+", cache="writethrough") as img:
        img.write(0, b"x")
    h = _header(path)
    h = h.replace(clean_shutdown=0)
    with open(path, "r+b") as f:
        f.write(fmt.build_header(h))
        data = journal.pack_transaction(journal.table_records({0: 3}), h.journal_epoch, 0)
        f.seek(h.journal_offset)
        f.write(data)
    with pytest.raises(fvd.CorruptImageError, match="table-less"):
        fvd.open(path, "r+")
    assert not fvd.Image(path, "r", _for_check=True).check().ok


# ----- crash cut points ----------------------------------------------------------------
OPS = {
    "first_write": lambda img: img.write(2 * BS + 100, pat(8, 3 * BS)),
    "zeroes": lambda img: img.write_zeroes(BS // 2, 4 * BS),
    "overwrite_sealed": lambda img: img.write(6 * BS + 10, pat(9, 100)),
    "resize": lambda img: img.resize(5 * MiB),
    "first_write_wb": lambda img: (img.write(2 * BS + 100, pat(8, 3 * BS)), img.flush()),
    "zeroes_wb": lambda img: (img.write_zeroes(BS // 2, 4 * BS), img.flush()),
}


@pytest.mark.syscall_recorded
@pytest.mark.parametrize("op", sorted(OPS))
def test_every_cut_point_is_before_or_after(based, tmp_path, op):
    """Each prefix of the operation's writes (a write also torn in the middle) opens,
    checks clean and reads, sector by sector, as before or after the operation."""
    path, _ = based
    cache = "writeback" if op.endswith("_wb") else "writethrough"
    with fvd.open(path, "r+", cache=cache) as img:
        img.write(6 * BS, pat(10, 4096))  # its transaction is the last, crc-checked
        img.flush()
        before = img.read(0, img.size)
        pre = str(tmp_path / "pre.fvd")
        shutil.copyfile(path, pre)
        rec = WriteRecorder(path)
        OPS[op](img)
        rec.stop()
        after = img.read(0, img.size)
        img._crash()
    cut = str(tmp_path / "cut.fvd")
    seen = set()
    for k in range(len(ops := _torn(rec.ops)) + 1):
        state = _cut_content(pre, ops[:k], cut)
        _each_sector_before_or_after(state, before, after, f"{op}: cut after {k}")
        seen.add(state)
    assert {before, after} <= seen
    if op == "first_write":
        # writethrough: one flush covers data and journal, the journal alone may reach
        # the disk (writeback flushes the data before it appends the journal)
        journal_only = [w for w in rec.writes if w[1] < _header(pre).data_offset]
        assert len(journal_only) == 1
        assert _cut_content(pre, journal_only, cut) == before


def _torn(ops):
    """Every data write also cut in the middle (a torn write)."""
    out = []
    for kind, a, b in ops:
        if kind == "w" and len(b) >= 1024:
            half = len(b) // 2 // 512 * 512
            out += [(kind, a, b[:half]), (kind, a + half, b[half:])]
        else:
            out.append((kind, a, b))
    return out


def _cut_content(pre, ops, cut):
    shutil.copyfile(pre, cut)
    apply_ops(cut, ops)
    with fvd.open(cut, "r+") as img:
        state = img.read(0, img.size)
        assert_clean(img)
    with fvd.open(cut) as img:
        assert img.read(0, img.size) == state
        assert_clean(img)
    return state


def _each_sector_before_or_after(state, before, after, where):
    n = min(len(before), len(after))
    assert len(state) in (len(before), len(after)), where
    for pos in range(0, n, 512):
        piece = state[pos : pos + 512]
        assert piece in (before[pos : pos + 512], after[pos : pos + 512]), f"{where} @{pos}"


def test_rebase_and_commit_keep_what_the_image_reads(based, tmp_path):
    path, want = based
    with fvd.open(path, "r+") as img:
        img.write(100 * KiB, pat(11, 300 * KiB))
        img.write(3 * MiB + 70 * KiB, pat(12, 1000))
        want = img.read(0, 4 * MiB)
    other = str(tmp_path / "b2.raw")
    make_raw(other, 5 * MiB, seed=5)
    fvd.rebase(path, other, backing_format="raw")
    with fvd.open(path) as img:
        assert img.base == other and img.base_size == 5 * MiB
        assert img.read(0, 4 * MiB) == want
        assert_clean(img)
    fvd.commit(path)
    with open(other, "rb") as f:
        assert f.read(4 * MiB) == want
    with fvd.open(path) as img:
        assert img.read(0, 4 * MiB) == want
        assert not any(e.depth == 0 and e.data for e in img.extents())  # emptied
        assert img.allocated_chunks == 0
        assert_clean(img)
