"""Incremental backups are compact: an incremental's file size, apparent (st_size) and
allocated (st_blocks * 512), is at most 1.25x its changed data rounded up to 64 KiB
blocks, plus the fixed regions of its format for the image's virtual size (for 64 MiB:
320 KiB, fvd's header, base name, bitmap, table and 256 KiB journal aligned to 64 KiB;
qcow2's header, refcount table, refcount block, L1 and L2 table clusters).

Oracle for the contents: the chain restored to raw equals the snapshot (`qemu-img
compare`), and `qemu-img check` finds the qcow2 incremental clean."""

import os
import random
import shutil
import subprocess

import pytest

import fvd
from fvd.units import KiB, MiB

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

SIZE = 64 * MiB
PAGES = 400  # 1.6 MB of scattered 4 KiB changes
BLOCK = 64 * KiB
FIXED = 320 * KiB  # the format's fixed regions for a 64 MiB image (module doc)


def qemu_img(*args):
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def nightly(tmp_path):
    """A 64 MiB image full of data, snapshot s1, 400 scattered 4 KiB pages rewritten,
    snapshot s2; returns (image, changed pages, s2's bytes)."""
    src = str(tmp_path / "vm.fvd")
    fvd.create(src, SIZE)
    rng = random.Random(20)
    pages = set()
    while len(pages) < PAGES:
        pages.add(rng.randrange(0, SIZE // 4096) * 4096)
    with fvd.open(src, "r+") as img:
        for off in range(0, SIZE, MiB):
            img.write(off, os.urandom(MiB))
        img.create_snapshot("s1")
        for p in pages:
            img.write(p, os.urandom(4096))
        img.create_snapshot("s2")
        want = img.read(0, SIZE)
    return src, pages, want


@pytest.mark.parametrize("fmt", ["fvd", "qcow2"])
def test_incremental_size_follows_changes(tmp_path, nightly, fmt):
    src, pages, want = nightly
    full = tmp_path / f"full.{fmt}"
    inc = tmp_path / f"inc.{fmt}"
    fvd.convert(src, full, snapshot="s1", dst_format=fmt)
    fvd.convert(src, inc, snapshot="s2", since="s1", backing=full.name, dst_format=fmt)
    changed = len({p // BLOCK for p in pages}) * BLOCK  # changed data in 64 KiB blocks
    assert changed >= PAGES * 4096
    st = os.stat(inc)
    bound = 1.25 * changed + FIXED
    assert st.st_size <= bound, (st.st_size, changed)
    assert st.st_blocks * 512 <= bound, (st.st_blocks * 512, changed)
    if fmt == "qcow2":
        qemu_img("check", inc)
    restored = tmp_path / "restored.raw"
    fvd.convert(inc, restored, dst_format="raw")
    (tmp_path / "want.raw").write_bytes(want)
    qemu_img("compare", "-f", "raw", "-F", "raw", restored, tmp_path / "want.raw")


def test_overlay_geometry_can_be_overridden(tmp_path, nightly):
    src, _, _ = nightly
    fvd.convert(src, tmp_path / "full.fvd", snapshot="s1")
    inc = tmp_path / "inc.fvd"
    fvd.convert(src, inc, since="s1", backing="full.fvd", chunk_size=MiB)
    with fvd.open(inc) as img:
        assert img.chunk_size == MiB
    inc2 = tmp_path / "inc2.fvd"
    fvd.convert(src, inc2, since="s1", backing="full.fvd")
    with fvd.open(inc2) as img:
        assert (img.chunk_size, img.block_size) == (64 * KiB, 64 * KiB)
