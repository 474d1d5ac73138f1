"""Restoring a qcow2 chain (made by qemu-img and qemu-io) with fvd convert: the data of
each layer is read straight from that layer's file at the offsets the map gives
(`Qcow2Image.layer_readers`). Oracle: `qemu-img compare` of the output with the chain
itself, `qemu-img check` of qcow2 outputs; the ConvertResult's bytes equal what
`qemu-img map` says the chain holds."""

import json
import os
import random
import shutil
import subprocess

import pytest

import fvd
from fvd import qcow2
from fvd.types import extents_to_array
from fvd.units import KiB, MiB

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="needs qemu-img and qemu-io",
)

SIZE = 8 * MiB


def run(*cmd, stdin=None):
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, input=stdin)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def make_chain(tmp_path, base_kind):
    """base (raw, shorter than the chain, or qcow2) + 4 qcow2 overlays with scattered
    writes of odd sizes and zeroed ranges; returns the top."""
    rng = random.Random(base_kind)
    if base_kind == "raw":
        base = tmp_path / "base.raw"
        base.write_bytes(os.urandom(SIZE - MiB))  # reads past its end are zeros
    else:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", base, SIZE)
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 3 0 {3 * MiB}", base)
    fmt = "raw" if base_kind == "raw" else "qcow2"
    top = base
    for depth in range(1, 5):
        path = tmp_path / f"layer{depth}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", top.name, "-F", fmt, path, SIZE)
        cmds = []
        for _ in range(20):
            n = rng.choice((512, 4 * KiB, 70 * KiB))
            off = rng.randrange(0, SIZE - n) // 512 * 512
            cmds.append(f"write -P {rng.randrange(1, 255)} {off} {n}")
        cmds.append(f"write -z {rng.randrange(0, 100) * 64 * KiB} {128 * KiB}")
        run("qemu-io", "-f", "qcow2", path, stdin="\n".join(cmds) + "\n")
        top, fmt = path, "qcow2"
    return top


def mapped_data_bytes(path):
    m = json.loads(run("qemu-img", "map", "--output=json", path))
    return sum(e["length"] for e in m if e["data"])


@pytest.mark.parametrize("base_kind", ["raw", "qcow2"])
@pytest.mark.parametrize("dst_format", ["raw", "qcow2"])
def test_restore_chain(tmp_path, base_kind, dst_format):
    top = make_chain(tmp_path, base_kind)
    with qcow2.open(top) as img:
        assert len(img.layer_readers()) == 5
    out = tmp_path / f"restored.{dst_format}"
    result = fvd.convert(top, out, dst_format=dst_format)
    assert result.bytes_read == mapped_data_bytes(top)
    if dst_format == "qcow2":
        run("qemu-img", "check", out)
    run("qemu-img", "compare", "-f", dst_format, "-F", "qcow2", out, top)


def test_fvd_backing_layer_is_read_through_its_image(tmp_path):
    base = tmp_path / "base.fvd"
    fvd.create(str(base), SIZE)
    with fvd.open(str(base), "r+") as b:
        b.write(MiB, b"\x11" * MiB)
    top = tmp_path / "top.qcow2"
    qcow2.create(str(top), SIZE, backing_file="base.fvd", backing_format="fvd")
    with qcow2.open(str(top), "r+") as t:
        t.write(0, b"\x22" * 4096)
        assert t.layer_readers()[1] is None
    out = tmp_path / "out.raw"
    fvd.convert(top, out, dst_format="raw")
    want = bytearray(SIZE)
    want[MiB : 2 * MiB] = b"\x11" * MiB
    want[0:4096] = b"\x22" * 4096
    assert out.read_bytes() == bytes(want)


def qemu_map(path):
    m = json.loads(run("qemu-img", "map", "--output=json", path))
    return [(e["start"], e["length"], e["depth"], e["data"], e["zero"], e.get("offset")) for e in m]


def array_rows(arr):
    return [
        (int(s), int(n), int(d), bool(f & 1), bool(f & 2), None if o < 0 else int(o))
        for s, n, f, d, o in arr.tolist()
    ]


@pytest.mark.parametrize("base_kind", ["raw", "qcow2"])
def test_chain_map_in_numpy_equals_extents_and_qemu(tmp_path, base_kind):
    """extents_array() of a whole qcow2 chain (numpy, all layers at once; a raw base
    takes the general path) equals extents() and `qemu-img map`."""
    top = make_chain(tmp_path, base_kind)
    with qcow2.open(top) as img:
        fast = img.extents_array()
        slow = extents_to_array(img.extents())
    assert array_rows(fast) == array_rows(slow)
    if base_kind == "qcow2":
        assert array_rows(fast) == qemu_map(top)
    else:  # past the short raw base fvd and QEMU name different depths for the zeros
        assert [r for r in array_rows(fast) if r[3]] == [r for r in qemu_map(top) if r[3]]


def test_chain_over_shorter_backing_file(tmp_path):
    base = tmp_path / "short.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, 2 * MiB)
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {2 * MiB}", base)
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "short.qcow2", "-F", "qcow2", top, SIZE)
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 9 {3 * MiB} 4096", top)
    with qcow2.open(top) as img:
        fast = array_rows(img.extents_array())
        assert fast == array_rows(extents_to_array(img.extents()))
    assert [r for r in fast if r[3]] == [r for r in qemu_map(top) if r[3]]
    out = tmp_path / "out.raw"
    fvd.convert(top, out, dst_format="raw")
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", out, top)
