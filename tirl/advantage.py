"""Advantage estimators: pure functions over the rewards of each group (the samples of one prompt):
a ``[P, G]`` tensor (P prompts x G samples), or a list of groups of any size (a group that lost
trajectories to a filter or a failed rollout is computed with its own size). The result has the
input's form. One convention for every estimator: a group of one sample has baseline 0.

Registered by name in ``ADVANTAGES``; the config picks one (``algo.advantage``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def deco(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return deco


Rewards = torch.Tensor | Sequence[Sequence[float]]
Total = Callable[[list[float]], list[float]]  # sums a list of numbers over the data-parallel ranks


def _per_group(rewards: Rewards) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The groups as 1-D float tensors, and how to give results back in the input's form: a
    ``[P, G]`` tensor (equal groups) or a list of lists (groups of any size, e.g. after a filter)."""
    if isinstance(rewards, torch.Tensor):
        return list(rewards.float().unbind(0)), lambda gs: torch.stack(gs) if gs else rewards.float().clone()
    return [torch.tensor(list(g), dtype=torch.float32) for g in rewards], lambda gs: [g.tolist() for g in gs]


@register_advantage("grpo")
def grpo(rewards: Rewards, eps: float = 1e-6, total: Total | None = None):
    """GRPO: ``(r - mean_g r) / (std_g r + eps)`` within each group (std with Bessel's correction,
    as verl). A group of one sample has baseline 0 and std 1: ``r / (1 + eps)``, as verl."""
    groups, back = _per_group(rewards)
    return back([g / (1 + eps) if len(g) == 1 else (g - g.mean()) / (g.std(unbiased=True) + eps) for g in groups])


@register_advantage("dr_grpo")
def dr_grpo(rewards: Rewards, eps: float = 1e-6, total: Total | None = None):
    """Dr. GRPO (Liu et al. 2025): ``r - mean_g r``, no division by the group std (which biases
    toward too-easy and too-hard questions). A group of one: baseline 0 (``r``). ``eps`` is unused."""
    groups, back = _per_group(rewards)
    return back([g.clone() if len(g) == 1 else g - g.mean() for g in groups])


@register_advantage("rloo")
def rloo(rewards: Rewards, eps: float = 1e-6, total: Total | None = None):
    """RLOO: each sample's baseline is the mean of the *other* samples of its group,
    ``r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) * (r_i - mean)``. A group of one: baseline 0."""
    groups, back = _per_group(rewards)
    return back([g.clone() if len(g) == 1 else g - (g.sum() - g) / (len(g) - 1) for g in groups])


@register_advantage("reinforce_pp")
def reinforce_pp(rewards: Rewards, eps: float = 1e-6, total: Total | None = None):
    """REINFORCE++-baseline: subtract the group mean (a group of one: baseline 0), then whiten
    across the whole batch (mean 0, std 1 over all samples; verl whitens over tokens, we over
    sequences). ``total`` sums a list of numbers over every part of the batch (data-parallel
    ranks), so the statistics are the whole batch's; default: this part is the whole batch."""
    groups, back = _per_group(rewards)
    centred = [g.clone() if len(g) == 1 else g - g.mean() for g in groups]
    flat = torch.cat(centred) if centred else torch.zeros(0)
    total = total or (lambda xs: xs)
    s, n = total([float(flat.sum()), float(flat.numel())])
    if n < 2:
        return back(centred)
    mean = s / n
    (ss,) = total([float(((flat - mean) ** 2).sum())])
    std = (ss / (n - 1)) ** 0.5
    return back([(a - mean) / (std + eps) for a in centred])


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
