"""llguidance over our tokenizer: the grammar compiled and checked once per request shape, and one
matcher per sequence (`TokenConstraint`), which the engines advance token by token.

The llguidance tokenizer is built from the same tiktoken encoding the harmony tokenizer uses
(about 2 s for o200k, so once per process for each vocabulary), with the model's vocabulary size
(the mask covers every row of the model's logits, including ids the vocabulary lacks, which stay
forbidden) and harmony's stop tokens as EOS: llguidance's default EOS for a tiktoken encoding is
`<|endoftext|>`, which gpt-oss never writes to end a turn.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import fill_next_token_bitmask

from ...errors import GptOssError, UsageError
from .grammar import GrammarSpec, build_lark, tool_schema, with_compact_whitespace

# llguidance tokenizers by (vocabulary fingerprint, model vocab size): one per process even when
# the same vocabulary is loaded again (each CLI command or test loads its own Tokenizer).
_TOKENIZERS: dict[tuple[int, int], LLTokenizer] = {}
_FINGERPRINTS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class ConstraintError(GptOssError):
    """A sequence left its grammar (an llguidance error state); only that sequence ends."""


def _fingerprint(tokenizer: Any) -> int:
    """A hash of everything llguidance reads from the encoding (about 70 ms for o200k)."""
    if tokenizer not in _FINGERPRINTS:
        enc = tokenizer.encoding
        special = tuple(sorted(enc._special_tokens.items()))
        key = (tuple(enc._mergeable_ranks.items()), special, enc._pat_str)
        _FINGERPRINTS[tokenizer] = hash((key, tokenizer.return_, tokenizer.call))
    return _FINGERPRINTS[tokenizer]


def ll_tokenizer(tokenizer: Any, vocab_size: int) -> LLTokenizer:
    """llguidance's view of `tokenizer` (a harmony `Tokenizer`) for a model of `vocab_size`
    logits, built once per process for each vocabulary."""
    with _LOCK:
        key = (_fingerprint(tokenizer), vocab_size)
        if key not in _TOKENIZERS:
            enc = tokenizer.encoding
            # A tokenizer.json may list reserved ids past the model's rows (the shared one has
            # 201088); the model can never sample them.
            special = {k: v for k, v in enc._special_tokens.items() if v < vocab_size}
            ranks = {k: v for k, v in enc._mergeable_ranks.items() if v < vocab_size}
            _TOKENIZERS[key] = LLTokenizer.from_tiktoken(
                encoder=ranks,
                special_tokens=special,
                pattern=enc._pat_str,
                eos_token=[tokenizer.return_, tokenizer.call],
                n_vocab=vocab_size,
            )
        return _TOKENIZERS[key]


_AT = re.compile(r"^at \d+\(\d+\): ")


def _reason(error: str) -> str:
    """llguidance's error as one line: the first line, without the grammar position, the
    'failed to compile JSON schema:' prefix or the quoted grammar that follows."""
    first = _AT.sub("", error.strip().splitlines()[0]) if error.strip() else "unknown error"
    first = first.removeprefix("failed to compile JSON schema: ")
    if first.endswith(":"):  # "regex parse error:" — the cause is on the following lines
        rest = [ln.strip() for ln in error.splitlines()[1:] if ln.strip().startswith("error:")]
        first = f"{first} {rest[0].removeprefix('error: ')}" if rest else first
    return first


def check_schema(schema: Any, where: str, lltok: LLTokenizer | None = None) -> None:
    """UsageError naming `where` and what llguidance cannot enforce in `schema` (checkable
    without a tokenizer, i.e. before a model loads)."""
    try:
        text = json.dumps(with_compact_whitespace(schema), ensure_ascii=False, allow_nan=False)
        grammar = LLMatcher.grammar_from_json_schema(text)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: not a JSON schema object ({e})") from None
    error = LLMatcher.validate_grammar(grammar, lltok)
    if error:
        raise UsageError(
            f"{where}: cannot be enforced: {_reason(error)} "
            "(llguidance does not support this; remove or rewrite that part of the schema)"
        )


class TokenConstraint:
    """One sequence's place in its grammar: the engine masks the logits with `fill` before each
    sample and `advance`s with the sampled token; `close` frees the matcher with its row.

    `mask_seconds`, when set to a list, receives the host time of each mask computed for this
    sequence (scripts/bench_structured.py).
    """

    def __init__(self, matcher: LLMatcher):
        self.matcher: LLMatcher | None = matcher
        self.tokens = 0  # consumed so far
        self.mask_seconds: list[float] | None = None
        self.grammar: Grammar | None = None  # the grammar it follows (set by Grammar.constraint)

    @property
    def closed(self) -> bool:
        return self.matcher is None

    @property
    def done(self) -> bool:
        """The grammar is complete (its last token, `<|return|>` or `<|call|>`, consumed)."""
        return self.matcher is None or self.matcher.is_stopped()

    @property
    def failed(self) -> bool:
        return self.matcher is not None and self.matcher.is_error()

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (llguidance's packed int32 rows)."""
        fill_next_token_bitmask(self.matcher, bitmask, row)

    def advance(self, token: int) -> None:
        """Consume the sampled `token`; ConstraintError if the grammar does not allow it."""
        if self.matcher is None:
            raise ConstraintError("the constraint was already closed")
        if not self.matcher.consume_token(token):
            raise ConstraintError(
                f"token {token} left the grammar after {self.tokens} tokens: "
                f"{_reason(self.matcher.get_error())}"
            )
        self.tokens += 1

    def close(self) -> None:
        """Free the matcher (its row left the batch, or the sequence ended)."""
        self.matcher = None


class Grammar:
    """A request's grammar, compiled and checked once; `constraint()` starts a sequence in it.

    Build with `compile_grammar`; ChatSession keeps one per conversation (every turn gets a
    fresh constraint), a batch job one per line.
    """

    def __init__(self, lark: str, lltok: LLTokenizer, spec: GrammarSpec):
        self.lark = lark
        self.spec = spec
        self._lltok = lltok
        self._grammar = LLMatcher.grammar_from_lark(lark)

    def constraint(self) -> TokenConstraint:
        """A new sequence at the start of the assistant turn."""
        matcher = LLMatcher(self._lltok, self._grammar, log_level=0)
        if matcher.is_error():  # checked in compile_grammar; a failure here is a bug
            raise ConstraintError(f"the grammar failed to compile: {_reason(matcher.get_error())}")
        constraint = TokenConstraint(matcher)
        constraint.grammar = self  # a sharded server sends it to the other ranks (cli/sharded.py)
        return constraint


def compile_grammar(
    spec: GrammarSpec, tokenizer: Any, vocab_size: int, *, cache: dict | None = None
) -> Grammar | None:
    """The grammar of `spec` for `tokenizer` and a model of `vocab_size`, checked: None when the
    spec constrains nothing; UsageError naming the schema (and the feature) llguidance cannot
    enforce, so a request never runs unconstrained by accident. `cache` (a dict the caller
    keeps) returns the same Grammar for specs with the same grammar text."""
    spec.check()
    if not spec.needed:
        return None
    lark = build_lark(spec)
    if cache is not None and lark in cache:
        return cache[lark]
    lltok = ll_tokenizer(tokenizer, vocab_size)
    fmt = spec.response_format
    if fmt is not None:
        check_schema(fmt.json_schema, "response_format.schema", lltok)
    callable_tools = spec.callable_tools()
    for i, tool in enumerate(spec.tools):
        if tool in callable_tools and spec.is_strict(tool):
            where = f"tools[{i}].function.parameters ({tool.name})"
            check_schema(tool_schema(tool), where, lltok)
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(lark), lltok)
    if error:
        raise UsageError(f"the structured-output grammar failed to compile: {_reason(error)}")
    grammar = Grammar(lark, lltok, spec)
    if cache is not None:
        cache[lark] = grammar
    return grammar
