"""Checkpoint identity (docs/format.md sections 2, 8 and 11): the image UUID, snapshot
UUIDs, the backup record every convert output carries, and the refusal of an
incremental convert over a backing file that does not hold the since snapshot of the
same image. Oracles: qemu-img check / info / compare on the qcow2 backups (the header
extension must leave them clean), and raw exports of the snapshots."""

import json
import os
import shutil
import subprocess
import uuid

import pytest

import fvd
from fvd import cli
from fvd.ondisk import format as fmt
from fvd.units import MiB

SIZE = 8 * MiB

needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def qemu_img(*args):
    r = subprocess.run(["qemu-img", *map(str, args)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture
def vm(tmp_path):
    """An image with snapshots s1, s2, s3, each after some writes."""
    path = str(tmp_path / "vm.fvd")
    fvd.create(path, SIZE)
    with fvd.open(path, "r+") as img:
        for n, name in enumerate(("s1", "s2", "s3")):
            img.write(n * MiB + 4096 * n, bytes([n + 1]) * (64 * 1024))
            img.create_snapshot(name)
    return path


def strip_uuid(path):
    """The header as fvd before image UUIDs wrote it: zeros at 224..239."""
    with open(path, "r+b") as f:
        raw = bytearray(f.read(512))
        raw[224:240] = bytes(16)
        raw[12:16] = fmt.header_crc(raw).to_bytes(4, "little")
        f.seek(0)
        f.write(raw)


def test_image_and_snapshot_uuids(tmp_path):
    path = str(tmp_path / "a.fvd")
    fvd.create(path, SIZE)
    with fvd.open(path, "r+") as img:
        ident = img.uuid
        assert uuid.UUID(ident).version == 4
        first = img.create_snapshot("s")
        img.delete_snapshot("s")
        again = img.create_snapshot("s")  # same name, new id: a new uuid
        assert first.uuid != again.uuid and first.id != again.id
        assert img.snapshots()[0].uuid == again.uuid
        assert again.as_dict()["uuid"] == again.uuid
    with fvd.open(path) as img:
        assert img.uuid == ident  # stable for the image's life
        assert img.snapshots()[0].uuid == again.uuid
        assert img.info()["format-specific"]["data"]["uuid"] == ident
    other = str(tmp_path / "b.fvd")
    fvd.create(other, SIZE)
    with fvd.open(other) as img:
        assert img.uuid != ident


def test_an_older_image_gets_its_uuid_at_the_first_write_open(vm):
    strip_uuid(vm)
    with fvd.open(vm) as img:  # read-only: nothing is written
        assert img.uuid is None
        assert [s.uuid for s in img.snapshots()] == [None, None, None]
        assert img.read(0, 4) == b"\x01" * 4
    with open(vm, "rb") as f:
        assert f.read(512)[224:240] == bytes(16)
    with fvd.open(vm, "r+") as img:
        ident = img.uuid
        assert ident is not None
        suuid = img.snapshots()[0].uuid
        assert suuid is not None
    with fvd.open(vm) as img:
        assert img.uuid == ident and img.snapshots()[0].uuid == suuid
        assert img.check().ok


def convert_chain(vm, tmp_path, fmt_out):
    """Full backup of s1, then incrementals of s2 and s3 in format fmt_out."""
    full = str(tmp_path / f"full-s1.{fmt_out}")
    fvd.convert(vm, full, dst_format=fmt_out, snapshot="s1")
    inc2 = str(tmp_path / f"inc-s2.{fmt_out}")
    fvd.convert(vm, inc2, dst_format=fmt_out, snapshot="s2", since="s1", backing=full)
    inc3 = str(tmp_path / f"inc-s3.{fmt_out}")
    fvd.convert(vm, inc3, dst_format=fmt_out, snapshot="s3", since="s2", backing=inc2)
    return full, inc2, inc3


@pytest.mark.parametrize("fmt_out", ["fvd", "qcow2"])
def test_a_chain_records_what_it_holds_and_restores(vm, tmp_path, fmt_out):
    full, inc2, inc3 = convert_chain(vm, tmp_path, fmt_out)
    with fvd.open(vm) as img:
        ident = img.uuid
        snaps = {s.name: s.uuid for s in img.snapshots()}
    held = fvd.backup_info(inc3)
    assert held == fvd.BackupInfo(ident, "s3", snaps["s3"], "s2", snaps["s2"])
    assert fvd.backup_info(full) == fvd.BackupInfo(ident, "s1", snaps["s1"])
    assert fvd.check_backup_chain(vm, "s2", inc2) == fvd.backup_info(inc2)
    s3 = str(tmp_path / "s3.raw")
    fvd.convert(vm, s3, dst_format="raw", snapshot="s3")
    with fvd.open(inc3) if fmt_out == "fvd" else fvd.qcow2.open(inc3) as out:
        with open(s3, "rb") as f:
            assert out.read(0, SIZE) == f.read()


@needs_qemu
def test_qcow2_backups_with_the_extension_stay_clean_for_qemu(vm, tmp_path):
    full, inc2, inc3 = convert_chain(vm, tmp_path, "qcow2")
    s3 = str(tmp_path / "s3.raw")
    fvd.convert(vm, s3, dst_format="raw", snapshot="s3")
    for path in (full, inc2, inc3):
        qemu_img("check", "-f", "qcow2", path)
        info = json.loads(qemu_img("info", "--output=json", "-f", "qcow2", path))
        assert info["format"] == "qcow2"
    qemu_img("compare", "-f", "qcow2", "-F", "raw", inc3, s3)
    # qemu-img rewrites the header (a new backing name): it keeps the unknown extension
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", os.path.basename(inc2), "-F", "qcow2", inc3)
    qemu_img("check", "-f", "qcow2", inc3)
    assert fvd.backup_info(inc3).since == "s2"


def test_fvd_rebase_keeps_the_backup_record_of_a_qcow2_backup(vm, tmp_path):
    full, inc2, inc3 = convert_chain(vm, tmp_path, "qcow2")
    held = fvd.backup_info(inc3)
    copy2 = str(tmp_path / "copy-s2.qcow2")
    shutil.copy(inc2, copy2)
    fvd.rebase(inc3, os.path.basename(copy2), backing_format="qcow2", unsafe=True)
    assert fvd.backup_info(inc3) == held
    with fvd.qcow2.open(inc3) as q:
        assert q.check().ok


def test_raw_backups_have_a_sidecar(vm, tmp_path):
    full = str(tmp_path / "full.raw")
    fvd.convert(vm, full, dst_format="raw", snapshot="s1")
    side = json.load(open(full + ".fvd-backup.json"))
    assert side["format"] == "fvd-backup" and side["snapshot"] == "s1"
    inc = str(tmp_path / "inc.fvd")
    fvd.convert(vm, inc, snapshot="s2", since="s1", backing=full, backing_format="raw")
    fvd.convert(vm, full, dst_format="raw")  # the live contents replace it: no snapshot
    assert fvd.backup_info(full).snapshot is None
    fvd.convert(vm, full, dst_format="raw", snapshot="s1")
    shutil.copy(full, tmp_path / "copy.raw")  # a copy without its sidecar holds nothing
    assert fvd.backup_info(tmp_path / "copy.raw") is None


def test_wrong_backing_is_refused(vm, tmp_path, capsys):
    full, inc2, inc3 = convert_chain(vm, tmp_path, "fvd")
    dst = tmp_path / "bad.fvd"
    # full-s1 holds s1, not s2: the silent bad backup
    with pytest.raises(fvd.BackupChainError, match="a full backup is needed"):
        fvd.convert(vm, dst, snapshot="s3", since="s2", backing=full)
    code, out, err = run(capsys, "convert", "-l", "s3", "--since", "s2", "-B", full, vm, dst)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "a full backup is needed" in err and full in err
    assert not dst.exists()
    with pytest.raises(fvd.BackupChainError):
        fvd.check_backup_chain(vm, "s2", full)
    # a backing file that records nothing (not made by fvd convert)
    plain = str(tmp_path / "plain.fvd")
    fvd.create(plain, SIZE)
    code, _, err = run(capsys, "convert", "-l", "s2", "--since", "s1", "-B", plain, vm, dst)
    assert code == 1 and "a full backup is needed" in err
    # the live contents are no snapshot
    live = str(tmp_path / "live.fvd")
    fvd.convert(vm, live)
    with pytest.raises(fvd.BackupChainError):
        fvd.convert(vm, dst, snapshot="s2", since="s1", backing=live)
    # the right one is accepted
    code, _, err = run(capsys, "convert", "-l", "s3", "--since", "s2", "-B", inc2, vm, dst)
    assert code == 0, err


def test_same_name_other_snapshot_or_image_is_refused(vm, tmp_path):
    full = str(tmp_path / "full-s1.fvd")
    fvd.convert(vm, full, snapshot="s1")
    with fvd.open(vm, "r+") as img:  # s1 again, under the same name: another snapshot
        img.delete_snapshot("s1")
        img.create_snapshot("s1")
        img.create_snapshot("s4")
    with pytest.raises(fvd.BackupChainError, match="a full backup is needed"):
        fvd.convert(vm, tmp_path / "x.fvd", snapshot="s4", since="s1", backing=full)
    twin = str(tmp_path / "twin.fvd")  # another image with snapshots of the same names
    shutil.copy(vm, twin)
    strip_uuid(twin)
    with fvd.open(twin, "r+"):
        pass  # a new uuid
    full2 = str(tmp_path / "full-twin.fvd")
    fvd.convert(twin, full2, snapshot="s1")
    with pytest.raises(fvd.BackupChainError):
        fvd.convert(vm, tmp_path / "y.fvd", snapshot="s4", since="s1", backing=full2)


def test_a_source_without_uuid_needs_a_full_backup(vm, tmp_path):
    full = str(tmp_path / "full-s1.fvd")
    fvd.convert(vm, full, snapshot="s1")
    strip_uuid(vm)
    with pytest.raises(fvd.BackupChainError, match="no uuid"):
        fvd.convert(vm, tmp_path / "x.fvd", snapshot="s2", since="s1", backing=full)


def test_info_shows_what_a_backup_holds(vm, tmp_path, capsys):
    full, inc2, _ = convert_chain(vm, tmp_path, "qcow2")
    code, out, _ = run(capsys, "info", "--output=json", inc2)
    assert code == 0
    held = json.loads(out)["format-specific"]["data"]["backup"]
    assert held["snapshot"] == "s2" and held["since"] == "s1"
    with fvd.open(vm) as img:
        assert held["image-uuid"] == img.uuid
    code, out, _ = run(capsys, "info", inc2)
    assert "    backup:" in out and "since: s1" in out and "snapshot: s2" in out


def test_a_damaged_record_is_reported(vm, tmp_path, capsys):
    full = str(tmp_path / "full.fvd")
    fvd.convert(vm, full, snapshot="s1")
    with open(full, "r+b") as f:
        f.seek(512 + 20)  # inside image_uuid: flip its bits (a fixed byte may be there)
        old = f.read(1)[0]
        f.seek(512 + 20)
        f.write(bytes([old ^ 0xFF]))
    with pytest.raises(fvd.CorruptImageError, match="backup record"):
        fvd.backup_info(full)
    with pytest.raises(fvd.CorruptImageError):
        fvd.convert(vm, tmp_path / "x.fvd", snapshot="s2", since="s1", backing=full)
    with fvd.open(full) as img:  # the image itself still opens: the record is apart
        assert img.read(0, 4) == b"\x01" * 4


def test_a_qcow2_source_is_identified_by_its_snapshots(tmp_path):
    """A qcow2 image has no UUID: its snapshots are identified by what QEMU stores for
    them (id, name, date, vm clock), so the chain rule holds for qcow2 sources too."""
    src = str(tmp_path / "vm.qcow2")
    fvd.qcow2.create(src, SIZE)
    with fvd.qcow2.open(src, "r+") as q:
        q.write(0, b"a" * 65536)
        q.create_snapshot("s1")
        q.write(MiB, b"b" * 65536)
        q.create_snapshot("s2")
    full = str(tmp_path / "full-s1.qcow2")
    fvd.convert(src, full, dst_format="qcow2", snapshot="s1")
    held = fvd.backup_info(full)
    assert held.image_uuid is None and held.snapshot == "s1" and held.snapshot_uuid
    inc = tmp_path / "inc.qcow2"
    fvd.convert(src, inc, dst_format="qcow2", snapshot="s2", since="s1", backing=full)
    full2 = str(tmp_path / "full-s2.qcow2")
    fvd.convert(src, full2, dst_format="qcow2", snapshot="s2")
    with pytest.raises(fvd.BackupChainError, match="a full backup is needed"):
        fvd.convert(src, tmp_path / "bad.qcow2", dst_format="qcow2", since="s1", backing=full2)


@pytest.mark.parametrize("fmt_out", ["fvd", "qcow2"])
def test_verify_backup_chain(vm, tmp_path, fmt_out):
    """Every link of a chain: each incremental's since snapshot is what its backing file
    holds, down to a full backup; a backing file replaced by another backup breaks it."""
    full, inc2, inc3 = convert_chain(vm, tmp_path, fmt_out)
    chain = fvd.verify_backup_chain(inc3)
    assert [(i.snapshot, i.since) for i in chain] == [("s3", "s2"), ("s2", "s1"), ("s1", None)]
    assert fvd.verify_backup_chain(full) == [fvd.backup_info(full)]
    shutil.copy(full, inc2)  # inc3's backing file now holds s1, not s2
    with pytest.raises(fvd.BackupChainError, match="the chain is broken"):
        fvd.verify_backup_chain(inc3)
