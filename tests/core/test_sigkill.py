"""SIGKILL at a random point of a mixed workload (issue 8): every acknowledged write and
snapshot is there after reopen, the operation in flight is all-or-nothing per sector,
and check() is clean.

The child (writethrough, over a raw base) reports each operation through a pipe before
("B") and after ("A") it; the parent kills it at a random moment and replays the
acknowledged operations on a model. FVD_SIGKILL_ROUNDS sets the rounds per
implementation (default 3); a soak run:

    FVD_SIGKILL_ROUNDS=200 python -m pytest -q tests/core/test_sigkill.py
"""

import json
import os
import random

import fvd
from fvd.units import KiB

from ..helpers import NUNITS, apply_op, assert_recovered, replay_log, run_and_kill
from ..stress import UNIT, make_base, unit_bytes

ROUNDS = int(os.environ.get("FVD_SIGKILL_ROUNDS", "3"))


def _child(path, seed, w):
    rng = random.Random(seed)
    img = fvd.open(path, "r+", cache="writethrough")
    snaps, k, version = [], 0, 1

    def say(*rec):
        os.write(w, (json.dumps(rec) + "\n").encode())

    while True:
        r = rng.random()
        if r < 0.6:
            first = rng.randrange(NUNITS)
            count = rng.randint(1, min(48, NUNITS - first))
            say("B", "write", first, count, version)
            img.write(
                first * UNIT, b"".join(unit_bytes(version + i, first + i) for i in range(count))
            )
            version += count
        elif r < 0.7:
            first = rng.randrange(NUNITS)
            count = rng.randint(1, min(64, NUNITS - first))
            say("B", "zero", first, count)
            img.write_zeroes(first * UNIT, count * UNIT)
        elif r < 0.75:
            say("B", "flush")
            img.flush()
        elif r < 0.83:
            name = f"s{k}"
            k += 1
            say("B", "create", name)
            img.create_snapshot(name)
            snaps.append(name)
        elif r < 0.89 and snaps:
            name = snaps.pop(rng.randrange(len(snaps)))
            say("B", "delete", name)
            img.delete_snapshot(name)
        elif r < 0.95 and snaps:
            name = rng.choice(snaps)
            say("B", "revert", name)
            img.revert_to_snapshot(name)
        else:
            say("B", "prefetch")
            img.prefetch(step=64 * KiB, min_rate=0)
        say("A")


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
        state, inflight, snaps = replay_log(lines)
        after_state, after_snaps = list(state), dict(snaps)
        if inflight is not None:
            apply_op(inflight, after_state, after_snaps)
        where = f"round {rnd} seed {seed}, in flight {inflight}"
        with fvd.open(path, "r+") as img:
            assert_recovered(img, (state, snaps), (after_state, after_snaps), where)
