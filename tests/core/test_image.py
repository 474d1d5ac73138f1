"""Core engine: create/open, I/O at any alignment, stats counts, journal, locking."""

import multiprocessing
import os

import numpy as np
import pytest

import fvd
from fvd.core.image import ImageCore
from fvd.units import GiB, KiB, MiB

from ..helpers import pattern


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "disk.fvd")


def test_implementation_is_selected(impl):
    assert fvd.IMPLEMENTATION == impl


def test_compiled_module_is_loaded_in_ci():
    """In CI (or with FVD_REQUIRE_CYTHON=1) the extension must be built and in use."""
    if os.environ.get("CI") != "true" and os.environ.get("FVD_REQUIRE_CYTHON") != "1":
        pytest.skip("only enforced in CI")
    from fvd import _fastpath

    assert _fastpath.__file__.endswith(".so")
    assert "cython" in fvd._impl.MODULES


def test_create_refuses_to_overwrite(path):
    fvd.create(path, 10 * MiB)
    with pytest.raises(FileExistsError):
        fvd.create(path, 10 * MiB)
    fvd.create(path, 20 * MiB, overwrite=True)
    with fvd.open(path) as img:
        assert img.size == 20 * MiB


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(size=-1),
        dict(size=0),
        dict(chunk_size=3 * MiB),
        dict(chunk_size=4 * KiB),
        dict(block_size=100),
        dict(block_size=2 * MiB),
        dict(size=1 << 60),
        dict(journal_size=512),
    ],
)
def test_create_rejects_bad_arguments(path, kwargs):
    args = dict(size=10 * MiB)
    args.update(kwargs)
    size = args.pop("size")
    with pytest.raises(ValueError):
        fvd.create(path, size, **args)
    assert not os.path.exists(path)


def test_properties_and_fresh_image_reads_zero(path):
    fvd.create(path, 5 * MiB + 512, chunk_size=64 * KiB, block_size=4 * KiB)
    with fvd.open(path) as img:
        assert (img.size, img.chunk_size, img.block_size) == (5 * MiB + 512, 64 * KiB, 4 * KiB)
        assert img.read_only and img.base is None
        assert img.read(0, 5 * MiB + 512) == bytes(5 * MiB + 512)


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_unaligned_and_chunk_spanning_io(path, cache):
    fvd.create(path, 8 * MiB, chunk_size=64 * KiB)
    model = bytearray(8 * MiB)
    rng = np.random.default_rng(1)
    with fvd.open(path, "r+", cache=cache) as img:
        for i in range(60):
            off = int(rng.integers(0, 8 * MiB - 1))
            n = int(rng.integers(1, min(300 * KiB, 8 * MiB - off) + 1))
            data = pattern(i, n)
            assert img.write(off, data) == n
            model[off : off + n] = data
        assert img.read(0, 8 * MiB) == model
    with fvd.open(path) as img:
        assert img.read(0, 8 * MiB) == model
        buf = np.zeros(100 * KiB + 3, dtype=np.uint8)
        assert img.readinto(65 * KiB - 5, buf) == len(buf)
        assert buf.tobytes() == model[65 * KiB - 5 : 165 * KiB - 2]
        mv = memoryview(bytearray(70 * KiB))
        img.readinto(1, mv)
        assert mv.tobytes() == model[1 : 70 * KiB + 1]


def test_offsets_past_4gib(path):
    fvd.create(path, 6 * GiB)
    off = 5 * GiB - 3
    with fvd.open(path, "r+") as img:
        img.write(off, b"far away")
        img.write(4 * GiB - 2, b"edge")
    with fvd.open(path) as img:
        assert img.read(off, 8) == b"far away"
        assert img.read(4 * GiB - 2, 4) == b"edge"
        assert img.read(6 * GiB - 4, 4) == bytes(4)
    assert os.path.getsize(path) < 64 * MiB


def test_io_outside_the_image_is_rejected(path):
    fvd.create(path, 1 * MiB)
    with fvd.open(path, "r+") as img:
        for off, n in ((-1, 1), (MiB, 1), (MiB - 1, 2)):
            with pytest.raises(ValueError):
                img.read(off, n)
            with pytest.raises(ValueError):
                img.write(off, b"x" * n)
        with pytest.raises(ValueError):
            img.write_zeroes(MiB - 1, 2)
        assert img.read(MiB - 1, 1) == b"\0"


def test_write_on_read_only_image_is_rejected(path):
    fvd.create(path, 1 * MiB)
    with fvd.open(path) as img:
        with pytest.raises(OSError):
            img.write(0, b"x")
        with pytest.raises(OSError):
            img.write_zeroes(0, 10)


def test_closed_image_and_close_is_idempotent(path):
    fvd.create(path, 1 * MiB)
    img = fvd.open(path, "r+")
    img.close()
    img.close()
    with pytest.raises(ValueError):
        img.read(0, 1)


def test_any_bytes_like_object(path):
    fvd.create(path, 1 * MiB)
    with fvd.open(path, "r+") as img:
        img.write(0, bytearray(b"ab"))
        img.write(2, memoryview(b"cd"))
        img.write(4, np.frombuffer(b"efgh", dtype=np.uint16))
        assert img.read(0, 8) == b"abcdefgh"


def delta(img, before):
    after = img.stats.as_dict()
    return {k: after[k] - before[k] for k in after}


def test_allocating_write_costs_writethrough(path):
    fvd.create(path, 64 * MiB)
    with fvd.open(path, "r+", cache="writethrough") as img:
        before = img.stats.as_dict()
        img.write(5 * MiB + 4 * KiB, b"a" * 4096)
        d = delta(img, before)
        assert d["data_writes"] == 1 and d["data_bytes_written"] == 4096
        assert d["metadata_writes"] <= 1 and d["flushes"] == 1
        assert d["refcount_updates"] == 0
        before = img.stats.as_dict()
        img.write(5 * MiB + 64 * KiB, b"b" * 4096)  # same chunk: already allocated
        d = delta(img, before)
        assert d["data_writes"] == 1 and d["metadata_writes"] == 0 and d["flushes"] == 1


def test_writeback_defers_metadata_to_flush(path):
    fvd.create(path, 64 * MiB)
    with fvd.open(path, "r+") as img:
        before = img.stats.as_dict()
        for i in range(10):
            img.write(i * MiB, b"x" * 4096)
        d = delta(img, before)
        assert d["data_writes"] == 10 and d["metadata_writes"] == 0 and d["flushes"] == 0
        before = img.stats.as_dict()
        img.flush()
        d = delta(img, before)
        # data made durable, then one journal write with all ten table entries
        assert d["metadata_writes"] == 1 and d["flushes"] == 2
        before = img.stats.as_dict()
        img.write(3 * MiB + 5, b"y" * 100)
        img.flush()
        d = delta(img, before)
        assert d == dict(d, data_writes=1, metadata_writes=0, flushes=1)


def test_large_write_is_one_syscall_when_contiguous(path):
    fvd.create(path, 64 * MiB)
    with fvd.open(path, "r+") as img:
        img.write(0, bytes(8 * MiB))  # allocates chunks 0..7 contiguously
        before = img.stats.as_dict()
        img.write(0, b"z" * (8 * MiB))
        buf = bytearray(8 * MiB)
        img.readinto(0, buf)
        d = delta(img, before)
        assert d["data_writes"] == 1 and d["data_reads"] == 1


def test_unallocated_reads_do_no_io(path):
    fvd.create(path, 64 * MiB)
    with fvd.open(path) as img:
        before = img.stats.as_dict()
        img.read(0, 64 * MiB)
        assert delta(img, before)["data_reads"] == 0


def test_write_zeroes_frees_whole_chunks_and_reuses_them(path):
    fvd.create(path, 16 * MiB, chunk_size=64 * KiB)
    with fvd.open(path, "r+") as img:
        img.write(0, b"\xff" * (1 * MiB))
        img.write_zeroes(100, 512 * KiB)
        assert img.read(0, 100) == b"\xff" * 100
        assert img.read(100, 512 * KiB) == bytes(512 * KiB)
        assert img.read(100 + 512 * KiB, 10) == b"\xff" * 10
        used = img.allocated_chunks
        img.flush()  # frees become reusable
        img.write(8 * MiB, b"q" * (256 * KiB))
        assert img._core.allocator.end == 16  # reused, did not grow
        assert img.allocated_chunks == used + 4
    with fvd.open(path) as img:
        assert img.read(100, 512 * KiB) == bytes(512 * KiB)
        assert img.read(8 * MiB, 256 * KiB) == b"q" * (256 * KiB)
        assert img.check().ok


def test_crash_replays_journal(path):
    fvd.create(path, 64 * MiB)
    img = fvd.open(path, "r+")
    img.write(3 * MiB, b"persist")
    img.flush()
    img._crash()
    with fvd.open(path) as ro:  # a reader replays in memory
        assert ro.read(3 * MiB, 7) == b"persist"
    with fvd.open(path, "r+") as img:
        assert img.read(3 * MiB, 7) == b"persist"
        assert img._core.header.clean_shutdown == 0
    with fvd.open(path) as img:
        assert img._core.header.clean_shutdown == 1
        assert img.read(3 * MiB, 7) == b"persist"


def test_journal_wraps_around(path):
    fvd.create(path, 256 * MiB, chunk_size=64 * KiB, journal_size=64 * KiB)
    with fvd.open(path, "r+", cache="writethrough") as img:
        for i in range(400):  # 400 allocations, 128 journal sectors
            img.write(i * 64 * KiB + i, pattern(i, 100))
        assert img._core.header.journal_epoch > 2
        img._crash()
    with fvd.open(path) as img:
        for i in range(400):
            assert img.read(i * 64 * KiB + i, 100) == pattern(i, 100)


def test_second_writer_is_locked_out(path):
    fvd.create(path, MiB)
    with fvd.open(path, "r+"):
        with pytest.raises(fvd.ImageLockedError):
            fvd.open(path, "r+")
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_try_open, args=(path, q))
        p.start()
        p.join(30)
        assert q.get(timeout=5) == "ImageLockedError"
        with pytest.raises(fvd.ImageLockedError):
            fvd.open(path)  # readers too, as with qemu-img
        with fvd.open(path, force_share=True) as reader:  # unless they insist
            assert reader.read(0, 1) == b"\0"
    with fvd.open(path) as r1, fvd.open(path) as r2:  # readers share
        assert r1.read(0, 1) == r2.read(0, 1)
        with pytest.raises(fvd.ImageLockedError):
            fvd.open(path, "r+")
    with fvd.open(path, "r+"):
        pass


def _try_open(path, q):
    try:
        fvd.open(path, "r+").close()
        q.put("opened")
    except fvd.ImageLockedError:
        q.put("ImageLockedError")


def test_extents_merge_and_cover(path):
    fvd.create(path, 8 * MiB)
    with fvd.open(path, "r+") as img:
        img.write(MiB, bytes(2 * MiB))
        img.write_zeroes(0, 0)
        ext = list(img.extents())
        assert [(e.start, e.length, e.data) for e in ext] == [
            (0, MiB, False),
            (MiB, 2 * MiB, True),
            (3 * MiB, 5 * MiB, False),
        ]
        assert sum(e.length for e in img.extents(100, 3 * MiB)) == 3 * MiB
        assert ext[1].offset == img._core.header.data_offset


def test_check_finds_and_repairs_leaks(path):
    fvd.create(path, 8 * MiB)
    with fvd.open(path, "r+") as img:
        img.write(0, b"x" * MiB)
        data_offset = img._core.header.data_offset
    with open(path, "r+b") as f:  # a chunk with data nobody maps
        f.seek(data_offset + 3 * MiB)
        f.write(b"leak" * 1000)
    with fvd.open(path) as img:
        r = img.check()
        assert r.leaks >= 1 and r.corruptions == 0 and not r.ok
    from fvd.image import check_file as check_path

    r = check_path(path, repair=True)
    assert r.leaks == 0 and r.leaks_fixed >= 1
    assert check_path(path).ok


def test_reader_beside_a_writer_gets_a_view_or_a_clear_error(path, monkeypatch):
    fvd.create(path, 4 * MiB)
    with fvd.open(path, "r+"):

        def damaged(self, *args):
            raise fvd.CorruptImageError(self.path, 0, "simulated torn read")

        monkeypatch.setattr(ImageCore, "_load", damaged)
        with pytest.raises(fvd.ImageLockedError):
            fvd.open(path, force_share=True)
    with pytest.raises(fvd.CorruptImageError):  # no writer: damage is damage
        fvd.open(path, force_share=True)


def test_readers_racing_a_writer_never_see_data_from_elsewhere(path):
    """A writer rewrites its 16 blocks over and over and flushes (small journal, so
    checkpoints too); force_share readers opening meanwhile get ImageLockedError, or read
    in block i only bytes written to block i (or zeros); nothing else. The writer never
    frees chunks here: a freed and reused chunk is the documented limit of force_share."""
    import threading

    fvd.create(path, 1 * MiB, chunk_size=64 * KiB, journal_size=64 * KiB)
    stop = threading.Event()
    errors = []

    def writer():
        with fvd.open(path, "r+") as img:
            g = 1
            while not stop.is_set() and g < 400:
                for i in range(16):
                    img.write(i * 64 * KiB, bytes([(i + 16 * g) % 256]) * 4096)
                img.flush()
                g += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(40):
            try:
                with fvd.open(path, force_share=True) as img:
                    for i in range(16):
                        got = np.frombuffer(img.read(i * 64 * KiB, 4096), dtype=np.uint8)
                        bad = got[(got != 0) & (got % 16 != i)]
                        if len(bad):
                            errors.append((i, bad[:4].tolist()))
            except fvd.ImageLockedError:
                pass
    finally:
        stop.set()
        t.join()
    assert not errors
