"""`gptoss-mlx info` as text: what the model is, then its memory table (engine/memory_table.py).

GB are 10^9 bytes throughout, as in the rest of gptoss-mlx.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..engine.memory_table import FITS, MAC_RAM_GB, WIRED, MemoryTable, Target
from ..weights.loading import ConvertedFolder

_MARK = {FITS: "+", WIRED: "w"}
_GB = 1e9


def _gb(n: int) -> str:
    return f"{n / _GB:.2f}"


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def folder_lines(folder: ConvertedFolder) -> Iterator[str]:
    """What a loadable folder is: ours (manifest) or made by others, its recipe or quantization."""
    raw, cfg = folder.raw_config, folder.config
    yield f"model:      {folder.path}"
    if folder.has_manifest:
        ours = raw.get("gptoss_mlx") or {}
        src = ours.get("source") if isinstance(ours.get("source"), dict) else {}
        yield "format:     gptoss-mlx folder (manifest.json: sizes and sha256 of every file)"
        yield (
            f"source:     {src.get('id')} ({src.get('layout')} layout, revision "
            f"{src.get('revision')})"
        )
        yield f"recipe:     {ours.get('recipe')} (unquantized tensors in {ours.get('dtype')})"
    else:
        yield "format:     MLX folder made by mlx-lm or another tool (no gptoss-mlx manifest)"
    size = sum(int(m["size"]) for m in folder.files.values())
    yield f"on disk:    {size / _GB:.2f} GB in {len(folder.files)} files"
    yield (
        f"model:      {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts "
        f"(top {cfg.num_experts_per_tok}), {cfg.max_position_embeddings} positions"
    )


def config_lines(target: Target) -> Iterator[str]:
    """What a model known only by its config is, and where the config came from."""
    cfg = target.config
    yield f"model:      {target.name} (config {target.origin}; no weights downloaded)"
    what = "an MLX conversion, used as it is" if target.is_mlx_conversion else "a checkpoint"
    yield f"kind:       {what}"
    yield (
        f"model:      {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts "
        f"(top {cfg.num_experts_per_tok}), {cfg.max_position_embeddings} positions"
    )


def table_lines(table: MemoryTable, device_note: str = "") -> Iterator[str]:
    """The storages, then one row per storage x context x batch, then how to read it."""
    yield (
        f"device:     {table.budget / _GB:.1f} GB usable ({table.budget_source}); activations in "
        f"{table.dtype}{device_note}"
    )
    yield "stored as:"
    for s in table.storages:
        yield f"  {s.name:<11} {s.disk / _GB:6.2f} GB of weights on disk: {s.description}"
    on_mac = table.dtype != "bfloat16"  # then a Mac (bfloat16 on the GPU) needs a figure of its own
    macs = " ".join(f"{gb:>3}" for gb in MAC_RAM_GB)
    yield "memory needed (GB):"
    yield (
        f"  {'storage':<11} {'context':>7} {'batch':>5} {'weights':>8} {'KV cache':>8} "
        f"{'working':>8} {'total':>7} {'here':>4}"
        + (f" {'on a Mac':>8}" if on_mac else "")
        + f"  Mac with GB: {macs}"
    )
    for r in table.rows:
        marks = " ".join(f"{_MARK.get(r.macs[gb], '-'):>3}" for gb in MAC_RAM_GB)
        yield (
            f"  {r.storage:<11} {_ctx(r.context):>7} {r.batch:>5} {_gb(r.weights):>8} "
            f"{_gb(r.kv):>8} {_gb(r.working):>8} {_gb(r.total):>7} "
            f"{'yes' if r.fits_here else 'no':>4}"
            + (f" {_gb(r.mac_total):>8}" if on_mac else "")
            + f"  {'':12} {marks}"
        )
    yield (
        "  here: fits this device. Macs: + within macOS's default GPU limit (about 2/3 of the RAM "
        "up to 36 GB, 3/4 above); w once the wired limit is raised (sudo sysctl "
        "iogpu.wired_limit_mb=N, N = the RAM in MB less 4096); - does not fit"
        + ("; Mac figures assume bfloat16 activations on the GPU" if on_mac else "")
    )


def folder_json(folder: ConvertedFolder) -> dict:
    """What folder_lines says, for `info --json`."""
    ours = folder.raw_config.get("gptoss_mlx") if folder.has_manifest else None
    return {
        "path": str(folder.path),
        "format": folder.kind,
        "manifest": folder.has_manifest,
        "recipe": ours.get("recipe") if isinstance(ours, dict) else None,
        "files": len(folder.files),
        "size_bytes": sum(int(m["size"]) for m in folder.files.values()),
    }
