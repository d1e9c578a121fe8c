"""Property tests (hypothesis) of everything that reads untrusted input: only our own errors escape.

The safetensors header parser gets random bytes, random JSON headers and mutated valid files, and
whatever it accepts must also be accepted, with the same tensors, by the reference implementations
(the `safetensors` package and MLX's own loader). ModelConfig gets random config dicts, the chat
request parser random JSON-like values, the harmony parser mutated real completions, the manifest
check random file names; special-token strings typed by a user must stay plain text.
The harmony parser's random-stream fuzzing lives in test_harmony_parser.py.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_config
from gptoss_mlx.convert.safetensors_io import SafetensorsFile, TensorSpec, build_header
from gptoss_mlx.errors import CheckpointError, ConfigError, UsageError
from gptoss_mlx.harmony.parser import (
    ContentDelta,
    HarmonyStreamParser,
    MessageEnd,
    MessageStart,
    build_result,
)
from gptoss_mlx.harmony.render import render_prompt, render_text
from gptoss_mlx.harmony.request import load_chat_request, parse_chat_request
from gptoss_mlx.model.config import FULL, SLIDING, ModelConfig
from gptoss_mlx.weights.layout import expected_weights
from gptoss_mlx.weights.loading import _check_manifest_entry
from gptoss_mlx.weights.safetensors_header import DTYPES, parse_header, read_header
from vocabs import CONTROL, RESERVED, fake_decode_bytes, toks, write_tiny_tokenizer_json
from vocabs import IDS as H

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, nested a little.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One file path reused by every example of a test (hypothesis runs examples in sequence)."""
    return tmp_path_factory.mktemp("fuzz") / "x.safetensors"


# --------------------------------------------------------------------------- safetensors headers

dims = st.one_of(
    st.integers(0, 5),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=2),
    st.none(),
)
entries = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), json_values),
            "shape": st.one_of(st.lists(st.integers(0, 5), max_size=3), st.lists(dims, max_size=3)),
            "data_offsets": st.one_of(
                st.lists(st.integers(-2, 64), min_size=2, max_size=2),
                st.lists(dims, max_size=3),
                json_values,
            ),
        },
        optional={"extra": json_values},
    ),
    json_values,
)
headers = st.dictionaries(st.text(max_size=6), entries, max_size=4).flatmap(
    lambda d: st.one_of(
        st.just(d),
        st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2).map(
            lambda m: {"__metadata__": m, **d}
        ),
        json_values.map(lambda m: {"__metadata__": m, **d}),
    )
)


def check_accepted(tensors: dict, data_start: int, file_size: int) -> None:
    """What an accepted header guarantees: sizes match shapes, and the tensors tile the buffer."""
    pos = data_start
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        assert t.begin == pos and t.nbytes == math.prod(t.shape) * DTYPES[t.dtype][0]
        pos = t.end
    assert pos == file_size


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 1 << 20))
def test_random_header_bytes(head, extra):
    try:
        tensors, _ = parse_header(head, 8 + len(head) + extra, "x")
    except CheckpointError:
        return
    check_accepted(tensors, 8 + len(head), 8 + len(head) + extra)


@FUZZ
@given(headers, st.integers(0, 80))
def test_random_json_headers(header, buffer):
    head = json.dumps(header).encode()
    try:
        tensors, meta = parse_header(head, 8 + len(head) + buffer, "x")
    except CheckpointError as e:
        assert "\n" not in str(e)
        return
    check_accepted(tensors, 8 + len(head), 8 + len(head) + buffer)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


# Valid files (the converter's own writer) and mutations of them.
MLX_DTYPES = sorted(set(DTYPES) - {"F8_E5M2", "F64"})  # what mx.load reads (mlx 0.32)
specs = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=5).filter(lambda n: n != "__metadata__"),
        st.sampled_from(MLX_DTYPES),
        st.lists(st.integers(0, 4), max_size=3),
    ),
    max_size=4,
    unique_by=lambda s: s[0],
)
mutations = st.one_of(
    st.just(("none",)),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**6)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=9)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
)


def mutate(raw: bytes, how: tuple) -> bytes:
    kind, *args = how
    if kind == "flip" and raw:
        i = args[0] % len(raw)
        return raw[:i] + bytes([raw[i] ^ args[1]]) + raw[i + 1 :]
    if kind == "cut":
        return raw[: args[0] % (len(raw) + 1)]
    if kind == "append":
        return raw + args[0]
    if kind == "insert":
        i = args[0] % (len(raw) + 1)
        return raw[:i] + args[1] + raw[i:]
    if kind == "length":
        return struct.pack("<Q", args[0]) + raw[8:]
    return raw


def mlx_raw(a: mx.array) -> bytes:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a).tobytes()


@FUZZ
@given(specs, mutations, st.randoms(use_true_random=False))
def test_mutated_files_agree_with_the_reference_parsers(scratch, spec_list, how, rnd):
    from safetensors import safe_open

    planned = [TensorSpec(n, d, tuple(s)) for n, d, s in spec_list]
    data = rnd.randbytes(sum(s.nbytes for s in planned))
    scratch.write_bytes(mutate(build_header(planned) + data, how))
    try:
        header = read_header(scratch)
    except CheckpointError as e:
        assert how[0] != "none", e  # the writer's own files are always accepted
        assert "\n" not in str(e)
        return
    (n,) = struct.unpack("<Q", scratch.read_bytes()[:8])
    check_accepted(header.tensors, 8 + n, header.size)
    # Whatever we accept, the reference implementation and MLX accept, with the same tensors.
    with safe_open(str(scratch), "numpy") as ref:
        assert set(ref.keys()) == set(header.tensors)
        for name, t in header.tensors.items():
            assert tuple(ref.get_slice(name).get_shape()) == t.shape
            assert ref.get_slice(name).get_dtype() == t.dtype
    loaded = mx.load(str(scratch))
    assert set(loaded) == set(header.tensors)
    with SafetensorsFile(scratch) as f:
        for name, t in header.tensors.items():
            assert tuple(loaded[name].shape) == t.shape
            if t.dtype != "BOOL":  # MLX normalises bool bytes
                assert mlx_raw(loaded[name]) == f.read(name).tobytes(), name


# --------------------------------------------------------------------------- config.json

FIELDS = sorted(ModelConfig.__dataclass_fields__) + ["experts_per_token", "rope_scaling"]
config_values = st.one_of(
    st.integers(-2, 300),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.sampled_from([SLIDING, FULL, "x"]), max_size=5),
    st.fixed_dictionaries(
        {}, optional={k: json_values for k in ("rope_type", "factor", "beta_fast", "type")}
    ),
    json_values,
)
config_dicts = st.dictionaries(st.sampled_from(FIELDS), config_values, max_size=8)


def check_config(cfg: ModelConfig) -> None:
    assert len(cfg.layer_types) == cfg.num_hidden_layers
    assert 1 <= cfg.num_experts_per_tok <= cfg.num_local_experts
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.hidden_size % 32 == 0 and cfg.head_dim % 2 == 0
    assert all(math.isfinite(getattr(cfg, f)) for f in ("rope_theta", "rms_norm_eps"))
    ModelConfig.from_dict(cfg.to_dict())  # what the converter writes reads back


@FUZZ
@given(config_dicts)
def test_random_configs(d):
    try:
        cfg = ModelConfig.from_dict(d)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    check_config(cfg)


@FUZZ
@given(config_dicts)
def test_valid_config_with_random_overrides(overrides):
    d = {**make_tiny_config().to_dict(), **overrides}
    try:
        cfg = ModelConfig.from_dict(d)
    except ConfigError:
        return
    check_config(cfg)


@FUZZ
@given(st.dictionaries(st.sampled_from(["num_experts", "experts_per_token", "hidden_size",
       "rope_scaling_factor", "initial_context_length", "num_hidden_layers", "head_dim",
       "rope_ntk_alpha", "sliding_window"]), config_values, max_size=6))  # fmt: skip
def test_random_original_configs(d):
    try:
        cfg = ModelConfig.from_original(d)
    except ConfigError:
        return
    check_config(cfg)


@FUZZ
@given(st.dictionaries(st.text(max_size=40), json_values, max_size=4), json_values)
def test_random_quantization_configs(quantization, dtype):
    """expected_weights reads config.json's quantization and dtype: only ConfigError escapes."""
    cfg = make_tiny_config(num_hidden_layers=1)
    raw = {"quantization": quantization, "gptoss_mlx": {"dtype": dtype}}
    present = {"model.embed_tokens.scales", "lm_head.scales"}
    try:
        expected_weights(cfg, raw, present)
    except ConfigError as e:
        assert "\n" not in str(e)


# --------------------------------------------------------------------------- manifest names


@FUZZ
@given(st.text(alphabet=st.sampled_from("ab./\\\0~:"), max_size=12), json_values)
def test_manifest_entries_stay_inside_the_folder(name, meta):
    root = Path("/srv/model")
    try:
        _check_manifest_entry(root / "manifest.json", name, meta)
    except CheckpointError:
        return
    # Accepted: a relative path that normalises to somewhere under the folder.
    resolved = Path(os.path.normpath(root / name))  # pure path arithmetic (links: check_files)
    assert ".." not in resolved.parts and resolved.is_relative_to(root) and resolved != root
    assert isinstance(meta, dict) and type(meta["size"]) is int and meta["size"] >= 0


# --------------------------------------------------------------------------- chat requests

message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                       json_values)},
    optional={
        "content": st.one_of(st.text(max_size=8), json_values,
                             st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                             "text": json_values}), max_size=2)),
        "tool_calls": st.one_of(json_values, st.lists(st.fixed_dictionaries(
            {"function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g h", ""]),
                                                "arguments": json_values})},
            optional={"id": json_values, "type": json_values}), max_size=2)),
        "tool_call_id": json_values,
        "name": st.one_of(st.sampled_from(["f", "bad name"]), json_values),
        "reasoning_content": json_values,
    },
)  # fmt: skip
tool = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "x"]),
     "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g", "1 2"])},
                                       optional={"description": json_values,
                                                 "parameters": json_values})},
)  # fmt: skip
requests = st.one_of(
    json_values,
    st.lists(message, max_size=4),
    st.fixed_dictionaries(
        {"messages": st.one_of(st.lists(message, max_size=4), json_values)},
        optional={
            "tools": st.one_of(st.lists(tool, max_size=3), json_values),
            "reasoning_effort": st.one_of(st.sampled_from(["low", "high"]), json_values),
        },
    ),
)


@FUZZ
@given(requests)
def test_random_chat_requests(obj):
    try:
        request = parse_chat_request(obj)
        text = render_text(request, date="2025-01-01")
    except UsageError as e:
        assert "\n" not in str(e)
        return
    assert text.startswith("<|start|>system<|message|>")


@FUZZ
@given(st.binary(max_size=60) | requests.map(lambda o: json.dumps(o).encode()[:-1]))
def test_random_request_bytes(data):
    try:
        load_chat_request(data)
    except UsageError:
        pass


# --------------------------------------------------------------------------- user text stays text


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from gptoss_mlx.harmony.tokenizer import load_tokenizer

    return load_tokenizer(write_tiny_tokenizer_json(tmp_path_factory.mktemp("tok")))


SPECIAL_TEXT = [
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
    "<|call|>", "<|endoftext|>", "<|startoftext|>", "<|reserved_201087|>", "<|", "|>", "<", "|",
    "assistant", "final", " to=functions.f", "é", "\n",
]  # fmt: skip


@FUZZ
@given(st.lists(st.sampled_from(SPECIAL_TEXT) | st.text(max_size=3), min_size=1, max_size=12))
def test_special_token_strings_in_user_text_stay_text(tok, pieces):
    text = "".join(pieces)
    assume(text.strip())

    def ids_for(content: str) -> list[int]:
        req = parse_chat_request([{"role": "user", "content": content}])
        return render_prompt(req, tok, date="2025-01-01")

    ids, baseline = ids_for(text), ids_for("x")
    assert [t for t in ids if tok.is_special(t)] == [t for t in baseline if tok.is_special(t)]
    assert text in tok.decode(ids)


# --------------------------------------------------------------------------- harmony: mutated

# Real completions on the byte-level fake vocabulary of test_harmony_parser.
COMPLETIONS = [
    toks(H.channel, "analysis", H.message, "User asks Z. Think.", H.end, H.start, "assistant",
         H.channel, "final", H.message, "Answer # 7 é", H.return_),
    toks(H.channel, "analysis", H.message, "Need weather.", H.end, H.start, "assistant",
         H.channel, "commentary to=functions.get_weather ", H.constrain, "json", H.message,
         '{"city":"Z"}', H.call),
    toks(H.channel, "commentary", H.message, "Checking 7", H.end, H.start,
         "assistant to=functions.x", H.channel, "commentary json", H.message, '{"a": [1]}', H.call),
]  # fmt: skip
edits = st.lists(
    st.tuples(
        st.sampled_from(["delete", "duplicate", "insert", "replace"]),
        st.integers(0, 200),
        st.integers(0, 8),
        st.sampled_from(CONTROL + list(RESERVED) + list(range(256))),
    ),
    max_size=6,
)


def apply_edits(tokens: list[int], ops) -> list[int]:
    out = list(tokens)
    for op, i, n, token in ops:
        i %= len(out) + 1
        if op == "delete":
            del out[i : i + n]
        elif op == "duplicate":
            out[i:i] = out[i : i + n]
        elif op == "insert":
            out.insert(i, token)
        elif out:
            out[min(i, len(out) - 1)] = token
    return out


@FUZZ
@given(st.sampled_from(range(len(COMPLETIONS))), edits, st.sampled_from(["assistant", None]))
def test_mutated_real_completions(which, ops, role):
    tokens = apply_edits(COMPLETIONS[which], ops)
    parser = HarmonyStreamParser(fake_decode_bytes, role=role)
    events = [e for t in tokens for e in parser.feed(t)] + parser.finish()
    deltas, ended, open_message = [], [], None
    for e in events:
        if isinstance(e, MessageStart):
            assert open_message is None
            open_message = e
        elif isinstance(e, ContentDelta):
            deltas.append(e.text)
        elif isinstance(e, MessageEnd):
            ended.append(e.message)
            open_message = None
    assert open_message is None
    assert "".join(deltas) == "".join(m.content for m in ended)
    result = build_result(parser.messages, parser.stopped_by)
    assert result.finish_reason in ("stop", "tool_calls", "length")
    assert all(c["function"]["name"] is not None for c in result.tool_calls)


# --------------------------------------------------------------------------- tokenizer.json

TOKENIZER_PATHS = [
    (), ("version",), ("pre_tokenizer",), ("pre_tokenizer", "pretokenizers"),
    ("pre_tokenizer", "pretokenizers", 0), ("pre_tokenizer", "pretokenizers", 0, "pattern"),
    ("pre_tokenizer", "pretokenizers", 0, "type"), ("added_tokens",), ("added_tokens", 0),
    ("added_tokens", 0, "id"), ("added_tokens", 0, "content"), ("model",), ("model", "type"),
    ("model", "vocab"), ("model", "vocab", "a"), ("model", "vocab", "!"), ("model", "merges"),
]  # fmt: skip


def set_at(obj, path: tuple, value):
    if not path:
        return value
    *head, last = path
    target = obj
    for key in head:
        target = target[key]
    target[last] = value
    return obj


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(TOKENIZER_PATHS), json_values | st.integers(-5, 300)),
        min_size=1,
        max_size=3,
    )
)
def test_mutated_tokenizer_json(tiny_tokenizer_spec, scratch, edits):
    from gptoss_mlx.harmony.tokenizer import load_tokenizer

    spec = json.loads(tiny_tokenizer_spec)
    for path, value in edits:
        try:
            spec = set_at(spec, path, value)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed the parent: keep what we have
    folder = scratch.parent / "tok-fuzz"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    try:
        tok = load_tokenizer(folder)
    except CheckpointError as e:
        assert "\n" not in str(e)
        return
    assert tok.decode(tok.encode("Hi é <|start|>")) == "Hi é <|start|>"


@pytest.fixture(scope="module")
def tiny_tokenizer_spec(tmp_path_factory) -> str:
    folder = write_tiny_tokenizer_json(tmp_path_factory.mktemp("tokspec"))
    return (folder / "tokenizer.json").read_text()


# --------------------------------------------------------------------------- batch JSONL input

line_objects = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.integers(-3, 3), st.text(max_size=3), json_values),
        "prompt": st.one_of(st.text(max_size=8), json_values),
        "messages": st.one_of(st.lists(message, max_size=2), json_values),
        "tools": st.one_of(st.lists(tool, max_size=2), json_values),
        "reasoning_effort": st.one_of(st.sampled_from(["low", "high"]), json_values),
        "max_tokens": st.one_of(st.integers(-2, 10), json_values),
        "temperature": json_values, "top_p": json_values, "top_k": json_values,
        "min_p": json_values, "seed": st.one_of(st.integers(), json_values),
        "model": json_values, "bogus": json_values,
    },
)  # fmt: skip
jsonl_lines = st.one_of(
    line_objects.map(lambda o: json.dumps(o).encode()),
    json_values.map(lambda o: json.dumps(o).encode()),
    st.binary(max_size=20),
    st.sampled_from(
        [b"", b"   ", b"\xef\xbb\xbf{}", b"\xff\xfe", b'{"prompt": "' + b"x" * 80 + b'"}']
    ),
)


@FUZZ
@given(
    st.lists(jsonl_lines, max_size=8),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
    st.booleans(),
)
def test_random_jsonl_batch_input(tok, lines, newline, bom, text_mode):
    """Every line becomes a runnable item or an error record; nothing raises, nothing is lost."""
    import io

    from gptoss_mlx.cli.batch_files import read_lines
    from gptoss_mlx.cli.batch_job import (
        BatchDefaults,
        BatchItem,
        LineFailure,
        parse_line,
        render_item,
    )

    data = (b"\xef\xbb\xbf" if bom else b"") + newline.join(lines)
    read = list(read_lines(io.BytesIO(data), max_bytes=64))
    numbers = [line.number for line in read]
    physical = data.count(b"\n") + 1  # random bytes may hold newlines of their own
    assert numbers == sorted(set(numbers)) and all(1 <= n <= physical for n in numbers)
    for line in read:
        assert (line.text is None) != (line.error is None)
        assert line.text is None or (line.text.strip() and "\n" not in line.text)
    defaults = BatchDefaults(text=text_mode)
    for line in read:
        item = parse_line(line, defaults)
        if isinstance(item, BatchItem):
            item = render_item(item, tok, "2025-01-01")
        if isinstance(item, LineFailure):
            record = json.dumps(item.record())
            assert "\n" not in item.error and item.line == line.number, record
        else:
            assert isinstance(item, BatchItem) and item.prompt and item.line == line.number
