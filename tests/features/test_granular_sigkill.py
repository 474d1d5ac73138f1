"""SIGKILL rounds for granular copy-on-write: an image without a base, every chunk held
by a snapshot, a child doing unaligned and aligned writes (first writes into held chunks,
new granules, completions), write_zeroes, snapshots, deletes and reverts in writethrough
mode is killed at a random moment. After reopen every acknowledged operation is there,
the one in flight is all-or-nothing per sector, views are exact and check() is clean.

FVD_GRANULAR_SIGKILL_ROUNDS sets the rounds (default 2); a soak:

    FVD_GRANULAR_SIGKILL_ROUNDS=200 python -m pytest -q tests/features/test_granular_sigkill.py
"""

import json
import os
import random

import fvd
from fvd.units import KiB

from ..helpers import apply_op as _apply
from ..helpers import assert_recovered, run_and_kill
from ..helpers import replay_log as _replay
from ..stress import UNIT, unit_bytes

ROUNDS = int(os.environ.get("FVD_GRANULAR_SIGKILL_ROUNDS", "2"))
NUNITS = 1024  # 4 MiB image, 64 KiB chunks, 4 KiB granules


def _child(path, seed, w):
    rng = random.Random(seed)
    img = fvd.open(path, "r+", cache="writethrough")
    snaps, k, version = ["s-initial"], 0, 1

    def say(*rec):
        os.write(w, (json.dumps(rec) + "\n").encode())

    while True:
        r = rng.random()
        if r < 0.7:
            first = rng.randrange(NUNITS)
            count = rng.choice([1, 1, 1, 2, 3, 16, 40])
            count = min(count, NUNITS - first)
            say("B", "write", first, count, version)
            img.write(
                first * UNIT, b"".join(unit_bytes(version + i, first + i) for i in range(count))
            )
            version += count
        elif r < 0.76:
            first = rng.randrange(NUNITS)
            count = min(rng.randint(1, 40), NUNITS - first)
            say("B", "zero", first, count)
            img.write_zeroes(first * UNIT, count * UNIT)
        elif r < 0.86:
            name = f"s{k}"
            k += 1
            say("B", "create", name)
            img.create_snapshot(name)
            snaps.append(name)
        elif r < 0.92 and snaps:
            name = snaps.pop(rng.randrange(len(snaps)))
            say("B", "delete", name)
            img.delete_snapshot(name)
        elif snaps:
            name = rng.choice(snaps)
            say("B", "revert", name)
            img.revert_to_snapshot(name)
        say("A")


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
        state, inflight, snaps = _replay([["B", "create", "s-initial"], ["A"]] + lines)
        after_state, after_snaps = list(state), dict(snaps)
        if inflight is not None:
            _apply(inflight, after_state, after_snaps)
        where = f"round {rnd} seed {seed}, in flight {inflight}"
        try:
            img = fvd.open(path, "r+")
        except fvd.FvdError as e:
            raise AssertionError(f"{where}: {e}") from e
        with img:
            assert_recovered(img, (state, snaps), (after_state, after_snaps), where)
