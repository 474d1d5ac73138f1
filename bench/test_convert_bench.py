"""fvd convert beside qemu-img convert (the convert rows of `fvd bench`): a sparse raw
image with 30% random data, imported and exported. Size: scale.convert_mib (128 MiB in
`--quick`, 32 MiB in the CI smoke run).

    pytest bench/test_convert_bench.py --benchmark-only --benchmark-group-by=group
"""

import os
import shutil
import subprocess

import pytest

from fvd import convert
from fvd.bench.convert import make_source


@pytest.fixture(scope="module")
def sources(tmp_path_factory, scale):
    d = tmp_path_factory.mktemp("convert")
    src = {"raw": str(d / "src.raw"), "fvd": str(d / "src.fvd"), "qcow2": str(d / "src.qcow2")}
    make_source(src["raw"], scale.convert_mib)
    convert(src["raw"], src["fvd"])
    convert(src["raw"], src["qcow2"], dst_format="qcow2")
    return src


def _bench(benchmark, tmp_path, fn):
    out = str(tmp_path / "out")

    def setup():
        if os.path.exists(out):
            os.unlink(out)

    benchmark.pedantic(lambda: fn(out), setup=setup, rounds=1, iterations=1)
    assert os.path.exists(out)


@pytest.mark.parametrize(
    "src_fmt,dst_fmt", [("raw", "fvd"), ("qcow2", "fvd"), ("fvd", "raw"), ("fvd", "qcow2")]
)
def test_fvd_convert(benchmark, tmp_path, sources, src_fmt, dst_fmt):
    benchmark.group = "convert-import" if dst_fmt == "fvd" else "convert-export"
    _bench(
        benchmark,
        tmp_path,
        lambda out: convert(sources[src_fmt], out, src_format=src_fmt, dst_format=dst_fmt),
    )


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
@pytest.mark.parametrize("src_fmt,dst_fmt", [("raw", "qcow2"), ("qcow2", "raw")])
def test_qemu_img_convert(benchmark, tmp_path, sources, src_fmt, dst_fmt):
    benchmark.group = "convert-import" if src_fmt == "raw" else "convert-export"
    _bench(
        benchmark,
        tmp_path,
        lambda out: subprocess.run(
            [
                "qemu-img",
                "convert",
                "-t",
                "writeback",
                "-f",
                src_fmt,
                "-O",
                dst_fmt,
                sources[src_fmt],
                out,
            ],
            check=True,
            capture_output=True,
        ),
    )
