"""Block-granular copy-on-write after snapshots (fvd.features.granular): exact costs, reads of
partial chunks in both implementations, lifecycle (create, delete, revert, write_zeroes,
reopen), the feature bit, check, crash cutting of every new write path and a state
machine with snapshots and power cuts."""

import functools
import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import fvd
from fvd import _impl
from fvd.features import snapshots
from fvd.ondisk import format as fmt
from fvd.units import KiB, MiB

from ..helpers import DurableRecorder, copy_sparse
from ..helpers import pattern as _pattern
from ..ops.test_changed import assert_sound
from ..syscall_recorder import WriteRecorder

pattern = functools.lru_cache(maxsize=64)(_pattern)  # 4 MiB patterns are slow to build

CS = MiB
G = 4 * KiB
SIZE = 4 * MiB


def delta(before, after):
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.fixture
def path(tmp_path):
    p = str(tmp_path / "g.fvd")
    fvd.create(p, SIZE)
    return p


def held_image(path, cache="writethrough", size=SIZE):
    """An image whose chunks are full of pattern(1) and held by snapshot 's'."""
    img = fvd.open(path, "r+", cache=cache)
    img.write(0, pattern(1, size))
    img.create_snapshot("s")
    return img


def assert_clean(img):
    r = img.check()
    assert r.ok, r.messages


# ----- costs ------------------------------------------------------------------------------
def test_first_aligned_write_into_held_chunk_costs(path):
    with held_image(path) as img:
        s0 = img.stats.as_dict()
        img.write(CS + 8 * G, b"x" * G)
        d = delta(s0, img.stats.as_dict())
        # 1 data write of 4 KiB, 1 journal sector (table, granule, data crc), 1 flush,
        # nothing read or copied, no refcount touched
        assert d == {
            "data_writes": 1,
            "data_bytes_written": G,
            "metadata_writes": 1,
            "metadata_bytes_written": 512,
            "flushes": 1,
            "journal_records": 3,
        }
        # a new granule of the same chunk: as an unshared chunk + one metadata write
        s0 = img.stats.as_dict()
        img.write(CS + 20 * G, b"y" * G)
        d = delta(s0, img.stats.as_dict())
        assert d == {
            "data_writes": 1,
            "data_bytes_written": G,
            "metadata_writes": 1,
            "metadata_bytes_written": 512,
            "flushes": 1,
            "journal_records": 2,
        }
        # a granule written before (not the last transaction's): exactly an unshared chunk
        s0 = img.stats.as_dict()
        img.write(CS + 8 * G + 100, b"z" * 1000)
        d = delta(s0, img.stats.as_dict())
        assert d == {"data_writes": 1, "data_bytes_written": 1000, "flushes": 1}
        assert img.stats.refcount_updates == 4  # the snapshot's, none by writes
        expect = bytearray(pattern(1, SIZE))
        expect[CS + 8 * G : CS + 9 * G] = b"x" * G
        expect[CS + 20 * G : CS + 21 * G] = b"y" * G
        expect[CS + 8 * G + 100 : CS + 8 * G + 1100] = b"z" * 1000
        assert img.read(0, SIZE) == expect
        with img.open_snapshot("s") as v:
            assert v.read(0, SIZE) == pattern(1, SIZE)
        assert_clean(img)


def test_first_write_costs_writeback(path):
    with held_image(path, "writeback") as img:
        img.flush()
        s0 = img.stats.as_dict()
        img.write(0, b"x" * G)
        img.write(5 * G, b"y" * G)
        img.flush()
        d = delta(s0, img.stats.as_dict())
        # no crc records in writeback: flush() syncs the data before the journal
        assert d == {
            "data_writes": 2,
            "data_bytes_written": 2 * G,
            "metadata_writes": 1,
            "metadata_bytes_written": 512,
            "flushes": 2,
            "journal_records": 3,
        }


def test_unaligned_write_copies_granule_edges(path):
    with held_image(path) as img:
        s0 = img.stats.as_dict()
        img.write(G - 10, b"q" * 20)  # crosses granules 0 and 1: head + tail
        d = delta(s0, img.stats.as_dict())
        assert d["data_reads"] == 2 and d["data_bytes_read"] == 2 * G - 20
        assert d["data_writes"] == 1 and d["data_bytes_written"] == 2 * G
        assert img.read(0, 2 * G) == pattern(1, G - 10) + b"q" * 20 + pattern(1, 2 * G)[G + 10 :]


def test_bytes_written_per_guest_byte_after_snapshot(path):
    import random

    rnd = random.Random(5)
    with held_image(path, "writeback") as img:
        img.flush()
        s0 = img.stats.as_dict()
        for _ in range(200):
            img.write(rnd.randrange(SIZE // G) * G, b"r" * G)
        img.flush()
        d = delta(s0, img.stats.as_dict())
        total = d["data_bytes_written"] + d["metadata_bytes_written"]
        assert total / (200 * G) <= 1.2


# ----- reads: both implementations, byte for byte, stats too ---------------------------------
def test_reads_of_partial_chunks_identical_in_both_implementations(path):
    import random

    with held_image(path) as img:
        for off, n in (
            (0, G),
            (3 * G + 5, 100),
            (10 * G, 3 * G),
            (CS - G, 2 * G),
            (2 * CS + 7 * G, 1),
        ):
            img.write(off, pattern(off & 0xFF, n))
        img.write(3 * CS, pattern(9, CS))  # a whole chunk: complete at once
        model = img.read(0, SIZE)
    rnd = random.Random(1)
    ranges = [(0, G), (0, SIZE), (G - 1, 2), (CS - 1, G + 2)]
    ranges += [(rnd.randrange(SIZE - 1), rnd.randrange(1, 3 * G)) for _ in range(200)]
    seen = {}
    for name in _impl.MODULES:
        _impl.select(name)
        with fvd.open(path) as img:
            assert img._core.partial.active == 3
            out = []
            for off, n in ranges:
                n = min(n, SIZE - off)
                s0 = img.stats.as_dict()
                got = img.read(off, n)
                assert got == model[off : off + n], (name, off, n)
                out.append(delta(s0, img.stats.as_dict()))
            buf = bytearray(2 * G)
            img.readinto(G - 7, memoryview(buf))
            assert bytes(buf) == model[G - 7 : 3 * G - 7]
            seen[name] = out
    assert len(set(map(str, seen.values()))) == 1
    # a 4 KiB read inside one granule is one pread, whichever layer holds it
    assert seen[next(iter(seen))][0] == {"data_reads": 1, "data_bytes_read": G}


def test_extents_split_partial_chunks(path):
    with held_image(path) as img:
        img.write(G, b"x" * G)
        ext = list(img.extents(0, CS))
        assert [(e.start, e.length) for e in ext] == [(0, G), (G, G), (2 * G, CS - 2 * G)]
        assert ext[0].offset + 2 * G == ext[2].offset  # both in the held chunk
        assert all(e.data for e in ext)


def test_extents_of_runs_of_partial_chunks_and_changed_extents(path):
    with held_image(path) as img:
        img.write(CS + G, b"x" * G)
        img.write(2 * CS + 3 * G, b"y" * G)
        ext = [(e.start, e.length) for e in img.extents()]
        assert (CS + G, G) in ext and (2 * CS + 3 * G, G) in ext
        assert sum(n for _, n in ext) == SIZE
        assert img._core.partial.active == 2
        arr = img.extents_array()
        assert [(int(r["start"]), int(r["length"]), int(r["offset"])) for r in arr] == [
            (e.start, e.length, e.offset) for e in img.extents()
        ]
        # changed since the snapshot: exactly the written granules (fvd.changed)
        changed = img.changed_extents("s")
        covered = set()
        for e in changed:
            covered.update(range(e.start // G, (e.start + e.length) // G))
        assert {(CS + G) // G, (2 * CS + 3 * G) // G} == covered


def read_while_writing(img, span, legal, write):
    """Two threads read [0, span) while `write()` runs: the first 4 KiB granule (offset)
    that holds neither its bytes in `legal` nor b"M"s / b"N"s, or None."""
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            got = img.read(0, span)
            for i in range(0, span, G):
                b = got[i : i + G]
                if b != legal[i : i + G] and b not in (b"M" * G, b"N" * G):
                    bad.append(i)
                    return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        write()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return bad[0] if bad else None


def test_readers_never_see_unwritten_bytes_while_chunks_go_partial(path):
    img = held_image(path)
    span = 2 * CS

    def write():
        for i in range(0, span, 5 * G):
            img.write(i, b"N" * G)

    assert read_while_writing(img, span, pattern(1, SIZE), write) is None
    img.close()


def test_readers_never_see_unwritten_bytes_while_chunks_copy_forward(path):
    """Partial chunks a second snapshot holds; the front's writes into them copy forward
    while readers run: every granule reads its old bytes, the first write's or the
    second's (never N's bytes under a clear bit, never zeros)."""
    img = held_image(path)
    span = 2 * CS
    for i in range(0, span, 5 * G):
        img.write(i, b"N" * G)
    img.create_snapshot("t")
    before = img.read(0, span)

    def write():
        for i in range(2 * G, span, 5 * G):
            img.write(i, b"M" * G)

    assert read_while_writing(img, span, before, write) is None
    with img.open_snapshot("t") as v:
        assert v.read(0, span) == before
    assert_clean(img)
    img.close()


def held_partial_chunk_and_a_reader(path):
    """Chunk 0 partial (granule 0 written) and held by snapshot t, and a reader
    registered with the chunk map (in flight): (image, N, reader's token)."""
    img = held_image(path)
    img.write(0, b"N" * G)
    img.create_snapshot("t")
    core = img._core
    return img, int(core.table[0]), core.chunk_map.enter()


def wait_until_remapped(core, held, thread):
    """Until chunk 0 no longer maps `held` (the thread published its new chunk), then
    a moment more: the thread must still be waiting for the registered reader."""
    for _ in range(2000):
        if int(core.table[0]) != held:
            break
        thread.join(0.005)
    assert int(core.table[0]) != held
    thread.join(0.2)
    assert thread.is_alive()


def test_copy_forward_sets_the_new_bits_after_a_grace_period(path):
    """A reader that took the held chunk N from the table before the write published N2
    must be done before the new bits are set (N's bytes there are not the chunk's): the
    write waits for it, deterministically here (a registered call in flight)."""
    img, held, token = held_partial_chunk_and_a_reader(path)
    core = img._core
    writer = threading.Thread(target=img.write, args=(3 * G, b"M" * G))
    writer.start()
    try:
        wait_until_remapped(core, held, writer)  # N2 is published ...
        assert not core.partial.flags(core.partial.slot_of(0))[3]  # ... the bit waits
    finally:
        core.chunk_map.leave(token)
        writer.join()
    assert core.partial.flags(core.partial.slot_of(0))[3]
    assert img.read(0, 4 * G) == b"N" * G + pattern(1, SIZE)[G : 3 * G] + b"M" * G
    img.close()


def test_revert_completes_held_partial_chunks_after_a_grace_period(path):
    """Revert while a snapshot holds the front's partial chunk: the chunk is completed
    into a new chunk the table maps, and its bits are set only once a reader that took
    the held N from the table before is done."""
    img, held, token = held_partial_chunk_and_a_reader(path)
    core = img._core
    slot = core.partial.slot_of(0)
    reverter = threading.Thread(target=img.revert_to_snapshot, args=("s",))
    reverter.start()
    try:
        wait_until_remapped(core, held, reverter)  # the completed copy is mapped ...
        assert not core.partial.flags(slot)[1:].any()  # ... the bits wait for the reader
    finally:
        core.chunk_map.leave(token)
        reverter.join()
    assert img.read(0, SIZE) == pattern(1, SIZE)
    with img.open_snapshot("t") as v:
        assert v.read(0, G) == b"N" * G
    assert_clean(img)
    img.close()


# ----- lifecycle -----------------------------------------------------------------------------
def test_partial_chunks_survive_close_and_crash(path):
    with held_image(path) as img:
        img.write(5 * G, b"a" * G)
        img.write(CS + 100, b"b" * 50)
        expect = img.read(0, SIZE)
    with fvd.open(path) as img:
        assert img._core.partial.active == 2 and img._core.header.partial_map_offset
        assert img.read(0, SIZE) == expect
        assert_clean(img)
    img = fvd.open(path, "r+", cache="writethrough")
    img.write(7 * G, b"c" * G)
    img.write(2 * CS, b"d" * G)
    expect = img.read(0, SIZE)
    img._crash()
    with fvd.open(path, "r+") as img:  # replay on top of the checkpointed map
        assert img._core.partial.active == 3
        assert img.read(0, SIZE) == expect
        assert_clean(img)


def test_create_holds_partial_chunks_and_the_next_write_copies_forward(path):
    """create_snapshot copies nothing: the new snapshot holds the partial chunk as it is
    (its granule record: N, S, bits; feature bit 3). The front's next write into it
    copies forward: a new chunk takes N's written granules the write does not cover,
    then the write; S stays the source."""
    with held_image(path) as img:
        img.write(5 * G, b"a" * G)
        s0 = img.stats.as_dict()
        img.create_snapshot("t")
        d = delta(s0, img.stats.as_dict())
        assert img._core.partial.active == 1
        assert "data_writes" not in d and "data_reads" not in d
        assert img._core.header.incompatible_features & fmt.INCOMPAT_SNAPSHOT_PARTIAL
        expect = img.read(0, SIZE)
        with img.open_snapshot("t") as v:
            assert v.read(0, SIZE) == expect
        s0 = img.stats.as_dict()
        img.write(6 * G, b"b" * G)
        d = delta(s0, img.stats.as_dict())
        assert img.stats.refcount_updates == (SIZE // CS) * 2 + 1  # the creates only
        # granule 5 carried (1 read, 1 write), then the guest's 4 KiB
        assert (d["data_reads"], d["data_bytes_read"]) == (1, G)
        assert (d["data_writes"], d["data_bytes_written"]) == (2, 2 * G)
        assert img._core.partial.active == 1
        assert img.read(5 * G, 2 * G) == b"a" * G + b"b" * G
        with img.open_snapshot("t") as v:
            assert v.read(0, SIZE) == expect
        assert_clean(img)
    with fvd.open(path) as img:
        with img.open_snapshot("t") as v:
            assert v.read(0, SIZE) == expect
        assert_clean(img)
    with fvd.open(path, "r+") as img:
        img.delete_snapshot("t")  # its record goes: bit 3 with it
        assert not img._core.header.incompatible_features & fmt.INCOMPAT_SNAPSHOT_PARTIAL
        assert img._core.header.incompatible_features & fmt.INCOMPAT_PARTIAL
        assert_clean(img)


def test_revert_copies_only_the_sources_data(path):
    """Revert to a snapshot holding a partial chunk gives the front a whole chunk: the
    record's written granules from N, the others from the source's data runs, its holes
    punched (a sparse source costs only its data; a torn write's bytes under clear bits,
    never read while the chunk is partial, are not carried)."""
    with fvd.open(path, "r+", cache="writethrough") as img:
        img.write(3 * G, b"d" * (2 * G))  # chunk 0: granules 3, 4 hold data, the rest holes
        img.create_snapshot("s")
        img.write(10 * G, b"a" * G)  # partial: its source is mostly holes
        chunk = int(img._core.table[0])
        torn = img._core.header.data_offset + chunk * CS + 20 * G
        os.pwrite(img._core.fd, b"T" * G, torn)  # as if a write never journaled
        expect = img.read(0, SIZE)
        assert expect[20 * G : 21 * G] == bytes(G)
        img.create_snapshot("t")
        img.write(0, b"z" * SIZE)  # the front rewritten whole
        s0 = img.stats.as_dict()
        img.revert_to_snapshot("t")
        d = delta(s0, img.stats.as_dict())
        assert img._core.partial.active == 0
        assert d["data_bytes_written"] == 3 * G  # N's granule 10, the source's 3 and 4
        assert img.read(0, SIZE) == expect
        with img.open_snapshot("t") as v:
            assert v.read(0, SIZE) == expect
        assert_clean(img)
    with fvd.open(path) as img:
        assert img.read(0, SIZE) == expect
        assert_clean(img)


def test_delete_keeps_the_source_until_the_chunk_is_complete(path):
    with held_image(path) as img:
        img.write(G, b"a" * G)
        source = int(img._core.partial.src[img._core.partial.slot_of(0)])
        img.delete_snapshot("s")
        assert img._core.header.incompatible_features & fmt.INCOMPAT_PARTIAL
        expect = img.read(0, SIZE)
        assert img._core.in_use()[source]
        assert_clean(img)
    with fvd.open(path, "r+") as img:
        assert img.read(0, SIZE) == expect
        assert img._core.header.incompatible_features & fmt.INCOMPAT_PARTIAL
        img.write(0, b"z" * CS)  # complete: the source goes
        assert img._core.partial.active == 0
        img.flush()
        assert not img._core.in_use()[source] if source < len(img._core.in_use()) else True
        assert_clean(img)
    with fvd.open(path) as img:
        # no snapshot and no partial chunk: older readers may open it again
        assert not img._core.header.incompatible_features & fmt.INCOMPAT_PARTIAL
        assert img.read(0, CS) == b"z" * CS
        assert_clean(img)


def test_revert_and_write_zeroes_drop_partial_chunks(path):
    with held_image(path) as img:
        img.write(G, b"a" * G)
        img.write(CS + G, b"b" * G)
        img.write_zeroes(CS, CS)  # whole partial chunk
        assert img._core.partial.active == 1
        assert img.read(CS, CS) == bytes(CS)
        img.revert_to_snapshot("s")
        assert img._core.partial.active == 0
        assert img.read(0, SIZE) == pattern(1, SIZE)
        assert_clean(img)
    with fvd.open(path) as img:
        assert img.read(0, SIZE) == pattern(1, SIZE)
        assert img._core.header.partial_map_offset == 0
        assert_clean(img)


def test_older_readers_refuse_partial_chunks(path, monkeypatch):
    with held_image(path) as img:
        img.write(0, b"a" * G)
    monkeypatch.setattr(fmt, "KNOWN_INCOMPAT", fmt.INCOMPAT_BASE | fmt.INCOMPAT_SNAPSHOTS)
    with pytest.raises(fvd.UnsupportedFeatureError):
        fvd.open(path)


def test_check_reports_a_damaged_partial_map(path):
    with held_image(path) as img:
        img.write(0, b"a" * G)
        off = None
    with fvd.open(path) as img:
        off = img._core.header.partial_map_offset
    with open(path, "r+b") as f:
        f.seek(off + 20)
        f.write(b"\xff")
    with pytest.raises(fvd.CorruptImageError):
        fvd.open(path)
    from fvd.image import check_file as check_path

    assert check_path(path).corruptions >= 1


def test_images_with_a_base_keep_whole_chunk_copies(tmp_path):
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(pattern(3, SIZE))
    p = str(tmp_path / "over.fvd")
    fvd.create(p, SIZE, base=base, base_format="raw")
    with fvd.open(p, "r+", cache="writethrough") as img:
        img.write(0, pattern(4, CS))
        img.create_snapshot("s")
        s0 = img.stats.as_dict()
        img.write(G, b"x" * G)
        d = delta(s0, img.stats.as_dict())
        assert d["data_bytes_written"] == CS + G  # the chunk copy, then the write
        assert img._core.partial is None
        assert_clean(img)


# ----- crash cutting -----------------------------------------------------------------------------
def apply_ops(path, ops):
    """Replay recorded writes; hole punches are real punches (a punched chunk must not
    look like a leak)."""
    from fvd.fileio import punch_hole

    with open(path, "r+b") as f:
        for kind, a, b in ops:
            if kind == "w":
                os.pwrite(f.fileno(), b, a)
            elif kind == "t":
                os.ftruncate(f.fileno(), a)
            else:
                punch_hole(f.fileno(), a, b)


SCS = 64 * KiB  # crash cuts: small chunks, small journal
SSIZE = 4 * SCS


def model_of(img):
    views = []
    for s in img.snapshots():
        with img.open_snapshot(s.name) as v:
            views.append((s.name, v.read(0, SSIZE)))
    return img.read(0, SSIZE), tuple(views)


def prepare(path, hold=False, complete=False):
    """s holds every chunk; chunks 0 and 1 partial; with `hold`, snapshot p holds them
    as they are (its granule record), then the front copies chunk 0 forward and starts
    chunk 2 (chunk 1 stays as p holds it). With `complete` (and `hold`), the front then writes every
    other granule of chunk 1 (copy-forward: granule 9 carried, the chunk complete and
    kept partial for its provenance) and snapshot c holds it."""
    fvd.create(path, SSIZE, chunk_size=SCS, journal_size=64 * KiB, overwrite=True)
    with held_image(path, "writeback", SSIZE) as img:
        img.write(2 * G + 7, b"p" * 30)  # chunk 0 partial
        img.write(SCS + 9 * G, b"q" * G)  # chunk 1 partial
        if hold:
            img.create_snapshot("p")
            img.write(5, b"x" * 3)
            img.write(2 * SCS + 3 * G, b"r" * G)
        if complete:
            img.write(SCS, b"k" * 9 * G)
            img.write(SCS + 10 * G, b"k" * (SCS - 10 * G))
            assert img._core.partial.complete(img._core.partial.slot_of(1))
            img.create_snapshot("c")


def _close_after(fn):
    def op(img):
        fn(img)
        img.close()

    return op


WRITE_OPS = {
    "first-write-wt",
    "first-write-wb",
    "new-granule",
    "complete",
    "zeroes",
    "copy-forward",
    "copy-forward-wt",
    "restart",
    "restart-wt",
}
CRASH_OPS = {
    "first-write-wt": ("writethrough", _close_after(lambda i: i.write(2 * SCS + G, b"A" * G))),
    "first-write-wb": ("writeback", _close_after(lambda i: i.write(2 * SCS + 5, b"A" * 9000))),
    "new-granule": ("writethrough", _close_after(lambda i: i.write(SCS + 3 * G + 1, b"B" * 10))),
    "complete": ("writethrough", _close_after(lambda i: i.write(0, b"C" * SCS))),
    "zeroes": ("writethrough", _close_after(lambda i: i.write_zeroes(SCS, SCS))),
    "create": ("writeback", lambda i: i.create_snapshot("t")),
    "delete": ("writeback", lambda i: i.delete_snapshot("s")),
    "revert": ("writeback", lambda i: i.revert_to_snapshot("s")),
    "checkpoint": ("writeback", lambda i: i.close()),
    # p holds the partial chunks (prepare(hold=True))
    "copy-forward": ("writeback", _close_after(lambda i: i.write(SCS + 4 * G + 3, b"F" * G))),
    "copy-forward-wt": ("writethrough", _close_after(lambda i: i.write(SCS + 9 * G, b"F" * G))),
    # c holds chunk 1 complete with a carried granule (prepare(complete=True))
    "restart": ("writeback", _close_after(lambda i: i.write(SCS + 3 * G + 5, b"R" * 9))),
    "restart-wt": ("writethrough", _close_after(lambda i: i.write(SCS + 9 * G, b"R" * G))),
    "delete-record": ("writeback", lambda i: i.delete_snapshot("p")),
    "revert-record": ("writeback", lambda i: i.revert_to_snapshot("p")),
    "revert-over-record": ("writeback", lambda i: i.revert_to_snapshot("s")),
}
HOLD_OPS = {"copy-forward", "copy-forward-wt", "delete-record", "revert-record"}
HOLD_OPS.add("revert-over-record")


@pytest.mark.syscall_recorded
@pytest.mark.parametrize("op", sorted(CRASH_OPS))
def test_crash_at_every_write(path, monkeypatch, op, tmp_path):
    """Every prefix of the operation's writes opens as the state before or after it."""
    restart = op.startswith("restart")
    prepare(path, hold=op in HOLD_OPS or restart, complete=restart)
    cache, fn = CRASH_OPS[op]
    img = fvd.open(path, "r+", cache=cache)
    before = model_of(img)
    pre = str(tmp_path / "pre.fvd")
    copy_sparse(path, pre)
    rec = WriteRecorder(path)
    fn(img)
    rec.stop()
    if img._core.closed:
        img = fvd.open(path)
    after = model_of(img)
    img.close()
    if op == "checkpoint":
        assert before == after
    else:
        assert before != after
    cut = str(tmp_path / "cut.fvd")
    seen = set()
    for k in range(len(rec.writes) + 1):
        copy_sparse(pre, cut)
        apply_ops(cut, rec.writes[:k])
        with fvd.open(cut, "r+") as c:
            state = model_of(c)
            if op in WRITE_OPS and state not in (before, after):
                # a guest write is not atomic (neither in an unshared chunk): every byte
                # must read its old or its new contents, snapshots stay exact
                assert state[1] == before[1] == after[1]
                front = np.frombuffer(state[0], np.uint8)
                old = np.frombuffer(before[0], np.uint8)
                new = np.frombuffer(after[0], np.uint8)
                assert ((front == old) | (front == new)).all(), f"cut {k}: bytes from elsewhere"
            else:
                assert state in (before, after), f"cut after {k} of {len(rec.writes)} writes"
            seen.add(state == after)
            assert_clean(c)
        with fvd.open(cut) as c:
            assert model_of(c) == state
            assert_clean(c)
    assert seen == ({True} if op == "checkpoint" else {False, True})


# ----- state machine: snapshots, partial chunks, power cuts ------------------------------------
MSIZE = 4 * 64 * KiB + 3 * KiB  # 5 chunks of 64 KiB, the last one short


def make_machine(path, recorder, cache):
    class GranularMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self):
            if os.path.exists(path):
                os.unlink(path)
            fvd.create(path, MSIZE, chunk_size=64 * KiB, journal_size=64 * KiB)
            recorder.snapshot_now()
            self.img = fvd.open(path, "r+", cache=cache)
            self.model = bytearray(MSIZE)
            self.durable = bytearray(MSIZE)
            self.snaps = {}
            self.seed = 0
            self.n = 0

        def _ack(self):
            if cache == "writethrough":
                self.durable[:] = self.model

        @rule(g=st.integers(0, MSIZE // G), k=st.integers(1, 20), skew=st.integers(0, 9))
        def write(self, g, k, skew):
            off = min(g * G + (skew * 700 if skew > 6 else 0), MSIZE - 1)
            n = min(k * G - (skew * 300 if skew > 7 else 0), MSIZE - off)
            self.seed += 1
            data = pattern(self.seed, n)
            self.img.write(off, data)
            self.model[off : off + n] = data
            self._ack()

        @rule(g=st.integers(0, MSIZE // G), k=st.integers(1, 40))
        def zeroes(self, g, k):
            off = min(g * G, MSIZE - 1)
            n = min(k * G, MSIZE - off)
            self.img.write_zeroes(off, n)
            self.model[off : off + n] = bytes(n)
            self._ack()

        @rule()
        def create(self):
            self.n += 1
            name = f"s{self.n}"
            self.img.create_snapshot(name)
            self.snaps[name] = bytes(self.model)
            self.durable[:] = self.model

        @precondition(lambda self: self.snaps)
        @rule(data=st.data())
        def delete(self, data):
            name = data.draw(st.sampled_from(sorted(self.snaps)))
            self.img.delete_snapshot(name)
            del self.snaps[name]
            self.durable[:] = self.model

        @precondition(lambda self: self.snaps)
        @rule(data=st.data())
        def revert(self, data):
            name = data.draw(st.sampled_from(sorted(self.snaps)))
            self.img.revert_to_snapshot(name)
            self.model[:] = self.snaps[name]
            self.durable[:] = self.model

        @rule()
        def flush(self):
            self.img.flush()
            self.durable[:] = self.model

        @rule()
        def reopen(self):
            self.img.close()
            self.img = fvd.open(path, "r+", cache=cache)
            self.durable[:] = self.model

        @rule()
        def power_cut(self):
            self.img._crash()
            recorder.power_cut()
            self.img = fvd.open(path, "r+", cache=cache)
            self.model[:] = self.durable

        @invariant()
        def contents(self):
            if not hasattr(self, "img"):
                return
            assert self.img.read(0, MSIZE) == self.model
            for name, data in self.snaps.items():
                with self.img.open_snapshot(name) as v:
                    assert v.read(0, MSIZE) == data
            # changed extents (granule records between snapshots) never miss a change
            names = [s.name for s in self.img.snapshots()]
            for i, since in enumerate(names):
                for until in names[i:] + [None]:
                    arr = self.img.changed_extents_array(since, until)
                    newer = self.model if until is None else self.snaps[until]
                    assert_sound(arr, self.snaps[since], bytes(newer), MSIZE)
            used = np.flatnonzero(self.img._core.in_use())  # the tail trim's shortcut agrees
            assert snapshots.in_use_end(self.img._core, 1 << 40) == (
                int(used[-1]) + 1 if len(used) else 0
            )

        def teardown(self):
            if hasattr(self, "img"):
                self.img.close()
                with fvd.open(path) as img:
                    assert img.read(0, MSIZE) == self.model
                    result = img.check()
                    assert result.ok, result.messages

    return GranularMachine


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_state_machine_with_snapshots_and_power_cuts(tmp_path, monkeypatch, cache):
    path = str(tmp_path / "m.fvd")
    recorder = DurableRecorder(monkeypatch, path)
    run_state_machine_as_test(
        make_machine(path, recorder, cache),
        settings=settings(
            max_examples=int(os.environ.get("FVD_GRANULAR_EXAMPLES", "8")),
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
