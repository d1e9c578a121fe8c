"""The config.json of each model OpenAI released, shipped inside the package (configs/), so that
`gptoss-mlx info openai/gpt-oss-20b` can size a model before anything is downloaded, offline too.

They are the Hugging Face repos' own files, unchanged; only architecture hyper-parameters matter
here, and a released model's never change.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

KNOWN = {
    "openai/gpt-oss-20b": "gpt-oss-20b.json",
    "openai/gpt-oss-120b": "gpt-oss-120b.json",
}


def known_config(repo_id: str) -> dict[str, Any] | None:
    """The shipped config.json of hub repo `repo_id` (case as on the hub), or None."""
    name = KNOWN.get(repo_id)
    if name is None:
        return None
    text = resources.files(__package__).joinpath("configs", name).read_text(encoding="utf-8")
    return json.loads(text)
