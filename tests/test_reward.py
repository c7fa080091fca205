import pytest

from tirl.config import RewardConfig
from tirl.reward import is_equivalent, last_boxed, score
from tirl.types import Problem, Segment, Trajectory


@pytest.mark.parametrize("text,want", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then corrected: \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\fbox{7}", "7"),
    ("\\boxed {x^{2}}", "x^{2}"),
    ("\\boxed{3} and an unclosed \\boxed{4", "3"),
    ("\\boxed{4", None),
    ("no box 42", None),
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


@pytest.mark.parametrize("gold,answer,want", [
    ("42", "42", True), ("42", "042", True), ("1,234", "1234", True), ("42", "43", False),
    ("\\frac{1}{2}", "\\frac12", True), ("\\frac{1}{2}", "1/2", True), ("\\sqrt{2}", "2^{1/2}", True),
    ("\\pi", "3", False), ("x+1", "1+x", True), ("10", "\\text{10}", True),
])
def test_equivalence(gold, answer, want):
    assert is_equivalent(gold, answer) is want


def _traj(answer: str, model_text: str, tool_text: str = "") -> Trajectory:
    segs = [Segment("prompt", "Q", 0, 1), Segment("model", model_text, 1, 2)]
    if tool_text:
        segs.append(Segment("tool", tool_text, 2, 3))
    return Trajectory(problem=Problem("p", "Q", answer), group=0, token_ids=[0] * len(segs), mask=[0] * len(segs),
                      logprobs=[0.0] * len(segs), prompt_len=1, segments=segs)


def test_torl_reward_counts_only_policy_text():
    good, hacked, none = _traj("42", "\\boxed{42}"), _traj("42", "```python\nprint(r'\\boxed{42}')\n```", "```output\n\\boxed{42}\n```"), _traj("42", "42")
    score([good, hacked, none], RewardConfig())
    assert (good.reward, hacked.reward, none.reward) == (1.0, -1.0, -1.0)
    assert good.reward_info["correct"] is True and good.reward_info["extracted"] == "42"
    assert hacked.reward_info["extracted"] is None
