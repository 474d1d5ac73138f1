"""`fvd bench`: FVD against the qcow2 baseline, a plain file and QEMU, judged against
the project's targets.

The CLI calls `add_arguments(parser)` on its `bench` subparser and `run(args) -> int`.
Rows and targets: fvd.bench.table; what each row measures: fvd.bench.cells; paired
rounds within a time budget: fvd.bench.rounds; verdicts: fvd.bench.verdicts; the
reports (terminal, --wide, markdown, JSON): fvd.bench.report; --plot: fvd.bench.plot.
Workloads live in fvd.bench.workloads (shared with the pytest-benchmark suite in bench/),
contenders in fvd.bench.impls, the QEMU runner in fvd.bench.qemu.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Union

import fvd
from fvd import _impl
from fvd.bench import impls, report, rounds
from fvd.bench import plot as plotting
from fvd.bench import workloads as wl
from fvd.bench.progress import Progress
from fvd.units import parse_size

DEFAULT_IMPLS = impls.NAMES


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `fvd bench` options to an argparse (sub)parser."""
    add = parser.add_argument
    add(
        "--quick",
        action="store_true",
        help="fewer operations per cell, the same targets, "
        "rounds until about 45 s are used (under a minute)",
    )
    add(
        "--output",
        choices=("text", "json", "markdown"),
        default="text",
        help="text (default), JSON (every figure and round), or the markdown tables of "
        "docs/benchmarks.md",
    )
    add("--wide", action="store_true", help="text: every contender's column and every target")
    add("--io", action="store_true", help="text: I/O per operation under each row")
    add(
        "--plot",
        metavar="FILE.png",
        help="also draw the targets' ratios and spread "
        "(.png or .svg; needs matplotlib: pip install 'fvd[plot]')",
    )
    return _add_size_arguments(parser)


def _add_size_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What is measured, how much, how many rounds, where."""
    add = parser.add_argument
    add("--ops", type=int, help="random 4 KiB operations per cell (default 2048, quick 64)")
    add(
        "--size",
        metavar="BYTES",
        help="sequential I/O volume, 1 MiB ops (suffixes K M G; default 256M, quick 32M)",
    )
    add(
        "--flush-every",
        type=int,
        metavar="N",
        help="writeback rows flush every N writes (default 16)",
    )
    add(
        "--repeat",
        type=int,
        metavar="N",
        help="paired rounds at least (default 5, quick 5 as the budget allows); medians and "
        "90%% intervals over them",
    )
    add(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="add rounds while the run has used less (default 0, quick 45)",
    )
    add(
        "--snapshots",
        metavar="K,K...",
        help="snapshot counts to time (default 1,100,1000; quick 1,10)",
    )
    add("--impl", metavar="NAME,...", help="implementations (columns): " + ",".join(DEFAULT_IMPLS))
    add(
        "--workload",
        metavar="KEY,...",
        help="only these rows (prefix match on the row key, e.g. alloc,read4k)",
    )
    add("--no-qemu", action="store_true", help="skip the QEMU columns")
    add(
        "--load",
        metavar="FILE.json",
        help="report (or --plot) a run saved with --output=json; measures nothing",
    )
    add(
        "--dir",
        metavar="DIR",
        help="where to put temporary images (default: the current "
        "directory; use the disk you want measured)",
    )
    return parser


def scale_from_args(args: argparse.Namespace) -> wl.Scale:
    scale = wl.Scale.quick() if getattr(args, "quick", False) else wl.Scale()
    if getattr(args, "ops", None):
        scale.ops = args.ops
    if getattr(args, "size", None):
        scale.seq_mib = max(1, parse_size(args.size) // wl.MiB)
    if getattr(args, "flush_every", None):
        scale.flush_every = args.flush_every
    if getattr(args, "repeat", None):
        scale.repeat, scale.sure_rounds = args.repeat, 0  # asked for: run them all
    if getattr(args, "budget", None) is not None:
        scale.budget = args.budget
    if getattr(args, "snapshots", None):
        scale.snapshots = tuple(int(k) for k in args.snapshots.split(",") if k.strip())
    return scale


# ----- machine description --------------------------------------------------------------
def machine_info(workdir: str) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    fs = ""
    try:
        best = ""
        real = os.path.realpath(workdir)
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fs = mnt, f"{typ} ({dev} on {mnt})"
    except OSError:
        pass
    qemu = ""
    if shutil.which("qemu-img"):
        try:
            qemu = subprocess.run(
                ["qemu-img", "--version"], capture_output=True, text=True
            ).stdout.splitlines()[0]
        except (OSError, IndexError):
            pass

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "filesystem": fs,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fvd": fvd.__version__,
        "fvd_implementation": _impl.IMPLEMENTATION,
        "qemu": qemu,
        "load": os.getloadavg()[0],
    }


# ----- the command -----------------------------------------------------------------------
MEASURING = ("ops", "size", "flush_every", "repeat", "budget", "snapshots", "impl", "workload")


def command_line(args: argparse.Namespace) -> str:
    """The measuring part of the command (what the reports say they ran)."""
    parts = ["fvd bench"] + (["--quick"] if getattr(args, "quick", False) else [])
    for name in MEASURING:
        value = getattr(args, name, None)
        if value is not None:
            parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts + (["--no-qemu"] if getattr(args, "no_qemu", False) else []))


def _names(args: argparse.Namespace) -> list[str]:
    """The contenders asked for (ValueError naming an unknown one)."""
    names = list(DEFAULT_IMPLS)
    if getattr(args, "impl", None):
        names = [n.strip() for n in args.impl.split(",") if n.strip()]
        bad = [n for n in names if n not in impls.BY_NAME]
        if bad:
            raise ValueError(
                f"unknown implementation {bad[0]!r} (choose from {', '.join(DEFAULT_IMPLS)})"
            )
        if "fvd" not in names:
            names = ["fvd"] + names
    if getattr(args, "no_qemu", False):
        names = [n for n in names if not n.startswith("qemu-")]
    return names


def _measure(args: argparse.Namespace) -> report.Run:
    """Run the benchmark the options describe (ValueError: bad options)."""
    names = _names(args)
    keys = [k.strip() for k in args.workload.split(",") if k.strip()] if args.workload else None
    scale = scale_from_args(args)
    parent = getattr(args, "dir", None) or os.getcwd()
    if not os.path.isdir(parent):
        raise ValueError(f"{parent}: not a directory")
    workdir = tempfile.mkdtemp(prefix="fvd-bench-", dir=parent)
    try:
        info = machine_info(workdir)
        t0 = time.perf_counter()
        results = rounds.run_all(scale, names, workdir, keys, Progress())
        elapsed = time.perf_counter() - t0
        info["load_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report.Run(results, scale, names, info, elapsed, command_line(args))


def load(path: str) -> report.Run:
    """A run saved with --output=json."""
    with open(path) as f:
        return report.from_json(json.load(f))


def render(run: report.Run, args: argparse.Namespace) -> str:
    """The report --output, --wide and --io ask for."""
    io = getattr(args, "io", False)
    if args.output == "json":
        return json.dumps(report.json_doc(run), indent=2, default=list)
    if args.output == "markdown":
        return report.markdown(run, io=True)
    if getattr(args, "wide", False):
        return report.wide_text(run, io)
    width = shutil.get_terminal_size((100, 24)).columns
    return report.summary_text(run, width, io)


def _obtain(args: argparse.Namespace) -> Union[report.Run, int]:
    """The run to report, loaded (--load) or measured now; or the exit code of a failure
    (said on stderr)."""
    saved = getattr(args, "load", None)
    try:
        return load(saved) if saved else _measure(args)
    except KeyboardInterrupt:
        print("fvd bench: interrupted", file=sys.stderr)
        return 130
    except (OSError, KeyError, TypeError, ValueError) as e:
        if not saved and isinstance(e, (KeyError, TypeError)):
            raise  # a bug, not a bad option: keep the traceback
        where = f"{saved}: cannot load a saved run: " if saved else ""
        print(f"fvd bench: {where}{e}", file=sys.stderr)
        return 1 if saved else 2


def run(args: argparse.Namespace) -> int:
    """`fvd bench`; returns the exit code."""
    if getattr(args, "plot", None) and plotting.missing():
        print(plotting.MISSING, file=sys.stderr)
        return 1
    the_run = _obtain(args)
    if isinstance(the_run, int):
        return the_run
    text = render(the_run, args)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if getattr(args, "plot", None):
        plotting.plot(the_run.judged, args.plot, report.headline(the_run))
        print(f"fvd bench: wrote {args.plot}", file=sys.stderr)
    failed = [r for r in the_run.results if r.note.startswith("error:")]
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    """Standalone entry point: python -m fvd.bench."""
    parser = add_arguments(argparse.ArgumentParser(prog="fvd bench"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
