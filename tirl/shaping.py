"""Batch shaping between reward and advantage: which groups and trajectories the update sees.

* **dynamic sampling** (DAPO): drop groups whose rewards are all equal (no GRPO signal) and
  refill with fresh prompts, up to a number of extra rounds;
* **overlong filtering** (DAPO): truncated trajectories take no part in the loss (their group
  statistics still count);
* **void-turn filtering** (SimpleTIR): trajectories with a turn that has neither a complete code
  block nor a final answer take no part in the loss;
* **resample-on-correct** (rStar2-Agent, GRPO-RoC): sample ``k x G`` per prompt, keep G: the
  correct ones with the fewest tool errors and format problems, the incorrect ones uniformly at
  random, in the oversampled proportion.
"""

from __future__ import annotations

import random

from tirl.reward import void_turn
from tirl.types import Trajectory


def has_signal(group: list[Trajectory]) -> bool:
    return len({t.reward for t in group}) > 1


def takes_part(t: Trajectory, overlong_filter: bool, void_turn_filter: bool) -> bool:
    if overlong_filter and t.finish_reason == "length":
        return False
    return not (void_turn_filter and void_turn(t))


def _quality_cost(t: Trajectory) -> tuple[int, int]:
    """Fewer failed tool calls first, then fewer format problems (no extractable answer, truncation)."""
    errors = sum(0 if c.result.ok else 1 for c in t.tool_calls)
    fmt = int(t.reward_info.get("extracted") is None) + int(t.finish_reason == "length")
    return errors, fmt


def resample_on_correct(group: list[Trajectory], keep: int, rng: random.Random) -> list[Trajectory]:
    pos = [t for t in group if t.reward_info.get("correct")]
    neg = [t for t in group if not t.reward_info.get("correct")]
    n_pos = min(len(pos), round(keep * len(pos) / max(len(group), 1)))
    n_pos = max(n_pos, min(len(pos), keep - len(neg)))  # fill with positives if negatives run out
    chosen = sorted(pos, key=_quality_cost)[:n_pos] + rng.sample(neg, min(len(neg), keep - n_pos))
    return chosen
