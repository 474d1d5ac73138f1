"""Structure-aware fuzzing of fvd and fvd.qcow2 images (issue 8).

Templates are valid images with data, snapshots (with vm_state; without a base, a snapshot
with a granule record) and, for fvd, a base and an unclean journal. Each case copies a
template, applies a few structure-aware mutations (header fields, journal sectors with
valid checksums but hostile contents, lookup tables, snapshot and refcount tables,
vm_state, granule records; checksums recomputed after each), then runs every operation a
user could: open r / r+, read everything, extents, changed extents, check, snapshot views,
check(repair=True) + reopen + check, a write + reopen. Allowed outcomes: success, FvdError or
ValueError. Anything else, a repair that claims success on an image that does not then
open and check clean, a hang or a memory blow-up is a failure.

Cases run in child processes (`python -m tests.fuzzlib worker ...`) under RLIMIT_AS with a
per-case watchdog in the parent (`run_fuzz`).
"""

import json
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib

KiB, MiB = 1 << 10, 1 << 20  # fvd is imported only in the child processes
CS = 64 * KiB
CASE_TIMEOUT = 10.0
MEMORY_LIMIT = 3 << 30

INTERESTING = [
    0,
    1,
    2,
    7,
    8,
    511,
    512,
    4096,
    65535,
    65536,
    1 << 20,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 62),
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
    0xFFFFFFEF,
    0xFFFFFFF0,
    0xFFFFFFFE,
    0xFFFFFFFF,
]


# ----- templates ---------------------------------------------------------------------------
def build_templates(workdir):
    import fvd
    import fvd.qcow2

    out = {}
    rng = random.Random(1)
    base = os.path.join(workdir, "base.raw")
    with open(base, "wb") as f:
        f.write(rng.randbytes(20 * CS + 1000))
    for kind in ("plain", "base"):
        path = os.path.join(workdir, f"{kind}.fvd")
        kw = dict(base="base.raw", base_format="raw", block_size=4096) if kind == "base" else {}
        fvd.create(path, 24 * CS, chunk_size=CS, journal_size=64 * KiB, **kw)
        with fvd.open(path, "r+") as img:
            for i in (0, 1, 3, 6, 10):
                img.write(i * CS + 100, bytes([i + 1]) * 9000)
            img.create_snapshot("one", vm_state=b"vm" * 5000)
            img.write(CS, b"\x55" * 3000)
            img.write(20 * CS, b"\x66" * CS)
            img.create_snapshot("two")
            img.write(3 * CS, b"\x77" * 100)
        img = fvd.open(path, "r+")
        img.write(5 * CS, b"\x88" * 5000)
        img.write(CS + 10, b"\x99" * 10)
        img.flush()
        img._crash()  # unclean: the journal holds records
        out[kind] = path
    q = os.path.join(workdir, "img.qcow2")
    fvd.qcow2.create(q, 24 * CS, cluster_size=CS)
    with fvd.qcow2.open(q, "r+") as img:
        for i in (0, 1, 3, 6, 10):
            img.write(i * CS + 100, bytes([i + 1]) * 9000)
        img.create_snapshot("one", vm_state=b"vm" * 5000)
        img.write(CS, b"\x55" * 3000)
        img.write(20 * CS, b"\x66" * CS)
    out["qcow2"] = q
    return out


# ----- fvd mutations -----------------------------------------------------------------------
def _u(data, off, fmt_):
    return struct.unpack_from(fmt_, data, off)[0]


def _put(data, off, fmt_, value):
    size = struct.calcsize(fmt_)
    if off < 0 or off + size > len(data):
        return
    mask = (1 << (8 * size)) - 1
    struct.pack_into(fmt_, data, off, value & mask)


def _value(rng, old, others=()):
    r = rng.random()
    if r < 0.45:
        return rng.choice(INTERESTING)
    if r < 0.65:
        return old + rng.choice([-4096, -512, -8, -1, 1, 8, 512, 4096, CS, -CS])
    if r < 0.8 and others:
        return rng.choice(others)
    return rng.getrandbits(rng.choice([8, 16, 32, 64]))


def _header(data):
    from fvd.ondisk import format as fmt

    return fmt.ImageHeader.from_bytes(bytes(data[: fmt.HEADER_SIZE]))


def _reseal_header(data):
    from fvd.ondisk import format as fmt

    data[12:16] = fmt.header_crc(data[: fmt.HEADER_SIZE]).to_bytes(4, "little")


def _reseal_table_crc(data, h):
    nch = -(-h.virtual_size // h.chunk_size)
    raw = data[h.table_offset : h.table_offset + 4 * nch]
    _put(data, 192, "<I", zlib.crc32(raw))
    _reseal_header(data)


def _snap_entries(data, h):
    """[(entry offset, table_offset, vm_offset, vm_size, extra_size)] parsed leniently."""
    from fvd.features import snapshots as snap

    toff, tsize = h.snapshot_table_offset, h.snapshot_table_size
    if not toff or toff + tsize > len(data) or tsize < 32:
        return []
    nb = _u(data, toff + 8, "<I")
    out, pos = [], toff + 32
    for _ in range(min(nb, 64)):
        if pos + 64 > toff + tsize:
            break
        f = snap.codec.unpack(snap.ENTRY, data, pos)
        xsize = f["extra_size"]
        out.append((pos, f["table_offset"], f["vm_state_offset"], f["vm_state_size"], xsize))
        pos += 64 + xsize + ((f["name_size"] + 7) & ~7)
    return out


def _reseal_snapshot_table(data, h):
    toff, tsize = h.snapshot_table_offset, h.snapshot_table_size
    if not toff or toff + tsize > len(data) or tsize < 32:
        return
    raw = bytearray(data[toff : toff + tsize])
    raw[4:8] = b"\0\0\0\0"
    _put(data, toff + 4, "<I", zlib.crc32(raw))


def mutate_fvd(rng, data):
    """One structure-aware mutation of an fvd image (bytearray, in place); returns a
    short description."""
    from fvd.core import journal as jr
    from fvd.ondisk import format as fmt

    h = _header(data)
    nch = -(-h.virtual_size // h.chunk_size)
    d, cs = h.data_offset, h.chunk_size
    nphys = max(1, (len(data) - d) // cs)
    what = rng.choice(
        [
            "header",
            "header",
            "journal",
            "journal",
            "table",
            "snaptable",
            "lookup",
            "refcount",
            "vmstate",
            "granules",
            "granules",
            "bytes",
            "truncate",
            "marker",
        ]
    )
    if what == "header":
        names = [n for n in fmt.FIELD_OFFSET if n not in ("magic", "header_crc")]
        name = rng.choice(names)
        off = fmt.FIELD_OFFSET[name]
        width = (
            "<Q"
            if fmt.Header.subcons[[s.name for s in fmt.Header.subcons].index(name)].sizeof() == 8
            else "<I"
        )
        values = [getattr(h, k) for k in fmt.HEADER_FIELDS]
        others = [v for v in values if isinstance(v, int)]
        _put(data, off, width, _value(rng, fmt.int_field(h, name), others))
        _reseal_header(data)
        return f"header {name}"
    if what == "journal":
        recs = []
        for _ in range(rng.randint(1, 4)):
            t = rng.choice([jr.REC_TABLE, jr.REC_BITMAP, jr.REC_DATA_CRC, 0, 9])
            if t == jr.REC_TABLE:
                n = rng.randint(1, 8)
                start = rng.choice([0, rng.randrange(nch), nch - 1, nch, _value(rng, 0)])
                ents = [
                    rng.choice([rng.randrange(nphys + 3), 0xFFFFFFFF, 0xFFFFFFFE, _value(rng, 0)])
                    & 0xFFFFFFFF
                    for _ in range(n)
                ]
                recs.append(
                    jr.RECORD_HEAD.pack(t, n, start & (2**64 - 1)) + struct.pack(f"<{n}I", *ents)
                )
            elif t == jr.REC_DATA_CRC:
                start = rng.choice([d, d + rng.randrange(nphys) * cs, _value(rng, d)])
                count = rng.choice([cs, 4096, _value(rng, cs)]) & 0xFFFFFFFF
                body = bytes(data[start : start + count]) if start + count <= len(data) else b""
                crc = zlib.crc32(body) if rng.random() < 0.5 else rng.getrandbits(32)
                recs.append(
                    jr.RECORD_HEAD.pack(t, count, start & (2**64 - 1)) + struct.pack("<I", crc)
                )
            else:
                recs.append(
                    jr.RECORD_HEAD.pack(
                        t, _value(rng, 1) & 0xFFFFFFFF, _value(rng, 0) & (2**64 - 1)
                    )
                )
        body = b"".join(recs)[: jr.PAYLOAD]
        nrec = len(recs) if rng.random() < 0.8 else _value(rng, len(recs)) & 0xFFFF
        seq = rng.choice([0, 0, 0, 1])
        sector = bytearray(
            jr.SECTOR_HEAD.pack(
                jr.SECTOR_MAGIC, 0, h.journal_epoch, seq, rng.choice([0, 0, 1]), nrec, 0
            )
            + body
        )
        sector.extend(bytes(512 - len(sector)))
        sector[4:8] = zlib.crc32(sector).to_bytes(4, "little")
        at = h.journal_offset + 512 * seq
        data[at : at + 512] = sector
        _put(data, 48, "<I", 0)  # unclean: replay it
        _reseal_header(data)
        return "journal"
    if what == "table":
        for _ in range(rng.randint(1, 3)):
            v = rng.randrange(nch)
            cur = _u(data, h.table_offset + 4 * v, "<I")
            _put(
                data,
                h.table_offset + 4 * v,
                "<I",
                rng.choice([rng.randrange(nphys + 2), _value(rng, cur)]),
            )
        _reseal_table_crc(data, h)
        return "table"
    entries = _snap_entries(data, h)
    toff = h.snapshot_table_offset
    if what == "snaptable" and toff:
        off = toff + rng.choice(
            [8, 12, 16, 24]
            + [e[0] - toff + o for e in entries for o in (0, 16, 24, 36, 38, 40, 48, 64, 72, 80)]
        )
        width = rng.choice(["<I", "<Q", "<H"])
        _put(data, off, width, _value(rng, 0, [e[1] for e in entries]))
        _reseal_snapshot_table(data, h)
        return "snapshot table"
    if what == "lookup" and entries:
        e = rng.choice(entries)
        for _ in range(rng.randint(1, 3)):
            v = rng.randrange(nch)
            _put(data, e[1] + 4 * v, "<I", rng.choice([rng.randrange(nphys + 2), _value(rng, 0)]))
        raw = data[e[1] : e[1] + 4 * nch]
        _put(data, e[0] + 32, "<I", zlib.crc32(raw))
        _reseal_snapshot_table(data, h)
        return "snapshot lookup table"
    if what == "refcount" and toff and h.refcount_table_size:
        roff, rsize = h.refcount_table_offset, h.refcount_table_size
        for _ in range(rng.randint(1, 3)):
            _put(data, roff + 2 * rng.randrange(rsize // 2), "<H", rng.choice([0, 1, 2, 0xFFFF]))
        _put(data, toff + 12, "<I", zlib.crc32(data[roff : roff + rsize]))
        _reseal_snapshot_table(data, h)
        return "refcount table"
    if what == "vmstate" and entries:
        e = rng.choice(entries)
        _put(data, e[0] + rng.choice([40, 48]), "<Q", _value(rng, e[3], [e[1], e[2]]))
        _reseal_snapshot_table(data, h)
        return "vm_state"
    records = [e for e in entries if e[4] >= 24 and not h.base_format]
    if what == "granules" and records:
        e = rng.choice(records)
        g_off, g_size = _u(data, e[0] + 64, "<Q"), _u(data, e[0] + 72, "<Q")
        if rng.random() < 0.4:  # the extra data: offset, size, crc
            field, width = rng.choice([(64, "<Q"), (72, "<Q"), (80, "<I")])
            old = _u(data, e[0] + field, width)
            _put(data, e[0] + field, width, _value(rng, old, [e[1], e[2], g_off, g_size]))
        elif g_off + g_size <= len(data):  # the record: head, entries, bits
            for _ in range(rng.randint(1, 3)):
                at = g_off + rng.randrange(max(1, g_size))
                width = rng.choice(["<I", "<B", "<H"])
                _put(data, at, width, _value(rng, 0, [nch, nch - 1, nphys, 4096, 8192]))
            if rng.random() < 0.8:  # a record whose crc matches: its contents are checked
                crc = zlib.crc32(bytes(data[g_off : g_off + g_size]))
                _put(data, e[0] + 80, "<I", crc)
        _reseal_snapshot_table(data, h)
        return "granule record"
    if what == "marker" and toff:
        sid = _u(data, entries[0][0], "<Q") if entries else 1
        _put(data, toff + 16, "<Q", rng.choice([sid, 0, 99]))
        _put(data, toff + 24, "<Q", h.journal_epoch + rng.choice([-1, 0, 1, 2]))
        _reseal_snapshot_table(data, h)
        return "revert marker"
    if what == "truncate":
        del data[rng.randrange(d, len(data) + 1) :]
        return "truncate"
    hot = [0, h.table_offset, h.journal_offset] + [e[1] for e in entries]
    for _ in range(rng.randint(1, 4)):
        at = min(rng.choice(hot) + rng.randrange(600), len(data) - 1)
        data[at] ^= 1 << rng.randrange(8)
    if rng.random() < 0.5:
        _reseal_header(data)
    return "bytes"


# ----- qcow2 mutations -----------------------------------------------------------------------
def mutate_qcow2(rng, data):
    be = lambda w: ">" + w  # noqa: E731
    cs = 1 << _u(data, 20, ">I")
    l1_off, l1_n = _u(data, 40, ">Q"), min(_u(data, 36, ">I"), len(data) // 8)
    rt_off = _u(data, 48, ">Q")
    snap_off = _u(data, 64, ">Q")
    nclus = max(1, len(data) // cs)
    what = rng.choice(
        ["header", "l1", "l2", "reftable", "refblock", "snapshot", "bytes", "truncate"]
    )
    offsets = [l1_off, rt_off, snap_off, 0, cs * rng.randrange(nclus + 2)]
    if what == "header":
        off, w = rng.choice(
            [
                (8, "Q"),
                (20, "I"),
                (24, "Q"),
                (36, "I"),
                (40, "Q"),
                (48, "Q"),
                (56, "I"),
                (60, "I"),
                (64, "Q"),
                (72, "Q"),
                (80, "Q"),
                (88, "Q"),
                (96, "I"),
                (100, "I"),
            ]
        )
        _put(data, off, be(w), _value(rng, 0, offsets))
        return f"header {off}"
    if what == "l1" and l1_n:
        i = rng.randrange(l1_n)
        _put(data, l1_off + 8 * i, ">Q", rng.choice(offsets) | rng.choice([0, 1 << 63]))
        return "l1"
    if what == "l2":
        l1e = [
            _u(data, l1_off + 8 * i, ">Q") & 0x00FFFFFFFFFFFE00
            for i in range(l1_n)
            if l1_off + 8 * i + 8 <= len(data)
        ]
        l1e = [x for x in l1e if x and x + cs <= len(data)]
        if l1e:
            t = rng.choice(l1e)
            j = rng.randrange(cs // 8)
            _put(
                data,
                t + 8 * j,
                ">Q",
                rng.choice(offsets + [_value(rng, 0)]) | rng.choice([0, 1 << 63, 1, 1 << 62]),
            )
        return "l2"
    if what == "reftable":
        _put(
            data,
            rt_off + 8 * rng.randrange(4),
            ">Q",
            rng.choice(offsets + [1 << 55, _value(rng, 0)]),
        )
        return "reftable"
    if what == "refblock":
        rb = _u(data, rt_off, ">Q") if rt_off + 8 <= len(data) else 0
        if rb and rb + cs <= len(data):
            _put(
                data,
                rb + 2 * rng.randrange(min(cs // 2, nclus + 4)),
                ">H",
                rng.choice([0, 1, 2, 0xFFFF]),
            )
        return "refblock"
    if what == "snapshot" and snap_off:
        _put(
            data,
            snap_off + rng.choice([0, 8, 12, 14, 32, 36, 40, 48]),
            rng.choice([">Q", ">I", ">H"]),
            _value(rng, 0, offsets),
        )
        return "snapshot"
    if what == "truncate":
        del data[rng.randrange(cs, len(data) + 1) :]
        return "truncate"
    for _ in range(rng.randint(1, 4)):
        at = min(rng.choice([0, l1_off, rt_off, snap_off]) + rng.randrange(256), len(data) - 1)
        data[at] ^= 1 << rng.randrange(8)
    return "bytes"


# ----- operations ------------------------------------------------------------------------------
class Violation(Exception):
    """An outcome the rules forbid (not an exception type one)."""


def _allowed(e):
    import fvd

    return isinstance(e, (fvd.FvdError, ValueError))


def _attempt(fn):
    """Run fn; allowed errors return None, others propagate."""
    try:
        return fn()
    except BaseException as e:
        if _allowed(e):
            return None
        raise


def _changed(img):
    names = [s.name for s in sorted(img.snapshots(), key=lambda s: s.id)]
    for since in names[:1]:
        for until in names[1:] + [None]:
            img.changed_extents_array(since, until)


def _use_fvd(img):
    img.read(0, img.size)
    list(img.extents())
    _attempt(lambda: _changed(img))
    for s in img.snapshots():

        def view(name=s.name):
            with img.open_snapshot(name) as v:
                v.read(0, v.size)
                list(v.extents())
            img.read_vm_state(name)

        _attempt(view)


def run_fvd_case(path):
    import fvd
    from fvd.image import check_file as check_path

    def read_only():
        with fvd.open(path) as img:
            _use_fvd(img)
            img.check()

    _attempt(read_only)
    saved = path + ".orig"
    shutil.copyfile(path, saved)

    def read_write():
        with fvd.open(path, "r+") as img:
            _use_fvd(img)
            for s in img.snapshots()[:1]:
                _attempt(lambda s=s: img.revert_to_snapshot(s.name))
            img.write(CS - 100, b"\xab" * 300)
            img.write(17 * CS, b"\xcd" * 5000)
            img.write_zeroes(8 * CS, CS)
        with fvd.open(path) as img:
            _use_fvd(img)
            if img.read(17 * CS, 5000) != b"\xcd" * 5000:
                raise Violation("a write acknowledged before close is lost after reopen")

    _attempt(read_write)
    shutil.copyfile(saved, path)
    _attempt(lambda: check_path(path))
    result = _attempt(lambda: check_path(path, repair=True))
    if result is not None and result.ok:
        try:
            again = check_path(path)
            with fvd.open(path, "r+") as img:
                _use_fvd(img)
                _changed(img)  # a repaired image has no bad granule record left
                img.write(0, b"x" * min(10, img.size))
        except fvd.CorruptImageError as e:
            # an epoch near 2^63 (a hostile header) reaches the documented write limit
            if e.offset != 128:
                raise Violation(f"repair reported success, then: {e!r}") from e
        except fvd.BaseImageError as e:
            # the base is outside the image: check says it could not open it
            if not any("base image not opened" in m for m in result.messages):
                raise Violation(f"repair reported success, then: {e!r}") from e
        except fvd.FvdError as e:
            raise Violation(f"repair reported success, then: {e!r}") from e
        if not again.ok:
            raise Violation(f"repair reported success, then check: {again.messages[:5]}")


def run_qcow2_case(path):
    import fvd
    import fvd.qcow2 as q

    def use(img):
        img.read(0, img.size)
        list(img.extents())
        img.check()
        for s in img.snapshots():
            _attempt(lambda s=s: img.read_vm_state(s.name))

    def read_only():
        with q.open(path) as img:
            use(img)

    _attempt(read_only)
    saved = path + ".orig"
    shutil.copyfile(path, saved)

    def read_write():
        with q.open(path, "r+") as img:
            use(img)
            img.write(CS - 100, b"\xab" * 300)
            img.write(17 * CS, b"\xcd" * 5000)
            img.write_zeroes(8 * CS, CS)
            img.flush()
        with q.open(path) as img:
            use(img)
            if img.read(17 * CS, 5000) != b"\xcd" * 5000:
                raise Violation("a write acknowledged before close is lost after reopen")

    _attempt(read_write)
    shutil.copyfile(saved, path)

    def repair():
        with q.open(path, "r+") as img:
            return img.check(repair=True)

    result = _attempt(repair)
    if result is not None and result.ok:
        try:
            with q.open(path) as img:
                again = img.check()
                use(img)
        except fvd.FvdError as e:
            raise Violation(f"repair reported success, then: {e!r}") from e
        if not again.ok:
            raise Violation(f"repair reported success, then check: {again}")


# ----- child process ------------------------------------------------------------------------
def worker(kind, seed, start, count):
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    # tmpfs when there is one: the cases fdatasync a lot and test no durability
    work = tempfile.mkdtemp(prefix="fvdfuzz", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        templates = build_templates(work)
        names = ["plain", "base"] if kind == "fvd" else ["qcow2"]
        for i in range(start, start + count):
            print(f"START {i}", flush=True)
            rng = random.Random(f"{seed}-{kind}-{i}")
            name = rng.choice(names)
            data = bytearray(open(templates[name], "rb").read())
            whats = []
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                try:
                    whats.append((mutate_fvd if kind == "fvd" else mutate_qcow2)(rng, data))
                except Exception:  # a mutation that does not apply to this image
                    whats.append("skipped")
            path = os.path.join(work, f"case.{'fvd' if kind == 'fvd' else 'qcow2'}")
            for p in (path, path + ".orig"):
                if os.path.exists(p):
                    os.unlink(p)
            with open(path, "wb") as f:
                f.write(data)
            try:
                (run_fvd_case if kind == "fvd" else run_qcow2_case)(path)
                print(f"OK {i}", flush=True)
            except BaseException as e:  # noqa: B036 - every escape is a finding
                tb = traceback.format_exc(limit=-6)
                print(
                    "FAIL "
                    + json.dumps(
                        {
                            "case": i,
                            "template": name,
                            "mutations": whats,
                            "error": repr(e)[:300],
                            "traceback": tb,
                        }
                    ),
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_fuzz(kind, cases, seed=0, timeout=CASE_TIMEOUT, batch=None, env=None):
    """Run `cases` cases in child processes; returns the list of failures (dicts)."""
    failures = []
    nxt, end = 0, cases
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while nxt < end:
        n = end - nxt if batch is None else min(batch, end - nxt)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fuzzlib", "worker", kind, str(seed), str(nxt), str(n)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        current, last = nxt, time.monotonic()
        started = False  # building the templates is not part of a case's time
        stop = nxt + n
        buf = ""
        while True:
            r, _, _ = select.select([proc.stdout], [], [], 0.5)
            if r:
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith("START "):
                    current, last = int(line.split()[1]), time.monotonic()
                    started = True
                elif line.startswith("OK "):
                    nxt = int(line.split()[1]) + 1
                elif line.startswith("FAIL "):
                    failures.append(json.loads(line[5:]))
                    nxt = failures[-1]["case"] + 1
            elif time.monotonic() - last > (timeout if started else 6 * timeout):
                proc.kill()
                failures.append({"case": current, "error": f"hang: no result in {timeout} s"})
                nxt = current + 1
                break
        proc.wait()
        buf = proc.stderr.read()
        if failures and failures[-1]["case"] == current and "hang" in failures[-1]["error"]:
            continue
        if nxt <= current and nxt < stop:  # the child died inside a case
            failures.append(
                {
                    "case": current,
                    "error": f"child died (exit {proc.returncode})",
                    "stderr": buf[-2000:],
                }
            )
            nxt = current + 1
        elif nxt < stop and proc.returncode:
            failures.append(
                {"case": nxt, "error": f"child exit {proc.returncode}", "stderr": buf[-2000:]}
            )
            nxt += 1
    return failures


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:  # python -m tests.fuzzlib fvd|qcow2 CASES [SEED]
        fails = run_fuzz(
            sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0
        )
        for f in fails:
            print(json.dumps(f))
        print(f"{sys.argv[1]}: {sys.argv[2]} cases, {len(fails)} failures")
        sys.exit(1 if fails else 0)
