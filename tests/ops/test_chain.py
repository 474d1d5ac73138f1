"""fvd.chain: commit, rebase, compare, measure and resize of fvd and qcow2 chains.

Oracles: qemu-img (compare of every result against the expected guest bytes, check of
every qcow2 result, its own commit / rebase / compare / measure on the same inputs).
fvd images go through a raw export (fvd.convert) for qemu-img compare.
"""

import json
import os
import shutil
import subprocess

import pytest

import fvd
import fvd.imageio
from fvd import chain, qcow2
from fvd.errors import ChainError

from ..helpers import pat
from ..nbd_helpers import nbdkit_file, need_nbd_tools

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1 << 20
SIZE = 8 * MiB
CS = 64 * 1024


def qemu_img(*args, check=True):
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"qemu-img {args}: {r.stdout}{r.stderr}")
    return r


def qemu_io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def raw_of(path, tmp_path, name):
    """The guest bytes of any image (fvd through fvd.convert), as a raw file."""
    out = str(tmp_path / name)
    fvd.convert(str(path), out, dst_format="raw")
    return out


def assert_reads(path, ref, tmp_path, prefix=False):
    """`path` reads as the raw file `ref` (prefix: its first bytes do; the image may be
    longer, as a base that was longer than the overlay committed into it)."""
    exported = raw_of(path, tmp_path, "export.raw")
    if prefix:
        assert os.path.getsize(exported) >= os.path.getsize(ref)
        os.truncate(exported, os.path.getsize(ref))
    r = qemu_img("compare", "-f", "raw", "-F", "raw", exported, ref, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    os.unlink(exported)


def assert_qcow2_clean(path):
    # the file alone (its backing file may be an fvd image, which QEMU cannot open)
    alone = json.dumps(
        {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(path)}}
    )
    r = qemu_img("check", "--output=json", f"json:{alone}", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# ----- chains ---------------------------------------------------------------------------
def qcow2_chain(tmp_path):
    """base <- mid <- top, written by qemu-io: data, zeros and overlaps in each layer."""
    b, m, t = (str(tmp_path / n) for n in ("b.qcow2", "m.qcow2", "t.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", b, SIZE)
    qemu_io(b, "write -P 1 0 3M", "write -P 2 6M 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", m)
    qemu_io(m, "write -P 3 1M 100k", "write -z 2M 1M", "write -P 4 7M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", t)
    qemu_io(t, "write -P 5 512k 70k", "write -z 0 64k", "write -P 6 5M 4k")
    return b, m, t


def qcow2_chain_twice(tmp_path):
    """A qcow2 chain, its contents as raw (ref.raw) and a copy of it in theirs/ for
    qemu-img to work on: (base, mid, top, ref, theirs)."""
    b, m, t = qcow2_chain(tmp_path)
    ref = str(tmp_path / "ref.raw")
    qemu_img("convert", "-O", "raw", t, ref)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for p in (b, m, t):
        shutil.copy(p, theirs)
    return b, m, t, ref, theirs


def fvd_chain(tmp_path, base_format="fvd"):
    """base (fvd or qcow2) <- mid.fvd <- top.fvd."""
    if base_format == "fvd":
        b = str(tmp_path / "b.fvd")
        fvd.create(b, SIZE, chunk_size=CS, block_size=4096)
        with fvd.open(b, "r+") as img:
            img.write(0, pat(1, 3 * MiB))
            img.write(6 * MiB, pat(2, MiB))
    else:
        b = str(tmp_path / "b.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", b, SIZE)
        qemu_io(b, "write -P 1 0 3M", "write -P 2 6M 1M")
    m, t = str(tmp_path / "m.fvd"), str(tmp_path / "t.fvd")
    fvd.create(m, SIZE, base=os.path.basename(b), base_format=base_format, chunk_size=CS,
               block_size=4096)  # fmt: skip
    with fvd.open(m, "r+") as img:
        img.write(MiB, pat(3, 100_000))
        img.write_zeroes(2 * MiB, MiB)
        img.write(7 * MiB, pat(4, CS))
    fvd.create(t, SIZE, base="m.fvd", base_format="fvd", chunk_size=CS, block_size=4096)
    with fvd.open(t, "r+") as img:
        img.write(512 * 1024, pat(5, 70_000))
        img.write_zeroes(0, CS)
        img.write(5 * MiB, pat(6, 4096))
    return b, m, t


# ----- compare --------------------------------------------------------------------------
def compare_pairs(tmp_path):
    b, m, t = qcow2_chain(tmp_path)
    ref = str(tmp_path / "t.raw")
    qemu_img("convert", "-O", "raw", t, ref)
    changed = str(tmp_path / "changed.raw")
    shutil.copyfile(ref, changed)
    with open(changed, "r+b") as f:
        f.seek(5 * MiB + 1000)
        f.write(b"!")
    longer = str(tmp_path / "longer.raw")
    shutil.copyfile(ref, longer)
    os.truncate(longer, SIZE + MiB)
    longer_data = str(tmp_path / "longer-data.raw")
    shutil.copyfile(longer, longer_data)
    with open(longer_data, "r+b") as f:
        f.seek(SIZE + 4096 + 7)
        f.write(b"x")
    t2 = str(tmp_path / "t2.qcow2")
    qemu_img("convert", "-O", "qcow2", t, t2)
    return [
        (t, ref),
        (t, m),
        (m, b),
        (t, changed),
        (changed, ref),
        (ref, longer),
        (longer_data, ref),
        (t, t2),
        (t2, t),
        (b, b),
    ]


@pytest.mark.parametrize("strict", [False, True])
def test_compare_agrees_with_qemu_img(tmp_path, strict):
    for a, b in compare_pairs(tmp_path):
        flag = ["-s"] if strict else []
        r = qemu_img("compare", *flag, a, b, check=False)
        ours = chain.compare_images(a, b, strict=strict)
        lines = [*ours.warnings, ours.message]
        assert (0 if ours.identical else 1) == r.returncode, (a, b, r.stdout)
        if not strict or "block status" not in r.stdout:
            # qemu's strict allocation status includes flags fvd does not model
            # (OFFSET_VALID), so only its verdict is checked there
            assert lines == r.stdout.splitlines(), (a, b)
        assert chain.compare(a, b, strict=strict) == ours.identical


def test_compare_fvd_chains(tmp_path):
    b, m, t = fvd_chain(tmp_path)
    ref_t, ref_m = raw_of(t, tmp_path, "t.raw"), raw_of(m, tmp_path, "m.raw")
    assert chain.compare(t, ref_t)
    assert chain.compare(ref_t, t)
    ours = chain.compare_images(t, m)
    theirs = qemu_img("compare", ref_t, ref_m, check=False)
    assert theirs.returncode == 1 and ours.message == theirs.stdout.strip()
    q = str(tmp_path / "t.qcow2")
    fvd.convert(t, q, dst_format="qcow2")
    assert chain.compare(t, q) and chain.compare(q, t)


def test_compare_reads_no_holes(tmp_path):
    a, b = str(tmp_path / "a.fvd"), str(tmp_path / "b.fvd")
    for p in (a, b):
        fvd.create(p, 1 << 40)
        with fvd.open(p, "r+") as img:
            img.write(1 << 39, b"same")
    assert chain.compare(a, b)  # 1 TiB each: only the one data chunk is read


# ----- commit ---------------------------------------------------------------------------
def test_commit_qcow2_matches_qemu_img_commit(tmp_path):
    b, m, t, ref, theirs = qcow2_chain_twice(tmp_path)
    qemu_img("commit", "-q", theirs / "t.qcow2")
    own = json.loads(qemu_img("map", "--output=json", t).stdout)
    own_data = sum(e["length"] for e in own if e["depth"] == 0 and e["data"])
    result = chain.commit(t)
    assert isinstance(result, fvd.ConvertResult)
    assert result.bytes_written == result.bytes_read == own_data  # only the top's data
    assert result.zero_ranges == 1
    for p in (b, m, t):
        assert_qcow2_clean(p)
    assert qemu_img("compare", m, ref, check=False).returncode == 0
    assert qemu_img("compare", t, ref, check=False).returncode == 0  # emptied, reads m
    assert qemu_img("compare", m, theirs / "m.qcow2", check=False).returncode == 0
    top_map = json.loads(qemu_img("map", "--output=json", t).stdout)
    assert all(e["depth"] > 0 for e in top_map)  # nothing left in the top


def test_commit_qcow2_into_deeper_base(tmp_path):
    b, m, t = qcow2_chain(tmp_path)
    ref = str(tmp_path / "ref.raw")
    qemu_img("convert", "-O", "raw", t, ref)
    chain.commit(t, base=b)
    assert_qcow2_clean(b)
    assert_qcow2_clean(t)
    assert qemu_img("compare", b, ref, check=False).returncode == 0
    assert qemu_img("compare", t, ref, check=False).returncode == 0  # -b implies -d


@pytest.mark.parametrize("base_format", ["fvd", "qcow2"])
def test_commit_fvd_chain(tmp_path, base_format):
    b, m, t = fvd_chain(tmp_path, base_format)
    ref = raw_of(t, tmp_path, "ref.raw")
    result = chain.commit(t)
    assert result.bytes_read == result.bytes_written > 0
    assert_reads(m, ref, tmp_path)
    assert_reads(t, ref, tmp_path)
    with fvd.open(t) as img:
        assert img.allocated_chunks == 0
        assert img.check().ok
    with fvd.open(m) as img:
        assert img.check().ok
    with fvd.open(t, "r+") as img:  # the emptied overlay still takes writes
        img.write(0, b"after")


def test_commit_fvd_into_deeper_base_and_drop(tmp_path):
    b, m, t = fvd_chain(tmp_path)
    ref = raw_of(t, tmp_path, "ref.raw")
    with fvd.open(t) as img:
        before = img.allocated_chunks
    chain.commit(t, base=b)
    assert_reads(b, ref, tmp_path)
    assert_reads(t, ref, tmp_path)
    with fvd.open(t) as img:
        assert img.allocated_chunks == before  # -b implies -d
    (tmp_path / "again").mkdir()
    b, m, t = fvd_chain(tmp_path / "again")
    chain.commit(t, drop=True)
    with fvd.open(t) as img:
        assert img.allocated_chunks == before


def test_commit_grows_a_smaller_base(tmp_path):
    b = str(tmp_path / "b.raw")
    with open(b, "wb") as f:
        f.write(pat(1, MiB))
    t = str(tmp_path / "t.fvd")
    fvd.create(t, MiB, base="b.raw", base_format="raw", chunk_size=CS)
    with fvd.open(t, "r+") as img:
        img.resize(2 * MiB)
        img.write(MiB + 100, b"tail")
    ref = raw_of(t, tmp_path, "ref.raw")
    chain.commit(t)
    assert os.path.getsize(b) == 2 * MiB
    assert qemu_img("compare", "-f", "raw", b, ref, check=False).returncode == 0
    assert_reads(t, ref, tmp_path)
    with fvd.open(t) as img:
        assert img.base_size == 2 * MiB and img.check().ok


def test_commit_refuses_without_backing(tmp_path):
    p = str(tmp_path / "a.fvd")
    fvd.create(p, MiB)
    with pytest.raises(ChainError, match="no backing file"):
        chain.commit(p)
    b, m, t = fvd_chain(tmp_path)
    with pytest.raises(ChainError, match="not in the backing chain"):
        chain.commit(t, base=p)


# ----- rebase ---------------------------------------------------------------------------
def test_rebase_qcow2_safe_and_unsafe_match_qemu_img(tmp_path):
    b, m, t, ref, theirs = qcow2_chain_twice(tmp_path)
    result = chain.rebase(t, "b.qcow2", backing_format="qcow2")
    assert result.bytes_written > 0
    qemu_img("rebase", "-q", "-b", "b.qcow2", "-F", "qcow2", theirs / "t.qcow2")
    assert_qcow2_clean(t)
    info = json.loads(qemu_img("info", "--output=json", t).stdout)
    assert info["backing-filename"] == "b.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert qemu_img("compare", t, ref, check=False).returncode == 0
    assert qemu_img("compare", t, theirs / "t.qcow2", check=False).returncode == 0
    # -u: header only, as qemu-img rebase -u
    chain.rebase(t, "m.qcow2", backing_format="qcow2", unsafe=True)
    qemu_img("rebase", "-q", "-u", "-b", "m.qcow2", "-F", "qcow2", theirs / "t.qcow2")
    assert_qcow2_clean(t)
    assert qemu_img("compare", t, theirs / "t.qcow2", check=False).returncode == 0


@pytest.mark.parametrize("new_size", [SIZE, 12 * MiB, 3 * MiB + 512])
def test_rebase_fvd_safe_keeps_the_contents(tmp_path, new_size):
    b, m, t = fvd_chain(tmp_path)
    ref = raw_of(t, tmp_path, "ref.raw")
    other = str(tmp_path / "other.raw")
    with open(other, "wb") as f:
        f.write(pat(9, new_size))
    chain.rebase(t, "other.raw", backing_format="raw")
    assert_reads(t, ref, tmp_path)
    with fvd.open(t) as img:
        assert img.base == other and img.base_size == new_size
        assert img.check().ok
    chain.rebase(t, "b.fvd", backing_format="fvd")  # and back to the original bottom
    assert_reads(t, ref, tmp_path)
    with fvd.open(t) as img:
        assert img.base_size == SIZE and img.check().ok


def test_rebase_fvd_unsafe_reads_the_new_base(tmp_path):
    b, m, t = fvd_chain(tmp_path)
    with fvd.open(t) as img:
        own = [e for e in img.extents() if e.depth == 0 and e.present]
        before = img.read(0, SIZE)
    other = str(tmp_path / "other.raw")
    data = pat(9, 12 * MiB)
    with open(other, "wb") as f:
        f.write(data)
    chain.rebase(t, "other.raw", backing_format="raw", unsafe=True)
    with fvd.open(t) as img:
        after = img.read(0, SIZE)
        assert img.check().ok
    expected = bytearray(data[:SIZE])
    for e in own:
        expected[e.start : e.start + e.length] = before[e.start : e.start + e.length]
    assert after == bytes(expected)


def test_rebase_refuses(tmp_path):
    b, m, t = fvd_chain(tmp_path)
    with pytest.raises(ChainError, match="does not exist"):
        chain.rebase(t, "missing.raw")
    with pytest.raises(ChainError, match="a loop"):
        chain.rebase(m, "t.fvd", unsafe=True)
    p = str(tmp_path / "plain.fvd")
    fvd.create(p, SIZE)
    with pytest.raises(ChainError, match="has no base image"):
        chain.rebase(p, "b.fvd", unsafe=True)
    with fvd.open(t, "r+") as img:
        img.create_snapshot("s")
    with pytest.raises(ChainError, match="internal snapshots"):
        chain.rebase(t, "b.fvd")


# ----- measure --------------------------------------------------------------------------
@pytest.mark.parametrize("cluster_size", [65536, 4096, 2 * MiB])
def test_measure_matches_qemu_img(tmp_path, cluster_size):
    b, m, t = qcow2_chain(tmp_path)
    ref = str(tmp_path / "ref.raw")
    qemu_img("convert", "-O", "raw", t, ref)
    for src in (t, m, b, ref):
        r = qemu_img("measure", "--output=json", "-O", "qcow2", "-o",
                     f"cluster_size={cluster_size}", src)  # fmt: skip
        theirs = json.loads(r.stdout)
        ours = chain.measure(src, cluster_size=cluster_size)
        assert ours["required"] == theirs["required"], src
        assert ours["fully-allocated"] == theirs["fully-allocated"], src


def test_measure_bounds_real_outputs(tmp_path):
    b, m, t = fvd_chain(tmp_path)
    for out_format in ("qcow2", "fvd"):
        got = chain.measure(t, out_format=out_format)
        out = str(tmp_path / f"out.{out_format}")
        fvd.convert(t, out, dst_format=out_format)
        assert os.stat(out).st_blocks * 512 <= got["required"] <= got["fully-allocated"]


def test_measure_since_an_incremental(tmp_path):
    p = str(tmp_path / "v.fvd")
    fvd.create(p, 64 * MiB)
    with fvd.open(p, "r+") as img:
        img.write(0, pat(1, 8 * MiB))
        img.create_snapshot("s1")
        img.write(32 * MiB, pat(2, 3 * 4096))
        img.create_snapshot("s2")
    full = chain.measure(p, snapshot="s2")
    inc = chain.measure(p, snapshot="s2", since="s1")
    assert inc["required"] < full["required"]
    assert inc["fully-allocated"] == full["fully-allocated"]
    prev = str(tmp_path / "full.qcow2")
    fvd.convert(p, prev, dst_format="qcow2", snapshot="s1")
    out = str(tmp_path / "inc.qcow2")
    fvd.convert(p, out, dst_format="qcow2", snapshot="s2", since="s1", backing="full.qcow2",
                backing_format="qcow2")  # fmt: skip
    assert os.stat(out).st_blocks * 512 <= inc["required"]
    # qemu-img measure of the incremental alone counts its own clusters only
    theirs = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", out).stdout)
    assert inc["required"] - theirs["required"] <= 2 * 65536


# ----- resize ---------------------------------------------------------------------------
def test_resize_fvd_grow_in_place_and_into_the_journal(tmp_path):
    p = str(tmp_path / "r.fvd")
    fvd.create(p, MiB, chunk_size=CS, journal_size=MiB)
    with fvd.open(p, "r+") as img:
        img.write(0, pat(1, 70_000))
        img.resize(2 * MiB)  # fits the table's 4 KiB region
        assert img.size == 2 * MiB
        img.resize(1 << 30)  # 16384 entries: the table moves into the journal region
        img.write((1 << 30) - 5, b"tail!")
        assert img.read(0, 70_000) == pat(1, 70_000)
    with fvd.open(p) as img:
        assert img.size == 1 << 30
        assert img.read((1 << 30) - 5, 5) == b"tail!"
        assert img.read(MiB, MiB) == bytes(MiB)
        assert img.check().ok
        assert img.info()["format-specific"]["data"]["table-size"] == 65536


def test_resize_fvd_shrink_only_over_unused_space(tmp_path):
    p = str(tmp_path / "r.fvd")
    fvd.create(p, 4 * MiB, chunk_size=CS)
    with fvd.open(p, "r+") as img:
        img.write(3 * MiB, b"data")
        with pytest.raises(ChainError, match="shrink"):
            img.resize(MiB)
        with pytest.raises(ChainError, match="lies past the new size"):
            img.resize(MiB, shrink=True)
        assert img.size == 4 * MiB
        img.write(3 * MiB, bytes(4))  # zeros: nothing is lost by cutting them
        img.resize(MiB, shrink=True)
        assert img.size == MiB
        img.resize(4 * MiB)
        assert img.read(3 * MiB, 4) == bytes(4)
    with fvd.open(p) as img:
        assert img.check().ok


def test_resize_fvd_refusals(tmp_path):
    p = str(tmp_path / "r.fvd")
    fvd.create(p, MiB, chunk_size=CS, journal_size=64 * 1024)
    with fvd.open(p, "r+") as img:
        with pytest.raises(ChainError, match="cannot grow past"):
            img.resize(1 << 40)
        img.create_snapshot("s")
        with pytest.raises(ChainError, match="internal snapshots"):
            img.resize(2 * MiB)
        assert img.size == MiB
    with fvd.open(p) as img:
        assert img.check().ok


def test_resize_qcow2_checked_by_qemu_img(tmp_path):
    p = str(tmp_path / "r.qcow2")
    qcow2.create(p, MiB)
    with qcow2.open(p, "r+") as img:
        img.write(0, pat(1, 5000))
        img.resize(3 << 30)  # L1 grows
        img.write((3 << 30) - 512, pat(2, 512))
    assert_qcow2_clean(p)
    info = json.loads(qemu_img("info", "--output=json", p).stdout)
    assert info["virtual-size"] == 3 << 30
    with pytest.raises(ChainError, match="shrink"):
        chain.resize(p, 2 * MiB)
    with qcow2.open(p, "r+") as img:
        img.write_zeroes((3 << 30) - 512, 512)
    chain.resize(p, 2 * MiB, shrink=True)
    assert_qcow2_clean(p)
    assert json.loads(qemu_img("info", "--output=json", p).stdout)["virtual-size"] == 2 * MiB
    ref = str(tmp_path / "ref.raw")
    with open(ref, "wb") as f:
        f.write(pat(1, 5000).ljust(2 * MiB, b"\0"))
    assert qemu_img("compare", p, ref, check=False).returncode == 0


def test_resize_raw(tmp_path):
    p = str(tmp_path / "r.raw")
    with open(p, "wb") as f:
        f.write(b"x" * 4096)
    chain.resize(p, MiB)
    assert os.path.getsize(p) == MiB
    with pytest.raises(ChainError, match="lies past the new size"):
        chain.resize(p, 2048, shrink=True)
    chain.resize(p, 4096, shrink=True)
    assert os.path.getsize(p) == 4096


# ----- random chains ----------------------------------------------------------------------
def random_chain(tmp_path, seed):
    """2..4 layers of random formats (the bottom may be raw), random data and zero
    writes in each; returns the layer paths, bottom first, and the model of the top."""
    import random

    rng = random.Random(seed)
    model = bytearray()
    paths = []
    for depth in range(rng.randint(2, 4)):
        size = rng.choice([4 * MiB, 3 * MiB + 512 * rng.randrange(2048), 5 * MiB])
        model = model[:size].ljust(size, b"\0")  # past a shorter backing file: zeros
        kind = rng.choice(["fvd", "qcow2"] + (["raw"] if depth == 0 else []))
        p = str(tmp_path / f"l{depth}.{kind}")
        below = os.path.basename(paths[-1]) if paths else None
        below_fmt = below.rsplit(".", 1)[1] if below else None
        if kind == "raw":
            with open(p, "wb") as f:
                f.truncate(size)
            img = fvd.imageio.RawImage(p, "r+")
        elif kind == "fvd":
            fvd.create(p, size, base=below, base_format=below_fmt, chunk_size=CS,
                       block_size=rng.choice([4096, 16384]))  # fmt: skip
            img = fvd.open(p, "r+")
        else:
            qcow2.create(p, size, cluster_size=rng.choice([4096, 65536]), backing_file=below,
                         backing_format=below_fmt)  # fmt: skip
            img = qcow2.open(p, "r+")
        with img:
            for _ in range(rng.randint(1, 12)):
                off = rng.randrange(size)
                n = min(size - off, rng.choice([512, 4096, 70_000, 300_000]))
                if rng.random() < 0.25 and depth:
                    img.write_zeroes(off, n)
                    model[off : off + n] = bytes(n)
                else:
                    data = rng.randbytes(n)
                    img.write(off, data)
                    model[off : off + n] = data
        paths.append(p)
    return paths, bytes(model), rng


@pytest.mark.parametrize("seed", range(int(os.environ.get("FVD_CHAIN_SEEDS", "6"))))
def test_random_chains(tmp_path, seed):
    paths, model, rng = random_chain(tmp_path, seed)
    ref = str(tmp_path / "model.raw")
    with open(ref, "wb") as f:
        f.write(model)
    top = paths[-1]
    assert chain.compare(top, ref) and chain.compare(ref, top)
    assert chain.compare(top, ref, strict=False)
    # safe rebase straight onto the bottom keeps the contents
    if len(paths) > 2:
        bottom = os.path.basename(paths[0])
        chain.rebase(top, bottom, backing_format=bottom.rsplit(".", 1)[1])
        assert_reads(top, ref, tmp_path)
        paths = [paths[0], top]
    # commit into a random layer of the chain
    depth = rng.randint(1, len(paths) - 1)
    target = paths[-1 - depth]
    chain.commit(top, base=None if depth == 1 else target)
    assert_reads(target, ref, tmp_path, prefix=True)
    assert_reads(top, ref, tmp_path)
    for p in paths:
        if p.endswith(".qcow2"):
            assert_qcow2_clean(p)
        elif p.endswith(".fvd"):
            with fvd.open(p) as img:
                assert img.check().ok


def test_compare_partial_chunks_and_raw_bases(tmp_path):
    p = str(tmp_path / "g.fvd")
    fvd.create(p, 4 * MiB)
    with fvd.open(p, "r+") as img:
        img.write(0, pat(1, 4 * MiB))
        img.create_snapshot("s")
        img.write(5000, pat(2, 9000))  # partial chunks: granules split between chunks
        img.write(3 * MiB + 4096, pat(3, 4096))
    ref = raw_of(p, tmp_path, "g.raw")
    assert chain.compare(p, ref)
    changed = str(tmp_path / "changed.raw")
    shutil.copyfile(ref, changed)
    with open(changed, "r+b") as f:
        f.seek(5000 + 4500)
        f.write(b"?")
    assert chain.compare_images(p, changed).message == "Content mismatch at offset 9216!"
    t = str(tmp_path / "t.fvd")
    fvd.create(t, 4 * MiB, base="g.raw", base_format="raw", block_size=4096)
    with fvd.open(t, "r+") as img:
        img.write(MiB + 100, b"over")
    expected = bytearray(open(ref, "rb").read())
    expected[MiB + 100 : MiB + 104] = b"over"
    with open(changed, "wb") as f:
        f.write(expected)
    assert chain.compare(t, changed)


@pytest.mark.parametrize("seed", range(int(os.environ.get("FVD_CHAIN_SEEDS", "6"))))
def test_random_unsafe_rebase(tmp_path, seed):
    """-u: what the image's own layer holds stays; every other byte reads the new
    backing file (zeros past its end), as qemu-img rebase -u."""
    paths, model, rng = random_chain(tmp_path, seed)
    top = paths[-1]
    with fvd.imageio.open_image(top) as img:
        own = [e for e in img.extents() if e.depth == 0 and e.present]
    new = str(tmp_path / "new.raw")
    data = rng.randbytes(rng.choice([2 * MiB, 4 * MiB, 6 * MiB]))
    with open(new, "wb") as f:
        f.write(data)
    chain.rebase(top, "new.raw", backing_format="raw", unsafe=True)
    expected = bytearray(data[: len(model)].ljust(len(model), b"\0"))
    for e in own:
        expected[e.start : e.start + e.length] = model[e.start : e.start + e.length]
    ref = str(tmp_path / "expected.raw")
    with open(ref, "wb") as f:
        f.write(expected)
    assert_reads(top, ref, tmp_path)
    if top.endswith(".qcow2"):
        assert_qcow2_clean(top)
    else:
        with fvd.open(top) as img:
            assert img.check().ok


def test_rebase_reads_no_holes(tmp_path):
    a, b, t = (str(tmp_path / n) for n in ("a.fvd", "b.fvd", "t.fvd"))
    for p, data in ((a, b"old"), (b, b"new")):
        fvd.create(p, 1 << 40)
        with fvd.open(p, "r+") as img:
            img.write(1 << 39, data)
    fvd.create(t, 1 << 40, base="a.fvd", base_format="fvd")
    result = chain.rebase(t, "b.fvd", backing_format="fvd")
    assert result.bytes_read == 2 * MiB  # the one data chunk, on both sides: 1 TiB not read
    with fvd.open(t) as img:
        assert img.read(1 << 39, 3) == b"old" and img.check().ok


def test_rebase_refuses_qcow2_v2(tmp_path):
    b, m, t = qcow2_chain(tmp_path)
    old = str(tmp_path / "old.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "m.qcow2", "-F", "qcow2",
             old)  # fmt: skip
    with pytest.raises(fvd.UnsupportedFeatureError, match="version 2"):
        chain.rebase(old, "b.qcow2", backing_format="qcow2", unsafe=True)
    assert qemu_img("check", old, check=False).returncode == 0


@pytest.mark.interop
def test_compare_and_commit_over_an_nbd_base(tmp_path):
    """An NBD base ends the chain of files: compare reads it through the image, and a
    commit into the NBD export is refused with a clear error (it is read-only here)."""
    need_nbd_tools()
    raw = str(tmp_path / "base.raw")
    with open(raw, "wb") as f:
        f.write(pat(1, 2 * MiB))
    srv = nbdkit_file(raw, tmp_path / "k.sock")
    try:
        t = str(tmp_path / "t.fvd")
        fvd.create(t, 2 * MiB, base=srv.uri, base_format="raw", block_size=4096)
        with fvd.open(t, "r+") as img:
            img.write(5000, b"top")
        expected = bytearray(pat(1, 2 * MiB))
        expected[5000:5003] = b"top"
        ref = str(tmp_path / "expected.raw")
        with open(ref, "wb") as f:
            f.write(expected)
        assert chain.compare(t, ref) and chain.compare(ref, t)
        assert chain.compare_images(t, raw).message == "Content mismatch at offset 4608!"
        with pytest.raises(ChainError, match="cannot commit into an NBD export"):
            chain.commit(t)
    finally:
        srv.stop()


def test_repeated_rebases_alternate_two_name_slots(tmp_path):
    b, m, t = fvd_chain(tmp_path)
    ref = raw_of(t, tmp_path, "ref.raw")
    journal = []
    for i in range(5):
        name = "b.fvd" if i % 2 == 0 else "./m.fvd"
        chain.rebase(t, name, backing_format="fvd", unsafe=i % 2 == 1)
        with fvd.open(t) as img:
            info = img.info()
            assert info["backing-filename"] == name and img.check().ok
            journal.append(info["format-specific"]["data"]["journal-size"])
    assert len(set(journal)) == 1  # the journal gave up at most one 4 KiB slot, once
    assert_reads(t, ref, tmp_path)


def test_resize_refuses_to_expose_a_longer_base(tmp_path):
    b = str(tmp_path / "b.raw")
    with open(b, "wb") as f:
        f.write(pat(1, 2 * MiB))
    t = str(tmp_path / "t.fvd")
    fvd.create(t, MiB, base="b.raw", base_format="raw")
    with fvd.open(t, "r+") as img:
        with pytest.raises(ChainError, match="larger than the image"):
            img.resize(4 * MiB)
        assert img.size == MiB and img.read(0, 4) == pat(1, 4)
