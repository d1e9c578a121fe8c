"""The tensors a converted folder must hold: names, shapes and dtypes implied by its config.json.

The loader compares every shard's validated header against this before MLX opens a file, so a
folder whose weights disagree with its config is refused with the tensors named, instead of failing
with a shape error deep inside the model (or, worse, loading garbage that happens to fit).

Quantized modules follow MLX's conventions (what `nn.quantize` creates): a Linear or Embedding of
shape [out, in] stored with `bits` per value becomes weight uint32 [out, in * bits / 32] plus
scales [out, in / group] (and, in affine mode, biases of the same shape). A module counts as
quantized when the folder holds its `.scales`, as mlx-lm decides; config.json's "quantization"
entry says how. Experts are always MXFP4 (mode "mxfp4", 4 bits, group 32, uint8 E8M0 scales).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..model.config import ModelConfig

# config.json's gptoss_mlx.dtype -> the safetensors dtype of every floating-point tensor.
FLOAT_CODES = {"bfloat16": "BF16", "float32": "F32"}
_AFFINE_BITS = (2, 3, 4, 5, 6, 8)
_AFFINE_GROUPS = (32, 64, 128)
_MXFP4 = ("mxfp4", 4, 32)
_SHOWN = 4  # names listed in one error line before "and N more"


@dataclass(frozen=True)
class WeightSpec:
    """What one stored tensor must look like."""

    shape: tuple[int, ...]
    dtype: str


def float_dtype(raw: Mapping[str, Any], source: str = "config.json") -> str:
    """The safetensors dtype ("BF16" or "F32") the converter wrote floating-point tensors in."""
    ours = raw.get("gptoss_mlx")
    dtype = ours.get("dtype") if isinstance(ours, dict) else None
    if not isinstance(dtype, str) or dtype not in FLOAT_CODES:
        raise ConfigError(
            f"{source}: gptoss_mlx.dtype must be bfloat16 or float32, got {dtype!r}; "
            "convert the checkpoint again"
        )
    return FLOAT_CODES[dtype]


def _quant_scheme(qcfg: Mapping[str, Any], path: str, source: str) -> tuple[str, int, int]:
    """(mode, bits, group size) config.json gives module `path` (which has .scales)."""
    default = {k: qcfg[k] for k in ("group_size", "bits", "mode") if k in qcfg}
    spec = qcfg.get(path, default)
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{source}: quantization for {path} is {spec!r}, but the folder holds {path}.scales"
        )
    mode, bits, group = spec.get("mode", "affine"), spec.get("bits"), spec.get("group_size")
    ints = type(bits) is int and type(group) is int
    if mode == "mxfp4":
        ok = ints and (mode, bits, group) == _MXFP4
    else:
        ok = mode == "affine" and ints and bits in _AFFINE_BITS and group in _AFFINE_GROUPS
    if not ok:
        raise ConfigError(
            f"{source}: quantization for {path} (mode {mode!r}, bits {bits!r}, group_size "
            f"{group!r}) is not one MLX supports (mxfp4 4/32, or affine {_AFFINE_BITS} bits, "
            f"groups {_AFFINE_GROUPS})"
        )
    return mode, bits, group


def _quantized(
    out: dict[str, WeightSpec],
    path: str,
    lead: tuple[int, ...],
    cols: int,
    scheme: tuple[str, int, int],
    f: str,
    source: str,
) -> None:
    """The weight/scales(/biases) of a quantized [*lead, cols] matrix."""
    mode, bits, group = scheme
    if cols % group or (cols * bits) % 32:
        raise ConfigError(
            f"{source}: {path} has {cols} inputs, not divisible into {bits}-bit groups of {group}"
        )
    out[path + ".weight"] = WeightSpec((*lead, cols * bits // 32), "U32")
    out[path + ".scales"] = WeightSpec((*lead, cols // group), "U8" if mode == "mxfp4" else f)
    if mode == "affine":
        out[path + ".biases"] = WeightSpec((*lead, cols // group), f)


def expected_weights(
    cfg: ModelConfig,
    raw: Mapping[str, Any],
    present: set[str] | frozenset[str],
    source: str = "config.json",
) -> dict[str, WeightSpec]:
    """Every tensor a converted folder of `cfg` must hold, in canonical order.

    `raw` is the folder's config.json (for "quantization" and "gptoss_mlx.dtype"); `present` is
    the set of tensor names the shards hold (a dense module is quantized when its .scales is there).
    """
    f = float_dtype(raw, source)
    qcfg = raw.get("quantization") or {}
    if not isinstance(qcfg, dict):
        raise ConfigError(f"{source}: quantization must be an object")
    out: dict[str, WeightSpec] = {}

    def dense(path: str, rows: int, cols: int, bias: bool) -> None:
        if path + ".scales" in present:
            _quantized(out, path, (rows,), cols, _quant_scheme(qcfg, path, source), f, source)
        else:
            out[path + ".weight"] = WeightSpec((rows, cols), f)
        if bias:
            out[path + ".bias"] = WeightSpec((rows,), f)

    H, V, E = cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts
    I = cfg.intermediate_size  # noqa: E741 - the paper's name
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    dense("model.embed_tokens", V, H, bias=False)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = WeightSpec((H,), f)
        for proj, rows, cols in (
            ("q", q_out, H),
            ("k", kv_out, H),
            ("v", kv_out, H),
            ("o", H, q_out),
        ):
            dense(f"{p}self_attn.{proj}_proj", rows, cols, bias=True)
        out[p + "self_attn.sinks"] = WeightSpec((cfg.num_attention_heads,), f)
        out[p + "post_attention_layernorm.weight"] = WeightSpec((H,), f)
        out[p + "mlp.router.weight"] = WeightSpec((E, H), f)
        out[p + "mlp.router.bias"] = WeightSpec((E,), f)
        for proj, rows, cols in (("gate_proj", I, H), ("up_proj", I, H), ("down_proj", H, I)):
            path = f"{p}mlp.experts.{proj}"
            scheme = _quant_scheme(qcfg, path, source)
            if scheme != _MXFP4:
                raise ConfigError(f"{source}: quantization for {path} must be mxfp4 (4 bits, 32)")
            _quantized(out, path, (E, rows), cols, scheme, f, source)
            out[path + ".bias"] = WeightSpec((E, rows), f)
    out["model.norm.weight"] = WeightSpec((H,), f)
    dense("lm_head", V, H, bias=False)
    return out


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def check_weights(
    found: Mapping[str, tuple[tuple[int, ...], str, str]],
    expected: Mapping[str, WeightSpec],
    folder: str,
) -> None:
    """Compare `found` ({name: (shape, dtype, file)}) with `expected`; one-line CheckpointError.

    Missing and unexpected tensors are listed together, so one run says everything that is off
    about the set; then the first shape or dtype that disagrees is named with its file.
    """
    missing = [n for n in expected if n not in found]
    extra = sorted(n for n in found if n not in expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_some(missing)}")
        if extra:
            parts.append(f"unexpected {_some(extra)}")
        raise CheckpointError(
            f"{folder}: tensors do not match config.json: {'; '.join(parts)}; "
            "convert the checkpoint again"
        )
    for name, spec in expected.items():
        shape, dtype, where = found[name]
        if tuple(shape) != spec.shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(shape)}, config.json implies "
                f"{list(spec.shape)}; convert the checkpoint again"
            )
        if dtype != spec.dtype:
            raise CheckpointError(
                f"{where}: tensor {name!r} has dtype {dtype}, config.json implies {spec.dtype}; "
                "convert the checkpoint again"
            )
