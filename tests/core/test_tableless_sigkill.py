"""SIGKILL at a random point of a table-less image's workload (as tests/core/
test_sigkill.py for the table mode, without snapshots, which table-less images refuse):
every acknowledged write and zeroing is there after reopen, the one in flight is
all-or-nothing per sector, and check() is clean. Over a raw base (copy-on-write,
copy-on-read, prefetch) and without one. FVD_SIGKILL_ROUNDS sets the rounds."""

import os
import random

import pytest

import fvd
from fvd.units import KiB

from ..helpers import NUNITS, ChildLog, check_content, replay_with_inflight, run_and_kill
from ..stress import UNIT, make_base

ROUNDS = int(os.environ.get("FVD_SIGKILL_ROUNDS", "3"))


def _child(path, seed, w):
    rng = random.Random(seed)
    log = ChildLog(fvd.open(path, "r+", cache="writethrough", copy_on_read=rng.random() < 0.5), w)
    while True:
        r = rng.random()
        if r < 0.65:
            first = rng.randrange(NUNITS)
            log.write(first, rng.randint(1, min(48, NUNITS - first)))
        elif r < 0.8:
            first = rng.randrange(NUNITS)
            log.zero(first, rng.randint(1, min(64, NUNITS - first)))
        elif r < 0.9:
            log.read(rng.randrange(NUNITS))  # copy-on-read stores (soft bits)
        elif r < 0.97:
            log.flush()
        else:
            log.prefetch()


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
        (state, _), (after_state, _), inflight = replay_with_inflight(lines)
        if not with_base:  # unwritten units read zeros
            state, after_state = ([-1 if v == 0 else v for v in x] for x in (state, after_state))
        where = f"round {rnd} seed {seed}, in flight {inflight}"
        with fvd.open(path, "r+") as img:
            legal = [{state[u], after_state[u]} for u in range(NUNITS)]
            check_content(img.read(0, NUNITS * UNIT), legal, where)
            res = img.check()
            assert res.ok, (where, res.messages)
