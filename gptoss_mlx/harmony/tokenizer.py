"""The o200k_harmony tokenizer (gpt-oss's vocabulary) through tiktoken, built from local files.

Nothing is downloaded at run time. A model folder provides the vocabulary either as
`o200k_base.tiktoken` (tiktoken's own rank file) or as a Hugging Face `tokenizer.json` (a byte-level
BPE whose ids are the tiktoken ranks, which is how the gpt-oss repos ship it).

Measured on the 27 MB tokenizer.json (2 shared CPU cores): about 1.4 s to load (0.7 s of it is
`json.loads`), against 0.6 s for `o200k_base.tiktoken`: not worth writing a derived cache file.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import tiktoken

from ..errors import CheckpointError

# o200k_base's pre-tokenizer split, as tiktoken_ext/openai_public.py defines it.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

# The named harmony control tokens; every other id from 199998 to 201087 is reserved.
HARMONY_NAMED_TOKENS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,  # inherited from o200k_base
}
HARMONY_VOCAB_SIZE = 201088
_REQUIRED_SPECIAL = [name for name in HARMONY_NAMED_TOKENS if name != "<|endofprompt|>"]


def harmony_special_tokens() -> dict[str, int]:
    """o200k_harmony's special tokens: the named ones plus `<|reserved_N|>` for the other ids."""
    named_ids = set(HARMONY_NAMED_TOKENS.values())
    reserved = {
        f"<|reserved_{i}|>": i
        for i in range(HARMONY_NAMED_TOKENS["<|startoftext|>"], HARMONY_VOCAB_SIZE)
        if i not in named_ids
    }
    return {**HARMONY_NAMED_TOKENS, **reserved}


class Tokenizer:
    """o200k_harmony: BPE ranks + the o200k split + special tokens, encoded by tiktoken.

    `encode` treats its whole input as plain text: text that spells a control token such as
    "<|start|>" becomes ordinary tokens, so user or tool text can never inject message structure.
    Control tokens are inserted by id (`special`, or the `start`/`end`/... properties).
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int]):
        for name in _REQUIRED_SPECIAL:
            if name not in special_tokens:
                raise CheckpointError(f"tokenizer: special token {name} is missing")
        self._special = dict(special_tokens)
        self._special_ids = frozenset(special_tokens.values())
        self._enc = tiktoken.Encoding(
            "o200k_harmony",
            pat_str=O200K_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=special_tokens,
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, all of it plain text (no special tokens ever)."""
        return self._enc.encode_ordinary(text)

    def special(self, name: str) -> int:
        """The id of a special token, by its text ("<|start|>") or bare name ("start")."""
        key = name if name.startswith("<|") else f"<|{name}|>"
        try:
            return self._special[key]
        except KeyError:
            raise KeyError(f"not a special token: {name!r}") from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` (special tokens as their text; an id the vocabulary lacks, which
        a model with a larger embedding can still sample, as `<|token_N|>`)."""
        ids = list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except KeyError:
            out = []
            for i in ids:
                try:
                    out.append(self._enc.decode_single_token_bytes(i))
                except KeyError:
                    out.append(f"<|token_{i}|>".encode())
            return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special (control or reserved) token."""
        return token_id in self._special_ids

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying tiktoken encoding (llguidance builds its own tokenizer from it)."""
        return self._enc

    @property
    def vocab_size(self) -> int:
        """One more than the largest id known: 201088 from o200k_base.tiktoken (the model's
        embedding rows); 201089 from the shared tokenizer.json, which lists one reserved token
        past the model's vocabulary (id 201088)."""
        return self._enc.max_token_value + 1

    @cached_property
    def start(self) -> int:
        """The id of <|start|>."""
        return self.special("<|start|>")

    @cached_property
    def end(self) -> int:
        """The id of <|end|>."""
        return self.special("<|end|>")

    @cached_property
    def message(self) -> int:
        """The id of <|message|>."""
        return self.special("<|message|>")

    @cached_property
    def channel(self) -> int:
        """The id of <|channel|>."""
        return self.special("<|channel|>")

    @cached_property
    def constrain(self) -> int:
        """The id of <|constrain|>."""
        return self.special("<|constrain|>")

    @cached_property
    def return_(self) -> int:
        """The id of <|return|>."""
        return self.special("<|return|>")

    @cached_property
    def call(self) -> int:
        """The id of <|call|>."""
        return self.special("<|call|>")


class StreamingDetokenizer:
    """Turns ids fed one at a time into text pieces that never split a UTF-8 character.

    The pieces concatenate to exactly `tokenizer.decode(all ids)`: an incremental UTF-8 decoder
    holds back an unfinished multi-byte sequence until its last byte arrives, and replaces bytes
    with U+FFFD exactly where a one-shot decode would.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Feed one id; returns the text completed by it (often "", e.g. mid-emoji)."""
        return self._decoder.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """The held-back rest at the end of the stream (U+FFFD if it is an unfinished character)."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


# --- loading -------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by byte-level tokenizer.json vocabs.

    Printable Latin-1 bytes stand for themselves; the other 68 are shifted to code points 256+.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _ranks_from_tiktoken_file(path: Path) -> dict[bytes, int]:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != O200K_BASE_SHA256:
        raise CheckpointError(
            f"{path}: not the o200k_base vocabulary (sha256 mismatch); replace it with the real "
            "o200k_base.tiktoken or remove it so tokenizer.json is used"
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _check_tokenizer_json(path: Path, spec: dict) -> dict:
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise CheckpointError(f"{path}: expected a byte-level BPE tokenizer (model.type 'BPE')")
    if not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: model.vocab is missing")
    # A file made for another split would tokenize differently: refuse it rather than guess.
    pre = spec.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        regex = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if regex is not None and regex != O200K_PATTERN:
            raise CheckpointError(f"{path}: pre-tokenizer split is not o200k's; unsupported vocab")
    return model


def _from_tokenizer_json(path: Path) -> Tokenizer:
    try:
        spec = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None
    try:
        return _tokenizer_from_spec(path, spec)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a field of the wrong shape
        raise CheckpointError(f"{path}: malformed tokenizer ({type(e).__name__}: {e})") from None


def _tokenizer_from_spec(path: Path, spec: Any) -> Tokenizer:
    model = _check_tokenizer_json(path, spec)
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    special_ids = set(special.values())
    # str.translate + latin-1 turns each byte-level key back into its bytes at C speed.
    table = {ord(ch): chr(b) for b, ch in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for key, rank in model["vocab"].items():
        if rank in special_ids:  # some files list added tokens in the vocab too; they are not BPE
            continue
        try:
            ranks[key.translate(table).encode("latin-1")] = rank
        except UnicodeEncodeError:
            raise CheckpointError(f"{path}: vocab entry {key!r} is not byte-level BPE") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{path}: vocab lacks single-byte tokens (e.g. byte {missing[0]})")
    # tiktoken panics on shared ranks (a pyo3 PanicException: a BaseException) and overflows on
    # ids outside its integer type.
    distinct = len(set(ranks.values())) == len(ranks)
    ids = [*ranks.values(), *special.values()]
    if not distinct or not all(type(i) is int and 0 <= i < 1 << 31 for i in ids):
        raise CheckpointError(f"{path}: token ids must be distinct integers in [0, 2^31)")
    return Tokenizer(ranks, special)


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model folder: `o200k_base.tiktoken` if present, else `tokenizer.json`."""
    folder = Path(folder)
    tiktoken_file = folder / "o200k_base.tiktoken"
    if tiktoken_file.is_file():
        return Tokenizer(_ranks_from_tiktoken_file(tiktoken_file), harmony_special_tokens())
    json_file = folder / "tokenizer.json"
    if json_file.is_file():
        return _from_tokenizer_json(json_file)
    raise CheckpointError(
        f"{folder}: no tokenizer.json or o200k_base.tiktoken; pass a converted model folder or "
        "a Hugging Face gpt-oss folder (copy tokenizer.json from the source repo into it)"
    )


def find_default_vocab() -> Path | None:
    """A local o200k_base.tiktoken: in $TIKTOKEN_ENCODINGS_BASE, else in tiktoken's cache."""
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base and (Path(base) / "o200k_base.tiktoken").is_file():
        return Path(base) / "o200k_base.tiktoken"
    cache_dir = (
        os.environ.get("TIKTOKEN_CACHE_DIR")
        or os.environ.get("DATA_GYM_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )
    # tiktoken names its cached downloads by the sha1 of their URL.
    cached = Path(cache_dir) / hashlib.sha1(O200K_BASE_URL.encode()).hexdigest()
    return cached if cached.is_file() else None


def load_default_tokenizer() -> Tokenizer:
    """o200k_harmony from the local o200k_base vocabulary (see `find_default_vocab`)."""
    path = find_default_vocab()
    if path is None:
        raise CheckpointError(
            "no tokenizer found: pass --model DIR (a folder with tokenizer.json) or set "
            "TIKTOKEN_ENCODINGS_BASE to a folder holding o200k_base.tiktoken"
        )
    return Tokenizer(_ranks_from_tiktoken_file(path), harmony_special_tokens())
