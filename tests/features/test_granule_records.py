"""Granule records (docs/format.md, section 10 "Granule records"): create_snapshot keeps the
front's partial state as the snapshot's record, so changed extents between two snapshots
are granule precise. Exact cases, costs, lifetime (delete, revert, reopen, crash cuts),
check and repair of bad records, records an older writer's chunks overlap."""

import os
import shutil
import zlib

import pytest

import fvd
from fvd.features import snapshots as snap
from fvd.ondisk import format as fmt
from fvd.ondisk import fvd_records as fr
from fvd.ops.changed import FLAG_DATA, FLAG_ZERO
from fvd.units import KiB

from ..helpers import assert_clean, copy_sparse, counts_delta, pat
from ..ops.test_changed import assert_exact, assert_sound
from ..syscall_recorder import WriteRecorder
from .test_granular import apply_ops

CS = 64 * KiB
G = 4 * KiB
SIZE = 8 * CS
ROW = fr.partial_row_bytes(CS, G)  # 2 bytes of bits, padded to 8 in an entry
ESIZE = 8 + 8  # entry: virtual_chunk, source_chunk, bits padded to 8 bytes


@pytest.fixture
def path(tmp_path):
    p = str(tmp_path / "r.fvd")
    fvd.create(p, SIZE, chunk_size=CS, journal_size=64 * KiB)
    return p


def entry(img, name):
    return img._core.snapshot_state.find(name, "")


def contents(img):
    """{name: bytes} of every snapshot, None: the front."""
    out = {None: img.read(0, SIZE)}
    for s in img.snapshots():
        with img.open_snapshot(s.name) as v:
            out[s.name] = v.read(0, SIZE)
    return out


def assert_all_pairs(img):
    """Every pair (snapshot, later snapshot or front): never a missed change, and exactly
    the granule-by-granule reference (tests/ops/test_changed.py)."""
    data = contents(img)
    names = [s.name for s in img.snapshots()]
    for i, since in enumerate(names):
        for until in names[i:] + [None]:
            arr = img.changed_extents_array(since, until)
            assert_sound(arr, data[since], data[until], SIZE)
            assert_exact(arr, img, since, until)


# the writes of the nightly loop between two snapshots, into chunks s1 holds
WRITES = [
    (CS + 3 * G, G),  # chunk 1: one aligned granule
    (2 * CS + 5 * G + 100, 10),  # chunk 2: inside granule 5
    (2 * CS + 7 * G - 1, 2),  # chunk 2: granules 6 and 7
    (3 * CS, G),  # chunk 3: several granules, apart
    (3 * CS + 10 * G, 2 * G),
    (3 * CS + 15 * G + 5, 1),
    (5 * CS, CS),  # chunk 5: the whole chunk in one write (not partial)
    (6 * CS + 8 * G, 8 * G),  # chunk 6: every granule, in two writes (complete)
    (6 * CS, 8 * G),
]
WANT = [
    (CS + 3 * G, G, FLAG_DATA),
    (2 * CS + 5 * G, 3 * G, FLAG_DATA),
    (3 * CS, G, FLAG_DATA),
    (3 * CS + 10 * G, 2 * G, FLAG_DATA),
    (3 * CS + 15 * G, G, FLAG_DATA),
    (5 * CS, 2 * CS, FLAG_DATA),
]


def nightly(img, writes=WRITES):
    img.write(0, pat(1, SIZE))
    img.create_snapshot("s1")
    for i, (off, n) in enumerate(writes):
        img.write(off, pat(i + 2, n))


@pytest.mark.parametrize("cache", ["writethrough", "writeback"])
@pytest.mark.parametrize("flush", [False, True])
def test_between_two_snapshots_exactly_the_written_granules(path, cache, flush):
    with fvd.open(path, "r+", cache=cache) as img:
        nightly(img)
        if flush:
            img.flush()
        assert img._core.partial.active == 3  # chunks 1, 2, 3
        assert img.changed_extents_array("s1").tolist() == WANT
        img.create_snapshot("s2")
        assert img._core.partial.active == 3  # s2 holds them partial, as they are
        e = entry(img, "s2")
        assert e.granules_offset and e.granules_size == 16 + 3 * ESIZE
        assert img.changed_extents_array("s1", "s2").tolist() == WANT
        assert img.changed_extents_array("s2").tolist() == []
        with img.open_snapshot("s2") as v:
            assert v.changed_extents_array("s1").tolist() == WANT
        assert_all_pairs(img)
        assert_clean(img)
    for mode in ("r", "r+"):
        with fvd.open(path, mode) as img:
            assert img.changed_extents_array("s1", "s2").tolist() == WANT
            assert_clean(img)


def test_the_record_on_disk(path):
    """The entry's extra data and the record, parsed with the construct declarations:
    the front's partial state before create completed it."""
    with fvd.open(path, "r+") as img:
        nightly(img)
        part = img._core.partial
        before = {v: (int(part.src[k]), part.row(k).tobytes()) for v, k in part.entries()}
        img.create_snapshot("s2")
        h = img._core.header
    raw = open(path, "rb").read()
    table = fr.SnapshotTable.parse(raw[h.snapshot_table_offset :][: h.snapshot_table_size])
    e1, e2 = table.entries
    assert (e1.extra_size, e2.extra_size) == (0, 24)
    x = fr.SnapshotExtraGranules.parse(e2.extra)
    rec = raw[x.granules_offset :][: x.granules_size]
    assert x.reserved == 0 and zlib.crc32(rec) == x.granules_crc
    assert (x.granules_offset - h.data_offset) % CS == 0
    m = fr.PartialMap.parse(rec, row_bytes=ROW)
    assert (m.magic, m.count, m.granule_size) == (fr.PARTIAL_MAP_MAGIC, 3, G)
    assert {e.virtual_chunk: (e.source_chunk, e.bits) for e in m.entries} == before
    assert [e.virtual_chunk for e in m.entries] == [1, 2, 3]
    assert fr.PartialMap.build(m, row_bytes=ROW) == rec


def test_costs_with_and_without_a_record(path, tmp_path):
    """Without partial chunks nothing changes (no record, no extra data); with them the
    record is one more write of 16 + P * entry_size bytes and no flush of its own, and
    no data is copied."""
    other = str(tmp_path / "other.fvd")
    shutil.copyfile(path, other)
    with fvd.open(other, "r+") as img:  # the same writes, all of them whole chunks
        img.write(0, pat(1, SIZE))
        img.create_snapshot("s1")
        for v in (1, 2, 3):
            img.write(v * CS, pat(v, CS))
        img.flush()
        s0 = img.stats.as_dict()
        img.create_snapshot("s2")
        plain = counts_delta(s0, img.stats.as_dict())
        assert entry(img, "s2").granules_offset == 0
    with fvd.open(path, "r+") as img:
        img.write(0, pat(1, SIZE))
        img.create_snapshot("s1")
        for v in (1, 2, 3):
            img.write(v * CS + G, pat(v, G))  # granule 1 of chunks 1..3
        img.flush()
        s0 = img.stats.as_dict()
        img.create_snapshot("s2")
        d = counts_delta(s0, img.stats.as_dict())
        # creates only: s1 holds 8 chunks, s2 8 chunks and the 3 sources of its record
        assert img.stats.refcount_updates == 2 * 8 + 3
        img.write(4 * CS + G, b"x")  # writes never touch refcounts or records
        assert img.stats.refcount_updates == 2 * 8 + 3
    # nothing is copied: the record is 1 more write (no flush of its own), and the 3
    # sources are counted as held
    record = 16 + 3 * ESIZE
    assert d == {
        **plain,
        "metadata_writes": plain["metadata_writes"] + 1,
        # + the record and the entry's 24 bytes of extra data
        "metadata_bytes_written": plain["metadata_bytes_written"] + record + 24,
        "refcount_updates": plain["refcount_updates"] + 3,
    }


def test_three_snapshots_then_delete_the_middle_one(path):
    """s1; A; s2; B; s3. s1..s3 is exact: chunk 1, written in both steps, was copied
    forward into a new chunk with s1's chunk still its source, so s3's record alone says
    which granules differ from s1. Deleting s2 frees its record and changes nothing
    between s1 and s3."""
    with fvd.open(path, "r+") as img:
        img.write(0, pat(1, SIZE))
        img.create_snapshot("s1")
        img.write(CS + 2 * G, pat(2, G))  # chunk 1, step 1
        img.write(2 * CS + 3 * G, pat(3, G))  # chunk 2, step 1 only
        img.create_snapshot("s2")
        img.write(CS + 5 * G, pat(4, G))  # chunk 1 again, step 2
        img.write(4 * CS + 4 * G, pat(5, G))  # chunk 4, step 2 only
        img.create_snapshot("s3")
        steps = [
            (CS + 2 * G, G, FLAG_DATA),
            (CS + 5 * G, G, FLAG_DATA),
            (2 * CS + 3 * G, G, FLAG_DATA),
            (4 * CS + 4 * G, G, FLAG_DATA),
        ]
        assert img.changed_extents_array("s1", "s3").tolist() == steps
        assert img.changed_extents_array("s1").tolist() == steps
        assert_all_pairs(img)
        used = img._core.in_use().copy()
        e2 = entry(img, "s2")
        run = (e2.granules_offset - img._core.header.data_offset) // CS
        assert used[run]
        img.delete_snapshot("s2")
        assert not img._core.in_use()[run]  # the record's chunk went with s2
        assert img.changed_extents_array("s1", "s3").tolist() == steps
        assert_all_pairs(img)
        assert_clean(img)
    with fvd.open(path) as img:
        assert_clean(img)


def test_revert_leaves_records_alone(path):
    with fvd.open(path, "r+") as img:
        nightly(img)
        img.create_snapshot("s2")
        e = entry(img, "s2")
        where = (e.granules_offset, e.granules_size, e.granules_crc)
        img.write(7 * CS + G, b"y")
        img.revert_to_snapshot("s1")
        e = entry(img, "s2")
        assert (e.granules_offset, e.granules_size, e.granules_crc) == where
        assert img.changed_extents_array("s1", "s2").tolist() == WANT
        img.write(CS + 9 * G, pat(9, G))  # over s1's chunk again, after the revert
        img.create_snapshot("s3")
        assert img.changed_extents_array("s2", "s3").tolist() != []
        assert_all_pairs(img)
        assert_clean(img)
    with fvd.open(path) as img:
        assert img.changed_extents_array("s1", "s2").tolist() == WANT
        assert_all_pairs(img)


def test_delete_frees_the_record_and_the_file_shrinks(path):
    with fvd.open(path, "r+") as img:
        nightly(img)
        img.create_snapshot("s2")
        e = entry(img, "s2")
        first = (e.granules_offset - img._core.header.data_offset) // CS
        assert img._core.in_use()[first]
        img.write(7 * CS, pat(7, CS))  # something after the record
        img.delete_snapshot("s2")
        assert not img._core.in_use()[first]
        assert_clean(img)
        img.delete_snapshot("s1")
        assert_clean(img)
        end = img._core.header.data_offset + img._core.allocator.end * CS
        assert os.path.getsize(path) <= end
    with fvd.open(path) as img:
        assert_clean(img)


@pytest.mark.syscall_recorded
# ----- crash cuts -----------------------------------------------------------------------------
def test_crash_at_every_write_of_a_create_with_a_record(path, monkeypatch, tmp_path):
    """Every prefix of the writes of a create_snapshot with partial chunks opens as the
    state before or after it, checks clean, and its changed extents never miss a change
    (and match the reference exactly)."""
    with fvd.open(path, "r+", cache="writeback") as img:
        nightly(img)
    img = fvd.open(path, "r+", cache="writeback")
    before = contents(img)
    pre = str(tmp_path / "pre.fvd")
    copy_sparse(path, pre)
    rec = WriteRecorder(path)
    img.create_snapshot("s2")
    rec.stop()
    after = contents(img)
    img.close()
    assert len(rec.writes) >= 4
    seen = set()
    cut = str(tmp_path / "cut.fvd")
    for k in range(len(rec.writes) + 1):
        copy_sparse(pre, cut)
        apply_ops(cut, rec.writes[:k])
        with fvd.open(cut, "r+") as c:
            state = contents(c)
            assert state in (before, after), f"cut after {k} of {len(rec.writes)} writes"
            seen.add(state == after)
            assert_clean(c)
            if state == after:
                assert c.changed_extents_array("s1", "s2").tolist() == WANT
            # the copy is not the original file: the reference reads c's own records
            data = contents(c)
            names = [s.name for s in c.snapshots()]
            for i, since in enumerate(names):
                for until in names[i:] + [None]:
                    arr = c.changed_extents_array(since, until)
                    assert_sound(arr, data[since], data[until], SIZE)
                    assert_exact(arr, c, since, until)
    assert seen == {False, True}


# ----- bad records: changed extents refuse them, check reports them, repair drops them ------
def rewrite_entry(path, name, **fields):
    """Change fields of a snapshot entry's granule extra data on disk (crcs resealed)."""
    with fvd.open(path) as img:
        h = img._core.header
    raw = bytearray(open(path, "rb").read())
    toff, tsize = h.snapshot_table_offset, h.snapshot_table_size
    t = fr.SnapshotTable.parse(bytes(raw[toff : toff + tsize]))
    pos = toff + 32
    for e in t.entries:
        if e.name == name.encode():
            x = dict(fr.SnapshotExtraGranules.parse(e.extra))
            x.pop("_io", None)
            x.update(fields)
            raw[pos + 64 : pos + 88] = fr.SnapshotExtraGranules.build(x)
        pos += 64 + e.extra_size + (-e.name_size % 8) + e.name_size
    raw[toff + 4 : toff + 8] = bytes(4)
    raw[toff + 4 : toff + 8] = zlib.crc32(bytes(raw[toff : toff + tsize])).to_bytes(4, "little")
    open(path, "wb").write(raw)


def put_record(path, name, rec):
    """Write `rec` as the snapshot's record (same place, any length), crcs resealed."""
    with fvd.open(path) as img:
        off = entry(img, name).granules_offset
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(rec)
    rewrite_entry(path, name, granules_size=len(rec), granules_crc=zlib.crc32(rec))


def record_of(path, name):
    with fvd.open(path) as img:
        e = entry(img, name)
        return e.granules_offset, os.pread(img._core.fd, e.granules_size, e.granules_offset)


def _flip(path, name):
    off, _ = record_of(path, name)
    with open(path, "r+b") as f:
        f.seek(off + 20)
        b = f.read(1)
        f.seek(off + 20)
        f.write(bytes([b[0] ^ 1]))
    return off


def _entry_field(rec, i, **kw):
    m = fr.PartialMap.parse(rec, row_bytes=ROW)
    for k, v in kw.items():
        setattr(m.entries[i], k, v)
    return fr.PartialMap.build(m, row_bytes=ROW)


def _source_of_chunk(path, v, i):
    """Entry i's source becomes the chunk s2's table maps at v (mapped elsewhere)."""
    with fvd.open(path) as img:
        t = snap.read_snapshot_table(img._core, entry(img, "s2"))
    _, rec = record_of(path, "s2")
    put_record(path, "s2", _entry_field(rec, i, source_chunk=int(t[v])))
    return record_of(path, "s2")[0] + 16 + i * ESIZE


BAD = {
    "crc": _flip,
    "range": lambda p, n: rewrite_entry(p, n, granules_offset=1 << 40),
    "chunk >= nchunks": lambda p, n: put_record(
        p, n, _entry_field(record_of(p, n)[1], 2, virtual_chunk=8)
    ),
    "out of order": lambda p, n: put_record(
        p, n, _entry_field(record_of(p, n)[1], 0, virtual_chunk=3)
    ),
    "size": lambda p, n: put_record(p, n, record_of(p, n)[1][:-8]),
    "granule size": lambda p, n: put_record(
        p, n, record_of(p, n)[1][:8] + (8 * KiB).to_bytes(4, "little") + record_of(p, n)[1][12:]
    ),
    "source mapped": lambda p, n: _source_of_chunk(p, 4, 1),
    "source is N": lambda p, n: _source_of_chunk(p, 2, 1),
    "chunk not mapped": lambda p, n: put_record(
        p, n, _entry_field(record_of(p, n)[1], 2, virtual_chunk=7)
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_bad_record(path, bad):
    """A snapshot's record is authoritative: a bad one loses the snapshot's partial
    chunks. The image opens and everything else reads; the snapshot and changed extents
    through it raise CorruptImageError naming the file and the offset; check reports it;
    repair deletes that snapshot (reported lost) and nothing else."""
    with fvd.open(path, "r+") as img:
        nightly(img)
        img.write_zeroes(7 * CS, CS)  # s2 leaves chunk 7 unallocated
        img.create_snapshot("s2")
        img.create_snapshot("s3")  # the same partial chunks, its own record
        data = contents(img)
        s1_s3 = img.changed_extents_array("s1", "s3").tolist()
    BAD[bad](path, "s2")
    with fvd.open(path, "r+") as img:
        assert img.read(0, SIZE) == data[None]
        with img.open_snapshot("s3") as v:
            assert v.read(0, SIZE) == data["s3"]
        with pytest.raises(fvd.CorruptImageError) as err:
            with img.open_snapshot("s2") as v:
                v.read(0, SIZE)
        assert err.value.path == path and err.value.offset is not None
        with pytest.raises(fvd.CorruptImageError):
            img.changed_extents_array("s1", "s2")
        assert img.changed_extents_array("s1", "s3").tolist() == s1_s3
        r = img.check()
        assert r.corruptions == 1 and not r.ok, r.messages
        assert any("granule record" in m for m in r.messages), r.messages
    with fvd.open(path, "r+") as img:
        r = img.check(repair=True)
        assert r.corruptions_fixed >= 1 and r.ok, r.messages
        assert any("lost" in m and "s2" in m for m in r.messages), r.messages
    del data["s2"]
    with fvd.open(path, "r+") as img:
        assert [s.name for s in img.snapshots()] == ["s1", "s3"]
        assert contents(img) == data
        assert img.changed_extents_array("s1", "s3").tolist() == s1_s3
        assert_all_pairs(img)
        assert_clean(img)
    with fvd.open(path) as img:
        assert_clean(img)


def test_a_record_on_chunks_the_front_uses(path):
    """A record whose chunk the front maps (a damaged file: writers that do not know
    records refuse the image, feature bit 3) is snapshot metadata like any other: open
    refuses the image naming the entry, check reports it, repair gives the front a copy
    of the chunk and the snapshot keeps its record."""
    with fvd.open(path, "r+") as img:
        nightly(img)
        img.create_snapshot("s2")
        e = entry(img, "s2")
        rec_chunk = (e.granules_offset - img._core.header.data_offset) // CS
        h = img._core.header
        data = contents(img)
        rec = os.pread(img._core.fd, e.granules_size, e.granules_offset)
    # the front's chunk 7 now maps the record's chunk, as a reuse would
    nch = SIZE // CS
    with open(path, "r+b") as f:
        raw = bytearray(os.pread(f.fileno(), 4 * nch, h.table_offset))
        sparse = h.incompatible_features & fmt.INCOMPAT_SPARSE_TABLE
        raw[28:32] = (rec_chunk ^ (0xFFFFFFFF if sparse else 0)).to_bytes(4, "little")
        os.pwrite(f.fileno(), bytes(raw), h.table_offset)
        hraw = bytearray(os.pread(f.fileno(), 512, 0))
        hraw[192:196] = zlib.crc32(bytes(raw)).to_bytes(4, "little")  # table_crc
        hraw[12:16] = fmt.header_crc(bytes(hraw)).to_bytes(4, "little")
        os.pwrite(f.fileno(), bytes(hraw), 0)
    with pytest.raises(fvd.CorruptImageError, match="snapshot metadata") as err:
        fvd.open(path)
    assert err.value.path == path
    from fvd.image import check_file

    assert check_file(path).corruptions >= 1
    r = check_file(path, repair=True)
    assert r.corruptions_fixed >= 1, r.messages
    with fvd.open(path) as img:
        assert_clean(img)
        assert entry(img, "s2").granules_offset
        now = contents(img)
        assert now[None][7 * CS :].startswith(rec)  # the bytes it mapped, now its own
        now[None] = now[None][: 7 * CS] + data[None][7 * CS :]
        assert now == data
        assert_all_pairs(img)


def test_zero_flags_across_records(path):
    """A chunk partly rewritten in one step and zeroed in the next: a zero range; one
    zeroed, then partly rewritten over a new chunk: whole, data."""
    with fvd.open(path, "r+") as img:
        img.write(0, pat(1, SIZE))
        img.create_snapshot("s1")
        img.write(CS + G, b"a" * G)
        img.write_zeroes(2 * CS, CS)
        img.create_snapshot("s2")
        img.write_zeroes(CS, CS)
        img.write(2 * CS + G, b"b" * G)
        img.create_snapshot("s3")
        assert img.changed_extents_array("s1", "s2").tolist() == [
            (CS + G, G, FLAG_DATA),
            (2 * CS, CS, FLAG_ZERO),
        ]
        assert img.changed_extents_array("s1", "s3").tolist() == [
            (CS, CS, FLAG_ZERO),
            (2 * CS, CS, FLAG_DATA),
        ]
        assert_all_pairs(img)
