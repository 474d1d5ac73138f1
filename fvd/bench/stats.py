"""Paired ratios, their spread, and the verdict a spread allows (met / missed / unclear).

Every cell of a row is measured once per round, fvd and its peers back to back (the order
alternates between rounds), so a slow spell of the shared disk hits both sides of a
ratio. A ratio is computed per round, then summarised by its median and inter-quartile
range (IQR: the middle half of the rounds). A target is `met` when the whole IQR clears
it, `missed` when the whole IQR falls short, and `unclear` when the IQR straddles it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

from fvd.bench.workloads import Result

MET, MISSED, UNCLEAR, NA = "met", "missed", "unclear", "n/a"
VERDICTS = (MET, MISSED, UNCLEAR, NA)


@dataclass(frozen=True)
class Spread:
    """Median and inter-quartile range of per-round figures."""

    median: float
    low: float  # first quartile
    high: float  # third quartile
    n: int  # rounds

    def text(self, fmt: str = "{:.2f}", unit: str = "x") -> str:
        """`1.84x [1.70-1.95]`; a single round shows no range."""
        mid = fmt.format(self.median) + unit
        if self.n < 2:
            return mid
        return f"{mid} [{fmt.format(self.low)}-{fmt.format(self.high)}]"


def spread(values: Sequence[Optional[float]]) -> Optional[Spread]:
    """Spread of the figures that are not None (None when there are none)."""
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return None
    if len(vs) == 1:
        return Spread(vs[0], vs[0], vs[0], 1)
    q1, _, q3 = statistics.quantiles(vs, n=4, method="inclusive")
    return Spread(statistics.median(vs), q1, q3, len(vs))


def samples(r: Optional[Result]) -> list[Optional[float]]:
    """Per-round values of a result (its single value when it has no rounds)."""
    if r is None or r.value is None:
        return []
    return list(r.samples) if r.samples else [r.value]


def paired_ratios(a: Optional[Result], b: Optional[Result]) -> list[float]:
    """How many times better `a` is than `b`, round by round (rounds both ran). Two
    in-process contenders measured together compare their typical (median slice)
    figures; anything else compares whole-run figures."""
    if a is None or b is None:
        return []
    sa, sb = samples(a), samples(b)
    if a.typical_samples and b.typical_samples:
        sa, sb = list(a.typical_samples), list(b.typical_samples)
    # a side measured once (metadata size, a round-0-only cell) pairs with every round
    if len(sa) == 1:
        sa = sa * len(sb)
    elif len(sb) == 1:
        sb = sb * len(sa)
    out = []
    for x, y in zip(sa, sb):
        if x and y:
            out.append(x / y if a.higher_is_better else y / x)
    return out


def ratio_spread(a: Optional[Result], b: Optional[Result]) -> Optional[Spread]:
    return spread(paired_ratios(a, b))


def verdict(s: Optional[Spread], limit: float, at_least: bool = True) -> str:
    """`met` / `missed` / `unclear` (IQR straddles `limit`) / `n/a` (nothing measured).

    at_least: the figure must be >= limit (ratios, rates); otherwise it must be < limit
    (times)."""
    if s is None:
        return NA
    if at_least:
        return MET if s.low >= limit else MISSED if s.high < limit else UNCLEAR
    return MET if s.high < limit else MISSED if s.low >= limit else UNCLEAR
