"""Image openers by format name (the `fvd.registry` layer, docs/architecture.md).

Lets a lower layer open an image whose module sits above it without importing upward:
an fvd base image of an fvd image (fvd.features.base) or an fvd backing file of a qcow2
image (fvd.qcow2). `fvd.image` registers "fvd" and `fvd.qcow2` registers "qcow2" when
they are imported; importing `fvd` imports both.
"""

from __future__ import annotations

from typing import Any, Callable

from fvd.errors import UnsupportedFeatureError

_openers: dict[str, Callable[..., Any]] = {}


def register(fmt: str, opener: Callable[..., Any]) -> None:
    """`opener(path, mode, **options)` opens an image of format `fmt`."""
    _openers[fmt] = opener


def open_image(fmt: str, path: str, mode: str = "r", **options: Any) -> Any:
    """Open `path` as an image of format `fmt` with the registered opener."""
    try:
        opener = _openers[fmt]
    except KeyError:
        raise UnsupportedFeatureError(f"{path}: no opener for image format {fmt!r}") from None
    return opener(path, mode, **options)
