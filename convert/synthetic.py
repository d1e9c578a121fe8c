"""Random gpt-oss checkpoints in the real file layouts, for tests and benchmarks (no real weights here).

`random_model` builds a random model directly in memory instead (no files; its scales are given
there), for engine tests and benchmarks that need no checkpoint.

`write_hf_checkpoint` and `write_original_checkpoint` write the same random weights for the same
seed (each logical tensor has its own generator keyed by (seed, name)), so the two layouts must
convert to identical outputs. Tensors are generated and streamed chunk by chunk, so a full-size
gpt-oss-20b checkpoint (13.8 GB) is written without holding it in memory.

Scales keep activations sane: matrices ~N(0, 0.02²), norms ~1, sinks ~N(0, 1), MXFP4 scale bytes
in [118, 125] (2^-9 .. 2^-2) with random nibbles.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from gptoss_mlx.harmony.tokenizer import bytes_to_unicode, harmony_special_tokens
from gptoss_mlx.model.config import ModelConfig
from gptoss_mlx.model.transformer import GptOss

from .safetensors_io import SafetensorsWriter, TensorSpec
from .source import INDEX_NAME, ORIGINAL_BLOCK, ORIGINAL_TOP, Expected, expected_tensors

_CHUNK_ELEMS = 4 << 20  # generation chunk: fixed per shape, so both layouts draw identical values

# Modelled on openai/gpt-oss-20b's config.json; the sizes come from the ModelConfig.
_HF_CONFIG_TEMPLATE = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "router_aux_loss_coef": 0.9,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
}
GENERATION_CONFIG = {
    "bos_token_id": 199998,
    "do_sample": True,
    "eos_token_id": [200002, 199999, 200012],
    "pad_token_id": 199999,
    "transformers_version": "4.55.0.dev0",
}
_MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he"), ("e", "r"), ("Ġ", "a"), ("o", "n")]


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even (MLX's cast: fast, no temporaries)."""
    return np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16))


def _kind(name: str) -> str:
    if name.endswith("_blocks"):
        return "blocks"
    if name.endswith("_scales"):
        return "scales"
    if name.endswith("sinks"):
        return "sinks"
    if "norm" in name:
        return "norm"
    return "dense"


def _chunks(name: str, exp: Expected, seed: int, dtype: str) -> Iterator[np.ndarray]:
    """Raw values of logical tensor `name`, in row chunks along axis 0 (bf16 as uint16 bits)."""
    shape = exp.shape
    row = int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, _CHUNK_ELEMS // max(1, row))
    kind = _kind(name)
    key = zlib.crc32(name.encode())
    for c, start in enumerate(range(0, shape[0], step)):
        rows = min(shape[0], start + step) - start
        size = rows * row
        rng = np.random.default_rng([seed, key, c])
        cshape = (rows, *shape[1:])
        if kind == "blocks":
            yield np.frombuffer(rng.bytes(size), dtype=np.uint8).reshape(cshape)
            continue
        if kind == "scales":
            yield rng.integers(118, 126, size=cshape, dtype=np.uint8)
            continue
        x = rng.standard_normal(size, dtype=np.float32).reshape(cshape)
        if kind == "norm":
            x = 1.0 + 0.1 * x
        elif kind == "dense":
            x *= 0.02
        yield _to_bf16_bits(x) if dtype == "BF16" else x


def _full(name: str, exp: Expected, seed: int, dtype: str = "BF16") -> np.ndarray:
    return np.concatenate(list(_chunks(name, exp, seed, dtype)))


def _write_file(path: Path, items: list[tuple[TensorSpec, Iterator[np.ndarray]]]) -> None:
    w = SafetensorsWriter(path, [s for s, _ in items])
    try:
        for spec, chunks in items:
            for chunk in chunks:
                w.write(spec.name, chunk)
        w.close()
    except BaseException:
        w.abort()
        raise


def _hf_config(cfg: ModelConfig) -> dict:
    d = dict(_HF_CONFIG_TEMPLATE)
    d.update(cfg.to_dict())
    d["experts_per_token"] = cfg.num_experts_per_tok
    return dict(sorted(d.items()))


def write_hf_checkpoint(
    path: str | Path,
    cfg: ModelConfig,
    seed: int = 0,
    dtype: str = "bfloat16",
    tokenizer_json: str | Path | None = None,
) -> Path:
    """Write a random checkpoint in the Hugging Face layout; returns the folder.

    Three shards (model-0000{0,1,2}-of-00002.safetensors, named like the real repo) when the model
    has 3+ layers, else one model.safetensors; plus the index, config.json, generation_config.json
    and tokenizer.json (a copy of `tokenizer_json` or a minimal byte-level one).
    dtype: "bfloat16" (as released) or "float32" for the floating-point tensors.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    code = {"bfloat16": "BF16", "float32": "F32"}[dtype]
    expected = expected_tensors(cfg)
    L = cfg.num_hidden_layers

    def shard_of(name: str) -> int:
        if L < 3:
            return 0
        if name.startswith("model.layers."):
            return min(2, 3 * int(name.split(".")[2]) // L)
        return 0 if name == "model.embed_tokens.weight" else 2

    n = 3 if L >= 3 else 1
    names = (
        [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
        if n > 1
        else ["model.safetensors"]
    )
    weight_map: dict[str, str] = {}
    total = 0
    for i, fname in enumerate(names):
        items = []
        for name, exp in expected.items():
            if shard_of(name) != i:
                continue
            t = code if exp.dtypes != ("U8",) else "U8"
            spec = TensorSpec(name, t, exp.shape)
            items.append((spec, _chunks(name, exp, seed, t)))
            weight_map[name] = fname
            total += spec.nbytes
        _write_file(path / fname, items)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(_hf_config(cfg), indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    else:
        write_byte_level_tokenizer_json(path / "tokenizer.json")
    return path


def original_config(cfg: ModelConfig) -> dict:
    """OpenAI's original/config.json for `cfg`."""
    return {
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_experts": cfg.num_local_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "swiglu_limit": cfg.swiglu_limit,
        "head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "sliding_window": cfg.sliding_window,
        "initial_context_length": cfg.initial_context_length,
        "rope_theta": cfg.rope_theta,
        "rope_scaling_factor": cfg.rope_scaling_factor,
        "rope_ntk_alpha": cfg.rope_beta_slow,
        "rope_ntk_beta": cfg.rope_beta_fast,
    }


def write_original_checkpoint(path: str | Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """Write the same random weights as `write_hf_checkpoint(seed=seed)` in OpenAI's layout.

    config.json with OpenAI's names and one model.safetensors (block.N.attn.qkv.weight, ...).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    expected = expected_tensors(cfg)
    to_original = {hf: orig for orig, hf in ORIGINAL_TOP.items()}
    for i in range(cfg.num_hidden_layers):
        for orig, hf in ORIGINAL_BLOCK.items():
            to_original[f"model.layers.{i}.{hf}"] = f"block.{i}.{orig}"
    items = []
    for name, exp in expected.items():
        t = "U8" if exp.dtypes == ("U8",) else "BF16"
        if name in to_original:
            items.append((TensorSpec(to_original[name], t, exp.shape), _chunks(name, exp, seed, t)))
            continue
        # q/k/v: stacked into one qkv tensor, emitted when the q part comes along.
        i, rest = name.split(".")[2], name.rsplit(".", 1)[1]
        if ".q_proj." not in name:
            continue
        parts = [f"model.layers.{i}.self_attn.{p}_proj.{rest}" for p in "qkv"]
        qkv = np.concatenate([_full(p, expected[p], seed) for p in parts])
        items.append((TensorSpec(f"block.{i}.attn.qkv.{rest}", t, qkv.shape), iter([qkv])))
    _write_file(path / "model.safetensors", items)
    (path / "config.json").write_text(json.dumps(original_config(cfg), indent=2) + "\n")
    return path


def write_byte_level_tokenizer_json(path: str | Path) -> Path:
    """A minimal valid Hugging Face `tokenizers` file with o200k_harmony's special token ids.

    BPE over the 256 byte symbols (ids 0..255 in GPT-2's order) plus a few merges; added_tokens
    hold the harmony specials and <|reserved_ID|> tokens at their real ids (199998..201087).
    """
    path = Path(path)
    symbols = list(bytes_to_unicode().values())  # printable bytes first, as in GPT-2 / o200k ranks
    vocab = {s: i for i, s in enumerate(symbols)}
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    specials = sorted(harmony_special_tokens().items(), key=lambda item: item[1])  # id order
    # `tokenizers` keeps an added token's id only if the model vocabulary maps it to that id
    # (the real file fills every id below 199998 instead); so the specials go in both.
    vocab.update(specials)
    added = [
        {
            "id": i,
            "content": name,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for name, i in specials
    ]
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[a, b] for a, b in _MERGES],
        },
    }
    path.write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def random_model(cfg: ModelConfig, seed: int = 0, bits: int | None = None) -> GptOss:
    """A random model built in memory, its weights laid out the way a converted folder holds them.

    MXFP4 experts are random bits with scale bytes in [118, 125] (2^-9 .. 2^-2), norms ~1 + N(0,
    0.1²), every other float ~N(0, 0.05²); one key per parameter, split from `seed`'s. `bits` 8 or
    4 then quantizes attention, embeddings and lm_head the way the mxfp4-q8/q4 recipes store them
    (affine, group 64; the router stays float); None keeps them float.
    """
    model = GptOss(cfg)
    key = mx.random.key(seed)
    weights = []
    for name, v in tree_flatten(model.parameters()):
        key, k = mx.random.split(key)
        if v.dtype == mx.uint32:
            w = mx.random.randint(0, 2**31, v.shape, key=k).astype(mx.uint32)
        elif v.dtype == mx.uint8:
            w = mx.random.randint(118, 126, v.shape, key=k).astype(mx.uint8)
        elif "norm" in name:
            w = 1 + 0.1 * mx.random.normal(v.shape, key=k)
        else:
            w = 0.05 * mx.random.normal(v.shape, key=k)
        weights.append((name, w))
    model.load_weights(weights)
    if bits is not None:
        nn.quantize(
            model,
            group_size=64,
            bits=bits,
            class_predicate=lambda path, m: (
                isinstance(m, (nn.Linear, nn.Embedding)) and "router" not in path
            ),
        )
    mx.eval(model.parameters())
    return model
