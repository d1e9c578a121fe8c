"""The package's layers, kept true as the code grows.

Every module is imported, and every `import` statement in the source (module level or inside a
function) is read with `ast`: a module may import only its own layer and the layers below it.
Commands that never run a model must not import mlx-lm or transformers (seconds of start-up).
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gptoss_mlx"

# Rank of each layer; a module may import modules of equal or lower rank only. `convert` (the
# top-level convert/ folder, installed as gptoss_mlx.convert) may use model and weights; the front
# ends (cli, server) sit above it.
RANK = {
    "errors": 0,
    "progress": 0,
    "model": 1,
    "weights": 2,
    "harmony": 3,
    "convert": 3,
    "engine": 4,
    "chat": 5,  # gptoss_mlx/chat.py: the README's import path for ChatSession (a re-export)
    "__init__": 5,  # the package root exports load, load_model, ChatSession lazily
    "server": 6,
    "cli": 7,  # the command line launches the server (`gptoss-mlx serve`); never the reverse
}
# Within a rank, what may not import what.
FORBIDDEN_SAME_RANK = {("harmony", "convert")}


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        found.append((".".join(("gptoss_mlx", *rel.parts)).removesuffix(".__init__"), path))
    for path in sorted((ROOT / "convert").rglob("*.py")):
        rel = path.relative_to(ROOT / "convert").with_suffix("")
        found.append((".".join(("gptoss_mlx.convert", *rel.parts)).removesuffix(".__init__"), path))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> list[str]:
    """Every gptoss_mlx module that `path` imports, resolved to absolute names."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("gptoss_mlx")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("gptoss_mlx"):
                continue
            if node.module is None or target == "gptoss_mlx":
                out += [f"{target}.{a.name}" for a in node.names]
            else:
                out.append(target)
    return out


MODULES = _modules()


def test_every_layer_is_known():
    unknown = {_layer(m) for m, _ in MODULES} - set(RANK)
    assert not unknown, f"modules outside the known layers: {unknown}; add them to RANK"


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_only_run_downward(module, path):
    mine = _layer(module)
    bad = []
    for target in _imports(module, path):
        theirs = _layer(target)
        if theirs == "__version__":
            continue  # the version string in the package root
        if theirs not in RANK:
            bad.append(f"{target} (unknown layer)")
        elif RANK[theirs] > RANK[mine] or (mine, theirs) in FORBIDDEN_SAME_RANK:
            bad.append(f"{target} ({theirs} is above {mine})")
    assert not bad, f"{module} imports upward: {bad}"


@pytest.mark.parametrize("module", [m for m, _ in MODULES if not m.endswith("__main__")])
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_layering_check_catches_an_upward_import(tmp_path):
    # The checker itself: a model module importing the engine must be reported.
    bad = tmp_path / "bad.py"
    bad.write_text("from ..engine.generate import prefill\nimport gptoss_mlx.cli\n")
    found = _imports("gptoss_mlx.model.bad", bad)
    assert found == ["gptoss_mlx.engine.generate", "gptoss_mlx.cli"]


HEAVY = ("mlx_lm", "transformers")
PROBE = """
import json, sys
from gptoss_mlx.cli import main
try:
    main(sys.argv[1:], prog_name="gptoss-mlx", standalone_mode=False)
except SystemExit:
    pass
except Exception as e:  # click usage errors and our own one-line errors
    print(type(e).__name__, e, file=sys.stderr)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"mlx_lm", "transformers"})
print(json.dumps(heavy), file=sys.__stdout__)
"""


def _heavy_after(*args: str, cwd: Path | None = None) -> list[str]:
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["generate", "--help"],
        ["chat", "--help"],
        ["batch", "--help"],
        ["serve", "--help"],
        ["generate", "--top-k"],  # an argument error
        ["verify", "/nonexistent-folder"],
        ["info", "/nonexistent-folder"],
        ["info", "openai/gpt-oss-120b"],  # the memory table from the shipped config
        ["models"],
    ],
    ids=lambda a: " ".join(a),
)
def test_commands_without_a_model_do_not_import_mlx_lm(args):
    assert _heavy_after(*args) == []


def test_prompt_does_not_import_mlx_lm(tmp_path):
    req = tmp_path / "req.json"
    req.write_text('[{"role": "user", "content": "Hi"}]')
    assert _heavy_after("prompt", str(req), "--date", "2025-01-01") == []


def test_info_and_verify_on_a_model_do_not_import_mlx_lm(tmp_path, tiny_hf_checkpoint):
    from gptoss_mlx.convert.convert import convert

    folder = convert(tiny_hf_checkpoint, tmp_path / "mlx", progress=False).out
    assert _heavy_after("info", str(folder)) == []
    assert _heavy_after("verify", str(folder)) == []


def test_the_probe_sees_mlx_lm_when_a_command_loads_it():
    # Without this, an empty list above could mean the probe is blind.
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE.replace("main(sys.argv", "import mlx_lm.models.cache; main(sys.argv"),
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "mlx_lm" in res.stdout
