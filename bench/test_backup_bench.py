"""Backup data path (pytest-benchmark): changed extents between two snapshots of a fully
allocated image, extents_array of a huge sparse image, checksum beside ovirt-imageio.

    python -m pytest bench/test_backup_bench.py --benchmark-only --benchmark-group-by=group

Full size (benchmarks enabled): 1 TiB with every 1 MiB chunk allocated (built once into
FVD_BENCH_CACHE, see fvd.bench.backup), 16 TiB sparse, 256 MiB checksummed. Under
--benchmark-disable (CI smoke test): 1 GiB, 1 TiB, 16 MiB. No timed asserts.
"""

import os
import random

import pytest

import fvd
from fvd.bench import backup as bb

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


@pytest.fixture(scope="module")
def sizes(smoke):
    if smoke:
        return {"changed": GiB, "sparse": TiB, "checksum": 16 * MiB}
    return {"changed": TiB, "sparse": 16 * TiB, "checksum": 256 * MiB}


def test_changed_extents_two_snapshots(benchmark, sizes):
    benchmark.group = "backup: changed extents"
    path = bb.changed_image(sizes["changed"])
    with fvd.open(path) as img:
        arr = benchmark(img.changed_extents_array, "s1", "s2")
        nchunks = sizes["changed"] // MiB
        # 10% of the chunks, some adjacent ones merged into one range
        assert 0 < len(arr) <= nchunks // 10
        assert int(arr["length"].sum()) == (nchunks // 10) * MiB
        benchmark.extra_info.update(size=sizes["changed"], ranges=len(arr))


def test_changed_extents_two_snapshots_with_granule_records(benchmark, smoke):
    """10% of the chunks partly rewritten (4 random 4 KiB granules each) between s1 and
    s2: s2's granule record makes the ranges granules, not chunks."""
    benchmark.group = "backup: changed extents"
    size = GiB if smoke else 16 * GiB
    path = bb.granule_image(size)
    with fvd.open(path) as img:
        arr = benchmark(img.changed_extents_array, "s1", "s2")
        nchunks = size // MiB
        assert int(arr["length"].sum()) <= (nchunks // 10) * 4 * 4096
        benchmark.extra_info.update(size=size, ranges=len(arr))


def test_extents_array_huge_sparse(benchmark, sizes):
    benchmark.group = "backup: extents of a huge sparse image"
    path = bb.sparse_image(sizes["sparse"])
    with fvd.open(path) as img:
        arr = benchmark(img.extents_array)
        assert int(arr["length"].sum()) == sizes["sparse"]
        benchmark.extra_info.update(size=sizes["sparse"], extents=len(arr))


@pytest.mark.parametrize("who", ["fvd", "ovirt-imageio"])
def test_checksum(benchmark, sizes, tmp_path, who):
    benchmark.group = "backup: checksum"
    n = sizes["checksum"]
    data = random.Random(1).randbytes(n)
    if who == "fvd":
        path = str(tmp_path / "img.fvd")
        fvd.create(path, n)
        with fvd.open(path, "r+") as img:
            img.write(0, data)
        with fvd.open(path) as img:
            result = benchmark(img.checksum)
    else:
        client = pytest.importorskip("ovirt_imageio.client")
        path = str(tmp_path / "img.raw")
        with open(path, "wb") as f:
            f.write(data)
        result = benchmark(client.checksum, path)
    benchmark.extra_info.update(bytes=n, checksum=result["checksum"])
    os.unlink(path)
