"""The chain of backing files of an image, and what the chain operations share:
reading a layer's file, byte comparison."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from fvd.errors import ChainError
from fvd.fileio import resolve_relative
from fvd.image import Image
from fvd.imageio import AnyImage, RawImage, open_image, probe, resolve_format
from fvd.nbd_client import is_nbd_uri
from fvd.qcow2 import Qcow2Image
from fvd.types import StrPath
from fvd.units import MiB

BUFFER = MiB
Progress = Optional[Callable[[int, int], None]]


@dataclass(frozen=True)
class Layer:
    """One file of a backing chain: its path (resolved), its format, and its name as the
    layer above stores it (relative names stay relative when a header is rewritten)."""

    path: str
    format: str
    stored_name: str = ""  # the name the layer above stores for it


def backing_of(img: AnyImage) -> Optional[Layer]:
    """The backing file of an open image as its header names it, or None."""
    if isinstance(img, RawImage):
        return None
    info = img.info() if isinstance(img, Image) else _qcow2_backing(img)
    full = info.get("full-backing-filename")
    if not full:
        return None
    return Layer(
        str(full),
        str(info.get("backing-filename-format") or probe(full)),
        str(info.get("backing-filename", full)),
    )


def _qcow2_backing(q: Qcow2Image) -> dict[str, Any]:
    if not q.backing_file:
        return {}
    return {
        "full-backing-filename": resolve_relative(q.path, q.backing_file),
        "backing-filename": q.backing_file,
        "backing-filename-format": q.backing_format,
    }


def chain_of(path: StrPath, format: Optional[str] = None) -> list[Layer]:
    """The layers from `path` down to the bottom, top first."""
    layers = [Layer(os.fspath(path), resolve_format(path, format))]
    seen = {os.path.realpath(layers[0].path)}
    while True:
        with open_image(layers[-1].path, layers[-1].format) as img:
            below = backing_of(img)
        if below is None:
            return layers
        if is_nbd_uri(below.path):  # a remote raw base: the bottom, not a file
            return layers + [Layer(below.path, "raw", below.stored_name)]
        real = os.path.realpath(below.path)
        if real in seen:
            raise ChainError(f"{below.path}: backing chain loops")
        seen.add(real)
        layers.append(below)


def lock_shared(path: str) -> int:
    """A read-only fd holding a shared lock: no writer can change the layer meanwhile."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ChainError(f"{path}: image is open for writing elsewhere") from None
    return fd


def layers_of_open(img: Union[Image, Qcow2Image]) -> list[Layer]:
    """The files of an open image's chain, top first (as its extents' depths count)."""
    layers = [Layer(img.path, "")]
    below = backing_of(img)
    while below is not None and not is_nbd_uri(below.path):  # NBD: read through the image
        layers.append(below)
        if below.format == "raw":
            break
        with open_image(below.path, below.format) as lower:
            below = backing_of(lower)
    return layers


def read_padded(img: AnyImage, pos: int, mv: memoryview) -> None:
    """Read `img` at pos; bytes past its end read as zeros (a shorter backing file)."""
    n = max(0, min(len(mv), img.size - pos))
    if n:
        img.readinto(pos, mv[:n])
    mv[n:] = bytes(len(mv) - n)


def same_bytes(a: bytearray, b: bytearray, n: int) -> bool:
    """The first n bytes equal. A whole bytearray compares with memcmp; a part through
    numpy views in 8-byte words (a memoryview compares byte by byte, ~300x slower, and
    slicing copies)."""
    if n == len(a) == len(b):
        return a == b
    dtype = np.uint64 if n % 8 == 0 else np.uint8
    count = n // np.dtype(dtype).itemsize
    x = np.frombuffer(a, dtype=dtype, count=count)
    return bool(np.array_equal(x, np.frombuffer(b, dtype=dtype, count=count)))
