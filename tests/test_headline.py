"""`tirl headline` end to end on the tiny model: both arms (SFT on generated traces, GRPO, held-out
evaluation before and after RL) for two seeds, then the table, the curves and the plot."""

import json

from tirl.cli import main


def test_headline_runs_both_arms_and_plots(tiny_model_dir, tmp_path):
    out = tmp_path / "hl"
    small = [f"model.name={json.dumps(str(tiny_model_dir))}", "rollout.engine=hf", "sft.num_traces=16", "sft.batch_size=8",
             "train.steps=2", "eval.every=2", "eval.limit=3", "rollout.prompts_per_step=2", "rollout.group_size=2",
             "rollout.max_tokens_per_turn=16", "rollout.max_response_tokens=40"]
    assert main(["headline", "--seeds", "0,1", "--out", str(out), "--no-progress", *small]) == 0
    res = json.loads((out / "headline.json").read_text())
    assert set(res["arms"]) == {"mini-retool", "mini-text"} and res["seeds"] == [0, 1]
    for arm, runs in res["arms"].items():
        for seed, curve in runs.items():
            assert [p["step"] for p in curve] == [0, 2]  # after SFT, after RL
            assert all(0.0 <= p["accuracy"] <= 1.0 for p in curve)
            cfg = (out / f"{arm}-seed{seed}" / "config.toml").read_text()
            assert f"seed = {seed}" in cfg
    assert "synthetic:code" in (out / "mini-retool-seed0" / "config.toml").read_text()
    assert "max_tool_calls = 0" in (out / "mini-text-seed0" / "config.toml").read_text()
    table = (out / "headline.md").read_text()
    assert "| mini-retool |" in table and "| mini-text |" in table
    assert (out / "headline.png").stat().st_size > 10_000


def test_the_console_learning_curve_line_names_each_benchmark_accuracy_and_tool_use():
    from tirl.train import _eval_line

    ev = {"eval/synthetic:product@20000/avg@2": 0.9375, "eval/synthetic:product@20000/pass@2": 1.0,
          "eval/synthetic:product@20000/tool_calls_per_traj": 1.0, "eval/gsm8k/avg@2": 0.25, "eval/avg/avg@2": 0.59375}
    assert _eval_line(4, ev) == ("[tirl] held-out @ step 4: synthetic:product@20000 avg@2 0.938 (tool calls 1.00); "
                                 "gsm8k avg@2 0.250 (tool calls 0.00)")
