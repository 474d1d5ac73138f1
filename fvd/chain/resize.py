"""`fvd resize`: any format by file name."""

from __future__ import annotations

import os
from typing import Optional

from fvd.imageio import open_image
from fvd.types import StrPath


def resize(
    image: StrPath, size: int, *, shrink: bool = False, image_format: Optional[str] = None
) -> None:
    """Resize an image file of any format (raw: truncate, refusing to cut data)."""
    with open_image(os.fspath(image), image_format, "r+") as img:
        img.resize(size, shrink=shrink)
