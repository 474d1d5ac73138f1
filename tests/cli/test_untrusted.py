"""Untrusted images (issue 19, bugs 4-6): backing files that are FIFOs or other special
files, the backing policy (--backing=any|same-dir|none, backing= in the library), raw
files that look like qcow2, and convert's output (errors name DST, temp files of killed
converts are removed)."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

import fvd
from fvd import qcow2
from fvd.cli import main
from fvd.units import MiB

from ..faults import small_tmpfs

SECRET = b"TOP-SECRET-HOST-FILE-" * 50
SIZE = MiB


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli(*argv, timeout=60):
    """The CLI in a child process: a hang is a test failure (TimeoutExpired), not a hang."""
    return subprocess.run(
        [sys.executable, "-m", "fvd.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line(err):
    return err.count("\n") == 1 and "Traceback" not in err


def qcow2_over(path, backing, backing_format="raw"):
    """A qcow2 overlay whose header names `backing` as given (as a hostile image would):
    made over a harmless file, then the name is rewritten in place."""
    folder = os.path.dirname(path)
    harmless = os.path.join(folder, "harmless.raw")
    with open(harmless, "wb") as f:
        f.truncate(SIZE)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", backing_format]
        + ["-b", backing, path, str(SIZE)],
        check=True,
    )
    os.unlink(harmless)


# ----- bug 4: FIFOs and other special files as backing files --------------------------------
def special_file(tmp_path, kind):
    path = str(tmp_path / kind)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)  # bound, never accepting: kept open by the test's lifetime
        return path, s
    elif kind == "directory":
        os.mkdir(path)
    else:
        return "/dev/zero", None  # a character device
    return path, None


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory", "chardev"])
def test_special_backing_file_is_refused_at_once(tmp_path, kind):
    backing, keep = special_file(tmp_path, kind)
    top = str(tmp_path / "top.qcow2")
    qcow2_over(top, backing)
    for argv in (["convert", "-O", "raw", top, tmp_path / "out.raw"], ["checksum", top]):
        r = cli(*argv)
        assert r.returncode == 1 and one_line(r.stderr), r.stderr
        assert backing in r.stderr
    r = cli("info", "--output=json", top)  # still describes the image
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)["format-specific"]["data"]
    assert data["backing-missing"] and backing in data["backing-error"]
    with pytest.raises(fvd.BaseImageError, match=backing):
        qcow2.open(top)
    fvd.create(str(tmp_path / "over.fvd"), SIZE, base=top, base_format="raw")
    with pytest.raises(fvd.BaseImageError, match="top.qcow2"):  # a qcow2 base of fvd
        fvd.create(str(tmp_path / "over2.fvd"), SIZE, base=top, base_format="qcow2")
    if keep is not None:
        keep.close()


def test_fifo_image_is_refused_at_once(tmp_path):
    fifo = str(tmp_path / "disk")
    os.mkfifo(fifo)
    for fmt in (None, "fvd", "qcow2", "raw"):
        r = cli("info", *(["-f", fmt] if fmt else []), fifo)
        assert r.returncode == 1 and "FIFO" in r.stderr and fifo in r.stderr, r.stderr


# ----- bug 5: the backing policy ---------------------------------------------------------------
@pytest.fixture
def hostile(tmp_path):
    """imgs/abs.qcow2 -> /abs/path/secret, imgs/rel.qcow2 -> ../secret."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET.ljust(SIZE, b"\0"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    qcow2_over(str(imgs / "abs.qcow2"), str(secret))
    qcow2_over(str(imgs / "rel.qcow2"), "../secret")
    return imgs, secret


def leaked(folder):
    """Any file under `folder` holding the secret's bytes."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                if SECRET[:40] in f.read():
                    return os.path.join(root, name)
    return None


@pytest.mark.parametrize("policy", ["none", "same-dir"])
@pytest.mark.parametrize("name", ["abs.qcow2", "rel.qcow2"])
def test_policy_keeps_the_secret_out(tmp_path, capsys, hostile, policy, name):
    imgs, secret = hostile
    out = tmp_path / "out"
    out.mkdir()
    for fmt in ("raw", "qcow2", "fvd"):
        dst = out / f"x.{fmt}"
        code, _, err = run(capsys, "convert", f"--backing={policy}", "-O", fmt, imgs / name, dst)
        assert code == 1 and one_line(err), err
        assert "/secret" in err and "refused" in err and f"--backing={policy}" in err
        assert not dst.exists()
    assert leaked(out) is None and os.listdir(out) == []
    for cmd in (["checksum"], ["map", "--output=json"], ["snapshot", "-l"], ["check"]):
        code, stdout, err = run(capsys, *cmd, f"--backing={policy}", imgs / name)
        assert code == 1 and one_line(err) and "secret" in err and "refused" in err, (cmd, err)
    with pytest.raises(fvd.BaseImageError, match="refused"):
        qcow2.open(imgs / name, backing=policy)
    with pytest.raises(fvd.BaseImageError, match="refused"):
        fvd.convert(imgs / name, out / "lib.raw", dst_format="raw", backing_policy=policy)
    assert leaked(out) is None


@pytest.mark.parametrize("policy", ["none", "same-dir"])
def test_convert_takes_the_contract_word_backing_as_the_policy(tmp_path, hostile, policy):
    """api-contract: fvd.convert takes backing="none"|"same-dir"|"any" like fvd.open; it
    names the source's policy unless such a file lies beside DST (then it is -B)."""
    imgs, _ = hostile
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(fvd.BaseImageError, match="refused"):
        fvd.convert(imgs / "rel.qcow2", out / "lib.raw", dst_format="raw", backing=policy)
    assert leaked(out) is None and os.listdir(out) == []
    # a file of that name beside DST keeps meaning the output's backing file
    (out / policy).write_bytes(bytes(SIZE))
    fvd.convert(imgs / "rel.qcow2", out / "x.qcow2", dst_format="qcow2", backing=policy)
    with qcow2.open(out / "x.qcow2") as q:
        assert q.backing_file == policy


def test_policy_any_is_qemu_img_behaviour(tmp_path, capsys, hostile):
    imgs, _ = hostile
    dst = tmp_path / "x.raw"
    assert run(capsys, "convert", "-O", "raw", imgs / "rel.qcow2", dst)[0] == 0
    assert dst.read_bytes().startswith(SECRET)  # compatible default: what qemu-img does


def test_same_dir_allows_the_chain_beside_the_image(tmp_path, capsys):
    """top.qcow2 -> mid.fvd -> base.raw in one directory works; a symlink beside the
    image pointing out, or a deeper layer pointing out, does not."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * SIZE)
    fvd.create(tmp_path / "mid.fvd", SIZE, base="base.raw", base_format="raw")
    qcow2.create(tmp_path / "top.qcow2", SIZE, backing_file="mid.fvd", backing_format="fvd")
    with fvd.qcow2.open(tmp_path / "top.qcow2", backing="same-dir") as q:
        assert q.read(0, 4) == b"BBBB"
    code, out, _ = run(capsys, "checksum", "--backing=same-dir", tmp_path / "top.qcow2")
    assert code == 0
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    os.replace(base, elsewhere / "base.raw")
    os.symlink(elsewhere / "base.raw", base)  # beside the image, resolving outside
    for top in ("mid.fvd", "top.qcow2"):  # the deeper layer is checked too
        code, _, err = run(capsys, "checksum", "--backing=same-dir", tmp_path / top)
        assert code == 1 and "outside" in err and one_line(err), err
    with pytest.raises(fvd.BaseImageError, match="outside"):
        fvd.open(tmp_path / "mid.fvd", backing="same-dir")
    with fvd.open(tmp_path / "mid.fvd") as img:  # "any" follows the link
        assert img.read(0, 1) == b"B"
    with pytest.raises(fvd.BaseImageError, match="none"):
        fvd.open(tmp_path / "mid.fvd", backing="none")
    with pytest.raises(ValueError, match="backing"):
        fvd.open(tmp_path / "mid.fvd", backing="some")


def test_info_shows_the_chain_without_opening_refused_files(tmp_path, capsys, hostile):
    imgs, secret = hostile
    code, out, _ = run(capsys, "info", "--output=json", "--backing=none", imgs / "rel.qcow2")
    assert code == 0
    info = json.loads(out)
    assert info["backing-filename"] == "../secret"
    assert info["full-backing-filename"] == str(imgs / "../secret")
    assert info["format-specific"]["data"]["backing-refused"]
    assert [i["filename"] for i in info["backing-chain"]] == [str(imgs / "rel.qcow2")]
    # the whole chain, layer by layer, with "any"
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(SIZE))
    fvd.create(tmp_path / "mid.fvd", SIZE, base="base.raw", base_format="raw")
    qcow2.create(tmp_path / "top.qcow2", SIZE, backing_file="mid.fvd", backing_format="fvd")
    code, out, _ = run(capsys, "info", "--output=json", tmp_path / "top.qcow2")
    chain = json.loads(out)["backing-chain"]
    assert [(c["format"], c.get("backing-filename")) for c in chain] == [
        ("qcow2", "mid.fvd"),
        ("fvd", "base.raw"),
        ("raw", None),
    ]
    code, out, _ = run(capsys, "info", "--output=json", "--backing-chain", tmp_path / "top.qcow2")
    assert [i["format"] for i in json.loads(out)] == ["qcow2", "fvd", "raw"]


def test_nbd_bases_are_refused_by_none_and_same_dir(tmp_path):
    path = str(tmp_path / "a.fvd")
    fvd.create(path, SIZE)
    policy = fvd.fileio.BackingPolicy.of("same-dir", path)
    for uri in ("nbd://127.0.0.1:1/x", "nbd+unix:///x?socket=/tmp/s"):
        with pytest.raises(fvd.BaseImageError, match="NBD"):
            policy.admit(path, uri)
        with pytest.raises(fvd.BaseImageError, match="none"):
            fvd.fileio.BackingPolicy.of("none", path).admit(path, uri)
        with pytest.raises(fvd.BaseImageError, match="NBD"):  # before any connection
            fvd.create(
                str(tmp_path / "b.fvd"), SIZE, base=uri, base_format="raw", backing="same-dir"
            )


def test_same_dir_checks_the_file_really_opened(tmp_path):
    """A name that passed the check but was swapped before the open is caught on the
    opened descriptor."""
    inside, outside = tmp_path / "imgs", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (outside / "base.raw").write_bytes(bytes(4096))
    policy = fvd.fileio.BackingPolicy.of("same-dir", inside / "top.qcow2")
    fd = os.open(outside / "base.raw", os.O_RDONLY)
    try:
        with pytest.raises(fvd.BaseImageError, match="outside"):
            policy.confirm(fd, str(inside / "top.qcow2"), str(inside / "base.raw"))
    finally:
        os.close(fd)


def guest_disk_with_qcow2_header(tmp_path, secret):
    """A raw guest disk whose first sector is a qcow2 header naming a host file."""
    probe = tmp_path / "probe.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret)]
        + [str(probe), str(SIZE)],
        check=True,
    )
    disk = bytearray(4 * MiB)
    header = probe.read_bytes()  # a small qcow2 at the start of the guest's disk
    disk[: len(header)] = header
    disk[MiB : MiB + 5] = b"GUEST"
    raw = tmp_path / "guest.raw"
    raw.write_bytes(disk)
    return raw, bytes(disk)


def test_raw_named_raw_stays_raw(tmp_path, capsys, hostile):
    _, secret = hostile
    raw, disk = guest_disk_with_qcow2_header(tmp_path, secret)
    for fmt in ("raw", "qcow2", "fvd"):
        dst = tmp_path / f"copy.{fmt}"
        assert run(capsys, "convert", "-f", "raw", "-O", fmt, raw, dst)[0] == 0
        with fvd.imageio.open_image(dst, fmt) as img:
            assert img.size == len(disk) and img.read(0, len(disk)) == disk
    code, out, _ = run(capsys, "info", "-f", "raw", "--output=json", raw)
    assert json.loads(out)["format"] == "raw" and json.loads(out)["virtual-size"] == len(disk)
    code, out, _ = run(capsys, "map", "-f", "raw", "--output=json", raw)
    assert code == 0 and all(e["depth"] == 0 for e in json.loads(out))
    code, out, _ = run(capsys, "checksum", "-f", "raw", "--output=json", raw)
    assert json.loads(out) == json.loads(
        run(capsys, "checksum", "--output=json", tmp_path / "copy.fvd")[1]
    )
    # probed, it is a qcow2 over the host file; --backing=none refuses that
    code, _, err = run(capsys, "convert", "--backing=none", "-O", "raw", raw, tmp_path / "p.raw")
    assert code == 1 and str(secret) in err


def test_create_b_needs_F(tmp_path, capsys, hostile):
    _, secret = hostile
    raw, _ = guest_disk_with_qcow2_header(tmp_path, secret)
    for fmt in ("fvd", "qcow2"):
        top = tmp_path / f"top.{fmt}"
        code, _, err = run(capsys, "create", "-f", fmt, "-b", raw, top)
        assert code == 1 and one_line(err) and "-F" in err, err
        assert not top.exists()
        code, _, err = run(capsys, "create", "-f", fmt, "-b", raw, "-F", "raw", top)
        assert code == 0, err
        with fvd.imageio.open_image(top) as img:
            assert img.size == 4 * MiB and img.read(MiB, 5) == b"GUEST"


# ----- bug 6: convert's output ---------------------------------------------------------------
def source_image(path, nbytes=6 * MiB):
    fvd.create(path, 8 * MiB)
    with fvd.open(path, "r+") as img:
        img.write(0, os.urandom(nbytes))


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "fvd"])
def test_disk_full_names_the_destination(tmp_path, capsys, fmt):
    src = tmp_path / "src.fvd"
    source_image(src)
    with small_tmpfs("2m") as d:
        if d is None:
            pytest.skip("cannot mount a tmpfs here")
        dst = os.path.join(d, f"out.{fmt}")
        code, _, err = run(capsys, "convert", "-O", fmt, src, dst)
        assert code == 1 and one_line(err), err
        assert err.startswith(f"fvd convert: {dst}: ") and "No space left" in err, err
        assert str(src) not in err and os.listdir(d) == []


BLOCKED_CONVERT = """
import sys, time, fvd
def stop(done, total):
    if done:
        print("copying", flush=True)
        time.sleep(3600)
fvd.convert(sys.argv[1], sys.argv[2], dst_format=sys.argv[3], progress=stop)
"""


def start_blocked_convert(src, dst, fmt):
    """A real convert, held inside its copy (its temp file exists and is locked)."""
    child = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_CONVERT, str(src), str(dst), fmt],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline() == "copying\n"
    return child


def temps(dst):
    folder, name = os.path.split(str(dst))
    return sorted(e for e in os.listdir(folder) if e.startswith(f".{name}.convert-"))


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "fvd"])
def test_temp_of_a_killed_convert_is_removed_by_the_next(tmp_path, fmt):
    src = tmp_path / "src.fvd"
    source_image(src, 3 * MiB)
    dst = tmp_path / f"out.{fmt}"
    killed = start_blocked_convert(src, dst, fmt)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (stale,) = temps(dst)
    # the same leftover again, named after a live process that does not hold it
    reused = f".{dst.name}.convert-{os.getpid()}-0123abcd"
    os.link(tmp_path / stale, tmp_path / reused)
    live = start_blocked_convert(src, dst, fmt)
    try:
        (held,) = set(temps(dst)) - {stale, reused}
        fvd.convert(src, dst, dst_format=fmt)  # removes the stale ones only
        assert temps(dst) == [held]
        with fvd.imageio.open_image(dst, fmt) as out, fvd.open(src) as img:
            assert out.read(0, 3 * MiB) == img.read(0, 3 * MiB)
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    fvd.convert(src, dst, dst_format=fmt)  # the killed child's lock went with it
    assert temps(dst) == []
