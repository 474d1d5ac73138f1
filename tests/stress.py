"""Concurrency stress engine (tests/core/test_stress.py): writer, reader, flush, snapshot,
view, revert and prefetch threads on one image; every read is checked sector by sector
against the versions that could legally be there.

Every 4 KiB unit of the image has a history of versions (version 0: the base's bytes).
A writer appends its version to the unit's history *before* its call and moves the
unit's floor to it *after* the call returns (a unit belongs to one writer at a time).
A read that started when the floor was at index lo may return, per 512-byte sector,
any version from lo on: older ones were overwritten by a write acknowledged before the
read began. Each data sector carries (version, sector number) repeated, so a sector
from another place, another version or nobody (zeros that no write_zeroes made) fails.
A read racing an overwrite of the same bytes may see the writer's copy into the page
cache half done (Linux copies both ways without a lock), so live reads are checked per
8-byte word against the legal versions; crash checks stay per sector.
"""

import functools
import random
import struct
import threading

import numpy as np

import fvd
from fvd.units import KiB

SECTOR, UNIT = 512, 4096
SPU = UNIT // SECTOR
STRIPE = 32  # units per writer stripe (two 64 KiB chunks)
ZERO_UNIT = bytes(UNIT)


@functools.lru_cache(maxsize=1 << 13)
def unit_bytes(version, unit):
    return b"".join(
        struct.pack("<QQ", version, unit * SPU + i) * (SECTOR // 16) for i in range(SPU)
    )


def make_base(path, nunits):
    with open(path, "wb") as f:
        f.writelines(unit_bytes(0, u) for u in range(nunits))


class RWLock:
    """Writers share it; a revert takes it alone (readers never take it)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._excl = False

    def acquire_shared(self):
        with self._cond:
            while self._excl:
                self._cond.wait()
            self._shared += 1

    def release_shared(self):
        with self._cond:
            self._shared -= 1
            self._cond.notify_all()

    def acquire_excl(self):
        with self._cond:
            while self._excl:
                self._cond.wait()
            self._excl = True
            while self._shared:
                self._cond.wait()

    def release_excl(self):
        with self._cond:
            self._excl = False
            self._cond.notify_all()


class Model:
    def __init__(self, nunits):
        self.hist = [[0] for _ in range(nunits)]
        self.floor = [0] * nunits
        self.zero = set()
        self._next = 1
        self._lock = threading.Lock()

    def new_version(self, zero=False):
        with self._lock:
            v = self._next
            self._next += 1
        if zero:
            self.zero.add(v)
        return v

    def begin(self, units, versions):
        for u, v in zip(units, versions):
            self.hist[u].append(v)

    def done(self, units):
        for u in units:
            self.floor[u] = len(self.hist[u]) - 1

    def expected(self, u):
        return self.hist[u][self.floor[u]]

    def content(self, version, u):
        return ZERO_UNIT if version in self.zero else unit_bytes(version, u)

    def unit_ok(self, u, data, legal, word_tears=False):
        """True when every sector of the unit holds one of the legal versions. With
        `word_tears` (a read racing an overwrite of the same bytes: the page cache copies
        both without a lock, so the reader may see the writer's copy half done), every
        8-byte word instead."""
        for v in legal:
            if data == self.content(v, u):
                return True
        for i in range(SPU):  # torn between versions: per sector
            sec = data[i * SECTOR : (i + 1) * SECTOR]
            if any(sec == self.content(v, u)[i * SECTOR : (i + 1) * SECTOR] for v in legal):
                continue
            if not word_tears:
                return False
            got = np.frombuffer(sec, dtype=np.uint64)
            ok = np.zeros(len(got), dtype=bool)
            for v in legal:
                ok |= got == np.frombuffer(
                    self.content(v, u)[i * SECTOR : (i + 1) * SECTOR], dtype=np.uint64
                )
            if not ok.all():
                return False
        return True

    def uniform_version(self, u, data, legal):
        for v in legal:
            if data == self.content(v, u):
                return v
        return None


class Stress:
    def __init__(
        self,
        path,
        base,
        seconds,
        *,
        cache="writeback",
        copy_on_read=False,
        readers=2,
        writers=2,
        seed=0,
        units=2048,
    ):
        self.path, self.base, self.seconds = path, base, seconds
        self.nunits = units
        self.size = units * UNIT
        self.rng = random.Random(seed)
        self.nreaders, self.nwriters = readers, writers
        make_base(base, units)
        fvd.create(
            path, self.size, chunk_size=64 * KiB, block_size=16 * KiB, base=base, base_format="raw"
        )
        self.img = fvd.open(path, "r+", cache=cache, copy_on_read=copy_on_read)
        self.model = Model(units)
        self.rw = RWLock()
        self.stop = threading.Event()
        self.errors = []
        self.reads_checked = 0
        self.sectors_checked = 0
        self.wrong = 0
        self.counts = {
            "writes": 0,
            "zeroes": 0,
            "flushes": 0,
            "snapshots": 0,
            "deletes": 0,
            "reverts": 0,
            "view_reads": 0,
            "prefetches": 0,
        }
        self.snaps = {}  # name -> {unit: version}

    # ----- threads ---------------------------------------------------------------------
    def _guard(self, fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001  # reported by run()
            import traceback

            self.errors.append(f"{fn.__name__}: {e!r}\n{traceback.format_exc()}")
            self.stop.set()

    def writer(self, k):
        rng = random.Random(self.rng.random())
        img, m = self.img, self.model
        stripes = [s for s in range(self.nunits // STRIPE) if s % self.nwriters == k]
        while not self.stop.is_set():
            s = rng.choice(stripes)
            first = s * STRIPE + rng.randrange(STRIPE)
            count = rng.randint(1, s * STRIPE + STRIPE - first)
            units = list(range(first, first + count))
            zero = rng.random() < 0.1
            self.rw.acquire_shared()
            try:
                if zero:
                    v = m.new_version(zero=True)
                    m.begin(units, [v] * count)
                    img.write_zeroes(first * UNIT, count * UNIT)
                    self.counts["zeroes"] += 1
                else:
                    vs = [m.new_version() for _ in units]
                    m.begin(units, vs)
                    img.write(first * UNIT, b"".join(unit_bytes(v, u) for v, u in zip(vs, units)))
                    self.counts["writes"] += 1
                m.done(units)
            finally:
                self.rw.release_shared()

    def reader(self, k):
        rng = random.Random(self.rng.random())
        img, m = self.img, self.model
        while not self.stop.is_set():
            first = rng.randrange(self.nunits)
            count = rng.randint(1, min(40, self.nunits - first))
            lo = [m.floor[u] for u in range(first, first + count)]
            data = img.read(first * UNIT, count * UNIT)
            for i, u in enumerate(range(first, first + count)):
                unit = data[i * UNIT : (i + 1) * UNIT]
                legal = m.hist[u][lo[i] :]
                if not m.unit_ok(u, unit, legal, word_tears=True):
                    self.wrong += 1
                    records = [
                        struct.unpack("<QQ", unit[i * SECTOR : i * SECTOR + 16]) for i in range(SPU)
                    ]
                    self.errors.append(
                        f"reader {k}: unit {u} holds bytes no legal version has, per "
                        f"8-byte word (legal {[(v, v in m.zero) for v in legal[:8]]}..., "
                        f"(version, sector) at each sector's start {records})"
                    )
                    self.stop.set()
            self.reads_checked += 1
            self.sectors_checked += count * SPU

    def flusher(self):
        while not self.stop.wait(0.005):
            self.img.flush()
            self.counts["flushes"] += 1

    def prefetcher(self):
        while not self.stop.wait(self.seconds / 4):
            self.img.prefetch(step=256 * KiB, min_rate=0)
            self.counts["prefetches"] += 1

    def snapshotter(self):
        rng = random.Random(self.rng.random())
        img, m = self.img, self.model
        k = 0
        while not self.stop.wait(0.02):
            name = f"s{k}"
            k += 1
            lo = list(m.floor)
            img.create_snapshot(name)
            hi = [len(h) for h in m.hist]
            self.counts["snapshots"] += 1
            self.snaps[name] = self._read_view(name, lo, hi)
            for other in rng.sample(sorted(self.snaps), min(2, len(self.snaps))):
                self._read_view(other)  # views stay what they were
            if len(self.snaps) > 3:
                old = min(self.snaps, key=lambda n: int(n[1:]))
                img.delete_snapshot(old)
                del self.snaps[old]
                self.counts["deletes"] += 1
            if rng.random() < 0.3:
                self._revert(rng.choice(sorted(self.snaps)))

    def _read_view(self, name, lo=None, hi=None):
        """Read a whole snapshot view; with (lo, hi) learn its versions, else compare."""
        m = self.model
        with self.img.open_snapshot(name) as view:
            data = view.read(0, self.size)
        self.counts["view_reads"] += 1
        state = {}
        for u in range(self.nunits):
            unit = data[u * UNIT : (u + 1) * UNIT]
            if lo is None:
                ok = unit == m.content(self.snaps[name][u], u)
            else:
                v = m.uniform_version(u, unit, m.hist[u][lo[u] : hi[u]])
                ok = v is not None
                state[u] = v
            if not ok:
                self.wrong += 1
                raise AssertionError(
                    f"snapshot {name}: unit {u} is not a point-in-time "
                    f"version (first 16 bytes {unit[:16].hex()})"
                )
        return state

    def _revert(self, name):
        m, state = self.model, self.snaps[name]
        self.rw.acquire_excl()  # writers pause, readers go on
        try:
            units = list(range(self.nunits))
            m.begin(units, [state[u] for u in units])
            self.img.revert_to_snapshot(name)
            m.done(units)
            self.counts["reverts"] += 1
        finally:
            self.rw.release_excl()

    # ----- run -------------------------------------------------------------------------
    def run(self):
        threads = [
            threading.Thread(target=self._guard, args=(self.writer, k))
            for k in range(self.nwriters)
        ]
        threads += [
            threading.Thread(target=self._guard, args=(self.reader, k))
            for k in range(self.nreaders)
        ]
        threads += [
            threading.Thread(target=self._guard, args=(f,))
            for f in (self.flusher, self.snapshotter, self.prefetcher)
        ]
        for t in threads:
            t.start()
        self.stop.wait(self.seconds)
        self.stop.set()
        for t in threads:
            t.join(120)
        if self.errors:
            self.img._crash()
            raise AssertionError("\n".join(self.errors[:5]))
        self.img.close()
        self.verify_reopened()
        return self.report()

    def verify_reopened(self):
        m = self.model
        with fvd.open(self.path, "r") as img:
            data = img.read(0, self.size)
            for u in range(self.nunits):
                if data[u * UNIT : (u + 1) * UNIT] != m.content(m.expected(u), u):
                    raise AssertionError(f"after reopen unit {u} is not its last version")
            for name in self.snaps:
                with img.open_snapshot(name) as view:
                    vdata = view.read(0, self.size)
                for u in range(self.nunits):
                    if vdata[u * UNIT : (u + 1) * UNIT] != m.content(self.snaps[name][u], u):
                        raise AssertionError(f"after reopen snapshot {name} unit {u} changed")
            res = img.check()
            if not res.ok:
                raise AssertionError(f"check after the stress run: {res.messages}")

    def report(self):
        return dict(
            self.counts,
            reads_checked=self.reads_checked,
            sectors_checked=self.sectors_checked,
            wrong=self.wrong,
        )
