"""The gpt-oss models this machine already has: `gptoss-mlx models` lists them, `--model` takes the
names it prints, `gptoss-mlx models rm` removes ours.

Three places are looked at, none of them written to except our own:
- ours: the folders `gptoss-mlx convert` wrote into $GPTOSS_MLX_HOME/models (what `--model REPO`
  converts into on first use); name: the folder's name;
- the Hugging Face cache (huggingface_hub.scan_cache_dir): gpt-oss repos, either checkpoints
  (openai/gpt-oss-20b: converted on first use) or MLX conversions (mlx-community/...: used as they
  are); name: the repo id;
- LM Studio's models folders (~/.lmstudio/models, and ~/.cache/lm-studio/models of older
  versions; $GPTOSS_MLX_LMSTUDIO_MODELS, a list of folders, replaces both): its MLX downloads of
  gpt-oss, at PUBLISHER/MODEL; name: PUBLISHER/MODEL. Its GGUF files are not usable here.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gptoss_mlx.errors import CheckpointError, ConfigError, UsageError
from gptoss_mlx.model.config import ModelConfig
from gptoss_mlx.weights.layout import describe_schemes, schemes_from_config
from gptoss_mlx.weights.loading import MANIFEST
from gptoss_mlx.weights.mlx_folder import is_mlx_folder, shard_names, small_json

from .convert import not_ours
from .download import cached_snapshot, looks_like_repo_id

LMSTUDIO_ENV = "GPTOSS_MLX_LMSTUDIO_MODELS"
LMSTUDIO_DIRS = ("~/.lmstudio/models", "~/.cache/lm-studio/models")

OURS = "gptoss-mlx"
HF_CACHE = "hf-cache"
LMSTUDIO = "lm-studio"


@dataclass
class LocalModel:
    """One model found on this machine."""

    name: str  # what --model takes
    source: str  # OURS, HF_CACHE or LMSTUDIO
    path: Path
    kind: str  # "converted", "mlx" (used as it is) or "checkpoint" (converted on first use)
    quantization: str  # our recipe, or how an MLX folder stores its matrices
    size: int  # bytes on disk
    layers: int | None = None
    note: str = ""  # e.g. "incomplete: 1 of 3 shards" (then it is not usable yet)

    @property
    def complete(self) -> bool:
        """Every weight is here (else --model NAME downloads the rest first, or fails offline)."""
        return not self.note.startswith(("incomplete", "config only"))


def home() -> Path:
    """The folder holding converted models ($GPTOSS_MLX_HOME, default ~/.cache/gptoss-mlx)."""
    return Path(os.environ.get("GPTOSS_MLX_HOME") or "~/.cache/gptoss-mlx").expanduser()


def models_dir() -> Path:
    return home() / "models"


def lmstudio_dirs() -> list[Path]:
    """LM Studio's models folders that exist ($GPTOSS_MLX_LMSTUDIO_MODELS replaces the defaults)."""
    raw = os.environ.get(LMSTUDIO_ENV)
    dirs = raw.split(os.pathsep) if raw is not None else list(LMSTUDIO_DIRS)
    return [p for d in dirs if d and (p := Path(d).expanduser()).is_dir()]


def _folder_size(folder: Path) -> int:
    """Bytes of the files in `folder` (links followed: the HF cache links its snapshots to blobs)."""
    total = 0
    for p in folder.iterdir():
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def missing_shards(folder: Path) -> str:
    """'' when every shard the folder names is there, else a note saying how many are."""
    try:
        names = shard_names(folder)
    except CheckpointError:
        return "incomplete: no weights"
    have = sum((folder / n).is_file() for n in names)
    return "" if have == len(names) else f"incomplete: {have} of {len(names)} shards"


def _gpt_oss_config(folder: Path) -> tuple[dict, ModelConfig] | None:
    raw = small_json(folder / "config.json")
    if not isinstance(raw, dict) or raw.get("model_type") != "gpt_oss":
        return None
    try:
        return raw, ModelConfig.from_dict(raw, source=str(folder / "config.json"))
    except ConfigError:
        return None


def _mlx_model(name: str, source: str, folder: Path) -> LocalModel | None:
    """An MLX conversion made by others, or None when `folder` is not one."""
    found = _gpt_oss_config(folder)
    if found is None or not is_mlx_folder(folder):
        return None
    raw, cfg = found
    try:
        quant = describe_schemes(schemes_from_config(cfg, raw.get("quantization")), "float")
    except ConfigError as e:
        quant = f"unreadable quantization ({e})"
    return LocalModel(
        name,
        source,
        folder,
        "mlx",
        quant,
        _folder_size(folder),
        cfg.num_hidden_layers,
        note=missing_shards(folder),
    )


def ours() -> list[LocalModel]:
    """The converted folders in $GPTOSS_MLX_HOME/models."""
    root = models_dir()
    out = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith(".") or not (folder / MANIFEST).is_file():
            continue  # .NAME.partial-PID: a conversion in progress
        found = _gpt_oss_config(folder)
        if found is None:
            continue
        raw, cfg = found
        meta = raw.get("gptoss_mlx") if isinstance(raw.get("gptoss_mlx"), dict) else {}
        src = meta.get("source") if isinstance(meta.get("source"), dict) else {}
        note = f"from {src['id']}" if isinstance(src.get("id"), str) else ""
        out.append(
            LocalModel(
                folder.name,
                OURS,
                folder,
                "converted",
                str(meta.get("recipe")),
                _folder_size(folder),
                cfg.num_hidden_layers,
                note=note,
            )
        )
    return out


def hf_cache() -> list[LocalModel]:
    """gpt-oss repos in the Hugging Face cache: their main (else newest) revision."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except (CacheNotFound, OSError, ValueError):
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = max(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
        folder = Path(rev.snapshot_path)
        model = _mlx_model(repo.repo_id, HF_CACHE, folder)
        if model is None and (found := _gpt_oss_config(folder)) is not None:
            model = LocalModel(
                repo.repo_id,
                HF_CACHE,
                folder,
                "checkpoint",
                "as released (mxfp4 experts)",
                rev.size_on_disk,
                found[1].num_hidden_layers,
                note=missing_shards(folder),
            )
            if model.note == "incomplete: no weights":
                model.note = "config only (nothing downloaded)"
        if model is not None:
            out.append(model)
    return out


def lmstudio() -> list[LocalModel]:
    """LM Studio's MLX downloads of gpt-oss (PUBLISHER/MODEL folders)."""
    out = []
    for root in lmstudio_dirs():
        for publisher in sorted(p for p in root.iterdir() if p.is_dir()):
            for folder in sorted(p for p in publisher.iterdir() if p.is_dir()):
                model = _mlx_model(f"{publisher.name}/{folder.name}", LMSTUDIO, folder)
                if model is not None:
                    out.append(model)
    return out


def list_models() -> list[LocalModel]:
    """Everything usable here: ours, then the Hugging Face cache, then LM Studio's."""
    return ours() + hf_cache() + lmstudio()


def find_local(name: str) -> Path | None:
    """The folder a name printed by `gptoss-mlx models` stands for, when it is usable as it is
    without the network: one of ours by folder name, an LM Studio download by PUBLISHER/MODEL, a
    complete MLX conversion in the Hugging Face cache by repo id. (Checkpoints are converted by
    resolve.py, which fetches what is missing.)"""
    if name and "/" not in name and name not in (".", ".."):
        folder = models_dir() / name
        if (folder / MANIFEST).is_file():
            return folder
    if name.count("/") == 1 and ".." not in name.split("/"):
        candidates = [root / name for root in lmstudio_dirs()]
        if looks_like_repo_id(name) and (cached := cached_snapshot(name)) is not None:
            candidates.append(cached)
        for folder in candidates:
            if is_mlx_folder(folder) and not missing_shards(folder):
                return folder
    return None


def removal_target(name: str) -> Path:
    """The folder `gptoss-mlx models rm NAME` would remove: one of ours, provably (convert's
    not_ours check). Anything else is refused with one line saying why and what to do."""
    folder = models_dir() / name
    if "/" in name or name in ("", ".", "..") or not (folder.exists() or folder.is_symlink()):
        elsewhere = [m for m in hf_cache() + lmstudio() if m.name == name]
        if elsewhere:
            how = {
                HF_CACHE: f"remove it with `hf cache rm model/{name}` (huggingface_hub)",
                LMSTUDIO: "remove it in LM Studio",
            }[elsewhere[0].source]
            raise UsageError(
                f"{name} is in {elsewhere[0].path}, not one of gptoss-mlx's models; "
                f"{how}; `models rm` only removes what gptoss-mlx converted"
            )
        raise UsageError(
            f"{name}: no such model in {models_dir()}; `gptoss-mlx models` lists the names"
        )
    why = not_ours(folder)
    if why is not None:
        raise UsageError(
            f"{folder} is not a folder gptoss-mlx convert wrote ({why}); refusing to remove it: "
            "remove it yourself if you are sure"
        )
    return folder


def remove(folder: Path) -> None:
    """Remove a folder removal_target() returned (checked once more just before)."""
    why = not_ours(folder)
    if why is not None:
        raise UsageError(f"{folder} changed ({why}); refusing to remove it")
    shutil.rmtree(folder)
