"""The rows of `fvd bench` and the targets they are judged against: two tables.

How to add a row
----------------
1. Measure it: a function returning `workloads.Result`s for one round (one value per
   (row key, contender)). I/O rows are `workloads.IoWorkload`s from `io_workloads()`;
   a new row group gets a `Cell` factory in `fvd.bench.runner.CELL_FACTORIES`
   (convert rows: a tuple in `fvd.bench.convert.ROWS` is enough, the group measures it).
   The runner calls each cell once per round, cells of a row back to back, so ratios
   between them are paired.
2. Name it: add `(key, title)` to `row_titles()` (or to the group's own list, as
   convert and backup do); titles stay under 32 characters so the default view fits
   100 columns.
3. Promise something (optional): add a `Target` to `TARGETS` (or `convert_targets()`):
   `Target(row, text, limit, peer=...)` for "fvd >= limit x peer",
   `Target(row, text, limit, kind=BELOW)` for "fvd's figure < limit",
   `kind=AT_LEAST` for "fvd's figure >= limit", `kind=COUNTS` for per-op I/O counts.
   The peer's cells then run in every round; its verdict is met / missed / unclear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from fvd.bench import backup, convert
from fvd.bench import scale as scale_rows
from fvd.bench import workloads as wl

RATIO, AT_LEAST, BELOW, COUNTS = "ratio", "at_least", "below", "counts"


@dataclass(frozen=True)
class Target:
    """A promise about one row: `impl` against `peer` (ratio) or against a limit."""

    row: str  # row key; a prefix is enough (seqwrite1m matches seqwrite1m-wb/16)
    text: str
    limit: float
    peer: str = ""
    impl: str = "fvd"
    kind: str = RATIO
    counts: tuple[str, ...] = ()  # COUNTS: these per-op counts must be <= limit
    unit: str = "x"  # how the measured figure is shown

    def contenders(self) -> tuple[str, ...]:
        return (self.impl, self.peer) if self.peer else (self.impl,)


def _r(row: str, text: str, limit: float, peer: str, impl: str = "fvd") -> Target:
    return Target(row, text, limit, peer, impl)


def _alloc(text: str, limit: float, peer: str, impl: str = "fvd") -> Target:
    """A ratio target of the allocating-write row (most targets are)."""
    return Target("alloc4k-wt", text, limit, peer, impl)


def _alloc_counts(text: str, limit: float, counts: tuple[str, ...], impl: str) -> Target:
    """Per-op I/O counts of the allocating-write row, each at most `limit`."""
    return Target("alloc4k-wt", text, limit, impl=impl, kind=COUNTS, counts=counts, unit="")


TABLELESS = "fvd-tableless"
TARGETS: list[Target] = [
    _alloc_counts(
        "fvd alloc 4K wt: <= 1 metadata write and <= 1 flush per write",
        1,
        ("metadata_writes", "flushes"),
        "fvd",
    ),
    _alloc("fvd alloc 4K wt >= 1.5x qcow2 baseline", 1.5, "qcow2"),
    _alloc("fvd alloc 4K wt >= 1.8x QEMU qcow2", 1.8, "qemu-qcow2"),
    _alloc("fvd alloc 4K wt >= 1.3x QEMU qcow2 lazy_refcounts", 1.3, "qemu-qcow2-lazy"),
    _r("cow4k-wt", "fvd 1st write after snapshot wt >= 1.5x qcow2 baseline", 1.5, "qcow2"),
    _r("cow4k-wt", "fvd 1st write after snapshot wt >= 1.3x QEMU qcow2", 1.3, "qemu-qcow2"),
    _alloc("fvd alloc 4K wt >= 0.8x raw pwrite+fdatasync", 0.8, "raw"),
    _alloc("alloc 4K wt, table-less vs raw pwrite+fdatasync >= 0.95x", 0.95, "raw", TABLELESS),
    _alloc_counts(
        "table-less alloc 4K wt: no metadata write per write", 0, ("metadata_writes",), TABLELESS
    ),
    _r("overwrite4k-wt", "fvd overwrite 4K wt within 10% of qcow2 baseline", 0.9, "qcow2"),
    _r("read4k", "fvd read 4K within 10% of qcow2 baseline", 0.9, "qcow2"),
    _alloc("qcow2 baseline alloc 4K wt within 2x of QEMU qcow2", 0.5, "qemu-qcow2", "qcow2"),
    Target("translate", "compiled translation >= 50M lookups/s", 50e6, kind=AT_LEAST, unit="/s"),
    _r("translate", "compiled translation >= 10x Python twin", 10, "fvd-py"),
    _r("read4k", "compiled readinto 4K >= 0.9x os.preadv", 0.9, "raw"),
    _r("read4k", "Python twin readinto 4K >= 0.5x os.preadv", 0.5, "raw", "fvd-py"),
    _r("seqread1m", "fvd sequential 1M read >= 0.9x plain file", 0.9, "raw"),
    _r("seqwrite1m", "fvd sequential 1M write >= 0.9x plain file", 0.9, "raw"),
    Target(
        "changed-extents",
        "changed extents, 10% of chunks rewritten < 50 ms",
        50,
        kind=BELOW,
        unit=" ms",
    ),
    Target(
        "sparse-extents", "extents_array of a huge sparse image < 50 ms", 50, kind=BELOW, unit=" ms"
    ),
    _r("checksum", "checksum >= 1.0x ovirt-imageio's of the raw file", 1.0, "raw"),
    # issue 24, small footprints at 16 TiB (fvd.bench.scale)
    Target("scale-create", "16 TiB create < 50 ms", 50, kind=BELOW, unit=" ms"),
    Target("scale-empty-disk", "16 TiB empty image < 2 MiB on disk", 2, kind=BELOW, unit=" MiB"),
    Target("scale-open", "16 TiB open < 100 ms", 100, kind=BELOW, unit=" ms"),
    # table bytes (64 MiB at 16 TiB, 1 MiB chunks) + 32 MiB
    Target("scale-open-rss", "16 TiB open adds <= 96 MiB RSS", 96, kind=BELOW, unit=" MiB"),
    Target(
        "scale-snapshot-bytes",
        "16 TiB snapshot writes < 2 MiB metadata",
        2,
        kind=BELOW,
        unit=" MiB",
    ),
    Target("scale-check", "16 TiB check < 300 ms", 300, kind=BELOW, unit=" ms"),
]


def convert_targets() -> list[Target]:
    """fvd convert >= 1.0x qemu-img convert, one per convert row."""
    out = []
    for key, title, _s, _d, peer, _cache in convert.ROWS:
        what = convert.QEMU_WHAT[peer]
        out.append(_r(key, f"fvd {title} >= 1.0x qemu-img ({what})", 1.0, peer))
    return out


def all_targets() -> list[Target]:
    """Every target, in the order the reports list them."""
    return TARGETS + convert_targets()


# Rows only `--workload` names run (they take long: 16 TiB images, ~15 s a round).
OPT_IN_PREFIXES = ("scale",)


def opt_in(keys: Optional[Sequence[str]]) -> bool:
    """The run's --workload keys ask for an opt-in row group."""
    return bool(keys) and any(k.startswith(OPT_IN_PREFIXES) for k in keys or ())


def row_titles(scale: wl.Scale) -> list[tuple[str, str]]:
    """(row key, title) of every row, in table order."""
    rows = [(w.key, w.title) for w in wl.io_workloads(scale)]
    for k in scale.snapshots:
        rows.append((f"snap-create-x{k}", f"snapshot create, {k} snaps"))
        rows.append((f"snap-delete-x{k}", f"snapshot delete, {k} snaps"))
    rows += [(key, title) for key, title, *_ in convert.ROWS]
    rows += [
        ("open", "open (r), allocated image"),
        ("metadata/TiB", "metadata per TiB"),
        ("translate", "translate chunk index"),
    ]
    return rows + backup.rows() + scale_rows.ROWS


# A peer shown under another name in one row group (the column is reused).
PEER_LABELS = {
    ("checksum", "raw"): "ovirt-imageio",
    ("convert", "qemu-qcow2"): "qemu-img",
    ("convert", "qemu-raw"): "qemu-img",
}

# What each contender is, for the legends.
LEGEND = {
    "fvd": "fvd: compiled fast path (Cython)",
    "fvd-py": "fvd-py: pure-Python twin",
    "fvd-tableless": "fvd-tableless: table=off, the host file system allocates",
    "qcow2": "qcow2: fvd.qcow2 baseline",
    "qcow2-lazy": "qcow2-lazy: same, lazy refcounts",
    "raw": "raw: plain file (pwrite/preadv)",
    "qemu-qcow2": "qemu-*: QEMU itself (qemu-img bench)",
}


def peer_label(row: str, impl: str) -> str:
    for (prefix, name), label in PEER_LABELS.items():
        if name == impl and row.startswith(prefix):
            return label
    return impl


def resolve_row(target: Target, keys: list[str]) -> Optional[str]:
    """The row key a target names (exact, else the first key it prefixes)."""
    if target.row in keys:
        return target.row
    return next((k for k in keys if k.startswith(target.row)), None)
