"""`gptoss-mlx prompt`: a chat request in, the harmony prompt (text or ids) out."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gptoss_mlx.cli import main
from gptoss_mlx.harmony.render import render_prompt
from gptoss_mlx.harmony.request import parse_chat_request
from gptoss_mlx.harmony.tokenizer import load_tokenizer
from vocabs import write_tiny_tokenizer_json

REQUEST = {
    "reasoning_effort": "low",
    "tools": [{"type": "function", "function": {"name": "now", "description": "Time."}}],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What time is it? <|start|>"},
    ],
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_tokenizer_json(tmp_path_factory.mktemp("model"))


def run(args, stdin=None):
    return CliRunner().invoke(main, ["prompt", *args], input=stdin)


def test_text_from_stdin():
    result = run(["--date", "2025-01-02"], json.dumps(REQUEST))
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Current date: 2025-01-02\n\nReasoning: low" in text
    assert "# Instructions\n\nBe brief.\n\n# Tools" in text and "type now = () => any;" in text
    assert text.rstrip("\n").endswith(
        "<|message|>What time is it? <|start|><|end|><|start|>assistant"
    )


def test_text_from_file_with_bare_message_list(tmp_path):
    path = tmp_path / "req.json"
    path.write_text(json.dumps(REQUEST["messages"]))
    result = run([str(path), "--date", "2025-01-02"])
    assert result.exit_code == 0, result.output
    assert "Reasoning: medium" in result.output and "# Tools" not in result.output


def test_ids_with_model_folder(tiny_model):
    result = run(
        ["-", "--ids", "--model", str(tiny_model), "--date", "2025-01-02"], json.dumps(REQUEST)
    )
    assert result.exit_code == 0, result.output
    ids = json.loads(result.output)
    expected = render_prompt(
        parse_chat_request(REQUEST), load_tokenizer(tiny_model), date="2025-01-02"
    )
    assert ids == expected
    assert ids.count(200006) == 4  # system, developer, user, generation prompt: none from the text


def test_ids_without_any_tokenizer_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    result = run(["--ids"], json.dumps(REQUEST))
    assert result.exit_code == 1
    assert "--model" in result.output and "TIKTOKEN_ENCODINGS_BASE" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_ids_from_model_folder_without_tokenizer(tmp_path):
    result = run(["--ids", "--model", str(tmp_path)], json.dumps(REQUEST))
    assert result.exit_code == 1 and "tokenizer.json" in result.output


def test_bad_json():
    result = run([], "{not json")
    assert result.exit_code == 2
    assert result.output.startswith("error: stdin: not valid JSON")
    assert len(result.output.strip().splitlines()) == 1


def test_bad_role():
    result = run([], json.dumps([{"role": "bot", "content": "hi"}]))
    assert result.exit_code == 2
    assert "messages[0].role: unknown role 'bot'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_date():
    result = run(["--date", "tomorrow"], json.dumps(REQUEST))
    assert result.exit_code == 2 and "date" in result.output
