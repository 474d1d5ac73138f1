"""The FVD paper's headline benchmark inside a real guest, side by side.

Each boot gets a fresh 2 GiB image made from one ext4 template (the file system ends
512 MiB before the end of the disk, so the sync-write pass writes where nothing was
ever allocated), in the contender's format, and runs tests/vm/workload.c:

1. `syncwrite`: 4 KiB O_DIRECT|O_DSYNC writes 1 MiB apart in the last 512 MiB (each
   one allocates: a new fvd chunk, a new qcow2 cluster, a new host block for raw);
2. `smallfiles ... 1`: PostMark-like creation of small files (0.5-10 KiB) with fsync
   per file, then deletion;
3. `smallfiles ... 0`: the same without fsync, sync() inside the timed region.

Boots are interleaved round-robin across the contenders (the first contender rotates
each round) and each figure is the median over the boots, so load from other users of
the machine spreads over all contenders instead of landing on one.

    python -m tests.vm.bench --boots 5 [--save run.json]
    python -m tests.vm.bench --load run.json [--load run2.json]   # the table, runs pooled
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kit import BACKEND_FORMAT, GuestKitError, Kit, convert_raw, make_ext4, prepare, run_on

MiB = 1 << 20
CONTENDERS = ("fvd-serve", "qcow2-nbd", "raw-nbd", "qcow2-qemu")
FIGURES = (
    "syncwrite_4k_ops_per_s",
    "create_fsync_ops_per_s",
    "delete_fsync_ops_per_s",
    "create_nofsync_ops_per_s",
    "delete_nofsync_ops_per_s",
)


@dataclass(frozen=True)
class Plan:
    size: int
    sync_writes: int
    fsync_files: int
    nofsync_files: int

    def script(self, seed: int) -> str:
        return f"""set -e
workload syncwrite /dev/vda {self.sync_writes} {self.size}
mount /dev/vda /mnt
mkdir /mnt/fsync /mnt/nofsync
workload smallfiles /mnt/fsync {self.fsync_files} 1 {seed}
workload smallfiles /mnt/nofsync {self.nofsync_files} 0 {seed + 1}
umount /mnt
"""


# The paper-sized run: a 2 GiB disk, 512 sync writes, 1,000 files with fsync, 4,000 without.
PLAN = Plan(2 << 30, 512, 1000, 4000)


@dataclass
class Samples:
    by_backend: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def add(self, backend: str, results: dict[str, float]) -> None:
        self.by_backend.setdefault(backend, []).append(results)

    def median(self, backend: str, figure: str) -> float:
        return statistics.median(r[figure] for r in self.by_backend[backend])

    def paired(self, a: str, b: str, figure: str) -> float:
        """Median over rounds of a's figure divided by b's in the same round."""
        pairs = zip(self.by_backend[a], self.by_backend[b])
        return statistics.median(x[figure] / y[figure] for x, y in pairs)


def make_template(workdir: Path, plan: Plan) -> Path:
    template = workdir / "template.raw"
    make_ext4(template, plan.size, fs_size=plan.size - plan.sync_writes * MiB)
    return template


def one_boot(
    kit: Kit, workdir: Path, template: Path, backend: str, plan: Plan, seed: int
) -> dict[str, float]:
    image = workdir / f"disk-{backend}.{BACKEND_FORMAT[backend]}"
    image.unlink(missing_ok=True)
    convert_raw(template, image, BACKEND_FORMAT[backend])
    try:
        r = run_on(kit, backend, image, plan.script(seed), timeout=900.0).check()
    finally:
        image.unlink(missing_ok=True)
    missing = [f for f in FIGURES if f not in r.results]
    if missing:
        raise GuestKitError(f"{backend}: no {missing} in the guest output:\n{r.output}")
    return {**r.results, "boot_seconds": r.seconds}


def run_rounds(kit: Kit, plan: Plan, contenders: Sequence[str], boots: int) -> Samples:
    samples = Samples()
    with tempfile.TemporaryDirectory(prefix="fvd-guest-bench-") as tmp:
        template = make_template(Path(tmp), plan)
        for round_no in range(boots):
            shift = round_no % len(contenders)
            order = list(contenders[shift:]) + list(contenders[:shift])
            for backend in order:
                results = one_boot(kit, Path(tmp), template, backend, plan, seed=round_no * 2 + 1)
                samples.add(backend, results)
                print(f"round {round_no + 1}/{boots} {backend}: {_brief(results)}", file=sys.stderr)
    return samples


def _brief(results: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('_ops_per_s', '')} {results[k]:.0f}/s" for k in FIGURES)


def environment(kit: Kit) -> dict[str, object]:
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    return {
        "accel": kit.accel,
        "guest_kernel": kit.release,
        "qemu": qemu,
        "host_cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def table(samples: Samples, contenders: Sequence[str]) -> str:
    """Medians per contender and fvd's ratio to each (ops/s: > 1 means fvd is faster):
    the ratio of the medians, then the median of the per-round ratios (each round's
    boots ran back to back, so they share that moment's load on the machine)."""
    head = "| figure (ops/s, median) | " + " | ".join(contenders) + " |"
    lines = [head, "|---" * (len(contenders) + 1) + "|"]
    first = contenders[0]
    for figure in FIGURES:
        cells = [f"{samples.median(first, figure):.0f}"]
        for other in contenders[1:]:
            m = samples.median(other, figure)
            ratio = samples.median(first, figure) / m
            cells.append(
                f"{m:.0f} ({ratio:.2f}x; paired {samples.paired(first, other, figure):.2f}x)"
            )
        lines.append(f"| {figure.replace('_ops_per_s', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure(plan: Plan, contenders: Sequence[str], boots: int) -> tuple[dict[str, Any], Samples]:
    """A whole run: the kit prepared, `boots` interleaved rounds; the run as --save
    writes it (environment, plan, samples) and its samples. Used by main() and by
    bench/test_guest_bench.py."""
    kit = prepare()
    env = environment(kit)
    start = time.monotonic()
    samples = run_rounds(kit, plan, contenders, boots)
    env["seconds"] = round(time.monotonic() - start, 1)
    env["load_average_end"] = os.getloadavg()
    return {"environment": env, "plan": plan.__dict__, "samples": samples.by_backend}, samples


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vm.bench", description=__doc__.split("\n")[0])
    p.add_argument("--boots", type=int, default=3, help="boots per contender (medians)")
    p.add_argument("--size-gib", type=int, default=PLAN.size >> 30)
    p.add_argument("--sync-writes", type=int, default=PLAN.sync_writes)
    p.add_argument("--fsync-files", type=int, default=PLAN.fsync_files)
    p.add_argument("--nofsync-files", type=int, default=PLAN.nofsync_files)
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="fvd-serve first")
    p.add_argument("--save", type=Path, help="also write every sample as JSON here")
    p.add_argument(
        "--load",
        type=Path,
        action="append",
        help="print the table of saved runs (repeat to pool them), boot nothing",
    )
    args = p.parse_args(argv)
    if args.load:
        pooled = Samples()
        for path in args.load:
            saved = json.loads(path.read_text())
            print(json.dumps(saved["environment"]))
            for backend, results in saved["samples"].items():
                pooled.by_backend.setdefault(backend, []).extend(results)
        print(table(pooled, list(pooled.by_backend)))
        return 0
    plan = Plan(args.size_gib << 30, args.sync_writes, args.fsync_files, args.nofsync_files)
    try:
        run, samples = measure(plan, args.contenders.split(","), args.boots)
    except GuestKitError as e:
        print(f"guest bench: {e}", file=sys.stderr)
        return 1
    if args.save:
        args.save.write_text(json.dumps(run, indent=1))
    report(run, samples)
    return 0


def report(run: dict[str, Any], samples: Samples) -> None:
    print(json.dumps(run["environment"]))
    print(table(samples, list(samples.by_backend)))


if __name__ == "__main__":
    sys.exit(main())
