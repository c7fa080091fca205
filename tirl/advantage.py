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


@register_advantage("dr_grpo")
def dr_grpo(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): ``r - mean_g r``, no division by the group std (which biases
    toward too-easy and too-hard questions). ``eps`` is unused (same signature as the others)."""
    r = rewards_PG.float()
    return r - r.mean(dim=1, keepdim=True)


@register_advantage("rloo")
def rloo(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RLOO: each sample's baseline is the mean of the *other* samples of its group,
    ``r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) * (r_i - mean)``. G = 1 has no baseline."""
    r = rewards_PG.float()
    G = r.shape[1]
    if G == 1:
        return r.clone()
    return (r - (r.sum(dim=1, keepdim=True) - r) / (G - 1))


@register_advantage("reinforce_pp")
def reinforce_pp(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean, then whiten across the whole batch
    (mean 0, std 1 over all samples; verl whitens over tokens, we over sequences)."""
    a = rewards_PG.float() - rewards_PG.float().mean(dim=1, keepdim=True)
    if a.numel() < 2:
        return a
    return (a - a.mean()) / (a.std(unbiased=True) + eps)


def gae(rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the *policy* tokens of each row (mask 1); inserted
    tokens (prompt, tool output) are skipped, so a tool call does not cost a discount step.

    ``delta_t = r_t + gamma V_next - V_t`` and ``A_t = delta_t + gamma lam A_next`` along the policy
    tokens, with ``V`` after the last one = 0. Returns ``(advantages_BT, returns_BT = A + V)``,
    zero where mask is 0. (ReTool's PPO uses gamma = lam = 1.)"""
    adv = torch.zeros_like(values_BT, dtype=torch.float)
    for b in range(rewards_BT.shape[0]):
        idx = torch.nonzero(mask_BT[b] > 0).flatten().tolist()
        next_v, next_a = 0.0, 0.0
        for t in reversed(idx):
            delta = float(rewards_BT[b, t]) + gamma * next_v - float(values_BT[b, t])
            next_a = delta + gamma * lam * next_a
            adv[b, t] = next_a
            next_v = float(values_BT[b, t])
    returns = (adv + values_BT.float()) * (mask_BT > 0)
    return adv, returns
