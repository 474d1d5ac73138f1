"""SIGKILL at a random point of a table-less image's workload (as tests/core/
test_sigkill.py for the table mode, without snapshots, which table-less images refuse):
every acknowledged write and zeroing is there after reopen, the one in flight is
all-or-nothing per sector, and check() is clean. Over a raw base (copy-on-write,
copy-on-read, prefetch) and without one. FVD_SIGKILL_ROUNDS sets the rounds."""

import json
import os
import random

import pytest

import fvd
from fvd.units import KiB

from ..helpers import NUNITS, apply_op, check_content, replay_log, run_and_kill
from ..stress import UNIT, make_base, unit_bytes

ROUNDS = int(os.environ.get("FVD_SIGKILL_ROUNDS", "3"))


def _child(path, seed, w):
    rng = random.Random(seed)
    img = fvd.open(path, "r+", cache="writethrough", copy_on_read=rng.random() < 0.5)
    version = 1

    def say(*rec):
        os.write(w, (json.dumps(rec) + "\n").encode())

    while True:
        r = rng.random()
        if r < 0.65:
            first = rng.randrange(NUNITS)
            count = rng.randint(1, min(48, NUNITS - first))
            say("B", "write", first, count, version)
            img.write(
                first * UNIT, b"".join(unit_bytes(version + i, first + i) for i in range(count))
            )
            version += count
        elif r < 0.8:
            first = rng.randrange(NUNITS)
            count = rng.randint(1, min(64, NUNITS - first))
            say("B", "zero", first, count)
            img.write_zeroes(first * UNIT, count * UNIT)
        elif r < 0.9:
            first = rng.randrange(NUNITS)
            say("B", "read", first)
            img.read(first * UNIT, UNIT)  # copy-on-read stores (soft bits)
        elif r < 0.97:
            say("B", "flush")
            img.flush()
        else:
            say("B", "prefetch")
            img.prefetch(step=64 * KiB, min_rate=0)
        say("A")


@pytest.mark.parametrize("with_base", [True, False])
def test_sigkill_tableless(tmp_path, with_base):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for rnd in range(ROUNDS):
        path = str(tmp_path / f"k{rnd}.fvd")
        base = str(tmp_path / f"b{rnd}.raw")
        make_base(base, NUNITS)
        extra = dict(base=base, base_format="raw") if with_base else {}
        fvd.create(
            path, NUNITS * UNIT, chunk_size=64 * KiB, block_size=16 * KiB, table=False, **extra
        )
        seed = rng.randrange(1 << 30)
        lines = run_and_kill(_child, rng.uniform(0.05, 0.8), path, seed)
        lines = [x for x in lines if x[:2] != ["B", "read"]]
        state, inflight, _ = replay_log(lines)
        if not with_base:
            state = [-1 if v == 0 else v for v in state]  # unwritten units read zeros
        after_state = list(state)
        if inflight is not None:
            apply_op(inflight, after_state, {})
        where = f"round {rnd} seed {seed}, in flight {inflight}"
        with fvd.open(path, "r+") as img:
            legal = [{state[u], after_state[u]} for u in range(NUNITS)]
            check_content(img.read(0, NUNITS * UNIT), legal, where)
            res = img.check()
            assert res.ok, (where, res.messages)
