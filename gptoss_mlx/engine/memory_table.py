"""The memory calculator: what a gpt-oss model needs at each context, batch and way of storing it,
and which machines it fits, before anything but its config.json is downloaded.

`gptoss-mlx info` shows it for a hub id, an unconverted checkpoint folder or a converted folder.
Every figure comes from where the rest of gptoss-mlx gets it, so they agree: the weights of our
recipes from the converter's own plan of the tensors it would write (convert.planned_tensors,
the same plan estimate_output_size sizes), of a converted folder from its validated shard headers,
of an MLX conversion not yet downloaded from the layout its config.json implies
(layout.schemes_from_config); KV cache and working memory from the preflight's arithmetic
(memory.plan_for). So a recipe's row before the download equals `info` on the folder converted
with it (tests/test_memory_table.py).

Macs: macOS lets the GPU wire about 2/3 of the RAM on machines up to 36 GB and 3/4 above (the
recommendedMaxWorkingSetSize Metal reports and MLX's preflight uses: 10.7 GiB of 16, 48 GiB of
64); `sudo sysctl iogpu.wired_limit_mb=N` raises that limit, and we then count the RAM less 4 GiB
left to macOS. Figures for Macs assume bfloat16 activations (MLX on the GPU); figures for this
machine use its own activation dtype (float32 on MLX's CPU backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from gptoss_mlx.convert import download as hub
from gptoss_mlx.convert.convert import estimate_output_size, planned_tensors
from gptoss_mlx.convert.download import looks_like_repo_id
from gptoss_mlx.convert.local_models import find_local
from gptoss_mlx.convert.recipes import RECIPES, quantization_config
from gptoss_mlx.convert.resolve import DEFAULT_MODEL, cache_path, is_converted, usable_as_is

from ..errors import ConfigError, UsageError
from ..model.config import ModelConfig
from ..model.known_configs import known_config
from ..weights.layout import (
    describe_schemes,
    layout_weights,
    resolve_schemes,
    schemes_from_config,
)
from ..weights.loading import ConvertedFolder, default_dtype, inspect_folder, read_json
from ..weights.mlx_folder import FLOAT_CODES
from .memory import device_budget, loaded_bytes, plan_for

CONTEXTS = (4096, 8192, 16384, 32768, 65536, 131072)
MAC_RAM_GB = (16, 24, 32, 48, 64, 96, 128)
MACOS_RESERVE = 4 << 30  # left to macOS when the wired limit is raised
_GIB = 1 << 30
# How a Mac column reads: fits macOS's default GPU limit, only with the wired limit raised, or not.
FITS, WIRED, NO = "default", "wired", "no"


def mac_limits(ram_gb: int) -> tuple[int, int]:
    """(macOS's default GPU working-set limit, the limit raised with iogpu.wired_limit_mb) in bytes
    for a Mac with `ram_gb` GB of unified memory."""
    ram = ram_gb * _GIB
    default = ram * 2 // 3 if ram_gb <= 36 else ram * 3 // 4
    return default, max(default, ram - MACOS_RESERVE)


@dataclass
class Storage:
    """One way of storing the model: a recipe of ours, or how a folder or repo stores it."""

    name: str  # recipe name, or "as stored"
    description: str  # how its matrices are stored (layout.describe_schemes)
    disk: int  # bytes of its weight shards on disk
    tensors: list[tuple[tuple[int, ...], str]]  # (shape, safetensors dtype) of every tensor


@dataclass
class Row:
    storage: str
    context: int
    batch: int
    weights: int
    kv: int
    working: int
    total: int  # on this machine, in its activation dtype
    mac_total: int  # on a Mac (bfloat16 activations)
    fits_here: bool
    macs: dict[int, str]  # RAM in GB -> FITS, WIRED or NO


@dataclass
class MemoryTable:
    """Every storage x context x batch of one model, with where each fits."""

    model: str
    origin: str  # where the config came from
    config: ModelConfig
    dtype: str  # this machine's activation dtype
    budget: int
    budget_source: str
    storages: list[Storage]
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        c = self.config
        macs = []
        for gb in MAC_RAM_GB:
            default, raised = mac_limits(gb)
            macs.append(
                {"ram_gb": gb, "default_limit_bytes": default, "raised_limit_bytes": raised}
            )
        return {
            "model": self.model,
            "config_from": self.origin,
            "architecture": {
                "layers": c.num_hidden_layers,
                "experts": c.num_local_experts,
                "experts_per_token": c.num_experts_per_tok,
                "max_context": c.max_position_embeddings,
            },
            "this_machine": {
                "budget_bytes": self.budget,
                "budget_source": self.budget_source,
                "activation_dtype": self.dtype,
            },
            "macs": macs,
            "storages": [
                {"name": s.name, "quantization": s.description, "disk_bytes": s.disk}
                for s in self.storages
            ],
            "rows": [
                {
                    "storage": r.storage,
                    "context": r.context,
                    "batch": r.batch,
                    "weights_bytes": r.weights,
                    "kv_cache_bytes": r.kv,
                    "working_bytes": r.working,
                    "total_bytes": r.total,
                    "mac_total_bytes": r.mac_total,
                    "fits_here": r.fits_here,
                    "macs": {str(gb): v for gb, v in r.macs.items()},
                }
                for r in self.rows
            ],
        }


def recipe_storages(cfg: ModelConfig) -> list[Storage]:
    """Each of our recipes, as the converter would write it (bfloat16, its default)."""
    out = []
    for name, recipe in RECIPES.items():
        specs = planned_tensors(cfg, name)
        schemes = resolve_schemes(cfg, quantization_config(cfg, recipe), {s.name for s in specs})
        out.append(
            Storage(
                name,
                describe_schemes(schemes, "bf16"),
                estimate_output_size(cfg, name),
                [(s.shape, s.dtype) for s in specs],
            )
        )
    return out


def folder_storage(folder: ConvertedFolder) -> Storage:
    """How a checked folder stores the model, from its shard headers."""
    tensors = [(t.shape, t.dtype) for h in folder.headers.values() for t in h.tensors.values()]
    floats = {d for _, d in tensors if d in FLOAT_CODES}
    name = folder.raw_config.get("gptoss_mlx", {}).get("recipe") if folder.has_manifest else None
    return Storage(
        name or "as stored",
        describe_schemes(folder.schemes, "/".join(sorted(floats)).lower() or "float"),
        sum(h.size for h in folder.headers.values()),
        tensors,
    )


def config_storage(cfg: ModelConfig, raw: dict[str, Any], source: str) -> Storage:
    """How an MLX conversion stores the model, from its config.json alone (before a download)."""
    schemes = schemes_from_config(cfg, raw.get("quantization"), source)
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
    code = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(str(dtype), "BF16")
    specs = layout_weights(cfg, code, schemes, source)
    tensors = [(s.shape, s.dtype) for s in specs.values()]
    disk = loaded_bytes(tensors, {"BF16": 2, "F16": 2, "F32": 4}[code])
    return Storage("as stored", describe_schemes(schemes, code.lower()), disk, tensors)


def build_table(
    model: str,
    origin: str,
    cfg: ModelConfig,
    storages: list[Storage],
    batches: tuple[int, ...] = (1,),
    dtype: mx.Dtype | None = None,
    budget: tuple[int, str] | None = None,
) -> MemoryTable:
    """Every storage x context (4k..128k, up to the model's limit) x batch."""
    here = dtype or default_dtype()
    budget = budget or device_budget()
    table = MemoryTable(
        model, origin, cfg, str(here).rsplit(".", 1)[-1], budget[0], budget[1], storages
    )
    limit = cfg.max_position_embeddings
    contexts = [c for c in CONTEXTS if c <= limit] or [limit]
    for s in storages:
        plan = plan_for(cfg, loaded_bytes(s.tensors, here.size), here, budget=budget)
        mac = plan_for(cfg, loaded_bytes(s.tensors, 2), mx.bfloat16, budget=(0, "a Mac"))
        for context in contexts:
            for batch in batches:
                mac_total = mac.total(context, batch)
                fits = {}
                for gb in MAC_RAM_GB:
                    default, raised = mac_limits(gb)
                    fits[gb] = (
                        FITS if mac_total <= default else WIRED if mac_total <= raised else NO
                    )
                table.rows.append(
                    Row(
                        s.name,
                        context,
                        batch,
                        plan.weights,
                        plan.kv(context, batch),
                        plan.working,
                        plan.total(context, batch),
                        mac_total,
                        plan.fits(context, batch),
                        fits,
                    )  # fmt: skip
                )
    return table


@dataclass
class Target:
    """What `gptoss-mlx info SPEC` is about: a loadable folder, or a config before any weights."""

    name: str
    origin: str
    config: ModelConfig
    raw: dict[str, Any]
    folder: ConvertedFolder | None = None  # when it is a folder the loader reads

    @property
    def is_mlx_conversion(self) -> bool:
        """A config of an MLX conversion (its own quantization) rather than of a checkpoint."""
        return self.folder is None and "quantization" in self.raw


def _checkpoint_config(folder: Path) -> tuple[dict[str, Any], ModelConfig]:
    """The config of an unconverted checkpoint folder (Hugging Face layout, or OpenAI's
    original/ layout), without reading any weights."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file() and (folder / "original" / "config.json").is_file():
        cfg_path = folder / "original" / "config.json"
    if not cfg_path.is_file():
        raise UsageError(
            f"{folder}: no config.json; pass a gpt-oss folder (converted or not) or a hub repo id"
        )
    raw = read_json(cfg_path)
    if isinstance(raw, dict) and "model_type" not in raw and "num_experts" in raw:
        return raw, ModelConfig.from_original(raw, source=str(cfg_path))
    return raw, ModelConfig.from_dict(raw, source=str(cfg_path))


def locate(spec: str | None) -> Target:
    """Find what `spec` names without downloading weights: a folder the loader reads (a path, a
    name `gptoss-mlx models` prints, a converted copy in $GPTOSS_MLX_HOME), an unconverted
    checkpoint folder, or a hub repo: its config shipped with gptoss-mlx (OpenAI's releases) or
    its config.json alone from the hub (the local Hugging Face cache when offline)."""
    spec = spec or DEFAULT_MODEL
    local = Path(spec).expanduser()
    if local.is_dir():
        if usable_as_is(local):
            checked = inspect_folder(local)
            return Target(spec, "folder", checked.config, checked.raw_config, checked)
        raw, cfg = _checkpoint_config(local)
        return Target(spec, "checkpoint folder", cfg, raw)
    if local.exists():
        raise UsageError(f"{spec}: is a file; pass a model folder or a hub repo id")
    named = find_local(spec)
    if named is None and is_converted(cache_path(spec)):
        named = cache_path(spec)
    if named is not None:
        checked = inspect_folder(named)
        return Target(str(named), "folder", checked.config, checked.raw_config, checked)
    if not looks_like_repo_id(spec):
        raise UsageError(
            f"{spec}: no such folder or model name (gptoss-mlx models lists them), and not a "
            f"Hugging Face repo id like {DEFAULT_MODEL}"
        )
    raw = known_config(spec)
    origin = "built into gptoss-mlx"
    if raw is None:
        raw, origin = hub.fetch_config(spec), "config.json from the Hugging Face Hub"
    if raw.get("model_type") != "gpt_oss":
        raise ConfigError(f"{spec}: model_type is {raw.get('model_type')!r}, not a gpt-oss model")
    return Target(spec, origin, ModelConfig.from_dict(raw, source=f"{spec}/config.json"), raw)


def table_for(target: Target, batches: tuple[int, ...] = (1,), **kw: Any) -> MemoryTable:
    """The memory table of a located target: a folder as it is stored, an MLX conversion's config
    as it declares, a checkpoint (folder or repo) in each of our recipes."""
    if target.folder is not None:
        storages = [folder_storage(target.folder)]
    elif target.is_mlx_conversion:
        storages = [config_storage(target.config, target.raw, f"{target.name}/config.json")]
    else:
        storages = recipe_storages(target.config)
    return build_table(target.name, target.origin, target.config, storages, batches, **kw)
