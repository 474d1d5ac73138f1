"""Base images: reading through an image whose data is all in the base, side by side with
reading the base file directly; prefetch of a large base side by side with `cp`.

    pytest bench/test_base_bench.py --benchmark-only --benchmark-group-by=group
    FVD_PREFETCH_MB=1024 pytest bench/test_base_bench.py --benchmark-only -k prefetch

Sizes: FVD_BASE_READ_MB (default 64) for the read groups, FVD_PREFETCH_MB (default 256)
for prefetch; a quarter (at most 16 MiB) under --benchmark-disable, the CI smoke test.
No timed assertions.
"""

import os
import random
import shutil
import subprocess

import pytest

import fvd
from fvd import _impl

MiB = 1 << 20


def _mb(smoke, name, default):
    mb = int(os.environ.get(name, default))
    return min(16, max(1, mb // 4)) if smoke else mb


@pytest.fixture(scope="module")
def base_file(tmp_path_factory, smoke):
    size = _mb(smoke, "FVD_BASE_READ_MB", 64) * MiB
    d = tmp_path_factory.mktemp("basebench")
    path = str(d / "base.raw")
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(random.Random(i).randbytes(MiB))
    return path, size


def _select(impl):
    if impl not in _impl.MODULES:
        pytest.skip(f"{impl} implementation not built")
    _impl.select(impl)


@pytest.fixture
def image_over_base(base_file, tmp_path):
    base, size = base_file
    path = str(tmp_path / "top.fvd")
    fvd.create(path, size, base=base, base_format="raw")
    return path, base, size


def _seq_image(img, size, buf):
    for off in range(0, size, MiB):
        img.readinto(off, buf)
    return size


def _seq_file(fd, size, buf):
    for off in range(0, size, MiB):
        os.preadv(fd, [buf], off)
    return size


def _offsets(size, n=2048):
    rng = random.Random(5)
    return [rng.randrange(0, size // 4096) * 4096 for _ in range(n)]


@pytest.mark.parametrize("who", ["fvd-cython", "fvd-python", "base-file"])
def test_base_read_seq1m(benchmark, who, image_over_base):
    path, base, size = image_over_base
    benchmark.group = "base-read-seq1m"
    buf = bytearray(MiB)
    if who == "base-file":
        fd = os.open(base, os.O_RDONLY)
        try:
            benchmark(_seq_file, fd, size, buf)
        finally:
            os.close(fd)
    else:
        _select(who.split("-")[1])
        with fvd.open(path) as img:
            benchmark(_seq_image, img, size, buf)
            assert img.stats.data_reads == 0  # everything came from the base
    benchmark.extra_info.update({"bytes_per_round": size})


@pytest.mark.parametrize("who", ["fvd-cython", "fvd-python", "base-file"])
def test_base_read_rand4k(benchmark, who, image_over_base):
    path, base, size = image_over_base
    benchmark.group = "base-read-rand4k"
    offs = _offsets(size)
    buf = bytearray(4096)
    if who == "base-file":
        fd = os.open(base, os.O_RDONLY)
        try:
            benchmark(lambda: [os.preadv(fd, [buf], o) for o in offs])
        finally:
            os.close(fd)
    else:
        _select(who.split("-")[1])
        with fvd.open(path) as img:
            benchmark(lambda: [img.readinto(o, buf) for o in offs])
    benchmark.extra_info.update({"ops_per_round": len(offs)})


@pytest.fixture(scope="module")
def big_base(tmp_path_factory, smoke):
    size = _mb(smoke, "FVD_PREFETCH_MB", 256) * MiB
    d = tmp_path_factory.mktemp("prefetchbench")
    path = str(d / "big.raw")
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(random.Random(i).randbytes(MiB))
    return path, size


@pytest.mark.parametrize("who", ["fvd-prefetch", "cp"])
def test_base_prefetch(benchmark, who, big_base, tmp_path):
    base, size = big_base
    benchmark.group = "base-prefetch"
    target = str(tmp_path / "copy")
    counter = [0]

    def setup():
        # Every round starts with no dirty pages (earlier rounds' copies removed, then
        # sync), so neither side pays for the other's writeback.
        for old in range(1, counter[0] + 1):
            if os.path.exists(f"{target}{old}"):
                os.unlink(f"{target}{old}")
        os.sync()
        counter[0] += 1
        p = f"{target}{counter[0]}"
        if who == "cp":
            return (p,), {}
        fvd.create(p, size, base=base, base_format="raw")
        return (fvd.open(p, "r+"),), {}

    def run_cp(p):
        subprocess.run(["cp", base, p], check=True)
        fd = os.open(p, os.O_RDONLY)  # prefetch ends durable: so does the copy
        os.fsync(fd)
        os.close(fd)

    def run_prefetch(img):
        img.prefetch(min_rate=0)
        img.close()

    if who == "cp" and not shutil.which("cp"):
        pytest.skip("no cp")
    fn = run_cp if who == "cp" else run_prefetch
    benchmark.pedantic(fn, setup=setup, rounds=int(os.environ.get("FVD_BENCH_ROUNDS", "3")))
    benchmark.extra_info.update({"bytes": size})
