"""The vocabularies tests run on, shared by several test modules (imported like `conftest`).

- a fake one for the harmony parser: ids 0..255 are single bytes, the control ids are the real ones;
- a tiny byte-level BPE written as a Hugging Face tokenizer.json, built from GPT-2's definition
  rather than from the library's own tables, so loading it checks the library;
- the real o200k vocabulary, when TIKTOKEN_ENCODINGS_BASE (or tiktoken's cache) has it; tests
  that need it skip with a reason that says how to provide it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gptoss_mlx.harmony.parser import HarmonyIds
from gptoss_mlx.harmony.tokenizer import HARMONY_NAMED_TOKENS, O200K_PATTERN, find_default_vocab

# --- a fake byte-per-token vocabulary with the real harmony control ids ---------------------------

IDS = HarmonyIds()
RESERVED = {200010: b"<|reserved_200010|>", 199998: b"<|startoftext|>"}
CONTROL = [
    IDS.start, IDS.end, IDS.message, IDS.channel, IDS.constrain, IDS.return_, IDS.call,
    IDS.endoftext,
]  # fmt: skip


def fake_decode_bytes(ids: list[int]) -> bytes:
    """The fake vocabulary's decoder: ids below 256 are bytes, two reserved ids are their names."""
    return b"".join(bytes([i]) if i < 256 else RESERVED[i] for i in ids)


def toks(*parts: str | int) -> list[int]:
    """Strings become one token per UTF-8 byte; ints are token ids."""
    out: list[int] = []
    for part in parts:
        out.extend(part.encode() if isinstance(part, str) else [part])
    return out


# --- a tiny byte-level BPE in Hugging Face's format ----------------------------------------------


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's bytes_to_unicode, written out from its definition (independent of the library)."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


# Multi-token words, a 2-byte and a 3-byte UTF-8 character, so merges cross character bounds.
TINY_MERGES = [b"th", b"the", b" the", b"in", b"ing", b" w", "é".encode(), "中".encode()[:2]]


def tiny_ranks() -> dict[bytes, int]:
    """The tiny vocabulary's ranks: byte b has rank b, then each of TINY_MERGES in order."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in TINY_MERGES:
        ranks[token] = len(ranks)
    return ranks


def write_tiny_tokenizer_json(path: Path) -> Path:
    """Write `path`/tokenizer.json: `tiny_ranks` with the o200k split, the named harmony tokens
    and <|reserved_201087|>; returns `path` (a model folder as far as the tokenizer goes)."""
    chars = gpt2_byte_chars()

    def as_key(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    ranks = tiny_ranks()
    merges = []
    for token in TINY_MERGES:  # each merge joins the longest known prefix with the rest
        split = max(i for i in range(1, len(token)) if token[:i] in ranks)
        merges.append([as_key(token[:split]), as_key(token[split:])])
    added = [
        {"id": i, "content": name, "special": True} for name, i in HARMONY_NAMED_TOKENS.items()
    ]
    added += [{"id": 201087, "content": "<|reserved_201087|>", "special": True}]
    spec = {
        "version": "1.0",
        "added_tokens": added,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated"},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
            ],
        },
        "decoder": {"type": "ByteLevel"},
        "model": {
            "type": "BPE",
            "vocab": {as_key(token): rank for token, rank in ranks.items()},
            "merges": merges,
        },
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


# --- the real o200k vocabulary ------------------------------------------------------------------

# o200k_base.tiktoken from $TIKTOKEN_ENCODINGS_BASE or tiktoken's cache; None when absent.
REAL_VOCAB = find_default_vocab()
_HOW = "set TIKTOKEN_ENCODINGS_BASE to a folder with o200k_base.tiktoken, e.g. ../shared/tokenizer"


def real_vocab_dir() -> Path:
    """$TIKTOKEN_ENCODINGS_BASE when it holds o200k_base.tiktoken; skips the test otherwise."""
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if not base or not (Path(base) / "o200k_base.tiktoken").is_file():
        pytest.skip(f"real vocabulary unavailable: {_HOW}")
    return Path(base)


def needs_real_vocab(why: str) -> pytest.MarkDecorator:
    """Skip the test, saying `why`, when the real vocabulary (REAL_VOCAB) is not here."""
    return pytest.mark.skipif(
        REAL_VOCAB is None, reason=f"needs the real o200k vocabulary ({_HOW}): {why}"
    )
