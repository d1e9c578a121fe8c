"""Progress bars for long jobs (convert, verify, batch, ...), all drawn by tqdm.

On a terminal a bar is redrawn in place. Anywhere else (a log file, CI, a pipe) tqdm's
carriage-return redraws would pile up on one line, so each redraw becomes one line of its own
and callers redraw rarely (every 10 s by default).

Sits beside errors.py at the bottom of the package: the converter and the front ends use it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

# How often a bar that does not go to a terminal prints a line.
LOG_INTERVAL_S = 10.0


def is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Lines:
    """A file for tqdm that turns each `\\r` redraw into a line (for streams that are not ttys)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> None:
        for part in s.replace("\r", "\n").split("\n"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Bar(tqdm):
    """tqdm with a `status` field for bar formats (`{status}`), set by the caller."""

    status = ""

    @property
    def format_dict(self) -> dict[str, Any]:
        d = super().format_dict
        d["status"] = self.status
        return d


def progress_bar(
    total: int | None,
    desc: str,
    *,
    enabled: bool = True,
    stream: TextIO | None = None,
    in_bytes: bool = False,
    **kwargs: Any,
) -> Bar:
    """A bar on `stream` (default stderr). `in_bytes` counts bytes (KiB, MiB, ... per second).

    Off a terminal it prints a line at most every LOG_INTERVAL_S seconds."""
    stream = stream if stream is not None else sys.stderr
    tty = is_tty(stream)
    opts: dict[str, Any] = {"desc": desc, "total": total, "disable": not enabled}
    if in_bytes:
        opts.update(unit="B", unit_scale=True, unit_divisor=1024)
    if tty:
        opts.update(file=stream, dynamic_ncols=True)
    else:
        opts.update(file=_Lines(stream), mininterval=LOG_INTERVAL_S, ncols=100)
    opts.update(kwargs)
    return Bar(**opts)


class LiveBar:
    """A bar redrawn from `state()` by a background thread: for jobs whose progress moves while
    the caller is blocked (a batch of long generations). Twice a second on a terminal, every
    LOG_INTERVAL_S seconds elsewhere.

    `state()` returns (count done, status text shown after the count)."""

    def __init__(
        self,
        stream: TextIO,
        total: int | None,
        state: Callable[[], tuple[int, str]],
        bar_format: str,
        unknown_total_format: str,
    ):
        self.state = state
        self.bar = progress_bar(
            total,
            "",
            stream=stream,
            bar_format=bar_format if total else unknown_total_format,
            ascii=".#",
            mininterval=float("inf"),  # only our thread redraws
        )
        self._period = 0.5 if is_tty(stream) else LOG_INTERVAL_S
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(self._period):
            self.draw()

    def draw(self) -> None:
        done, status = self.state()
        with self._lock:
            self.bar.n = done
            self.bar.status = status
            self.bar.refresh()

    def close(self) -> None:
        """Stop the thread, draw the final state, end the line."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.draw()
        self.bar.close()
