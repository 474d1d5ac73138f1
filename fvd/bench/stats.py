"""Paired ratios, a confidence interval of their median, and the verdict it allows.

Every cell of a row is measured once per round, fvd and its peers back to back (the order
alternates between rounds), so a slow spell of the shared disk hits both sides of a
ratio. A ratio is computed per round, then summarised by its median, its inter-quartile
range (IQR: how much the rounds vary) and a distribution-free confidence interval of the
median (`median_interval`: order statistics, the sign test; how sure the median is).

The verdict reads the interval, not the IQR, at the bench's resolution of `TOLERANCE`
(5%: consecutive runs on one machine differ by more than that, so a figure within 5% of
its target is judged as at it). A target is `met` when the whole 90% interval clears the
target less 5% (a one-sided 95% statement), `missed` when the whole interval falls
short of that, and `unclear` when the interval holds it. A met target whose interval
still holds the exact target is *at target*: met at the bench's resolution, and labelled
so. Fewer rounds than a 90% interval needs (5) give no interval: unclear (unless every
round gave one exact figure, such as a size). The runner (fvd.bench.rounds) spends
extra rounds only on targets that are still `open`: their 98% interval holds the target
less 5%.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

from fvd.bench.workloads import Result

MET, MISSED, UNCLEAR, NA = "met", "missed", "unclear", "n/a"
VERDICTS = (MET, MISSED, UNCLEAR, NA)
# the interval a verdict reads: 90% two-sided, so "met" (its lower end clears the target)
# and "missed" (its upper end falls short) are each one-sided 95% statements
CONFIDENCE = 0.90
SETTLE_CONFIDENCE = 0.98  # the interval that ends a target's extra rounds (fewer false stops)
TOLERANCE = 0.05  # the resolution: a figure within 5% of its target is judged at it


@dataclass(frozen=True)
class Spread:
    """Median, inter-quartile range and confidence interval of per-round figures."""

    median: float
    low: float  # first quartile
    high: float  # third quartile
    n: int  # rounds
    ci_low: float  # the median's confidence interval (CONFIDENCE)
    ci_high: float

    def bounded(self) -> bool:
        """The rounds give a confidence interval (enough of them, or an exact figure)."""
        return math.isfinite(self.ci_low) and math.isfinite(self.ci_high)

    def text(self, fmt: str = "{:.2f}", unit: str = "x") -> str:
        """`1.84x [1.70-1.95]` (median [confidence interval]); `1.84x (3 rounds)` when
        too few rounds give no interval; one round or an exact figure shows no range."""
        mid = fmt.format(self.median) + unit
        if self.n < 2 or self.ci_low == self.ci_high == self.median:
            return mid
        if not self.bounded():
            return f"{mid} ({self.n} rounds)"
        return f"{mid} [{fmt.format(self.ci_low)}-{fmt.format(self.ci_high)}]"


def interval_ranks(n: int, confidence: float = CONFIDENCE) -> Optional[int]:
    """k such that the k-th lowest and k-th highest of n figures bound their median with
    at least `confidence` (the sign test: the median lies below the k-th lowest with
    probability P(Binomial(n, 1/2) < k)); None when n figures are too few."""
    tail, k = 0.0, 0
    for j in range(n):
        tail += math.comb(n, j) / 2.0**n
        if tail > (1.0 - confidence) / 2.0:
            break
        k = j + 1
    return k or None


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of `values` (not empty).
    Too few values for `confidence` give no interval (-inf, inf), unless they are two or
    more of one exact figure (a size, a count)."""
    vs = sorted(values)
    k = interval_ranks(len(vs), confidence)
    if k is None:
        exact = len(vs) > 1 and vs[0] == vs[-1]
        return (vs[0], vs[0]) if exact else (-math.inf, math.inf)
    return vs[k - 1], vs[-k]


def spread(values: Sequence[Optional[float]], confidence: float = CONFIDENCE) -> Optional[Spread]:
    """Spread of the figures that are not None (None when there are none)."""
    vs = sorted(v for v in values if v is not None)
    if not vs:
        return None
    if len(vs) == 1:  # one figure: no interval (two or more equal ones: exact)
        return Spread(vs[0], vs[0], vs[0], 1, -math.inf, math.inf)
    q1, _, q3 = statistics.quantiles(vs, n=4, method="inclusive")
    lo, hi = median_interval(vs, confidence)
    return Spread(statistics.median(vs), q1, q3, len(vs), lo, hi)


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
    """`met` / `missed` / `unclear` (the interval holds `limit`) / `n/a` (nothing measured).

    at_least: the figure must be >= limit (ratios, rates); otherwise it must be < limit
    (times)."""
    if s is None:
        return NA
    lo, hi = s.ci_low, s.ci_high
    if at_least:
        bar = limit * (1 - TOLERANCE)
        return MET if lo >= bar else MISSED if hi < bar else UNCLEAR
    bar = limit / (1 - TOLERANCE)  # the mirror of a ratio's: limit / figure >= 0.95
    return MET if hi < bar else MISSED if lo >= bar else UNCLEAR


def at_target(s: Optional[Spread], limit: float, at_least: bool = True) -> bool:
    """Met at the bench's resolution only: the interval still holds the exact `limit`."""
    if s is None or verdict(s, limit, at_least) != MET:
        return False
    return s.ci_low < limit if at_least else s.ci_high >= limit


def is_open(values: Sequence[float], limit: float, at_least: bool = True) -> bool:
    """More rounds could settle this target: its SETTLE_CONFIDENCE interval (none with
    fewer than 7 rounds) still holds the target less TOLERANCE."""
    strict = spread(values, SETTLE_CONFIDENCE)
    return strict is not None and verdict(strict, limit, at_least) == UNCLEAR
