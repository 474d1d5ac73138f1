"""Base images: copy-on-write, copy-on-read, chains, extents, bad input, crash safety."""

import os
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule, run_state_machine_as_test

import fvd
from fvd.ondisk import format as fmt
from fvd.units import KiB, MiB

from ..helpers import (
    DurableRecorder,
    assert_old_or_new,
    image_data_rules,
    make_raw,
    pattern,
    stats_delta,
)


@pytest.fixture
def raw_base(tmp_path):
    path = str(tmp_path / "base.raw")
    data = make_raw(path, 3 * MiB + 5000)
    return path, data


# ----- exact I/O counts -------------------------------------------------------------------
def test_first_write_into_base_block_writethrough(tmp_path, raw_base):
    base, data = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    with fvd.open(path, "r+", cache="writethrough") as img:
        before = img.stats.as_dict()
        img.write(64 * KiB + 4096, b"x" * 4096)
        d = stats_delta(img, before)
        assert d["base_reads"] == 1
        assert d["data_writes"] == 1
        assert d.get("metadata_writes", 0) <= 1
        assert d["flushes"] == 1
        # a second write inside the same (now present) block: no base read, fast path
        before = img.stats.as_dict()
        img.write(64 * KiB + 16 * KiB, b"y" * 4096)
        d = stats_delta(img, before)
        assert d.get("base_reads", 0) == 0 and d["data_writes"] == 1
        before = img.stats.as_dict()
        img.write(64 * KiB + 32 * KiB, b"z" * 4096)
        d = stats_delta(img, before)
        assert d.get("base_reads", 0) == 0 and d["data_writes"] == 1
        assert d.get("metadata_writes", 0) == 0 and d["flushes"] == 1
        data[64 * KiB + 4096 : 64 * KiB + 8192] = b"x" * 4096
        data[80 * KiB : 84 * KiB] = b"y" * 4096
        data[96 * KiB : 100 * KiB] = b"z" * 4096
        assert img.read(0, len(data)) == data
    with fvd.open(path) as img:
        assert img.read(0, len(data)) == data
        assert img.read(len(data), 4 * MiB - len(data)) == bytes(4 * MiB - len(data))
        assert img.check().ok


def test_first_write_into_base_block_writeback(tmp_path, raw_base):
    base, data = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    with fvd.open(path, "r+") as img:
        before = img.stats.as_dict()
        img.write(3, b"x" * 10)
        d = stats_delta(img, before)
        assert d["base_reads"] == 1 and d["data_writes"] == 1
        assert d.get("metadata_writes", 0) == 0 and d.get("flushes", 0) == 0
        before = img.stats.as_dict()
        img.flush()
        d = stats_delta(img, before)
        assert d["metadata_writes"] == 1 and d["flushes"] == 2
        data[3:13] = b"x" * 10
        assert img.read(0, 64 * KiB) == data[: 64 * KiB]


def test_reads_merge_runs(tmp_path, raw_base):
    base, data = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw", block_size=4096, chunk_size=64 * KiB)
    with fvd.open(path, "r+") as img:
        for off in (5000, 20000, 40000):
            img.write(off, b"w" * 100)
            data[off : off + 100] = b"w" * 100
        before = img.stats.as_dict()
        assert img.read(0, 64 * KiB) == data[: 64 * KiB]
        d = stats_delta(img, before)
        assert d["base_reads"] == 4  # one per contiguous base run
        # a read fully past the base end reads zeros and never touches the base
        before = img.stats.as_dict()
        assert img.read(3 * MiB + 5000, 1000) == bytes(1000)
        assert stats_delta(img, before).get("base_reads", 0) == 0


def test_write_zeroes_over_base(tmp_path, raw_base):
    base, data = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    model = bytearray(data) + bytearray(4 * MiB - len(data))
    with fvd.open(path, "r+", cache="writethrough") as img:
        img.write_zeroes(100, 2 * MiB + 7)
        model[100 : 2 * MiB + 107] = bytes(2 * MiB + 7)
        assert img.read(0, 4 * MiB) == model
        ext = list(img.extents())
        assert any(e.zero and e.depth == 0 and e.present for e in ext)
    with fvd.open(path) as img:
        assert img.read(0, 4 * MiB) == model
        assert img.check().ok


# ----- torn writes and the data crc ---------------------------------------------------------
def test_torn_cow_write_reads_base_again(tmp_path, raw_base):
    """The journal reached the disk, the CoW data did not: the block must read the base."""
    base, data = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    img = fvd.open(path, "r+", cache="writethrough")
    img.write(200 * KiB, b"n" * 10)
    host = img._core.chunk_map.host_offset(192 * KiB)
    img._crash()
    with open(path, "r+b") as f:  # the data write never landed
        f.seek(host)
        f.write(bytes(64 * KiB))
    with fvd.open(path, "r+") as img:
        assert img.read(0, len(data)) == data


def test_overwrite_after_cow_then_crash(tmp_path, raw_base):
    """A fast-path overwrite of a crc-checked CoW block must not make replay drop it."""
    base, data = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    img = fvd.open(path, "r+", cache="writethrough")
    img.write(200 * KiB, b"n" * 10)
    img.write(200 * KiB, b"m" * 10)
    img._crash()
    data[200 * KiB : 200 * KiB + 10] = b"m" * 10
    with fvd.open(path, "r+") as img:
        assert img.read(0, len(data)) == data


# ----- copy-on-read ------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_copy_on_read(tmp_path, raw_base, cache):
    base, data = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    with fvd.open(path, "r+", cache=cache, copy_on_read=True) as img:
        assert img.read(1000, 300 * KiB) == data[1000 : 1000 + 300 * KiB]
        before = img.stats.as_dict()
        assert img.read(1000, 300 * KiB) == data[1000 : 1000 + 300 * KiB]
        assert stats_delta(img, before).get("base_reads", 0) == 0
        # a guest write into a block copy-on-read filled still journals its bit
        img.write(5000, b"q" * 5)
        data[5000:5005] = b"q" * 5
        img.flush()
        img._crash()
    with fvd.open(path, "r+") as img:
        assert img.read(0, len(data)) == data
    with fvd.open(path) as img:
        assert img.read(0, len(data)) == data
        assert img.check().ok


def test_copy_on_read_crash_never_exposes_zeros(tmp_path, raw_base, monkeypatch):
    base, data = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    recorder = DurableRecorder(monkeypatch, path)
    img = fvd.open(path, "r+", cache="writethrough", copy_on_read=True)
    img.read(0, 2 * MiB)
    img._crash()
    recorder.power_cut()
    with fvd.open(path, "r+") as img:
        assert img.read(0, len(data)) == data


# ----- chains and extents -------------------------------------------------------------------
def test_two_level_chain_extents(tmp_path):
    raw = str(tmp_path / "r.raw")
    data = make_raw(raw, 2 * MiB)
    mid = str(tmp_path / "mid.fvd")
    top = str(tmp_path / "top.fvd")
    fvd.create(mid, 2 * MiB, base="r.raw", base_format="raw")
    with fvd.open(mid, "r+") as img:
        img.write(1 * MiB, b"M" * (64 * KiB))
        data[1 * MiB : 1 * MiB + 64 * KiB] = b"M" * (64 * KiB)
    fvd.create(top, 3 * MiB, base="mid.fvd")  # format detected: fvd
    with fvd.open(top, "r+") as img:
        assert img.base == mid
        img.write(0, b"T" * (64 * KiB))
        data[0 : 64 * KiB] = b"T" * (64 * KiB)
    with fvd.open(top) as img:
        assert img.read(0, 2 * MiB) == data
        assert img.read(2 * MiB, MiB) == bytes(MiB)
        ext = list(img.extents())
        assert sum(e.length for e in ext) == 3 * MiB
        depth_at = {}
        for e in ext:
            for probe in (0, 64 * KiB, 1 * MiB, 2 * MiB + 5):
                if e.start <= probe < e.start + e.length:
                    depth_at[probe] = e
        assert depth_at[0].depth == 0 and depth_at[0].data
        assert depth_at[1 * MiB].depth == 1 and depth_at[1 * MiB].data
        assert depth_at[64 * KiB].depth == 2 and depth_at[64 * KiB].data
        assert not depth_at[2 * MiB + 5].data


def test_relative_base_resolves_against_image_dir(tmp_path, raw_base, monkeypatch):
    base, data = raw_base
    sub = tmp_path / "sub"
    sub.mkdir()
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base="base.raw", base_format="raw")
    monkeypatch.chdir(sub)
    with fvd.open(path) as img:
        assert img.base == os.path.join(str(tmp_path), "base.raw")
        assert img.read(0, 1000) == data[:1000]


def test_qcow2_base(tmp_path):
    qcow2 = pytest.importorskip("fvd.qcow2")
    q = str(tmp_path / "b.qcow2")
    qcow2.create(q, 2 * MiB)
    with qcow2.open(q, "r+") as b:
        b.write(70000, b"Q" * 1000)
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 2 * MiB, base=q, base_format="qcow2")
    with fvd.open(path, "r+") as img:
        assert img.read(70000, 1000) == b"Q" * 1000
        img.write(70500, b"w" * 10)
        assert img.read(69999, 1002) == b"\0" + b"Q" * 500 + b"w" * 10 + b"Q" * 490 + b"\0"


# ----- bad input -------------------------------------------------------------------------
def test_missing_base_at_create(tmp_path):
    with pytest.raises(fvd.BaseImageError, match="nope.raw"):
        fvd.create(str(tmp_path / "a.fvd"), MiB, base=str(tmp_path / "nope.raw"), base_format="raw")
    assert not os.path.exists(tmp_path / "a.fvd")


def test_missing_base_at_open(tmp_path, raw_base):
    base, _ = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    os.rename(base, base + ".moved")
    with pytest.raises(fvd.BaseImageError, match="base.raw"):
        fvd.open(path)


def test_base_size_changed(tmp_path, raw_base):
    base, _ = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    with open(base, "ab") as f:
        f.write(b"more")
    with pytest.raises(fvd.BaseImageError, match="size changed"):
        fvd.open(path, "r+")


def test_base_is_the_image_itself(tmp_path, raw_base):
    base, _ = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    os.unlink(base)
    os.symlink(path, base)
    with pytest.raises(fvd.BaseImageError, match="loop"):
        fvd.open(path)


def test_loop_through_chain(tmp_path, raw_base):
    base, _ = raw_base
    a, b, c = (str(tmp_path / n) for n in ("a.fvd", "b.fvd", "c.fvd"))
    fvd.create(a, 4 * MiB, base=base, base_format="raw")
    fvd.create(b, 4 * MiB, base=a, base_format="fvd")
    with pytest.raises(fvd.BaseImageError, match="loop"):  # refused at create
        fvd.create(a, 4 * MiB, base=b, base_format="fvd", overwrite=True)
    fvd.create(c, 4 * MiB)
    fvd.create(a, 4 * MiB, base="c.fvd", base_format="fvd", overwrite=True)
    os.replace(b, c)  # now a -> c (the old b) -> a
    with pytest.raises(fvd.BaseImageError, match="loop"):
        fvd.open(a)
    with pytest.raises(fvd.BaseImageError, match="loop"):
        fvd.open(c)


@pytest.mark.parametrize("name", ["bad\nname.raw", "tab\there", "nul\0x"])
def test_odd_characters(tmp_path, name):
    with pytest.raises(fvd.BaseImageError):
        fvd.create(str(tmp_path / "a.fvd"), MiB, base=name, base_format="raw")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_base(tmp_path, raw_base):
    base, _ = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    os.chmod(base, 0)
    try:
        with pytest.raises(fvd.BaseImageError, match="base.raw"):
            fvd.open(path)
    finally:
        os.chmod(base, 0o644)


def test_raw_base_is_never_probed(tmp_path):
    """A raw base that starts with FVD magic stays raw when the format is given."""
    base = str(tmp_path / "tricky.raw")
    content = fmt.MAGIC.to_bytes(4, "little") + bytes(MiB - 4)
    with open(base, "wb") as f:
        f.write(content)
    path = str(tmp_path / "a.fvd")
    fvd.create(path, MiB, base=base, base_format="raw")
    with fvd.open(path) as img:
        assert img.read(0, MiB) == content


def test_check_finds_bit_in_unallocated_chunk(tmp_path, raw_base):
    base, _ = raw_base
    path = str(tmp_path / "a.fvd")
    fvd.create(path, 4 * MiB, base=base, base_format="raw")
    with fvd.open(path, "r+") as img:
        img._core.bitmap.set_range(20, 1)  # chunk 1 (1 MiB chunks, 64 KiB blocks)
        img._core.dirty_since_checkpoint = True
    from fvd.image import check_file as check_path

    result = check_path(path)
    assert result.corruptions == 1
    result = check_path(path, repair=True)
    assert result.corruptions == 0
    assert check_path(path).ok


# ----- model-based ---------------------------------------------------------------------------
SIZE = 1 * MiB + 3 * KiB
BLOCK = 16 * KiB
CHUNK = 128 * KiB
BASE_SIZE = 700 * KiB + 123


def make_base_machine(tmp, recorder, path, cache, base_kind):
    class BaseMachine(image_data_rules(SIZE, max_write=300 * KiB)):
        @initialize(seed=st.integers(0, 1000), cor=st.booleans())
        def setup(self, seed, cor):
            for f in os.listdir(tmp):
                os.unlink(os.path.join(tmp, f))
            if os.path.exists(path):
                os.unlink(path)
            raw = os.path.join(tmp, "b.raw")
            base_content = make_raw(raw, BASE_SIZE, seed)
            if base_kind == "fvd":
                mid = os.path.join(tmp, "b.fvd")
                fvd.create(
                    mid,
                    BASE_SIZE + 5000,
                    base=raw,
                    base_format="raw",
                    block_size=4096,
                    chunk_size=64 * KiB,
                )
                with fvd.open(mid, "r+") as m:
                    m.write(300 * KiB + 7, b"mid" * 1000)
                    base_content[300 * KiB + 7 : 300 * KiB + 3007] = b"mid" * 1000
                    m.write(BASE_SIZE, b"E" * 100)
                base_content += bytearray(5000)
                base_content[BASE_SIZE : BASE_SIZE + 100] = b"E" * 100
                self.base_path = mid
            else:
                self.base_path = raw
            fvd.create(
                path,
                SIZE,
                base="m/" + os.path.basename(self.base_path),
                base_format=base_kind,
                block_size=BLOCK,
                chunk_size=CHUNK,
                journal_size=64 * KiB,
            )
            recorder.snapshot_now()
            self.cor = cor
            self.img = fvd.open(path, "r+", cache=cache, copy_on_read=cor)
            self.model = bytearray(SIZE)
            self.model[: len(base_content)] = base_content
            self.durable = bytearray(self.model)
            self.between = []  # writeback: states acknowledged since the last flush
            self.seed = seed * 1000

        def _ack(self):
            if cache == "writethrough":
                self.durable[:] = self.model
            else:
                self.between.append(bytes(self.model))

        def _durable_now(self):
            self.durable[:] = self.model
            self.between = []

        @rule()
        def flush(self):
            self.img.flush()
            self._durable_now()

        @rule(cor=st.booleans())
        def reopen(self, cor):
            self.img.close()
            self.img = fvd.open(path, "r+", cache=cache, copy_on_read=cor)
            self._durable_now()

        @rule()
        def power_cut(self):
            self.img._crash()
            recorder.power_cut()
            self.img = fvd.open(path, "r+", cache=cache, copy_on_read=self.cor)
            assert self.img.read(0, SIZE) == self.durable
            self.model[:] = self.durable
            self.between = []

        @rule()
        def process_crash(self):
            self.img._crash()
            self.img = fvd.open(path, "r+", cache=cache, copy_on_read=self.cor)
            got = self.img.read(0, SIZE)
            assert_old_or_new(got, self.model, self.durable, self.between)
            self.model[:] = got
            self._durable_now()

        @rule(
            writes=st.lists(
                st.tuples(st.integers(0, SIZE - 1), st.integers(1, 40 * KiB)), max_size=6
            )
        )
        def prefetch_with_writer(self, writes):
            todo = []
            for off, n in writes:
                n = min(n, SIZE - off)
                self.seed += 1
                todo.append((off, pattern(self.seed, n)))

            def writer():
                for off, data in todo:
                    self.img.write(off, data)

            t = threading.Thread(target=writer)
            t.start()
            self.img.prefetch(step=32 * KiB, min_rate=0)
            t.join()
            for off, data in todo:
                self.model[off : off + len(data)] = data
            self._ack()
            assert self.img._core.base_layer is None
            assert self.img.read(0, SIZE) == self.model
            moved = self.base_path + ".away"
            os.rename(self.base_path, moved)
            try:
                self.img.close()
                self.img = fvd.open(path, "r+", cache=cache)
                self._durable_now()
                assert self.img.read(0, SIZE) == self.model
            finally:
                os.rename(moved, self.base_path)

        @rule(stop_after=st.integers(1, 5))
        def crash_during_prefetch(self, stop_after):
            calls = []

            def progress(done, total):
                calls.append(done)
                if len(calls) > stop_after:
                    raise KeyboardInterrupt

            try:
                self.img.prefetch(progress, step=16 * KiB, min_rate=0)
            except KeyboardInterrupt:
                pass
            self.img._crash()
            self.img = fvd.open(path, "r+", cache=cache, copy_on_read=self.cor)
            got = self.img.read(0, SIZE)
            assert_old_or_new(got, self.model, self.durable, self.between)
            self.model[:] = got
            self._durable_now()

        def teardown(self):
            if hasattr(self, "img"):
                self.img.close()
                with fvd.open(path) as img:
                    assert img.read(0, SIZE) == self.model
                    result = img.check()
                    assert result.corruptions == 0, result.messages

    return BaseMachine


@pytest.mark.parametrize(
    "cache,base_kind",
    [("writeback", "raw"), ("writethrough", "raw"), ("writeback", "fvd"), ("writethrough", "fvd")],
)
def test_base_against_model(tmp_path, monkeypatch, cache, base_kind):
    tmp = str(tmp_path / "m")
    os.mkdir(tmp)
    path = str(tmp_path / "img.fvd")
    recorder = DurableRecorder(monkeypatch, path)
    machine = make_base_machine(tmp, recorder, path, cache, base_kind)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=int(os.environ.get("FVD_BASE_EXAMPLES", "5")),
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
