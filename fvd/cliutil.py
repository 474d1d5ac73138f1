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
from fvd.backupinfo import backup_info
from fvd.control import ControlClient, find_server
from fvd.convert import changed_ranges
from fvd.errors import BaseImageError, CorruptImageError, FvdError, ImageLockedError
from fvd.fileio import AnyPolicy, BackingPolicy, open_disk_file
from fvd.image import Image, verify_reopen
from fvd.imageio import AnyImage, RawImage, open_image, resolve_format
from fvd.nbd_client import is_nbd_uri
from fvd.ops.info import qcow2_info
from fvd.types import CheckResult

Info = dict[str, Any]  # `qemu-img info --output=json` of one image


def open_args(args: argparse.Namespace, mode: str = "r", image: Optional[str] = None) -> AnyImage:
    """The image named by args (args.image), in the format of -f (probed when absent)."""
    return open_image(
        image or args.image,
        getattr(args, "fmt", None),
        mode,
        force_share=getattr(args, "force_share", False),
        backing=getattr(args, "backing_policy", "any"),
    )


# ----- info --------------------------------------------------------------------------
def layer_info(path: str, fmt: Optional[str] = None, force_share: bool = False) -> Info:
    """qemu-img info of one image, opened alone: its backing file is never opened (the
    chain is walked by chain_infos, as the backing policy allows); with what it holds as
    a backup ("backup" under format-specific, fvd.backupinfo)."""
    info = _layer_info(path, fmt, force_share)
    held = backup_info(path, info["format"])
    if held is not None:
        data = info.setdefault("format-specific", {"type": info["format"], "data": {}})["data"]
        data["backup"] = held.as_dict()
    return info


def _layer_info(path: str, fmt: Optional[str], force_share: bool) -> Info:
    f = resolve_format(path, fmt)
    if f == "fvd":
        with Image(path, "r", force_share=force_share, _skip_base=True) as img:
            return img.info()
    if f == "qcow2":
        with qcow2.Qcow2Image(path, "r", _skip_backing=True) as q:
            return qcow2_info(q)
    with RawImage(path) as r:
        return r.info()


def _mark(info: Info, flag: str, error: BaseException) -> None:
    """`flag` ("backing-missing" or "backing-refused") and why, under format-specific."""
    data = info.setdefault("format-specific", {"type": info["format"], "data": {}})["data"]
    data[flag] = True
    data["backing-error"] = str(error)


CHAIN_KEYS = (
    "filename",
    "format",
    "virtual-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
)


def chain_infos(
    path: str,
    fmt: Optional[str] = None,
    force_share: bool = False,
    whole_chain: bool = False,
    backing: AnyPolicy = "any",
) -> list[Info]:
    """[info of the image] or, with whole_chain, the infos of it and every base below.
    Each layer is opened alone, header only, and only if the backing policy allows it
    (nothing is read through a chain to describe it); the first info also lists the
    chain's names under "backing-chain". A layer whose backing file is refused or
    missing says so ("backing-refused" / "backing-missing" under format-specific)."""
    policy = BackingPolicy.of(backing, path)
    infos: list[Info] = []
    seen: set[str] = set()
    while True:
        seen.add(os.path.realpath(path))
        upper = infos[-1]["filename"] if infos else None
        info = layer_info(path, fmt, force_share) if upper is None else _lower(path, fmt, upper)
        infos.append(info)
        nxt = info.get("full-backing-filename")
        if nxt is None:
            break
        try:
            policy.admit(path, nxt)
        except BaseImageError as e:
            _mark(info, "backing-refused", e)
            break
        if is_nbd_uri(nxt) or info.get("base-prefetched"):
            break  # an NBD export has no header to show; a prefetched base is not read
        if os.path.realpath(nxt) in seen:
            raise BaseImageError(f"{nxt}: backing chain loop")
        fmt = info.get("backing-filename-format") or None
        path = nxt
    if len(infos) > 1 and "error" in infos[-1]:
        _mark(infos[-2], "backing-missing", infos.pop()["error"])
    infos[0]["backing-chain"] = [{k: i[k] for k in CHAIN_KEYS if k in i} for i in infos]
    return infos if whole_chain else infos[:1]


def _lower(path: str, fmt: Optional[str], upper: str) -> Info:
    """A base's info (read-only, beside any writer), or {"error": why it cannot be had}."""
    try:
        os.close(open_disk_file(path, backing_of=upper))  # special files: a clear error
        return layer_info(path, fmt, force_share=True)
    except BaseImageError as e:
        return {"error": e}
    except (OSError, FvdError) as e:
        return {"error": BaseImageError(f"{path}: cannot open backing file of {upper}: {e}")}


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
        lines += _data_lines(data, "    ")
    return "\n".join(lines)


def _data_lines(data: dict[str, Any], indent: str) -> list[str]:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key.replace('-', ' ')}:")
            lines += _data_lines(value, indent + "    ")
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        lines.append(f"{indent}{key.replace('-', ' ')}: {value}")
    return lines


# ----- check ---------------------------------------------------------------------------
def check_image_path(
    path: str, fmt: Optional[str], repair: bool, force_share: bool, backing: AnyPolicy = "any"
) -> tuple[CheckResult, dict[str, int]]:
    """(result, facts) of a check; facts are qemu-img check's cluster counts. Raises
    when the check cannot run at all (locked, not an image, I/O error)."""
    f = resolve_format(path, fmt)
    if f == "raw":
        raise FvdError(f"{path}: raw images cannot be checked (no metadata)")
    if f == "qcow2":
        return _check_qcow2(path, repair, backing)
    mode = "r+" if repair else "r"
    with Image(path, mode, force_share=force_share, backing=backing, _for_check=True) as img:
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


def _check_qcow2(path: str, repair: bool, backing: AnyPolicy) -> tuple[CheckResult, dict[str, int]]:
    with qcow2.open(path, "r+" if repair else "r", backing=backing) as q:
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
    return [change_dict(r.start, r.length, r.zero) for r in changed_ranges(img, since, until)]


def served_check(path: str, error: ImageLockedError) -> tuple[CheckResult, dict[str, int]]:
    """A read-only check through the control socket of the fvd serve holding `path`."""
    with served(path, error, "check") as client:
        result = client.check()
        info = client.info()
    data = info["format-specific"]["data"]
    facts = {
        "image-end-offset": data["image-end-offset"],
        "total-clusters": data["total-chunks"],
        "allocated-clusters": data["allocated-chunks"],
    }
    return result, facts


def change_dict(start: int, length: int, zero: bool) -> dict[str, Any]:
    """One changed range as a qemu-img map dict."""
    return {
        "start": start,
        "length": length,
        "depth": 0,
        "present": True,
        "zero": zero,
        "data": not zero,
    }


# ----- an image held by `fvd serve` ------------------------------------------------------
def served(path: str, error: ImageLockedError, command: str) -> ControlClient:
    """A client of the control socket of the `fvd serve` that holds `path` (after a
    one-line note on stderr); re-raises `error` when no server listens there."""
    sock = find_server(path)
    if sock is None:
        raise error
    client = ControlClient(sock)
    print(
        f"fvd {command}: {path} is held by fvd serve: going through its control socket {sock}",
        file=sys.stderr,
        flush=True,
    )
    return client
