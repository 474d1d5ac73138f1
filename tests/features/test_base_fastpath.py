"""Base images through the fast path: ChunkMap reads raw base runs itself and checks the
stale bitmap on writes. Compared with the Python layer (BaseLayer.readinto) byte for byte
and in stats, for both implementations (the autouse `impl` fixture)."""

import os
import random
import threading

import numpy as np
import pytest

import fvd
from fvd.units import KiB, MiB

from ..helpers import make_raw
from ..helpers import stats_delta as delta

BASE_SIZE = 3 * MiB + 5000  # last base block is cut by the base end
SIZE = 4 * MiB


@pytest.fixture
def over_raw(tmp_path):
    base = str(tmp_path / "base.raw")
    data = make_raw(base, BASE_SIZE, seed=7)
    path = str(tmp_path / "a.fvd")
    fvd.create(path, SIZE, base=base, base_format="raw", block_size=4096, chunk_size=64 * KiB)
    model = bytearray(SIZE)
    model[:BASE_SIZE] = data
    return path, base, model


def _python_read(img, off, n):
    """The Python layer's answer (what Image.readinto did before the fast path)."""
    buf = bytearray(n)
    before = img.stats.as_dict()
    img._core.base_layer.readinto(off, buf)
    return bytes(buf), delta(img, before)


def _fast_read(img, off, n):
    buf = bytearray(n)
    before = img.stats.as_dict()
    assert img.readinto(off, buf) == n
    return bytes(buf), delta(img, before)


def _populate(img, model):
    """Image blocks here and there, one straddling the base end, a zeroed chunk."""
    rng = random.Random(3)
    for off, n in [
        (5000, 100),
        (20000, 9000),
        (64 * KiB, 4096),
        (1 * MiB + 10, 70 * KiB),
        (BASE_SIZE - 3000, 6000),
        (BASE_SIZE + 20000, 500),
    ]:
        data = rng.randbytes(n)
        img.write(off, data)
        model[off : off + n] = data
    img.write_zeroes(2 * MiB, 128 * KiB)
    model[2 * MiB : 2 * MiB + 128 * KiB] = bytes(128 * KiB)


def test_reads_bound_to_fast_path(over_raw):
    path, base, model = over_raw
    with fvd.open(path, "r+") as img:
        assert img.readinto == img._core.chunk_map.readinto
        assert img._core.chunk_map.base_fd >= 0 and img._core.chunk_map.bend == BASE_SIZE
    with fvd.open(path, "r+", copy_on_read=True) as img:
        assert "readinto" not in img.__dict__  # copy-on-read: Python layer
        assert img._core.chunk_map.base_fd == -1 and img._core.chunk_map.bend == BASE_SIZE


def test_read_spanning_image_base_and_past_end(over_raw):
    path, base, model = over_raw
    with fvd.open(path, "r+") as img:
        _populate(img, model)
        img.flush()
        cases = [
            (0, SIZE),
            (0, 64 * KiB),
            (4096, 4096),
            (5000, 100),
            (3000, 30000),
            (BASE_SIZE - 10000, 40000),
            (BASE_SIZE - 1, 2),
            (BASE_SIZE - 4096, 4096),
            (BASE_SIZE, 1000),
            (2 * MiB - 100, 200 * KiB),
            (1 * MiB, 0),
            (SIZE - 1, 1),
        ]
        rng = random.Random(11)
        for _ in range(300):
            off = rng.randrange(SIZE)
            cases.append((off, rng.randrange(min(300 * KiB, SIZE - off) + 1)))
        for off, n in cases:
            fast, dfast = _fast_read(img, off, n)
            slow, dslow = _python_read(img, off, n)
            assert fast == slow == model[off : off + n], (off, n)
            assert dfast == dslow, (off, n)
        # one read across everything: base runs, image runs, past the base end
        got, d = _fast_read(img, 0, SIZE)
        assert d["base_reads"] == 6 and d["base_bytes_read"] > 0
    with fvd.open(path) as img:  # read-only open: same path
        assert img.readinto == img._core.chunk_map.readinto
        assert img.read(0, SIZE) == model


def test_random_bitmaps_fast_equals_python(over_raw, impl):
    """Segmentation against arbitrary bit patterns (long 0x00 / 0xFF byte runs included).
    Bits set over unallocated chunks read zeros in both paths."""
    path, base, model = over_raw
    rng = random.Random(5)
    with fvd.open(path) as img:
        fresh = img._core.bitmap.fresh
        nbytes = -(-BASE_SIZE // 4096 // 8)
        for trial in range(40):
            kind = trial % 4
            if kind == 0:
                fresh[:nbytes] = np.frombuffer(rng.randbytes(nbytes), np.uint8)
            elif kind == 1:
                fresh[:nbytes] = [rng.choice((0, 0xFF, 0xFF, 0x0F, 0x80)) for _ in range(nbytes)]
            elif kind == 2:
                fresh[:nbytes] = 0xFF
            else:
                fresh[:nbytes] = 0
            for _ in range(30):
                off = rng.randrange(SIZE)
                n = rng.randrange(min(600 * KiB, SIZE - off) + 1)
                fast, dfast = _fast_read(img, off, n)
                slow, dslow = _python_read(img, off, n)
                assert fast == slow and dfast == dslow, (trial, off, n)


def test_fast_write_checks_stale_bits(over_raw):
    path, base, model = over_raw
    with fvd.open(path, "r+", cache="writethrough") as img:
        # a block still in the base: the map refuses, nothing written
        before = img.stats.as_dict()
        assert img._core.chunk_map.write(8192, b"a" * 10) == -1
        assert delta(img, before) == {}
        img.write(8192, b"a" * 10)  # slow path: copy-on-write of the block
        model[8192:8202] = b"a" * 10
        img._core.crc_guard = None  # leave the sealing case aside
        before = img.stats.as_dict()
        img.write(8192 + 100, b"b" * 100)  # present and durable: fast, no base read
        model[8292:8392] = b"b" * 100
        d = delta(img, before)
        assert d == {"data_writes": 1, "data_bytes_written": 100, "flushes": 1}
        # spanning a present and an absent block: refused by the map, slow path writes
        assert img._core.chunk_map.write(8192 + 4000, b"c" * 200) == -1
        img.write(8192 + 4000, b"c" * 200)
        model[8192 + 4000 : 8192 + 4200] = b"c" * 200
        # past the base end (allocated by an earlier write): fast
        img.write(BASE_SIZE + 100, b"e" * 10)
        model[BASE_SIZE + 100 : BASE_SIZE + 110] = b"e" * 10
        assert img._core.chunk_map.write(BASE_SIZE + 200, b"f" * 10) == 10
        model[BASE_SIZE + 200 : BASE_SIZE + 210] = b"f" * 10
        assert img.read(0, SIZE) == model
    with fvd.open(path, "r+", copy_on_read=True) as img:
        # a block copy-on-read filled (fresh bit only) still goes through the slow path
        img.read(200 * KiB, 4096)
        assert img._core.chunk_map.write(200 * KiB, b"g") == -1
        img.write(200 * KiB, b"g")
        model[200 * KiB] = ord("g")
        assert img.read(0, SIZE) == model
    with fvd.open(path) as img:
        assert img.read(0, SIZE) == model
        assert img.check().ok


def test_prefetch_detaches_base(over_raw):
    path, base, model = over_raw
    with fvd.open(path, "r+") as img:
        _populate(img, model)
        bound = img.readinto
        img.prefetch(min_rate=0)
        assert (
            img._core.base_layer is None
            and img._core.chunk_map.bend == 0
            and img._core.chunk_map.base_fd == -1
        )
        assert img.readinto == bound
        before = img.stats.as_dict()
        assert img.read(0, SIZE) == model
        assert delta(img, before).get("base_reads", 0) == 0
        os.rename(base, base + ".away")
        assert img.read(0, SIZE) == model
        img.write(0, b"z")
        model[0] = ord("z")
    with fvd.open(path) as img:
        assert img.read(0, SIZE) == model


def test_reads_racing_prefetch(over_raw):
    """Readers never see anything but the model while prefetch stores blocks and then
    drops the base."""
    path, base, model = over_raw
    with fvd.open(path, "r+") as img:
        _populate(img, model)
        stop = threading.Event()
        errors = []

        def reader(seed):
            rng = random.Random(seed)
            buf = bytearray(256 * KiB)
            try:
                while not stop.is_set():
                    off = rng.randrange(SIZE)
                    n = rng.randrange(1, min(len(buf), SIZE - off) + 1)
                    mv = memoryview(buf)[:n]
                    img.readinto(off, mv)
                    if mv != model[off : off + n]:
                        errors.append((off, n))
                        return
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        try:
            img.prefetch(step=64 * KiB, min_rate=0)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[:3]
        assert img._core.base_layer is None and img._core.chunk_map.base_users == 0
        assert img.read(0, SIZE) == model


def test_set_base_validation(over_raw):
    path, base, model = over_raw
    with fvd.open(path) as img:
        m = img._core.chunk_map
        short = np.zeros(2, np.uint8)
        with pytest.raises(ValueError):
            m.set_base(short, short, 4096, BASE_SIZE, -1)
        with pytest.raises(ValueError):
            m.set_base(img._core.bitmap.fresh, img._core.bitmap.stale, 3000, BASE_SIZE, -1)
        assert m.bend == BASE_SIZE  # unchanged by the refusals


def test_fvd_base_keeps_python_layer(tmp_path):
    raw = str(tmp_path / "r.raw")
    data = make_raw(raw, 1 * MiB)
    mid = str(tmp_path / "mid.fvd")
    fvd.create(mid, 1 * MiB, base=raw, base_format="raw", block_size=4096, chunk_size=64 * KiB)
    top = str(tmp_path / "top.fvd")
    fvd.create(top, 2 * MiB, base=mid, base_format="fvd", block_size=4096, chunk_size=64 * KiB)
    with fvd.open(top, "r+") as img:
        assert "readinto" not in img.__dict__ and img._core.chunk_map.base_fd == -1
        img.write(10000, b"x" * 10)
        data[10000:10010] = b"x" * 10
        assert img.read(0, 1 * MiB) == data
        assert img.read(1 * MiB, 1 * MiB) == bytes(1 * MiB)
