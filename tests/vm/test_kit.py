"""The kit's own logic, without booting: console parsing, static-binary detection."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .kit import BEGIN, END, _is_static_elf, parse_console


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
