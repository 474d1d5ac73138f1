"""Host-side oracles for what a guest left in an image: fvd check, e2fsck, debugfs."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import fvd

from .kit import ROOT


def run(*args: str | Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run([str(a) for a in args], capture_output=True, cwd=ROOT, check=False)
    assert r.returncode in ok, (
        f"{' '.join(map(str, args))}: exit {r.returncode}\n"
        f"{r.stdout.decode(errors='replace')}{r.stderr.decode(errors='replace')}"
    )
    return r


def fvd_cli(*args: str | Path, ok: tuple[int, ...] = (0,)) -> str:
    return run(sys.executable, "-m", "fvd.cli", *args, ok=ok).stdout.decode()


def check_clean(image: Path, fmt: str = "fvd") -> None:
    """`fvd check` (fvd) or `qemu-img check` (qcow2) finds no corruption and no leak."""
    if fmt == "fvd":
        fvd_cli("check", image)
    elif fmt == "qcow2":
        run("qemu-img", "check", "-f", "qcow2", image)


def export_raw(image: Path, dst: Path, fmt: str = "fvd", snapshot: str | None = None) -> Path:
    """The virtual disk (or a snapshot of it) as a raw file, for e2fsck and debugfs."""
    if fmt == "fvd":
        fvd_cli("convert", "-O", "raw", *(["-l", snapshot] if snapshot else []), image, dst)
    else:
        run("qemu-img", "convert", "-f", fmt, "-O", "raw", image, dst)
    return dst


def e2fsck_clean(raw: Path) -> None:
    """e2fsck -fn: a forced full check that changes nothing; exit 0 only when clean."""
    run("e2fsck", "-fn", raw)


# What a crash leaves for e2fsck to fix after it replays the journal: the superblock's
# free counts, which ext4 does not journal (the kernel recounts them at mount). A torn
# point in time shows up as anything else (bitmap differences, bad entries, wrong links).
CRASH_FIX = re.compile(
    r"^Free (blocks|inodes) count wrong \(\d+, counted=\d+\)\.\nFix\? yes\n", re.M
)


def recover_like_a_crash(raw: Path) -> str:
    """e2fsck -fy replays the journal and fixes only what a crash leaves; its output."""
    r = run("e2fsck", "-fy", raw, ok=(0, 1))  # 1: it fixed something
    out = r.stdout.decode(errors="replace")
    assert "? yes" not in CRASH_FIX.sub("", out), f"not a crash state:\n{out}"
    e2fsck_clean(raw)
    return out


def file_sha256(raw: Path, path: str) -> str:
    """sha256 of a file inside the ext4 in `raw`, read by debugfs (no mount needed)."""
    r = run("debugfs", "-R", f"cat {path}", raw)
    return hashlib.sha256(r.stdout).hexdigest()


def guest_sums(output: str, prefix: str) -> dict[str, str]:
    """`sha256sum` lines the guest printed for files under `prefix`: {path: hexdigest}.

    Only whole lines: QEMU writes the serial console byte by byte, so a console read
    while the guest prints may end inside a line ("... /mnt/d/f1" of f12)."""
    output = output[: output.rfind("\n") + 1]
    found = re.findall(rf"^([0-9a-f]{{64}})\s+({re.escape(prefix)}\S*)$", output, re.M)
    return {path: digest for digest, path in found}


def assert_files(raw: Path, sums: dict[str, str], mount: str = "/mnt") -> None:
    """Every file the guest summed reads back with that sum from the host."""
    assert sums, "the guest printed no checksums"
    for path, digest in sums.items():
        assert file_sha256(raw, path[len(mount) :]) == digest, path


def allocated_bytes(image: Path, depth: int = 0) -> int:
    """Bytes of data the image itself holds (depth 0), or its base (depth 1)."""
    with fvd.open(str(image)) as img:
        return sum(e.length for e in img.extents() if e.data and e.depth == depth)


def list_dir(raw: Path, path: str) -> list[str]:
    """The names in a directory of the ext4 in `raw` (debugfs `ls -p`), without . and .."""
    r = run("debugfs", "-R", f"ls -p {path}", raw)
    # one "/inode/mode/uid/gid/name/size/" line per entry
    names = [line.split("/")[5] for line in r.stdout.decode().splitlines() if line.count("/") >= 6]
    return [n for n in names if n not in (".", "..")]
