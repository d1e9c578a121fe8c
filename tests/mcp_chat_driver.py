"""Run `gptoss-mlx ARGS...` in a process of its own, on the scripted model of scripted_chat.py, for
the tests only a real process can do: signals, a real terminal, servers left behind.

    python tests/mcp_chat_driver.py TURNS_JSON ARGS...

TURNS_JSON is the model's turns in order, each ["call", NAME, ARGUMENTS] (a tool call) or
["final", TEXT] (an answer). The model is loaded instead of --model; everything else is the CLI.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from scripted_chat import ScriptedModel, final_answer, make_tokenizer, tool_call  # noqa: E402


def main() -> None:
    turns, args = json.loads(sys.argv[1]), sys.argv[2:]
    tok = make_tokenizer(Path(tempfile.mkdtemp(prefix="gptoss-driver-")))
    scripts = [
        tool_call(tok, "plan", t[1], t[2]) if t[0] == "call" else final_answer(tok, "ok", t[1])
        for t in turns
    ]
    model = ScriptedModel(tok.vocab_size, scripts)

    import gptoss_mlx.convert.resolve as resolve
    import gptoss_mlx.engine.runtime as runtime

    resolve.resolve_model = lambda spec, **kw: Path("scripted")
    runtime.load_for_inference = lambda path, max_context=None, **kw: (
        model,
        tok,
        max_context or 131072,
    )
    from gptoss_mlx.cli import main as cli

    cli(args, prog_name="gptoss-mlx")


if __name__ == "__main__":
    main()
