"""`tirl headline` end to end on the tiny model: both arms (SFT on generated traces, GRPO, held-out
evaluation before and after RL) for two seeds, then the table, the curves and the plot."""

import json

import pytest

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


@pytest.mark.slow  # ~1 min: the clean-clone suite took 20.8 min with it (make test-all runs it)
def test_mixed_experiment_writes_per_kind_table_and_plot(tiny_model_dir, tmp_path):
    """`tirl headline --experiment mixed`: both arms on the mixed task; the curves, the table and the
    plot are per kind (easy, product), with accuracy and code ratio at every evaluation."""
    out = tmp_path / "mixed"
    small = [f"model.name={json.dumps(str(tiny_model_dir))}", "rollout.engine=hf", "sft.num_traces=8", "sft.batch_size=8",
             "train.steps=1", "eval.every=1", "eval.limit=8", "rollout.prompts_per_step=2", "rollout.group_size=2",
             "rollout.max_tokens_per_turn=8", "rollout.max_response_tokens=16"]
    assert main(["headline", "--experiment", "mixed", "--seeds", "0", "--out", str(out), "--no-progress", *small]) == 0
    res = json.loads((out / "mixed.json").read_text())
    assert set(res["arms"]) == {"mini-mixed", "mini-mixed-cost"}
    for curve in (res["arms"]["mini-mixed"]["0"], res["arms"]["mini-mixed-cost"]["0"]):
        assert [p["step"] for p in curve] == [0, 1]
        for p in curve:
            assert set(p["kinds"]) == {"synthetic:easy", "synthetic:product"}
            assert all(0.0 <= v["code_ratio"] <= 1.0 and 0.0 <= v["accuracy"] <= 1.0 for v in p["kinds"].values())
    assert '"tool_cost" = 0.1' in (out / "mini-mixed-cost-seed0" / "config.toml").read_text()
    table = (out / "mixed.md").read_text()
    assert "| mini-mixed | easy |" in table and "| mini-mixed-cost | product |" in table
    assert (out / "mixed.png").stat().st_size > 10_000


def test_tool_cost_term_counts_calls():
    from tirl.reward import REWARD_TERMS
    from tirl.types import ExecResult, Problem, ToolCall, Trajectory

    t = Trajectory(problem=Problem(id="p", problem="q", answer="1"), group=0, token_ids=[1], mask=[0], logprobs=[0.0],
                   prompt_len=1)
    assert REWARD_TERMS["tool_cost"](t, None) == 0.0
    t.tool_calls = [ToolCall(turn=0, code="print(1)", result=ExecResult("1\n", "", 0), observation="1", span=(1, 1))] * 2
    assert REWARD_TERMS["tool_cost"](t, None) == -2.0
