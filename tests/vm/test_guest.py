"""A real Linux guest (ext4, its journal, flushes, discard) on images fvd serves.

Five TCG boots by default (a snapshot between two boots, a copy-on-write overlay, a
SIGKILL of the server while the guest fsyncs, live snapshots through the control socket
while the guest writes); FVD_GUEST_FULL=1 adds the comparison backends, a discard-off
contrast and the pure-Python server.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
from pathlib import Path

import pytest

import fvd

from . import host
from .conftest import FULL
from .kit import (
    BACKEND_FORMAT,
    BootResult,
    Kit,
    attach,
    convert_raw,
    make_ext4,
    run_on,
    started,
    stop_server,
)

pytestmark = [pytest.mark.vm]
full_only = pytest.mark.skipif(not FULL, reason="FVD_GUEST_FULL=1 runs the longer guest tests")

MiB = 1 << 20
BIG_MIB = 48  # written, fsynced, deleted, then trimmed by the guest

# Files with fsync, a rewrite inside one, a delete, then a big file that is fsynced,
# deleted and trimmed; prints the checksums of what stays.
FIRST_BOOT = f"""set -e
mount /dev/vda /mnt
mkdir -p /mnt/d
for i in 1 2 3 4 5 6 7 8; do
    dd if=/dev/urandom of=/mnt/d/f$i bs=1k count=$((i * 37)) 2>/dev/null
    sync /mnt/d/f$i
done
sync /mnt/d
dd if=/dev/urandom of=/mnt/d/f2 bs=4k seek=1 count=3 conv=notrunc 2>/dev/null
sync /mnt/d/f2
rm /mnt/d/f8
dd if=/dev/urandom of=/mnt/big bs=1M count={BIG_MIB} 2>/dev/null
sync /mnt/big
rm /mnt/big
sync
fstrim -v /mnt
sha256sum /mnt/d/*
umount /mnt
"""


def second_boot(expected: dict[str, str]) -> str:
    """Checks the first boot's files, rewrites, appends, deletes, creates; prints sums."""
    listing = "".join(f"{digest}  {path}\n" for path, digest in expected.items())
    return f"""set -e
mount /dev/vda /mnt
cat > /tmp/first.sums <<'EOF'
{listing}EOF
sha256sum -c /tmp/first.sums
dd if=/dev/urandom of=/mnt/d/f1 bs=512 seek=3 count=5 conv=notrunc 2>/dev/null
sync /mnt/d/f1
dd if=/dev/urandom bs=1k count=20 2>/dev/null >> /mnt/d/f3
sync /mnt/d/f3
rm /mnt/d/f4
dd if=/dev/urandom of=/mnt/d/f9 bs=1k count=123 2>/dev/null
sync /mnt/d/f9
sync /mnt/d
sha256sum /mnt/d/*
umount /mnt
"""


def fresh_ext4(tmp_path: Path, fmt: str, size: int = 512 * MiB) -> Path:
    raw = tmp_path / "fs.raw"
    make_ext4(raw, size)
    image = tmp_path / f"disk.{fmt}"
    convert_raw(raw, image, fmt)
    raw.unlink()
    return image


def serve_env(impl: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FVD_PURE_PYTHON", None)
    if impl == "python":
        env["FVD_PURE_PYTHON"] = "1"
    return env


def booted(kit: Kit, backend: str, image: Path, script: str, impl: str, **kw: bool) -> BootResult:
    r = run_on(kit, backend, image, script, env=serve_env(impl), **kw)
    print(f"[{backend}, accel {r.accel}, {r.seconds:.1f} s]")  # the accel in every result
    return r.check()


def trimmed_bytes(output: str) -> int:
    m = re.search(r"(\d+) bytes trimmed", output)
    assert m, output
    return int(m.group(1))


def test_ext4_across_a_snapshot(kit: Kit, tmp_path: Path, impl: str) -> None:
    image = fresh_ext4(tmp_path, "fvd")
    before = host.allocated_bytes(image)
    first = booted(kit, "fvd-serve", image, FIRST_BOOT, impl)
    host.check_clean(image)
    # fstrim reached fvd: the 48 MiB the guest wrote and deleted are no longer held
    assert trimmed_bytes(first.output) >= BIG_MIB * MiB
    assert host.allocated_bytes(image) - before < BIG_MIB * MiB // 2
    first_sums = host.guest_sums(first.output, "/mnt/d/")
    assert len(first_sums) == 7

    host.fvd_cli("snapshot", "-c", "s1", image)  # between boots, the server stopped
    second = booted(kit, "fvd-serve", image, second_boot(first_sums), impl)
    assert second.output.count(": OK") == 7
    host.check_clean(image)
    second_sums = host.guest_sums(second.output, "/mnt/d/")
    assert "/mnt/d/f4" not in second_sums and "/mnt/d/f9" in second_sums

    live = host.export_raw(image, tmp_path / "live.raw")
    host.e2fsck_clean(live)
    host.assert_files(live, second_sums)
    snap = host.export_raw(image, tmp_path / "s1.raw", snapshot="s1")
    host.e2fsck_clean(snap)
    host.assert_files(snap, first_sums)


def _base_files(directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True)
    sums = {}
    for i, size in enumerate((3000, 70_000, 300_000, 2 * MiB + 123)):
        data = os.urandom(size)
        (directory / f"b{i}").write_bytes(data)
        sums[f"/mnt/base/b{i}"] = hashlib.sha256(data).hexdigest()
    return sums


BASE_BOOT = """set -e
mount /dev/vda /mnt
sha256sum /mnt/base/*
echo ---
dd if=/dev/urandom of=/mnt/base/b2 bs=1k seek=5 count=3 conv=notrunc 2>/dev/null
sync /mnt/base/b2
mkdir /mnt/new
dd if=/dev/urandom of=/mnt/new/n1 bs=1k count=200 2>/dev/null
sync /mnt/new/n1
sync /mnt/new
sha256sum /mnt/base/* /mnt/new/*
umount /mnt
"""


def test_guest_on_an_overlay_over_a_base(kit: Kit, tmp_path: Path, impl: str) -> None:
    tree = tmp_path / "tree"
    base_sums = _base_files(tree / "base")
    base = tmp_path / "base.raw"
    make_ext4(base, 256 * MiB, populate=tree)
    base_digest = hashlib.sha256(base.read_bytes()).hexdigest()
    overlay = tmp_path / "overlay.fvd"
    host.fvd_cli("create", "-b", base, "-F", "raw", overlay)

    r = booted(kit, "fvd-serve", overlay, BASE_BOOT, impl)
    read_from_base, after = r.output.split("---", 1)
    assert host.guest_sums(read_from_base, "/mnt/base/") == base_sums
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_digest  # base untouched
    host.check_clean(overlay)
    # copy-on-write: the overlay holds what the guest wrote; the rest still reads from
    # the base (at least the 2 MiB file the guest only read)
    assert host.allocated_bytes(overlay) < 16 * MiB
    assert host.allocated_bytes(overlay, depth=1) >= 2 * MiB
    raw = host.export_raw(overlay, tmp_path / "overlay.raw")
    host.e2fsck_clean(raw)
    final = host.guest_sums(after, "/mnt/")
    assert final["/mnt/base/b2"] != base_sums["/mnt/base/b2"]
    host.assert_files(raw, final)


@full_only
@pytest.mark.parametrize("backend", ["qcow2-nbd", "raw-nbd", "qcow2-qemu", "raw-qemu"])
def test_same_guest_on_the_comparison_backends(
    kit: Kit, tmp_path: Path, impl: str, backend: str
) -> None:
    """The benchmark's other contenders carry the same guest correctly."""
    if impl == "python":
        pytest.skip("fvd does not serve these")
    fmt = BACKEND_FORMAT[backend]
    image = fresh_ext4(tmp_path, fmt)
    r = booted(kit, backend, image, FIRST_BOOT, impl)
    assert trimmed_bytes(r.output) >= BIG_MIB * MiB
    host.check_clean(image, fmt)
    raw = host.export_raw(image, tmp_path / "export.raw", fmt)
    host.e2fsck_clean(raw)
    host.assert_files(raw, host.guest_sums(r.output, "/mnt/d/"))


@full_only
def test_without_discard_unmap_trim_does_not_reach_fvd(kit: Kit, tmp_path: Path, impl: str) -> None:
    """The contrast that shows the trim assertion above can fail."""
    image = fresh_ext4(tmp_path, "fvd")
    before = host.allocated_bytes(image)
    booted(kit, "fvd-serve", image, FIRST_BOOT, impl, discard=False)
    host.check_clean(image)
    assert host.allocated_bytes(image) - before >= BIG_MIB * MiB


# Files created one by one with fsync; a checksum is printed only once the fsync returned.
FSYNC_LOOP = """set -e
mount /dev/vda /mnt
mkdir -p /mnt/d
i=0
while [ $i -lt 400 ]; do
    i=$((i + 1))
    dd if=/dev/urandom of=/mnt/d/f$i bs=1k count=$((i % 23 + 1)) 2>/dev/null
    sync /mnt/d/f$i
    sync /mnt/d
    sha256sum /mnt/d/f$i
done
"""
FSYNCED = r"^[0-9a-f]{64}\s+/mnt/d/f\d+$"


def test_server_sigkill_mid_workload_keeps_every_fsynced_file(
    kit: Kit, tmp_path: Path, impl: str
) -> None:
    image = fresh_ext4(tmp_path, "fvd", 256 * MiB)
    with attach("fvd-serve", image, env=serve_env(impl)) as disk:
        assert disk.server is not None
        with started(kit, [disk.drive], FSYNC_LOOP, "fvd-serve") as guest:
            guest.wait_for(FSYNCED, count=30)
            stop_server(disk.server, signal.SIGKILL)
            r = guest.finish(timeout=30)  # the guest sees I/O errors; QEMU is killed anyway
    print(f"[fvd-serve SIGKILLed, accel {r.accel}, {r.seconds:.1f} s]")
    fsynced = host.guest_sums(r.console.replace("\r\n", "\n"), "/mnt/d/")
    assert len(fsynced) >= 30
    host.check_clean(image)  # the journal replays; nothing leaked or corrupt
    raw = host.export_raw(image, tmp_path / "after-kill.raw")
    host.recover_like_a_crash(raw)  # ext4's own journal replays; nothing torn
    host.assert_files(raw, fsynced)


# Files created one by one, each fsynced (with its directory) before the next one starts
# and its checksum printed only then, until the host writes "stop" to /dev/vdb; meanwhile
# a background writer keeps unsynced data, new files and deletes on their way to the
# disk (writeback every 0.2 s, a journal commit every second), so the snapshots catch
# ext4 mid-transaction.
LIVE_LOOP = """set -e
i=0
while [ ! -b /dev/vdb ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
mount -o commit=1 /dev/vda /mnt
mkdir -p /mnt/d /mnt/bg
sync /mnt
echo 20 > /proc/sys/vm/dirty_writeback_centisecs
echo 50 > /proc/sys/vm/dirty_expire_centisecs
(
    j=0
    while [ ! -e /tmp/stop ]; do
        j=$((j + 1))
        dd if=/dev/urandom of=/mnt/bg/b$j bs=16k count=$((j % 8 + 1)) 2>/dev/null
        rm -f /mnt/bg/b$((j - 4))
    done
) &
i=0
while [ "$(dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | head -n 1)" != stop ]; do
    if [ $i -ge 3000 ]; then echo "FVD-ERROR the host never said stop"; exit 1; fi
    i=$((i + 1))
    dd if=/dev/urandom of=/mnt/d/f$i bs=1k count=$((i % 23 + 1)) 2>/dev/null
    sync /mnt/d/f$i
    sync /mnt/d
    sha256sum /mnt/d/f$i
done
touch /tmp/stop
wait
umount /mnt
"""
LIVE_SNAPSHOTS = ("s1", "s2", "s3")
LIVE_STEP = 15  # files fsynced between two snapshot requests


def fsynced_so_far(console: str) -> dict[str, str]:
    return host.guest_sums(console.replace("\r\n", "\n"), "/mnt/d/")


def take_live_snapshot(image: Path, name: str) -> None:
    """The first through the CLI (which finds the control socket), the rest through
    fvd.connect: both are the control socket's snapshot-create."""
    if name == LIVE_SNAPSHOTS[0]:
        host.fvd_cli("snapshot", "-c", name, image)
    else:
        with fvd.connect(image) as server:
            server.create_snapshot(name)


def assert_crash_consistent(raw: Path, before: dict[str, str], final: dict[str, str]) -> None:
    """`raw` is a crash state of the guest's ext4 (host.recover_like_a_crash), every file
    fsynced before the snapshot request reads back with its checksum, and so does every
    file older than the newest one the snapshot holds (the guest started a file only after
    the previous one and its directory were fsynced, so a point in time holds a prefix)."""
    out = host.recover_like_a_crash(raw)
    present = {int(n[1:]) for n in host.list_dir(raw, "/d") if re.fullmatch(r"f\d+", n)}
    newest = max(present, default=0)
    older = {f"/mnt/d/f{k}": final[f"/mnt/d/f{k}"] for k in range(1, newest)}
    assert set(before) <= set(older) | {f"/mnt/d/f{newest}"}, (sorted(before), newest)
    host.assert_files(raw, {**older, **before})
    recovered = "recovering journal" in out
    print(
        f"[{raw.stem}: {len(before)} files fsynced before the request, holds f1..f{newest}"
        f"{', journal recovered' if recovered else ''}]"
    )


def test_live_snapshots_while_the_guest_writes_are_crash_consistent(
    kit: Kit, tmp_path: Path, impl: str
) -> None:
    image = fresh_ext4(tmp_path, "fvd", 256 * MiB)
    flag = tmp_path / "flag.raw"  # the guest's /dev/vdb: "stop" ends its loop
    flag.write_bytes(b"go\n".ljust(4096, b"\n"))
    before: dict[str, dict[str, str]] = {}
    with attach("fvd-serve", image, env=serve_env(impl)) as disk:
        drives = [disk.drive, f"file={flag},format=raw,if=virtio,readonly=on"]
        with started(kit, drives, LIVE_LOOP, "fvd-serve") as guest:
            for k, name in enumerate(LIVE_SNAPSHOTS, 1):
                # what the guest reported fsynced before the request is sent
                before[name] = fsynced_so_far(guest.wait_for(FSYNCED, count=k * LIVE_STEP))
                take_live_snapshot(image, name)
            # the guest goes on writing after the last snapshot, then stops
            guest.wait_for(FSYNCED, count=len(before[LIVE_SNAPSHOTS[-1]]) + LIVE_STEP)
            with open(flag, "r+b") as f:
                f.write(b"stop\n")
            r = guest.finish(timeout=120)
    print(f"[fvd-serve, live snapshots, accel {r.accel}, {r.seconds:.1f} s]")
    r.check()
    final = fsynced_so_far(r.output)
    host.check_clean(image)
    for name in LIVE_SNAPSHOTS:
        snap = host.export_raw(image, tmp_path / f"{name}.raw", snapshot=name)
        assert_crash_consistent(snap, before[name], final)
        snap.unlink()
    live = host.export_raw(image, tmp_path / "live.raw")
    host.e2fsck_clean(live)  # unmounted cleanly: nothing to recover
    host.assert_files(live, final)
