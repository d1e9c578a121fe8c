"""The tensors a converted folder must hold: names, shapes and dtypes implied by its config.json.

The loader compares every shard's validated header against this before MLX opens a file, so a
folder whose weights disagree with its config is refused with the tensors named, instead of failing
with a shape error deep inside the model (or, worse, loading garbage that happens to fit).

Quantized modules follow MLX's conventions (what `nn.quantize` creates): a Linear or Embedding of
shape [out, in] stored with `bits` per value becomes weight uint32 [out, in * bits / 32] plus
scales [out, in / group] (and, in affine mode, biases of the same shape); the experts are the same
with a leading [E]. A module counts as quantized when the folder holds its `.scales`, as mlx-lm
decides; config.json's "quantization" entry says how: a per-module entry, else the top-level
default (our folders) or, like mlx-lm's loader, what the stored shapes imply (folders made by
mlx-lm, mlx-community or LM Studio, where the top-level default may not apply to unnamed modules).
Our converter keeps the experts in MXFP4 as released; other conversions may hold them in any of
MLX's modes, or in floating point.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..model.config import ModelConfig

# config.json's gptoss_mlx.dtype -> the safetensors dtype of every floating-point tensor.
FLOAT_CODES = {"bfloat16": "BF16", "float32": "F32"}
# (mode, bits, group size), as MLX's quantize takes them.
Scheme = tuple[str, int, int]
# MLX's quantization modes: the bits and group sizes each accepts. Only affine keeps its scales
# in floating point (with a float offset per group); the others hold one scale byte per group.
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "mxfp8": ((8,), (32,)),
    "nvfp4": ((4,), (16,)),
}
_SHOWN = 4  # names listed in one error line before "and N more"
_CONVERT_AGAIN = "convert the checkpoint again"


@dataclass(frozen=True)
class WeightSpec:
    """What one stored tensor must look like."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Matrix:
    """A module that may be stored quantized: [*lead, rows, cols] weights, maybe with a bias."""

    path: str
    lead: tuple[int, ...]  # (E,) for the stacked experts, () otherwise
    rows: int
    cols: int
    bias: bool


def matrices(cfg: ModelConfig) -> list[Matrix]:
    """Every matrix of the model in canonical order (mlx-lm's module paths)."""
    H, V, E = cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts
    I = cfg.intermediate_size  # noqa: E741 - the paper's name
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    out = [Matrix("model.embed_tokens", (), V, H, False)]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj, rows, cols in (
            ("q", q_out, H),
            ("k", kv_out, H),
            ("v", kv_out, H),
            ("o", H, q_out),
        ):
            out.append(Matrix(f"{p}self_attn.{proj}_proj", (), rows, cols, True))
        out.append(Matrix(f"{p}mlp.router", (), E, H, True))
        for proj, rows, cols in (("gate_proj", I, H), ("up_proj", I, H), ("down_proj", H, I)):
            out.append(Matrix(f"{p}mlp.experts.{proj}", (E,), rows, cols, True))
    out.append(Matrix("lm_head", (), V, H, False))
    return out


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


def parse_scheme(spec: Any, path: str, source: str) -> Scheme | None:
    """A quantization entry of config.json ({"group_size", "bits", "mode"}; False: not
    quantized) as a Scheme, refused with one line unless MLX supports it."""
    if spec is False:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: quantization for {path} is {spec!r}, not an object")
    mode, bits, group = spec.get("mode", "affine"), spec.get("bits"), spec.get("group_size")
    if spec.get("global_scale"):
        raise ConfigError(
            f"{source}: quantization for {path} uses an nvfp4 global scale, which gptoss-mlx "
            "does not support; use a conversion without --global-scale"
        )
    ints = type(bits) is int and type(group) is int
    allowed = MODES.get(mode) if isinstance(mode, str) else None
    if not (ints and allowed and bits in allowed[0] and group in allowed[1]):
        supported = "; ".join(f"{m} bits {b} groups {g}" for m, (b, g) in MODES.items())
        raise ConfigError(
            f"{source}: quantization for {path} (mode {mode!r}, bits {bits!r}, group_size "
            f"{group!r}) is not one MLX supports ({supported})"
        )
    return mode, bits, group


def _infer_scheme(m: Matrix, stored: Mapping[str, tuple], source: str) -> Scheme:
    """How a module config.json does not name was quantized, from its stored shapes (as mlx-lm's
    loader infers it): scale bytes mean a microscaling mode, float scales mean affine."""
    w_shape, s_shape = stored.get(m.path + ".weight", ((),))[0], stored[m.path + ".scales"][0]
    s_dtype, where = stored[m.path + ".scales"][1], stored[m.path + ".scales"][-1]
    groups = s_shape[-1] if s_shape else 0
    group = m.cols // groups if groups and m.cols % groups == 0 else 0
    bits = w_shape[-1] * 32 // m.cols if w_shape else 0
    if s_dtype == "U8":
        mode = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}.get((bits, group))
    else:
        mode = "affine" if bits in MODES["affine"][0] and group in MODES["affine"][1] else None
    if mode is None:
        raise CheckpointError(
            f"{where}: cannot tell how {m.path} is quantized (weight {list(w_shape)}, scales "
            f"{list(s_shape)} {s_dtype}) and {source} does not say"
        )
    return mode, bits, group


def resolve_schemes(
    cfg: ModelConfig,
    qcfg: Any,
    present: Collection[str],
    source: str = "config.json",
    stored: Mapping[str, tuple] | None = None,
) -> dict[str, Scheme | None]:
    """{module path: Scheme, or None for floating point} for every matrix of the model.

    A module is quantized when `present` (the stored tensor names) holds its .scales. Its scheme
    is config.json's entry for it; else, with `stored` ({name: (shape, dtype, ..., file)}), what
    the stored shapes imply (mlx-lm's rule); else the top-level default (our converter's rule).
    """
    if not isinstance(qcfg, dict):
        raise ConfigError(f"{source}: quantization must be an object")
    default = {k: qcfg[k] for k in ("group_size", "bits", "mode") if k in qcfg}
    out: dict[str, Scheme | None] = {}
    for m in matrices(cfg):
        if m.path + ".scales" not in present:
            out[m.path] = None
        elif m.path in qcfg or stored is None:
            scheme = parse_scheme(qcfg.get(m.path, default), m.path, source)
            if scheme is None:
                raise ConfigError(
                    f"{source}: quantization for {m.path} is False, but the folder holds "
                    f"{m.path}.scales"
                )
            out[m.path] = scheme
        else:
            out[m.path] = _infer_scheme(m, stored, source)
    return out


def schemes_from_config(
    cfg: ModelConfig, qcfg: Any, source: str = "config.json"
) -> dict[str, Scheme | None]:
    """What config.json alone says each matrix is stored as (no weights at hand, e.g. before a
    download): its own entry, else the top-level default where its inputs divide into groups
    (mlx_lm.convert leaves the others unquantized), else floating point."""
    if qcfg is None:
        qcfg = {}
    if not isinstance(qcfg, dict):
        raise ConfigError(f"{source}: quantization must be an object")
    has_default = "bits" in qcfg or "mode" in qcfg
    default = {k: qcfg[k] for k in ("group_size", "bits", "mode") if k in qcfg}
    out: dict[str, Scheme | None] = {}
    for m in matrices(cfg):
        if m.path in qcfg:
            out[m.path] = parse_scheme(qcfg[m.path], m.path, source)
        elif has_default:
            scheme = parse_scheme(default, "the default", source)
            out[m.path] = scheme if m.cols % scheme[2] == 0 else None
        else:
            out[m.path] = None
    return out


_ROLES = (
    ("embeddings", "embed_tokens"),
    ("attention", "self_attn"),
    ("router", "mlp.router"),
    ("experts", "mlp.experts"),
    ("lm_head", "lm_head"),
)


def scheme_name(scheme: Scheme | None, float_name: str = "float") -> str:
    """'mxfp4', 'nvfp4', 'affine 8-bit g64', or `float_name` for an unquantized matrix."""
    if scheme is None:
        return float_name
    mode, bits, group = scheme
    return f"affine {bits}-bit g{group}" if mode == "affine" else mode


def describe_schemes(schemes: Mapping[str, Scheme | None], float_name: str = "float") -> str:
    """How a folder stores its matrices, one phrase per storage: e.g. 'experts mxfp4;
    embeddings/attention/router/lm_head affine 8-bit g64' (a role stored several ways lists
    each)."""
    by_name: dict[str, list[str]] = {}
    for role, needle in _ROLES:
        names = {scheme_name(s, float_name) for p, s in schemes.items() if needle in p}
        for name in sorted(names):
            by_name.setdefault(name, []).append(role)
    return "; ".join(f"{'/'.join(roles)} {name}" for name, roles in by_name.items())


def layout_weights(
    cfg: ModelConfig, float_code: str, schemes: Mapping[str, Scheme | None], source: str
) -> dict[str, WeightSpec]:
    """Every tensor a folder of `cfg` holds, in canonical order, given how each matrix is stored
    (`schemes`, from resolve_schemes) and the dtype of its floating-point tensors."""
    f = float_code
    out: dict[str, WeightSpec] = {}

    def matrix(m: Matrix) -> None:
        scheme = schemes.get(m.path)
        if scheme is None:
            out[m.path + ".weight"] = WeightSpec((*m.lead, m.rows, m.cols), f)
        else:
            mode, bits, group = scheme
            if m.cols % group or (m.cols * bits) % 32:
                raise ConfigError(
                    f"{source}: {m.path} has {m.cols} inputs, not divisible into {bits}-bit "
                    f"groups of {group}"
                )
            groups = (*m.lead, m.rows, m.cols // group)
            out[m.path + ".weight"] = WeightSpec((*m.lead, m.rows, m.cols * bits // 32), "U32")
            out[m.path + ".scales"] = WeightSpec(groups, f if mode == "affine" else "U8")
            if mode == "affine":
                out[m.path + ".biases"] = WeightSpec(groups, f)
        if m.bias:
            out[m.path + ".bias"] = WeightSpec((*m.lead, m.rows), f)

    H, nh = cfg.hidden_size, cfg.num_attention_heads
    mats = iter(matrices(cfg))
    matrix(next(mats))  # embed_tokens
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = WeightSpec((H,), f)
        for _ in range(4):  # q, k, v, o
            matrix(next(mats))
        out[p + "self_attn.sinks"] = WeightSpec((nh,), f)
        out[p + "post_attention_layernorm.weight"] = WeightSpec((H,), f)
        for _ in range(4):  # router, experts gate, up, down
            matrix(next(mats))
    out["model.norm.weight"] = WeightSpec((H,), f)
    matrix(next(mats))  # lm_head
    return out


def expected_weights(
    cfg: ModelConfig,
    raw: Mapping[str, Any],
    present: set[str] | frozenset[str],
    source: str = "config.json",
) -> dict[str, WeightSpec]:
    """Every tensor one of our converted folders of `cfg` must hold, in canonical order.

    `raw` is the folder's config.json (for "quantization" and "gptoss_mlx.dtype"); `present` is
    the set of tensor names the shards hold (a module is quantized when its .scales is there).
    """
    f = float_dtype(raw, source)
    schemes = resolve_schemes(cfg, raw.get("quantization") or {}, present, source)
    return layout_weights(cfg, f, schemes, source)


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def check_weights(
    found: Mapping[str, tuple[tuple[int, ...], str, str]],
    expected: Mapping[str, WeightSpec],
    folder: str,
    advice: str = _CONVERT_AGAIN,
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
            f"{folder}: tensors do not match config.json: {'; '.join(parts)}; {advice}"
        )
    for name, spec in expected.items():
        shape, dtype, where = found[name]
        if tuple(shape) != spec.shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(shape)}, config.json implies "
                f"{list(spec.shape)}; {advice}"
            )
        if dtype != spec.dtype:
            raise CheckpointError(
                f"{where}: tensor {name!r} has dtype {dtype}, config.json implies {spec.dtype}; "
                f"{advice}"
            )
