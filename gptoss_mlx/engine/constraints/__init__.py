"""Structured outputs: one llguidance grammar per request over the whole harmony assistant turn.

grammar.py  GrammarSpec (response format, tools, tool_choice, reasoning budget) -> lark text
matcher.py  llguidance's tokenizer from ours (once per process), the grammar checked once per
            request shape (unsupported schema features are a UsageError), TokenConstraint: one
            matcher per sequence, advanced token by token, closed with its row
masking.py  bitmasks filled on the host (in parallel for several rows) and applied to the MLX
            logits before sampling (llguidance's Metal kernel, or MLX operations elsewhere)

The engines (generate.py, batching.py) only call TokenConstraint, fill_masks and apply_masks.
"""

from .grammar import GrammarSpec, build_lark
from .masking import allocate_masks, apply_masks, fill_masks, mask_logits
from .matcher import ConstraintError, Grammar, TokenConstraint, check_schema, compile_grammar

__all__ = [
    "ConstraintError",
    "Grammar",
    "GrammarSpec",
    "TokenConstraint",
    "allocate_masks",
    "apply_masks",
    "build_lark",
    "check_schema",
    "compile_grammar",
    "fill_masks",
    "mask_logits",
]
