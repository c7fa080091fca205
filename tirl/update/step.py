"""Policy updates over a batch of trajectories: PPO epochs x mini-batches, micro-batching with
gradient accumulation (the loss is normalised over the whole mini-batch, so 1 x 8 micro-batches
give the same gradient as 8 x 1)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tirl.loss import AGGREGATIONS, POLICY_LOSSES, Normaliser, kl_penalty
from tirl.types import Trajectory
from tirl.update.logprobs import token_logprobs


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] 1.0 where the token was sampled by the policy
    old_logprobs: torch.Tensor  # [B, T] the ratio's denominator (behaviour or recomputed)
    sampler_logprobs: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T]
    ref_logprobs: torch.Tensor | None = None  # [B, T]


def device_of(module) -> torch.device:
    """Where a model's weights live: its batches are built there."""
    return next(module.parameters()).device


def _pad(rows: list[list[float]] | list[list[int]], width: int, dtype, device=None) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out if device is None else out.to(device)


def pad_tokens(token_ids: list[list[int]], masks: list[list[int]], pad_id: int, device=None):
    """Right-padded ``(ids [B, T], attention_mask [B, T], loss_mask [B, T] float)`` on ``device``
    — the one place sequences of different lengths become a batch (RL update, critic, SFT)."""
    width = max(map(len, token_ids))
    ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    for i, t in enumerate(token_ids):
        ids[i, : len(t)] = torch.tensor(t)
    attn = _pad([[1] * len(t) for t in token_ids], width, torch.long, device)
    return ids if device is None else ids.to(device), attn, _pad(masks, width, torch.float, device)


def collate(trajs: list[Trajectory], advantages: list, pad_id: int, old: list | None = None, ref: list | None = None,
            device=None) -> MicroBatch:
    """``advantages[i]`` is a float (sequence-level) or a per-token list (e.g. GAE)."""
    ids, attn, mask = pad_tokens([t.token_ids for t in trajs], [t.mask for t in trajs], pad_id, device)
    width = ids.shape[1]
    rows = [a if isinstance(a, list) else [a] * len(t.token_ids) for t, a in zip(trajs, advantages)]
    adv, sampler = _pad(rows, width, torch.float, device), _pad([t.logprobs for t in trajs], width, torch.float, device)
    return MicroBatch(ids, attn, mask, _pad(old, width, torch.float, device) if old else sampler, sampler, adv * mask,
                      _pad(ref, width, torch.float, device) if ref else None)


@torch.no_grad()
def sequence_logprobs(model, trajs: list[Trajectory], size: int, pad_id: int, temperature: float) -> list[list[float]]:
    """Per-token log-probs of each trajectory under ``model`` (no gradient): the reference
    policy's, or the trainer's own before an update (``ratio_against = "recompute"``)."""
    was = model.training
    model.eval()
    out: list[list[float]] = [[] for _ in trajs]
    order = sorted(range(len(trajs)), key=lambda i: len(trajs[i].token_ids))
    for c in range(0, len(order), size):
        idx = order[c : c + size]
        mb = collate([trajs[i] for i in idx], [0.0] * len(idx), pad_id, device=device_of(model))
        lp = token_logprobs(model, mb.input_ids, mb.attention_mask, temperature)
        for j, i in enumerate(idx):
            out[i] = lp[j, : len(trajs[i].token_ids)].tolist()
    model.train(was)
    return out


def _is_zero(a) -> bool:
    return a == 0.0 if not isinstance(a, list) else not any(a)


def policy_update(model, optimizer, trajs: list[Trajectory], advantages: list, algo, optim, *, temperature: float,
                  pad_id: int, ref_logprobs: list[list[float]] | None = None, const_len: int = 1,
                  skip_zero_adv: bool = True, seed: int = 0) -> dict[str, float]:
    """``algo.ppo_epochs`` passes over ``trajs`` in ``algo.mini_batches`` optimizer steps each.
    The ratio's denominator: the sampler's log-probs (``ratio_against = "sampler"``: the behaviour
    policy) or the trainer's own before the update (``"recompute"``, as verl). Returns metrics."""
    n_mb = min(algo.mini_batches, len(trajs))
    on_policy = algo.ppo_epochs == 1 and n_mb == 1 and algo.ratio_against == "recompute"
    old = None
    if algo.ratio_against == "recompute" and not on_policy:
        old = sequence_logprobs(model, trajs, optim.micro_batch_size, pad_id, temperature)
    stats: dict[str, float] = {}
    order = list(range(len(trajs)))
    for epoch in range(algo.ppo_epochs):
        if epoch or n_mb > 1:
            random.Random(seed * 7919 + epoch).shuffle(order)
        for m in range(n_mb):
            idx = order[m::n_mb]
            part = _minibatch_step(model, optimizer, [trajs[i] for i in idx], [advantages[i] for i in idx],
                                   [old[i] for i in idx] if old else None,
                                   [ref_logprobs[i] for i in idx] if ref_logprobs else None,
                                   algo, optim, temperature, pad_id, const_len, skip_zero_adv, on_policy)
            for k, v in part.items():
                stats[k] = stats.get(k, 0.0) + v / (algo.ppo_epochs * n_mb)
    return stats


def _minibatch_step(model, optimizer, trajs, advantages, old, ref, algo, optim, temperature, pad_id, const_len,
                    skip_zero_adv, on_policy) -> dict[str, float]:
    """One optimizer step. Rows with advantage exactly 0 (and no KL or entropy term) contribute
    exactly 0 gradient; ``skip_zero_adv`` leaves them out of the forward pass (they still count
    in the normaliser, so the gradient is unchanged)."""
    norm = Normaliser(num_tokens=sum(sum(t.mask) for t in trajs), num_seqs=len(trajs), const_len=const_len)
    loss_fn, agg = POLICY_LOSSES[algo.loss], AGGREGATIONS[algo.aggregation]
    needs_all = algo.kl_coef > 0 and algo.kl_in == "loss" or algo.entropy_coef > 0
    rows = [i for i, a in enumerate(advantages) if needs_all or not (skip_zero_adv and _is_zero(a))]
    rows.sort(key=lambda i: len(trajs[i].token_ids))
    sums = dict.fromkeys(("loss", "clip_low", "clip_high", "clip_dual", "mismatch_abs", "mismatch_kl", "entropy", "kl", "tokens"), 0.0)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for c in range(0, len(rows), optim.micro_batch_size):
        idx = rows[c : c + optim.micro_batch_size]
        mb = collate([trajs[i] for i in idx], [advantages[i] for i in idx], pad_id,
                     [old[i] for i in idx] if old else None, [ref[i] for i in idx] if ref else None, device_of(model))
        logp, ent = token_logprobs(model, mb.input_ids, mb.attention_mask, temperature, with_entropy=True,
                                   entropy_grad=algo.entropy_coef > 0)
        old_lp = logp.detach() if on_policy else mb.old_logprobs
        loss_BT, st = loss_fn(logp, old_lp, mb.advantages, algo.clip_low, algo.clip_high, algo.clip_ratio_c)
        m = mb.loss_mask
        kl = kl_penalty(logp, mb.ref_logprobs, algo.kl_estimator) if mb.ref_logprobs is not None else torch.zeros_like(logp)
        if algo.kl_coef > 0 and algo.kl_in == "loss":
            loss_BT = loss_BT + algo.kl_coef * kl
        if algo.entropy_coef > 0:
            loss_BT = loss_BT - algo.entropy_coef * ent
        agg(loss_BT, m, norm).backward()
        with torch.no_grad():
            diff = logp.detach() - mb.sampler_logprobs  # log(trainer / sampler) per token
            sums["loss"] += float(agg(loss_BT.detach(), m, norm))
            for k in ("clip_low", "clip_high", "clip_dual"):
                sums[k] += float((st[k] * m).sum())
            sums["mismatch_abs"] += float((diff.abs() * m).sum())
            sums["mismatch_kl"] += float(((torch.exp(diff) - 1 - diff) * m).sum())  # k3 of KL(sampler||trainer)
            sums["entropy"] += float((ent.detach() * m).sum())
            sums["kl"] += float((kl.detach() * m).sum())
            sums["tokens"] += float(m.sum())
    measured = sums["tokens"]
    if measured == 0 and trajs:  # nothing trained: still measure the sampler/trainer mismatch and entropy
        mb = collate(trajs[: optim.micro_batch_size], [0.0] * min(len(trajs), optim.micro_batch_size), pad_id,
                     device=device_of(model))
        with torch.no_grad():
            logp, ent = token_logprobs(model, mb.input_ids, mb.attention_mask, temperature, with_entropy=True)
            diff, m = logp - mb.sampler_logprobs, mb.loss_mask
            sums["mismatch_abs"], sums["mismatch_kl"] = float((diff.abs() * m).sum()), float(((torch.exp(diff) - 1 - diff) * m).sum())
            sums["entropy"], measured = float((ent * m).sum()), float(m.sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n, nm = max(sums["tokens"], 1.0), max(measured, 1.0)
    return {"loss": sums["loss"], "grad_norm": float(grad_norm), "tokens_trained": sums["tokens"],
            "clip_frac_low": sums["clip_low"] / n, "clip_frac_high": sums["clip_high"] / n, "clip_frac_dual": sums["clip_dual"] / n,
            "logprob_mismatch": sums["mismatch_abs"] / nm, "mismatch_kl": sums["mismatch_kl"] / nm,
            "entropy": sums["entropy"] / nm, "kl": sums["kl"] / n}
