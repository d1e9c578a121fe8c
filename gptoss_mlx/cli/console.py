"""Terminal output for streaming turns: the answer on stdout, reasoning dim on stderr."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from ..engine.chat import TurnEvent
from .streams import guard_stdout

DIM, RESET = "\x1b[2m", "\x1b[0m"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class TurnPrinter:
    """Prints a turn's events as they stream.

    The final answer goes to `out` plain; reasoning and preambles go to `err`, dimmed when it is a
    terminal, or nowhere when `show_reasoning` is off. Tool calls are shown on `err` so that
    stdout stays the answer alone (scripts can pipe it).
    """

    def __init__(
        self,
        show_reasoning: bool = True,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.show_reasoning = show_reasoning
        self.dim = _is_tty(self.err)
        self._kind: str | None = None

    def _side(self, text: str) -> None:
        if self.dim:
            text = f"{DIM}{text}{RESET}"
        self.err.write(text)
        self.err.flush()

    def __call__(self, ev: TurnEvent) -> None:
        if ev.kind != self._kind:
            self._switch(ev.kind)
        if ev.kind in ("reasoning", "preamble"):
            if self.show_reasoning:
                self._side(ev.text)
        elif ev.kind == "tool_call":
            call = ev.tool_call or {}
            self._side(f"[tool call] {call.get('name')}({call.get('arguments')})\n")
        elif ev.kind == "refused_call":
            call = ev.tool_call or {}
            self._side(f"[not available: {call.get('name')}({call.get('arguments')}); not run]\n")
        elif ev.kind == "unfinished_call":
            call = ev.tool_call or {}
            self._side(
                f"[tool call cut off: {call.get('name')}({call.get('arguments')}; not run]\n"
            )
        else:  # final, and anything unusual: shown, never dropped
            self._write(ev.text)

    def _write(self, text: str) -> None:
        with guard_stdout():  # a full disk or /dev/full: one line (OutputError), no traceback
            self.out.write(text)
            self.out.flush()

    def _switch(self, kind: str) -> None:
        prev, self._kind = self._kind, kind
        if prev in ("reasoning", "preamble") and self.show_reasoning:
            self._side("\n")
        if kind == "reasoning" and self.show_reasoning:
            self._side("[reasoning] ")

    def end(self) -> None:
        """Close the turn's output with a newline on the stream that was last written."""
        if self._kind in ("final", "other"):
            self._write("\n")
        elif self._kind in ("reasoning", "preamble") and self.show_reasoning:
            self._side("\n")
        self._kind = None


def load_tools_file(path: str) -> list[dict]:
    """Read a JSON file of OpenAI function tools (a list, or {"tools": [...]})."""
    from ..errors import UsageError

    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: not found") from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurd nesting
        raise UsageError(f"{path}: not a JSON tools file ({e})") from None
    if isinstance(obj, dict):
        obj = obj.get("tools")
    if not isinstance(obj, list):
        raise UsageError(f'{path}: expected a JSON list of function tools (or {{"tools": [...]}})')
    return obj
