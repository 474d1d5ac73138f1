"""Live backups of a served image (issue 21): `fvd serve`'s control socket, snapshot
exports, point in time under concurrent NBD writers, SIGKILL during a snapshot create,
and the backup walk-through through the CLI. Real nbdkit, real clients (libnbd through
the system Python, qemu-io, qemu-img, nbdinfo, nbdcopy).

FVD_LIVE_CRASH_ROUNDS sets the SIGKILL rounds per implementation (default 2).
"""

import json
import os
import random
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest

import fvd
from fvd.control import MAX_REQUEST, ControlClient, default_control_path
from fvd.imageio import RawImage
from fvd.nbd_client import NbdClient
from fvd.ops.checksum import checksum
from fvd.serve import PLUGIN, plugin_environment
from fvd.units import KiB, MiB

from ..nbd_helpers import ROOT, SYSTEM_PYTHON, free_port, fvd_serve, need_nbd_tools, run

pytestmark = pytest.mark.interop
WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbd_writer.py")
CHUNK = 64 * KiB
SLOT = 12 * KiB  # a slot often spans two chunks: a write must still land whole
SECTOR = 512
RECORD = struct.Struct("<IIQ")  # (writer, slot, version), as nbd_writer.py writes
CRASH_ROUNDS = int(os.environ.get("FVD_LIVE_CRASH_ROUNDS", "2"))


@pytest.fixture(autouse=True)
def _tools():
    need_nbd_tools()


def cli(*args, ok=(0,)):
    return run(sys.executable, "-m", "fvd.cli", *args, ok=ok, cwd=ROOT)


def served_image(tmp_path, impl, size=2 * MiB, *extra):
    image = tmp_path / "vm.fvd"
    fvd.create(image, size, chunk_size=CHUNK, block_size=4 * KiB)
    return image, fvd_serve(image, impl, *extra, socket_path=tmp_path / "nbd.sock")


def export(srv, name):
    return f"nbd+unix:///{name}?socket={srv.socket_path}"


class Raw:
    """A raw control connection: greeting, then lines."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.greeting = json.loads(self.file.readline())

    def send(self, data):
        self.sock.sendall(data)
        line = self.file.readline()
        return json.loads(line) if line else None

    def close(self):
        self.file.close()
        self.sock.close()


# ----- protocol ------------------------------------------------------------------------
def test_control_protocol(tmp_path, impl):
    if impl == "python":
        pytest.skip("the protocol does not depend on the fast path")
    image = tmp_path / "vm.fvd"
    fvd.create(image, 2 * MiB)
    ctl = default_control_path(image)
    stale = socket.socket(socket.AF_UNIX)  # left by a killed server: replaced
    stale.bind(ctl)
    stale.close()
    srv = fvd_serve(image, impl, socket_path=tmp_path / "nbd.sock")
    try:
        assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
        c = Raw(ctl)
        g = c.greeting["fvd"]
        assert g["protocol"] == 1 and g["image"] == str(image) and not g["read-only"]
        assert "snapshot-create" in g["commands"]

        def err(line):
            return c.send(line)["error"]["class"]

        assert err(b"{nope\n") == "ParseError"
        assert err(b"[1, 2]\n") == "InvalidRequest"
        assert err(b'{"execute": "snapshot-create"}\n') == "InvalidArgument"
        assert err(b'{"execute": "snapshot-create", "arguments": {"name": 5}}\n') == (
            "InvalidArgument"
        )
        assert err(b'{"execute": "flush", "arguments": {"x": 1}}\n') == "InvalidArgument"
        assert err(b'{"execute": "flush", "bogus": 1}\n') == "InvalidRequest"
        assert err(b'{"execute": "eject"}\n') == "CommandNotFound"
        r = c.send(b'{"execute": "snapshot-delete", "arguments": {"name": "x"}, "id": "q"}\n')
        assert r["error"]["class"] == "SnapshotNotFound" and r["id"] == "q"
        r = c.send(b'{"execute": "snapshot-create", "arguments": {"name": "s1"}, "id": 7}\n')
        assert r["return"]["name"] == "s1" and r["id"] == 7
        assert err(b'{"execute": "snapshot-create", "arguments": {"name": "s1"}}\n') == (
            "InvalidArgument"  # the name is taken
        )
        names = [s["name"] for s in c.send(b'{"execute": "query-snapshots"}\n')["return"]]
        assert names == ["s1"]
        assert c.send(b'{"execute": "check"}\n')["return"]["ok"] is True
        assert c.send(b'{"execute": "changed-extents", "arguments": {"since": "s1"}}\n') == {
            "return": []
        }
        # an oversize request: an error, then the connection is closed
        assert err(b'{"execute": "' + b"x" * MAX_REQUEST + b'"}\n') == "RequestTooLarge"
        assert c.file.readline() == b""
        c.close()

        clients = [Raw(ctl) for _ in range(8)]  # the limit: a ninth is told so
        ninth = socket.socket(socket.AF_UNIX)
        ninth.connect(ctl)
        reply = json.loads(ninth.makefile("rb").readline())
        assert reply["error"]["class"] == "TooManyClients"
        ninth.close()
        with pytest.raises(fvd.ControlError) as refused:  # the client names the refusal
            ControlClient(ctl)
        assert refused.value.error_class == "TooManyClients"
        for x in clients:
            x.close()

        with fvd.connect(image) as client:  # by image, and by socket path
            assert [s.name for s in client.snapshots()] == ["s1"]
        with fvd.connect(ctl) as client:
            assert client.info()["virtual-size"] == 2 * MiB
            with pytest.raises(fvd.ControlError) as e:
                client.execute("eject")
            assert e.value.error_class == "CommandNotFound"
    finally:
        srv.stop()
    assert not os.path.exists(ctl)


def test_control_path_that_is_a_file_is_one_line(tmp_path, impl):
    if impl == "python":
        pytest.skip("the protocol does not depend on the fast path")
    image = tmp_path / "vm.fvd"
    fvd.create(image, MiB)
    ctl = tmp_path / "vm.fvd.ctl"
    ctl.write_text("mine")
    r = cli("serve", "--socket", tmp_path / "nbd.sock", image, ok=(1,))
    assert "not a socket" in r.stderr and r.stderr.count("\n") == 1
    assert ctl.read_text() == "mine"


def test_read_only_serve(tmp_path, impl):
    if impl == "python":
        pytest.skip("the protocol does not depend on the fast path")
    image = tmp_path / "vm.fvd"
    fvd.create(image, 2 * MiB)
    with fvd.open(image, "r+") as img:
        img.write(0, b"a" * 4096)
        img.create_snapshot("s1")
    ctl = tmp_path / "ro.ctl"
    srv = fvd_serve(image, impl, "-r", socket_path=tmp_path / "nbd.sock")
    try:
        assert not os.path.exists(default_control_path(image))  # none unless asked for
        assert 'export="s1"' in run("nbdinfo", "--list", srv.uri).stdout
    finally:
        srv.stop()
    srv = fvd_serve(image, impl, "-r", "--control", ctl, socket_path=tmp_path / "nbd.sock")
    try:
        with fvd.connect(ctl) as client:
            with pytest.raises(fvd.ControlError) as e:
                client.create_snapshot("s2")
            assert e.value.error_class == "ReadOnly"
            assert client.checksum("s1") == fvd.open(image).checksum()
    finally:
        srv.stop()


# ----- snapshot exports ------------------------------------------------------------------
def test_snapshot_exports_while_writing(tmp_path, impl):
    image, srv = served_image(tmp_path, impl, 4 * MiB)
    writer = QemuIoWriter(srv.uri, 4 * MiB)
    try:
        writer.wait_writes(5)
        with fvd.connect(image) as client:
            client.create_snapshot("s1")
            writer.wait_writes(writer.count + 5)
            client.create_snapshot("s2")
            listing = run("nbdinfo", "--list", srv.uri).stdout
            assert 'export="s1"' in listing and 'export="s2"' in listing
            # a copy of each snapshot while the writer goes on: twice the same bytes
            for name in ("s1", "s2"):
                a, b = tmp_path / f"{name}.a", tmp_path / f"{name}.b"
                run("nbdcopy", export(srv, name), a)
                run("qemu-img", "convert", "-f", "raw", "-O", "raw", export(srv, name), b)
                assert a.read_bytes() == b.read_bytes()
                assert client.checksum(name)["checksum"] == local_checksum(a)
            assert '"is_read_only": true' in run("nbdinfo", "--json", export(srv, "s1")).stdout
            r = run("qemu-io", "-f", "raw", "-c", "write 0 4k", export(srv, "s1"), ok=(1,))
            assert "Permission denied" in r.stderr  # nbdkit: a read-only export
            nbd = NbdClient(export(srv, "s1"))
            assert (tmp_path / "s1.a").read_bytes() == nbd_read(nbd, 0, nbd.size)
            nbd.close()
            served_map = nbd_map(export(srv, "s2"))
            with client.open_export("s2") as disk:
                ours = merged((e.start, e.length, e.data, e.zero) for e in disk.extents())
            assert ours == served_map
            # a snapshot export cannot be deleted while a reader holds it
            reader = NbdClient(export(srv, "s1"), max_connections=1)
            with pytest.raises(fvd.SnapshotBusyError, match="disconnect"):
                client.delete_snapshot("s1")
            reader.close()
            wait_until(lambda: client.exports()[1]["readers"] == 0)
            client.delete_snapshot("s1")
            assert 'export="s1"' not in run("nbdinfo", "--list", srv.uri).stdout
            run("nbdinfo", "--size", export(srv, "s1"), ok=(1,))
        assert writer.alive()
    finally:
        writer.stop()
        srv.stop()
    with fvd.open(image) as img:
        assert img.check().ok
        with img.open_snapshot("s2") as view:
            assert view.read(0, view.size) == (tmp_path / "s2.a").read_bytes()
            local = merged((e.start, e.length, e.data, e.zero) for e in view.extents())
            assert local == served_map


def nbd_read(client, offset, length):
    buf = bytearray(length)
    client.readinto(offset, buf)
    return bytes(buf)


def nbd_map(uri):
    """nbdinfo --map as (start, length, data, zero) runs."""
    out = []
    for line in run("nbdinfo", "--map", uri).stdout.splitlines():
        start, length, kind = (int(x) for x in line.split()[:3])
        out.append((start, length, not kind & 1, bool(kind & 2)))
    return merged(out)


def merged(runs):
    out = []
    for start, length, data, zero in runs:
        if out and out[-1][2:] == (data, zero) and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, data, zero)
        else:
            out.append((start, length, data, zero))
    return out


def local_checksum(path):
    with RawImage(path) as raw:
        return checksum(raw, 4 * MiB, "blake2b")["checksum"]


def wait_until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class QemuIoWriter:
    """A VM-like writer: one qemu-io over NBD, fed write commands (64 KiB patterns at
    spread offsets) through its stdin until stopped."""

    def __init__(self, uri, size):
        self.proc = subprocess.Popen(
            ["qemu-io", "-f", "raw", uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.count = 0
        self.size = size
        self._stop = threading.Event()
        self._lock = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._feed, daemon=True).start()

    def _feed(self):
        rng = random.Random(5)
        try:
            while not self._stop.is_set():
                off = rng.randrange(self.size // (4 * KiB) - 16) * 4 * KiB
                self.proc.stdin.write(f"write -P {rng.randrange(1, 256)} {off} 64k\nsleep 2\n")
                self.proc.stdin.flush()
                time.sleep(0.002)
        except (BrokenPipeError, ValueError):
            pass

    def _read(self):
        for line in self.proc.stdout:
            if line.lstrip("qemu-io> ").startswith("wrote "):
                with self._lock:
                    self.count += 1
                    self._lock.notify_all()

    def wait_writes(self, n, timeout=60.0):
        with self._lock:
            assert self._lock.wait_for(lambda: self.count >= n, timeout), "writer stalled"

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        self._stop.set()
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----- point in time ---------------------------------------------------------------------
def start_writers(uri, tmp_path, writers, slots, count, seed):
    procs = []
    for w in range(writers):
        log = tmp_path / f"writer{w}.log"
        args = [SYSTEM_PYTHON, WRITER, uri, log, w, w * slots, slots, SLOT, count, seed + w]
        procs.append((subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE), log))
    for p, _ in procs:  # all connected before anything else happens
        assert p.stdout.readline() == b"ready\n"
    return procs


def read_logs(procs):
    """{slot: [(version, t_send, t_ack or None, fua)]}, [(t_send, t_ack) of flushes]."""
    writes, flushes = {}, []
    for _, log in procs:
        for line in log.read_text().splitlines():
            kind, *f = line.split()
            if kind == "F":
                flushes.append((float(f[0]), float(f[1])))
            else:
                slot, version, fua, t_send = int(f[0]), int(f[1]), f[2] == "1", float(f[3])
                t_ack = float(f[4]) if kind == "W" else None
                writes.setdefault(slot, []).append((version, t_send, t_ack, fua))
    return writes, flushes


def sector_versions(data, slot):
    """The version in each sector of a slot: 0 for zeros, -1 for anything else."""
    out = []
    for i in range(0, len(data), SECTOR):
        sector = data[i : i + SECTOR]
        if sector == bytes(SECTOR):
            out.append(0)
            continue
        first = sector[: RECORD.size]
        _, got_slot, version = RECORD.unpack(first)
        ok = got_slot == slot and sector == first * (SECTOR // RECORD.size)
        out.append(version if ok else -1)
    return out


def allowed_versions(ws, floor_of, sent_before):
    """floor (the newest version that must be there) and every later one sent in time."""
    floor = max((v for v, ts, ta, fua in ws if floor_of(ts, ta, fua)), default=0)
    return {floor} | {v for v, ts, _, _ in ws if v > floor and ts < sent_before}


def check_snapshot(read_slot, writes, t_req, t_reply, name):
    """Every write acknowledged before the request is in; none sent after the reply is;
    each slot holds one write entirely (the gate keeps a write on one side)."""
    for slot, ws in writes.items():
        allowed = allowed_versions(ws, lambda ts, ta, fua: ta is not None and ta < t_req, t_reply)
        got = set(sector_versions(read_slot(slot), slot))
        assert len(got) == 1 and got <= allowed, (name, slot, sorted(got), sorted(allowed))


def take_snapshots(client, procs, prefix, most):
    """Snapshots while the writers run: [(name, t_req, t_reply)]."""
    taken = []
    while len(taken) < most and any(p.poll() is None for p, _ in procs):
        name = f"{prefix}{len(taken)}"
        t_req = time.monotonic()
        client.create_snapshot(name)
        taken.append((name, t_req, time.monotonic()))
        time.sleep(0.05)
    return taken


def test_point_in_time_under_concurrent_writers(tmp_path, impl):
    writers, slots = 3, 40
    image, srv = served_image(tmp_path, impl, 2 * MiB)
    try:
        procs = start_writers(srv.uri, tmp_path, writers, slots, 400, 11)
        with fvd.connect(image) as client:
            taken = take_snapshots(client, procs, "p", 8)
            for p, _ in procs:
                assert p.wait(timeout=120) == 0
            writes, _ = read_logs(procs)
            assert len(taken) >= 2, "the writers finished before two snapshots"
            for name, t_req, t_reply in taken:  # read through the snapshot exports
                nbd = NbdClient(export(srv, name))
                try:
                    check_snapshot(
                        lambda s, nbd=nbd: nbd_read(nbd, s * SLOT, SLOT),
                        writes,
                        t_req,
                        t_reply,
                        name,
                    )
                finally:
                    nbd.close()
    finally:
        srv.stop()
    with fvd.open(image) as img:  # after a clean stop: every acknowledged write
        assert img.check().ok
        for slot, ws in writes.items():
            assert sector_versions(img.read(slot * SLOT, SLOT), slot) == [ws[-1][0]] * (
                SLOT // SECTOR
            )


# ----- SIGKILL during a snapshot create ------------------------------------------------------
def nbdkit_pid(serve_proc):
    wait_until(lambda: _children(serve_proc.pid))
    return _children(serve_proc.pid)[0]


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def test_sigkill_during_snapshot_create(tmp_path, impl):
    rng = random.Random(21)
    for rnd in range(CRASH_ROUNDS):
        crash_round(tmp_path / f"r{rnd}", impl, rng)


def crash_round(tmp_path, impl, rng):
    tmp_path.mkdir()
    image, srv = served_image(tmp_path, impl, 2 * MiB)
    procs = start_writers(srv.uri, tmp_path, 3, 40, 10**6, rng.randrange(1000))
    pid = nbdkit_pid(srv.proc)
    with fvd.connect(image) as client:
        time.sleep(0.2)
        taken = take_snapshots(client, procs, "a", 2)
        # a raw request, so the kill can land while the server works on it
        c = Raw(default_control_path(image))
        t_req = time.monotonic()
        c.sock.sendall(b'{"execute": "snapshot-create", "arguments": {"name": "k"}}\n')
        time.sleep(rng.uniform(0, 0.004))
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
    try:
        line = c.file.readline()
    except OSError:
        line = b""
    c.close()
    srv.stop()
    for p, _ in procs:
        assert p.wait(timeout=60) == 0
    writes, flushes = read_logs(procs)
    acked_k = bool(line) and "return" in json.loads(line)
    durable = [ts for ts, _ in flushes] + [t for _, t, _ in taken] + ([t_req] if acked_k else [])
    point = max(durable, default=0.0)
    with fvd.open(image, "r+") as img:
        assert img.check().ok
        names = [s.name for s in img.snapshots()]
        assert [n for n, _, _ in taken] == names[: len(taken)]
        if acked_k:
            assert "k" in names
        if "k" in names:
            taken.append(("k", t_req, t_kill))
        for name, t0, t1 in taken:
            with img.open_snapshot(name) as view:
                check_snapshot(lambda s, v=view: v.read(s * SLOT, SLOT), writes, t0, t1, name)
        for slot, ws in writes.items():  # the live image: old-or-new per sector
            allowed = allowed_versions(
                ws, lambda ts, ta, fua: ta is not None and (fua or ta < point), t_kill
            )
            got = set(sector_versions(img.read(slot * SLOT, SLOT), slot))
            assert got <= allowed, (slot, sorted(got), sorted(allowed))


# ----- the walk-through: three live snapshots and incremental backups ----------------------------
def test_three_live_incremental_backups_through_the_cli(tmp_path, impl):
    if impl == "python":
        pytest.skip("one run: the CLI path does not depend on the fast path")
    image, srv = served_image(tmp_path, impl, 8 * MiB)
    writer = QemuIoWriter(srv.uri, 8 * MiB)
    try:
        prev = None
        for i in (1, 2, 3):
            writer.wait_writes(writer.count + 10)
            r = cli("snapshot", "-c", f"b{i}", image)
            assert "held by fvd serve" in r.stderr and r.stderr.count("\n") == 1
            backup = tmp_path / f"backup{i}.qcow2"
            args = ["convert", "-O", "qcow2", "-l", f"b{i}"]
            if prev is not None:
                args += ["--since", f"b{i - 1}", "-B", prev.name, "-F", "qcow2"]
            cli(*args, image, backup)
            run("qemu-img", "compare", "-F", "raw", backup, export(srv, f"b{i}"))
            if prev is not None:
                changed = json.loads(
                    cli(
                        "map", "--output=json", "--since", f"b{i - 1}", "--until", f"b{i}", image
                    ).stdout
                )
                assert changed, "the writer changed nothing between two snapshots"
                cli("snapshot", "-d", f"b{i - 1}", image)
            prev = backup
        assert writer.alive()
        # through the server too, a backup of another snapshot is no base for an
        # incremental: backup1 holds b1, not b3 (checked by snapshot UUIDs on the wire)
        cli("snapshot", "-c", "b4", image)
        wrong = cli(
            "convert",
            "-O",
            "qcow2",
            "-l",
            "b4",
            "--since",
            "b3",
            "-B",
            "backup1.qcow2",
            "-F",
            "qcow2",
            image,
            tmp_path / "wrong.qcow2",
            ok=(1,),
        )
        assert "a full backup is needed" in wrong.stderr
        assert not (tmp_path / "wrong.qcow2").exists()
        cli("snapshot", "-d", "b4", image)
        assert fvd.backup_info(tmp_path / "backup3.qcow2").since == "b2"
        listed = json.loads(cli("snapshot", "-l", "--output=json", image).stdout)
        assert [s["name"] for s in listed] == ["b3"]
        check = cli("check", image)
        assert "No errors" in check.stdout
    finally:
        writer.stop()
        srv.stop()
    restored = tmp_path / "restored.raw"  # the chain, read by qemu-img
    run("qemu-img", "convert", "-O", "raw", tmp_path / "backup3.qcow2", restored)
    with fvd.open(image) as img, img.open_snapshot("b3") as view:
        assert view.read(0, view.size) == restored.read_bytes()
    for i in (1, 2, 3):
        run("qemu-img", "check", tmp_path / f"backup{i}.qcow2")


# ----- the CLI on a served image, over TCP -----------------------------------------------------
def test_cli_commands_through_the_server_over_tcp(tmp_path, impl):
    if impl == "python":
        pytest.skip("one run: the CLI path does not depend on the fast path")
    image = tmp_path / "vm.fvd"
    fvd.create(image, 4 * MiB, chunk_size=CHUNK)
    with fvd.open(image, "r+") as img:
        img.write(0, b"x" * 100 * KiB)
        img.create_snapshot("s1")
    port = free_port()
    srv = fvd_serve(image, impl, "--insecure", port=port)
    try:
        run("qemu-io", "-f", "raw", "-c", "write -P 7 1M 64k", srv.uri)
        cli("snapshot", "-c", "s2", image)
        info = json.loads(cli("info", "--output=json", image).stdout)
        assert info["filename"] == str(image) and [s["name"] for s in info["snapshots"]] == [
            "s1",
            "s2",
        ]
        changed = json.loads(cli("map", "--output=json", "--since", "s1", image).stdout)
        assert [(c["start"], c["length"], c["data"]) for c in changed] == [(MiB, CHUNK, True)]
        r = cli("checksum", "-l", "s2", "--output=json", image)
        assert "held by fvd serve" in r.stderr
        with fvd.connect(image) as client:
            assert json.loads(r.stdout) == client.checksum("s2")
        assert "No errors" in cli("check", image).stdout
        r = cli("snapshot", "-a", "s1", image, ok=(1,))
        assert "stop the server" in r.stderr and r.stderr.count("\n") == 1
        r = cli("convert", image, tmp_path / "x.fvd", ok=(1,))
        assert "-l NAME" in r.stderr and r.stderr.count("\n") == 1
        cli("convert", "-O", "raw", "-l", "s2", image, tmp_path / "s2.raw")
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", tmp_path / "s2.raw", export_tcp(port))
        with fvd.connect(image) as client:
            uris = {e["name"]: e["uri"] for e in client.exports()}
            assert uris["s2"] == export_tcp(port)
            client.stop()
        assert srv.proc.wait(timeout=60) == 0
    finally:
        srv.stop()
    assert not os.path.exists(default_control_path(image))


def export_tcp(port, name="s2"):
    return f"nbd://127.0.0.1:{port}/{name}"


def test_plugin_run_by_nbdkit_in_the_background(tmp_path, impl):
    """nbdkit forks into the background: the control thread starts after the fork."""
    if impl == "python":
        pytest.skip("one run: the control thread does not depend on the fast path")
    image = tmp_path / "vm.fvd"
    fvd.create(image, 2 * MiB)
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "nbdkit.pid"
    uri = f"nbd+unix:///?socket={sock}"
    env = plugin_environment()
    subprocess.run(
        ["nbdkit", "-U", sock, "-P", pidfile, "python", PLUGIN, f"file={image}", f"uri={uri}"],
        check=True,
        env=env,
    )
    try:
        wait_until(lambda: os.path.exists(default_control_path(image)))
        r = cli("snapshot", "-c", "s1", image)
        assert "held by fvd serve" in r.stderr
        with fvd.connect(image) as client:
            assert [e["name"] for e in client.exports()] == ["", "s1"]
            client.stop()
        wait_until(lambda: not os.path.exists(pidfile) or not _alive(_pid(pidfile)))
    finally:
        if os.path.exists(pidfile) and _alive(_pid(pidfile)):
            os.kill(_pid(pidfile), signal.SIGTERM)
    wait_until(lambda: not os.path.exists(default_control_path(image)))
    with fvd.open(image) as img:
        assert [s.name for s in img.snapshots()] == ["s1"]


def _pid(pidfile):
    return int(open(pidfile).read().strip() or 0)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
