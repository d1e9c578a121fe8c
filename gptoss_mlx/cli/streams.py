"""The commands' standard streams: text in as UTF-8 whatever the locale says, and output that
cannot be written as one line instead of a traceback.

Input: Python decodes stdin with the locale's error handler (strict under
`PYTHONIOENCODING=utf-8:strict`, the usual macOS setting, where a stray byte raises
UnicodeDecodeError mid-read; surrogateescape elsewhere, where it turns into a lone surrogate that
only fails later, when the text is encoded to save or tokenize). So stdin is read as bytes and
decoded here, and text from argv or a terminal is checked for those surrogates: either way a byte
that is not UTF-8 is refused where it comes in, as batch refuses such a line.

Output: a write to stdout can fail (a full disk, /dev/full, a closed descriptor). `echo` and
`guard_stdout` turn that into OutputError naming stdout; `handle_errors` prints it and points
stdout at /dev/null so that the interpreter's last flush cannot fail again.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from ..errors import OutputError, UsageError


def not_utf8(raw: bytes, error: UnicodeDecodeError) -> str:
    """`not valid UTF-8 (byte 0xff at offset 3)`: batch's wording for the same fault."""
    return f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at offset {error.start})"


def decode(raw: bytes | str, what: str) -> str:
    """`raw` as UTF-8 text; UsageError `WHAT: not valid UTF-8 (...)` otherwise. A str is checked
    with `check_text` (a text stream a test or a library caller passes in)."""
    if isinstance(raw, str):
        return check_text(raw, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what}: {not_utf8(raw, e)}") from None


def check_text(text: str, what: str) -> str:
    """`text` if it can be written as UTF-8; else UsageError naming `what` and the first bad
    character: a byte that was not UTF-8 (decoded with surrogateescape, as argv always is) or an
    unpaired surrogate."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
            why = f"not valid UTF-8 (byte 0x{code - 0xDC00:02x} at character {e.start})"
        else:
            why = f"an unpaired surrogate (\\u{code:04x}) at character {e.start}"
        raise UsageError(f"{what}: {why}") from None


def read_stdin_text() -> str:
    """All of stdin as UTF-8 text (read as bytes: never a UnicodeDecodeError traceback)."""
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    return decode(stream.read(), "stdin")


def require_stdout() -> None:
    """UsageError when stdout is closed (`>&-`): the command would have nowhere to write."""
    if sys.stdout is None:
        raise UsageError(
            "stdout is closed, so there is nowhere to write the output; "
            "redirect it to a file or /dev/null instead"
        )


def stdout_error(e: OSError) -> OutputError:
    return OutputError(f"stdout: cannot write the output ({e.strerror or e})", stdout=True)


@contextmanager
def guard_stdout() -> Iterator[None]:
    """Within it, an OSError is a failed write to stdout: OutputError (BrokenPipeError, the reader
    leaving, passes through: `handle_errors` ends quietly on it)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise stdout_error(e) from None


def echo(message: Any = "", **kwargs: Any) -> None:
    """click.echo to stdout, a failed write raised as OutputError."""
    with guard_stdout():
        click.echo(message, **kwargs)
