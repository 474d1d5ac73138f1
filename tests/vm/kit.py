"""A real Linux guest on fvd images: kernel, initramfs, disks and boots.

The kernel is Debian's cloud kernel (`apt-get download linux-image-cloud-amd64`'s
versioned dependency, unpacked with `dpkg-deb -x`); the initramfs is busybox-static,
the six virtio modules the kernel keeps outside (loaded in order by /init) and the
static benchmark program `workload` (tests/vm/workload.c, `gcc -static`). Both live in
a cache directory (`$FVD_GUEST_CACHE`, default `~/.cache/fvd-guest`), never in the
repository.

A boot appends the guest script as a second cpio archive (the kernel unpacks
concatenated archives), runs QEMU with an overall timeout, always kills it, and
returns what the guest printed between the markers, its `FVD-RESULT` figures, the
accelerator used and the wall time.

    python -m tests.vm.kit prepare
    python -m tests.vm.kit mkimage --format fvd disk.fvd 2G
    python -m tests.vm.kit run --backend fvd-serve disk.fvd -c 'mount /dev/vda /mnt && df /mnt'
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNEL_META = "linux-image-cloud-amd64"
# Not built into the cloud kernel and not compressed: insmod'ed in this order.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
)
TOOLS = ("qemu-system-x86_64", "busybox", "cpio", "gcc", "apt-get", "apt-cache", "dpkg-deb")
BEGIN, END = "FVD-GUEST-BEGIN", "FVD-GUEST-END"
# NBD contenders serve over a unix socket; "-qemu" ones are files QEMU opens itself.
BACKENDS = ("fvd-serve", "qcow2-nbd", "raw-nbd", "qcow2-qemu", "raw-qemu")
BACKEND_FORMAT = {
    "fvd-serve": "fvd",
    "qcow2-nbd": "qcow2",
    "raw-nbd": "raw",
    "qcow2-qemu": "qcow2",
    "raw-qemu": "raw",
}
KVM_PROBE_SECONDS = 8.0  # a KVM boot to init takes ~1 s; nested KVM here hangs instead
SERVER_START_SECONDS = 60.0

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {" ".join(MODULES)}; do
    insmod /lib/modules/$m.ko || echo "FVD-ERROR insmod $m"
done
if grep -q fvd.disk /proc/cmdline; then
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
fi
echo {BEGIN}
sh /guest.sh
echo "{END} rc=$?"
sync
poweroff -f
"""


class GuestKitError(RuntimeError):
    """The kit cannot be built or a boot failed (the message says why)."""


class GuestUnavailable(GuestKitError):
    """A tool or the kernel package is missing on this machine: tests skip on it."""


@dataclass(frozen=True)
class Kit:
    kernel: Path
    initramfs: Path
    release: str
    accel: str


@dataclass
class BootResult:
    accel: str
    backend: str
    rc: int | None  # the guest script's exit status; None: it never finished
    output: str  # what the guest printed between the markers
    console: str  # the whole serial console
    seconds: float  # QEMU's wall time, start to exit
    results: dict[str, float] = field(default_factory=dict)

    def check(self) -> BootResult:
        """Raise with the console when the guest script failed."""
        if self.rc != 0:
            raise GuestKitError(f"guest script exited {self.rc}; console:\n{self.console}")
        return self


def cache_dir() -> Path:
    env = os.environ.get("FVD_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fvd-guest"


def missing_tools() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    busybox = shutil.which("busybox")
    if busybox and not _is_static_elf(Path(busybox)):
        missing.append("busybox-static (this busybox is dynamically linked)")
    return missing


def _is_static_elf(path: Path) -> bool:
    """No PT_INTERP program header: the binary runs without a loader in the initramfs."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    entsize = int.from_bytes(data[0x36:0x38], "little")
    count = int.from_bytes(data[0x38:0x3A], "little")
    types = (int.from_bytes(data[phoff + i * entsize :][:4], "little") for i in range(count))
    return 3 not in types  # PT_INTERP


def _run(*args: str | Path, ok: tuple[int, ...] | None = (0,), cwd: Path | None = None) -> str:
    try:
        r = subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, cwd=cwd, check=False
        )
    except FileNotFoundError as e:
        raise GuestUnavailable(f"{args[0]} is not installed") from e
    if ok is not None and r.returncode not in ok:
        raise GuestKitError(f"{' '.join(map(str, args))}: exit {r.returncode}\n{r.stderr}")
    return r.stdout


# --- kernel ---------------------------------------------------------------------------


def kernel_package() -> str:
    """The versioned package the meta package depends on (linux-image-6.1.*-cloud-amd64)."""
    out = _run("apt-cache", "depends", KERNEL_META, ok=None)
    found = re.findall(r"Depends:\s+(linux-image-\S+-cloud-amd64)", out)
    if not found:
        raise GuestUnavailable(
            f"`apt-cache depends {KERNEL_META}` names no kernel (run `apt-get update`?)"
        )
    return str(found[0])


def fetch_kernel(cache: Path) -> Path:
    """Download and unpack the kernel once; returns its directory in the cache."""
    try:
        package = kernel_package()
    except GuestUnavailable:
        cached = sorted(cache.glob("kernel/*/vmlinuz"))
        if cached:  # offline: keep using what an earlier run fetched
            return cached[-1].parent
        raise
    target = cache / "kernel" / package
    if (target / "vmlinuz").exists():
        return target
    with tempfile.TemporaryDirectory(dir=_mkdir(cache)) as tmp:
        try:
            _run("apt-get", "download", package, cwd=Path(tmp))
        except GuestKitError as e:
            raise GuestUnavailable(f"cannot download the kernel: {e}") from e
        deb = next(Path(tmp).glob("*.deb"))
        _run("dpkg-deb", "-x", deb, Path(tmp) / "root")
        staging = Path(tmp) / "kernel"
        _copy_kernel_files(Path(tmp) / "root", staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)  # complete or absent, never half there
    return target


def _copy_kernel_files(root: Path, staging: Path) -> None:
    (staging / "modules").mkdir(parents=True)
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    shutil.copy(vmlinuz, staging / "vmlinuz")
    (staging / "release").write_text(vmlinuz.name[len("vmlinuz-") :])
    for name in MODULES:
        found = list((root / "lib" / "modules").glob(f"*/kernel/**/{name}.ko"))
        if not found:
            raise GuestKitError(f"{name}.ko is not in the kernel package (compressed?)")
        shutil.copy(found[0], staging / "modules" / f"{name}.ko")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- initramfs ------------------------------------------------------------------------


def build_initramfs(cache: Path, kernel_dir: Path) -> Path:
    """busybox + modules + /init + /bin/workload as a newc cpio, cached by content."""
    workload_src = Path(__file__).with_name("workload.c")
    busybox = Path(shutil.which("busybox") or "busybox")
    key = hashlib.sha256()
    for part in (INIT.encode(), workload_src.read_bytes(), busybox.read_bytes()):
        key.update(hashlib.sha256(part).digest())
    key.update(str(kernel_dir).encode())
    out = cache / f"initramfs-{key.hexdigest()[:16]}.cpio"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=_mkdir(cache)) as tmp:
        tree = Path(tmp) / "tree"
        for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib/modules"):
            (tree / d).mkdir(parents=True)
        shutil.copy(busybox, tree / "bin" / "busybox")
        for ko in (kernel_dir / "modules").iterdir():
            shutil.copy(ko, tree / "lib" / "modules" / ko.name)
        (tree / "init").write_text(INIT)
        (tree / "init").chmod(0o755)
        _run("gcc", "-static", "-O2", "-o", tree / "bin" / "workload", workload_src)
        partial = Path(tmp) / "initramfs.cpio"
        _write_cpio(tree, partial)
        partial.rename(out)
    return out


def _write_cpio(tree: Path, out: Path) -> None:
    names = "\n".join(sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))) + "\n"
    with open(out, "wb") as f:
        r = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            input=names.encode(),
            stdout=f,
            stderr=subprocess.PIPE,
            cwd=tree,
            check=False,
        )
    if r.returncode:
        raise GuestKitError(f"cpio failed: {r.stderr.decode(errors='replace')}")


# --- accelerator ----------------------------------------------------------------------


def choose_accel(kernel: Path, initramfs: Path, cache: Path) -> str:
    """KVM when a short probe boot reaches init, TCG otherwise (remembered per host)."""
    forced = os.environ.get("FVD_GUEST_ACCEL")
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    qemu = _run("qemu-system-x86_64", "--version").splitlines()[0]
    key = hashlib.sha256(f"{os.uname().release} {qemu} {kernel}".encode()).hexdigest()[:16]
    remembered = cache / f"accel-{key}"
    if remembered.exists():
        return remembered.read_text().strip()
    kit = Kit(kernel, initramfs, kernel.parent.name, "kvm")
    try:
        ok = boot(kit, [], "true", timeout=KVM_PROBE_SECONDS).rc == 0
    except GuestKitError:
        ok = False
    accel = "kvm" if ok else "tcg"
    remembered.write_text(accel + "\n")
    return accel


def prepare() -> Kit:
    """Everything a boot needs, fetched and built once into the cache directory."""
    missing = missing_tools()
    if missing:
        raise GuestUnavailable(
            f"missing: {', '.join(missing)} (apt-get install qemu-system-x86 busybox-static "
            "cpio gcc)"
        )
    cache = _mkdir(cache_dir())
    kernel_dir = fetch_kernel(cache)
    initramfs = build_initramfs(cache, kernel_dir)
    kernel = kernel_dir / "vmlinuz"
    accel = choose_accel(kernel, initramfs, cache)
    return Kit(kernel, initramfs, (kernel_dir / "release").read_text().strip(), accel)


# --- images and disks -----------------------------------------------------------------


def make_ext4(
    raw: Path, size: int, populate: Path | None = None, fs_size: int | None = None
) -> None:
    """A raw file of `size` bytes holding a fresh ext4 of `fs_size` (default: all of it).

    Inode tables and the journal are written now, so the guest runs no lazy init."""
    with open(raw, "wb") as f:
        f.truncate(size)
    args: list[str | Path] = ["mkfs.ext4", "-q", "-F"]
    args += ["-E", "lazy_itable_init=0,lazy_journal_init=0"]
    if populate is not None:
        args += ["-d", populate]
    args.append(raw)
    if fs_size is not None:
        args.append(f"{fs_size // 1024}k")
    _run(*args)


def convert_raw(raw: Path, dst: Path, fmt: str) -> None:
    """The raw file as `fmt` (fvd through `fvd convert`, qcow2 through qemu-img), sparse."""
    if fmt == "fvd":
        _run(
            sys.executable, "-m", "fvd.cli", "convert", "-f", "raw", "-O", "fvd", raw, dst, cwd=ROOT
        )
    elif fmt == "qcow2":
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, dst)
    elif fmt == "raw":
        _run("cp", "--sparse=always", raw, dst)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def _wait_socket(proc: subprocess.Popen[bytes], path: Path, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GuestKitError(f"server exited {proc.returncode}: {log.read_text()}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            return
        time.sleep(0.05)
    raise GuestKitError(f"server did not listen on {path} in {SERVER_START_SECONDS:.0f} s")


def server_command(backend: str, image: Path, sock: Path) -> list[str]:
    if backend == "fvd-serve":
        return [sys.executable, "-m", "fvd.cli", "serve", "--socket", str(sock), str(image)]
    fmt = BACKEND_FORMAT[backend]
    # qemu-nbd's defaults (writeback host cache, flush = fdatasync) as fvd serve's.
    return [
        "qemu-nbd",
        "--persistent",
        "--discard=unmap",
        "-f",
        fmt,
        "--socket",
        str(sock),
        str(image),
    ]


@dataclass
class Disk:
    drive: str  # QEMU's -drive value
    server: subprocess.Popen[bytes] | None  # the NBD server serving it, if any


@contextlib.contextmanager
def attach(
    backend: str, image: Path, *, discard: bool = True, env: dict[str, str] | None = None
) -> Iterator[Disk]:
    """The QEMU `-drive` for `image` through `backend`; its server runs meanwhile."""
    opts = ",if=virtio" + (",discard=unmap" if discard else "")
    if backend.endswith("-qemu"):
        # host page cache + fdatasync at guest flushes, as the NBD servers do
        yield Disk(f"file={image},format={BACKEND_FORMAT[backend]},cache=writeback{opts}", None)
        return
    with tempfile.TemporaryDirectory(prefix="fvd-guest-") as tmp:
        sock, log = Path(tmp) / "nbd.sock", Path(tmp) / "server.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                server_command(backend, image, sock), stdout=logf, stderr=logf, cwd=ROOT, env=env
            )
        try:
            _wait_socket(proc, sock, log)
            yield Disk(f"file=nbd+unix:///?socket={sock},format=raw,cache=none{opts}", proc)
        finally:
            stop_server(proc)


def stop_server(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- boots ----------------------------------------------------------------------------


def qemu_command(kit: Kit, initrd: Path, drives: Sequence[str]) -> list[str]:
    cmdline = "console=ttyS0 quiet loglevel=3 panic=-1" + (" fvd.disk" if drives else "")
    args = ["qemu-system-x86_64", "-accel", kit.accel, "-m", "512M", "-smp", "1"]
    args += ["-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio"]
    args += ["-kernel", str(kit.kernel), "-initrd", str(initrd), "-append", cmdline]
    for drive in drives:
        args += ["-drive", drive]
    return args


def _initrd_with_script(kit: Kit, script: str, tmp: Path) -> Path:
    tree = tmp / "extra"
    tree.mkdir()
    (tree / "guest.sh").write_text(script)
    extra = tmp / "extra.cpio"
    _write_cpio(tree, extra)
    initrd = tmp / "initrd.cpio"
    with open(initrd, "wb") as out:
        for part in (kit.initramfs, extra):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    return initrd


class RunningGuest:
    """A booted QEMU whose console can be watched while the guest works."""

    def __init__(self, kit: Kit, proc: subprocess.Popen[bytes], console: Path, backend: str):
        self.kit, self.proc, self.console, self.backend = kit, proc, console, backend
        self.start = time.monotonic()

    def text(self) -> str:
        return self.console.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 300.0) -> str:
        """Until `pattern` (a regex) appears `count` times on the console; the console."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if len(re.findall(pattern, text, re.M)) >= count:
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise GuestKitError(f"{pattern!r} x{count} not seen; console:\n{self.text()}")

    def finish(self, timeout: float) -> BootResult:
        """Wait for the guest to power off, at most `timeout` s, then kill QEMU anyway."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        seconds = time.monotonic() - self.start
        return parse_console(self.kit.accel, self.backend, self.text(), seconds)


@contextlib.contextmanager
def started(
    kit: Kit, drives: Sequence[str], script: str, backend: str = ""
) -> Iterator[RunningGuest]:
    """QEMU running `script`; killed on the way out whatever happened."""
    with tempfile.TemporaryDirectory(prefix="fvd-guest-") as tmp:
        initrd = _initrd_with_script(kit, script, Path(tmp))
        console = Path(tmp) / "console.log"
        with open(console, "wb") as out:
            proc = subprocess.Popen(
                qemu_command(kit, initrd, drives),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        guest = RunningGuest(kit, proc, console, backend)
        try:
            yield guest
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def boot(
    kit: Kit, drives: Sequence[str], script: str, *, timeout: float = 300.0, backend: str = ""
) -> BootResult:
    """Boot, run `script` with busybox sh, power off; QEMU is killed whatever happens."""
    with started(kit, drives, script, backend) as guest:
        return guest.finish(timeout)


def parse_console(accel: str, backend: str, text: str, seconds: float) -> BootResult:
    text = text.replace("\r\n", "\n")
    rc: int | None = None
    output = ""
    if BEGIN in text:
        output = text.split(BEGIN, 1)[1].lstrip("\n")
        m = re.search(rf"^{END} rc=(\d+)$", output, re.M)
        if m:
            rc = int(m.group(1))
            output = output[: m.start()]
    results = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^FVD-RESULT (\S+) (\S+)$", output, re.M)
    }
    return BootResult(accel, backend, rc, output, text, seconds, results)


def run_on(
    kit: Kit,
    backend: str,
    image: Path,
    script: str,
    *,
    timeout: float = 300.0,
    discard: bool = True,
    env: dict[str, str] | None = None,
) -> BootResult:
    """One boot whose /dev/vda is `image` through `backend` (`env`: the server's)."""
    with attach(backend, image, discard=discard, env=env) as disk:
        return boot(kit, [disk.drive], script, timeout=timeout, backend=backend)


# --- command line ---------------------------------------------------------------------


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vm.kit", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="fetch the kernel, build the initramfs, probe KVM")
    mk = sub.add_parser("mkimage", help="a fresh ext4 image in the given format")
    mk.add_argument("--format", choices=("fvd", "qcow2", "raw"), default="fvd")
    mk.add_argument("image", type=Path)
    mk.add_argument("size", type=_size)
    rn = sub.add_parser("run", help="boot a guest on an image and run a script")
    rn.add_argument("--backend", choices=BACKENDS, default="fvd-serve")
    rn.add_argument("--no-discard", action="store_true", help="no discard=unmap on -drive")
    rn.add_argument("--timeout", type=float, default=300.0)
    src = rn.add_mutually_exclusive_group(required=True)
    src.add_argument("--script", type=Path, help="guest shell script (busybox sh)")
    src.add_argument("-c", dest="command_text", help="guest shell command")
    rn.add_argument("image", type=Path)
    args = p.parse_args(argv)
    try:
        return _dispatch(args)
    except GuestKitError as e:
        print(f"guest kit: {e}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "mkimage":
        with tempfile.TemporaryDirectory(dir=args.image.parent) as tmp:
            raw = Path(tmp) / "fs.raw"
            make_ext4(raw, args.size)
            convert_raw(raw, args.image, args.format)
        return 0
    kit = prepare()
    if args.command == "prepare":
        print(f"kernel {kit.kernel} ({kit.release})\ninitramfs {kit.initramfs}\naccel {kit.accel}")
        return 0
    script = args.script.read_text() if args.script else args.command_text
    r = run_on(
        kit,
        args.backend,
        args.image.resolve(),
        script,
        timeout=args.timeout,
        discard=not args.no_discard,
    )
    sys.stdout.write(r.output if r.rc is not None else r.console)
    print(f"[{r.backend}, accel {r.accel}, {r.seconds:.1f} s, guest rc {r.rc}]", file=sys.stderr)
    return 0 if r.rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
