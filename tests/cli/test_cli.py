"""The `fvd` command line end to end, as a user runs it (in-process `main` and one
subprocess run of the installed entry point)."""

import json
import os
import subprocess
import sys

import pytest

import fvd
from fvd.cli import main, parse_size
from fvd.units import MiB


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "text,value",
    [
        ("512", 512),
        ("64K", 65536),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("10M", 10 * MiB),
        ("4kib", 4096),
    ],
)
def test_sizes(text, value):
    assert parse_size(text) == value


def test_create_info_check_map(tmp_path, capsys):
    img = tmp_path / "a.fvd"
    code, out, _ = run(capsys, "create", "-o", "chunk_size=64K,block_size=4K", img, "8M")
    assert code == 0 and "fmt=fvd" in out
    with fvd.open(img, "r+") as f:
        f.write(MiB, b"x" * 70000)
    code, out, _ = run(capsys, "info", "--output=json", img)
    info = json.loads(out)
    assert code == 0 and info["virtual-size"] == 8 * MiB and info["chunk-size"] == 65536
    assert info["allocated-chunks"] == 2 and info["clean-shutdown"]
    code, out, _ = run(capsys, "check", "--output=json", img)
    assert code == 0 and json.loads(out)["ok"]
    code, out, _ = run(capsys, "map", "--output=json", img)
    extents = json.loads(out)
    assert sum(e["length"] for e in extents) == 8 * MiB
    assert [e["data"] for e in extents] == [False, True, False]
    code, out, _ = run(capsys, "map", img)
    assert code == 0 and "Offset" in out


def test_check_exit_codes(tmp_path, capsys):
    img = tmp_path / "b.fvd"
    fvd.create(img, 8 * MiB)
    with fvd.open(img, "r+") as f:
        f.write(0, b"y" * 4096)
        data_offset = f._core.header.data_offset
    with open(img, "r+b") as f:  # data nobody maps: a leak
        f.seek(data_offset + 5 * MiB)
        f.write(b"z" * 4096)
    assert run(capsys, "check", img)[0] == 3
    assert run(capsys, "check", "-r", "all", img)[0] == 0
    assert run(capsys, "check", img)[0] == 0
    with open(img, "r+b") as f:  # a damaged header: corruption
        f.seek(40)
        f.write(b"\xff")
    code, out, _ = run(capsys, "check", img)
    assert code == 2 and "checksum" in out


def test_snapshot_commands(tmp_path, capsys):
    img = tmp_path / "s.fvd"
    fvd.create(img, 4 * MiB)
    with fvd.open(img, "r+") as f:
        f.write(0, b"one")
    assert run(capsys, "snapshot", "-c", "first", img)[0] == 0
    with fvd.open(img, "r+") as f:
        f.write(0, b"two")
    code, out, _ = run(capsys, "snapshot", "-l", "--output=json", img)
    assert code == 0 and [s["name"] for s in json.loads(out)] == ["first"]
    assert run(capsys, "snapshot", "-a", "first", img)[0] == 0
    with fvd.open(img) as f:
        assert f.read(0, 3) == b"one"
    code, out, _ = run(capsys, "info", img)
    assert "first" in out
    code, _, err = run(capsys, "snapshot", "-d", "nope", img)
    assert code == 1 and err.count("\n") == 1 and "nope" in err
    assert run(capsys, "snapshot", "-d", "first", img)[0] == 0


def test_base_and_prefetch_commands(tmp_path, capsys):
    base = tmp_path / "golden.raw"
    base.write_bytes(os.urandom(3 * MiB + 123))
    img = tmp_path / "vm.fvd"
    code, out, _ = run(capsys, "create", "-b", base, "-F", "raw", img)
    assert code == 0
    info = json.loads(run(capsys, "info", "--output=json", img)[1])
    assert info["virtual-size"] == 3 * MiB + 123
    assert info["backing-filename-format"] == "raw" and not info["base-prefetched"]
    extents = json.loads(run(capsys, "map", "--output=json", img)[1])
    assert {e["depth"] for e in extents} == {1}
    code, _, err = run(capsys, "prefetch", "-p", img)
    assert code == 0 and "(100.00/100%)" in err
    assert json.loads(run(capsys, "info", "--output=json", img)[1])["base-prefetched"]
    expected = base.read_bytes()
    base.rename(tmp_path / "gone.raw")
    with fvd.open(img) as f:
        assert f.read(0, f.size) == expected


def test_errors_are_one_line(tmp_path, capsys):
    for argv in (
        ["info", tmp_path / "missing.fvd"],
        ["create", tmp_path / "x.fvd", "10Q"],
        ["create", "-o", "chunk_size=3M", tmp_path / "x.fvd", "1G"],
        ["create", "-b", tmp_path / "nothere", "-F", "raw", tmp_path / "y.fvd", "1G"],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    img = tmp_path / "locked.fvd"
    fvd.create(img, MiB)
    with fvd.open(img, "r+"):
        code, _, err = run(capsys, "info", img)
        assert code == 1 and "open for writing" in err
        assert run(capsys, "info", "-U", img)[0] == 0


def test_installed_entry_point(tmp_path):
    img = tmp_path / "e.fvd"
    r = subprocess.run(
        [sys.executable, "-m", "fvd.cli", "create", str(img), "1M"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "fvd.cli", "info", "--output=json", str(img)],
        capture_output=True,
        text=True,
    )
    assert json.loads(r.stdout)["virtual-size"] == MiB


def test_check_an_image_whose_base_is_gone(tmp_path, capsys):
    base = tmp_path / "golden.raw"
    base.write_bytes(os.urandom(2 * MiB))
    img = tmp_path / "vm.fvd"
    fvd.create(img, 2 * MiB, base=str(base), base_format="raw")
    with fvd.open(img, "r+") as f:
        f.write(100, b"mine")
    base.unlink()
    with pytest.raises(fvd.BaseImageError):
        fvd.open(img)
    code, out, _ = run(capsys, "check", img)
    assert code == 0 and "checked alone" in out
