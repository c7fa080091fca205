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


_SAFETY = 20.0  # |log-ratio| cap before exp (verl's SAFETY_BOUND and the bound of its PPO ratio)

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
AggregationFn = Callable[[torch.Tensor, torch.Tensor, Normaliser], torch.Tensor]
AGGREGATIONS: dict[str, AggregationFn] = {}


PER_TOKEN: set[str] = set()  # losses whose gradient at a token depends on that token's log-prob alone


def register_loss(name: str, per_token: bool = True):
    """``per_token = False`` for a loss whose gradient at a token depends on other tokens'
    log-probs (a sequence-level ratio); the chunked LM head then cannot compute it in the forward."""

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        if per_token:
            PER_TOKEN.add(name)
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
    mask_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, per token: ``max(-A r, -A clip(r, 1-clip_low, 1+clip_high))``
    with ``r = exp(logp - old_logp)``. Separate low/high ε allow DAPO's clip-higher.
    ``clip_ratio_c`` (dual-clip PPO, Ye et al. 2020): for A < 0 the loss is also capped at
    ``-A c``, so one token with a huge ratio cannot dominate. ``adv`` is ``[B]`` or ``[B, T]``.
    The log-ratio is clamped to +-20 before ``exp`` (verl's ``compute_policy_loss_vanilla``): no
    inf (and no NaN from ``inf * 0`` on a masked token), and no gradient past the clamp."""
    ratio = torch.exp(torch.clamp(logp_BT - old_logp_BT, -_SAFETY, _SAFETY))
    a = _adv(adv, ratio)
    loss, stats = _clipped_surrogate(ratio, a, clip_low, clip_high)
    if clip_ratio_c is not None:
        capped = torch.minimum(loss, -a * clip_ratio_c)
        stats["clip_dual"] = ((a < 0) & (capped < loss)).float()
        loss = torch.where(a < 0, capped, loss)
    return loss, stats


def _adv(adv: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (adv[:, None] if adv.dim() == 1 else adv).to(like.dtype)


def _seq_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
    """``[B, 1]`` mean of ``x`` over each row's masked tokens (all tokens without a mask)."""
    m = torch.ones_like(x_BT) if mask_BT is None else mask_BT.to(x_BT.dtype)
    return (x_BT * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)


def _clipped_surrogate(ratio: torch.Tensor, a: torch.Tensor, clip_low: float, clip_high: float):
    unclipped, clipped = -a * ratio, -a * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    stats = {"clip_low": ((ratio < 1.0 - clip_low) & (a < 0)).float(), "clip_high": ((ratio > 1.0 + clip_high) & (a > 0)).float(),
             "clip_dual": torch.zeros_like(ratio), "ratio": ratio.detach()}
    return torch.maximum(unclipped, clipped), stats


@register_loss("gspo", per_token=False)
def gspo(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv: torch.Tensor, clip_low: float = 3e-4,
         clip_high: float = 4e-4, clip_ratio_c: float | None = None, mask_BT: torch.Tensor | None = None):
    """GSPO (Zheng et al. 2025, arXiv 2507.18071), sequence level: one ratio per sequence,
    ``s_i = exp(mean_t (logp - old_logp))`` over its policy tokens (the length-normalised sequence
    ratio), clipped like PPO's, ``max(-A s_i, -A clip(s_i, 1 - clip_low, 1 + clip_high))`` on each
    of its tokens; the gradient flows through ``s_i`` (all of the sequence's tokens). The log-ratio
    is capped at 10 (verl). The paper's clip range is 3e-4 / 4e-4. ``clip_ratio_c`` is unused."""
    s_B1 = torch.exp(torch.clamp(_seq_mean(logp_BT - old_logp_BT, mask_BT), max=10.0))
    return _clipped_surrogate(s_B1.expand_as(logp_BT), _adv(adv, logp_BT), clip_low, clip_high)


@register_loss("gspo_token", per_token=False)
def gspo_token(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv: torch.Tensor, clip_low: float = 3e-4,
               clip_high: float = 4e-4, clip_ratio_c: float | None = None, mask_BT: torch.Tensor | None = None):
    """GSPO-token (the paper's token-level variant; verl's ``gspo`` loss): per token
    ``s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]``, equal to ``s_i`` in value, with each token's own
    gradient (so token-level advantages can differ). Same clipping and cap as :func:`gspo`."""
    log_s = logp_BT - logp_BT.detach() + _seq_mean(logp_BT - old_logp_BT, mask_BT).detach()
    return _clipped_surrogate(torch.exp(torch.clamp(log_s, max=10.0)), _adv(adv, logp_BT), clip_low, clip_high)


@register_loss("cispo")
def cispo(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv: torch.Tensor, clip_low: float = 0.2,
          clip_high: float = 0.2, clip_ratio_c: float | None = None, mask_BT: torch.Tensor | None = None):
    """CISPO (MiniMax-M1, arXiv 2506.13585): ``-sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logp``
    per token, ``r = exp(clamp(logp - old_logp, -20, 20))`` (verl's ``cispo``): the importance weight
    is clipped and detached, so no token's gradient is dropped, only weighted. MiniMax clips only
    from above (a large ``clip_low``). Stats: ``clip_low``/``clip_high`` = the weight was cut."""
    ratio = torch.exp(torch.clamp(logp_BT - old_logp_BT, -_SAFETY, _SAFETY))
    a = _adv(adv, logp_BT)
    w = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()
    stats = {"clip_low": (ratio < 1.0 - clip_low).float(), "clip_high": (ratio > 1.0 + clip_high).float(),
             "clip_dual": torch.zeros_like(ratio), "ratio": ratio.detach()}
    return -w * a * logp_BT, stats


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
    """Dr. GRPO as its paper defines it: ``1/G sum_i sum_t loss / L`` — each sequence's token sum
    divided by a constant L (the response budget), then the mean over sequences, so neither long nor
    short responses are favoured by the normaliser. (verl's mode of this name divides by L alone:
    :func:`token_sum_norm`, a factor of the number of sequences larger.)"""
    return (loss_BT * mask_BT).sum() / max(norm.num_seqs * norm.const_len, 1)


@register_aggregation("token-sum-norm")
def token_sum_norm(loss_BT: torch.Tensor, mask_BT: torch.Tensor, norm: Normaliser) -> torch.Tensor:
    """verl's ``seq-mean-token-sum-norm``: the token sum over the mini-batch divided by the constant
    L alone (``loss_scale_factor``), B times :func:`seq_mean_token_sum_norm` for B sequences."""
    return (loss_BT * mask_BT).sum() / max(norm.const_len, 1)


def kl_penalty(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1/k3):
    ``k1 = logp - ref``; ``k3 = exp(d) - d - 1`` with ``d = clamp(ref - logp, -20, 20)``, the result
    clamped to [-10, 10] (non-negative, low variance; verl's ``low_var_kl``: no gradient where a
    token is that far from the reference)."""
    d = ref_logp_BT - logp_BT
    if kind == "k1":
        return -d
    if kind == "k3":
        d = torch.clamp(d, -20.0, 20.0)
        return torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; use k1 or k3")


def value_loss(v_BT: torch.Tensor, old_v_BT: torch.Tensor, returns_BT: torch.Tensor,
               clip: float | None = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss per token: ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``
    (the clipped term only when ``clip`` is set). Returns (loss_BT, clipped-term-was-larger).
    ``V`` is clamped into the interval itself (verl's ``clip_by_value``), so a ``V`` inside it gives
    exactly the plain term and is never counted as clipped."""
    plain = (v_BT - returns_BT) ** 2
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain)
    clipped = (torch.clamp(v_BT, old_v_BT - clip, old_v_BT + clip) - returns_BT) ** 2
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


ROLLOUT_CORRECTIONS = ("off", "token_tis", "seq_tis", "seq_mis", "geo_mis")


def rollout_correction(old_logp_BT: torch.Tensor, sampler_logp_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str,
                       cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights ``[B, T]`` (detached) for the gap between the sampler that drew the tokens
    and the trainer's policy they are scored under (bf16 rollouts, other kernels, stale weights).
    With ``d_t = old_logp - sampler_logp`` per token (clamped to +-20):

    * ``token_tis``: ``w_t = min(exp(d_t), C)`` (truncated IS per token; verl ``rollout_is=token``).
    * ``seq_tis``: ``w = min(exp(sum_t d_t), C)`` on every token of the sequence.
    * ``seq_mis``: ``w = rho * [rho <= C]``, ``rho = exp(sum_t d_t)``: the sequence's IS weight, or 0
      when it exceeds C (TRL's ``sequence_mask``, its default with C = 3).
    * ``geo_mis``: ``w = [1/C <= exp(mean_t d_t) <= C]``: a mask on the geometric-mean ratio (verl's
      ``seq_mean_k1`` rejection), no reweighting.

    Returns ``(weights_BT, cut_BT)``: ``cut`` is 1 where a weight was truncated or a sequence masked.
    Zero where ``mask_BT`` is 0."""
    m = mask_BT.to(old_logp_BT.dtype)
    d = (old_logp_BT - sampler_logp_BT).detach().float() * m
    if mode == "token_tis":
        raw = torch.exp(torch.clamp(d, -_SAFETY, _SAFETY))
        w, cut = raw.clamp(max=cap), (raw > cap).float()
    elif mode in ("seq_tis", "seq_mis"):
        rho = torch.exp(torch.clamp(d.sum(-1, keepdim=True), -_SAFETY, _SAFETY)).expand_as(d)
        w = rho.clamp(max=cap) if mode == "seq_tis" else torch.where(rho <= cap, rho, torch.zeros_like(rho))
        cut = (rho > cap).float()
    elif mode == "geo_mis":
        geo = torch.exp(torch.clamp(_seq_mean(d, m), -_SAFETY, _SAFETY)).expand_as(d)
        keep = (geo <= cap) & (geo >= 1.0 / cap)
        w, cut = keep.float(), (~keep).float()
    else:
        raise ValueError(f"unknown rollout correction {mode!r}; use one of {ROLLOUT_CORRECTIONS}")
    return (w * m).to(old_logp_BT.dtype), cut * m
