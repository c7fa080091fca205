"""Rewards: small functions ``(trajectory, cfg) -> (reward, info)`` in a registry.

``torl``: +1 if the last ``\\boxed{}`` in the text the *policy* wrote, outside its code blocks,
matches the reference answer, -1 otherwise (no box = wrong). Tool outputs and code never count:
a program that prints ``\\boxed{...}`` earns nothing.
"""

from __future__ import annotations

from typing import Any, Callable

from tirl.reward.extract import last_boxed
from tirl.rollout.protocol import strip_code
from tirl.reward.verify import is_equivalent
from tirl.types import TirlError, Trajectory

RewardFn = Callable[[Trajectory, Any], tuple[float, dict[str, Any]]]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


@register_reward("torl")
def torl_reward(traj: Trajectory, cfg: Any) -> tuple[float, dict[str, Any]]:
    answer = last_boxed(strip_code(traj.policy_text))
    correct = answer is not None and is_equivalent(traj.problem.answer, answer)
    return (cfg.correct if correct else cfg.incorrect), {"correct": correct, "extracted": answer}


def score(trajectories: list[Trajectory], cfg: Any) -> None:
    """Fill ``reward`` and ``reward_info`` of each trajectory in place."""
    try:
        fn = REWARDS[cfg.fn]
    except KeyError:
        raise TirlError(f"unknown reward.fn {cfg.fn!r}; registered: {sorted(REWARDS)}") from None
    for t in trajectories:
        t.reward, t.reward_info = fn(t, cfg)


__all__ = ["REWARDS", "is_equivalent", "last_boxed", "register_reward", "score", "torl_reward"]
