"""`gptoss-mlx bench`: it runs on a tiny converted model, prints every figure, and --json parses.

No timing is asserted (shared CI machines are noisy); the harness's own logic (ratios over run
pairs, the batched prefill it drives) is checked with exact values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from conftest import make_tiny_config
from gptoss_mlx.cli import main
from gptoss_mlx.engine import bench
from gptoss_mlx.engine.generate import prefill_ids

ROW_LABELS = [label for _, label, _ in bench.ROWS]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(Hugging Face-layout source, its mxfp4-q8 conversion) of a tiny random model."""
    from gptoss_mlx.convert.convert import convert
    from gptoss_mlx.convert.synthetic import write_hf_checkpoint

    root = tmp_path_factory.mktemp("bench")
    src = write_hf_checkpoint(root / "hf", make_tiny_config(), seed=0)
    convert(src, root / "mlx", recipe="mxfp4-q8", progress=False)
    return src, root / "mlx"


def run_cli(*args: str):
    return CliRunner().invoke(main, ["bench", *args])


def test_text_report_prints_every_figure(folders):
    _, converted = folders
    res = run_cli("-m", str(converted), "--prompt-tokens", "12", "--gen-tokens", "3", "--runs", "1")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "gptoss-mlx" in out and "mlx-lm" not in out
    assert "prompt 12 tokens x batch 1, 3 decode steps, 1 runs" in out
    for label in ROW_LABELS:
        line = next(ln for ln in out.splitlines() if ln.startswith(label))
        assert math.isfinite(float(line.split()[-1]))
    assert "run 1/1 gptoss-mlx" in res.stderr  # progress goes to stderr


def test_json_compare_with_mlx_lm(folders):
    src, converted = folders
    res = run_cli(
        "-m", str(converted), "--compare-mlx-lm", str(src), "--prompt-tokens", "20",
        "--prefill-chunk", "8", "--gen-tokens", "2", "--batch", "2", "--runs", "2", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["setup"]["layers"] == 3 and d["setup"]["recipe"] == "mxfp4-q8"
    assert d["setup"]["prefill_chunk"] == 8 and d["setup"]["batch"] == 2
    assert set(d["engines"]) == {bench.OURS, bench.MLX_LM}
    for e in d["engines"].values():
        assert len(e["runs"]) == 2
        assert set(e["median"]) == set(bench.METRICS)
        assert all(v > 0 and math.isfinite(v) for v in e["median"].values())
    ratios = d["ratios"][f"{bench.OURS}/{bench.MLX_LM}"]
    assert set(ratios) == set(bench.METRICS)


def test_compare_refuses_a_different_model(folders, tmp_path):
    from gptoss_mlx.convert.synthetic import write_hf_checkpoint

    _, converted = folders
    other = write_hf_checkpoint(tmp_path / "hf2", make_tiny_config(num_hidden_layers=2), seed=0)
    res = run_cli("-m", str(converted), "--compare-mlx-lm", str(other), "--runs", "1")
    assert res.exit_code == 2
    assert "pass the folder it was converted from" in res.output


def test_ratios_are_medians_over_run_pairs():
    def r(x: float) -> bench.RunResult:
        return bench.RunResult(x, x, x, x, x, int(x), x)

    rep = bench.BenchReport(setup={}, baseline=bench.MLX_LM)
    rep.runs = {bench.OURS: [r(2), r(9), r(3)], bench.MLX_LM: [r(1), r(3), r(1)]}
    assert rep.median(bench.OURS)["decode_tps"] == 3
    # pairs: 2/1, 9/3, 3/1 -> median 3 (the ratio of medians would be 3/1 too; 9/3 shows pairing)
    assert rep.ratios(bench.OURS, bench.MLX_LM)["decode_tps"] == 3
    rep.runs[bench.OURS] = [r(2), r(9), r(4)]
    assert rep.ratios(bench.OURS, bench.MLX_LM)["decode_tps"] == 3  # 2, 3, 4
    assert rep.to_dict()["ratios"][f"{bench.OURS}/{bench.MLX_LM}"]["host_ms"] == 3


def test_batched_chunked_prefill_matches_one_pass(folders):
    from gptoss_mlx import load_model

    _, converted = folders
    model = load_model(converted)
    ids = bench.random_prompt(model.config.vocab_size, batch=2, length=19, seed=1)
    want = model(ids)[:, -1]
    got = prefill_ids(model, ids, model.make_cache(), chunk=4)
    assert got.shape == (2, model.config.vocab_size)
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()
