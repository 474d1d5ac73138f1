"""fvd commit / compare beside qemu-img commit / compare, like with like: the same qcow2
chain for both tools (and an fvd chain for fvd alone). The base holds scale.convert_mib
MiB of data (128 MiB at scale 1, 32 MiB in the CI smoke run); the overlay rewrites 5% of
its 64 KiB clusters at random. Every round commits fresh copies (copying is setup).

    pytest bench/test_chain_bench.py --benchmark-only --benchmark-group-by=group
"""

import os
import random
import shutil
import subprocess

import pytest

import fvd
from fvd import chain

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
CLUSTER = 64 * 1024


def _qemu(*args):
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def chains(tmp_path_factory, scale):
    """{"qcow2": (base, top), "fvd": (base, top), "copy": full qcow2 copy of the top}."""
    d = tmp_path_factory.mktemp("chain")
    size = scale.convert_mib << 20
    raw = str(d / "base.raw")
    rng = random.Random(20)
    with open(raw, "wb") as f:
        for _ in range(size >> 20):
            f.write(rng.randbytes(1 << 20))
    clusters = sorted(rng.sample(range(size // CLUSTER), size // CLUSTER // 20))
    out = {}
    _qemu("qemu-img", "convert", "-O", "qcow2", raw, d / "base.qcow2")
    _qemu("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2")
    fvd.convert(raw, str(d / "base.fvd"))
    fvd.create(str(d / "top.fvd"), size, base="base.fvd", base_format="fvd")
    with fvd.qcow2.open(str(d / "top.qcow2"), "r+") as q, fvd.open(str(d / "top.fvd"), "r+") as v:
        for c in clusters:
            data = rng.randbytes(CLUSTER)
            q.write(c * CLUSTER, data)
            v.write(c * CLUSTER, data)
    out["qcow2"] = (str(d / "base.qcow2"), str(d / "top.qcow2"))
    out["fvd"] = (str(d / "base.fvd"), str(d / "top.fvd"))
    _qemu("qemu-img", "convert", "-O", "qcow2", d / "top.qcow2", d / "copy.qcow2")
    out["copy"] = str(d / "copy.qcow2")
    return out


def _commit_rounds(benchmark, tmp_path, pair, run, rounds):
    base, top = pair
    work_base = str(tmp_path / os.path.basename(base))
    work_top = str(tmp_path / os.path.basename(top))

    def setup():
        shutil.copyfile(base, work_base)
        shutil.copyfile(top, work_top)
        return (work_top,), {}

    benchmark.pedantic(run, setup=setup, rounds=rounds)
    assert chain.compare(work_base, pair[1])  # the committed base reads as the old top


@pytest.mark.parametrize("fmt", ["qcow2", "fvd"])
def test_fvd_commit(benchmark, tmp_path, chains, fmt, rounds):
    benchmark.group = "commit of a 5% incremental"
    benchmark.extra_info["command"] = f"fvd commit ({fmt} chain)"
    _commit_rounds(benchmark, tmp_path, chains[fmt], lambda top: chain.commit(top), rounds)


@needs_qemu
def test_qemu_img_commit(benchmark, tmp_path, chains, rounds):
    benchmark.group = "commit of a 5% incremental"
    benchmark.extra_info["command"] = "qemu-img commit (qcow2 chain)"
    _commit_rounds(
        benchmark, tmp_path, chains["qcow2"], lambda top: _qemu("qemu-img", "commit", "-q", top),
        rounds,
    )  # fmt: skip


@pytest.mark.parametrize("pair", ["qcow2", "fvd"])
def test_fvd_compare(benchmark, chains, pair, rounds):
    benchmark.group = "compare"
    a, b = chains[pair][1], chains["copy"]  # a chain against a qcow2 copy of its contents
    benchmark.extra_info["command"] = f"fvd compare ({pair} chain vs qcow2)"
    same = benchmark.pedantic(chain.compare, args=(a, b), rounds=rounds)
    assert same


@needs_qemu
def test_qemu_img_compare(benchmark, chains, rounds):
    benchmark.group = "compare"
    benchmark.extra_info["command"] = "qemu-img compare (qcow2 chain vs qcow2)"
    a, b = chains["qcow2"][1], chains["copy"]
    benchmark.pedantic(_qemu, args=("qemu-img", "compare", "-q", a, b), rounds=rounds)


@pytest.mark.parametrize("fmt", ["qcow2", "fvd"])
def test_retention(benchmark, tmp_path, scale, fmt):
    """README's retention example: full + 3 nightly incrementals (400 random 4 KiB pages
    a night over scale.convert_mib MiB of data); drop the oldest incremental with
    `commit -d` + `rebase -u`. extra_info has the bytes the commit rewrote and, beside
    them, the size of a new full backup (what rewriting the chain writes)."""
    benchmark.group = "retention: commit the oldest incremental"
    rng = random.Random(7)
    size = scale.convert_mib << 20
    vm, d = str(tmp_path / "vm.fvd"), tmp_path
    fvd.create(vm, 2 * size)
    with fvd.open(vm, "r+") as img:
        for i in range(size >> 20):
            img.write(i << 20, rng.randbytes(1 << 20))
        img.create_snapshot("n1")
    fvd.convert(vm, str(d / f"full.{fmt}"), dst_format=fmt, snapshot="n1")
    prev = f"full.{fmt}"
    for night in (2, 3, 4):
        with fvd.open(vm, "r+") as img:
            for _ in range(400):
                img.write(rng.randrange(size // 4096) * 4096, rng.randbytes(4096))
            img.create_snapshot(f"n{night}")
        out = f"inc{night}.{fmt}"
        fvd.convert(vm, str(d / out), dst_format=fmt, snapshot=f"n{night}",
                    since=f"n{night - 1}", backing=prev, backing_format=fmt)  # fmt: skip
        prev = out
    expected = str(d / "expected.raw")
    fvd.convert(str(d / f"inc4.{fmt}"), expected, dst_format="raw")
    results = []

    def drop_oldest():
        results.append(fvd.commit(str(d / f"inc2.{fmt}"), drop=True))
        fvd.rebase(str(d / f"inc3.{fmt}"), f"full.{fmt}", backing_format=fmt, unsafe=True)
        os.unlink(d / f"inc2.{fmt}")

    benchmark.pedantic(drop_oldest, rounds=1, iterations=1)
    assert chain.compare(str(d / f"inc4.{fmt}"), expected)
    full = fvd.measure(str(d / f"inc4.{fmt}"), out_format=fmt)
    benchmark.extra_info.update(
        command=f"fvd commit -d inc2.{fmt} && fvd rebase -u -b full.{fmt} inc3.{fmt}",
        bytes_written=results[0].bytes_written,
        extents=results[0].extents,
        new_full_backup_bytes=full["required"],
    )
    r = results[0]
    print(f"\n{fmt}: commit rewrote {r.bytes_written} bytes in {r.extents} extents "
          f"({r.seconds:.3f} s); a new full backup needs {full['required']}")  # fmt: skip
