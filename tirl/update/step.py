"""One policy update over a batch of trajectories: micro-batching with gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tirl.loss import AGGREGATIONS, POLICY_LOSSES, Normaliser
from tirl.types import Trajectory
from tirl.update.logprobs import token_logprobs


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] 1.0 where the token was sampled by the policy
    sampler_logprobs: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B]


def collate(trajs: list[Trajectory], advantages: list[float], pad_id: int) -> MicroBatch:
    width = max(len(t.token_ids) for t in trajs)
    B = len(trajs)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width))
    lp = torch.zeros((B, width))
    for i, t in enumerate(trajs):
        n = len(t.token_ids)
        ids[i, :n] = torch.tensor(t.token_ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(t.mask, dtype=torch.float)
        lp[i, :n] = torch.tensor(t.logprobs)
    return MicroBatch(ids, attn, mask, lp, torch.tensor(advantages, dtype=torch.float))


def make_micro_batches(trajs, advantages, size: int, pad_id: int, skip_zero_adv: bool) -> list[MicroBatch]:
    """Rows with advantage exactly 0 contribute exactly 0 loss and gradient under the clipped
    policy-gradient losses; ``skip_zero_adv`` leaves them out of the forward pass (they still
    count in the normaliser, so the gradient is unchanged)."""
    rows = [i for i, a in enumerate(advantages) if not (skip_zero_adv and a == 0.0)]
    rows.sort(key=lambda i: len(trajs[i].token_ids))  # similar lengths together: less padding
    return [
        collate([trajs[i] for i in rows[c : c + size]], [advantages[i] for i in rows[c : c + size]], pad_id)
        for c in range(0, len(rows), size)
    ]


def policy_update(model, optimizer, trajs: list[Trajectory], advantages: list[float], algo, optim, *,
                  temperature: float, pad_id: int, skip_zero_adv: bool = True) -> dict[str, float]:
    """One optimizer step on all ``trajs`` (one mini-batch, one epoch: fully on-policy, so the
    ratio's denominator is the trainer's own detached log-prob). Returns update metrics."""
    norm = Normaliser(num_tokens=sum(sum(t.mask) for t in trajs), num_seqs=len(trajs))
    loss_fn, agg = POLICY_LOSSES[algo.loss], AGGREGATIONS[algo.aggregation]
    sums = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "mismatch_abs": 0.0, "mismatch_kl": 0.0, "tokens": 0.0}
    model.train()
    optimizer.zero_grad(set_to_none=True)
    for mb in make_micro_batches(trajs, advantages, optim.micro_batch_size, pad_id, skip_zero_adv):
        logp = token_logprobs(model, mb.input_ids, mb.attention_mask, temperature)
        loss_BT, stats = loss_fn(logp, logp.detach(), mb.advantages, algo.clip_low, algo.clip_high)
        loss = agg(loss_BT, mb.loss_mask, norm)
        loss.backward()
        with torch.no_grad():
            m = mb.loss_mask
            diff = logp.detach() - mb.sampler_logprobs  # log(trainer / sampler) per token
            sums["loss"] += float(loss)
            sums["clip_low"] += float((stats["clip_low"] * m).sum())
            sums["clip_high"] += float((stats["clip_high"] * m).sum())
            sums["mismatch_abs"] += float((diff.abs() * m).sum())
            sums["mismatch_kl"] += float(((torch.exp(diff) - 1 - diff) * m).sum())  # k3 estimate of KL(sampler||trainer)
            sums["tokens"] += float(m.sum())
    if sums["tokens"] == 0 and trajs:  # nothing trained: still measure sampler/trainer mismatch
        mb = collate(trajs[: optim.micro_batch_size], [0.0] * min(len(trajs), optim.micro_batch_size), pad_id)
        with torch.no_grad():
            diff = token_logprobs(model, mb.input_ids, mb.attention_mask, temperature) - mb.sampler_logprobs
            m = mb.loss_mask
            sums["mismatch_abs"], sums["mismatch_kl"] = float((diff.abs() * m).sum()), float(((torch.exp(diff) - 1 - diff) * m).sum())
            measured = float(m.sum())
    else:
        measured = sums["tokens"]
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n, nm = max(sums["tokens"], 1.0), max(measured, 1.0)
    return {
        "loss": sums["loss"], "grad_norm": float(grad_norm), "tokens_trained": sums["tokens"],
        "clip_frac_low": sums["clip_low"] / n, "clip_frac_high": sums["clip_high"] / n,
        "logprob_mismatch": sums["mismatch_abs"] / nm, "mismatch_kl": sums["mismatch_kl"] / nm,
    }
