"""The command line as a drop-in for qemu-img: key names, exit codes, -f, one-line
errors for every command, convert (with qemu-img compare as the oracle)."""

import json
import os
import shutil
import subprocess

import pytest

import fvd
from fvd import qcow2
from fvd.cli import main
from fvd.units import MiB

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    return code == 1 and err.count("\n") == 1 and "Traceback" not in err


QEMU_INFO_KEYS = {
    "filename",
    "format",
    "virtual-size",
    "actual-size",
    "cluster-size",
    "dirty-flag",
    "format-specific",
}
QEMU_SNAPSHOT_KEYS = {
    "id",
    "name",
    "vm-state-size",
    "date-sec",
    "date-nsec",
    "vm-clock-sec",
    "vm-clock-nsec",
}
QEMU_CHECK_KEYS = {
    "filename",
    "format",
    "check-errors",
    "corruptions",
    "leaks",
    "corruptions-fixed",
    "leaks-fixed",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
}


@needs_qemu
def test_info_keys_match_qemu_img(tmp_path, capsys):
    q = tmp_path / "q.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(q), "4M"], check=True, capture_output=True
    )
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(q)], check=True)
    theirs = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(q)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    code, out, _ = run(capsys, "info", "--output=json", q)
    ours = json.loads(out)
    assert code == 0 and QEMU_INFO_KEYS <= set(ours)
    for key in ("filename", "format", "virtual-size", "cluster-size", "dirty-flag"):
        assert ours[key] == theirs[key]
    assert ours["snapshots"][0]["id"] == "1"
    for key in QEMU_SNAPSHOT_KEYS:
        assert ours["snapshots"][0][key] == theirs["snapshots"][0][key], key
    img = tmp_path / "a.fvd"
    fvd.create(img, 4 * MiB)
    with fvd.open(img, "r+") as f:
        f.write(0, b"x")
        f.create_snapshot("snap", vm_state=b"v" * 100)
    info = json.loads(run(capsys, "info", "--output=json", img)[1])
    assert QEMU_INFO_KEYS <= set(info) and info["format"] == "fvd"
    assert info["format-specific"]["type"] == "fvd"
    assert info["format-specific"]["data"]["chunk-size"] == MiB
    snap = info["snapshots"][0]
    # qemu-img's keys, plus fvd's snapshot uuid (docs/format.md section 8)
    assert set(snap) == QEMU_SNAPSHOT_KEYS | {"uuid"} and snap["id"] == "1"
    with fvd.open(img) as f:
        assert snap["name"] == "snap" and snap["uuid"] == f.snapshots()[0].uuid
        assert info["format-specific"]["data"]["uuid"] == f.uuid
    assert snap["vm-state-size"] == 100 and snap["date-sec"] > 1.6e9
    assert json.loads(run(capsys, "snapshot", "-l", "--output=json", img)[1]) == [snap]


def test_backing_chain_and_missing_base(tmp_path, capsys):
    base = tmp_path / "golden.raw"
    base.write_bytes(b"g" * MiB)
    mid = tmp_path / "mid.fvd"
    fvd.create(mid, MiB, base="golden.raw", base_format="raw")
    top = tmp_path / "top.qcow2"
    qcow2.create(str(top), MiB, backing_file="mid.fvd", backing_format="fvd")
    code, out, _ = run(capsys, "info", "--backing-chain", "--output=json", top)
    chain = json.loads(out)
    assert code == 0 and [i["format"] for i in chain] == ["qcow2", "fvd", "raw"]
    assert chain[0]["backing-filename"] == "mid.fvd"
    assert chain[0]["full-backing-filename"] == str(mid)
    assert chain[1]["backing-filename-format"] == "raw"
    code, out, _ = run(capsys, "info", "--backing-chain", top)
    assert code == 0 and out.count("image: ") == 3
    base.unlink()
    code, out, _ = run(capsys, "info", "--output=json", mid)
    info = json.loads(out)
    assert code == 0 and info["backing-filename"] == "golden.raw"
    assert info["format-specific"]["data"]["backing-missing"]
    code, out, _ = run(capsys, "info", mid)
    assert code == 0 and "golden.raw (missing)" in out
    mid.unlink()
    code, out, _ = run(capsys, "info", top)
    assert code == 0 and "mid.fvd (missing)" in out


def test_check_json_and_exit_codes(tmp_path, capsys):
    img = tmp_path / "c.fvd"
    fvd.create(img, 8 * MiB)
    with fvd.open(img, "r+") as f:
        f.write(0, b"y" * 4096)
        data_offset = f._core.header.data_offset
    code, out, _ = run(capsys, "check", "--output=json", img)
    data = json.loads(out)
    assert code == 0 and QEMU_CHECK_KEYS <= set(data)
    assert (data["total-clusters"], data["allocated-clusters"]) == (8, 1)
    assert data["format"] == "fvd" and data["corruptions"] == data["leaks"] == 0
    with open(img, "r+b") as f:
        f.seek(data_offset + 5 * MiB)
        f.write(b"z" * 4096)
    code, out, _ = run(capsys, "check", "--output=json", img)
    assert code == 3 and json.loads(out)["leaks"] == 1
    code, out, err = run(capsys, "check", "-p", "-r", "leaks", "--output=json", img)
    assert code == 0 and json.loads(out)["leaks-fixed"] == 1 and "(100.00/100%)" in err
    with fvd.open(img, "r+"):
        code, _, err = run(capsys, "check", img)  # locked: could not run
        assert one_line_error(code, err)
        assert run(capsys, "check", "-U", img)[0] == 0
    q = tmp_path / "c.qcow2"
    qcow2.create(str(q), 4 * MiB)
    code, out, _ = run(capsys, "check", "--output=json", q)
    assert code == 0 and json.loads(out)["format"] == "qcow2"
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello" * 100)
    for argv in (
        ["check", junk],
        ["check", "-f", "fvd", junk],
        ["check", "--bogus", img],
        ["check", "-r", "everything", img],
        ["check"],
    ):
        assert one_line_error(*run(capsys, *argv)[::2]), argv


def test_format_option_and_probe(tmp_path, capsys):
    q = tmp_path / "disk.qcow2"
    qcow2.create(str(q), 2 * MiB)
    with qcow2.open(str(q), "r+") as f:
        f.write(65536, b"q" * 65536)
    img = tmp_path / "disk.fvd"
    fvd.create(img, 2 * MiB)
    code, _, err = run(capsys, "info", "-f", "fvd", q)
    assert one_line_error(code, err) and "is a qcow2 image; use -f qcow2" in err
    code, _, err = run(capsys, "map", "-f", "qcow2", img)
    assert one_line_error(code, err) and "is an fvd image; use -f fvd" in err
    for fmt in ([], ["-f", "qcow2"]):
        code, out, _ = run(capsys, "map", *fmt, "--output=json", q)
        assert code == 0 and [e["data"] for e in json.loads(out)] == [False, True, False]
    assert run(capsys, "snapshot", "-f", "qcow2", "-c", "s1", q)[0] == 0
    code, out, _ = run(capsys, "snapshot", "-l", q)
    assert code == 0 and "s1" in out
    code, _, err = run(capsys, "snapshot", "-a", "s1", q)
    assert one_line_error(code, err)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"r" * 4096)
    code, out, _ = run(capsys, "info", "--output=json", raw)
    assert code == 0 and json.loads(out)["format"] == "raw"
    assert one_line_error(*run(capsys, "snapshot", "-l", raw)[::2])
    assert one_line_error(*run(capsys, "info", "-f", "vmdk", raw)[::2])


ALL_COMMANDS = [
    ["info"],
    ["check"],
    ["map"],
    ["map", "--since", "s"],
    ["snapshot", "-l"],
    ["prefetch"],
    ["checksum"],
    ["convert", "-O", "raw", "{img}", "{out}"],
]


def _argv(cmd, img, out):
    argv = [a.replace("{img}", str(img)).replace("{out}", str(out)) for a in cmd]
    return argv if "{img}" in " ".join(cmd) else argv + [str(img)]


def test_every_command_fails_in_one_line(tmp_path, capsys):
    out = tmp_path / "out.raw"
    folder = tmp_path / "folder"
    folder.mkdir()
    locked = tmp_path / "locked.fvd"
    fvd.create(locked, MiB)
    bad = [tmp_path / "missing.fvd", folder]
    unreadable = tmp_path / "secret.fvd"
    fvd.create(unreadable, MiB)
    os.chmod(unreadable, 0)
    if os.geteuid() != 0:  # root reads anything
        bad.append(unreadable)
    for cmd in ALL_COMMANDS:
        for target in bad:
            code, _, err = run(capsys, *_argv(cmd, target, out))
            assert one_line_error(code, err), (cmd, target, err)
        with fvd.open(locked, "r+"):
            code, _, err = run(capsys, *_argv(cmd, locked, out))
            assert one_line_error(code, err), (cmd, err)
        code, _, err = run(capsys, *cmd[:1], "--no-such-option", locked)
        assert one_line_error(code, err), (cmd, err)
    for argv in (
        ["create", tmp_path / "n.fvd", "12X"],
        ["create", tmp_path / "n.fvd", "-5M"],
        ["create", "-o", "chunk_size=3M", tmp_path / "n.fvd", "1G"],
        ["convert", "-o", "cluster_size=3K", "-O", "qcow2", locked, out],
        ["convert", "-o", "nonsense=1", locked, out],
        ["convert", "-o", "chunk_size", locked, out],
        ["convert", "-l", "nosuchsnap", locked, out],
        ["convert", "--since", "nosuchsnap", "-B", locked, locked, out],
        ["convert", "-O", "vmdk", locked, out],
        ["convert", locked, folder],
        ["convert", locked, tmp_path / "nodir" / "x.fvd"],
        ["snapshot", "-d", "nosuchsnap", locked],
        [],
        ["frobnicate"],
        ["checksum", "--block-size", "1000", locked],
        ["checksum", "--block-size", "lots", locked],
        ["checksum", "--algorithm", "md17", locked],
        ["checksum", "-l", "nosuchsnap", locked],
    ):
        code, _, err = run(capsys, *argv)
        assert one_line_error(code, err), (argv, err)
    assert not out.exists()


@needs_qemu
def test_convert_command(tmp_path, capsys):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(os.urandom(300000))
    q = tmp_path / "out.qcow2"
    code, _, err = run(
        capsys,
        "convert",
        "-p",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=64K,lazy_refcounts=on",
        src,
        q,
    )
    assert code == 0 and err.endswith("(100.00/100%)\r\n")
    subprocess.run(["qemu-img", "compare", str(q), str(src)], check=True, capture_output=True)
    img = tmp_path / "out.fvd"
    assert run(capsys, "convert", "-t", "unsafe", "-o", "chunk_size=256K", q, img)[0] == 0
    with fvd.open(img, "r+") as f:
        assert f.chunk_size == 256 * 1024
        f.create_snapshot("before")
        f.write(MiB, b"changed")
    back = tmp_path / "back.raw"
    assert run(capsys, "convert", "-O", "raw", "-l", "snapshot.name=before", img, back)[0] == 0
    assert back.read_bytes() == src.read_bytes()


@needs_qemu
def test_map_of_a_qemu_chain_equals_qemu_img_map(tmp_path, capsys):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(base), "8M"], check=True, capture_output=True
    )
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top)],
        check=True,
        capture_output=True,
    )
    for target, cmd in (
        (base, "write -P 3 64k 64k"),
        (top, "write -P 4 1M 64k"),
        (top, "write -z 2M 64k"),
    ):
        subprocess.run(["qemu-io", "-c", cmd, str(target)], check=True, capture_output=True)
    theirs = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(top)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    code, out, _ = run(capsys, "map", "--output=json", top)
    assert code == 0 and json.loads(out) == theirs


@needs_qemu
def test_create_qcow2_and_raw(tmp_path, capsys):
    base = tmp_path / "base.qcow2"
    assert run(capsys, "create", "-f", "qcow2", "-o", "cluster_size=4K", base, "2M")[0] == 0
    top = tmp_path / "top.qcow2"
    assert run(capsys, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)[0] == 0
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(top)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info["virtual-size"] == 2 * MiB and info["backing-filename"] == "base.qcow2"
    subprocess.run(["qemu-img", "check", str(top)], check=True, capture_output=True)
    raw = tmp_path / "disk.raw"
    assert run(capsys, "create", "-f", "raw", raw, "1M")[0] == 0
    assert raw.stat().st_size == MiB
    for argv in (
        ["create", "-f", "raw", raw, "1M"],
        ["create", "-f", "raw", "-b", base, tmp_path / "r2.raw", "1M"],
        ["create", "-f", "qcow2", "-o", "chunk_size=1M", tmp_path / "x.qcow2", "1M"],
    ):
        assert one_line_error(*run(capsys, *argv)[::2]), argv
