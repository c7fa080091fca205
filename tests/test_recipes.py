"""Every recipe parses, refuses to start on a machine too small for it, and a scaled-down copy
(tiny model, 2 steps) runs on CPU."""

import json

import pytest

from tirl.config import RECIPES_DIR, load_config
from tirl.train import Trainer
from tirl.types import TirlError

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def test_the_papers_recipes_exist():
    assert {"demo", "torl-1.5b", "torl-7b", "retool-32b", "retool-dapo"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_parses(name):
    cfg = load_config(name)
    assert cfg.recipe == name


@pytest.mark.parametrize("name", [r for r in RECIPES if load_config(r).requirements.min_gpus > 0])
def test_cluster_recipe_says_why_before_loading(name, monkeypatch):
    import tirl.train

    monkeypatch.setattr(tirl.train, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking"))
    with pytest.raises(TirlError, match="GPUs"):
        Trainer(load_config(name))


@pytest.mark.parametrize("name", RECIPES)
def test_scaled_down_recipe_runs_two_steps(name, tiny_model_dir, tmp_path):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(6)))
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "response": f"<code>\n```python\nprint({i}+{i})\n```\n</code>"
                                          f"\n<interpreter>\n{2 * i}\n</interpreter>\n\n<answer>\\boxed{{{2 * i}}}</answer>"}) + "\n" for i in range(6)))
    cfg = load_config(name, [
        "requirements.min_gpus=0", "rollout.engine=hf", f"model.name={json.dumps(str(tiny_model_dir))}", "model.dtype=float32",
        f"data.source={json.dumps(str(data))}", 'data.problem_field="problem"', 'data.answer_field="answer"',
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_tokens_per_turn=16", "rollout.max_response_tokens=32",
        "eval.every=0", "train.steps=2", f"train.output_dir={json.dumps(str(tmp_path))}", "train.save_every=0",
        "algo.mini_batches=1", f"sft.data={json.dumps(str(traces))}", "sft.steps=2", "sft.batch_size=2", "sft.max_len=128",
        "algo.critic_warmup=1",
    ])
    t = Trainer(cfg)
    try:
        assert bool(t.sft_log) == cfg.sft.before_rl  # retool-32b: SFT ran first
        for _ in range(2):
            metrics, trajs = t.step()
            assert len(trajs) == 4
        assert metrics["update/logprob_mismatch"] < 1e-3  # step 2 always updates the actor
    finally:
        t.sandbox.close()
        t.verifier.close()
