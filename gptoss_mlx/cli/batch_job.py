"""`gptoss-mlx batch`: JSONL prompts in, one JSONL record per prompt out, resumable.

Input, one request per line (see `batch_io` for the reading: UTF-8, a BOM at the very start is
accepted, blank lines are skipped, lines over 1 MiB fail):
  {"id": ..., "messages": [...]}   the chat shape of `chat_request` (tool messages included)
  {"id": ..., "prompt": "..."}     one user message
plus optional "tools", "reasoning_effort", "max_tokens", "temperature", "top_p", "top_k", "min_p"
and "seed", which override the command line's defaults for that line ("model" is ignored, any
other field is an error). With `text=True` every line is a plain prompt. A line without an id
gets its line number as id; ids must be unique (a repeat fails as a duplicate).

Output, one record per non-blank input line, in the order the sequences finish:
  {"id", "line", "final", "reasoning", "tool_calls", "finish_reason", "usage"}
  {"id", "line", "error"}          a line that could not run
plus "refused_calls" / "unfinished_calls" when the model addressed a tool that is not a declared
function, or was cut off inside a call (harmony/calls.py). A refused call is answered with a
"not available" tool message and the line goes on as a new sequence from there (harmony/turn.py),
as `run_turn` does; its usage counts every segment's generated tokens.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from ..engine.batching import BatchEngine, BatchRequest, BatchResult
from ..engine.chat import DEFAULT_MAX_TOKENS, harmony_ids
from ..engine.generate import SAMPLING_FIELDS, SamplingParams
from ..errors import GptOssError, OutputError, UsageError
from ..harmony.parser import parse_messages
from ..harmony.render import check_date, render_prompt
from ..harmony.request import EFFORTS, ChatMessage, ChatRequest, parse_chat_request
from ..harmony.turn import AssistantTurn
from .batch_files import (
    BatchSummary,
    InputLine,
    OutputPlan,
    batch_progress,
    count_lines,
    id_key,
    open_input,
    read_lines,
)

LINE_FIELDS = ("id", "messages", "prompt", "tools", "reasoning_effort", "max_tokens")
LINE_FIELDS += SAMPLING_FIELDS
# Structured outputs (engine/constraints): the answer's format, tool choice, reasoning budget.
LINE_FIELDS += ("response_format", "tool_choice", "max_reasoning_tokens")
IGNORED_FIELDS = ("model",)  # OpenAI requests name a model; there is only one here

# --------------------------------------------------------------------------- parsing lines


@dataclass
class BatchDefaults:
    """The command line's settings, which each line may override."""

    reasoning_effort: str = "medium"
    instructions: str | None = None  # a developer message put before every line's messages
    tools: list[dict[str, Any]] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = DEFAULT_MAX_TOKENS
    text: bool = False  # each line is a plain prompt, not JSON
    # Structured outputs, as cli/structured.py's StructuredSettings holds them.
    response_format: dict[str, Any] | None = None
    tool_choice: Any = None
    max_reasoning_tokens: int | None = None
    strict_tools: bool = False

    def validate(self) -> None:
        """Check the defaults once, before any line (UsageError)."""
        if self.reasoning_effort not in EFFORTS:
            raise UsageError(f"reasoning effort must be one of {', '.join(EFFORTS)}")
        if self.max_tokens < 1:
            raise UsageError(f"max tokens must be >= 1, got {self.max_tokens}")
        self.sampling.validate()
        try:
            parse_chat_request({"messages": [{"role": "user", "content": ""}], "tools": self.tools})
        except UsageError as e:
            raise UsageError(f"--tools: {e}") from None
        if self.response_format is not None or self.tool_choice is not None:
            parse_chat_request(
                {
                    "messages": [{"role": "user", "content": ""}],
                    "tools": self.tools,
                    "response_format": self.response_format,
                    "tool_choice": self.tool_choice,
                }
            )


@dataclass
class BatchItem:
    """A valid line: its id, request and settings; `prompt` once rendered."""

    id: str | int
    line: int
    request: ChatRequest
    max_tokens: int
    sampling: SamplingParams
    prompt: list[int] | None = None
    max_reasoning_tokens: int | None = None
    grammar: Any = None  # its structured-output Grammar (engine/constraints), if any
    # The turn so far, across segments (a refused call continues it): harmony/turn.py.
    turn: AssistantTurn | None = None
    tokens: list[int] = field(default_factory=list)  # after the prompt: generated and refusals
    completion_tokens: int = 0


@dataclass
class LineFailure:
    """A line that cannot run; becomes an error record. `id_known`: the id is the line's own (or
    its number, for a line without one), rather than the line number of a line not understood."""

    id: str | int
    line: int
    error: str
    id_known: bool = True

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "line": self.line, "error": self.error}


def line_seed(base: int, line_id: str | int) -> int:
    """The seed of a line without its own, under `--seed base`: fixed by the base and the id, so
    a rerun or a resumed run samples the same, while identical prompts still differ."""
    digest = hashlib.sha256(f"{base}\0{id_key(line_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def parse_line(line: InputLine, defaults: BatchDefaults) -> BatchItem | LineFailure:
    """Validate one line. Every problem is a LineFailure, never an exception."""
    if line.error is not None:
        return LineFailure(line.number, line.number, line.error, id_known=False)
    line_id: str | int = line.number
    try:
        if defaults.text:
            obj: dict[str, Any] = {"prompt": line.text}
        else:
            obj = _load_object(line.text)
            line_id = _parse_id(obj.get("id"), line.number)
    except GptOssError as e:
        return LineFailure(line.number, line.number, str(e), id_known=False)
    try:
        _refuse_surrogates(line.text, obj)  # after the id, so the record carries the line's own
        unknown = [k for k in obj if k not in LINE_FIELDS and k not in IGNORED_FIELDS]
        if unknown:
            raise UsageError(f"{unknown[0]}: unknown field (known: {', '.join(LINE_FIELDS)})")
        request = _chat_request(obj, defaults)
        max_tokens = _int_field(obj, "max_tokens", defaults.max_tokens, 1, 2**63)
        sampling = _sampling(obj, defaults.sampling, line_id)
        budget = _int_field(obj, "max_reasoning_tokens", defaults.max_reasoning_tokens, 0, 2**63)
    except GptOssError as e:
        return LineFailure(line_id, line.number, str(e))
    return BatchItem(line_id, line.number, request, max_tokens, sampling, None, budget)


def constrain_item(
    item: BatchItem, tokenizer: Any, vocab_size: int, strict_tools: bool, cache: dict
) -> BatchItem | LineFailure:
    """Compile the item's structured-output grammar, if it has one (`cache`: grammars by lark
    text, so lines of the same shape compile once). A schema llguidance cannot enforce fails
    the line, never runs it unconstrained."""
    from ..engine.constraints import GrammarSpec, compile_grammar

    spec = GrammarSpec.of(
        item.request, strict_tools=strict_tools, max_reasoning_tokens=item.max_reasoning_tokens
    )
    try:
        item.grammar = compile_grammar(spec, tokenizer, vocab_size, cache=cache)
    except GptOssError as e:
        return LineFailure(item.id, item.line, str(e))
    return item


def render_item(item: BatchItem, tokenizer: Any, date: str) -> BatchItem | LineFailure:
    """Render the item's harmony prompt (done only for lines that will run)."""
    try:
        item.prompt = render_prompt(item.request, tokenizer, date=date)
    except GptOssError as e:
        return LineFailure(item.id, item.line, str(e))
    return item


def _load_object(text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise UsageError(f"not valid JSON ({e})") from None
    except RecursionError:
        raise UsageError("JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise UsageError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _refuse_surrogates(text: str, value: Any, where: str = "") -> None:
    """json.loads lets "\\ud800" through as a lone surrogate, which UTF-8 cannot carry."""
    if "\\ud" not in text.lower():
        return
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"{where}contains an unpaired surrogate escape (\\ud800-\\udfff)"
        ) from None


def _parse_id(value: Any, number: int) -> str | int:
    if value is None:
        return number
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UsageError(f"id: expected a string or an integer, got {type(value).__name__}")
    if isinstance(value, str):
        _refuse_surrogates("\\ud", value, "id: ")  # a record could not carry it: use the number
    return value


def _chat_request(obj: dict[str, Any], defaults: BatchDefaults) -> ChatRequest:
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise UsageError('expected "messages" (a chat) or "prompt" (a string), exactly one')
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise UsageError(f"prompt: expected a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise UsageError("prompt: empty")
        messages: Any = [{"role": "user", "content": prompt}]
    else:
        messages = obj["messages"]
    effort = obj.get("reasoning_effort", defaults.reasoning_effort)
    tools = obj["tools"] if "tools" in obj else defaults.tools
    request = parse_chat_request(
        {
            "messages": messages,
            "tools": tools,
            "reasoning_effort": effort,
            "response_format": obj.get("response_format", defaults.response_format),
            "tool_choice": obj.get("tool_choice", defaults.tool_choice),
        }
    )
    if defaults.instructions:
        # Prepended after parsing so that errors name the line's own message indices.
        first = ChatMessage("developer", defaults.instructions)
        request = replace(request, messages=(first, *request.messages))
    return request


def _int_field(obj: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> Any:
    value = obj.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{key}: expected an integer, got {type(value).__name__}")
    if not lo <= value < hi:
        raise UsageError(f"{key}: must be in [{lo}, {hi}), got {value}")
    return value


def _sampling(obj: dict[str, Any], base: SamplingParams, line_id: str | int) -> SamplingParams:
    # The line's own fields over the command's defaults, checked as every front end checks them.
    params = SamplingParams.from_fields(obj, replace(base, seed=None))
    if params.seed is None and base.seed is not None:
        params.seed = line_seed(base.seed, line_id)
    return params


def continue_item(
    item: BatchItem, result: BatchResult, tokenizer: Any, max_context: int
) -> BatchRequest | None:
    """Add a finished sequence to its line's turn. Returns the request for the turn's next
    segment when the model called a tool that is not available (the refusal appended, within
    what is left of max_tokens and the context), else None: the line is done."""
    if item.turn is None:
        item.turn = AssistantTurn(t.name for t in item.request.tools)
    if result.finish_reason == "error":
        return None
    item.tokens += result.tokens
    item.completion_tokens += result.completion_tokens
    ids = harmony_ids(tokenizer)
    call = item.turn.add(*parse_messages(result.tokens, tokenizer.decode_bytes, ids))
    if call is None:
        return None
    reply = item.turn.reply(call, tokenizer)
    prompt = item.prompt + item.tokens + reply
    left = item.max_tokens - item.completion_tokens
    if left < 1 or len(prompt) >= max_context:
        item.turn.out_of_room()
        return None
    item.tokens += reply
    return BatchRequest(prompt, left, item.sampling, id=item.line)


def result_record(item: BatchItem, result: BatchResult, tokenizer: Any) -> dict[str, Any]:
    """The output record of a finished line (an error record if its last sequence failed);
    `continue_item` has already added `result` to the line's turn."""
    if result.finish_reason == "error":
        return LineFailure(item.id, item.line, result.error or "failed").record()
    parsed = item.turn.result()
    prompt_tokens = len(item.prompt)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": item.completion_tokens,
        "total_tokens": prompt_tokens + item.completion_tokens,
    }
    record = {
        "id": item.id,
        "line": item.line,
        "final": parsed.final,
        "reasoning": parsed.reasoning,
        "tool_calls": parsed.tool_calls,
        # "length" when the sequence stopped without a stop token (max_tokens or context).
        "finish_reason": parsed.finish_reason,
        "usage": usage,
    }
    if parsed.refused_calls:
        record["refused_calls"] = parsed.refused_calls
    if parsed.unfinished_calls:
        record["unfinished_calls"] = parsed.unfinished_calls
    return record


# --------------------------------------------------------------------------- the run


class _FailFast(Exception):
    """Raised inside the request feed to stop the engine at the first failed line."""


class BatchJob:
    """Runs input lines through a `BatchEngine` and writes a record for each as it finishes.

    `summary` is kept up to date, so it is meaningful after an interrupt too. Ids already in
    `done` (id_key form) are skipped; a repeated id fails as a duplicate; with `fail_fast` the
    run stops after the first error record.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        defaults: BatchDefaults,
        batch_size: int = 8,
        max_context: int | None = None,
        date: str | None = None,
        done: Iterable[str] = (),
        fail_fast: bool = False,
    ):
        defaults.validate()
        self.model = model
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.date = check_date(date)  # one date for every line, and for a later --resume
        self.done = set(done)
        self.fail_fast = fail_fast
        ids = harmony_ids(tokenizer)
        self.engine = BatchEngine(
            model,
            batch_size=batch_size,
            stop_ids=(ids.return_, ids.call, ids.endoftext),
            max_context=max_context,
        )
        self.summary = BatchSummary()
        self._t0 = time.perf_counter()
        self._tokens_before = 0  # generated in earlier engine runs (rounds of follow-ups)
        self._grammars: dict = {}  # structured-output grammars by lark text (constrain_item)

    def live(self) -> tuple[int, int, int, float]:
        """(lines done, errors, tokens generated, seconds) now, unfinished sequences' tokens
        included: what the progress bar shows. Safe to call from another thread."""
        s = self.summary
        tokens = self._tokens_before + self.engine.stats.completion_tokens
        return s.records + s.skipped, s.errors, tokens, time.perf_counter() - self._t0

    def run(
        self, lines: Iterable[InputLine], write: Callable[[dict[str, Any]], None]
    ) -> BatchSummary:
        """Run every line; `write` gets each record (a dict) as soon as it exists."""
        s = self.summary
        t0 = self._t0 = time.perf_counter() - s.seconds
        pending: dict[int, BatchItem] = {}
        seen: dict[str, int] = {}  # id_key -> the line that first used it
        follow_ups: deque[BatchRequest] = deque()  # next segments of lines (continue_item)

        def emit(record: dict[str, Any]) -> None:
            write(record)
            s.records += 1
            s.seconds = time.perf_counter() - t0
            if "error" in record:
                s.errors += 1
                s.first_error = s.first_error or f"line {record['line']}: {record['error']}"
            if "error" in record and self.fail_fast:
                raise _FailFast

        def drain() -> Iterator[BatchRequest]:
            while follow_ups:
                yield follow_ups.popleft()

        def feed() -> Iterator[BatchRequest]:
            for line in lines:
                yield from drain()
                item = parse_line(line, self.defaults)
                key = id_key(item.id)
                if isinstance(item, BatchItem) or item.id_known:
                    first = seen.setdefault(key, item.line)
                    if first != item.line:
                        error = f"duplicate id (first on line {first})"
                        item = LineFailure(item.id, item.line, error)
                if isinstance(item, BatchItem) and key in self.done:
                    s.skipped += 1
                    continue
                if isinstance(item, BatchItem):
                    item = render_item(item, self.tokenizer, self.date)
                if isinstance(item, BatchItem):
                    vocab = self.model.config.vocab_size
                    strict = self.defaults.strict_tools
                    item = constrain_item(item, self.tokenizer, vocab, strict, self._grammars)
                if isinstance(item, LineFailure):
                    emit(item.record())
                    continue
                pending[item.line] = item
                constraint = item.grammar.constraint() if item.grammar is not None else None
                yield BatchRequest(
                    item.prompt, item.max_tokens, item.sampling, id=item.line, constraint=constraint
                )

        try:
            requests = feed()
            while True:
                for result in self.engine.run(requests):
                    item = pending[result.id]
                    limit = self.engine.max_context
                    follow_up = continue_item(item, result, self.tokenizer, limit)
                    if follow_up is not None:
                        follow_ups.append(follow_up)
                        continue
                    del pending[result.id]
                    record = result_record(item, result, self.tokenizer)
                    if "error" not in record:
                        s.prompt_tokens += record["usage"]["prompt_tokens"]
                        s.completion_tokens += record["usage"]["completion_tokens"]
                    emit(record)
                # Follow-ups made after the input ran out run as one more round.
                self._tokens_before += self.engine.stats.completion_tokens
                if not follow_ups:
                    break
                requests = drain()
        except _FailFast:
            pass
        finally:
            s.seconds = time.perf_counter() - t0
        return s


class _TermAsInterrupt:
    """SIGTERM raises KeyboardInterrupt while active, so a terminated run closes its output
    the way Ctrl-C does (flushed, fsync'd, summary printed). Main thread only."""

    def __enter__(self) -> None:
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def run_batch_file(
    job: BatchJob,
    input_path: str,
    plan: OutputPlan,
    *,
    progress: bool | None = None,
    quiet: bool = False,
    log: TextIO | None = None,
) -> BatchSummary:
    """The whole command: read `input_path` ("-": stdin), write per `plan`, show progress
    (`None`: when `log` is a terminal) and a summary on `log` (stderr). An interrupt still
    closes the output cleanly and prints the summary before it propagates."""
    log = log or sys.stderr
    source = open_input(input_path)
    for note in [] if quiet else plan.notes():
        print(note, file=log)
    job.done |= plan.done
    writer = plan.open()
    show = not quiet and (progress if progress is not None else _isatty(log))
    bar = None
    if show:
        total = count_lines(input_path)
        bar = batch_progress(log, total, job.live)
        bar.start()
    interrupted = False
    try:
        with _TermAsInterrupt():
            job.run(read_lines(source), writer.write)
    except (KeyboardInterrupt, OutputError):  # Ctrl-C, SIGTERM, a full disk, `| head`
        interrupted = True
        raise
    finally:
        try:
            writer.close()
        finally:
            if source is not sys.stdin.buffer:
                source.close()
            if bar is not None:
                bar.close()
            if not quiet:
                print(job.summary.line(), file=log)
                if interrupted and plan.path is not None:
                    # The date is part of every prompt: pin it for a resume on another day.
                    hint = f"--resume --date {job.date}"
                    print(f"interrupted: to finish, run the same command with {hint}", file=log)
                elif interrupted:
                    print(
                        "interrupted: the records went to stdout, which --resume cannot read "
                        "back; --resume needs -o FILE, so write to a file to be able to finish "
                        "a run later",
                        file=log,
                    )
    return job.summary


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
