"""Run the cells of `fvd bench` in paired, interleaved rounds within a time budget.

Round 0 runs every cell (the full matrix, with exact I/O counts). Later rounds run, per
row, only the cells the verdicts and the default view need: fvd, both sides of the row's
targets, and its strongest peer. In every round the cells of one row run back to back,
in reverse order on odd rounds, so a slow minute of the shared disk (or whatever runs
first) hits fvd and its peers alike; ratios are then taken round by round. Rounds are
added until at least `scale.repeat` have run and the budget (`scale.budget` seconds) is
used or `scale.max_rounds` is reached; past `scale.sure_rounds`, a row's cells are not
started when its last round says they would overrun the budget (a cheaper row still
runs). After `scale.repeat` rounds,
a row with targets runs only while one of its targets is still open (fvd.bench.stats:
its interval holds the target), with only the contenders those targets and its
strongest peer need: the time goes to the verdicts the evidence has not settled.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Optional, Sequence

from fvd import _impl
from fvd.bench import impls, verdicts
from fvd.bench import table as tb
from fvd.bench import workloads as wl
from fvd.bench.cells import CELL_FACTORIES, Cell, Context
from fvd.bench.progress import Progress

Groups = dict[str, list[Cell]]  # row key -> its cells, in table order


def fmt_value(r: Optional[wl.Result]) -> str:
    """A figure in a few characters: 2.03K, 887M/s, 1.31ms."""
    if r is None or r.value is None:
        return "-"
    v = r.value
    if r.unit in ("ops/s", "lookups/s"):
        for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
            if v >= div:
                return f"{v / div:.3g}{suf}"
        return f"{v:.3g}"
    if r.unit == "MiB/s":
        return f"{v:.0f}M/s" if v >= 100 else f"{v:.3g}M/s"
    if r.unit == "ms":
        return f"{v:.3g}ms"
    if r.unit == "MiB":
        return f"{v:.4g}M"
    return f"{v:.3g}"


class Recorder:
    """Per-round results, merged into one Result per (row, contender)."""

    def __init__(self) -> None:
        self.rounds: dict[tuple[str, str], dict[int, wl.Result]] = {}
        self.errors: list[wl.Result] = []
        self.last_round = 0
        self.seconds: dict[str, float] = {}  # row group -> its cells' time in its last round

    def add(self, rnd: int, results: list[wl.Result]) -> None:
        self.last_round = max(self.last_round, rnd)
        for r in results:
            self.rounds.setdefault((r.workload, r.impl), {})[rnd] = r

    def merged(self) -> list[wl.Result]:
        return [self._merge(by_round) for by_round in self.rounds.values()]

    def _merge(self, by_round: dict[int, wl.Result]) -> wl.Result:
        first = by_round[min(by_round)]
        ok = {i: r for i, r in by_round.items() if r.value is not None}
        if not ok:
            return first
        rounds = range(self.last_round + 1)
        samples = [ok[i].value if i in ok else None for i in rounds]
        typical = [ok[i].typical if i in ok else None for i in rounds]
        merged = wl.Result(
            first.workload,
            first.impl,
            statistics.median(v for v in samples if v is not None),
            first.unit,
            first.higher_is_better,
            first.ops,
            statistics.median(r.seconds for r in ok.values()),
            next((r.counts for r in ok.values() if r.counts), {}),
            first.note,
            samples,
            first.like_for_like,
        )
        if any(v is not None for v in typical):
            merged.typical_samples = typical
        return merged


def _run_cell(cell: Cell, rnd: int, progress: Progress) -> list[wl.Result]:
    progress.update(f"round {rnd + 1}: {cell.title}: {cell.impl} ...")
    t0 = time.perf_counter()
    try:
        out = cell.measure(rnd, cell.members)
    except Exception as e:
        # one broken cell must not lose the whole table; the note says why
        why = f"{type(e).__name__}: {e}"
        progress.message(f"fvd bench: {cell.impl} failed on {cell.title}: {why}")
        return [wl.Result(cell.key, n, None, "", note=f"error: {why}") for n in cell.members]
    shown = ", ".join(f"{r.impl} {fmt_value(r) if r.value is not None else 'n/a'}" for r in out)
    took = time.perf_counter() - t0
    progress.update(f"round {rnd + 1}: {cell.title}: {shown} ({took:.1f}s)")
    return out


def run_round(
    groups: Groups, rnd: int, rec: Recorder, progress: Progress, deadline: Optional[float] = None
) -> int:
    """Each group's cells once -> how many groups ran. With a `deadline` (a
    time.perf_counter() value), the cheapest groups go first and a group whose last round
    says it would end past the deadline is skipped: the rows that still fit get their
    rounds when a slow one no longer does (pairs are within a group: the order between
    groups does not matter to them)."""
    ran, keys = 0, list(groups)
    if deadline is not None:
        keys.sort(key=lambda k: rec.seconds.get(k, 0.0))
    for key in keys:
        cells, start = groups[key], time.perf_counter()
        if deadline is not None and start + rec.seconds.get(key, 0.0) > deadline:
            continue
        for cell in cells[::-1] if rnd % 2 else cells:
            out = _run_cell(cell, rnd, progress)
            rec.errors += [r for r in out if r.note.startswith("error:")]
            cell.rows.update(r.workload for r in out)
            rec.add(rnd, out)
        rec.seconds[key], ran = time.perf_counter() - start, ran + 1
    return ran


def later_groups(
    groups: Groups,
    rec: Recorder,
    names: Sequence[str],
    targets: Optional[list[tuple[str, tb.Target]]] = None,
) -> Groups:
    """The cells that later rounds repeat, with only the members the row's targets (or
    `targets`) and its strongest peer need (fvd always)."""
    need = verdicts.needed_peers(rec.merged(), list(names), targets)
    out: Groups = {}
    for key, cells in groups.items():
        keep = []
        for c in cells:
            wanted = set().union(*(need.get(r, set()) for r in c.rows))
            members = c.members if c.fixed else tuple(m for m in c.members if m in wanted)
            if c.repeat and members:
                keep.append(dataclasses.replace(c, members=members))
        if keep:
            out[key] = keep
    return out


def group(cells: list[Cell]) -> Groups:
    groups: Groups = {}
    for c in cells:
        groups.setdefault(c.key, []).append(c)
    return groups


def _targeted(groups: Groups, rec: Recorder) -> Groups:
    """The groups with a row some target judges (they get the first rounds)."""
    keys = list(dict.fromkeys(row for row, _ in rec.rounds))
    judged = {tb.resolve_row(t, keys) for t in tb.all_targets()}
    return {k: cs for k, cs in groups.items() if any(c.rows & judged for c in cs)}


def _this_round(rnd: int, scale: wl.Scale, first: Groups, later: Groups) -> Groups:
    """Which rows round `rnd` runs: every row until its minimum is reached (rows with
    targets: `repeat`; the others: `other_rounds`), then, while time is left, the rows
    with targets when the others have a minimum of their own (--quick: the verdicts get
    the time), else every row."""
    others = scale.other_rounds or scale.repeat
    if rnd < scale.repeat and rnd >= others:
        return first
    if rnd >= scale.repeat and rnd < others:
        return {k: cs for k, cs in later.items() if k not in first}
    if rnd >= scale.repeat and rnd >= others and scale.other_rounds:
        return first
    return later


def open_only(groups: Groups, targeted: Groups, rec: Recorder, names: Sequence[str]) -> Groups:
    """`groups` with the targeted rows cut down to the targets still open: rows with none
    left drop out, the others keep the contenders the open targets and the strongest peer
    need, and a cell that measures several rows (convert) measures only the open ones."""
    targets = verdicts.open_targets(rec.merged())
    rows = {row for row, _ in targets}
    mine = {k: [c for c in cs if c.rows & rows] for k, cs in groups.items() if k in targeted}
    out = later_groups(mine, rec, names, targets)
    for cells in out.values():
        for i, c in enumerate(cells):
            if c.narrow is not None and not c.rows <= rows:
                cells[i] = dataclasses.replace(c, measure=c.narrow(frozenset(c.rows & rows)))
    out.update({k: cs for k, cs in groups.items() if k not in targeted})
    return out


def _fitting(groups: Groups, rec: Recorder, rounds_left: int, seconds: float) -> Groups:
    """The cheapest groups whose `rounds_left` more rounds fit in `seconds` (by their last
    round): on a loaded machine, as many rows as can reach the minimum rounds get them,
    rather than every row falling short of it (too few rounds: no verdict)."""
    keep: Groups = {}
    for key in sorted(groups, key=lambda k: rec.seconds.get(k, 0.0)):
        seconds -= rec.seconds.get(key, 0.0) * rounds_left
        if seconds < 0:
            break
        keep[key] = groups[key]
    return keep


def more_rounds(
    later: Groups,
    scale: wl.Scale,
    rec: Recorder,
    progress: Progress,
    t0: float,
    names: Sequence[str] = impls.NAMES,
) -> None:
    """Rounds 2, 3...: each row's minimum first (`_this_round`), then more while the
    budget lasts and a target is open (`open_only`). Past `sure_rounds`, a row's round is
    not started when its last one says it would overrun the budget (`run_round`)."""
    first = _targeted(later, rec)
    least = max(scale.repeat, scale.other_rounds)
    sure = min(scale.sure_rounds or least, least)
    rnd = 1
    while rnd < max(scale.max_rounds, least):
        groups = _this_round(rnd, scale, first, later)
        if rnd >= scale.repeat:
            groups = open_only(groups, first, rec, names)
            if not groups:
                break  # every verdict settled: the rest of the budget is not needed
        deadline = None if rnd < sure else t0 + scale.budget
        if deadline is not None and rnd < scale.repeat:  # the minimum may use the grace
            deadline += scale.grace
            groups = _fitting(groups, rec, scale.repeat - rnd, deadline - time.perf_counter())
        if not run_round(groups, rnd, rec, progress, deadline):
            break
        rnd += 1


def run_all(
    scale: wl.Scale,
    names: Sequence[str],
    workdir: str,
    keys: Optional[Sequence[str]] = None,
    progress: Optional[Progress] = None,
) -> list[wl.Result]:
    """Every cell in paired rounds -> one merged Result per (row, contender)."""
    progress = progress or Progress(enabled=False)
    ctx = Context(scale, names, workdir, keys, show=progress.message)
    groups = group([c for factory in CELL_FACTORIES for c in factory(ctx)])
    rec = Recorder()
    t0 = time.perf_counter()
    previous = _impl.IMPLEMENTATION
    try:
        run_round(groups, 0, rec, progress)
        more_rounds(later_groups(groups, rec, names), scale, rec, progress, t0, names)
    finally:
        _impl.select(previous)
        for close in ctx.closers:
            close()
        progress.clear()
    return rec.merged()
