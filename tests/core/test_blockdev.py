"""Images on block devices (docs/format.md, "Block devices"), on real loop devices."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

import fvd
from fvd.errors import ImageIOError
from fvd.units import KiB, MiB

CHUNK = MiB
JOURNAL = 64 * KiB


def _loop_unavailable():
    if sys.platform != "linux" or os.geteuid() != 0:
        return "loop devices need root on Linux"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop driver not available here)"
    if shutil.which("losetup") is None:
        return "losetup is not installed"
    return None


class Loop:
    """A loop device over a file: `dev`, `backing`; grow() as `truncate` + `losetup -c`."""

    def __init__(self, backing, size, fill=None):
        self.backing = str(backing)
        with open(self.backing, "wb") as f:
            if fill is None:
                f.truncate(size)
            else:
                f.write(bytes([fill]) * size)  # stale bytes a new image must not expose
        run = subprocess.run(
            ["losetup", "-f", "--show", self.backing], capture_output=True, text=True
        )
        if run.returncode != 0:
            pytest.skip(f"losetup cannot attach a loop device here: {run.stderr.strip()}")
        self.dev = run.stdout.strip()

    def grow(self, size):
        os.truncate(self.backing, size)
        subprocess.run(["losetup", "-c", self.dev], check=True)

    def detach(self):
        subprocess.run(["losetup", "-d", self.dev], check=False)


@pytest.fixture
def loop(tmp_path):
    reason = _loop_unavailable()
    if reason:
        pytest.skip(reason)
    made = []

    def make(size=48 * MiB, fill=None):
        lo = Loop(tmp_path / f"backing{len(made)}", size, fill)
        made.append(lo)
        return lo

    yield make
    for lo in made:
        lo.detach()


def _create(dev, size=256 * MiB, **kw):
    fvd.create(dev, size, chunk_size=CHUNK, journal_size=JOURNAL, **kw)


def _assert_clean(dev):
    with fvd.open(dev, "r") as img:
        result = img.check()
    assert result.corruptions == 0 and result.leaks == 0, result.messages


def test_create_write_reopen_check(impl, loop):
    lo = loop()
    _create(lo.dev)
    with fvd.open(lo.dev, "r+") as img:
        img.write(0, b"a" * 4096)
        img.write(100 * MiB + 12345, b"b" * 70000)
        assert img.info()["block-device"] is True
    with fvd.open(lo.dev, "r") as img:
        assert img.read(0, 4096) == b"a" * 4096
        assert img.read(100 * MiB + 12345, 70000) == b"b" * 70000
        assert img.read(50 * MiB, 4096) == bytes(4096)
    _assert_clean(lo.dev)


def test_stale_device_bytes_never_show(impl, loop):
    """The device held other bytes: metadata and new chunks read as zeros anyway."""
    lo = loop(fill=0xAB)
    _create(lo.dev)
    with fvd.open(lo.dev, "r+") as img:
        assert img.read(0, 4096) == bytes(4096)  # unallocated: no chunk at all
        img.write(3 * MiB + 4096, b"c" * 512)  # allocates a chunk from the device's tail
        chunk = img.read(3 * MiB, CHUNK)
    assert chunk == bytes(4096) + b"c" * 512 + bytes(CHUNK - 4096 - 512)
    _assert_clean(lo.dev)


@pytest.mark.parametrize("cache", ["writethrough", "writeback"])
def test_device_full_is_enospc_and_loses_nothing(impl, loop, cache):
    lo = loop(24 * MiB)
    _create(lo.dev)
    written = []
    with fvd.open(lo.dev, "r+", cache=cache) as img:
        with pytest.raises(ImageIOError) as exc:
            for v in range(256):
                img.write(v * CHUNK, bytes([v + 1]) * 4096)
                img.flush()
                written.append(v)
        assert exc.value.errno == errno.ENOSPC
        assert lo.dev in str(exc.value) and "block device full" in str(exc.value)
        assert written  # some chunks fitted before the end
        img.write(0, b"z" * 100)  # an allocated chunk still takes writes
    with fvd.open(lo.dev, "r") as img:
        for v in written[1:]:
            assert img.read(v * CHUNK, 4096) == bytes([v + 1]) * 4096
        assert img.read(0, 100) == b"z" * 100
    _assert_clean(lo.dev)


def test_grown_device_picked_up(impl, loop):
    lo = loop(24 * MiB)
    _create(lo.dev)
    with fvd.open(lo.dev, "r+", cache="writethrough") as img:
        with pytest.raises(ImageIOError):
            for v in range(256):
                img.write(v * CHUNK, b"x" * 512)
        full_at = v
        lo.grow(32 * MiB)
        img.resize(img.size)  # same size: picks up the grown device
        img.write(full_at * CHUNK, b"y" * 512)
    lo.grow(40 * MiB)
    with fvd.open(lo.dev, "r+") as img:  # and at the next open
        for v in range(full_at + 1, full_at + 12):
            img.write(v * CHUNK, b"w" * 512)
    with fvd.open(lo.dev, "r") as img:
        assert img.read(full_at * CHUNK, 512) == b"y" * 512
        assert img.read((full_at + 11) * CHUNK, 512) == b"w" * 512
    _assert_clean(lo.dev)


def test_zeroed_chunks_are_zeroed_on_the_device_and_reused(impl, loop):
    lo = loop()
    _create(lo.dev)
    with fvd.open(lo.dev, "r+", cache="writethrough") as img:
        for v in range(4):
            img.write(v * CHUNK, b"q" * CHUNK)
        img.write_zeroes(CHUNK, 2 * CHUNK)  # unmaps chunks 1 and 2: BLKZEROOUT on the device
        end = img.info()["image-end-offset"]
    _assert_clean(lo.dev)  # a freed chunk holding data would be a leak
    with fvd.open(lo.dev, "r+") as img:
        assert img.read(CHUNK, 2 * CHUNK) == bytes(2 * CHUNK)
        img.write(10 * CHUNK + 100, b"r" * 100)  # reuses a freed chunk: the rest is zeros
        assert img.read(10 * CHUNK, CHUNK) == bytes(100) + b"r" * 100 + bytes(CHUNK - 200)
        assert img.info()["image-end-offset"] == end  # compact: no new chunk at the end
    _assert_clean(lo.dev)


def test_create_refuses_small_device_and_existing_image(loop):
    lo = loop(8 * MiB)
    with pytest.raises(ImageIOError) as exc:
        fvd.create(lo.dev, MiB, chunk_size=CHUNK)  # 16 MiB journal: more than the device
    assert exc.value.errno == errno.ENOSPC and lo.dev in str(exc.value)
    _create(lo.dev, size=16 * MiB)
    with pytest.raises(ImageIOError) as exc:
        _create(lo.dev, size=16 * MiB)
    assert exc.value.errno == errno.EEXIST
    _create(lo.dev, size=32 * MiB, overwrite=True)
    with fvd.open(lo.dev) as img:
        assert img.size == 32 * MiB


def test_cli_create_info_check_resize(loop):
    lo = loop(24 * MiB)

    def cli(*args):
        run = subprocess.run(
            [sys.executable, "-m", "fvd.cli", *args], capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    cli("create", "-f", "fvd", "-o", "journal_size=65536", lo.dev, "64M")
    info = json.loads(cli("info", "--output=json", lo.dev))
    assert info["format-specific"]["data"]["block-device"] is True
    assert "block device: true" in cli("info", lo.dev)
    lo.grow(40 * MiB)
    cli("resize", lo.dev, "+0")
    cli("check", lo.dev)


def test_snapshots_on_a_device(impl, loop):
    lo = loop(fill=0x5A)
    _create(lo.dev)
    with fvd.open(lo.dev, "r+") as img:
        img.write(0, b"1" * 8192)
        img.create_snapshot("s")
        img.write(0, b"2" * 4096)  # copy on write into a chunk from the device's tail
        img.write(40 * MiB, b"3" * 100)
    with fvd.open(lo.dev, "r+") as img:
        with img.open_snapshot("s") as snap:
            assert snap.read(0, 8192) == b"1" * 8192
            assert snap.read(40 * MiB, 100) == bytes(100)
        assert img.read(0, 8192) == b"2" * 4096 + b"1" * 4096
        img.delete_snapshot("s")
    _assert_clean(lo.dev)


@pytest.mark.parametrize("cache", ["writethrough", "writeback"])
def test_crash_on_a_device_keeps_acknowledged_writes(impl, loop, cache):
    """The handle dropped without a close: replay, scrub and checkpoint on a device
    (no ftruncate there), every acknowledged write back, and free chunks zeroed."""
    lo = loop(fill=0xEE)
    _create(lo.dev)
    img = fvd.open(lo.dev, "r+", cache=cache)
    for v in range(6):
        img.write(v * CHUNK + 512, bytes([v + 1]) * 4096)
    img.write_zeroes(2 * CHUNK, CHUNK)
    img.flush()  # acknowledged
    img.write(9 * CHUNK, b"u" * 4096)  # writeback: maybe lost, never garbage
    img._crash()
    with fvd.open(lo.dev, "r+") as img:
        for v in (0, 1, 3, 4, 5):
            assert img.read(v * CHUNK + 512, 4096) == bytes([v + 1]) * 4096
        assert img.read(2 * CHUNK, CHUNK) == bytes(CHUNK)
        assert img.read(9 * CHUNK, 4096) in (b"u" * 4096, bytes(4096))
        assert img.read(9 * CHUNK + 4096, 4096) == bytes(4096)
    _assert_clean(lo.dev)
