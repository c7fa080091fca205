"""Advantage estimators: pure functions over a ``[P, G]`` reward tensor (P prompts x G samples).

Registered by name in ``ADVANTAGES``; the config picks one (``algo.advantage``).
"""

from __future__ import annotations

from typing import Callable

import torch

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def deco(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return deco


@register_advantage("grpo")
def grpo(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``(r - mean_g r) / (std_g r + eps)`` within each group (std with Bessel's correction,
    as verl). A group of one sample has mean 0 and std 1 (its advantage is its reward)."""
    r = rewards_PG.float()
    if r.shape[1] == 1:
        return r.clone()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=True)
    return (r - mean) / (std + eps)
