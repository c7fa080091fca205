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
    const_len: int = 1  # Dr. GRPO's constant normaliser (the response-token budget)


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
    adv: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, per token: ``max(-A r, -A clip(r, 1-clip_low, 1+clip_high))``
    with ``r = exp(logp - old_logp)``. Separate low/high ε allow DAPO's clip-higher.
    ``clip_ratio_c`` (dual-clip PPO, Ye et al. 2020): for A < 0 the loss is also capped at
    ``-A c``, so one token with a huge ratio cannot dominate. ``adv`` is ``[B]`` or ``[B, T]``."""
    ratio = torch.exp(logp_BT - old_logp_BT)
    a = (adv[:, None] if adv.dim() == 1 else adv).to(ratio.dtype)
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if clip_ratio_c is not None:
        capped = torch.minimum(loss, -a * clip_ratio_c)
        dual = (a < 0) & (capped < loss)
        loss = torch.where(a < 0, capped, loss)
    stats = {
        "clip_low": ((ratio < 1.0 - clip_low) & (a < 0)).float(),
        "clip_high": ((ratio > 1.0 + clip_high) & (a > 0)).float(),
        "clip_dual": dual.float(),
        "ratio": ratio.detach(),
    }
    return loss, stats


@register_aggregation("token-mean")
def token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, norm: Normaliser) -> torch.Tensor:
    """Sum over every policy token of the mini-batch / number of such tokens (DAPO's token-level loss)."""
    return (loss_BT * mask_BT).sum() / max(norm.num_tokens, 1)


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, norm: Normaliser) -> torch.Tensor:
    """Each sequence's mean over its tokens, then the mean over sequences (GRPO's original 1/|o_i|)."""
    per_seq = (loss_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)
    return per_seq.sum() / max(norm.num_seqs, 1)


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(loss_BT: torch.Tensor, mask_BT: torch.Tensor, norm: Normaliser) -> torch.Tensor:
    """Each sequence's sum over its tokens, then the mean over sequences."""
    return (loss_BT * mask_BT).sum() / max(norm.num_seqs, 1)


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss_BT: torch.Tensor, mask_BT: torch.Tensor, norm: Normaliser) -> torch.Tensor:
    """Dr. GRPO: the token sum divided by a constant (sequences x the response budget), so neither
    long nor short responses are favoured by the normaliser."""
    return (loss_BT * mask_BT).sum() / max(norm.num_seqs * norm.const_len, 1)


def kl_penalty(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1/k3):
    ``k1 = logp - ref``; ``k3 = exp(ref - logp) - (ref - logp) - 1`` (non-negative, low variance)."""
    d = ref_logp_BT - logp_BT
    if kind == "k1":
        return -d
    if kind == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {kind!r}; use k1 or k3")


def value_loss(v_BT: torch.Tensor, old_v_BT: torch.Tensor, returns_BT: torch.Tensor,
               clip: float | None = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss per token: ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``
    (the clipped term only when ``clip`` is set). Returns (loss_BT, clipped-term-was-larger)."""
    plain = (v_BT - returns_BT) ** 2
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain)
    clipped = (old_v_BT + torch.clamp(v_BT - old_v_BT, -clip, clip) - returns_BT) ** 2
    return 0.5 * torch.maximum(plain, clipped), (clipped > plain).float()


def masked_whiten(x_BT: torch.Tensor, mask_BT: torch.Tensor, eps: float = 1e-8,
                  total: Callable[[list[float]], list[float]] | None = None) -> torch.Tensor:
    """Mean 0, std 1 over the masked entries (verl whitens GAE advantages this way); 0 elsewhere.
    ``total`` sums a list of numbers over every part of the batch (data-parallel ranks: the
    statistics are then the whole batch's); default: this part is the whole batch."""
    s, n = (x_BT * mask_BT).sum(), mask_BT.sum()
    if total is not None:
        s, n = (torch.tensor(v, dtype=x_BT.dtype) for v in total([float(s), float(n)]))
    if n < 2:
        return x_BT * mask_BT
    mean = s / n
    ss = (((x_BT - mean) * mask_BT) ** 2).sum()
    if total is not None:
        ss = torch.tensor(total([float(ss)])[0], dtype=x_BT.dtype)
    var = ss / (n - 1)
    return (x_BT - mean) / torch.sqrt(var + eps) * mask_BT


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    n = mask_BT.sum()
    return float((x_BT * mask_BT).sum() / n) if n > 0 else float("nan")
