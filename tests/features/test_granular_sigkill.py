"""SIGKILL rounds for granular copy-on-write: an image without a base, every chunk held
by a snapshot, a child doing unaligned and aligned writes (first writes into held chunks,
new granules, completions), write_zeroes, snapshots, deletes and reverts in writethrough
mode is killed at a random moment. After reopen every acknowledged operation is there,
the one in flight is all-or-nothing per sector, views are exact and check() is clean.

FVD_GRANULAR_SIGKILL_ROUNDS sets the rounds (default 2); a soak:

    FVD_GRANULAR_SIGKILL_ROUNDS=200 python -m pytest -q tests/features/test_granular_sigkill.py
"""

import os
import random

import fvd
from fvd.units import KiB

from ..helpers import NUNITS, ChildLog, assert_recovered, replay_with_inflight, run_and_kill
from ..stress import UNIT, unit_bytes

ROUNDS = int(os.environ.get("FVD_GRANULAR_SIGKILL_ROUNDS", "2"))


def _child(path, seed, w):
    rng = random.Random(seed)
    log = ChildLog(fvd.open(path, "r+", cache="writethrough"), w)
    snaps, k = ["s-initial"], 0
    while True:
        r = rng.random()
        if r < 0.7:
            first = rng.randrange(NUNITS)
            log.write(first, min(rng.choice([1, 1, 1, 2, 3, 16, 40]), NUNITS - first))
        elif r < 0.76:
            first = rng.randrange(NUNITS)
            log.zero(first, min(rng.randint(1, 40), NUNITS - first))
        elif r < 0.86:
            snaps.append(f"s{k}")
            k += 1
            log.create(snaps[-1])
        elif r < 0.92 and snaps:
            log.delete(snaps.pop(rng.randrange(len(snaps))))
        elif snaps:
            log.revert(rng.choice(snaps))


def test_sigkill_granular_copy_on_write(tmp_path):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for rnd in range(ROUNDS):
        path = str(tmp_path / f"g{rnd}.fvd")
        fvd.create(path, NUNITS * UNIT, chunk_size=64 * KiB)
        with fvd.open(path, "r+") as img:  # version 0 everywhere, all held
            img.write(0, b"".join(unit_bytes(0, u) for u in range(NUNITS)))
            img.create_snapshot("s-initial")
        seed = rng.randrange(1 << 30)
        lines = run_and_kill(_child, rng.uniform(0.05, 0.8), path, seed)
        # the initial snapshot, taken before the child started, as its first operation
        before, after, inflight = replay_with_inflight(
            [["B", "create", "s-initial"], ["A"]] + lines
        )
        where = f"round {rnd} seed {seed}, in flight {inflight}"
        try:
            img = fvd.open(path, "r+")
        except fvd.FvdError as e:
            raise AssertionError(f"{where}: {e}") from e
        with img:
            assert_recovered(img, before, after, where)
