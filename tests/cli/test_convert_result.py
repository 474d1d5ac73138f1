"""What `fvd.convert` returns (ConvertResult), `fvd convert -p --output=json`, and a
closed stdout pipe. Oracles: counts worked out by hand for a known image; `qemu-img
compare` of every output with the expected bytes and `qemu-img check` of qcow2 ones."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

import fvd
from fvd.units import KiB, MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

SIZE = 4 * MiB


def qemu_img(*args):
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def known_raw(tmp_path):
    """Data [0, 64K) and [1M, 1M + 12K) whose middle 4 KiB page is zero; holes
    elsewhere: 2 data extents (76 KiB read), 72 KiB of non-zero data, 2 holes."""
    p = tmp_path / "src.raw"
    ref = bytearray(SIZE)
    ref[0 : 64 * KiB] = os.urandom(64 * KiB)
    ref[MiB : MiB + 4 * KiB] = os.urandom(4 * KiB)
    ref[MiB + 8 * KiB : MiB + 12 * KiB] = os.urandom(4 * KiB)
    with open(p, "wb") as f:
        f.truncate(SIZE)
        f.write(ref[0 : 64 * KiB])
        f.seek(MiB)
        f.write(ref[MiB : MiB + 12 * KiB])
    return p, bytes(ref)


def check_output(tmp_path, out, fmt, ref):
    want = tmp_path / "want.raw"
    want.write_bytes(ref)
    if fmt == "fvd":
        raw = tmp_path / "export.raw"
        fvd.convert(out, raw, dst_format="raw")
        out, fmt = raw, "raw"
    if fmt == "qcow2":
        qemu_img("check", out)
    qemu_img("compare", "-f", fmt, "-F", "raw", out, want)


@pytest.mark.parametrize("dst_format", ["fvd", "qcow2", "raw"])
def test_result_counts_exact(tmp_path, dst_format):
    src, ref = known_raw(tmp_path)
    out = tmp_path / f"out.{dst_format}"
    result = fvd.convert(src, out, dst_format=dst_format)
    assert isinstance(result, fvd.ConvertResult)
    assert (result.bytes_read, result.bytes_written) == (76 * KiB, 72 * KiB)
    assert (result.extents, result.zero_ranges) == (2, 2)
    assert result.seconds > 0
    check_output(tmp_path, out, dst_format, ref)


def test_result_fields_in_contract_order():
    names = [f.name for f in dataclasses.fields(fvd.ConvertResult)]
    assert names == ["bytes_read", "bytes_written", "extents", "zero_ranges", "seconds"]
    r = fvd.ConvertResult(1, 2, 3, 4, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.extents = 9  # type: ignore[misc]


def test_result_incremental_counts(tmp_path):
    """An incremental: the changed 64 KiB block (one 4 KiB write, widened to the
    output's block) is read and written; the zeroed chunk is one zero range."""
    src = str(tmp_path / "vm.fvd")
    fvd.create(src, SIZE)
    with fvd.open(src, "r+") as img:
        img.write(0, os.urandom(SIZE))
        img.create_snapshot("s1")
        img.write(MiB + 4 * KiB, b"\x07" * 4 * KiB)
        img.write_zeroes(3 * MiB, MiB)  # a whole chunk: a zero extent
        img.create_snapshot("s2")
        want = img.read(0, SIZE)
    full = tmp_path / "full.fvd"
    fvd.convert(src, full, snapshot="s1")
    inc = tmp_path / "inc.fvd"
    result = fvd.convert(src, inc, snapshot="s2", since="s1", backing="full.fvd")
    assert (result.extents, result.zero_ranges) == (1, 1)
    assert result.bytes_read == result.bytes_written == 64 * KiB
    check_output(tmp_path, inc, "fvd", want)


def run_cli(*argv, **kw):
    return subprocess.run(
        [sys.executable, "-m", "fvd.cli", *map(str, argv)], capture_output=True, text=True, **kw
    )


def test_json_progress_lines_and_result(tmp_path):
    src, ref = known_raw(tmp_path)
    out = tmp_path / "out.qcow2"
    r = run_cli("convert", "-p", "--output=json", "-O", "qcow2", src, out)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    steps, final = lines[:-1], lines[-1]
    assert steps and all(
        set(s) == {"transferred", "elapsed", "description", "size", "percent"} for s in steps
    )
    assert steps[0]["transferred"] == 0 and steps[-1]["percent"] == 100
    assert steps[-1]["transferred"] == steps[-1]["size"] == 76 * KiB
    assert [s["percent"] for s in steps] == sorted({s["percent"] for s in steps})
    assert {k: v for k, v in final.items() if k != "seconds"} == {
        "bytes_read": 76 * KiB,
        "bytes_written": 72 * KiB,
        "extents": 2,
        "zero_ranges": 2,
    }
    check_output(tmp_path, out, "qcow2", ref)


def test_json_result_without_progress(tmp_path):
    src, _ = known_raw(tmp_path)
    r = run_cli("convert", "--output=json", "-O", "raw", src, tmp_path / "out.raw")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1
    assert json.loads(r.stdout)["extents"] == 2


def test_closed_stdout_pipe_is_quiet(tmp_path):
    """`fvd map --output=json big | head -1`: far more output than a pipe buffer, the
    reader goes after one line: no message, exit 0 or 141 (128 + SIGPIPE), not 1."""
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(16 * MiB)
        for off in range(0, 16 * MiB, 8 * KiB):
            f.seek(off)
            f.write(b"\x01" * 4 * KiB)  # 4096 extents: ~400 KB of JSON
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fvd.cli", "map", "-f", "raw", "--output=json", str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert first.startswith(b"[")
    assert err == ""
    assert code in (0, 141)
