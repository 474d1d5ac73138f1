"""Judge a run: every target's verdict, and each row's strongest peer (the reports' data).

Both work on merged results (one `Result` per (row, contender) with per-round `samples`),
so they run the same on a fresh run and on a run loaded from JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from fvd.bench import stats
from fvd.bench import table as tb
from fvd.bench.workloads import Result

Index = dict[tuple[str, str], Result]
OWN = ("fvd", "fvd-py", "fvd-tableless")  # fvd itself, its twin and modes: never "the peer"


def index(results: list[Result]) -> Index:
    return {(r.workload, r.impl): r for r in results}


@dataclass
class Judged:
    """A target with what was measured and its verdict."""

    target: tb.Target
    row: Optional[str]
    spread: Optional[stats.Spread]
    status: str
    measured: str
    at_target: bool = False  # met at stats.TOLERANCE only: the interval holds the target

    def as_dict(self) -> dict[str, Any]:
        s, t = self.spread, self.target
        return {
            "target": t.text,
            "measured": self.measured,
            "value": s.median if s else None,
            "status": self.status,
            "low": s.low if s else None,
            "high": s.high if s else None,
            "ci_low": s.ci_low if s and s.bounded() else None,
            "ci_high": s.ci_high if s and s.bounded() else None,
            "at_target": self.at_target,
            "rounds": s.n if s else 0,
            "row": self.row,
            "impl": t.impl,
            "peer": t.peer or None,
            "kind": t.kind,
            "limit": t.limit,
        }


def _counts_judged(t: tb.Target, r: Optional[Result]) -> tuple[Optional[stats.Spread], str, str]:
    if r is None or not r.counts:
        return None, stats.NA, "n/a"
    worst = max(r.counts.get(k, 0.0) for k in t.counts)
    shown = ", ".join(f"{r.counts.get(k, 0.0):.3g} {k.replace('_', ' ')}" for k in t.counts)
    s = stats.Spread(worst, worst, worst, 1, worst, worst)  # exact counts: no spread
    return s, stats.MET if worst <= t.limit else stats.MISSED, shown


def _figure(value: float, unit: str) -> str:
    if unit == "/s":
        return f"{value / 1e6:.0f}M/s"
    if unit == " ms":
        return f"{value:.3g} ms"
    return f"{value:.2f}{unit}"


def _measured(s: stats.Spread, unit: str) -> str:
    """`0.17 ms [0.116 ms-0.2 ms]`: a figure's median and interval, as Spread.text."""
    text = s.text("{}", "")
    if text.endswith(" rounds)"):
        return f"{_figure(s.median, unit)} ({s.n} rounds)"
    if "[" not in text:
        return _figure(s.median, unit)
    return f"{_figure(s.median, unit)} [{_figure(s.ci_low, unit)}-{_figure(s.ci_high, unit)}]"


def _values(t: tb.Target, idx: Index, row: Optional[str]) -> list[float]:
    """The per-round figures a (non-counts) target is judged on: paired ratios, or
    fvd's own figures against a limit."""
    mine = idx.get((row, t.impl)) if row else None
    if t.kind == tb.RATIO:
        return stats.paired_ratios(mine, idx.get((row, t.peer)) if row else None)
    return [v for v in stats.samples(mine) if v is not None]


def judge(t: tb.Target, idx: Index, keys: list[str]) -> Judged:
    row = tb.resolve_row(t, keys)
    if t.kind == tb.COUNTS:
        s, status, shown = _counts_judged(t, idx.get((row, t.impl)) if row else None)
        return Judged(t, row, s, status, shown)
    at_least = t.kind != tb.BELOW
    s = stats.spread(_values(t, idx, row))
    if s is None:
        return Judged(t, row, None, stats.NA, "n/a")
    status = stats.verdict(s, t.limit, at_least)
    measured = s.text() if t.unit == "x" else _measured(s, t.unit)
    return Judged(t, row, s, status, measured, stats.at_target(s, t.limit, at_least))


def open_targets(results: list[Result]) -> list[tuple[str, tb.Target]]:
    """(row, target) of the targets more rounds could still settle (stats.is_open)."""
    keys = list(dict.fromkeys(r.workload for r in results))
    idx = index(results)
    out = []
    for t in tb.all_targets():
        row = tb.resolve_row(t, keys)
        if row is None or t.kind == tb.COUNTS:
            continue
        if stats.is_open(_values(t, idx, row), t.limit, t.kind != tb.BELOW):
            out.append((row, t))
    return out


def judge_all(results: list[Result]) -> list[Judged]:
    """The targets whose row was measured (a --workload subset judges only its own)."""
    keys = list(dict.fromkeys(r.workload for r in results))
    idx = index(results)
    return [judge(t, idx, keys) for t in tb.all_targets() if tb.resolve_row(t, keys)]


def strongest_peer(row: str, idx: Index, impls: list[str]) -> Optional[Result]:
    """The best like-for-like figure among the row's peers (not fvd, not its twin), among
    the peers measured in the most rounds (those the ratio can be paired with)."""
    peers = [idx.get((row, n)) for n in impls if n not in OWN]
    ok = [r for r in peers if r is not None and r.value is not None and r.like_for_like]
    if not ok:
        return None
    most = max(_rounds(r) for r in ok)
    ok = [r for r in ok if _rounds(r) == most]
    return max(ok, key=lambda r: (r.value or 0.0) * (1 if r.higher_is_better else -1))


def _rounds(r: Result) -> int:
    return sum(v is not None for v in stats.samples(r))


@dataclass
class RowSummary:
    """One line of the default view."""

    key: str
    title: str
    fvd: Optional[Result]
    peer: Optional[Result]
    ratio: Optional[stats.Spread]
    judged: list[Judged]

    def tally(self) -> str:
        """`3/4 met` over the row's targets ('' when it has none)."""
        if not self.judged:
            return ""
        met = sum(j.status == stats.MET for j in self.judged)
        return f"{met}/{len(self.judged)} met"


def summarise(
    results: list[Result], titles: list[tuple[str, str]], impls: list[str]
) -> list[RowSummary]:
    idx = index(results)
    judged = judge_all(results)
    rows = []
    for key, title in titles:
        if not any((key, n) in idx for n in impls):
            continue
        f = idx.get((key, "fvd"))
        peer = strongest_peer(key, idx, impls)
        mine = [j for j in judged if j.row == key]
        rows.append(RowSummary(key, title, f, peer, stats.ratio_spread(f, peer), mine))
    return rows


def needed_peers(
    results: list[Result], impls: list[str], targets: Optional[list[tuple[str, tb.Target]]] = None
) -> dict[str, set[str]]:
    """Per row: the contenders later rounds must run (fvd, the sides of the row's
    targets, or of `targets` when given, and the strongest peer)."""
    idx = index(results)
    keys = list(dict.fromkeys(r.workload for r in results))
    need: dict[str, set[str]] = {k: {"fvd"} for k in keys}
    if targets is None:
        targets = [(row, t) for t in tb.all_targets() if (row := tb.resolve_row(t, keys))]
    for row, t in targets:
        need[row].update(t.contenders())
    for k in keys:
        peer = strongest_peer(k, idx, impls)
        if peer is not None:
            need[k].add(peer.impl)
    return need
