"""Batch shaping: dynamic sampling, overlong and void-turn filters, resample-on-correct."""

import json
import random

from tirl.config import load_config
from tirl.reward import register_term
from tirl.shaping import has_signal, resample_on_correct, takes_part
from tirl.train import Trainer
from tirl.types import ExecResult, Problem, Segment, ToolCall, Trajectory


def _t(reward=0.0, correct=False, finish="eos", text="\\boxed{1}", errors=0, calls=0, extracted="1"):
    tc = [ToolCall(0, "x", ExecResult("", "E", 1 if i < errors else 0), "o", (0, 0)) for i in range(max(calls, errors))]
    return Trajectory(problem=Problem("p", "q", "1"), group=0, token_ids=[1], mask=[0], logprobs=[0.0], prompt_len=1,
                      segments=[Segment("model", text, 1, 1)], tool_calls=tc, finish_reason=finish, reward=reward,
                      reward_info={"correct": correct, "extracted": extracted})


def test_has_signal():
    assert has_signal([_t(1.0), _t(-1.0)]) and not has_signal([_t(-1.0), _t(-1.0)])


def test_filters():
    assert takes_part(_t(finish="length"), overlong_filter=False, void_turn_filter=False)
    assert not takes_part(_t(finish="length"), overlong_filter=True, void_turn_filter=False)
    void = _t(text="I think about it but write nothing useful")
    assert not takes_part(void, overlong_filter=False, void_turn_filter=True)
    assert takes_part(_t(text="```python\nprint(1)\n```"), overlong_filter=False, void_turn_filter=True)


def test_resample_on_correct_keeps_cleanest_correct_and_random_incorrect():
    pos = [_t(correct=True, errors=e, calls=2) for e in (2, 0, 1)]
    neg = [_t(correct=False) for _ in range(5)]
    kept = resample_on_correct(pos + neg, keep=4, rng=random.Random(0))
    # 3 of 8 correct -> round(4 * 3/8) = 2 correct kept: the ones with 0 and 1 tool errors
    assert len(kept) == 4
    assert sorted(sum(not c.result.ok for c in t.tool_calls) for t in kept if t.reward_info["correct"]) == [0, 1]
    assert sum(not t.reward_info["correct"] for t in kept) == 2


@register_term("toy_half_signal")
def _half(traj, cfg):  # fake term for this test: only odd-numbered prompts get varied rewards
    if int(traj.problem.id[1:]) % 2:
        return 1.0 if traj.token_ids[traj.prompt_len] % 2 else -1.0
    return -1.0


def test_dynamic_sampling_drops_and_refills(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"Say {i}", "answer": "0"}) + "\n" for i in range(40)))
    cfg = load_config(None, [f"model.name={json.dumps(str(tiny_model_dir))}", f"data.source={json.dumps(str(data))}",
                             "reward.terms={toy_half_signal = 1.0, correct = 0.0}", "rollout.engine=hf", "rollout.prompts_per_step=3",
                             "rollout.group_size=6", "rollout.max_tokens_per_turn=8", "rollout.max_response_tokens=8",
                             "rollout.max_tool_calls=0", "algo.dynamic_sampling=true", "algo.dynamic_sampling_rounds=6"])
    t = Trainer(cfg)
    try:
        metrics, trajs = t.step()
    finally:
        t.sandbox.close()
        t.verifier.close()
    assert metrics["shaping/dropped_groups"] >= 1  # the even prompts never have signal
    assert metrics["shaping/groups"] == 3 and len(trajs) == 18
    assert all(int(tr.problem.id[1:]) % 2 for tr in trajs)
    assert {tr.group for tr in trajs} == {0, 1, 2}
