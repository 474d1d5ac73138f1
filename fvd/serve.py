"""`fvd serve`: export an image over NBD with nbdkit and fvd's plugin (fvd.nbdkit_plugin).

nbdkit runs in the foreground until SIGTERM/SIGINT, which are passed on to it. nbdkit's
Python plugin embeds the interpreter nbdkit was built with; when its major.minor version
equals ours, numpy and the compiled fast path of this installation load there too (same
ABI tag, e.g. cpython-311-x86_64-linux-gnu), so our site-packages are passed to it.
Otherwise they cannot be (binary modules of another Python version), and the plugin runs
the pure-Python twin with whatever numpy/construct that interpreter has.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
from types import FrameType
from typing import Any, Optional

from fvd import qcow2
from fvd.control import default_control_path
from fvd.errors import ServeError
from fvd.image import open as open_image
from fvd.imageio import RawImage

PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbdkit_plugin.py")


def nbdkit_python_version(nbdkit: str = "nbdkit") -> str | None:
    """'3.11' for the Python embedded in nbdkit's python plugin, None if unavailable."""
    try:
        out = subprocess.run(
            [nbdkit, "python", "--dump-plugin"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("python_version="):
            return ".".join(line.split("=", 1)[1].split(".")[:2])
    return None


def python_path() -> list[str]:
    """This interpreter's sys.path without its standard library (the embedded Python has
    its own): site-packages, the package's parent directory, PYTHONPATH entries."""
    stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    out = [os.path.dirname(os.path.dirname(PLUGIN))]
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        real = os.path.realpath(p)
        if real in stdlib or any(
            real.startswith(s + os.sep) and "site-packages" not in real for s in stdlib
        ):
            continue
        if p not in out:
            out.append(p)
    return out


def build_command(
    image: str,
    *,
    snapshot: str | None = None,
    readonly: bool = False,
    socket: str | None = None,
    port: int | None = None,
    bind: str | None = None,
    shared: int | None = None,
    image_format: str = "fvd",
    force_share: bool = False,
    backing: str = "any",
    tls_certificates: str | None = None,
    tls_psk: str | None = None,
    insecure: bool = False,
    control: str | None = None,
    nbdkit: str = "nbdkit",
) -> list[str]:
    """The nbdkit command line that serves `image` (in the foreground). TCP listens on
    `bind` (default localhost only); with TLS configured, clients must use it."""
    if (socket is None) == (port is None):
        raise ValueError("give exactly one of a unix socket path or a TCP port")
    cmd = [nbdkit, "--foreground", "--exit-with-parent"]
    if socket is not None:
        cmd += ["--unix", socket]
    else:
        cmd += ["--port", str(port), "--ipaddr", bind or DEFAULT_BIND]
    cmd += tls_options(tls_certificates, tls_psk)
    if readonly or snapshot is not None:
        cmd.append("--readonly")
    if shared:
        cmd += ["--filter=limit"]
    image = os.path.abspath(image)
    if image_format == "raw":
        cmd += ["file", f"file={image}"]
    else:
        cmd += ["python", PLUGIN, f"file={image}", f"format={image_format}"]
        if snapshot is not None:
            cmd.append(f"snapshot={snapshot}")
        if readonly or snapshot is not None:
            cmd.append("readonly=true")
        if force_share:
            cmd.append("force_share=true")
        if backing != "any":
            cmd.append(f"backing={backing}")
        cmd.append(f"control={'none' if control is None else os.path.abspath(control)}")
        cmd.append(f"uri={describe(socket, port, bind, bool(tls_certificates or tls_psk))}")
    if shared:
        cmd.append(f"limit={shared}")
    return cmd


DEFAULT_BIND = "localhost"


def tls_options(certificates: str | None, psk: str | None) -> list[str]:
    """nbdkit's TLS options: X.509 (a directory with ca-cert.pem, server-cert.pem and
    server-key.pem) or a PSK file (psktool's `username:hexkey` lines); TLS is then
    required of every client."""
    if certificates is not None and psk is not None:
        raise ServeError("give one of --tls-certificates DIR or --tls-psk FILE, not both")
    if certificates is not None:
        if not os.path.isdir(certificates):
            raise ServeError(f"{certificates}: --tls-certificates needs a directory")
        return ["--tls=require", f"--tls-certificates={os.path.abspath(certificates)}"]
    if psk is not None:
        if not os.path.isfile(psk):
            raise ServeError(f"{psk}: --tls-psk needs a PSK file (username:hexkey lines)")
        return ["--tls=require", f"--tls-psk={os.path.abspath(psk)}"]
    return []


def check_exposure(image: str, options: dict[str, Any]) -> None:
    """A read-write TCP export without TLS lets anyone who reaches the port write the
    disk: refused unless `insecure` says so."""
    tcp = options.get("port") is not None
    writable = not options.get("readonly") and options.get("snapshot") is None
    tls = options.get("tls_certificates") is not None or options.get("tls_psk") is not None
    if tcp and writable and not tls and not options.get("insecure"):
        raise ServeError(
            f"{image}: a read-write TCP export without TLS lets anyone who reaches the "
            f"port write the disk: give --tls-certificates DIR or --tls-psk FILE, -r, "
            f"or --insecure"
        )


def plugin_environment(nbdkit: str = "nbdkit") -> dict[str, str]:
    """Environment for nbdkit: our site-packages when its Python matches ours."""
    env = dict(os.environ)
    embedded = nbdkit_python_version(nbdkit)
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    if embedded == ours:
        env["FVD_NBDKIT_PYTHONPATH"] = os.pathsep.join(python_path())
    else:
        print(
            f"fvd serve: nbdkit embeds Python {embedded}, fvd runs on {ours}: binary "
            f"modules cannot be shared, using the pure-Python twin and that Python's "
            f"numpy/construct",
            file=sys.stderr,
        )
        env["FVD_NBDKIT_PYTHONPATH"] = os.path.dirname(os.path.dirname(PLUGIN))
        env["FVD_PURE_PYTHON"] = "1"
    return env


def preflight(
    image: str,
    snapshot: str | None,
    readonly: bool,
    image_format: str,
    force_share: bool,
    backing: str = "any",
) -> None:
    """Open the image as the plugin will, so a locked image, a missing snapshot or a
    backing file the policy refuses is a one-line error here instead of a traceback
    from inside nbdkit."""
    if image_format == "raw":
        RawImage(image).close()
        return
    mode = "r" if readonly or snapshot is not None else "r+"
    if image_format == "qcow2":
        qcow2.open(image, mode, backing=backing).close()
        return

    with open_image(image, mode, force_share=force_share and mode == "r", backing=backing) as img:
        if snapshot is not None:
            img.open_snapshot(snapshot).close()


def serve(image: str, *, nbdkit: str = "nbdkit", **options: Any) -> int:
    """Run nbdkit serving `image` until it exits; returns its exit status."""
    exe = shutil.which(nbdkit)
    if exe is None:
        raise ServeError(
            f"{image}: cannot serve: nbdkit is not installed "
            f"(apt-get install nbdkit nbdkit-plugin-python)"
        )
    image_format = options.get("image_format", "fvd")
    check_exposure(image, options)
    tls_options(options.get("tls_certificates"), options.get("tls_psk"))
    options["control"] = control_path(image, image_format, options)
    preflight(
        image,
        options.get("snapshot"),
        options.get("readonly", False),
        image_format,
        options.get("force_share", False),
        options.get("backing", "any"),
    )
    tls = options.get("tls_certificates") or options.get("tls_psk")
    where = describe(options.get("socket"), options.get("port"), options.get("bind"), bool(tls))
    print(f"fvd serve: {image} at {where}", file=sys.stderr, flush=True)
    if options["control"] is not None:
        print(f"fvd serve: control socket {options['control']}", file=sys.stderr, flush=True)
    sock = options.get("socket")
    if sock is not None:
        _remove_stale_socket(sock)
    cmd = build_command(image, nbdkit=exe, **options)
    env = plugin_environment(exe) if image_format != "raw" else dict(os.environ)
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, frame: Optional[FrameType]) -> None:
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait()
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        for path in (sock, options["control"]):
            if path is not None:
                _remove_stale_socket(path)  # nbdkit leaves its socket file behind


def control_path(image: str, image_format: str, options: dict[str, Any]) -> str | None:
    """The control socket: --control PATH, else IMAGE.ctl for a read-write fvd export
    (a read-only one shares the image with other readers and needs none)."""
    given: str | None = options.get("control")
    if image_format != "fvd":
        if given is not None:
            raise ServeError(f"{image}: --control needs an fvd image, not {image_format}")
        return None
    if given is not None:
        path = os.path.abspath(given)
    elif options.get("readonly") or options.get("snapshot") is not None:
        return None
    else:
        path = default_control_path(image)
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ServeError(f"{path}: exists and is not a socket: not replacing it (--control)")
    return path


def _remove_stale_socket(path: str) -> None:
    """Unlink a unix socket nobody listens on (left by a server that has exited)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return  # a live server: nbdkit will say so
        except ConnectionRefusedError:
            pass
        except OSError:
            return
    os.unlink(path)


def describe(socket: str | None, port: int | None, bind: str | None, tls: bool = False) -> str:
    """The NBD URI clients use (nbds: TLS required)."""
    scheme = "nbds" if tls else "nbd"
    if socket is not None:
        return f"{scheme}+unix:///?socket={os.path.abspath(socket)}"
    return f"{scheme}://{bind or DEFAULT_BIND}:{port}/"
