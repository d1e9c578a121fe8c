"""Find and validate a gpt-oss checkpoint in either released layout; expose one set of logical tensors.

Layouts (see ../shared/gpt-oss-20b/README.md):
- "hf": Hugging Face repo root: config.json (model_type gpt_oss), model*.safetensors shards,
  optionally model.safetensors.index.json.
- "original": OpenAI's own folder: config.json with OpenAI's names ("num_experts") and one
  model.safetensors with names like block.0.attn.qkv.weight. A Hugging Face folder holding only
  original/ is read through that sub-folder (tokenizer files still come from the top).

Both are mapped to logical tensors under the Hugging Face names, so everything downstream sees one
layout. Nothing here unpickles or executes anything from the checkpoint.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptoss_mlx.errors import CheckpointError, ConfigError, UsageError
from gptoss_mlx.model.config import ModelConfig

from .safetensors_io import SafetensorsFile, TensorInfo
from .writer import FORMAT, MANIFEST_NAME

INDEX_NAME = "model.safetensors.index.json"
FLOAT_DTYPES = ("BF16", "F32")
# Files never read from a checkpoint: pickles can execute code, and scripts are not ours to run.
IGNORED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".py")
_SHA_RE = re.compile(r"[0-9a-f]{40}")

# OpenAI's original names -> Hugging Face names (the qkv split is handled in _original_entries).
ORIGINAL_TOP = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.scale": "model.norm.weight",
    "unembedding.weight": "lm_head.weight",
}
ORIGINAL_BLOCK = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
_BLOCK_RE = re.compile(r"block\.(\d+)\.(.+)")
# Tensor names of converted MLX folders (ours and mlx-lm's), never of a checkpoint: affine
# "x.scales"/"x.biases" (checkpoints say "x_scales") and the experts split into gate/up/down.
_MLX_NAME_RE = re.compile(r".+\.(?:scales|biases)|.+\.mlp\.experts\.(?:gate|up|down)_proj\..+")


@dataclass(frozen=True)
class Expected:
    """What a logical tensor must look like for a given config."""

    shape: tuple[int, ...]
    dtypes: tuple[str, ...]


def expected_tensors(cfg: ModelConfig) -> dict[str, Expected]:
    """Every logical (Hugging Face-named) tensor of a gpt-oss checkpoint, in a canonical order."""
    H, V, E = cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts
    I = cfg.intermediate_size  # noqa: E741 - the paper's name
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    f, u8 = FLOAT_DTYPES, ("U8",)
    out = {"model.embed_tokens.weight": Expected((V, H), f)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = Expected((H,), f)
        for proj, rows, cols in (
            ("q", q_out, H),
            ("k", kv_out, H),
            ("v", kv_out, H),
            ("o", H, q_out),
        ):
            out[p + f"self_attn.{proj}_proj.weight"] = Expected((rows, cols), f)
            out[p + f"self_attn.{proj}_proj.bias"] = Expected((rows,), f)
        out[p + "self_attn.sinks"] = Expected((cfg.num_attention_heads,), f)
        out[p + "post_attention_layernorm.weight"] = Expected((H,), f)
        out[p + "mlp.router.weight"] = Expected((E, H), f)
        out[p + "mlp.router.bias"] = Expected((E,), f)
        for proj, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            out[p + f"mlp.experts.{proj}_blocks"] = Expected((E, rows, cols // 32, 16), u8)
            out[p + f"mlp.experts.{proj}_scales"] = Expected((E, rows, cols // 32), u8)
            out[p + f"mlp.experts.{proj}_bias"] = Expected((E, rows), f)
    out["model.norm.weight"] = Expected((H,), f)
    out["lm_head.weight"] = Expected((V, H), f)
    return out


@dataclass(frozen=True)
class SourceTensor:
    """A logical tensor: rows [row0, row0 + shape[0]) of a stored tensor in an open file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: SafetensorsFile
    stored: str
    row0: int = 0

    @property
    def nbytes(self) -> int:
        return self.file.info(self.stored).row_bytes * self.shape[0]

    def read(self, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Raw values (bf16 as uint16) of all rows, or rows [start, stop) of this logical tensor."""
        start, stop = rows if rows is not None else (0, self.shape[0])
        return self.file.read(self.stored, (self.row0 + start, self.row0 + stop))


@dataclass
class Source:
    """A validated checkpoint: its config, where it came from and its logical tensors."""

    cfg: ModelConfig
    layout: str  # "hf" | "original"
    weights_dir: Path
    extras_dir: Path  # where tokenizer / generation config files live
    source_id: str
    revision: str | None
    tensors: dict[str, SourceTensor]
    files: list[SafetensorsFile] = field(default_factory=list)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, 5000-digit numbers, deep nesting
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def cache_revision(folder: Path) -> str | None:
    """The commit sha of a Hugging Face cache snapshot folder (.../snapshots/<sha>), else None."""
    folder = folder.absolute()
    if folder.parent.name == "snapshots" and _SHA_RE.fullmatch(folder.name):
        return folder.name
    return None


def _allowed_root(folder: Path) -> Path:
    # Files in a Hugging Face cache snapshot are symlinks into the repo's blobs/ folder.
    if cache_revision(folder):
        return folder.absolute().parent.parent.resolve()
    return folder.resolve()


def _safe_member(folder: Path, name: object, what: str) -> Path:
    """`folder/name` for a plain file name that stays inside the folder (symlinks included)."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise CheckpointError(f"{what}: {name!r} is not a plain file name inside {folder}")
    path = folder / name
    root = _allowed_root(folder)
    if not path.resolve().is_relative_to(root):
        raise CheckpointError(f"{what}: {name!r} leads outside {folder}")
    return path


def _open_all(paths: list[Path], opened: list[SafetensorsFile]) -> None:
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"{p}: missing; download it again")
        opened.append(SafetensorsFile(p))


def _hf_entries(folder: Path, opened: list[SafetensorsFile]) -> list[tuple[str, SourceTensor]]:
    index_path = folder / INDEX_NAME
    weight_map: dict[str, str] | None = None
    if index_path.exists():
        idx = _load_json(index_path)
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index_path}: weight_map must map tensor names to file names")
        weight_map = wm
        names = sorted(set(wm.values()))
        paths = [_safe_member(folder, n, str(index_path)) for n in names]
    else:
        paths = [
            _safe_member(folder, p.name, str(folder))
            for p in sorted(folder.glob("model*.safetensors"))
        ]
    if not paths:
        raise CheckpointError(
            f"{folder}: no model*.safetensors and no {INDEX_NAME}; download the weights"
        )
    _open_all(paths, opened)
    entries: list[tuple[str, SourceTensor]] = []
    for f in opened:
        for info in f.tensors.values():
            if weight_map is not None:
                listed = weight_map.get(info.name)
                if listed is None:
                    raise CheckpointError(f"{f.path}: tensor {info.name!r} is not in {INDEX_NAME}")
                if listed != f.path.name:
                    raise CheckpointError(
                        f"{index_path}: says {info.name!r} is in {listed}, found in {f.path.name}"
                    )
            entries.append((info.name, _whole(info, f)))
    if weight_map is not None:
        found = {n for n, _ in entries}
        for name, shard in weight_map.items():
            if name not in found:
                raise CheckpointError(f"{index_path}: lists {name!r} but {shard} does not hold it")
    return entries


def _whole(info: TensorInfo, f: SafetensorsFile, name: str | None = None) -> SourceTensor:
    return SourceTensor(name or info.name, info.dtype, info.shape, f, info.name)


def _original_entries(
    folder: Path, cfg: ModelConfig, opened: list[SafetensorsFile]
) -> list[tuple[str, SourceTensor]]:
    path = _safe_member(folder, "model.safetensors", str(folder))
    _open_all([path], opened)
    f = opened[-1]
    q_rows = cfg.num_attention_heads * cfg.head_dim
    kv_rows = cfg.num_key_value_heads * cfg.head_dim
    entries: list[tuple[str, SourceTensor]] = []
    for info in f.tensors.values():
        if info.name in ORIGINAL_TOP:
            entries.append((ORIGINAL_TOP[info.name], _whole(info, f, ORIGINAL_TOP[info.name])))
            continue
        m = _BLOCK_RE.fullmatch(info.name)
        if m is None or m.group(1) != str(int(m.group(1))):
            raise CheckpointError(f"{f.path}: unexpected tensor {info.name!r}")
        prefix, rest = f"model.layers.{int(m.group(1))}.", m.group(2)
        if rest in ORIGINAL_BLOCK:
            name = prefix + ORIGINAL_BLOCK[rest]
            entries.append((name, _whole(info, f, name)))
        elif rest in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            if not info.shape or info.shape[0] != q_rows + 2 * kv_rows:
                raise CheckpointError(
                    f"{f.path}: tensor {info.name!r} has shape {list(info.shape)}, expected "
                    f"{q_rows + 2 * kv_rows} rows (q {q_rows} + k {kv_rows} + v {kv_rows})"
                )
            # Rows are stacked q, then k, then v (heads x head_dim each).
            for proj, row0, rows in (
                ("q", 0, q_rows),
                ("k", q_rows, kv_rows),
                ("v", q_rows + kv_rows, kv_rows),
            ):
                name = f"{prefix}self_attn.{proj}_proj.{kind}"
                shape = (rows, *info.shape[1:])
                entries.append((name, SourceTensor(name, info.dtype, shape, f, info.name, row0)))
        else:
            raise CheckpointError(f"{f.path}: unexpected tensor {info.name!r}")
    return entries


def _has_our_manifest(folder: Path) -> bool:
    path = folder / MANIFEST_NAME
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return False
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT


def already_converted(folder: Path) -> UsageError:
    """The one-line refusal for a SRC that is already a converted MLX folder."""
    if _has_our_manifest(folder):
        return UsageError(f"{folder} is already a converted MLX folder; use it with -m")
    return UsageError(
        f"{folder} is already a converted MLX folder, made by mlx-lm or another tool (no "
        f"gptoss-mlx {MANIFEST_NAME}); gptoss-mlx reads it as it is: use it with -m"
    )


def _validate(
    entries: list[tuple[str, SourceTensor]], cfg: ModelConfig, folder: Path, src: Path
) -> dict[str, SourceTensor]:
    """Every expected tensor exactly once, with the expected shape and dtype; returns them in order."""
    expected = expected_tensors(cfg)
    got: dict[str, SourceTensor] = {}
    for name, t in entries:
        if name in got:
            raise CheckpointError(f"{t.file.path}: tensor {name!r} appears more than once")
        if name not in expected:
            if _MLX_NAME_RE.fullmatch(name):
                raise already_converted(src)
            raise CheckpointError(f"{t.file.path}: unexpected tensor {t.stored!r}")
        got[name] = t
    for name in expected:
        if name not in got:
            raise CheckpointError(f"{folder}: missing tensor {name!r}; download it again")
    for proj in ("gate_up_proj", "down_proj"):
        for i in range(cfg.num_hidden_layers):
            b = got[f"model.layers.{i}.mlp.experts.{proj}_blocks"]
            s = got[f"model.layers.{i}.mlp.experts.{proj}_scales"]
            if b.shape[:-1] != s.shape or b.shape[-1:] != (16,):
                raise CheckpointError(
                    f"{b.file.path}: MXFP4 pair {b.stored!r} {list(b.shape)} and {s.stored!r} "
                    f"{list(s.shape)} disagree (blocks must be scales' shape + [16])"
                )
    for name, exp in expected.items():
        t = got[name]
        if t.shape != exp.shape:
            raise CheckpointError(
                f"{t.file.path}: tensor {t.stored!r} has shape {list(t.shape)}, config.json "
                f"implies {list(exp.shape)}"
            )
        if t.dtype not in exp.dtypes:
            raise CheckpointError(
                f"{t.file.path}: tensor {t.stored!r} has dtype {t.dtype}, expected "
                f"{' or '.join(exp.dtypes)}"
            )
    return {name: got[name] for name in expected}


def _mention_ignored(folder: Path, notify: Callable[[str], None]) -> None:
    ignored = sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.suffix in IGNORED_SUFFIXES
    )
    if ignored:
        notify(f"note: ignoring {', '.join(ignored)} in {folder} (never unpickled or executed)")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def open_source(
    folder: str | Path,
    source_id: str | None = None,
    revision: str | None = None,
    notify: Callable[[str], None] = _stderr,
) -> Source:
    """Detect the layout of a local checkpoint folder, validate it, and open its tensors.

    Raises CheckpointError / ConfigError with one line naming the file and tensor at fault.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    extras_dir = folder
    cfg_path = folder / "config.json"
    orig = folder / "original"
    if cfg_path.is_file():
        d = _load_json(cfg_path)
        if not isinstance(d, dict):
            raise ConfigError(f"{cfg_path}: expected a JSON object")
        # MLX's "quantization" entry (ours and mlx-lm's; checkpoints have "quantization_config")
        if "quantization" in d or "gptoss_mlx" in d or _has_our_manifest(folder):
            raise already_converted(folder)
        if "model_type" in d:
            cfg = ModelConfig.from_dict(d, source=str(cfg_path))
            has_hf = (folder / INDEX_NAME).exists() or any(folder.glob("model*.safetensors"))
            if has_hf:
                layout, weights_dir = "hf", folder
            elif (orig / "config.json").is_file():
                layout, weights_dir = "original", orig
            else:
                raise CheckpointError(
                    f"{folder}: has config.json but no weights (model*.safetensors, {INDEX_NAME} "
                    "or original/model.safetensors); download them"
                )
        elif "num_experts" in d:
            layout, weights_dir = "original", folder
        else:
            raise ConfigError(
                f"{cfg_path}: neither a Hugging Face gpt_oss config (model_type) nor OpenAI's "
                "original one (num_experts)"
            )
    elif (orig / "config.json").is_file():
        layout, weights_dir = "original", orig
    else:
        raise CheckpointError(
            f"{folder}: no config.json; pass a gpt-oss checkpoint folder or a hub id like "
            "openai/gpt-oss-20b"
        )
    if layout == "original":
        ocfg = weights_dir / "config.json"
        cfg = ModelConfig.from_original(_load_json(ocfg), source=str(ocfg))
    _mention_ignored(weights_dir, notify)
    if revision is None:
        revision = cache_revision(folder)
    opened: list[SafetensorsFile] = []
    try:
        if layout == "hf":
            entries = _hf_entries(weights_dir, opened)
        else:
            entries = _original_entries(weights_dir, cfg, opened)
        tensors = _validate(entries, cfg, weights_dir, folder)
    except BaseException:
        for f in opened:
            f.close()
        raise
    return Source(
        cfg=cfg,
        layout=layout,
        weights_dir=weights_dir,
        extras_dir=extras_dir,
        source_id=source_id or str(folder.absolute()),
        revision=revision,
        tensors=tensors,
        files=opened,
    )
