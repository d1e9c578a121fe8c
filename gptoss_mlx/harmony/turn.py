"""One assistant turn, generated in segments: a refused call is answered and the model goes on.

Generation stops at every `<|call|>`. A function call ends the turn (the caller runs it), and so
does any other stop token or the end of the budget; a refused call (harmony/calls.py: a built-in
tool such as `browser.search`, or an undeclared function) does not: the driver continues the
sequence (prompt, then everything generated, `<|call|>` included) with `reply(call, tokenizer)`,
the refusal and `<|start|>assistant`, and generates the next segment. `AssistantTurn` collects every segment's
parsed messages and decides, so chat (`engine.chat.run_turn`), batch and the server follow one
rule and build one result:

    turn = AssistantTurn(functions)
    while (call := turn.add(messages, stopped_by)) is not None:   # per generated segment
        if no room is left: turn.out_of_room(); break
        prompt += segment + turn.reply(call, tokenizer)            # and generate again
    result = turn.result()

A turn answers at most `MAX_REFUSALS` refused calls; the next one ends it ("stop", the call
listed in `refused_calls`), so a model that insists cannot loop for the whole budget.

The refused exchange is not part of the turn's result messages beyond `refused_calls`: a history
kept in the Chat Completions shape cannot hold a call to `browser.search`, so the next prompt
renders the turn without it (its analysis, where built-in calls are written, is dropped anyway
once the turn is finished).
"""

from __future__ import annotations

from collections.abc import Iterable

from .calls import REFUSED, call_kind, refusal_ids
from .parser import HarmonyResult, Message, build_result
from .tokenizer import Tokenizer

MAX_REFUSALS = 3


class AssistantTurn:
    """The messages of one assistant turn across its segments, and what to do after each.

    `functions`: the declared function names (only `functions.NAME` calls to these are calls).
    """

    def __init__(self, functions: Iterable[str] = (), max_refusals: int = MAX_REFUSALS):
        self.functions = frozenset(functions)
        self.max_refusals = max_refusals
        self.messages: list[Message] = []
        self.stopped_by: str | None = None
        self.refusals = 0
        self._finish: str | None = None

    def add(self, messages: list[Message], stopped_by: str | None) -> Message | None:
        """Record one segment (its finished messages and the stop token that ended it). Returns
        the refused call to answer before generating again, or None: the turn is over."""
        self.messages += messages
        self.stopped_by = stopped_by
        if stopped_by != "call" or not messages:
            return None
        last = messages[-1]
        if call_kind(last, self.functions) != REFUSED or self.refusals >= self.max_refusals:
            return None
        return last

    def reply(self, call: Message, tokenizer: Tokenizer) -> list[int]:
        """The ids that answer `call` (its refusal, then `<|start|>assistant`); counts it."""
        self.refusals += 1
        return refusal_ids(call, self.functions, tokenizer)

    def out_of_room(self) -> None:
        """The driver cannot generate another segment (max_tokens or the context limit is
        reached): the turn ends with finish reason "length"."""
        self._finish = "length"

    def result(self, id_prefix: str = "call_") -> HarmonyResult:
        """The whole turn sorted for a chat API (see `build_result`)."""
        res = build_result(self.messages, self.stopped_by, id_prefix, functions=self.functions)
        if self._finish is not None:
            res.finish_reason = self._finish
        return res
