"""Start and stop real NBD servers (fvd serve / nbdkit / qemu-nbd) for the tests."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = ("nbdkit", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "qemu-nbd")
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-libnbd (`nbdsh`) lives there only


def need_nbd_tools():
    """Skip without the tools; under CI=true that is a failure (.ci/run installs them)."""
    missing = [t for t in NEEDED if shutil.which(t) is None]
    if not _python_plugin():
        missing.append("nbdkit python plugin")
    if (
        not os.path.exists(SYSTEM_PYTHON)
        or subprocess.run(
            [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True, check=False
        ).returncode
    ):
        missing.append("python3-libnbd")
    if not missing:
        return
    reason = (
        f"NBD tools missing: {', '.join(missing)} (apt-get "
        f"install nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd qemu-utils)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " - required when CI=true")
    pytest.skip(reason)


def _python_plugin():
    try:
        return (
            subprocess.run(
                ["nbdkit", "python", "--dump-plugin"], capture_output=True, check=False
            ).returncode
            == 0
        )
    except OSError:
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args, ok=(0,), **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, **kw)
    assert r.returncode in ok, f"{args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def wait_listening(proc, socket_path=None, port=None, timeout=60.0):
    """Until the server accepts connections (or fails: then its stderr is shown)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"server exited {proc.returncode}: {out}{err}")
        try:
            if socket_path is not None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(socket_path))
            else:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start listening")


class Server:
    """A server process; `uri` is what clients connect to."""

    def __init__(self, args, uri, socket_path=None, port=None, env=None):
        self.args, self.uri = [str(a) for a in args], uri
        self.socket_path, self.port = socket_path, port
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
        wait_listening(self.proc, socket_path, port)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=60)
        if (
            self.socket_path is not None
            and os.path.exists(self.socket_path)
            and sig == signal.SIGKILL
        ):
            os.unlink(self.socket_path)
        return self.proc.returncode, out, err


def serve_env(impl):
    env = dict(os.environ)
    env.pop("FVD_PURE_PYTHON", None)
    if impl == "python":
        env["FVD_PURE_PYTHON"] = "1"
    return env


def fvd_serve(image, impl, *extra, socket_path=None, port=None):
    """`fvd serve` of this checkout (python -m fvd.cli) in the foreground."""
    args = [sys.executable, "-m", "fvd.cli", "serve", *extra]
    if socket_path is not None:
        args += ["--socket", socket_path]
        uri = f"nbd+unix:///?socket={socket_path}"
    else:
        args += ["--port", port, "--bind", "127.0.0.1"]
        uri = f"nbd://127.0.0.1:{port}/"
    return Server(args + [image], uri, socket_path, port, serve_env(impl))


def nbdkit_file(path, socket_path, *filters):
    """Plain nbdkit serving a raw file (the remote base)."""
    args = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", socket_path]
    args += [f"--filter={f}" for f, _ in filters] + ["file", path]
    args += [opt for _, opts in filters for opt in opts]
    return Server(args, f"nbd+unix:///?socket={socket_path}", socket_path)
