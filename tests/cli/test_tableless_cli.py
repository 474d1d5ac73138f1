"""`fvd create -o table=off`, and info, check, map, convert -o table=off, compare and
the refusals on a table-less image from the command line."""

import json
import os

import fvd
from fvd.cli import main
from fvd.units import MiB


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_create_info_check_map(tmp_path, capsys):
    img = str(tmp_path / "t.fvd")
    assert run(capsys, "create", "-o", "table=off,chunk_size=64K", img, "8M")[0] == 0
    with fvd.open(img, "r+") as i:
        i.write(3 * MiB, b"d" * 8192)
    code, out, _ = run(capsys, "info", img)
    assert code == 0 and "    table: off" in out.splitlines()
    code, out, _ = run(capsys, "info", "--output=json", img)
    data = json.loads(out)["format-specific"]["data"]
    assert data["table"] == "off" and data["table-size"] == 0
    assert data["incompatible-features"] == 0x20 and data["allocated-chunks"] == 1
    assert data["file-length"] == os.path.getsize(img) == data["data-offset"] + 8 * MiB
    code, out, _ = run(capsys, "check", "--output=json", img)
    assert code == 0 and json.loads(out)["check-errors"] == 0
    code, out, _ = run(capsys, "map", "--output=json", img)
    rows = json.loads(out)
    assert [(r["start"], r["data"]) for r in rows] == [
        (0, False),
        (3 * MiB, True),
        (3 * MiB + 8192, False),
    ]
    assert rows[1]["offset"] == data["data-offset"] + 3 * MiB


def test_info_of_a_table_image_says_on(tmp_path, capsys):
    img = str(tmp_path / "t.fvd")
    assert run(capsys, "create", img, "1M")[0] == 0
    code, out, _ = run(capsys, "info", "--output=json", img)
    assert json.loads(out)["format-specific"]["data"]["table"] == "on"


def test_convert_to_tableless_and_back(tmp_path, capsys):
    src, mid, back = (str(tmp_path / n) for n in ("s.fvd", "m.fvd", "b.fvd"))
    fvd.create(src, 4 * MiB)
    with fvd.open(src, "r+") as i:
        i.write(MiB - 10, os.urandom(5000))
        i.write(3 * MiB, b"tail")
    assert run(capsys, "convert", "-O", "fvd", "-o", "table=off", src, mid)[0] == 0
    assert run(capsys, "convert", "-O", "fvd", mid, back)[0] == 0
    with fvd.open(mid) as m, fvd.open(back) as b, fvd.open(src) as s:
        assert m.table is False and b.table is True
        assert m.read(0, 4 * MiB) == s.read(0, 4 * MiB) == b.read(0, 4 * MiB)
    assert run(capsys, "compare", src, mid)[0] == 0


def test_refusals_are_one_line(tmp_path, capsys):
    img = str(tmp_path / "t.fvd")
    run(capsys, "create", "-o", "table=off", img, "1M")
    code, _, err = run(capsys, "snapshot", "-c", "s1", img)
    assert code == 1 and err.count("\n") == 1 and "table=off" in err and img in err
    code, _, err = run(capsys, "create", "-o", "table=maybe", str(tmp_path / "x.fvd"), "1M")
    assert code == 1 and "table must be on or off" in err
