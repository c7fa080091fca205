"""Policy losses and their aggregation: pure tensor functions in small registries.

A policy loss maps per-token log-probs to a per-token loss ``[B, T]``; an aggregation reduces
it with the loss mask to a scalar. Aggregations take the *mini-batch* normaliser (not the
micro-batch's), so that splitting a mini-batch into micro-batches and accumulating gradients
gives the same gradient as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Normaliser:
    """Counts over the whole mini-batch that an aggregation divides by."""

    num_tokens: int  # tokens with mask 1
    num_seqs: int


PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
AggregationFn = Callable[[torch.Tensor, torch.Tensor, Normaliser], torch.Tensor]
AGGREGATIONS: dict[str, AggregationFn] = {}


def register_loss(name: str):
    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def register_aggregation(name: str):
    def deco(fn: AggregationFn) -> AggregationFn:
        AGGREGATIONS[name] = fn
        return fn

    return deco


@register_loss("ppo_clip")
def ppo_clip(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_B: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, per token: ``max(-A r, -A clip(r, 1-clip_low, 1+clip_high))``
    with ``r = exp(logp - old_logp)``. Separate low/high ε allow DAPO's clip-higher."""
    ratio = torch.exp(logp_BT - old_logp_BT)
    adv = adv_B[:, None].to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {
        "clip_low": ((ratio < 1.0 - clip_low) & (adv < 0)).float(),
        "clip_high": ((ratio > 1.0 + clip_high) & (adv > 0)).float(),
        "ratio": ratio.detach(),
    }
    return loss, stats


@register_aggregation("token-mean")
def token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, norm: Normaliser) -> torch.Tensor:
    """Sum over every policy token of the mini-batch / number of such tokens (DAPO's token-level loss)."""
    return (loss_BT * mask_BT).sum() / max(norm.num_tokens, 1)


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    n = mask_BT.sum()
    return float((x_BT * mask_BT).sum() / n) if n > 0 else float("nan")
