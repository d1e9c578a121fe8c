"""Conversion recipes: which output tensors come from which source tensors, and how.

Every recipe repacks the MXFP4 experts bit for bit (the nibbles and E8M0 scale bytes MLX's
mode="mxfp4" reads are exactly OpenAI's) and keeps the router, norms, sinks and all biases in
floating point. They differ only in the big dense matrices (embeddings, attention projections,
lm_head): 8-bit or 4-bit affine (group 64), or unchanged.

A plan is a list of jobs; each job names the output tensors it produces (so headers can be written
before any data) and yields their bytes in order, a row chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from gptoss_mlx.errors import CheckpointError, UsageError
from gptoss_mlx.model.config import ModelConfig

from .safetensors_io import TensorSpec
from .source import SourceTensor

AFFINE_GROUP = 64
MXFP4 = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
E8M0_NAN = 0xFF
CHUNK_BYTES = 64 << 20  # float32 working set per row chunk when casting or quantizing


@dataclass(frozen=True)
class Recipe:
    name: str
    bits: int | None  # affine bits for the dense matrices; None keeps them in floating point


RECIPES = {
    "mxfp4-q8": Recipe("mxfp4-q8", 8),
    "mxfp4-q4": Recipe("mxfp4-q4", 4),
    "mxfp4-bf16": Recipe("mxfp4-bf16", None),  # lossless: dense matrices as released
}
# --dtype -> (safetensors code, MLX dtype) for unquantized tensors and affine scales/biases.
OUT_DTYPES = {"bfloat16": ("BF16", mx.bfloat16), "float32": ("F32", mx.float32)}
DTYPES_BY_CODE = dict(OUT_DTYPES.values())

# The modules a q8/q4 recipe quantizes (the large dense matrices).
DENSE_QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UsageError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def check_dtype(dtype: str) -> None:
    """Accept bfloat16 / float32; refuse float16 with the reason."""
    if dtype == "float16":
        raise UsageError(
            "--dtype float16 is refused: gpt-oss activations exceed float16's range (65504) "
            "and overflow to inf; use bfloat16 or float32"
        )
    if dtype not in OUT_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose bfloat16 or float32")


@dataclass
class Job:
    """Produces `specs` (in order) by yielding (name, raw bytes array) chunks."""

    specs: list[TensorSpec]
    produce: Callable[[], Iterator[tuple[str, np.ndarray]]]


def _to_mx(raw: np.ndarray, src_dtype: str) -> mx.array:
    a = mx.array(raw)
    return a.view(mx.bfloat16) if src_dtype == "BF16" else a


def _from_mx(a: mx.array) -> np.ndarray:
    # numpy has no bfloat16: hand the bits over as uint16.
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


def _cast(raw: np.ndarray, src_dtype: str, out_dtype: str) -> np.ndarray:
    """Raw source values -> raw values of the output dtype (exact when widening or unchanged)."""
    if src_dtype == out_dtype:
        return raw
    if src_dtype == "BF16" and out_dtype == "F32":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return _from_mx(_to_mx(raw, src_dtype).astype(DTYPES_BY_CODE[out_dtype]))


def check_finite(raw: np.ndarray, src: SourceTensor, row0: int = 0) -> None:
    """Refuse NaN/inf in raw float values read from `src` (rows from `row0` of the logical tensor).

    bf16 arrives as uint16 bits: NaN and inf are exactly the values whose 8 exponent bits are all
    ones, so one mask-and-compare pass finds them without converting anything.
    """
    if src.dtype == "BF16":
        bad = (raw.view(np.uint16) & 0x7F80) == 0x7F80
    else:
        bad = ~np.isfinite(raw)
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        if where:
            where[0] += src.row0 + row0  # an index into the tensor as stored in the file
        raise CheckpointError(
            f"{src.file.path}: tensor {src.stored!r} has a NaN or inf value at {where}; the "
            "checkpoint is corrupt, download it again"
        )


def _row_chunks(rows: int, row_elems: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // max(1, 4 * row_elems))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def cast_job(src: SourceTensor, out_name: str, out_dtype: str) -> Job:
    """Copy a float tensor, cast to the output dtype, in row chunks."""
    spec = TensorSpec(out_name, out_dtype, src.shape)
    row_elems = int(np.prod(src.shape[1:], dtype=np.int64))

    def produce():
        for rows in _row_chunks(src.shape[0], row_elems):
            raw = src.read(rows)
            check_finite(raw, src, rows[0])
            yield out_name, _cast(raw, src.dtype, out_dtype)

    return Job([spec], produce)


def affine_job(src: SourceTensor, prefix: str, bits: int, out_dtype: str) -> Job:
    """8/4-bit affine quantization (group 64) of a [rows, cols] matrix, in row chunks.

    The packed weight streams out chunk by chunk; scales and biases (1/32 of a bf16 weight) are
    kept until the weight is done, since they follow it in the file.
    """
    rows, cols = src.shape
    if cols % AFFINE_GROUP:
        raise UsageError(
            f"{src.name}: {cols} columns is not a multiple of {AFFINE_GROUP}, which affine "
            "quantization needs; use --recipe mxfp4-bf16"
        )
    specs = [
        TensorSpec(prefix + ".weight", "U32", (rows, cols * bits // 32)),
        TensorSpec(prefix + ".scales", out_dtype, (rows, cols // AFFINE_GROUP)),
        TensorSpec(prefix + ".biases", out_dtype, (rows, cols // AFFINE_GROUP)),
    ]
    target = DTYPES_BY_CODE[out_dtype]

    def produce():
        scales, biases = [], []
        for chunk in _row_chunks(rows, cols):
            raw = src.read(chunk)
            check_finite(raw, src, chunk[0])
            w = _to_mx(raw, src.dtype).astype(target)
            wq, s, b = mx.quantize(w, group_size=AFFINE_GROUP, bits=bits, mode="affine")
            mx.eval(wq, s, b)
            scales.append(_from_mx(s))
            biases.append(_from_mx(b))
            yield specs[0].name, np.array(wq)
        yield specs[1].name, np.concatenate(scales)
        yield specs[2].name, np.concatenate(biases)

    return Job(specs, produce)


def _check_scales(raw: np.ndarray, src: SourceTensor) -> None:
    if (raw == E8M0_NAN).any():
        where = np.argwhere(raw == E8M0_NAN)[0].tolist()
        raise CheckpointError(
            f"{src.file.path}: tensor {src.stored!r} has scale byte 0xFF (E8M0 NaN) at {where}; "
            "the checkpoint is corrupt, download it again"
        )


def repack_mxfp4_blocks(blocks: np.ndarray) -> np.ndarray:
    """[..., G, 16] uint8 MXFP4 blocks -> [..., G*4] uint32, the same bytes in the same order.

    MLX packs 8 nibbles per uint32, low nibble first, exactly as the bytes already are (on the
    little-endian machines MLX runs on): no value is touched, and scales need no "- 127".
    """
    b = np.ascontiguousarray(blocks)
    return b.view(np.uint32).reshape(*b.shape[:-2], b.shape[-2] * 4)


def expert_job(src: SourceTensor, out_name: str, rows: slice, out_dtype: str | None = None) -> Job:
    """One expert tensor, one expert at a time, keeping `rows` of axis 1 (gate/up de-interleave).

    blocks [E, out, G, 16] u8 -> weight [E, out', G*4] u32 (the same bytes viewed 4 at a time);
    scales [E, out, G] u8 -> unchanged bytes; bias [E, out] float -> cast to out_dtype.
    """
    kind = src.name.rsplit("_", 1)[1]  # blocks | scales | bias
    E, n_out = src.shape[0], len(range(src.shape[1])[rows])
    if kind == "blocks":
        spec = TensorSpec(out_name, "U32", (E, n_out, src.shape[2] * 4))
    elif kind == "scales":
        spec = TensorSpec(out_name, "U8", (E, n_out, src.shape[2]))
    else:
        spec = TensorSpec(out_name, out_dtype, (E, n_out))

    def produce():
        if kind == "bias":  # [E, out] is small: one read
            raw = src.read()
            check_finite(raw, src)
            yield out_name, np.ascontiguousarray(_cast(raw[:, rows], src.dtype, out_dtype))
            return
        for e in range(E):
            raw = src.read((e, e + 1))[:, rows]
            if kind == "scales":
                _check_scales(raw, src)
            else:
                raw = repack_mxfp4_blocks(raw)
            yield out_name, np.ascontiguousarray(raw)

    return Job([spec], produce)


def plan_jobs(
    cfg: ModelConfig, tensors: dict[str, SourceTensor], recipe: Recipe, dtype: str
) -> list[Job]:
    """All jobs of a conversion, in output order (mlx-lm's gpt_oss tensor names)."""
    out = OUT_DTYPES[dtype][0]
    bits = recipe.bits

    def dense(name: str, prefix: str) -> Job:
        if bits is None:
            return cast_job(tensors[name], prefix + ".weight", out)
        return affine_job(tensors[name], prefix, bits, out)

    jobs = [dense("model.embed_tokens.weight", "model.embed_tokens")]
    even, odd, every = slice(0, None, 2), slice(1, None, 2), slice(None)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        jobs.append(
            cast_job(tensors[p + "input_layernorm.weight"], p + "input_layernorm.weight", out)
        )
        for proj in DENSE_QUANTIZED:
            jobs.append(dense(p + proj + ".weight", p + proj))
            jobs.append(cast_job(tensors[p + proj + ".bias"], p + proj + ".bias", out))
        jobs.append(cast_job(tensors[p + "self_attn.sinks"], p + "self_attn.sinks", out))
        name = p + "post_attention_layernorm.weight"
        jobs.append(cast_job(tensors[name], name, out))
        for part in ("weight", "bias"):
            name = p + "mlp.router." + part
            jobs.append(cast_job(tensors[name], name, out))
        x = p + "mlp.experts."
        # HF gate_up rows interleave gate (even) and up (odd); MLX wants two separate matrices.
        for src, dst, rows in (
            ("gate_up_proj", "gate_proj", even),
            ("gate_up_proj", "up_proj", odd),
            ("down_proj", "down_proj", every),
        ):
            jobs.append(expert_job(tensors[f"{x}{src}_blocks"], f"{x}{dst}.weight", rows))
            jobs.append(expert_job(tensors[f"{x}{src}_scales"], f"{x}{dst}.scales", rows))
            jobs.append(expert_job(tensors[f"{x}{src}_bias"], f"{x}{dst}.bias", rows, out))
    jobs.append(cast_job(tensors["model.norm.weight"], "model.norm.weight", out))
    jobs.append(dense("lm_head.weight", "lm_head"))
    return jobs


def quantization_config(cfg: ModelConfig, recipe: Recipe) -> dict:
    """The "quantization" entry of config.json, as MLX / mlx-lm read it."""
    if recipe.bits is None:
        q: dict = dict(MXFP4)
    else:
        q = {"group_size": AFFINE_GROUP, "bits": recipe.bits, "mode": "affine"}
    for i in range(cfg.num_hidden_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            q[f"model.layers.{i}.mlp.experts.{proj}"] = dict(MXFP4)
        q[f"model.layers.{i}.mlp.router"] = False
    return q
