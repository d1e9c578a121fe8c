"""The `gptoss-mlx chat` loop: read a message, stream the turn, handle tool calls and /commands.

Interactive on a terminal (readline history, multi-line input with triple quotes); when stdin is
not a terminal each line is one user message, so scripts and tests can drive it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from ..engine.chat import ChatSession, TurnResult
from ..errors import GptOssError, OutputError, UsageError
from ..harmony.request import EFFORTS
from .console import TurnPrinter
from .mcp_tools import ToolRunner
from .streams import check_text, decode, not_utf8

HELP = """\
Type a message and press Enter. For several lines, start and end them with a line of \"\"\".
  /effort low|medium|high   reasoning effort for the next turns
  /system TEXT              set the instructions (no TEXT: clear them)
  /reset                    start a new conversation
  /save FILE  /load FILE    save or load the conversation as JSON
  /stats                    speed and memory of the last turn
  /help                     this help
  /quit                     leave (or Ctrl-D)
  //TEXT                    send a message that starts with "/"
When the model calls a tool you are asked for its result (JSON or text); /skip declines.
With --mcp, an MCP tool runs once you answer y (this call), a (always, this session); n declines.
Ctrl-C stops the current answer; the conversation stays as it was before that message."""

SKIPPED = '{"error": "the user declined to run this tool"}'


def _lines(stdin: TextIO, interactive: bool, err: TextIO) -> Callable[[str], str]:
    """A read function: prompt -> line (raises EOFError at the end)."""
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())

            _setup_history()
        except ImportError:
            pass

        def read(prompt: str) -> str:
            try:
                return check_text(input(prompt), "your input")
            except UnicodeDecodeError as e:  # a strict locale decodes as it reads
                raise UsageError(f"your input: {not_utf8(e.object, e)}") from None

        return read

    # Lines as bytes when the stream has them: decoded here, not by the locale's error handler.
    it: Iterator[bytes | str] = iter(getattr(stdin, "buffer", stdin))
    number = 0

    def read_plain(_prompt: str) -> str:
        nonlocal number
        try:
            raw = next(it)
        except StopIteration:
            raise EOFError from None
        number += 1
        return decode(raw, f"input line {number}").rstrip("\n").removesuffix("\r")

    return read_plain


def _setup_history() -> None:
    import atexit
    import readline

    from gptoss_mlx.convert.resolve import home

    path = home() / "chat_history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(path)
        readline.set_history_length(2000)
        atexit.register(readline.write_history_file, path)
    except OSError:
        pass  # history is a convenience; a read-only home must not stop the chat


class UnendedBlock(UsageError):
    """The input ended between an opening and a closing \"\"\" line."""


def _read_message(read: Callable[[str], str], interactive: bool) -> str:
    line = read(">>> " if interactive else "")
    if line.strip() != '"""':
        return line
    parts = []
    while True:
        try:
            more = read("... " if interactive else "")
        except EOFError:
            # The input ended inside a block: say so rather than drop the message silently.
            n = f"{len(parts)} line{'' if len(parts) == 1 else 's'}"
            raise UnendedBlock(
                f'the input ended inside a """ block ({n} after the opening """); '
                'that message was not sent: end a block with a line of """'
            ) from None
        if more.strip() == '"""':
            return "\n".join(parts)
        parts.append(more)


class ChatLoop:
    def __init__(
        self,
        session: ChatSession,
        *,
        show_reasoning: bool = True,
        verbose: bool = False,
        stdin: TextIO | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
        tools: ToolRunner | None = None,
    ):
        self.session = session
        self.tools = tools  # MCP tools (--mcp): run on their servers, with the user's consent
        self.show_reasoning = show_reasoning
        self.verbose = verbose
        self.stdin = stdin or sys.stdin
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.interactive = self.stdin.isatty()

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def run(self) -> None:
        read = _lines(self.stdin, self.interactive, self.err)
        if self.interactive:
            self.say("gptoss-mlx chat: /help for commands, Ctrl-D to leave.")
        while True:
            try:
                text = _read_message(read, self.interactive)
            except EOFError:
                if self.interactive:
                    self.say("")
                return
            except KeyboardInterrupt:
                self.say("")
                continue
            except UnendedBlock:
                raise  # the input is over: one line, exit 2
            except UsageError as e:
                self.say(f"error: {e}; not sent")  # a line that is not UTF-8
                continue
            if not text.strip():
                continue
            if text.startswith("//"):
                text = text[1:]  # "//etc/hosts?" sends "/etc/hosts?"
            elif text.startswith("/"):
                if self.command(text):
                    return
                continue
            self.turn(lambda on_event, t=text: self.session.send(t, on_event), read)

    def turn(self, start: Callable, read: Callable[[str], str]) -> None:
        """Run a turn, then answer its tool calls until the model gives a final answer."""
        while True:
            printer = TurnPrinter(self.show_reasoning, out=self.out, err=self.err)
            try:
                result: TurnResult = start(printer)
            except KeyboardInterrupt:
                printer.end()
                self.say("[interrupted: this message was not added to the conversation]")
                return
            except OutputError:
                raise  # stdout cannot be written: the chat cannot go on
            except GptOssError as e:
                printer.end()
                self.say(f"error: {e}")
                return
            printer.end()
            if self.verbose:
                new = result.prompt_tokens - result.reused_tokens
                self.say(f"prompt: {new} new tokens, {result.reused_tokens} reused")
                self.say(result.stats.summary())
            if result.finish_reason == "length":
                self.say("[stopped: max tokens or context limit reached]")
            calls = self.session.pending_tool_calls()
            if not calls:
                return
            # Past --max-tool-rounds the runner answers every call itself (or stops the turn).
            answers = self.tools.limit(calls, self.session, self.say) if self.tools else []
            if answers is None:
                return
            for call in calls[len(answers) :]:
                fn = call["function"]
                try:
                    if self.tools is not None and self.tools.handles(call):
                        answers.append((call, self.tools.answer(call, read, self.say)))
                        continue
                    prompt = f"result of {fn['name']}({fn['arguments']}) or /skip: "
                    if not self.interactive:
                        self.say(prompt.rstrip())
                    answer = read(prompt if self.interactive else "")
                except (EOFError, KeyboardInterrupt, UsageError) as e:
                    if isinstance(e, UsageError):
                        self.say(f"error: {e}")
                    self.say("[tool call left unanswered]")
                    return
                answers.append((call, SKIPPED if answer.strip() == "/skip" else answer))

            def start(on_event, answers=answers):
                return self.session.send_tool_results(answers, on_event)

    def command(self, text: str) -> bool:
        """Handle a /command; True means leave."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        s = self.session
        try:
            if name in ("/quit", "/exit", "/q"):
                return True
            if name == "/help":
                self.say(HELP)
            elif name == "/effort":
                if arg not in EFFORTS:
                    self.say(f"usage: /effort {'|'.join(EFFORTS)} (now {s.reasoning_effort})")
                else:
                    s.reasoning_effort = arg
                    self.say(f"reasoning effort: {arg}")
            elif name == "/system":
                s.instructions = arg or None
                self.say("instructions set" if arg else "instructions cleared")
            elif name == "/reset":
                s.reset()
                self.say("new conversation")
            elif name == "/save":
                if not arg:
                    self.say("usage: /save FILE")
                else:
                    s.save(arg)
                    self.say(f"saved {len(s.messages)} messages to {arg}")
            elif name == "/load":
                if not arg:
                    self.say("usage: /load FILE")
                else:
                    s.load(arg)
                    if self.tools is not None:
                        self.tools.offer(s)  # the --mcp tools stay declared
                    self.say(f"loaded {len(s.messages)} messages from {Path(arg)}")
            elif name == "/stats":
                self.say(s.last.stats.summary() if s.last else "no turn yet")
            else:
                self.say(f"unknown command {name}; /help lists them")
        except GptOssError as e:
            self.say(f"error: {e}")
        return False
