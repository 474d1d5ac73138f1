"""NBD rows (fvd.bench.nbd): `fvd serve` vs qemu-nbd (nbdcopy sequential copy, 4 KiB random
reads) and prefetch over a rate-limited, delayed link beside a foreground reader.

    pytest bench/test_nbd_bench.py --benchmark-only --benchmark-group-by=group
    FVD_NBD_BENCH_MB=1024 pytest bench/test_nbd_bench.py --benchmark-only   # 1 GiB copy
    python -m fvd.bench.nbd                                                 # the table

Sizes: FVD_NBD_BENCH_MB (default 256) for the copy, FVD_NBD_LINK_MB (default 32) for the
base behind the slow link; 8 MiB and 4 MiB under --benchmark-disable (CI smoke). Figures
are recorded in extra_info; no timed assertions (prefetch completion is checked).
"""

import os
import statistics

import pytest

from fvd.bench import nbd as bn

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory, smoke):
    try:
        bn.require("nbdkit", "nbdcopy", "qemu-nbd", "qemu-img")
    except bn.Unavailable as e:
        pytest.skip(str(e))
    mb = 8 if smoke else int(os.environ.get("FVD_NBD_BENCH_MB", "256"))
    d = str(tmp_path_factory.mktemp("nbdbench"))
    return d, bn.make_images(d, mb * MiB)


@pytest.mark.parametrize("server", ["fvd serve", "qemu-nbd"])
def test_nbdcopy_sequential(benchmark, images, server):
    d, imgs = images
    start = dict(bn.servers(imgs, d))[server]
    benchmark.group = "nbd-seq-copy"
    with start() as srv:
        benchmark.pedantic(bn.seq_copy, args=(srv.uri, 1), rounds=3)
    benchmark.extra_info.update({"server": server, "bytes": imgs["size"]})


@pytest.mark.parametrize("server", ["fvd serve", "qemu-nbd"])
def test_random_4k_reads(benchmark, images, server, smoke):
    d, imgs = images
    start = dict(bn.servers(imgs, d))[server]
    count = 50 if smoke else 2000
    benchmark.group = "nbd-read4k"
    lat = []
    with start() as srv:
        benchmark.pedantic(
            lambda: lat.extend(bn.random_reads(srv.uri, imgs["size"], count)), rounds=1
        )
    benchmark.extra_info.update(
        {"server": server, "reads": len(lat), "median_us": statistics.median(lat) * 1e6}
    )


def test_prefetch_over_slow_link(benchmark, tmp_path, smoke):
    try:
        bn.require("nbdkit")
    except bn.Unavailable as e:
        pytest.skip(str(e))
    mb = 4 if smoke else int(os.environ.get("FVD_NBD_LINK_MB", "32"))
    reads = 20 if smoke else 200
    benchmark.group = "nbd-prefetch-slow-link"
    rows = benchmark.pedantic(
        bn.prefetch_rows,
        args=(str(tmp_path), mb * MiB, reads),
        kwargs={"rate": "40M" if not smoke else "400M"},
        rounds=1,
    )
    for r in rows:
        benchmark.extra_info[r["mode"]] = r
        if r["mode"] != "none":
            assert r["prefetch_complete"], r
