"""The o200k_harmony tokenizer: loading from tokenizer.json / o200k_base.tiktoken, plain-text
encoding, special tokens, and the streaming detokenizer.

A tiny byte-level tokenizer.json is written per test; the real vocabulary (found through
TIKTOKEN_ENCODINGS_BASE) is compared with tiktoken's own o200k_harmony when available.
"""

from __future__ import annotations

import json

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_mlx.errors import CheckpointError
from gptoss_mlx.harmony.tokenizer import (
    HARMONY_NAMED_TOKENS,
    O200K_PATTERN,
    StreamingDetokenizer,
    load_tokenizer,
)
from vocabs import TINY_MERGES, real_vocab_dir, tiny_ranks, write_tiny_tokenizer_json


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer_json(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def real_from_json(tmp_path_factory):
    source = real_vocab_dir() / "tokenizer.json"
    if not source.is_file():
        pytest.skip(f"{source} is missing")
    folder = tmp_path_factory.mktemp("hf")
    (folder / "tokenizer.json").symlink_to(source.resolve())
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def reference():
    """tiktoken's own o200k_harmony, fed the local rank file instead of a download."""
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext import openai_public

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local file, copy it nowhere
        ranks = load_tiktoken_bpe(str(real_vocab_dir() / "o200k_base.tiktoken"))
        patch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks)
        return tiktoken.Encoding(**openai_public.o200k_harmony())


VARIED_TEXT = (
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\n"
    "    \t  trailing   \r\n\r\n"
    "Numbers: 1 12 123 1234 12345678901234567890 3.14159 -42 1e-7 0xFF 1,000,000\n"
    "Emoji: 🤖🎉👩‍👩‍👧‍👦 🇫🇷 ❤️ 🏳️‍🌈\n"
    "CJK: 中文分词测试 日本語のテキスト 한국어 텍스트\n"
    "Mixed: naïve café façade Ærø ΑΒΓ αβγ Привет мир עברית العربية हिन्दी\n"
    "Contractions: I'm you're they've we'll she'd it's DON'T WON'T\n"
    'Symbols: <|start|> <|end|> {"json": [1, 2, {"k": null}]} // /* */ #!$%^&*()\n'
    "URLs: https://example.com/a/b?c=d&e=f#g  user@example.org\n"
)


# --- the tiny vocabulary ------------------------------------------------------------------------


def test_tiny_encodes_like_tiktoken_with_the_same_ranks(tiny):
    oracle = tiktoken.Encoding(
        "oracle", pat_str=O200K_PATTERN, mergeable_ranks=tiny_ranks(), special_tokens={}
    )
    for text in ["the thing with the ring", "café 中文 é", VARIED_TEXT]:
        assert tiny.encode(text) == oracle.encode_ordinary(text)
        assert tiny.decode(tiny.encode(text)) == text
    assert tiny.encode(" the")[0] == tiny_ranks()[b" the"]


def test_special_tokens_by_name(tiny):
    assert tiny.special("<|start|>") == 200006 == tiny.start
    assert tiny.special("call") == 200012 == tiny.call
    assert (tiny.end, tiny.message, tiny.channel) == (200007, 200008, 200005)
    assert (tiny.constrain, tiny.return_) == (200003, 200002)
    assert tiny.is_special(200006) and not tiny.is_special(100)
    assert tiny.vocab_size == 201088
    assert tiny.decode([200006]) == "<|start|>"
    with pytest.raises(KeyError, match="not a special token"):
        tiny.special("<|nope|>")


def test_encode_never_produces_control_tokens(tiny):
    text = "<|start|>user<|message|>hi<|end|>"
    ids = tiny.encode(text)
    assert not any(tiny.is_special(i) for i in ids)
    assert tiny.decode(ids) == text


def test_missing_tokenizer_names_folder(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)) as err:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in str(err.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{not json", "cannot read"),
        ({"model": {"type": "WordPiece", "vocab": {}}}, "byte-level BPE"),
        ({"model": {"type": "BPE", "vocab": {"a": 0}}}, "single-byte"),
        ({"model": {"type": "BPE", "vocab": {"\u4e2d": 0}}}, "not byte-level"),
        (
            {
                "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"\w+"}},
                "model": {"type": "BPE", "vocab": {}},
            },
            "split",
        ),
    ],
)
def test_bad_tokenizer_json(tmp_path, spec, message):
    text = spec if isinstance(spec, str) else json.dumps(spec)
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_tokenizer(tmp_path)


def test_missing_special_token(tmp_path):
    folder = write_tiny_tokenizer_json(tmp_path)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|call|>"]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"<\|call\|>"):
        load_tokenizer(folder)


def test_wrong_tiktoken_file_is_refused(tmp_path):
    (tmp_path / "o200k_base.tiktoken").write_text("IQ== 0\n")
    with pytest.raises(CheckpointError, match="sha256"):
        load_tokenizer(tmp_path)


# --- streaming detokenizer ------------------------------------------------------------------------


def stream(tokenizer, ids) -> list[str]:
    detok = StreamingDetokenizer(tokenizer)
    return [detok.add(i) for i in ids] + [detok.flush()]


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=0, max_size=60))
def test_streaming_text_tiny(tiny, text):
    pieces = stream(tiny, tiny.encode(text))
    assert "".join(pieces) == text  # so no piece held half a character (it would show as U+FFFD)


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(
        st.integers(0, 255 + len(TINY_MERGES)) | st.sampled_from([200006, 200012]), max_size=40
    )
)
def test_streaming_arbitrary_ids_matches_decode(tiny, ids):
    """Random bytes are often invalid UTF-8: replacement happens exactly where decode puts it."""
    assert "".join(stream(tiny, ids)) == tiny.decode(ids)


def test_streaming_holds_back_split_emoji(tiny):
    ids = tiny.encode("a🤖b")  # byte-level: the emoji is four tokens
    pieces = stream(tiny, ids)
    assert pieces == ["a", "", "", "", "🤖", "b", ""]


def test_streaming_flushes_truncated_character(tiny):
    ids = tiny.encode("x🤖")[:-1]
    assert stream(tiny, ids)[-1] == "\ufffd" and "".join(stream(tiny, ids)) == tiny.decode(ids)


# --- the real vocabulary ---------------------------------------------------------------------------


def test_real_tokenizer_json_encodes_like_tiktoken(real_from_json, reference):
    text = VARIED_TEXT * 4 + "".join(chr(c) for c in range(0x20, 0x3000, 7))
    assert len(text) > 3000
    assert real_from_json.encode(text) == reference.encode_ordinary(text)
    for line in text.splitlines(keepends=True):
        assert real_from_json.encode(line) == reference.encode_ordinary(line)
    for name, token_id in HARMONY_NAMED_TOKENS.items():
        assert real_from_json.special(name) == token_id == reference.encode_single_token(name)


def test_real_tiktoken_file_matches_tokenizer_json(real_from_json):
    from_ranks = load_tokenizer(real_vocab_dir())
    assert from_ranks.encode(VARIED_TEXT) == real_from_json.encode(VARIED_TEXT)
    assert from_ranks.vocab_size == 201088
    for name in ("start", "end", "message", "channel", "constrain", "return", "call"):
        assert from_ranks.special(name) == real_from_json.special(name)


@settings(max_examples=150, deadline=None)
@given(text=st.text(st.characters(codec="utf-8"), max_size=80))
def test_streaming_text_real(real_from_json, text):
    assert "".join(stream(real_from_json, real_from_json.encode(text))) == text


def test_converter_synthetic_tokenizer_json(tmp_path):
    synthetic = pytest.importorskip("gptoss_mlx.convert.synthetic", reason="no synthetic module")
    synthetic.write_byte_level_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    text = "hello <|start|> wörld 🤖 中文"
    assert tok.decode(tok.encode(text)) == text
    assert not any(tok.is_special(i) for i in tok.encode(text))
    assert (tok.start, tok.end, tok.call, tok.return_) == (200006, 200007, 200012, 200002)
