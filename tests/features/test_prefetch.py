"""Prefetch: copies the base into the image, paced, resumable, safe beside guest I/O."""

import io
import os
import random
import threading

import pytest

import fvd
from fvd.features.prefetch import Pacer, progress_bar
from fvd.ondisk import format as fmt
from fvd.units import KiB, MiB


def setup_image(tmp_path, base_size=3 * MiB + 777, size=4 * MiB, **kw):
    base = str(tmp_path / "base.raw")
    data = bytearray(random.Random(7).randbytes(base_size))
    with open(base, "wb") as f:
        f.write(data)
    path = str(tmp_path / "a.fvd")
    fvd.create(path, size, base="base.raw", base_format="raw", **kw)
    model = data + bytearray(size - base_size)
    return path, base, model


def test_prefetch_then_base_not_needed(tmp_path):
    path, base, model = setup_image(tmp_path)
    seen = []
    with fvd.open(path, "r+") as img:
        img.write(1000, b"a" * 100)
        model[1000:1100] = b"a" * 100
        img.prefetch(lambda d, t: seen.append((d, t)), min_rate=0)
        assert img._core.base_layer is None
        assert img.read(0, len(model)) == model
        before = img.stats.as_dict()
        img.write(2 * MiB + 5, b"fast")  # no bitmap, no base: the fast path
        model[2 * MiB + 5 : 2 * MiB + 9] = b"fast"
        assert img.stats.data_writes - before["data_writes"] == 1
        assert img.stats.metadata_writes == before["metadata_writes"]
    assert seen[-1][0] == seen[-1][1] == 3 * MiB + 777
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    os.rename(base, base + ".gone")
    with fvd.open(path, "r+") as img:
        assert img._core.header.base_flags & fmt.BASE_FLAG_PREFETCHED
        assert img.read(0, len(model)) == model
        assert img.check().ok
        assert img.prefetch(min_rate=0) == 0  # nothing left to do


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_prefetch_with_concurrent_writers(tmp_path, cache):
    path, base, model = setup_image(tmp_path, block_size=16 * KiB, chunk_size=128 * KiB)
    rng = random.Random(3)
    writes = []
    for i in range(40):
        off = rng.randrange(0, len(model) - 1)
        n = min(rng.randrange(1, 50 * KiB), len(model) - off)
        writes.append((off, bytes([i + 1]) * n))
    with fvd.open(path, "r+", cache=cache) as img:

        def writer():
            for off, data in writes:
                img.write(off, data)
                img.read(off, len(data))

        threads = [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        img.prefetch(step=64 * KiB, min_rate=0)
        for t in threads:
            t.join()
        for off, data in writes:
            model[off : off + len(data)] = data
        assert img.read(0, len(model)) == model
    os.rename(base, base + ".gone")
    with fvd.open(path) as img:
        assert img.read(0, len(model)) == model
        assert img.check().ok


def test_interrupted_prefetch_resumes(tmp_path):
    path, base, model = setup_image(tmp_path)
    img = fvd.open(path, "r+")
    calls = []

    def stop(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        img.prefetch(stop, step=256 * KiB, min_rate=0)
    img.flush()
    img._crash()  # bits of the copied blocks were soft: lost, the base is read
    with fvd.open(path, "r+") as img:
        assert img.read(0, len(model)) == model
        copied = img.prefetch(step=256 * KiB, min_rate=0)
        assert 0 < copied <= 3 * MiB + 777
    with fvd.open(path, "r+") as img:
        calls = []
        img2_progress = img.prefetch(lambda d, t: calls.append(d), min_rate=0)
        assert img2_progress == 0
    os.rename(base, base + ".gone")
    with fvd.open(path) as img:
        assert img.read(0, len(model)) == model


def test_resume_after_clean_close_skips_copied_blocks(tmp_path):
    path, base, model = setup_image(tmp_path)
    with fvd.open(path, "r+") as img:
        calls = []

        def stop(done, total):
            calls.append(done)
            if len(calls) == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            img.prefetch(stop, step=1 * MiB, min_rate=0)
    with fvd.open(path, "r+") as img:  # clean close wrote the bitmap (data synced)
        first = []
        img.prefetch(lambda d, t: first.append(d), min_rate=0)
        assert first[0] >= 1 * MiB
        assert img.stats.base_bytes_read <= 3 * MiB + 777 - first[0]


def test_prefetch_read_only_refused(tmp_path):
    path, base, model = setup_image(tmp_path)
    with fvd.open(path) as img:
        with pytest.raises(OSError):
            img.prefetch()


def test_pacer_backs_off_below_floor():
    now = [0.0]
    slept = []

    def clock():
        return now[0]

    def sleep(t):
        slept.append(t)
        now[0] += t

    p = Pacer(min_rate=10 * MiB, rng=random.Random(1), sleep=sleep, clock=clock, throttle_time=2.0)
    for _ in range(40):  # 1 MiB/s: far below the floor
        now[0] += 0.1
        p.account(100 * KiB)
    assert p.pauses > 5 and all(0 <= t <= 2.0 for t in slept)
    p = Pacer(min_rate=1 * MiB, rng=random.Random(1), sleep=sleep, clock=clock)
    slept.clear()
    for _ in range(40):  # 100 MiB/s: no pause
        now[0] += 0.01
        p.account(1 * MiB)
    assert p.pauses == 0 and not slept


def test_pacer_caps_rate():
    now = [0.0]

    def sleep(t):
        now[0] += t

    p = Pacer(min_rate=0, max_rate=1 * MiB, sleep=sleep, clock=lambda: now[0])
    for _ in range(10):
        p.account(256 * KiB)
    assert now[0] >= 2.4


def test_progress_bar():
    out = io.StringIO()
    show = progress_bar(out, width=10)
    show(0, 100)
    show(50, 100)
    show(100, 100)
    text = out.getvalue()
    assert "50.00%" in text and "100.00%" in text and text.count("\r") == 3
