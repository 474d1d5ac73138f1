"""Size units, size parsing and run helpers shared by every layer (layer 1)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

_SUFFIXES = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": 1 << 50, "E": 1 << 60}


def parse_size(text: str | int) -> int:
    """qemu-img style sizes: 512, 64K, 1.5G, 2T, 4MiB (powers of 1024). ValueError if bad."""
    t = str(text).strip().upper()
    if t.endswith("IB"):
        t = t[:-2]
    elif len(t) > 1 and t.endswith("B") and t[-2] in "KMGTPE":
        t = t[:-1]  # 4MB, as qemu-img takes it
    unit = t[-1:] if t[-1:] in _SUFFIXES and not t[-1:].isdigit() else ""
    number = t[:-1] if unit else t
    try:
        value = float(number) if "." in number else int(number)
    except ValueError:
        raise ValueError(
            f"invalid size {text!r} (use a number with an optional K, M, G or T)"
        ) from None
    size = int(value * _SUFFIXES[unit])
    if size < 0:
        raise ValueError(f"invalid size {text!r}: negative")
    return size


def index_runs(sorted_indexes: Iterable[int]) -> list[tuple[int, int]]:
    """(first, count) runs of consecutive integers."""
    out: list[list[int]] = []
    for i in sorted_indexes:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return [(a, b) for a, b in out]


def flag_runs(flags: np.ndarray) -> list[tuple[int, int, bool]]:
    """[(start, stop, value)] runs of equal values in a bool array."""
    n = len(flags)
    if n == 0:
        return []
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    starts = [0] + edges.tolist()
    stops = edges.tolist() + [n]
    return [(a, b, bool(flags[a])) for a, b in zip(starts, stops)]
