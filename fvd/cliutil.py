"""Helpers of the `fvd` command line that make it behave like qemu-img: opening an
image by `-f` (or probe), info of every layer of a chain, check facts, and qemu-img's
progress output (qemu-img's text, or ovirt-img's JSON lines)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Optional, TextIO

import numpy as np

from fvd import qcow2
from fvd.convert import changed_ranges
from fvd.errors import BaseImageError, CorruptImageError, FvdError
from fvd.image import Image, verify_reopen
from fvd.imageio import AnyImage, RawImage, open_image, resolve_format
from fvd.ops.info import qcow2_info
from fvd.types import CheckResult, Extent

Info = dict[str, Any]  # `qemu-img info --output=json` of one image


def open_args(args: argparse.Namespace, mode: str = "r", image: Optional[str] = None) -> AnyImage:
    """The image named by args (args.image), in the format of -f (probed when absent)."""
    return open_image(
        image or args.image,
        getattr(args, "fmt", None),
        mode,
        force_share=getattr(args, "force_share", False),
    )


def extent_dict(e: Extent) -> dict[str, Any]:
    """An extent in `qemu-img map --output=json` form, whatever image it came from."""
    d = {
        "start": e.start,
        "length": e.length,
        "depth": e.depth,
        "present": e.present,
        "zero": e.zero,
        "data": e.data,
    }
    if e.offset is not None:
        d["offset"] = e.offset
    return d


# ----- info --------------------------------------------------------------------------
def layer_info(path: str, fmt: Optional[str] = None, force_share: bool = False) -> Info:
    """qemu-img info of one image. An image whose base is missing still gets its info,
    with "backing-missing": true under format-specific."""
    f = resolve_format(path, fmt)
    if f == "fvd":
        try:
            with Image(path, "r", force_share=force_share) as img:
                return img.info()
        except BaseImageError as e:
            with Image(path, "r", force_share=force_share, _for_check=True) as img:
                info = img.info()
            return _mark_missing(info, e)
    if f == "qcow2":
        try:
            with qcow2.open(path) as q:
                return qcow2_info(q)
        except BaseImageError as e:
            with qcow2.Qcow2Image(path, "r", _skip_backing=True) as q:
                return _mark_missing(qcow2_info(q), e)

    with RawImage(path) as r:
        return r.info()


def _mark_missing(info: Info, error: BaseException) -> Info:
    data = info.setdefault("format-specific", {"type": info["format"], "data": {}})["data"]
    data["backing-missing"] = True
    data["backing-error"] = str(error)
    return info


def chain_infos(
    path: str, fmt: Optional[str] = None, force_share: bool = False, whole_chain: bool = False
) -> list[Info]:
    """[info of the image] or, with whole_chain, the infos of it and every base below."""
    infos: list[Info] = []
    seen: set[str] = set()
    while path is not None:
        real = os.path.realpath(path)
        if real in seen:
            raise BaseImageError(f"{path}: backing chain loop")
        seen.add(real)
        info = layer_info(path, fmt, force_share)
        infos.append(info)
        missing = info.get("format-specific", {}).get("data", {}).get("backing-missing")
        if not whole_chain or missing or "full-backing-filename" not in info:
            break
        path = info["full-backing-filename"]
        fmt = info.get("backing-filename-format") or None
        force_share = True  # lower layers are read-only bases
    return infos


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.3g} PiB"


def info_text(info: Info, snapshot_table: Callable[[list[dict[str, Any]]], str]) -> str:
    """`qemu-img info` human output, with fvd's facts listed as format-specific."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {human(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {human(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    data = info.get("format-specific", {}).get("data", {})
    if "backing-filename" in info:
        missing = " (missing)" if data.get("backing-missing") else ""
        lines.append(f"backing file: {info['backing-filename']}{missing}")
        if info.get("full-backing-filename") != info["backing-filename"]:
            lines.append(f"backing file: {info['full-backing-filename']} (actual path)")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(snapshot_table(info["snapshots"]))
    if data:
        lines.append("Format specific information:")
        for key, value in data.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            lines.append(f"    {key.replace('-', ' ')}: {value}")
    return "\n".join(lines)


# ----- check ---------------------------------------------------------------------------
def check_image_path(
    path: str, fmt: Optional[str], repair: bool, force_share: bool
) -> tuple[CheckResult, dict[str, int]]:
    """(result, facts) of a check; facts are qemu-img check's cluster counts. Raises
    when the check cannot run at all (locked, not an image, I/O error)."""
    f = resolve_format(path, fmt)
    if f == "raw":
        raise FvdError(f"{path}: raw images cannot be checked (no metadata)")
    if f == "qcow2":
        return _check_qcow2(path, repair)
    mode = "r+" if repair else "r"
    with Image(path, mode, force_share=force_share, _for_check=True) as img:
        result = img.check(repair)
        info = img.info()
        facts = {
            "image-end-offset": info["image-end-offset"],
            "total-clusters": info["total-chunks"],
            "allocated-clusters": info["allocated-chunks"],
        }
    if repair:
        verify_reopen(path, result)  # success only if it reopens and checks clean
    return result, facts


def _check_qcow2(path: str, repair: bool) -> tuple[CheckResult, dict[str, int]]:

    with qcow2.open(path, "r+" if repair else "r") as q:
        result = q.check(repair)
        allocated = sum(
            -(-e.length // q.cluster_size) for e in q.extents() if e.data and e.depth == 0
        )
        facts = {
            "image-end-offset": q.image_end_offset,
            "total-clusters": int(np.ceil(q.size / q.cluster_size)),
            "allocated-clusters": allocated,
        }
    result.messages = list(result.messages)
    return result, facts


def check_json(path: str, fmt: str, result: CheckResult, facts: dict[str, int]) -> dict[str, Any]:
    return {
        "filename": path,
        "format": fmt,
        "check-errors": 0,
        "corruptions": result.corruptions,
        "leaks": result.leaks,
        "corruptions-fixed": result.corruptions_fixed,
        "leaks-fixed": result.leaks_fixed,
        **facts,
        "ok": result.ok,
        "messages": list(result.messages or []),
    }


def corrupt_check_json(path: str, fmt: str, error: BaseException) -> dict[str, Any]:
    """A check of an image too damaged to open: one corruption, no cluster counts."""
    return {
        "filename": path,
        "format": fmt,
        "check-errors": 0,
        "corruptions": 1,
        "leaks": 0,
        "corruptions-fixed": 0,
        "leaks-fixed": 0,
        "ok": False,
        "messages": [str(error)],
    }


def is_corrupt(error: BaseException) -> bool:
    return isinstance(error, CorruptImageError)


# ----- progress ---------------------------------------------------------------------------
def qemu_progress(stream: Optional[TextIO] = None) -> Callable[[int, int], None]:
    """A progress(done, total) callback printing qemu-img's "    (12.34/100%)" lines
    (carriage return, no newline: call progress_done() at the end)."""
    stream = stream or sys.stderr
    state = {"last": -1.0}

    def show(done: int, total: int) -> None:
        pct = 100.0 if total <= 0 else min(100.0, 100.0 * done / total)
        if pct - state["last"] >= 1.0 or (pct == 100.0 and state["last"] != 100.0):
            state["last"] = pct
            stream.write(f"    ({pct:.2f}/100%)\r")
            stream.flush()

    return show


def json_progress(description: str, stream: Optional[TextIO] = None) -> Callable[[int, int], None]:
    """A progress(done, total) callback printing one JSON object per line, in whole
    percent steps, with ovirt-img's keys: {"transferred": bytes done, "elapsed":
    seconds, "description": what is done, "size": bytes in all, "percent": 0..100}."""
    stream = stream or sys.stdout
    start = time.monotonic()
    state = {"last": -1}

    def show(done: int, total: int) -> None:
        pct = 100 if total <= 0 else min(100, 100 * done // total)
        if pct > state["last"]:
            state["last"] = pct
            line = {
                "transferred": done,
                "elapsed": round(time.monotonic() - start, 6),
                "description": description,
                "size": total,
                "percent": pct,
            }
            stream.write(json.dumps(line) + "\n")
            stream.flush()

    return show


def progress_done(stream: Optional[TextIO] = None) -> None:
    stream = stream or sys.stderr
    stream.write("\n")
    stream.flush()


def changed_dicts(img: AnyImage, since: str, until: Optional[str] = None) -> list[dict[str, Any]]:
    """`map --since`: ranges changed between snapshots, as qemu-img map dicts."""

    return [
        {
            "start": r.start,
            "length": r.length,
            "depth": 0,
            "present": True,
            "zero": r.zero,
            "data": not r.zero,
        }
        for r in changed_ranges(img, since, until)
    ]
