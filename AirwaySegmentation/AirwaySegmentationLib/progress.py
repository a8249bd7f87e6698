"""Progress reporting and cancellation for long work.

Long-running functions take ``progress: ProgressCallback | None``, a callable
``progress(fraction, message)`` with ``fraction`` in [0, 1].  The CLI passes a
:class:`TextProgressBar`; the Slicer modules pass a callback that moves their progress bar.
A callback may raise :class:`Cancelled` to stop the work between steps.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

ProgressCallback = Callable[[float, str], None]


class Cancelled(RuntimeError):
    """Raised (usually by a progress callback) to stop long work; nothing partial is written."""


def report(progress: Optional[ProgressCallback], fraction: float, message: str) -> None:
    """Call ``progress`` if given, with ``fraction`` clipped to [0, 1]."""
    if progress is not None:
        progress(min(1.0, max(0.0, float(fraction))), message)


def sub_progress(progress: Optional[ProgressCallback], start: float, stop: float) -> Optional[ProgressCallback]:
    """A callback that maps [0, 1] of a sub-task onto [start, stop] of ``progress``."""
    if progress is None:
        return None
    return lambda fraction, message: report(progress, start + (stop - start) * fraction, message)


class TextProgressBar:
    """A one-line progress bar on a terminal stream (plain lines when the stream is not a terminal).

    Examples
    --------
    >>> bar = TextProgressBar(stream=sys.stdout, interactive=False)
    >>> bar(0.5, "rendering")  # doctest: +ELLIPSIS
    [ 50%] rendering (...s)
    """

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30, interactive: bool | None = None) -> None:
        self.stream = stream
        self.width = width
        self.interactive = stream.isatty() if interactive is None else interactive
        self.start = time.perf_counter()
        self._last_message = ""

    def __call__(self, fraction: float, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        if self.interactive:
            filled = int(round(fraction * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {fraction * 100:5.1f}% {message[:60]:<60} {elapsed:6.1f}s")
            if fraction >= 1.0:
                self.stream.write("\n")
        elif message != self._last_message or fraction >= 1.0:
            self.stream.write(f"[{fraction * 100:3.0f}%] {message} ({elapsed:.1f}s)\n")
        self._last_message = message
        self.stream.flush()
