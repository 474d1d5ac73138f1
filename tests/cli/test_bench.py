"""`fvd bench`: verdicts from paired rounds, the reports (terminal, markdown, JSON), the
progress line, the plot, and one tiny real run. Nothing here asserts a timing: the
renderers are fed a made-up run, and the real run is checked for shape only."""

import functools
import io
import json
import math
import random
import time

import pytest

from fvd.bench import cells, impls, report, rounds, stats, verdicts
from fvd.bench import table as tb
from fvd.bench import workloads as wl
from fvd.bench.cells import Cell
from fvd.bench.progress import Progress
from fvd.cli import main

NAMES = list(impls.NAMES)
UNITS = {"ms": False, "MiB": False}  # lower is better; everything else higher


def _unit(key):
    if key.startswith(("snap-", "open", "changed", "sparse")):
        return "ms"
    if key == "metadata/TiB":
        return "MiB"
    if key.startswith(("seq", "convert", "checksum")):
        return "MiB/s"
    return "lookups/s" if key == "translate" else "ops/s"


def fake_run(quality=1.0, rounds_=6, seed=1):
    """Every row x contender of a --quick run with per-round samples; fvd's figures are
    `quality` times the peers' (so quality < 1 fails most targets)."""
    rng = random.Random(seed)
    scale = wl.Scale.quick()
    results = []
    for key, _title in tb.row_titles(scale):
        if key.startswith(tb.OPT_IN_PREFIXES):
            continue  # not part of a --quick run (only --workload runs them)
        unit = _unit(key)
        higher = UNITS.get(unit, True)
        for name in NAMES:
            rows = impls.BY_NAME[name].only_rows
            if rows is not None and not key.startswith(rows):
                continue  # as a real run: this contender measures these rows only
            # a contender of a few rows draws from its own generator: the others'
            # figures stay those of the contenders that run every row
            gen = rng if rows is None else random.Random(f"{seed} {key} {name}")
            base = 123456.0 if name == "fvd" else gen.uniform(20000, 99999)
            if not higher:  # times (ms), sizes (MiB)
                base /= 2000.0
            if name == "fvd":
                base *= quality if higher else 1 / quality
            samples = [base * gen.uniform(0.9, 1.1) for _ in range(rounds_)]
            counts = {"writes": 2.0, "bytes_written": 4608.0, "flushes": 1.0}
            counts["metadata_writes"] = 1.0
            r = wl.Result(key, name, sorted(samples)[rounds_ // 2], unit, higher, 128, 0.1)
            r.samples, r.counts = samples, counts
            r.like_for_like = not (name.startswith("qemu-") and key == "read4k")
            results.append(r)
    info = {"fvd": "0.1.0", "fvd_implementation": "cython", "nproc": 2, "cpu": "a CPU"}
    info["filesystem"] = "ext4 (/dev/vda on /)"
    return report.Run(results, scale, NAMES, info, 41.5, "fvd bench --quick")


def _shape_ok(text, width, lines):
    rows = text.splitlines()
    assert max(len(line) for line in rows) <= width, max(rows, key=len)
    assert len(rows) <= lines


@pytest.mark.parametrize("width", [100, 80])
@pytest.mark.parametrize("quality", [3.0, 1.0, 0.3])
def test_default_view_fits(width, quality):
    run = fake_run(quality)
    text = report.summary_text(run, width)
    _shape_ok(text, width, report.MAX_LINES)
    assert "alloc 4K random" in text and "targets:" in text
    if quality < 1:
        assert "missed" in text and "more: --wide" in text


def test_default_view_io_lines():
    text = report.summary_text(fake_run(), 100, io=True)
    assert "I/O per op: fvd w2/4.5K f1 m1" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_wide_view_has_every_column_and_target():
    run = fake_run()
    text = report.wide_text(run, io=True)
    header = next(line for line in text.splitlines() if line.startswith("workload"))
    assert all(n in header for n in NAMES)
    for t in tb.all_targets():
        assert t.text in text or t.row.startswith(tb.OPT_IN_PREFIXES)  # not measured
    assert report.STAR_NOTE in text  # QEMU random reads through qemu-io are marked


def test_spread_and_verdicts():
    s = stats.spread([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert (s.median, s.low, s.high, s.n) == (3.5, 2.25, 4.75, 6)
    assert (s.ci_low, s.ci_high) == (1.0, 6.0)  # 6 rounds: the 90% interval is the range
    assert stats.verdict(s, 0.9) == stats.MET
    assert stats.verdict(s, 1.9) == stats.UNCLEAR  # the interval holds the target
    assert stats.verdict(s, 6.5) == stats.MISSED
    # lower is better (times): must stay below the limit
    assert stats.verdict(s, 6.5, at_least=False) == stats.MET
    assert stats.verdict(s, 3.0, at_least=False) == stats.UNCLEAR
    assert stats.verdict(s, 0.9, at_least=False) == stats.MISSED
    assert stats.verdict(None, 1.0) == stats.NA
    few = stats.spread([5.0, 6.0, 7.0])  # too few rounds for a 90% interval: no verdict
    assert stats.verdict(few, 1.0) == stats.UNCLEAR and few.text() == "6.00x (3 rounds)"
    exact = stats.spread([2.0, 2.0, 2.0])  # one exact figure (a size): settled
    assert stats.verdict(exact, 3.0, at_least=False) == stats.MET and exact.text() == "2.00x"
    one = stats.spread([2.0, None])
    assert one.n == 1 and stats.verdict(one, 1.0) == stats.UNCLEAR and one.text() == "2.00x"


def test_interval_of_the_median_is_the_sign_test():
    # the k-th lowest/highest of n bound the median with >= 90% (98%) probability
    assert [stats.interval_ranks(n) for n in (1, 4, 5, 8, 12, 20, 40)] == [
        None,
        None,
        1,
        2,
        3,
        6,
        15,
    ]
    assert [stats.interval_ranks(n, 0.98) for n in (6, 7, 20)] == [None, 1, 5]
    vs = [float(v) for v in range(1, 21)]
    random.Random(3).shuffle(vs)
    assert stats.median_interval(vs) == (6.0, 15.0)
    assert stats.median_interval([2.0, 1.0]) == (-math.inf, math.inf)  # too few: none
    s = stats.spread(vs)
    assert (s.ci_low, s.ci_high) == (6.0, 15.0) and s.text() == "10.50x [6.00-15.00]"


def _rounds_at(ratio, noise, n, seed=7):
    """n synthetic per-round ratios: `ratio` times a noise factor within +-noise."""
    rng = random.Random(seed)
    return [ratio * (1 + rng.uniform(-noise, noise)) for _ in range(n)]


@pytest.mark.parametrize(
    "ratio,noise,n,status,at_target,still_open",
    [
        (1.6, 0.2, 12, stats.MET, False, False),  # clear: settled either way
        (0.6, 0.2, 12, stats.MISSED, False, False),
        (1.0, 0.02, 20, stats.MET, True, False),  # at the target: met at 5% resolution
        (0.9, 0.02, 20, stats.MISSED, False, False),  # short of it by more than 5%
        (0.95, 0.1, 30, stats.UNCLEAR, False, True),  # on the 5% line: more rounds
        (1.05, 0.4, 12, stats.UNCLEAR, False, True),  # noisy near the target: more rounds
        (1.6, 0.2, 4, stats.UNCLEAR, False, True),  # 4 rounds: no 90% interval yet
    ],
)
def test_decision_rule(ratio, noise, n, status, at_target, still_open):
    values = _rounds_at(ratio, noise, n)
    s = stats.spread(values)
    assert stats.verdict(s, 1.0) == status
    assert stats.at_target(s, 1.0) == at_target
    assert stats.is_open(values, 1.0) == still_open
    # times (lower is better) mirror it: limit / figure is the ratio
    inverse = stats.spread([1.0 / v for v in values])
    assert stats.verdict(inverse, 1.0, at_least=False) == status


def test_decision_rule_is_a_function_of_the_order_statistics():
    """Same rounds in any order, same verdict; one wild round moves a 90% interval of
    12 rounds by one rank only (the IQR rule it replaces flipped on such rounds)."""
    values = _rounds_at(1.3, 0.1, 12)
    shuffled = sorted(values, reverse=True)
    assert stats.spread(values) == stats.spread(shuffled)
    wild = values[:-1] + [0.05]  # one stalled round
    assert stats.verdict(stats.spread(wild), 1.0) == stats.MET


def test_ratios_are_paired_by_round():
    a = wl.Result("r", "fvd", 2.0, "ops/s", samples=[2.0, None, 8.0])
    b = wl.Result("r", "raw", 2.0, "ops/s", samples=[1.0, 5.0, 2.0])
    assert stats.paired_ratios(a, b) == [2.0, 4.0]  # round 2: fvd did not run
    t1 = wl.Result("r", "fvd", 1.0, "ms", False, samples=[1.0, 2.0])
    t2 = wl.Result("r", "qcow2", 3.0, "ms", False, samples=[3.0, 3.0])
    assert stats.paired_ratios(t1, t2) == [3.0, 1.5]  # times: peer over fvd
    once = wl.Result("r", "raw", 4.0, "MiB")  # measured once: paired with every round
    assert stats.paired_ratios(a, once) == [0.5, 2.0]


def test_targets_judged():
    run = fake_run(3.0)
    by_text = {j.target.text: j for j in run.judged}
    counts = by_text["fvd alloc 4K wt: <= 1 metadata write and <= 1 flush per write"]
    assert counts.status == stats.MET and "1 flushes" in counts.measured
    assert by_text["fvd alloc 4K wt >= 1.5x qcow2 baseline"].status == stats.MET
    slow = fake_run(0.1)
    mine = [j for j in slow.judged if j.target.kind == tb.RATIO and j.target.impl == "fvd"]
    assert {j.status for j in mine} == {stats.MISSED}
    measured = [t for t in tb.all_targets() if not t.row.startswith(tb.OPT_IN_PREFIXES)]
    assert len(run.judged) == len(measured)


def test_strongest_peer_skips_own_and_unlike():
    run = fake_run()
    idx = verdicts.index(run.results)
    best = verdicts.strongest_peer("read4k", idx, NAMES)
    assert best.impl not in ("fvd", "fvd-py") and best.like_for_like


def _md_tables(text):
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def test_markdown_tables():
    run = fake_run()
    text = report.markdown(run)
    tables = _md_tables(text)
    assert len(tables) == 4  # summary, targets, matrix, I/O per op
    for t in tables:
        cells = {line.count("|") for line in t}
        assert len(cells) == 1, t  # every line has as many cells as its header
        assert set(t[1]) <= {"|", "-"}
    assert "`fvd bench --quick`" in text
    for j in run.judged:
        assert f"| {j.target.text} | {j.measured} |" in text


def test_json_keeps_old_keys_and_round_trips():
    run = fake_run()
    doc = json.loads(json.dumps(report.json_doc(run), default=list))
    assert {"machine", "scale", "implementations", "seconds", "results", "targets"} <= set(doc)
    r = doc["results"][0]
    old = {"workload", "impl", "value", "unit", "higher_is_better", "ops", "seconds"}
    assert old | {"counts_per_op", "note", "samples", "rounds", "like_for_like"} <= set(r)
    t = doc["targets"][0]
    assert {"target", "measured", "value", "status", "low", "high", "rounds"} <= set(t)
    assert {row["row"] for row in doc["rows"]} >= {"alloc4k-wt", "checksum"}
    again = report.from_json(doc)
    assert report.summary_text(again, 100) == report.summary_text(run, 100)


def test_json_of_an_earlier_version_loads():
    doc = json.loads(json.dumps(report.json_doc(fake_run()), default=list))
    for r in doc["results"]:
        for key in ("samples", "rounds", "like_for_like"):
            del r[key]
    for key in ("rows", "command"):
        del doc[key]
    text = report.summary_text(report.from_json(doc), 100)
    assert "alloc 4K random wt" in text


def test_progress_in_place_on_a_terminal():
    out = io.StringIO()
    p = Progress(out, tty=True)
    p.update("round 1: alloc: fvd ...")
    p.update("round 1: alloc: fvd 2.1K")
    p.message("fvd bench: something failed")
    p.update("x")
    p.clear()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.count("\r") >= 4
    assert text.endswith("\r")  # the line is cleared at the end


def test_progress_plain_lines_otherwise():
    out = io.StringIO()
    p = Progress(out)  # StringIO is no terminal
    p.update("round 1: alloc: fvd ...")
    p.update("round 1: alloc: fvd 2.1K")
    p.clear()
    assert out.getvalue() == "round 1: alloc: fvd ...\nround 1: alloc: fvd 2.1K\n"


@pytest.mark.parametrize("ext,magic", [("png", b"\x89PNG"), ("svg", b"<?xml")])
def test_plot_written(tmp_path, ext, magic):
    pytest.importorskip("matplotlib")
    from fvd.bench import plot

    path = tmp_path / f"bench.{ext}"
    plot.plot(fake_run(1.2).judged, str(path), "fvd bench --quick")
    assert path.read_bytes().startswith(magic)


def test_plot_without_matplotlib_is_one_line(monkeypatch, capsys, tmp_path):
    from fvd.bench import plot

    monkeypatch.setattr(plot, "missing", lambda: plot.MISSING)
    assert main(["bench", "--plot", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == plot.MISSING and not (tmp_path / "x.png").exists()


def _fake_cell(key, members, log, fixed=False):
    def measure(rnd, who):
        log.append((rnd, tuple(who)))
        return [wl.Result(key, n, 100.0 + rnd, "ops/s") for n in who]

    return Cell(key, key, tuple(members), measure, fixed=fixed)


def _three_rounds(scale):
    log = []
    groups = rounds.group(
        [
            _fake_cell("alloc4k-wt", ["fvd", "fvd-py", "qcow2", "raw"], log),
            _fake_cell("alloc4k-wt", ["qemu-qcow2"], log),
            _fake_cell("alloc4k-wb/16", ["fvd", "qcow2-lazy"], log),
        ]
    )
    rec = rounds.Recorder()
    rounds.run_round(groups, 0, rec, Progress(enabled=False))
    later = rounds.later_groups(groups, rec, NAMES)
    rounds.more_rounds(later, scale, rec, Progress(enabled=False), 0.0)
    return log, rec


def test_rounds_alternate_and_keep_only_needed_members():
    log, rec = _three_rounds(wl.Scale(repeat=3, budget=0, other_rounds=1))
    # round 0: everything; rounds 1-2: rows with targets only, cells in reverse on odd rounds
    assert [r for r, _ in log].count(0) == 3 and len(log) == 7
    assert log[3] == (1, ("qemu-qcow2",))
    assert set(log[4][1]) == {"fvd", "qcow2", "raw"}  # the twin has no alloc target vs raw
    merged = verdicts.index(rec.merged())
    assert merged["alloc4k-wt", "fvd"].samples == [100.0, 101.0, 102.0]
    assert merged["alloc4k-wt", "fvd-py"].samples == [100.0, None, None]


def _valued_cell(key, members, log, value, narrow=None):
    """A cell whose contender `m` gives value(m, round)."""

    def measure(rnd, who, rows=None):
        log.append((rnd, tuple(who), rows))
        return [wl.Result(key, n, value(n, rnd), "ops/s") for n in who]

    narrowed = None if narrow is None else (lambda rows: functools.partial(measure, rows=rows))
    return Cell(key, key, tuple(members), measure, narrow=narrowed)


def _adaptive(value, max_rounds=12):
    log = []
    in_process = ["fvd", "fvd-tableless", "qcow2", "raw"]
    cells_ = [
        _valued_cell("alloc4k-wt", in_process, log, value, narrow=True),
        _valued_cell("alloc4k-wt", ["qemu-qcow2"], log, value),
        _valued_cell("alloc4k-wt", ["qemu-qcow2-lazy"], log, value),
        _valued_cell("read4k", ["fvd", "qcow2", "raw"], log, value),
    ]
    groups = rounds.group(cells_)
    rec = rounds.Recorder()
    rounds.run_round(groups, 0, rec, Progress(enabled=False))
    scale = wl.Scale(repeat=6, budget=1e9, max_rounds=max_rounds, other_rounds=1)
    later = rounds.later_groups(groups, rec, NAMES)
    rounds.more_rounds(later, scale, rec, Progress(enabled=False), 0.0)
    return log


def test_extra_rounds_only_while_a_target_is_open():
    # every ratio clear of its target: settled after the 7 rounds a 98% interval needs
    base = {"fvd": 300.0, "fvd-tableless": 320.0, "qcow2": 100.0, "raw": 310.0}
    base.update({"qemu-qcow2": 100.0, "qemu-qcow2-lazy": 150.0})
    log = _adaptive(lambda n, rnd: base[n] * (1 + 0.01 * (rnd % 3)))
    assert max(r for r, *_ in log) == 6  # not the 12 allowed: every verdict settled
    # fvd vs QEMU qcow2 swings around its 1.8x target: only that row and pair go on
    swing = dict(base, **{"qemu-qcow2": None, "qcow2": 130.0})
    log = _adaptive(lambda n, rnd: swing[n] or (120.0 if rnd % 2 else 220.0))
    later = {(who, rows) for r, who, rows in log if r >= 8}
    assert max(r for r, *_ in log) == 11 and ("qemu-qcow2",) in {w for w, _ in later}
    assert {w for w, _ in later} == {("fvd", "raw"), ("qemu-qcow2",)}  # + strongest peer


def test_a_row_that_would_overrun_the_budget_is_skipped_not_the_cheap_ones():
    log = []
    groups = rounds.group([_fake_cell("convert", ["fvd"], log), _fake_cell("read4k", ["fvd"], log)])
    rec = rounds.Recorder()
    rec.seconds = {"convert": 3600.0, "read4k": 0.001}  # their last rounds
    deadline = time.perf_counter() + 600
    assert rounds.run_round(groups, 1, rec, Progress(enabled=False), deadline) == 1
    assert log == [(1, ("fvd",))] and set(rec.seconds) == {"convert", "read4k"}
    assert rounds.run_round(groups, 2, rec, Progress(enabled=False)) == 2  # no deadline


def test_short_of_time_the_cheapest_rows_get_their_minimum_rounds():
    log = []
    groups = rounds.group([_fake_cell(k, ["fvd"], log) for k in ("convert", "read4k", "open")])
    rec = rounds.Recorder()
    rec.seconds = {"convert": 10.0, "read4k": 1.0, "open": 2.0}
    # 3 rounds to go in 10 s: read4k (3 s) and open (6 s) fit, convert (30 s) does not
    assert list(rounds._fitting(groups, rec, 3, 10.0)) == ["read4k", "open"]
    assert list(rounds._fitting(groups, rec, 1, 13.0)) == ["read4k", "open", "convert"]


def test_a_cell_of_several_rows_measures_only_the_open_ones():
    log = []

    def measure(rnd, who, rows=None):
        log.append((rnd, rows))
        swing = 0.7 if rnd % 2 else 1.4  # fvd -> raw swings around its 1.0x target
        out = [wl.Result("convert-raw-fvd", "fvd", 200.0 + rnd % 3, "MiB/s")]
        out.append(wl.Result("convert-raw-fvd", "qemu-qcow2", 100.0, "MiB/s"))
        out.append(wl.Result("convert-fvd-raw", "fvd", 100.0 * swing, "MiB/s"))
        out.append(wl.Result("convert-fvd-raw", "qemu-raw", 100.0, "MiB/s"))
        return [r for r in out if rows is None or r.workload in rows]

    narrow = lambda rows: functools.partial(measure, rows=rows)  # noqa: E731
    groups = rounds.group(
        [Cell("convert", "convert", ("fvd",), measure, True, True, narrow=narrow)]
    )
    rec = rounds.Recorder()
    rounds.run_round(groups, 0, rec, Progress(enabled=False))
    scale = wl.Scale(repeat=6, budget=1e9, max_rounds=10, other_rounds=1)
    later = rounds.later_groups(groups, rec, NAMES)
    rounds.more_rounds(later, scale, rec, Progress(enabled=False), 0.0)
    assert [rows for _, rows in log] == [None] * 7 + [frozenset({"convert-fvd-raw"})] * 3
    judged = {j.row: j.status for j in verdicts.judge_all(rec.merged()) if j.row}
    assert judged["convert-raw-fvd"] == stats.MET  # settled in 8 rounds
    assert judged["convert-fvd-raw"] == stats.UNCLEAR


def test_tiny_real_run(tmp_path, capsys):
    """A real run, in-process contenders, a few ops: every part wired end to end."""
    argv = ["bench", "--workload", "alloc4k-wt,translate", "--no-qemu", "--ops", "8"]
    argv += ["--repeat", "2", "--budget", "0", "--dir", str(tmp_path)]
    assert main(argv + ["--output", "json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    fvd_alloc = next(r for r in doc["results"] if r["impl"] == "fvd" and r["rounds"])
    assert len(fvd_alloc["samples"]) == 2 and fvd_alloc["counts_per_op"]["flushes"] == 1
    assert {t["status"] for t in doc["targets"]} <= set(stats.VERDICTS)
    assert "round 2:" in err  # progress on stderr, one line per cell (not a terminal)


def test_busy_machine_is_said_and_still_fits():
    run = fake_run(0.3)
    run.info.update(load=6.7, load_end=5.1)
    text = report.summary_text(run, 100)
    assert "busy machine (load 6.7 on 2 CPUs)" in text
    _shape_ok(text, 100, report.MAX_LINES)
    run.info.update(load=0.5, load_end=1.0)
    assert "busy" not in report.summary_text(run, 100)


def test_every_row_gets_the_minimum_rounds_by_default():
    log, rec = _three_rounds(wl.Scale(repeat=3, budget=0))
    merged = verdicts.index(rec.merged())
    assert merged["alloc4k-wb/16", "fvd"].samples == [100.0, 101.0, 102.0]
    assert merged["alloc4k-wb/16", "qcow2-lazy"].samples == [100.0, 101.0, 102.0]


def test_in_process_pairs_compare_typical_slices_qemu_whole_runs():
    fvd = wl.Result("r", "fvd", 1.0, "ops/s", samples=[1.0, 1.0], typical_samples=[4.0, 6.0])
    raw = wl.Result("r", "raw", 1.0, "ops/s", samples=[2.0, 2.0], typical_samples=[2.0, 2.0])
    qemu = wl.Result("r", "qemu-qcow2", 1.0, "ops/s", samples=[0.5, 1.0])
    assert stats.paired_ratios(fvd, raw) == [2.0, 3.0]  # both measured together: slices
    assert stats.paired_ratios(fvd, qemu) == [2.0, 1.0]  # QEMU: whole runs on both sides


def test_paired_round_gives_whole_and_typical_figures(tmp_path):
    w = next(x for x in wl.io_workloads(wl.Scale(ops=16)) if x.key == "alloc4k-wt")
    out = wl.measure_io_paired(w, [impls.BY_NAME["fvd"], impls.BY_NAME["raw"]], str(tmp_path))
    assert [r.impl for r in out] == ["fvd", "raw"]
    for r in out:
        assert r.value > 0 and r.typical > 0 and r.counts["flushes"] == 1
    assert list(tmp_path.iterdir()) == []  # images removed


def test_bad_options_and_saved_runs(tmp_path, capsys):
    assert main(["bench", "--impl", "nope", "--dir", str(tmp_path)]) == 2
    assert "unknown implementation 'nope'" in capsys.readouterr().err
    bad = tmp_path / "x.json"
    bad.write_text("not json")
    assert main(["bench", "--load", str(bad)]) == 1
    assert "cannot load a saved run" in capsys.readouterr().err
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(report.json_doc(fake_run()), default=list))
    assert main(["bench", "--load", str(saved), "--output", "markdown"]) == 0
    assert capsys.readouterr().out == report.markdown(fake_run())


def test_scale_rows_are_opt_in(tmp_path):
    def ctx(keys):
        return cells.Context(wl.Scale.quick(), ["fvd", "qemu-qcow2"], str(tmp_path), keys)

    assert cells.scale_cells(ctx(None)) == []  # a plain run: not measured
    assert cells.scale_cells(ctx(["alloc"])) == []
    (cell,) = cells.scale_cells(ctx(["scale"]))
    assert cell.members == ("fvd", "qemu-qcow2") and cell.fixed
    assert {k for k, _ in tb.row_titles(wl.Scale.quick())} >= {"scale-open", "scale-check"}
