"""The files of `gptoss-mlx batch`: the input read line by line, the output planned, written
and repaired, and the progress shown on stderr.

Each output record is one write followed by a flush, so a killed run leaves whole records plus at
most one partial last line. Resuming cuts that fragment off, keeps the result records (their ids
are skipped) and drops the error records, so those lines run again: the file is then rewritten
beside itself and renamed over it, so a crash during the repair loses nothing either. Nothing on
disk changes before `OutputPlan.open`, which the command calls once the model has loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from ..errors import OutputError, UsageError
from ..progress import LiveBar

# No prompt that fits gpt-oss's 131k-token context comes near 1 MiB of text; a longer line is
# refused without being held in memory.
MAX_LINE_BYTES = 1 << 20
FSYNC_EVERY = 32  # records between fsyncs (each record is flushed to the OS at once)
BOM = b"\xef\xbb\xbf"


def id_key(value: Any) -> str:
    """How ids are compared: 7 and "7" are different ids."""
    return json.dumps(value)


# --------------------------------------------------------------------------- reading lines


@dataclass(frozen=True)
class InputLine:
    """One non-blank input line: its decoded text (line ending removed), or why it is unusable."""

    number: int  # 1-based, blank lines counted
    text: str | None
    error: str | None = None


def read_lines(stream: BinaryIO, max_bytes: int = MAX_LINE_BYTES) -> Iterator[InputLine]:
    """Split a byte stream into lines; never raises on content (only on I/O errors)."""
    number = 0
    # The first read has room for a BOM, which does not count toward the limit.
    while raw := stream.readline(max_bytes + 1 + (len(BOM) if number == 0 else 0)):
        number += 1
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        if len(raw) > max_bytes:  # over the limit, newline or not: drop the rest of it unread
            while not raw.endswith(b"\n") and (raw := stream.readline(1 << 16)):
                pass
            yield InputLine(number, None, f"line longer than {max_bytes} bytes (the limit)")
            continue
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield InputLine(
                number, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at {e.start})"
            )
            continue
        if text.strip():
            yield InputLine(number, text)


def count_lines(path: str | Path) -> int | None:
    """Non-blank lines in a regular file (the progress bar's total, the most prompts a run can
    batch); None for anything else (stdin, a FIFO: counting would consume it)."""
    path = Path(path).expanduser()
    if str(path) == "-" or not path.is_file():
        return None
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip() not in (b"", BOM))


# --------------------------------------------------------------------------- the output


@dataclass
class OutputPlan:
    """What to do with the output, decided (and checked) before the model loads; nothing is
    changed on disk until `open`."""

    path: Path | None  # None: stdout
    mode: str = "new"  # "new", "overwrite", "resume" or "stream" (a FIFO or device)
    done: set[str] = field(default_factory=set)  # id_key of every id with a result record
    kept: int = 0  # result records kept on resume
    dropped_errors: int = 0  # error records dropped on resume (their lines run again)
    partial_bytes: int = 0  # bytes of a partial last line cut off on resume
    keep_until: int = 0  # byte length of the part of the file to keep

    def notes(self) -> list[str]:
        """What resuming will do, for stderr."""
        if self.mode != "resume":
            return []
        out = [f"resume: {self.kept} records already in {self.path}, skipping their ids"]
        if self.dropped_errors:
            out.append(f"resume: retrying {self.dropped_errors} lines that failed before")
        if self.partial_bytes:
            out.append(
                f"resume: removed a partial last line ({self.partial_bytes} bytes) left by an "
                "interrupted run"
            )
        return out

    def open(self) -> RecordWriter:
        """Apply the plan (truncate, repair or create the file) and return its writer."""
        if self.path is None:
            return RecordWriter(sys.stdout.buffer, "stdout", close=False)
        try:
            if self.mode == "resume" and self.dropped_errors:
                _rewrite_results(self.path, self.keep_until)
            elif self.mode == "resume" and self.partial_bytes:
                os.truncate(self.path, self.keep_until)
            # "x" refuses a file that appeared since the check; "a" keeps resumed records.
            mode = {"new": "xb", "overwrite": "wb", "resume": "ab", "stream": "wb"}[self.mode]
            return RecordWriter(open(self.path, mode), str(self.path))  # noqa: SIM115
        except FileExistsError:
            raise UsageError(f"{self.path}: exists; pass --resume or --overwrite") from None
        except OSError as e:
            raise UsageError(f"{self.path}: cannot write ({e.strerror})") from None


def plan_output(
    output: str | None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    input_path: str | None = None,
) -> OutputPlan:
    """Check the output policy: an existing file needs `resume` or `overwrite` (UsageError)."""
    if overwrite and resume:
        raise UsageError("--overwrite and --resume exclude each other")
    if output in (None, "-"):
        if resume:
            raise UsageError("--resume needs an output file (-o FILE): stdout cannot be read back")
        return OutputPlan(None)
    path = Path(output).expanduser()
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; -o takes a file")
    if not path.exists():
        if not path.parent.is_dir():
            raise UsageError(f"{path}: the folder {path.parent} does not exist")
        return OutputPlan(path, "new")
    if input_path not in (None, "-") and os.path.samefile(path, input_path):
        raise UsageError(f"{path}: is also the input; write the output to another file")
    if not path.is_file():  # /dev/null, /dev/stdout on a pipe or terminal, a FIFO
        if resume:
            raise UsageError(f"{path}: is not a regular file, so --resume cannot read it back")
        return OutputPlan(path, "stream")  # nothing on disk to replace: no --overwrite needed
    if overwrite:
        return OutputPlan(path, "overwrite")
    if not resume:
        raise UsageError(f"{path}: exists; pass --resume to finish it or --overwrite to replace it")
    return _scan_previous(path)


def _scan_previous(path: Path) -> OutputPlan:
    plan = OutputPlan(path, "resume")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    end = len(data)
    if data and not data.endswith(b"\n"):
        # The one write of a record was cut short by a kill: drop the fragment.
        end = data.rfind(b"\n") + 1
        plan.partial_bytes = len(data) - end
    plan.keep_until = end
    for number, raw in enumerate(data[:end].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError):
            rec = None
        if not isinstance(rec, dict) or "id" not in rec:
            raise UsageError(
                f"{path}: line {number} is not a batch record; not resuming into it "
                "(pass --overwrite to start again, or -o another file)"
            )
        if "error" in rec:
            plan.dropped_errors += 1
        else:
            plan.kept += 1
            plan.done.add(id_key(rec["id"]))
    return plan


def _rewrite_results(path: Path, length: int) -> None:
    """Rewrite `path` with only its result records (first `length` bytes), atomically."""
    tmp = path.with_name(f".{path.name}.resume-tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for raw in src.read(length).splitlines(keepends=True):
            if raw.strip() and "error" not in json.loads(raw):
                dst.write(raw)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


class RecordWriter:
    """Writes records as JSON lines to `stream` (`name` in messages: "stdout" or the path): one
    write and a flush each, an fsync every `FSYNC_EVERY` when the stream is a regular file (a
    pipe, FIFO or device has nothing to sync, and fsync fails on it with EINVAL).

    A failed write raises OutputError and ends the run: exit 130 when stdout's reader left
    (`batch ... | head`: as if interrupted), 1 for anything else (a full disk). What was written
    stays; a partial last line in a file is what `--resume` repairs."""

    def __init__(self, stream: BinaryIO, name: str, *, close: bool = True):
        self.stream = stream
        self.name = name
        self.owns = close
        self.written = 0
        self.failed = False
        try:
            self.fsync = stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
        except (OSError, ValueError, AttributeError):  # no descriptor (a test's BytesIO)
            self.fsync = False

    def _fail(self, e: OSError) -> OutputError:
        self.failed = True
        done = f"after {self.written} record{'' if self.written == 1 else 's'}"
        stdout = self.name == "stdout"
        if isinstance(e, BrokenPipeError):
            return OutputError(
                f"{self.name}: its reader closed it {done}; stopped", stdout=stdout, exit_code=130
            )
        kept = "" if stdout else "; the records written so far are kept"
        return OutputError(f"{self.name}: cannot write ({e.strerror}) {done}{kept}", stdout=stdout)

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self.stream.write(data)
            self.stream.flush()
            if self.fsync and (self.written + 1) % FSYNC_EVERY == 0:
                os.fsync(self.stream.fileno())
        except OSError as e:
            raise self._fail(e) from None
        self.written += 1

    def close(self) -> None:
        """Flush and sync what is left; after a failed write only release the stream."""
        try:
            if not self.failed:
                self.stream.flush()
                if self.fsync:
                    os.fsync(self.stream.fileno())
        except OSError as e:
            raise self._fail(e) from None
        finally:
            if self.owns:
                with contextlib.suppress(OSError):  # a buffer a full disk still refuses
                    self.stream.close()


# --------------------------------------------------------------------------- progress


@dataclass
class BatchSummary:
    """What one run did. `records` counts the records written, errors included."""

    records: int = 0
    errors: int = 0
    skipped: int = 0  # lines whose id already had a result (resume)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    first_error: str | None = None  # "line N: why", for --fail-fast

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        skipped = f", {self.skipped} skipped (already done)" if self.skipped else ""
        return (
            f"batch: {self.records} records ({self.errors} errors){skipped} | "
            f"{self.completion_tokens} tokens generated, {self.prompt_tokens} prompt tokens | "
            f"{self.seconds:.1f} s, {self.tokens_per_second:.1f} tokens/s"
        )


def batch_progress(
    stream: TextIO, total: int | None, live: Callable[[], tuple[int, int, int, float]]
) -> LiveBar:
    """The batch bar on `stream`: lines done/total, errors, tokens/s, time.

    `live()` returns (lines done, errors, tokens generated, seconds); a background thread
    redraws from it, so the bar moves while long sequences are still generating.
    """

    def state() -> tuple[int, str]:
        done, errors, tokens, seconds = live()
        tps = tokens / seconds if seconds > 0 else 0.0
        return done, f"{errors} errors | {tokens} tokens, {tps:.1f} tokens/s | {seconds:.0f} s"

    return LiveBar(
        stream,
        total,
        state,
        bar_format="[{bar:20}] {n_fmt}/{total_fmt} | {status}",
        unknown_total_format="{n} lines | {status}",
    )


def open_input(path: str) -> BinaryIO:
    """The input as a binary stream ("-": stdin); UsageError if it cannot be opened."""
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(Path(path).expanduser(), "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise UsageError(f"{path}: not found") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder; pass a JSONL file or - for stdin") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
