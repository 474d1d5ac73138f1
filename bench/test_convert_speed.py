"""Convert speed, like with like: every row of fvd/bench/convert.py (fvd convert) beside
its qemu-img peer writing the same output format from the same data, in one benchmark
group per row so the two sit side by side: imports, exports, raw -> qcow2, fvd -> qcow2
and the restore of a 5-deep qcow2 chain to raw, durable (fvd's default: flush, then
rename; qemu-img -t writeback) and -t unsafe (nothing flushed; the page cache is synced
before each round, outside the timing). Size: scale.convert_mib (128 MiB at scale 1,
32 MiB in the CI smoke run). `python -m fvd.bench.convert` prints the same comparison
with both commands spelled out.

    pytest bench/test_convert_speed.py --benchmark-only --benchmark-group-by=group
"""

import os
import shutil
import subprocess

import pytest

from fvd import convert
from fvd.bench.convert import ROWS, make_sources, qemu_args

ROW_IDS = [r[0] for r in ROWS]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, scale):
    return make_sources(str(tmp_path_factory.mktemp("convert-speed")), scale.convert_mib)


def _bench(benchmark, tmp_path, cache, smoke, fn):
    out = str(tmp_path / "out")

    def setup():
        if os.path.exists(out):
            os.unlink(out)
        if cache == "unsafe" and not smoke:
            os.sync()  # earlier rounds' dirty pages are not this round's cost

    benchmark.pedantic(lambda: fn(out), setup=setup, rounds=1 if smoke else 3, iterations=1)
    assert os.path.exists(out)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_fvd_convert(benchmark, tmp_path, sources, smoke, row):
    key, _title, sfmt, dfmt, _peer, cache = row
    benchmark.group = key
    fmt = "qcow2" if sfmt == "chain" else sfmt
    _bench(
        benchmark,
        tmp_path,
        cache,
        smoke,
        lambda out: convert(sources[sfmt], out, src_format=fmt, dst_format=dfmt, cache=cache),
    )


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_qemu_img_convert(benchmark, tmp_path, sources, smoke, row):
    key, _title, sfmt, dfmt, _peer, cache = row
    benchmark.group = key
    _bench(
        benchmark,
        tmp_path,
        cache,
        smoke,
        lambda out: subprocess.run(
            ["qemu-img", *qemu_args(sources, sfmt, dfmt, cache, out)],
            check=True,
            capture_output=True,
        ),
    )
