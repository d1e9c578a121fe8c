"""`convert()`: a gpt-oss checkpoint (folder or hub id) -> a complete MLX folder, or nothing.

All output goes to a hidden temporary folder beside OUT that is renamed into place only when every
file is written and fsynced. Errors, Ctrl-C and SIGTERM remove it; leftovers of dead processes are
removed by the next run for the same OUT (when they hold nothing but files convert writes).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gptoss_mlx import __version__
from gptoss_mlx.errors import GptOssError, UsageError
from gptoss_mlx.model.config import ModelConfig
from gptoss_mlx.progress import progress_bar

from . import download as hub
from .recipes import check_dtype, get_recipe, plan_jobs, quantization_config
from .safetensors_io import TensorSpec
from .source import Source, SourceTensor, expected_tensors, open_source
from .writer import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    MANIFEST_NAME,
    FolderWriter,
    ShardedWriter,
    fsync_dir,
    plan_shards,
    remove_tree,
    shard_file_size,
)

DEFAULT_SHARD_SIZE = 5 * 10**9
# Copied from the source when present (the tokenizer and chat format travel with the weights).
EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
_DISK_MARGIN = 64 << 20


class Terminated(KeyboardInterrupt):
    """SIGTERM during a conversion: unwinds like Ctrl-C so the temporary folder is removed."""


@dataclass
class ConvertResult:
    """What a conversion produced."""

    out: Path
    recipe: str
    dtype: str
    num_tensors: int
    size_bytes: int  # every file in OUT, on disk
    seconds: float
    layout: str
    source_id: str
    revision: str | None


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '123' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise UsageError(f"bad size {text!r}; use e.g. 5GB, 500MB or 2GiB")
    unit = m.group(2).rstrip("B") or ""
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    mult |= {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    n = int(float(m.group(1)) * mult[unit])
    if n < 1:
        raise UsageError(f"bad size {text!r}: must be positive")
    return n


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_names(out: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(out.name)}\.(?:partial|old)-(\d+)")


def clean_stale(out: Path) -> list[Path]:
    """Remove temporary folders beside `out` left by conversions whose process is gone."""
    removed = []
    pat = _temp_names(out)
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = pat.fullmatch(p.name)
        if (
            m
            and int(m.group(1)) != os.getpid()
            and not _pid_alive(int(m.group(1)))
            and not p.is_symlink()
            and p.is_dir()
            # half-written or half-removed: only files convert() writes, so nobody else's
            and _only_our_files(p) is None
        ):
            remove_tree(p)
            removed.append(p)
    return removed


_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MAX_MANIFEST_BYTES = 1 << 20  # ours are a few KB; never read a stranger's big file


def written_by_convert(name: str) -> bool:
    """A file name convert() writes into OUT (shards, index, config, manifest, copied files)."""
    return (
        bool(_SHARD_RE.fullmatch(name))
        or name in (INDEX_NAME, "config.json", MANIFEST_NAME, *EXTRA_FILES)
        or (name.startswith("tokenizer") and "/" not in name)
    )


def _only_our_files(path: Path) -> str | None:
    """Why `path` holds something convert() never writes (None: only regular files it writes)."""
    try:
        entries = list(path.iterdir())
    except OSError as e:
        return f"cannot list it ({e.strerror or e})"
    for p in sorted(entries):
        if p.is_symlink():
            return f"{p.name} in it is a symbolic link"
        if p.is_dir():
            return f"{p.name} in it is a folder"
        if not p.is_file():
            return f"{p.name} in it is not a regular file"
        if not written_by_convert(p.name):
            return f"{p.name} in it is not a file gptoss-mlx convert writes"
    return None


def not_ours(path: Path) -> str | None:
    """None if `path` is provably a folder convert() wrote, else the reason it is not.

    Provably ours: a real folder (not a link) whose manifest.json is our format and lists exactly
    the files present (no extra ones, no missing ones), all regular files with names convert()
    writes. An empty folder also qualifies: replacing it loses nothing. Only such folders are
    ever replaced (--force) or removed.
    """
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is not a folder"
    why = _only_our_files(path)
    if why is not None:
        return why
    names = {p.name for p in path.iterdir()}
    if not names:
        return None
    if MANIFEST_NAME not in names:
        return f"it has no {MANIFEST_NAME}"
    manifest = path / MANIFEST_NAME
    try:
        if manifest.stat().st_size > _MAX_MANIFEST_BYTES:
            return f"its {MANIFEST_NAME} is not a gptoss-mlx manifest"
        m = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return f"its {MANIFEST_NAME} is not a gptoss-mlx manifest"
    if (
        not isinstance(m, dict)
        or m.get("format") != FORMAT
        or m.get("format_version") != FORMAT_VERSION
        or not isinstance(m.get("files"), dict)
    ):
        return f"its {MANIFEST_NAME} is not a gptoss-mlx manifest"
    listed = set(m["files"])
    present = names - {MANIFEST_NAME}
    if present - listed:
        return f"{sorted(present - listed)[0]} is not in its {MANIFEST_NAME}"
    if listed - present:
        return f"{sorted(listed - present)[0]}, listed in its {MANIFEST_NAME}, is missing"
    return None


def _path_through_a_file(out: Path) -> Path | None:
    """The first part of `out` (or `out`'s parent chain) that exists but is not a folder."""
    for part in reversed(out.parents):
        if part.exists() and not part.is_dir():
            return part
        if not part.exists():
            return None
    return None


def _refuse_unless_ours(out: Path) -> None:
    why = not_ours(out)
    if why is not None:
        raise UsageError(
            f"{out} is not a folder gptoss-mlx convert wrote ({why}); refusing to replace it "
            "even with --force: remove it yourself or choose another OUT"
        )


def _check_target(out: Path, force: bool, src_dirs: list[Path]) -> None:
    """Refuse an OUT that is (in) the source, runs through a file, or may not be replaced."""
    blocker = _path_through_a_file(out)
    if blocker is not None:
        raise UsageError(
            f"{out}: {blocker} is a file, not a folder; choose an output path inside a folder"
        )
    b = out.resolve()
    for src_dir in src_dirs:
        a = src_dir.resolve()
        if a == b or a.is_relative_to(b) or b.is_relative_to(a):
            raise UsageError(
                f"{out}: the output folder must not be, contain or be inside the source folder "
                f"{src_dir}; choose another OUT"
            )
    if out.exists() or out.is_symlink():
        if not force:
            if out.is_symlink() or not out.is_dir():
                raise UsageError(
                    f"{out} exists and is not a folder; choose another OUT (--force will not "
                    "replace it)"
                )
            raise UsageError(f"{out} already exists; pass --force to replace it")
        _refuse_unless_ours(out)


def _check_space(parent: Path, need: int) -> None:
    free = shutil.disk_usage(parent).free
    if need + _DISK_MARGIN > free:
        raise GptOssError(
            f"{parent}: not enough free disk space: the output needs about {format_bytes(need)}, "
            f"{format_bytes(free)} free"
        )


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into Terminated for the duration (main thread only, as Python requires)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Let cleanup finish even if the user presses Ctrl-C again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _resolve_source(src: str | Path, revision: str | None) -> Source:
    text = str(src)
    if isinstance(src, Path) or not hub.looks_like_repo_id(text):
        if revision is not None:
            raise UsageError("--revision applies to hub repo ids only, not to local folders")
        path = Path(text).expanduser()
        if not path.exists():
            raise UsageError(
                f"{text}: no such folder; pass a gpt-oss checkpoint folder or a hub id like "
                "openai/gpt-oss-20b"
            )
        return open_source(path)
    folder, sha = hub.download(text, revision)
    return open_source(folder, source_id=text, revision=sha)


def convert(
    src: str | Path,
    out: str | Path,
    recipe: str = "mxfp4-q8",
    dtype: str = "bfloat16",
    force: bool = False,
    revision: str | None = None,
    progress: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> ConvertResult:
    """Convert a gpt-oss checkpoint into an MLX model folder at `out`.

    src: a local Hugging Face-layout folder, an OpenAI `original/`-layout folder, or a hub repo id
    (e.g. "openai/gpt-oss-20b", downloaded with huggingface_hub; `revision` pins a branch/tag/sha).
    recipe: "mxfp4-q8" (default), "mxfp4-q4" or "mxfp4-bf16" (see recipes.RECIPES).
    dtype: "bfloat16" or "float32" for unquantized tensors and affine scales/biases.
    force: replace an existing folder at `out` that convert() wrote (its manifest lists exactly
        the files in it; see not_ours) or an empty one, only after the new one is complete.
    progress: show a progress bar and a summary on stderr.

    Raises GptOssError subclasses for user-caused problems; on any failure nothing is left at `out`.
    """
    t0 = time.monotonic()
    rec = get_recipe(recipe)
    check_dtype(dtype)
    if shard_size < 1:
        raise UsageError("shard size must be positive")
    out = Path(out).expanduser().absolute()
    local = Path(str(src)).expanduser()
    _check_target(out, force, [local] if local.exists() else [])

    with _resolve_source(src, revision) as source:
        _check_target(out, force, [source.weights_dir, source.extras_dir])
        jobs = plan_jobs(source.cfg, source.tensors, rec, dtype)
        specs = [s for job in jobs for s in job.specs]
        shards = plan_shards(specs, shard_size)
        extras = _extra_files(source.extras_dir)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GptOssError(
                f"{out.parent}: cannot create the output folder ({e.strerror})"
            ) from None
        clean_stale(out)
        need = sum(shard_file_size(s) for s in shards) + sum(p.stat().st_size for p in extras)
        _check_space(out.parent, need)
        config = _output_config(source, rec.name, dtype)

        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        made: list[Path] = []  # [tmp] once this run created it: only then is it ours to remove
        try:
            with _terminate_as_interrupt():
                try:
                    tmp.mkdir()
                except FileExistsError:
                    raise GptOssError(
                        f"{tmp}: in the way of the temporary folder this conversion needs; move "
                        "it away"
                    ) from None
                except OSError as e:
                    raise GptOssError(f"{out.parent}: cannot write here ({e.strerror})") from None
                made.append(tmp)
                folder = FolderWriter(tmp)
                writer = ShardedWriter(folder, shards)
                bar = progress_bar(
                    sum(s.nbytes for s in specs), "converting", enabled=progress, in_bytes=True
                )
                try:
                    for job in jobs:
                        for name, data in job.produce():
                            writer.write(name, data)
                            bar.update(data.nbytes)
                    writer.close()
                finally:
                    writer.abort()
                    bar.close()
                folder.write_json(INDEX_NAME, writer.index())
                folder.write_json("config.json", config)
                for p in extras:
                    folder.copy_in(p)
                folder.write_manifest()
                fsync_dir(tmp)
                _move_into_place(tmp, out, force)
        except OSError as e:
            with _signals_ignored():
                for p in made:
                    remove_tree(p)
            if e.errno == errno.ENOSPC:
                raise GptOssError(f"{out.parent}: disk full while writing the output") from None
            raise GptOssError(f"{e.filename or out.parent}: {e.strerror or e}") from None
        except BaseException:
            with _signals_ignored():
                for p in made:
                    remove_tree(p)
            raise

    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    result = ConvertResult(
        out=out,
        recipe=rec.name,
        dtype=dtype,
        num_tensors=len(specs),
        size_bytes=size,
        seconds=time.monotonic() - t0,
        layout=source.layout,
        source_id=source.source_id,
        revision=source.revision,
    )
    if progress:
        print(
            f"converted {result.source_id} ({result.layout} layout) -> {out}\n"
            f"  recipe {result.recipe}, dtype {result.dtype}, {result.num_tensors} tensors, "
            f"{format_bytes(size)} on disk, {result.seconds:.1f} s",
            file=sys.stderr,
        )
    return result


def _extra_files(folder: Path) -> list[Path]:
    """The tokenizer / chat-format files of a checkpoint (what download.HF_PATTERNS fetches)."""
    names = {n for n in EXTRA_FILES if (folder / n).is_file()}
    names |= {p.name for p in folder.glob("tokenizer*") if p.is_file()}
    return [folder / n for n in sorted(names)]


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder to `out`; an old `out` is moved aside first, then removed."""
    old = None
    if out.exists() or out.is_symlink():
        # Checked again: OUT may have appeared or changed while the conversion ran.
        if not force:
            raise UsageError(f"{out} already exists; pass --force to replace it")
        _refuse_unless_ours(out)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        remove_tree(old)


def planned_tensors(
    cfg: ModelConfig, recipe: str = "mxfp4-q8", dtype: str = "bfloat16"
) -> list[TensorSpec]:
    """The tensors (name, dtype, shape) a conversion of a `cfg`-shaped checkpoint writes, in
    order, without any file: what the memory table of `gptoss-mlx info` sizes before a download."""
    stand_ins = {
        name: SourceTensor(name, exp.dtypes[0], exp.shape, None, name)  # never read
        for name, exp in expected_tensors(cfg).items()
    }
    return [s for job in plan_jobs(cfg, stand_ins, get_recipe(recipe), dtype) for s in job.specs]


def estimate_output_size(
    cfg: ModelConfig,
    recipe: str = "mxfp4-q8",
    dtype: str = "bfloat16",
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> int:
    """Bytes of the shards a conversion of a `cfg`-shaped bf16 checkpoint writes (no files needed)."""
    shards = plan_shards(planned_tensors(cfg, recipe, dtype), shard_size)
    return sum(shard_file_size(s) for s in shards)


def format_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _output_config(source: Source, recipe: str, dtype: str) -> dict:
    cfg = source.cfg
    q = quantization_config(cfg, get_recipe(recipe))
    d = cfg.to_dict()
    d["quantization"] = q
    d["quantization_config"] = q
    d["gptoss_mlx"] = {
        "format_version": 1,
        "recipe": recipe,
        "dtype": dtype,
        "source": {"id": source.source_id, "revision": source.revision, "layout": source.layout},
        "converter": f"gptoss-mlx {__version__}",
    }
    return d
