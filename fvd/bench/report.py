"""Reports of a `fvd bench` run: the default view (fits the terminal), the full matrix
(`--wide`), markdown (the tables of docs/benchmarks.md) and the JSON document.

Every renderer takes a `Run` (merged results plus what describes them), so a run loaded
from JSON renders exactly as a fresh one.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional

from fvd.bench import stats
from fvd.bench import table as tb
from fvd.bench import verdicts as vd
from fvd.bench import workloads as wl
from fvd.bench.rounds import fmt_value

MAX_LINES = 40  # the default view's budget
STAR = "*"
STAR_NOTE = (
    "* QEMU one command per process (qemu-io per random read, qemu-img per snapshot): "
    "not like-for-like, in no verdict"
)


@dataclass
class Run:
    results: list[wl.Result]
    scale: wl.Scale
    names: list[str]
    info: dict[str, Any]
    seconds: float
    command: str = "fvd bench"
    judged: list[vd.Judged] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.judged:
            self.judged = vd.judge_all(self.results)

    def rows(self) -> list[vd.RowSummary]:
        return vd.summarise(self.results, tb.row_titles(self.scale), self.names)

    def rounds(self) -> str:
        """`3-9` paired rounds over the rows (or one number): the targets' rounds."""
        ns = [j.spread.n for j in self.judged if j.spread and j.target.kind != tb.COUNTS]
        lo, hi = (min(ns), max(ns)) if ns else (0, 0)
        return str(hi) if lo == hi else f"{lo}-{hi}"


def counts_cell(r: Optional[wl.Result]) -> str:
    """I/O per op: w writes/bytes, f flushes, m metadata, rc refcounts, fa fallocate, r reads."""
    c = r.counts if r else None
    if not c:
        return ""

    def b(x: float) -> str:
        for div, suf in ((1 << 20, "M"), (1 << 10, "K")):
            if x >= div * 0.995:
                return f"{x / div:.3g}{suf}"
        return f"{x:.0f}"

    parts = []
    for key, tag, size in (
        ("writes", "w", "bytes_written"),
        ("flushes", "f", ""),
        ("metadata_writes", "m", ""),
        ("refcount_updates", "rc", ""),
        ("fallocates", "fa", ""),
        ("reads", "r", "bytes_read"),
    ):
        if c.get(key):
            parts.append(f"{tag}{c[key]:.3g}" + (f"/{b(c[size])}" if size else ""))
    return " ".join(parts)


def _ratio_text(s: Optional[stats.Spread]) -> str:
    if s is None:
        return "-"
    return s.text() if s.n > 1 else f"{s.median:.2f}x (1 round)"


def _tally(judged: list[vd.Judged], prefix: str = "targets: ") -> str:
    n = {v: sum(j.status == v for j in judged) for v in stats.VERDICTS}
    parts = [f"{n[v]} {v}" for v in stats.VERDICTS if n[v]]
    return f"{prefix}{', '.join(parts)} (of {len(judged)})"


def headline(run: Run) -> str:
    """One line for a plot's title: the command, the verdicts, the machine."""
    i = run.info
    return (
        f"{run.command}: {_tally(run.judged, '')}; {i.get('nproc', '?')} CPUs, {run.seconds:.0f} s"
    )


def _header(run: Run, width: int) -> list[str]:
    i = run.info
    head = (
        f"{run.command}: fvd {i.get('fvd', '?')} ({i.get('fvd_implementation', '?')}), "
        f"{i.get('nproc', '?')} CPUs, {i.get('filesystem', '')}; {run.seconds:.0f} s, "
        f"{_rounds_text(run)}"
    )
    legend = (
        "fvd: compiled fast path. x: fvd / strongest peer per round (>1: fvd better), "
        "median [90% CI]"
    )
    return textwrap.wrap(head, width) + textwrap.wrap(legend, width) + _busy(run, width)


def _rounds_text(run: Run) -> str:
    n = run.rounds()
    return f"{n} paired round" + ("" if n == "1" else "s")


def _busy(run: Run, width: int) -> list[str]:
    """A warning when other work shared the CPUs (load average above their count)."""
    loads = [x for x in (run.info.get("load"), run.info.get("load_end")) if x is not None]
    cpus = run.info.get("nproc") or 1
    if not loads or max(loads) <= cpus:
        return []
    text = (
        f"busy machine (load {max(loads):.1f} on {cpus} CPUs): verdicts near a target, "
        "above all vs QEMU, may not repeat"
    )
    return textwrap.wrap(text, width)


def _fit(cols: list[list[str]], width: int) -> list[str]:
    """Columns -> lines no wider than `width` (the first column gives way first)."""
    widths = [max(len(c) for c in col) for col in cols]
    rest = sum(widths[1:]) + 2 * (len(cols) - 1)
    widths[0] = max(min(widths[0], width - rest), 12)
    lines = []
    for cells in zip(*cols):
        parts = [c[: widths[k]].ljust(widths[k]) for k, c in enumerate(cells)]
        lines.append("  ".join(parts).rstrip()[:width])
    return lines


def _peer_text(s: vd.RowSummary) -> str:
    if s.peer is None:
        return "-"
    mark = "" if s.peer.like_for_like else STAR
    return f"{tb.peer_label(s.key, s.peer.impl)} {fmt_value(s.peer)}{mark}"


def summary_text(run: Run, width: int = 100, io: bool = False) -> str:
    """The default view: one line per row, then the targets not met."""
    rows = run.rows()
    cols: list[list[str]] = [
        ["workload"] + [s.title for s in rows],
        ["fvd"] + [fmt_value(s.fvd) for s in rows],
        ["strongest peer"] + [_peer_text(s) for s in rows],
        ["x [90% CI]"] + [_ratio_text(s.ratio) for s in rows],
        ["targets"] + [s.tally() for s in rows],
    ]
    lines = _header(run, width) + [""]
    table = _fit(cols, width)
    lines.append(table[0])
    for s, line in zip(rows, table[1:]):
        lines.append(line)
        if io:
            peer = s.peer.impl if s.peer else ""
            text = f"    I/O per op: fvd {counts_cell(s.fvd) or '-'}; {peer} {counts_cell(s.peer)}"
            lines.append(text[:width])
    if any(s.peer is not None and not s.peer.like_for_like for s in rows):
        lines += textwrap.wrap(STAR_NOTE, width)
    lines.append((_tally(run.judged) + "; --wide lists them all")[:width])
    lines += _not_met(run.judged, width, MAX_LINES - len(lines) if not io else 10**6)
    return "\n".join(lines)


def _status(j: vd.Judged) -> str:
    """The verdict as the text views say it (met at the 5% resolution only: at target)."""
    return "at target" if j.at_target else j.status


def _not_met(judged: list[vd.Judged], width: int, room: int) -> list[str]:
    bad = [j for j in judged if j.status != stats.MET]
    out = [f"  {_status(j):<9} {j.measured:<22} {j.target.text}"[:width] for j in bad]
    if len(out) > room:
        keep = max(room - 1, 0)
        out = out[:keep] + [f"  ... {len(bad) - keep} more: --wide"]
    return out


# ----- --wide: the full matrix ------------------------------------------------------------
def _matrix_cell(key: str, name: str, idx: vd.Index) -> str:
    r = idx.get((key, name))
    if r is None:
        return "-"
    cell = fmt_value(r) + ("" if r.like_for_like else STAR)
    if name != "fvd":
        s = stats.ratio_spread(idx.get((key, "fvd")), r)
        if s is not None:
            cell += f" {s.median:.2f}x"
    return cell


def _matrix(run: Run) -> tuple[list[tuple[str, str]], list[str], vd.Index]:
    idx = vd.index(run.results)
    rows = [(k, t) for k, t in tb.row_titles(run.scale) if any((k, n) in idx for n in run.names)]
    cols = [n for n in run.names if any((k, n) in idx for k, _ in rows)]
    return rows, cols, idx


def wide_text(run: Run, io: bool = False) -> str:
    """Every row and contender (value, fvd's advantage), then every target."""
    rows, cols, idx = _matrix(run)
    entries = [["workload"] + cols]
    for key, title in rows:
        entries.append([title] + [_matrix_cell(key, n, idx) for n in cols])
        if io and any(counts_cell(idx.get((key, n))) for n in cols):
            entries.append(["  I/O per op"] + [counts_cell(idx.get((key, n))) for n in cols])
    legend = "; ".join(tb.LEGEND[n] for n in cols if n in tb.LEGEND)
    lines = _header(run, 10**6)
    lines += ["cells: value, then fvd's advantage (>1: fvd better). " + legend, ""]
    lines += _fit([list(col) for col in zip(*entries)], 10**6)
    lines += ["", STAR_NOTE] if any(not r.like_for_like for r in run.results) else []
    lines += ["", _tally(run.judged) + ":"]
    for j in run.judged:
        lines.append(f"  [{_status(j):>9}] {j.target.text}: {j.measured}")
    lines += _unmeasured(run.results)
    return "\n".join(lines)


def _unmeasured(results: list[wl.Result]) -> list[str]:
    notes: dict[str, set[str]] = {}
    for r in results:
        if r.value is None and r.note:
            notes.setdefault(r.note, set()).add(r.impl)
    if not notes:
        return []
    return ["", "not measured:"] + [f"  {', '.join(sorted(w))}: {n}" for n, w in notes.items()]


# ----- markdown: the tables of docs/benchmarks.md -------------------------------------------
def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def _md_summary(run: Run) -> list[str]:
    rows = [
        [
            s.title,
            fmt_value(s.fvd),
            _peer_text(s),
            _ratio_text(s.ratio),
            str(sum(v is not None for v in stats.samples(s.fvd))),
            s.tally() or "-",
        ]
        for s in run.rows()
    ]
    header = ["workload", "fvd", "strongest peer", "fvd ÷ peer [90% CI]", "rounds", "targets"]
    return _md_table(header, rows)


def _md_targets(run: Run) -> list[str]:
    rows = [
        [j.target.text, j.measured, str(j.spread.n if j.spread else 0), _md_verdict(j)]
        for j in run.judged
    ]
    return _md_table(["target", "measured: median [90% CI]", "rounds", "verdict"], rows)


def _md_verdict(j: vd.Judged) -> str:
    return f"**{j.status}**" + (" (at target)" if j.at_target else "")


def _md_matrix(run: Run, io: bool) -> list[str]:
    rows, cols, idx = _matrix(run)
    body = [[t] + [_matrix_cell(k, n, idx) for n in cols] for k, t in rows]
    out = _md_table(["workload"] + cols, body)
    if io:
        counts = [[t] + [counts_cell(idx.get((k, n))) or "" for n in cols] for k, t in rows]
        counts = [r for r in counts if any(r[1:])]
        out += ["", "I/O per operation (round 1, exact):", ""]
        out += _md_table(["workload"] + cols, counts)
    return out


def markdown(run: Run, io: bool = True) -> str:
    """Summary, targets and full matrix as markdown tables, with the command and machine."""
    i = run.info
    out = [
        f"Command: `{run.command}` ({run.seconds:.0f} s; {_rounds_text(run)} per target). "
        f"fvd {i.get('fvd', '?')} ({i.get('fvd_implementation', '?')}), "
        f"{i.get('nproc', '?')} CPUs, {i.get('cpu', '')}, {i.get('filesystem', '')}, "
        f"{i.get('qemu', '')}.",
        "",
        "fvd ÷ peer: how many times better fvd is than the row's strongest peer (>1: fvd "
        "better), median of the per-round ratios and its 90% confidence interval. Targets "
        "are judged at a 5% resolution: met when the whole interval clears the target less "
        "5% (at target: it still holds the target itself), missed when it falls short of "
        "that, unclear when it holds it.",
        "",
    ]
    out += _md_summary(run) + [""] + _md_targets(run)
    out += ["", "Every cell: value, then fvd's advantage (median of paired rounds). "]
    out[-1] += "; ".join(tb.LEGEND[n] for n in run.names if n in tb.LEGEND) + "."
    out += [""] + _md_matrix(run, io)
    if any(not r.like_for_like for r in run.results):
        out += ["", STAR_NOTE.replace("* ", "\\* ", 1) + "."]
    return "\n".join(out) + "\n"


# ----- JSON ------------------------------------------------------------------------------
def json_doc(run: Run) -> dict[str, Any]:
    """The run as JSON: the keys of earlier versions, plus samples, rows and verdicts."""
    rows = [
        {
            "row": s.key,
            "title": s.title,
            "fvd": s.fvd.value if s.fvd else None,
            "peer": s.peer.impl if s.peer else None,
            "peer_value": s.peer.value if s.peer else None,
            "ratio": s.ratio.median if s.ratio else None,
            "ratio_low": s.ratio.low if s.ratio else None,
            "ratio_high": s.ratio.high if s.ratio else None,
            "ratio_ci_low": s.ratio.ci_low if s.ratio and s.ratio.bounded() else None,
            "ratio_ci_high": s.ratio.ci_high if s.ratio and s.ratio.bounded() else None,
            "rounds": s.ratio.n if s.ratio else 0,
        }
        for s in run.rows()
    ]
    return {
        "machine": run.info,
        "scale": vars(run.scale),
        "implementations": run.names,
        "seconds": run.seconds,
        "command": run.command,
        "results": [r.as_dict() for r in run.results],
        "targets": [j.as_dict() for j in run.judged],
        "rows": rows,
    }


def from_json(doc: dict[str, Any]) -> Run:
    """A Run from `json_doc` output (older documents without samples load too)."""
    results = [
        wl.Result(
            r["workload"],
            r["impl"],
            r["value"],
            r["unit"],
            r["higher_is_better"],
            r["ops"],
            r["seconds"],
            r["counts_per_op"],
            r["note"],
            list(r.get("samples", [])),
            bool(r.get("like_for_like", True)),
            None,
            list(r.get("typical_samples", [])),
        )
        for r in doc["results"]
    ]
    sc = dict(doc["scale"])
    sc["snapshots"] = tuple(sc.get("snapshots", ()))
    scale = wl.Scale(**sc)
    command = doc.get("command", "fvd bench")
    return Run(results, scale, doc["implementations"], doc["machine"], doc["seconds"], command)
