"""SIGKILL at a random point of a mixed workload (issue 8): every acknowledged write and
snapshot is there after reopen, the operation in flight is all-or-nothing per sector,
and check() is clean.

The child (writethrough, over a raw base) reports each operation through a pipe before
("B") and after ("A") it; the parent kills it at a random moment and replays the
acknowledged operations on a model. FVD_SIGKILL_ROUNDS sets the rounds per
implementation (default 3); a soak run:

    FVD_SIGKILL_ROUNDS=200 python -m pytest -q tests/core/test_sigkill.py
"""

import os
import random

import fvd
from fvd.units import KiB

from ..helpers import NUNITS, ChildLog, assert_recovered, replay_with_inflight, run_and_kill
from ..stress import UNIT, make_base

ROUNDS = int(os.environ.get("FVD_SIGKILL_ROUNDS", "3"))


def _child(path, seed, w):
    rng = random.Random(seed)
    log = ChildLog(fvd.open(path, "r+", cache="writethrough"), w)
    snaps, k = [], 0
    while True:
        r = rng.random()
        if r < 0.6:
            first = rng.randrange(NUNITS)
            log.write(first, rng.randint(1, min(48, NUNITS - first)))
        elif r < 0.7:
            first = rng.randrange(NUNITS)
            log.zero(first, rng.randint(1, min(64, NUNITS - first)))
        elif r < 0.75:
            log.flush()
        elif r < 0.83:
            snaps.append(f"s{k}")
            k += 1
            log.create(snaps[-1])
        elif r < 0.89 and snaps:
            log.delete(snaps.pop(rng.randrange(len(snaps))))
        elif r < 0.95 and snaps:
            log.revert(rng.choice(snaps))
        else:
            log.prefetch()


def test_sigkill_mixed_workload(tmp_path):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for rnd in range(ROUNDS):
        path = str(tmp_path / f"k{rnd}.fvd")
        base = str(tmp_path / f"b{rnd}.raw")
        make_base(base, NUNITS)
        fvd.create(
            path,
            NUNITS * UNIT,
            chunk_size=64 * KiB,
            block_size=16 * KiB,
            base=base,
            base_format="raw",
        )
        seed = rng.randrange(1 << 30)
        lines = run_and_kill(_child, rng.uniform(0.05, 0.8), path, seed)
        before, after, inflight = replay_with_inflight(lines)
        where = f"round {rnd} seed {seed}, in flight {inflight}"
        with fvd.open(path, "r+") as img:
            assert_recovered(img, before, after, where)
