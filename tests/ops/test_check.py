"""Issue 8, bugs 3-11: every offset and length read from disk is bounded and cross-checked
before use (open refuses with CorruptImageError), check counts every problem, and a repair
that reports success leaves an image that opens and checks clean."""

import os
import signal
import struct
import zlib
from contextlib import contextmanager

import pytest

import fvd
from fvd.cli import main
from fvd.core import journal as jr
from fvd.features import snapshots as snap
from fvd.image import check_file as check_path
from fvd.ondisk import format as fmt
from fvd.units import KiB, MiB

CS = 64 * KiB


# ----- helpers ---------------------------------------------------------------------
def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_header(path):
    raw = open(path, "rb").read(fmt.HEADER_SIZE)
    return fmt.ImageHeader.from_bytes(raw)


def rewrite_header(path, **changes):
    h = read_header(path).replace(**changes)
    patch(path, 0, fmt.build_header(h))


def stored(h, value):
    """A table entry as the image stores it (sparse tables: inverted)."""
    return value ^ 0xFFFFFFFF if h.incompatible_features & fmt.INCOMPAT_SPARSE_TABLE else value


def set_table_entry(path, v, value):
    """Front table entry `v` := value, table_crc recomputed (a clean image)."""
    h = read_header(path)
    nch = -(-h.virtual_size // h.chunk_size)
    patch(path, h.table_offset + 4 * v, struct.pack("<I", stored(h, value)))
    with open(path, "rb") as f:
        f.seek(h.table_offset)
        raw = f.read(4 * nch)
    rewrite_header(path, table_crc=zlib.crc32(raw))


def snapshot_entries(path):
    """[(entry offset in the file, snap.Entry)] of the snapshot table."""
    with fvd.open(path) as img:
        h = img._core.header
        toff = h.snapshot_table_offset
        out, pos = [], toff + snap.TABLE_HEAD.size
        for e in img._core.snapshot_state.entries:
            out.append((pos, e))
            pos += snap.entry_size(e)
    return out


def reseal_snapshot_table(path):
    h = read_header(path)
    toff, tsize = h.snapshot_table_offset, h.snapshot_table_size
    with open(path, "rb") as f:
        f.seek(toff)
        raw = bytearray(f.read(tsize))
    raw[4:8] = b"\0\0\0\0"
    raw[4:8] = zlib.crc32(raw).to_bytes(4, "little")
    patch(path, toff, bytes(raw))


def set_snapshot_table_entry(path, index, v, value):
    """Entry `v` of snapshot `index`'s lookup table := value, every crc recomputed."""
    where, e = snapshot_entries(path)[index]
    h = read_header(path)
    nch = -(-h.virtual_size // h.chunk_size)
    patch(path, e.table_offset + 4 * v, struct.pack("<I", stored(h, value)))
    with open(path, "rb") as f:
        f.seek(e.table_offset)
        raw = f.read(4 * nch)
    patch(path, where + 32, struct.pack("<I", zlib.crc32(raw)))
    reseal_snapshot_table(path)


def make_image(path, nchunks=8, size=16 * MiB, **kw):
    fvd.create(path, size, chunk_size=CS, journal_size=64 * KiB, overwrite=True, **kw)
    with fvd.open(path, "r+") as img:
        for i in range(nchunks):
            img.write(i * CS, bytes([i + 1]) * 5000)


def assert_repaired(path):
    """check -r all leaves an image that opens read-write and checks clean."""
    result = check_path(path, repair=True)
    assert result.ok, result.messages
    assert check_path(path).ok
    with fvd.open(path, "r+") as img:
        img.read(0, img.size)
        assert img.check().ok
    return result


class Blocked(Exception):
    """Not an OSError: the code under test must not be able to swallow it."""


@contextmanager
def deadline(seconds):
    """Turn a blocking system call into a test failure instead of a hang."""

    def fire(*_):
        raise Blocked("blocked in a system call")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "img.fvd")


# ----- 3: check counts every problem, repair makes the image open -----------------------
def test_truncated_image_every_entry_counted_and_repaired(path, capsys):
    make_image(path, nchunks=100, size=128 * MiB)
    h = read_header(path)
    os.truncate(path, h.data_offset + 40 * CS)
    result = check_path(path)
    assert result.corruptions == 60 and not result.ok
    assert main(["check", path]) == 2
    assert main(["check", "-r", "all", path]) == 0
    out = capsys.readouterr().out
    assert "60" in out
    assert check_path(path).ok
    with fvd.open(path) as img:
        for i in range(100):
            want = bytes([i + 1]) if i < 40 else b"\0"
            assert img.read(i * CS, 1) == want, i


def test_truncated_overlay_loses_data_as_zeros_not_base(tmp_path):
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(b"\xbb" * (16 * CS))
    path = str(tmp_path / "img.fvd")
    fvd.create(
        path,
        16 * CS,
        chunk_size=CS,
        block_size=4096,
        journal_size=64 * KiB,
        base=base,
        base_format="raw",
    )
    with fvd.open(path, "r+") as img:
        for i in range(16):
            img.write(i * CS, bytes([i + 1]) * CS)
    h = read_header(path)
    os.truncate(path, h.data_offset + 4 * CS)
    assert check_path(path).corruptions == 12
    assert_repaired(path)
    with fvd.open(path) as img:
        assert img.read(3 * CS, 1) == b"\x04"
        assert img.read(9 * CS, CS) == bytes(CS)  # lost: zeros, never the old base


def test_shared_chunks_are_counted_and_copied(path):
    make_image(path)
    for v in range(10, 30):
        set_table_entry(path, v, 2)
    result = check_path(path)
    assert result.corruptions == 20
    assert_repaired(path)
    with fvd.open(path) as img:
        for v in [2] + list(range(10, 30)):
            assert img.read(v * CS, 5000) == b"\x03" * 5000


def damage_table_crc(path):
    rewrite_header(path, table_crc=read_header(path).table_crc ^ 1)


def damage_journal_sector(path):
    h = read_header(path)
    with fvd.open(path, "r+") as img:
        img.write(12 * CS, b"x" * 100)
        img.flush()
        img._crash()
    sector = bytearray(open(path, "rb").read()[h.journal_offset :][:512])
    sector[60] ^= 1  # a written sector with a bad crc: damage
    patch(path, h.journal_offset, bytes(sector))


def damage_snapshot_table(path):
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s")
    h = read_header(path)
    patch(path, h.snapshot_table_offset + 40, b"\xff")


def damage_snapshot_lookup(path):
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s")
        img.create_snapshot("t")
    set_snapshot_table_entry(path, 0, 3, 5000)


def damage_refcount(path):
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s")
        h = img._core.header
        roff, rsize = h.refcount_table_offset, h.refcount_table_size
    rc = bytearray(open(path, "rb").read()[roff : roff + rsize])
    rc[0:2] = b"\0\0"  # too low: the front could overwrite the snapshot's chunk
    patch(path, roff, bytes(rc))
    h = read_header(path)
    patch(path, h.snapshot_table_offset + 12, struct.pack("<I", zlib.crc32(bytes(rc))))
    reseal_snapshot_table(path)


@pytest.mark.parametrize(
    "damage",
    [
        damage_table_crc,
        damage_journal_sector,
        damage_snapshot_table,
        damage_snapshot_lookup,
        damage_refcount,
    ],
)
def test_every_kind_of_damage_is_repaired(path, damage):
    make_image(path)
    damage(path)
    result = check_path(path)
    assert result.corruptions >= 1
    assert_repaired(path)


# ----- 4: hostile journal records ------------------------------------------------------
def raw_sector(records, epoch, seq=0, nrec=None):
    body = b"".join(records)
    sector = bytearray(
        jr.SECTOR_HEAD.pack(
            jr.SECTOR_MAGIC, 0, epoch, seq, 0, len(records) if nrec is None else nrec, 0
        )
        + body
    )
    sector.extend(bytes(512 - len(sector)))
    sector[4:8] = zlib.crc32(sector).to_bytes(4, "little")
    return bytes(sector)


def unclean(path):
    make_image(path)
    with fvd.open(path, "r+") as img:
        img.write(0, b"a")
        img.flush()
        img._crash()
    return read_header(path)


def hostile_records(h):
    d = h.data_offset
    crc = jr.RECORD_HEAD.pack(jr.REC_DATA_CRC, 4096, d)
    filler = jr._table_record(0, [0] * 112)  # 464 bytes: the crc head ends at 512
    return {
        "head at the sector end": [filler, crc],
        "offset >= 2^63": [jr.data_crc_record(1 << 63, 4096, 0)],
        "huge offset": [jr.data_crc_record((1 << 62) + d, 4096, 0)],
        "length 2^31..2^32": [jr.data_crc_record(d, (1 << 32) - 512, 0)],
        "length 2^31 inside": [jr.data_crc_record(d, 1 << 31, 0)],
        "table entry 0xfffffff5": [jr._table_record(0, [0xFFFFFFF5])],
        "bitmap without base": [jr.bitmap_record(0, 1 << 31)],
    }


@pytest.mark.parametrize("kind", sorted(hostile_records(fmt.ImageHeader())))
def test_hostile_journal_records_are_refused_cleanly(path, kind):
    h = unclean(path)
    patch(path, h.journal_offset, raw_sector(hostile_records(h)[kind], h.journal_epoch))
    for mode in ("r", "r+"):
        try:
            with fvd.open(path, mode) as img:
                img.read(0, img.size)
        except fvd.CorruptImageError as e:
            assert path in str(e)
    result = check_path(path)
    assert result.corruptions <= 1
    assert_repaired(path)


# ----- 5: snapshot lookup tables are validated when used ------------------------------------
@pytest.mark.parametrize("value", [0xFFFFFFEF, 5000])
def test_snapshot_table_entry_out_of_range(path, value):
    make_image(path)
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s")
    where, e = snapshot_entries(path)[0]
    set_snapshot_table_entry(path, 0, 1, value)
    with fvd.open(path, "r+") as img:
        with pytest.raises(fvd.CorruptImageError) as info:
            img.open_snapshot("s")
        assert info.value.offset == e.table_offset + 4
        with pytest.raises(fvd.CorruptImageError):
            img.revert_to_snapshot("s")
        with pytest.raises(fvd.CorruptImageError):
            img.delete_snapshot("s")
        assert img.read(CS, 1) == b"\x02"
    assert check_path(path).corruptions == 1
    result = assert_repaired(path)
    assert any("deletes damaged snapshot" in m for m in result.messages)
    with fvd.open(path) as img:
        assert img.snapshots() == []


def test_snapshot_table_entry_into_metadata_or_twice(path):
    make_image(path)
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s")
        meta = img._core.snapshot_state.table_chunks[0]
    set_snapshot_table_entry(path, 0, 10, meta)
    set_snapshot_table_entry(path, 0, 11, 0)  # chunk 0 twice
    with fvd.open(path) as img:
        with pytest.raises(fvd.CorruptImageError):
            img.open_snapshot("s")
    assert check_path(path).corruptions == 2
    assert_repaired(path)


def test_delete_refuses_chunks_the_refcounts_do_not_count(path):
    """delete_snapshot cross-checks the snapshot's table with the refcount table: a chunk
    it maps past the end of that table, or counted 0 there, is refused and nothing
    changes (the chunk would otherwise be freed while the front still maps it)."""
    make_image(path)
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s1")
        old_tables = img._core.snapshot_state.table_chunks[0]
        img.write(8 * CS, b"x")  # a chunk of the front's own
        own = int(img._core.table[8])
    with fvd.open(path, "r+") as img:
        assert own >= len(img._core.snapshot_state.refcount)
    set_snapshot_table_entry(path, 0, 9, own)
    with fvd.open(path, "r+") as img:
        with pytest.raises(fvd.CorruptImageError, match="past the refcount table"):
            img.delete_snapshot("s1")
        img.create_snapshot("s2")  # s1's first tables are free now, counted 0
        assert img._core.snapshot_state.refcount[old_tables] == 0
        assert old_tables < own < len(img._core.snapshot_state.refcount)
    set_snapshot_table_entry(path, 0, 9, old_tables)
    with fvd.open(path, "r+") as img:
        with pytest.raises(fvd.CorruptImageError, match="refcount is 0"):
            img.delete_snapshot("s1")
        assert [s.name for s in img.snapshots()] == ["s1", "s2"]
        assert img.read(0, 1) == b"\x01" and img.read(8 * CS, 1) == b"x"


# ----- 6: a front entry into snapshot metadata --------------------------------------------
def test_front_entry_into_snapshot_metadata_refused_and_repaired(path):
    make_image(path)
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s")
        meta = img._core.snapshot_state.table_chunks[0]
        toff = img._core.header.table_offset
    set_table_entry(path, 20, meta)
    for mode in ("r", "r+"):
        with pytest.raises(fvd.CorruptImageError) as info:
            fvd.open(path, mode)
        assert info.value.offset == toff + 4 * 20
    assert check_path(path).corruptions == 1
    assert_repaired(path)
    with fvd.open(path, "r+") as img:
        img.write(20 * CS, b"\xee" * CS)  # must not land in the snapshot table
    with fvd.open(path) as img:
        with img.open_snapshot("s") as view:
            assert view.read(0, 5000) == b"\x01" * 5000
        assert img.read(20 * CS, CS) == b"\xee" * CS


# ----- 7: header regions may not overlap --------------------------------------------------
def test_overlapping_regions_refused_and_repair_is_honest(tmp_path):
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(b"\xbb" * (16 * CS))
    path = str(tmp_path / "img.fvd")
    fvd.create(
        path,
        16 * CS,
        chunk_size=CS,
        block_size=4096,
        journal_size=64 * KiB,
        base=base,
        base_format="raw",
    )
    with fvd.open(path, "r+") as img:
        img.write(0, b"x" * 100)
        img._crash()
    h = read_header(path)
    rewrite_header(path, bitmap_offset=h.table_offset)
    with pytest.raises(fvd.CorruptImageError) as info:
        fvd.open(path)
    assert info.value.offset == fmt.FIELD_OFFSET["table_offset"]
    try:
        result = check_path(path, repair=True)
    except fvd.FvdError:
        pass
    else:
        assert not result.ok
    with pytest.raises(fvd.CorruptImageError):
        fvd.open(path)
    assert main(["check", "-r", "all", path]) == 2


# ----- 8: revert marker epochs -----------------------------------------------------------
def test_revert_marker_from_the_future_is_refused(path):
    make_image(path)
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s")
        img.write(0, b"\x77" * 100)
    h = read_header(path)
    sid = snapshot_entries(path)[0][1].id
    patch(path, h.snapshot_table_offset + 16, struct.pack("<QQ", sid, h.journal_epoch + 1))
    reseal_snapshot_table(path)
    for mode in ("r", "r+"):
        with pytest.raises(fvd.CorruptImageError):
            fvd.open(path, mode)
    assert check_path(path).corruptions == 1
    assert_repaired(path)
    for _ in range(2):
        with fvd.open(path, "r+"):
            pass
    with fvd.open(path) as img:
        assert img.read(0, 100) == b"\x77" * 100


def test_stale_revert_marker_is_ignored(path):
    make_image(path)
    with fvd.open(path, "r+") as img:
        img.create_snapshot("s")
        img.write(0, b"\x77" * 100)
    h = read_header(path)
    sid = snapshot_entries(path)[0][1].id
    patch(path, h.snapshot_table_offset + 16, struct.pack("<QQ", sid, h.journal_epoch - 1))
    reseal_snapshot_table(path)
    assert check_path(path).ok
    with fvd.open(path, "r+"):
        pass
    with fvd.open(path) as img:
        assert img.read(0, 100) == b"\x77" * 100


# ----- 9: journal epoch bound --------------------------------------------------------------
@pytest.mark.parametrize("epoch", [(1 << 64) - 1, 1 << 63])
def test_journal_epoch_too_large_for_writing(path, epoch):
    make_image(path)
    rewrite_header(path, journal_epoch=epoch)
    with pytest.raises(fvd.CorruptImageError) as info:
        fvd.open(path, "r+")
    assert "epoch" in str(info.value) and path in str(info.value)
    with fvd.open(path) as img:
        assert img.read(0, 1) == b"\x01"


# ----- 10: FIFO and directory bases ----------------------------------------------------------
def test_fifo_base_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    path = str(tmp_path / "img.fvd")
    for fmt_name in (None, "raw", "fvd", "qcow2"):
        with deadline(5), pytest.raises(fvd.BaseImageError) as info:
            fvd.create(path, MiB, base=fifo, base_format=fmt_name)
        assert fifo in str(info.value)
    with deadline(5):
        assert main(["create", "-b", fifo, path, "1M"]) == 1
    assert not os.path.exists(path)


def test_base_replaced_by_fifo_or_directory(tmp_path):
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(bytes(MiB))
    path = str(tmp_path / "img.fvd")
    fvd.create(path, MiB, chunk_size=CS, base=base, base_format="raw")
    os.unlink(base)
    os.mkfifo(base)
    with deadline(5):
        with pytest.raises(fvd.BaseImageError):
            fvd.open(path)
    os.unlink(base)
    os.mkdir(base)
    with pytest.raises(fvd.BaseImageError):
        fvd.open(path)


def test_directory_as_raw_base_is_refused(tmp_path):
    path = str(tmp_path / "img.fvd")
    with pytest.raises(fvd.BaseImageError) as info:
        fvd.create(path, MiB, base=str(tmp_path), base_format="raw")
    assert "directory" in str(info.value)
    assert not os.path.exists(path)


# ----- 11: empty snapshot name on the command line ----------------------------------------------
def test_cli_empty_snapshot_name(path, capsys):
    make_image(path)
    assert main(["snapshot", "-c", "", path]) == 1
    assert "snapshot name" in capsys.readouterr().err
    for opt in ("-d", "-a"):
        assert main(["snapshot", opt, "", path]) == 1
    with fvd.open(path) as img:
        assert img.snapshots() == []
