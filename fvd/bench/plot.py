"""`fvd bench --plot FILE.png|svg`: every target's measured figure, its spread, its line.

One horizontal lane per target. The x axis is the margin over the target (measured ÷
target, log scale; for time limits, limit ÷ measured), so every target line is the same
vertical line at 1 and "right of the line" means met: a dot for the median, a bar for
its 90% confidence interval (the interval the verdict reads), coloured by verdict.
"""

from __future__ import annotations

from typing import Any, Optional

from fvd.bench import stats
from fvd.bench import table as tb
from fvd.bench.verdicts import Judged

COLOURS = {stats.MET: "#2a9d3f", stats.MISSED: "#d1342f", stats.UNCLEAR: "#e69a17"}
LOW, HIGH = 0.2, 20.0  # x range shown; margins beyond it sit at the edge (label says)


MISSING = "fvd bench: --plot needs matplotlib (pip install 'fvd[plot]')"


def _margin(j: Judged, value: float) -> float:
    if j.target.kind == tb.BELOW:
        return j.target.limit / value if value else float("inf")
    return value / j.target.limit


def _lanes(judged: list[Judged]) -> list[tuple[Judged, float, float, float]]:
    """(judged, median, low, high) margins of the targets that were measured."""
    out = []
    for j in judged:
        s = j.spread
        if s is None or j.target.kind == tb.COUNTS:
            continue
        lo, mid, hi = sorted(_margin(j, v) for v in (s.ci_low, s.median, s.ci_high))
        out.append((j, _clip(mid), _clip(lo), _clip(hi)))
    return out


def missing() -> Optional[str]:
    """The one-line error to print when matplotlib is not installed, else None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return MISSING
    return None


def _clip(x: float) -> float:
    return min(max(x, LOW), HIGH)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(judged: list[Judged], path: str, title: str) -> None:
    """Draw the targets' margins into `path` (.png or .svg)."""
    plt = _pyplot()
    lanes = _lanes(judged)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(lanes) + 1.3))
    for y, (j, mid, lo, hi) in enumerate(reversed(lanes)):
        colour = COLOURS.get(j.status, "grey")
        ax.plot([lo, hi], [y, y], color=colour, linewidth=5, alpha=0.45, solid_capstyle="butt")
        ax.plot([mid], [y], "o", color=colour, markersize=6)
        ax.annotate(
            f"{j.measured.split(' [')[0]}  {'at target' if j.at_target else j.status}",
            (max(hi, mid), y),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
            color=colour,
        )
    ax.axvline(1.0, color="black", linewidth=1)
    ax.axvline(1 - stats.TOLERANCE, color="black", linewidth=0.6, linestyle="--")
    ax.set_xscale("log")
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([j.target.text for j, *_ in reversed(lanes)], fontsize=7)
    ax.set_ylim(-0.7, len(lanes) - 0.3)
    ax.set_xlim(LOW / 1.1, HIGH * 4)
    ax.set_xlabel(
        "measured ÷ target (log scale)\n"
        "met: the bar clears the dashed line (the target less 5%)\n"
        "dot: median of the rounds; bar: its 90% confidence interval"
    )
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
