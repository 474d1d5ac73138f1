"""`fvd commit / rebase / compare / measure / resize` as drop-ins for qemu-img's: the same
exit codes, messages and JSON keys on the same inputs."""

import json
import os
import shutil
import subprocess

import pytest

import fvd
from fvd.cli import main

from ..helpers import pat
from ..ops.test_chain import compare_pairs, fvd_chain, qcow2_chain, qemu_img, raw_of

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
MiB = 1 << 20


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("strict", [False, True])
def test_compare_exit_codes_match_qemu_img(tmp_path, capsys, strict):
    flag = ["-s"] if strict else []
    for a, b in compare_pairs(tmp_path):
        theirs = qemu_img("compare", *flag, a, b, check=False)
        code, out, err = run(capsys, "compare", *flag, a, b)
        assert code == theirs.returncode, (a, b, out, theirs.stdout)
        if "block status" not in theirs.stdout:
            assert out == theirs.stdout
    missing = tmp_path / "missing.raw"
    theirs = qemu_img("compare", a, missing, check=False)
    code, out, err = run(capsys, "compare", a, missing)
    assert code == theirs.returncode == 2
    assert err.count("\n") == 1 and "missing.raw" in err


def test_compare_formats_given(tmp_path, capsys):
    b, m, t = fvd_chain(tmp_path)
    ref = raw_of(t, tmp_path, "ref.raw")
    assert run(capsys, "compare", "-f", "fvd", "-F", "raw", t, ref)[0] == 0
    code, out, err = run(capsys, "compare", "-f", "qcow2", t, ref)
    assert code == 2 and "is an fvd image" in err


def test_measure_json_matches_qemu_img(tmp_path, capsys):
    b, m, t = qcow2_chain(tmp_path)
    for src in (t, b):
        theirs = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", src).stdout)
        code, out, err = run(capsys, "measure", "--output=json", "-O", "qcow2", src)
        assert code == 0 and json.loads(out) == theirs
        human = qemu_img("measure", "-O", "qcow2", src).stdout
        assert run(capsys, "measure", "-O", "qcow2", src)[1] == human
    code, out, err = run(capsys, "measure", "--output=json", "-O", "fvd", t)
    assert code == 0 and set(json.loads(out)) == {"required", "fully-allocated"}


def test_measure_since(tmp_path, capsys):
    p = tmp_path / "v.fvd"
    fvd.create(p, 16 * MiB)
    with fvd.open(p, "r+") as img:
        img.write(0, pat(1, 4 * MiB))
        img.create_snapshot("s1")
        img.write(8 * MiB, pat(2, 4096))
    code, out, err = run(capsys, "measure", "--output=json", "--since", "s1", p)
    inc = json.loads(out)
    full = json.loads(run(capsys, "measure", "--output=json", p)[1])
    assert code == 0 and inc["required"] < full["required"]


def test_commit_rebase_resize(tmp_path, capsys):
    b, m, t = qcow2_chain(tmp_path)
    ref = str(tmp_path / "ref.raw")
    qemu_img("convert", "-O", "raw", t, ref)
    code, out, err = run(capsys, "rebase", "-b", "b.qcow2", "-F", "qcow2", t)
    assert code == 0 and qemu_img("compare", t, ref, check=False).returncode == 0
    code, out, err = run(capsys, "commit", t)
    assert (code, out) == (0, "Image committed.\n")
    assert qemu_img("compare", b, ref, check=False).returncode == 0
    qemu_img("check", b)
    code, out, err = run(capsys, "resize", b, "+1M")
    assert (code, out) == (0, "Image resized.\n")
    assert json.loads(qemu_img("info", "--output=json", b).stdout)["virtual-size"] == 9 * MiB
    code, out, err = run(capsys, "resize", b, "1M")
    assert code == 1 and "--shrink" in err and err.count("\n") == 1
    code, out, err = run(capsys, "resize", "--shrink", b, "1M")
    assert code == 1 and "past the new size" in err
    qemu_img("check", b)


def test_commit_fvd_progress_and_drop(tmp_path, capsys):
    b, m, t = fvd_chain(tmp_path)
    ref = raw_of(t, tmp_path, "ref.raw")
    size = os.path.getsize(t)
    code, out, err = run(capsys, "commit", "-d", "-p", t)
    assert code == 0 and "(100.00/100%)" in err
    assert os.path.getsize(t) == size  # -d: the top is kept as it was
    exported = raw_of(m, tmp_path, "m.raw")
    assert subprocess.run(["qemu-img", "compare", exported, ref]).returncode == 0
    code, out, err = run(capsys, "rebase", "-u", "-b", "b.fvd", "-F", "fvd", t)
    assert code == 0
    with fvd.open(t) as img:
        assert img.base.endswith("b.fvd") and img.check().ok
