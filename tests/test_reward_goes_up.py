"""'Reward goes up': the real loop (HF engine, sandbox, GRPO update) learns a toy task.

Task: the tiny random model must start its answer with a digit. Its tokenizer was trained on
number-heavy text, so ~45% of first tokens start with a digit at step 1; the test asserts the
rate climbs to > 85% within 50 CPU steps (seen: 0.47 -> 0.97, about 12 s). The reward is a toy
function registered for this test; everything else is real. (Until the HF engine sampled from the
full distribution, it drew from the top 50 tokens only; with that sampler the task took 40 steps
at lr 3e-3, 0.37 -> 0.93; with the correct one the same settings reach 0.80, see RESULTS.md.)
"""

import json
import statistics

from tirl.config import load_config
from tirl.reward import register_term
from tirl.train import Trainer


@register_term("toy_starts_with_digit")
def _starts_with_digit(traj, cfg):
    text = traj.policy_text.lstrip()
    return 1.0 if text and text[0].isdigit() else -1.0


def test_reward_goes_up_on_toy_task(tiny_model_dir, tmp_path):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"problem": f"Say a number {i}", "answer": "0"}) + "\n" for i in range(8)))
    cfg = load_config(None, [
        f"model.name={json.dumps(str(tiny_model_dir))}", f"data.source={json.dumps(str(data))}", "reward.terms={toy_starts_with_digit = 1.0, correct = 0.0}", "rollout.engine=hf",
        "rollout.prompts_per_step=4", "rollout.group_size=8", "rollout.max_tokens_per_turn=4", "rollout.max_response_tokens=4",
        "rollout.max_tool_calls=0", "rollout.temperature=1.0", "optim.lr=5e-3", "optim.micro_batch_size=32", "train.seed=0",
    ])
    trainer = Trainer(cfg)
    acc = [(trainer.step()[0]["reward_mean"] + 1) / 2 for _ in range(50)]  # fraction starting with a digit
    first, last = statistics.fmean(acc[:5]), statistics.fmean(acc[-5:])
    print(f"accuracy first 5 steps {first:.2f}, last 5 steps {last:.2f}:", " ".join(f"{a:.2f}" for a in acc))
    assert first < 0.6  # starts near chance: first 5 steps 0.47 on the CPU (its own sampling stream)
    assert last > 0.85 and last > first + 0.35
