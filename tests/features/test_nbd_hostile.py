"""The NBD client against a scripted hostile server (tests/nbd_hostile.py), issue 19:
replies checked against the protocol (bug 1), peer lengths bounded (bug 2), deadlines
(bug 3), block status merged and capped (bug 7), and the wire fuzzer.

The fuzzer runs FVD_WIRE_SESSIONS sessions per implementation (default 150); a soak:

    FVD_WIRE_SESSIONS=10000 FVD_WIRE_SEED=$RANDOM python -m pytest -q \\
        tests/features/test_nbd_hostile.py -k fuzz -p no:randomly
"""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest

import fvd
from fvd.nbd_client import NbdClient
from fvd.nbd_client.protocol import MAX_STATUS_RUNS

from ..nbd_hostile import Fault, HostileServer, run_sessions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 256 * 1024
# Deadlines for tests where no deadline should trip (faults that fail at once): long
# enough for a loaded machine, short enough that a stall ends the test soon.
T = "&connect-timeout=10&timeout=10"
WATCHDOG = 30.0  # a test waits no longer than this for a client call (then it failed)


def _export():
    rng = random.Random(5)
    data = bytearray(rng.randbytes(SIZE))
    data[64 * 1024 : 128 * 1024] = bytes(64 * 1024)
    return bytes(data)


EXPORT = _export()


@pytest.fixture
def hostile():
    """hostile(**server options) -> a started HostileServer; all stopped afterwards."""
    sockdir = tempfile.mkdtemp(prefix="nbdh", dir="/tmp")  # short: unix socket paths
    servers = []

    def start(export=EXPORT, **kw):
        srv = HostileServer(os.path.join(sockdir, f"{len(servers)}.sock"), export, **kw)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()
    shutil.rmtree(sockdir, ignore_errors=True)


def within_watchdog(fn):
    """fn()'s result or exception; fails the test (instead of hanging) past WATCHDOG."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(WATCHDOG)
    assert not t.is_alive(), f"the client call did not return within {WATCHDOG} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


# ----- bug 1: replies that are not what the protocol allows ----------------------------------
READ_FAULTS = {
    "none_only": "ended with 0 of the 4096 bytes",
    "half": "ended with 2048 of the 4096 bytes",
    "hole_len": "hole chunk of 20 bytes",
    "hole_zero": "hole chunk of size 0",
    "data_short": "data chunk of 5 bytes",
    "unknown_type": "chunk type 3 is not allowed",
    "outside": "outside the request",
    "overlap": "overlaps an earlier chunk",
    "unknown_error": "EIO",
    "error": "EIO",
    "error_offset": "EIO",
    "error_msglen": "error message of 60000 bytes",
    "cookie": "expected 1",
    "simple": "simple reply to a read",
    "none_not_done": "NONE chunk",
    "none_len": "NONE chunk",
    "status_chunk": "chunk type 5 is not allowed",
    "bad_magic": "bad reply magic",
    "huge_data": "outside the request",
}


@pytest.mark.parametrize("kind", sorted(READ_FAULTS))
def test_bad_read_reply_is_an_error(hostile, kind):
    srv = hostile(fault=Fault("read", kind))
    client = NbdClient(srv.uri + T)
    buf = bytearray(b"\xee" * 4096)
    with pytest.raises(fvd.BaseImageError) as e:
        within_watchdog(lambda: client.readinto(8192, buf))
    assert srv.path in str(e.value) and READ_FAULTS[kind] in str(e.value), e.value
    # that connection was dropped; the next read connects again
    assert client.readinto(8192, buf) == 4096 and buf == EXPORT[8192:12288]
    assert srv.counts["hello"] == 2
    client.close()


def test_a_stray_reply_fails_the_next_request(hostile):
    srv = hostile(fault=Fault("read", "extra_after_done"))
    client = NbdClient(srv.uri + T, max_connections=1)
    buf = bytearray(100)
    client.readinto(0, buf)
    with pytest.raises(fvd.BaseImageError, match="reply for request 1, expected 2"):
        client.readinto(0, buf)
    client.close()


@pytest.mark.parametrize("kind", ["none_only", "half", "hole_len", "data_short", "unknown_type"])
def test_copy_on_read_and_prefetch_store_nothing_wrong(hostile, tmp_path, kind, impl):
    srv = hostile(fault=Fault("read", kind, every=True))
    image = tmp_path / "top.fvd"
    fvd.create(image, SIZE, base=srv.uri + T, base_format="raw", block_size=4096)
    with fvd.open(image, "r+", copy_on_read=True) as img:
        with pytest.raises(fvd.BaseImageError):
            img.read(0, 64 * 1024)
        with pytest.raises(fvd.BaseImageError):
            img.prefetch()
        assert img.info()["base-prefetched"] is False
    srv.honest()
    with fvd.open(image) as img:
        assert img.read(0, SIZE) == EXPORT
        assert img.check().ok


def test_convert_and_checksum_fail_rather_than_write_wrong_content(hostile, tmp_path, impl):
    srv = hostile(fault=Fault("read", "none_only", every=True))
    image = tmp_path / "top.fvd"
    fvd.create(image, SIZE, base=srv.uri + T, base_format="raw")
    for args in (["checksum", image], ["convert", "-O", "raw", image, tmp_path / "out.raw"]):
        r = subprocess.run(
            [sys.executable, "-m", "fvd.cli", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert r.returncode != 0, (args, r.stdout)
        assert "ended with 0 of the" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out.raw").exists()


# ----- bug 2: lengths from the server are bounded ------------------------------------------
LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
import fvd
from fvd.nbd_client import NbdClient
from tests.nbd_hostile import Fault, HostileServer
srv = HostileServer(sys.argv[1], bytes(65536), fault=Fault(sys.argv[2], sys.argv[3]))
try:
    c = NbdClient(srv.uri + "&timeout=5&connect-timeout=5")
    c.readinto(0, bytearray(4096)) if sys.argv[4] == "read" else list(c.extents(0, 65536))
    print("OK")
except BaseException as e:
    print(type(e).__name__, e)
finally:
    srv.stop()
"""


@pytest.mark.parametrize(
    "site, kind, op, expect",
    [
        ("option", "huge_len", "read", "option reply of 4294967280 bytes"),
        ("option", "err_huge_msg", "read", "option reply of 4294967280 bytes"),
        ("read", "error_huge", "read", "EIO"),  # its message is read, bounded
        ("status", "huge", "status", "block status descriptors for"),
        ("status", "too_many", "status", "block status descriptors for"),
    ],
)
def test_peer_lengths_are_bounded(tmp_path, site, kind, op, expect):
    """Each case in a child under RLIMIT_AS (1.5 GiB): a 4 GiB allocation is a MemoryError."""
    sock = tempfile.mktemp(prefix="nbdl", dir="/tmp")
    r = subprocess.run(
        [sys.executable, "-c", LIMITED, sock, site, kind, op],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.stdout.startswith("BaseImageError") and expect in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("kind", ["size_huge", "size_2_63"])
def test_export_claiming_more_than_2_63_bytes(hostile, tmp_path, kind):
    srv = hostile(fault=Fault("go", kind, every=True))
    with pytest.raises(fvd.BaseImageError, match="more than 2.63 - 1"):
        NbdClient(srv.uri + T)
    r = subprocess.run(
        [sys.executable, "-m", "fvd.cli", "create", "-b", srv.uri, "-F", "raw", tmp_path / "a.fvd"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 1 and "more than 2^63 - 1" in r.stderr, r.stderr
    assert "MemoryError" not in r.stderr


# ----- bug 3: deadlines ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "site, kind",
    [
        ("hello", "stall"),
        ("hello", "trickle"),  # one byte every 50 ms: each recv makes progress
        ("option", "stall"),
        ("option", "trickle"),
        ("go", "endless_info"),
        ("read", "stall"),
        ("read", "trickle"),
        ("read", "no_done"),  # all the data, then nothing
        ("status", "stall"),
        ("status", "no_done"),
    ],
)
def test_deadlines(hostile, site, kind):
    srv = hostile(fault=Fault(site, kind))
    uri = srv.uri + "&connect-timeout=0.5&timeout=0.5"

    def use():
        client = NbdClient(uri)
        try:
            client.readinto(0, bytearray(4096))
            list(client.extents(0, SIZE))
        finally:
            client.close()

    with pytest.raises(fvd.BaseImageError, match="deadline|more than 256 replies"):
        within_watchdog(use)


def test_a_timed_out_connection_is_not_reused(hostile):
    srv = hostile(fault=Fault("read", "stall"))
    client = NbdClient(srv.uri + "&timeout=0.3", max_connections=1)
    buf = bytearray(1000)
    with pytest.raises(fvd.BaseImageError, match="deadline"):
        within_watchdog(lambda: client.readinto(0, buf))
    client.readinto(0, buf)
    assert buf == EXPORT[:1000] and srv.counts["hello"] == 2
    client.close()


def test_a_slow_but_steady_transfer_completes(hostile):
    """16 KiB every 50 ms (about 320 KiB/s): a 1 MiB read takes over 3 s against a 1 s
    deadline, which each payload byte extends (1 s per 64 KiB)."""
    export = random.Random(1).randbytes(1 << 20)
    srv = hostile(export=export, pace=0.05)
    client = NbdClient(srv.uri + "&connect-timeout=30&timeout=1")
    buf = bytearray(len(export))
    within_watchdog(lambda: client.readinto(0, buf))
    assert buf == export
    client.close()


def test_timeouts_from_the_constructor_override_the_uri(hostile):
    srv = hostile(fault=Fault("read", "stall"))
    client = NbdClient(srv.uri + "&timeout=1000", timeout=0.3)
    with pytest.raises(fvd.BaseImageError, match="deadline"):
        within_watchdog(lambda: client.readinto(0, bytearray(10)))
    client.close()


# ----- bug 7: block status merged as it arrives, work per request capped --------------------
def test_a_million_one_byte_descriptors_merge(hostile, tmp_path, impl):
    export = bytes(1 << 20)
    srv = hostile(export=export, descriptors="ones")
    client = NbdClient(srv.uri + T)
    assert within_watchdog(lambda: list(client.extents(0, len(export)))) == [
        (0, len(export), False, True)
    ]
    client.close()
    image = tmp_path / "top.fvd"
    fvd.create(image, len(export), base=srv.uri + T, base_format="raw")
    with fvd.open(image) as img:
        runs = within_watchdog(lambda: [(e.start, e.length, e.data) for e in img.extents()])
    assert runs == [(0, len(export), True)]


def test_work_per_block_status_reply_is_capped(hostile):
    """Alternating 1-byte descriptors cannot merge: each reply gives at most
    MAX_STATUS_RUNS runs and the next request goes on from there."""
    srv = hostile(export=bytes(SIZE), descriptors="alternating")
    client = NbdClient(srv.uri + T)
    got = within_watchdog(lambda: list(client.extents(0, SIZE)))
    assert got == [(i, 1, i % 2 == 1, i % 2 == 0) for i in range(SIZE)]
    assert srv.counts["status"] >= SIZE // MAX_STATUS_RUNS
    client.close()


# ----- the wire fuzzer -----------------------------------------------------------------------
def test_wire_fuzz(impl):
    sessions = int(os.environ.get("FVD_WIRE_SESSIONS", "150"))
    seed = f"{os.environ.get('FVD_WIRE_SEED', '0')}-{impl}"
    env = dict(os.environ)
    env.pop("FVD_PURE_PYTHON", None)
    if impl == "python":
        env["FVD_PURE_PYTHON"] = "1"
    failures = run_sessions(sessions, seed, env=env)
    report = "\n".join(json.dumps(f)[:3000] for f in failures[:5])
    assert not failures, (
        f"{len(failures)} of {sessions} sessions failed (reproduce: python -m "
        f"tests.nbd_hostile worker {seed} SESSION 1):\n{report}"
    )
