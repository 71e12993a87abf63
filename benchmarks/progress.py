"""A progress bar on stderr, with no dependency.

On a terminal it redraws one line; otherwise (CI logs, a captured pipe) it prints a line each
time another tenth of the work is done, so a log shows progress without thousands of lines.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts finished units of work and shows them, with the elapsed time and an estimate."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(1, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.started = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_tenth = -1

    def advance(self, label: str, units: int = 1) -> None:
        self.done = min(self.total, self.done + units)
        self.show(label)

    def show(self, label: str) -> None:
        fraction = self.done / self.total
        elapsed = time.monotonic() - self.started
        eta = elapsed / fraction - elapsed if fraction > 0 else float("nan")
        filled = round(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        eta_text = f"{eta:4.0f}s left" if fraction > 0 and fraction < 1 else "        "
        text = (f"[{bar}] {self.done:>4}/{self.total} {elapsed:5.0f}s {eta_text}  "
                f"{label[:60]}")
        if self.tty:
            self.stream.write("\r" + text.ljust(120)[:120])
            self.stream.flush()
            return
        tenth = int(fraction * 10)
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self, message: str = "") -> None:
        if self.tty:
            self.stream.write("\n")
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
