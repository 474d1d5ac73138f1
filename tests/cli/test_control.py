"""The control channel's parts in one process (no nbdkit): URIs of exports, a client
that finds nothing or something else, the idle timeout, the write gate."""

import json
import socket
import threading

import pytest

import fvd
from fvd.control import ControlClient, export_uri, find_server
from fvd.controlserver import ControlServer, Exports, WriteGate
from fvd.units import MiB


def test_export_uris():
    assert export_uri("nbd+unix:///?socket=/tmp/a b/s", "nightly 1/x") == (
        "nbd+unix:///nightly%201%2Fx?socket=/tmp/a%20b/s"
    )
    assert export_uri("nbd://localhost:10809/", "s1") == "nbd://localhost:10809/s1"
    assert export_uri("nbd://[::1]:7000/", "s1") == "nbd://[::1]:7000/s1"


def test_no_server(tmp_path):
    image = tmp_path / "vm.fvd"
    fvd.create(image, MiB)
    assert find_server(image) is None
    with pytest.raises(fvd.ControlError, match="cannot reach") as e:
        fvd.connect(image)
    assert e.value.error_class == "NoServer"


def test_not_a_control_socket(tmp_path):
    path = str(tmp_path / "other.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def speak():
        conn, _ = listener.accept()
        conn.sendall(b'{"QMP": {"version": {}}}\n')
        conn.close()

    t = threading.Thread(target=speak)
    t.start()
    with pytest.raises(fvd.ControlError, match="not an fvd control socket"):
        ControlClient(path)
    t.join()
    listener.close()


@pytest.fixture
def server(tmp_path):
    image = tmp_path / "vm.fvd"
    fvd.create(image, MiB)
    img = fvd.open(image, "r+")
    stopped = threading.Event()
    srv = ControlServer(
        str(tmp_path / "c.ctl"),
        img,
        Exports(img, None, False),
        read_only=False,
        stop=stopped.set,
        idle_timeout=0.2,
    )
    srv.bind()
    srv.start()
    yield srv, stopped
    srv.close()
    img.close()


def test_idle_connection_is_closed(server):
    srv, _ = server
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(srv.path)
    f = s.makefile("rb")
    assert json.loads(f.readline())["fvd"]["protocol"] == 1
    assert f.readline() == b""  # nothing sent: the server hangs up
    s.close()


def test_stop_replies_then_stops_and_exports_have_no_uri(server):
    srv, stopped = server
    with ControlClient(srv.path) as client:
        client.create_snapshot("s1")
        assert [e["uri"] for e in client.exports()] == [None, None]
        with pytest.raises(fvd.ControlError, match="NBD address"):
            client.open_export("s1")
        assert not stopped.is_set()
        client.stop()
    assert stopped.wait(30)


def test_a_second_server_on_the_same_socket_is_refused(server):
    srv, _ = server
    other = ControlServer(
        srv.path, srv.image, srv.exports, read_only=True, stop=lambda: None, idle_timeout=1
    )
    with pytest.raises(fvd.ServeError, match="another server"):
        other.bind()


def test_write_gate_holds_writes_on_one_side():
    gate = WriteGate()
    gate.enter()  # a write in flight when the snapshot comes
    inside, later_entered = threading.Event(), threading.Event()

    def later_write():
        gate.enter()
        later_entered.set()
        gate.leave()

    def taken():
        inside.set()
        threading.Thread(target=later_write).start()
        assert not later_entered.wait(0.2)  # held at the gate while the snapshot is taken
        return "snap"

    result = []
    t = threading.Thread(target=lambda: result.append(gate.run_closed(taken)))
    t.start()
    assert not inside.wait(0.2)  # the snapshot waits for the write in flight
    gate.leave()
    t.join(30)
    assert result == ["snap"] and later_entered.wait(30)


def test_bad_requests_get_error_replies(server):
    srv, _ = server
    for line, cls in (
        (b"[" * 30000 + b"]" * 30000, "ParseError"),  # nested deeper than json recurses
        (b"\xff\xfe", "ParseError"),
        (b'"just a string"', "InvalidRequest"),
        (b'{"execute": 1}', "InvalidRequest"),
        (b'{"execute": "checksum", "arguments": {"block-size": true}}', "InvalidArgument"),
        (b'{"execute": "checksum", "arguments": []}', "InvalidArgument"),
        (b'{"execute": "checksum", "arguments": {"snapshot": "none"}}', "SnapshotNotFound"),
    ):
        reply, after = srv.handle(line)
        assert reply["error"]["class"] == cls and after is None, (line[:40], reply)
