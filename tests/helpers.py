"""Shared test helpers: durable-state recording for simulated crashes."""

import json
import os
import random
import shutil
import signal
import time

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

import fvd
from fvd.fileio import data_runs, full_pwrite, punch_hole
from fvd.units import KiB

from .stress import UNIT, Model, unit_bytes

NUNITS = 1024  # the SIGKILL tests' 4 MiB image, in UNITs


class DurableRecorder:
    """Copies the image file at every fdatasync: the state a power cut would leave.

    A crash is then simulated by putting the last copy back (every write since the last
    flush is dropped), which is the harshest outcome a real disk may give.
    """

    def __init__(self, monkeypatch, path):
        self.path = str(path)
        self.copy = self.path + ".durable"
        self.syncs = 0
        real = os.fdatasync

        def fdatasync(fd):
            real(fd)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                shutil.copyfile(self.path, self.copy)
                self.syncs += 1

        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def snapshot_now(self):
        shutil.copyfile(self.path, self.copy)

    def power_cut(self):
        shutil.copyfile(self.copy, self.path)


def pattern(seed, length):
    """Deterministic non-trivial bytes."""
    return bytes((seed * 131 + i * 7 + (i >> 8)) & 0xFF for i in range(length))


def image_data_rules(size, max_write, max_zeroes=400 * KiB, max_read=300 * KiB):
    """A state machine base with the rules every image model shares: write, write_zeroes
    and read at any offset of `self.img` against the bytearray `self.model` (`self.seed`
    numbers the write patterns); `_ack()`, for subclasses, records what an acknowledged
    change makes durable."""

    class ImageDataRules(RuleBasedStateMachine):
        def _ack(self):
            pass

        @rule(off=st.integers(0, size - 1), n=st.integers(1, max_write))
        def write(self, off, n):
            n = min(n, size - off)
            self.seed += 1
            data = pattern(self.seed, n)
            self.img.write(off, data)
            self.model[off : off + n] = data
            self._ack()

        @rule(off=st.integers(0, size - 1), n=st.integers(1, max_zeroes))
        def zeroes(self, off, n):
            n = min(n, size - off)
            self.img.write_zeroes(off, n)
            self.model[off : off + n] = bytes(n)
            self._ack()

        @rule(off=st.integers(0, size - 1), n=st.integers(0, max_read))
        def read(self, off, n):
            n = min(n, size - off)
            assert self.img.read(off, n) == self.model[off : off + n]

    return ImageDataRules


def assert_old_or_new(got, new, old, between=()):
    """Each byte reads the durable state, the newest one or (writeback: unflushed writes
    may reach the file in any subset) one of the states acknowledged in between."""
    g, n, o = (np.frombuffer(bytes(x), dtype=np.uint8) for x in (got, new, old))
    ok = (g == n) | (g == o)
    for state in between:
        ok |= g == np.frombuffer(bytes(state), dtype=np.uint8)
    bad = np.flatnonzero(~ok)
    assert not len(bad), f"byte {int(bad[0])} is neither old nor new"


def run_and_kill(child, delay, *args):
    """Fork; the child runs child(*args, write_fd) and reports JSON lines ending in "]"
    through a pipe; SIGKILL it after `delay` seconds; return the lines it got out."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            child(*args, w)
        finally:
            os._exit(1)
    os.close(w)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return [json.loads(x) for x in f.read().splitlines() if x.endswith("]")]


def make_raw(path, size, seed=1):
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return bytearray(data)


def stats_delta(img, before):
    return counts_delta(before, img.stats.as_dict())


def pat(seed, n):
    return bytes((seed * 37 + i * 11 + (i >> 9)) & 0xFF for i in range(n))


def counts_delta(before, after):
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def assert_clean(img):
    r = img.check()
    assert r.ok, r.messages


def assert_every_cut_is_before_or_after(pre, ops, before, after, model, cut):
    """Apply each prefix of an operation's recorded writes to a copy of the image taken
    before it: every cut must open (read-write, then read-only) as exactly the state
    before or after the operation, and check clean; both states must occur."""
    assert before != after
    ops = [op for op in ops if op[0] != "s"]  # a cut after a sync is the cut before it
    assert len(ops) >= 3
    seen = set()
    for k in range(len(ops) + 1):
        shutil.copyfile(pre, cut)
        apply_ops(cut, ops[:k])
        with fvd.open(cut, "r+") as img:
            state = model(img)
            assert state in (before, after), f"cut after {k} of {len(ops)} writes"
            seen.add(state == after)
            assert_clean(img)
        with fvd.open(cut) as img:
            assert model(img) == state
            assert_clean(img)
    assert seen == {False, True}


def replay_log(lines):
    """(state before the op in flight, that op or None, snapshots) of the model."""
    state = [0] * NUNITS  # version per unit; 0 = the base; -1 = zeros
    snaps = {}
    ops, cur = [], None
    for rec in lines:
        if rec[0] == "B":
            cur = rec[1:]
        elif cur is not None:
            ops.append(cur)
            cur = None
    for op in ops:
        apply_op(op, state, snaps)
    return state, cur, snaps


def replay_with_inflight(lines):
    """((state, snapshots) the log proves, the same with the op in flight applied, that op
    or None): the two sides `assert_recovered` accepts after a SIGKILL."""
    state, inflight, snaps = replay_log(lines)
    after_state, after_snaps = list(state), dict(snaps)
    if inflight is not None:
        apply_op(inflight, after_state, after_snaps)
    return (state, snaps), (after_state, after_snaps), inflight


class ChildLog:
    """A SIGKILL child's operations on `img`: each is told to the parent through the pipe
    `w` before ("B", op...) and after ("A") it runs, so the parent knows what was in
    flight when the kill came. Writes put unit_bytes(version, unit) in every unit."""

    def __init__(self, img, w):
        self.img, self.w, self.version = img, w, 1

    def _say(self, *rec):
        os.write(self.w, (json.dumps(rec) + "\n").encode())

    def _run(self, rec, action):
        self._say("B", *rec)
        action()
        self._say("A")

    def write(self, first, count):
        data = b"".join(unit_bytes(self.version + i, first + i) for i in range(count))
        self._run(("write", first, count, self.version), lambda: self.img.write(first * UNIT, data))
        self.version += count

    def zero(self, first, count):
        self._run(("zero", first, count), lambda: self.img.write_zeroes(first * UNIT, count * UNIT))

    def read(self, first):
        self._run(("read", first), lambda: self.img.read(first * UNIT, UNIT))

    def flush(self):
        self._run(("flush",), self.img.flush)

    def prefetch(self):
        self._run(("prefetch",), lambda: self.img.prefetch(step=64 * 1024, min_rate=0))

    def create(self, name):
        self._run(("create", name), lambda: self.img.create_snapshot(name))

    def delete(self, name):
        self._run(("delete", name), lambda: self.img.delete_snapshot(name))

    def revert(self, name):
        self._run(("revert", name), lambda: self.img.revert_to_snapshot(name))


def apply_op(op, state, snaps):
    kind = op[0]
    if kind == "write":
        first, count, version = op[1:]
        for i in range(count):
            state[first + i] = version + i
    elif kind == "zero":
        first, count = op[1:]
        state[first : first + count] = [-1] * count
    elif kind == "create":
        snaps[op[1]] = list(state)
    elif kind == "delete":
        del snaps[op[1]]
    elif kind == "revert":
        state[:] = snaps[op[1]]


def check_content(data, legal_by_unit, what):
    m = Model(NUNITS)
    m.zero.add(-1)
    for u in range(NUNITS):
        unit = data[u * UNIT : (u + 1) * UNIT]
        assert m.unit_ok(u, unit, sorted(legal_by_unit[u])), (
            f"{what}: unit {u} holds none of the versions {legal_by_unit[u]}"
        )


def assert_recovered(img, before, after, where):
    """After a SIGKILL: every unit holds its version before or after the operation in
    flight, the snapshots are those both sides agree on (plus any either has), each
    exactly as taken, and the image checks clean. before/after: (state, snapshots)."""
    (state, snaps), (after_state, after_snaps) = before, after
    legal = [{state[u], after_state[u]} for u in range(NUNITS)]
    check_content(img.read(0, NUNITS * UNIT), legal, where)
    names = {s.name for s in img.snapshots()}
    must = set(snaps) & set(after_snaps)
    may = set(snaps) | set(after_snaps)
    assert must <= names <= may, (where, names, must, may)
    for name in names:
        want = snaps.get(name) or after_snaps[name]
        with img.open_snapshot(name) as view:
            check_content(
                view.read(0, NUNITS * UNIT), [{want[u]} for u in range(NUNITS)], f"{where} {name}"
            )
    res = img.check()
    assert res.ok, (where, res.messages)


def apply_ops(path, ops):
    """Replay recorded syscalls (tests.syscall_recorder.parse) on the file at `path`."""
    fd = os.open(path, os.O_RDWR)
    try:
        for kind, a, b in ops:
            if kind == "w":
                full_pwrite(fd, b, a)
            elif kind == "t":
                os.ftruncate(fd, a)
            elif kind == "a":
                if os.fstat(fd).st_size < a + b:
                    os.ftruncate(fd, a + b)
            elif kind == "p":
                punch_hole(fd, a, b)
    finally:
        os.close(fd)


def copy_sparse(src, dst):
    """Copy a file with its holes (check counts a free chunk that holds bytes as a leak:
    a plain copy would fill punched chunks with zeros)."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        size = os.fstat(f.fileno()).st_size
        g.truncate(size)
        for a, b, is_data in data_runs(f.fileno(), 0, size):
            for pos in range(a, b, 1 << 20) if is_data else ():
                os.pwrite(g.fileno(), os.pread(f.fileno(), min(1 << 20, b - pos), pos), pos)
