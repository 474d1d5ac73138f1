"""The kit's own logic, without booting: console parsing, static-binary detection,
the host-side ext4 oracles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from . import host
from .kit import BEGIN, END, _is_static_elf, make_ext4, parse_console


def test_console_between_the_markers_with_results_and_status() -> None:
    console = (
        "[    0.5] noise before\r\n"
        f"{BEGIN}\r\n"
        "hello\r\n"
        "FVD-RESULT create_fsync_ops_per_s 158.5\r\n"
        f"{END} rc=3\r\n"
        "[    2.0] reboot: Power down\r\n"
    )
    r = parse_console("tcg", "fvd-serve", console, 2.5)
    assert r.rc == 3 and r.accel == "tcg" and r.backend == "fvd-serve"
    assert r.output == "hello\nFVD-RESULT create_fsync_ops_per_s 158.5\n"
    assert r.results == {"create_fsync_ops_per_s": 158.5}
    with pytest.raises(RuntimeError, match="exited 3"):
        r.check()


def test_a_guest_that_never_finished_has_no_status() -> None:
    r = parse_console("tcg", "raw-nbd", f"{BEGIN}\nhalf way\n", 300.0)
    assert r.rc is None and r.output == "half way\n"
    with pytest.raises(RuntimeError, match="exited None"):
        r.check()
    assert parse_console("kvm", "", "Kernel panic\n", 8.0).rc is None


def test_static_binary_detection(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = tmp_path / "hello.c"
    src.write_text("int main(void) { return 0; }\n")
    for flags, static in (([], False), (["-static"], True)):
        out = tmp_path / f"hello{len(flags)}"
        subprocess.run(["gcc", *flags, "-o", str(out), str(src)], check=True)
        assert _is_static_elf(out) is static
    assert not _is_static_elf(src)  # not an ELF file at all


def test_checksums_only_from_whole_lines() -> None:
    a, b = "a" * 64, "b" * 64
    console = f"noise\n{a}  /mnt/d/f1\n{b}  /mnt/d/f1"  # f12's line, half printed
    assert host.guest_sums(console, "/mnt/d/") == {"/mnt/d/f1": a}
    assert host.guest_sums(console + "2\n", "/mnt/d/") == {"/mnt/d/f1": a, "/mnt/d/f12": b}


@pytest.fixture
def small_ext4(tmp_path: Path) -> Path:
    """A 32 MiB ext4 holding /d/f1 and /d/f2, made on the host."""
    if shutil.which("debugfs") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("e2fsprogs is not installed")
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    for name in ("f1", "f2"):
        (tree / "d" / name).write_bytes(name.encode() * 5000)
    raw = tmp_path / "fs.raw"
    make_ext4(raw, 32 << 20, populate=tree)
    return raw


def test_directory_listing_through_debugfs(small_ext4: Path) -> None:
    assert sorted(host.list_dir(small_ext4, "/d")) == ["f1", "f2"]
    assert "d" in host.list_dir(small_ext4, "/")


def test_crash_recovery_accepts_only_what_a_crash_leaves(small_ext4: Path) -> None:
    host.recover_like_a_crash(small_ext4)  # clean: nothing to fix
    # the superblock's free counts are not journaled: a crash leaves them stale
    host.run("debugfs", "-w", "-R", "ssv free_blocks_count 100", small_ext4)
    host.run("debugfs", "-w", "-R", "ssv free_inodes_count 7", small_ext4)
    assert "Free blocks count wrong" in host.recover_like_a_crash(small_ext4)
    # a block in use but free in the bitmap: no crash of a journaled ext4 leaves that
    blocks = host.run("debugfs", "-R", "blocks /d/f1", small_ext4).stdout.split()
    host.run("debugfs", "-w", "-R", f"freeb {blocks[0].decode()}", small_ext4)
    with pytest.raises(AssertionError, match="not a crash state"):
        host.recover_like_a_crash(small_ext4)
