"""The nightly backup loop of issue 20 (pytest-benchmark): a 64 MiB image, 48 MiB of it
written, then per night 400 random 4 KiB writes into those 48 MiB, `create_snapshot`,
`changed_extents(previous, new)`, and (delete-old) `delete_snapshot(previous)`; 30
nights (-reopen: the image closed and opened again every night). Printed and in
extra_info: per night, reported bytes / written bytes (distinct 4 KiB pages).
docs/format.md, "Changed extents between snapshots", states the guarantee.

    python -m pytest bench/test_nightly_bench.py --benchmark-enable -s

Timed: the whole 30-night loop, once (no timed asserts). The CI smoke run
(--benchmark-disable) runs 3 nights.
"""

import random

import pytest

import fvd

MiB = 1 << 20
PAGE = 4096
SIZE, REGION, PAGES, NIGHTS = 64 * MiB, 48 * MiB, 400, 30


def nightly_loop(path, cache, delete, nights=NIGHTS, reopen=False):
    """Per night: reported / written bytes. `reopen`: close and open every night."""
    fvd.create(path, SIZE, overwrite=True)
    rnd = random.Random(1)
    ratios = []
    img = fvd.open(path, "r+", cache=cache)
    try:
        img.write(0, rnd.randbytes(REGION))
        img.create_snapshot("n0")
        for n in range(1, nights + 1):
            if reopen:
                img.close()
                img = fvd.open(path, "r+", cache=cache)
            pages = {rnd.randrange(REGION // PAGE) for _ in range(PAGES)}
            for p in pages:
                img.write(p * PAGE, rnd.randbytes(PAGE))
            img.create_snapshot(f"n{n}")
            arr = img.changed_extents(f"n{n - 1}", f"n{n}").array
            ratios.append(round(int(arr["length"].sum()) / (len(pages) * PAGE), 3))
            if delete:
                img.delete_snapshot(f"n{n - 1}")
    finally:
        img.close()
    return ratios


@pytest.mark.parametrize(
    "delete,reopen",
    [(True, False), (False, False), (True, True)],
    ids=["delete-old", "keep-old", "delete-old-reopen"],
)
@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_nightly_changed_ratio(benchmark, tmp_path, smoke, cache, delete, reopen):
    path = str(tmp_path / "nightly.fvd")
    out = {}

    def run():
        out["ratios"] = nightly_loop(path, cache, delete, 3 if smoke else NIGHTS, reopen)

    benchmark.pedantic(run, rounds=1, iterations=1)
    ratios = out["ratios"]
    benchmark.extra_info["reported_per_written_by_night"] = ratios
    benchmark.extra_info["max_from_night_2"] = max(ratios[1:])
    how = ("delete" if delete else "keep") + (" reopen" if reopen else "")
    print(f"\n{fvd.IMPLEMENTATION} {cache} {how}: {ratios}")
