"""Progress of `fvd bench`, on stderr so stdout carries only the report (text, JSON,
markdown).

On a terminal: one line rewritten in place (`\\r`), cut to the terminal's width and
cleared when the run ends. Otherwise (a log, a pipe): one plain line per measured cell.
"""

from __future__ import annotations

import shutil
import sys
from typing import Optional, TextIO


class Progress:
    def __init__(
        self, stream: Optional[TextIO] = None, tty: Optional[bool] = None, enabled: bool = True
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self.enabled = enabled
        self._shown = 0  # characters of the in-place line now on screen

    def _width(self) -> int:
        return shutil.get_terminal_size((100, 24)).columns

    def update(self, text: str) -> None:
        """A cell measured (or about to be): in place on a terminal, a line otherwise."""
        if not self.enabled:
            return
        if not self.tty:
            self.stream.write(text + "\n")
        else:
            text = text[: max(self._width() - 1, 10)]
            pad = " " * max(self._shown - len(text), 0)
            self.stream.write("\r" + text + pad)
            self._shown = len(text)
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that stays (an error, a note), printed above the in-place line."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Remove the in-place line (the run is over, or a message follows)."""
        if self.tty and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
        self._shown = 0
