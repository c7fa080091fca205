"""Policy updates over a batch of trajectories: PPO epochs x mini-batches, micro-batching with
gradient accumulation (the loss is normalised over the whole mini-batch, so 1 x 8 micro-batches
give the same gradient as 8 x 1).

Under data parallelism (``dist``, see :mod:`tirl.dist`) each rank passes its own trajectories and
their positions in the step's global batch: mini-batches are drawn from the global batch, the
normaliser counts the global mini-batch, and gradients are summed over ranks, so N ranks take the
step one process would take on the same trajectories. Every rank runs the same number of
(sharded) forward passes: a rank short of micro-batches runs :func:`dummy_pass`."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tirl.dist import Dist
from tirl.loss import AGGREGATIONS, PER_TOKEN, POLICY_LOSSES, Normaliser, kl_penalty, rollout_correction
from tirl.models import return_freed_memory
from tirl.types import Trajectory
from tirl.update.logprobs import Layout, layout_logprobs, packed_layout, padded_layout, check_packing


@dataclass
class MicroBatch:
    layout: Layout  # how the sequences reach the model (padded rows or one packed row)
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
            device=None, pack: bool = False) -> MicroBatch:
    """``advantages[i]`` is a float (sequence-level) or a per-token list (e.g. GAE). The per-token
    fields are ``[B, T]`` right-padded whatever the layout: packing changes only the forward. The
    layout predicts the sampled tokens (mask 1) alone: nothing reads the log-prob of another."""
    ids, attn, mask = pad_tokens([t.token_ids for t in trajs], [t.mask for t in trajs], pad_id, device)
    layout = (packed_layout([t.token_ids for t in trajs], device) if pack else padded_layout(ids, attn)).only(mask)
    width = ids.shape[1]
    rows = [a if isinstance(a, list) else [a] * len(t.token_ids) for t, a in zip(trajs, advantages)]
    adv, sampler = _pad(rows, width, torch.float, device), _pad([t.logprobs for t in trajs], width, torch.float, device)
    return MicroBatch(layout, mask, _pad(old, width, torch.float, device) if old else sampler, sampler, adv * mask,
                      _pad(ref, width, torch.float, device) if ref else None)


SINGLE = Dist()  # one process: every collective is the identity


def dummy_pass(model, pad_id: int, backward: bool = False, forward=None) -> None:
    """A forward (and backward) pass that changes nothing: what a rank with no batch left runs
    so that the others' sharded passes find it in step. Its loss is 0, its gradient 0.
    ``forward(ids, attention_mask)``: default the policy's log-probs."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device_of(model))
    out = (forward or (lambda i, a: layout_logprobs(model, padded_layout(i, a))))(ids, torch.ones_like(ids))
    if backward:
        (out.sum() * 0.0).backward()


def chunks(order: list[int], size: int, dist: Dist = SINGLE) -> list[list[int] | None]:
    """``order`` in chunks of ``size``, padded with None to as many chunks as any rank has."""
    parts: list[list[int] | None] = [order[c : c + size] for c in range(0, len(order), size)]
    return parts + [None] * (dist.rounds(len(parts)) - len(parts))


def by_tokens(lengths: list[int], budget: int, pack: bool) -> list[list[int]]:
    """Indices into ``lengths`` grouped so that each group's tokens fit ``budget``: packed, the sum
    of its lengths (first-fit decreasing); padded, its size x its longest (consecutive, longest
    first). A sequence longer than the budget is a group of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    if pack:
        room: list[int] = []
        for i in order:
            fit = next((g for g, r in enumerate(room) if lengths[i] <= r), None)
            if fit is None:
                groups.append([i])
                room.append(budget - lengths[i])
            else:
                groups[fit].append(i)
                room[fit] -= lengths[i]
        return groups
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def micro_batches(trajs: list[Trajectory], rows: list[int], optim, dist: Dist = SINGLE) -> list[list[int] | None]:
    """``rows`` (indices into ``trajs``) as micro-batches: ``optim.micro_batch_size`` trajectories of
    similar length each, or by ``optim.max_tokens_per_micro_batch``; padded with None to as many
    micro-batches as any rank has."""
    if optim.max_tokens_per_micro_batch is None:
        return chunks(sorted(rows, key=lambda i: len(trajs[i].token_ids)), optim.micro_batch_size, dist)
    groups = by_tokens([len(trajs[i].token_ids) for i in rows], optim.max_tokens_per_micro_batch, optim.pack)
    parts: list[list[int] | None] = [[rows[j] for j in g] for g in groups]
    return parts + [None] * (dist.rounds(len(parts)) - len(parts))


@torch.no_grad()
def sequence_logprobs(model, trajs: list[Trajectory], optim, pad_id: int, temperature: float,
                      dist: Dist = SINGLE) -> list[list[float]]:
    """Per-token log-probs of each trajectory under ``model`` (no gradient): the reference
    policy's, or the trainer's own before an update (``ratio_against = "recompute"``)."""
    was = model.training
    model.eval()
    if optim.pack:
        check_packing(model)
    out: list[list[float]] = [[] for _ in trajs]
    for idx in micro_batches(trajs, list(range(len(trajs))), optim, dist):
        if idx is None:
            dummy_pass(model, pad_id)
            continue
        mb = collate([trajs[i] for i in idx], [0.0] * len(idx), pad_id, device=device_of(model), pack=optim.pack)
        lp = layout_logprobs(model, mb.layout, temperature, chunk=optim.logprob_chunk)
        for j, i in enumerate(idx):
            out[i] = lp[j, : len(trajs[i].token_ids)].tolist()
    model.train(was)
    return out


def _is_zero(a) -> bool:
    return a == 0.0 if not isinstance(a, list) else not any(a)


def policy_update(model, optimizer, trajs: list[Trajectory], advantages: list, algo, optim, *, temperature: float,
                  pad_id: int, ref_logprobs: list[list[float]] | None = None, const_len: int = 1,
                  skip_zero_adv: bool = True, seed: int = 0, dist: Dist = SINGLE,
                  index: list[int] | None = None) -> dict[str, float]:
    """``algo.ppo_epochs`` passes over the step's trajectories in ``algo.mini_batches`` optimizer
    steps each. The ratio's denominator: the sampler's log-probs (``ratio_against = "sampler"``:
    the behaviour policy) or the trainer's own before the update (``"recompute"``, as verl).
    ``trajs`` are this rank's, ``index[i]`` the position of ``trajs[i]`` in the step's global batch
    (default: a single process, positions 0..n-1). Returns metrics over all ranks."""
    index = list(range(len(trajs))) if index is None else index
    total = int(dist.sum([float(len(trajs))])[0])
    n_mb = min(algo.mini_batches, total)
    on_policy = algo.ppo_epochs == 1 and n_mb == 1 and algo.ratio_against == "recompute"
    old = None
    if algo.ratio_against == "recompute" and not on_policy:
        old = sequence_logprobs(model, trajs, optim, pad_id, temperature, dist)
    stats: dict[str, float] = {}
    order = list(range(total))
    here = {g: i for i, g in enumerate(index)}
    for epoch in range(algo.ppo_epochs):
        if epoch or n_mb > 1:
            random.Random(seed * 7919 + epoch).shuffle(order)
        for m in range(n_mb):
            glob = order[m::n_mb]  # the global mini-batch
            idx = [here[g] for g in glob if g in here]  # this rank's part of it
            sample = set(sorted(glob)[: optim.idle_sample_seqs])
            part = _minibatch_step(model, optimizer, [trajs[i] for i in idx], [advantages[i] for i in idx],
                                   [old[i] for i in idx] if old else None,
                                   [ref_logprobs[i] for i in idx] if ref_logprobs else None,
                                   algo, optim, temperature, pad_id, const_len, skip_zero_adv, on_policy, dist,
                                   [j for j, i in enumerate(idx) if index[i] in sample])
            for k, v in part.items():
                stats[k] = stats.get(k, 0.0) + v / (algo.ppo_epochs * n_mb)
    return stats


_SUMS = ("loss", "clip_low", "clip_high", "clip_dual", "mismatch_abs", "mismatch_kl", "entropy", "kl", "tokens", "rc_weight",
         "rc_cut")


def _minibatch_step(model, optimizer, trajs, advantages, old, ref, algo, optim, temperature, pad_id, const_len,
                    skip_zero_adv, on_policy, dist: Dist = SINGLE, sample: list[int] | None = None) -> dict[str, float]:
    """One optimizer step. Rows with advantage exactly 0 (and no KL or entropy term) contribute
    exactly 0 gradient; ``skip_zero_adv`` leaves them out of the forward pass (they still count
    in the normaliser, so the gradient is unchanged). ``sample``: the rows whose mismatch and
    entropy are measured when no row trains (default: the first ``optim.idle_sample_seqs``)."""
    n_tok, n_seq = dist.sum([float(sum(sum(t.mask) for t in trajs)), float(len(trajs))])
    norm = Normaliser(num_tokens=int(n_tok), num_seqs=int(n_seq), const_len=const_len)
    needs_all = algo.kl_coef > 0 and algo.kl_in == "loss" or algo.entropy_coef > 0
    rows = [i for i, a in enumerate(advantages) if needs_all or not (skip_zero_adv and _is_zero(a))]
    sums = dict.fromkeys(_SUMS, 0.0)
    model.train()
    if optim.pack:
        check_packing(model)
    optimizer.zero_grad(set_to_none=True)
    for idx in micro_batches(trajs, rows, optim, dist):
        if idx is None:
            dummy_pass(model, pad_id, backward=True)
            continue
        mb = collate([trajs[i] for i in idx], [advantages[i] for i in idx], pad_id, [old[i] for i in idx] if old else None,
                     [ref[i] for i in idx] if ref else None, device_of(model), optim.pack)
        _micro_step(model, mb, algo, optim, temperature, norm, on_policy, sums)
        return_freed_memory(device_of(model))
    sums = dict(zip(_SUMS, dist.sum([sums[k] for k in _SUMS])))
    measured = sums["tokens"]
    if measured == 0 and n_seq:  # nothing trained: still measure the sampler/trainer mismatch and entropy
        picked = sample if sample is not None else list(range(min(len(trajs), optim.idle_sample_seqs)))
        measured = _measure(model, [trajs[i] for i in picked], optim, pad_id, temperature, sums, dist)
    grad_norm = dist.clip_grad_norm(model.parameters(), optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n, nm = max(sums["tokens"], 1.0), max(measured, 1.0)
    return {"loss": sums["loss"], "grad_norm": grad_norm, "tokens_trained": sums["tokens"],
            "clip_frac_low": sums["clip_low"] / n, "clip_frac_high": sums["clip_high"] / n, "clip_frac_dual": sums["clip_dual"] / n,
            "logprob_mismatch": sums["mismatch_abs"] / nm, "mismatch_kl": sums["mismatch_kl"] / nm,
            "entropy": sums["entropy"] / nm, "kl": sums["kl"] / n,
            **({"rollout_corr_weight": sums["rc_weight"] / n, "rollout_corr_cut_frac": sums["rc_cut"] / n}
               if algo.rollout_correction != "off" else {})}


def _micro_step(model, mb: MicroBatch, algo, optim, temperature: float, norm: Normaliser, on_policy: bool,
                sums: dict[str, float]) -> None:
    """Forward and backward of one micro-batch; adds its statistics to ``sums``."""
    # each token's gradient depends on its own log-prob alone, unless the loss is sequence-level or a
    # sequence-level rollout correction weighs it by the current policy (on-policy: old = current)
    per_token = algo.loss in PER_TOKEN and not (on_policy and algo.rollout_correction not in ("off", "token_tis"))
    hint = (lambda lp, en: _policy_loss(lp, en, mb, algo, norm, on_policy)[0]) if per_token else None
    logp, ent = layout_logprobs(model, mb.layout, temperature, with_entropy=True, entropy_grad=algo.entropy_coef > 0,
                                chunk=optim.logprob_chunk, loss_hint=hint)
    loss, _, st, kl, rc = _policy_loss(logp, ent, mb, algo, norm, on_policy)
    loss.backward()
    m = mb.loss_mask
    if rc is not None:
        sums["rc_weight"] += float((rc[0] * m).sum())
        sums["rc_cut"] += float(rc[1].sum())
    with torch.no_grad():
        diff = logp.detach() - mb.sampler_logprobs  # log(trainer / sampler) per token
        sums["loss"] += float(loss)
        for k in ("clip_low", "clip_high", "clip_dual"):
            sums[k] += float((st[k] * m).sum())
        sums["mismatch_abs"] += float((diff.abs() * m).sum())
        sums["mismatch_kl"] += float(((torch.exp(diff) - 1 - diff) * m).sum())  # k3 of KL(sampler||trainer)
        sums["entropy"] += float((ent.detach() * m).sum())
        sums["kl"] += float((kl.detach() * m).sum())
        sums["tokens"] += float(m.sum())


def _policy_loss(logp, ent, mb: MicroBatch, algo, norm: Normaliser, on_policy: bool):
    """The micro-batch's loss from its ``[B, T]`` log-probs and entropies: ``(scalar, loss [B, T],
    the policy loss's stats, kl [B, T], (rollout-correction weight, cut) or None)``. A pure
    function of its inputs: the LM head also evaluates it on partial log-probs to compute its
    gradients in the forward (``loss_hint``)."""
    loss_fn, agg = POLICY_LOSSES[algo.loss], AGGREGATIONS[algo.aggregation]
    old_lp = logp.detach() if on_policy else mb.old_logprobs
    m = mb.loss_mask
    loss_BT, st = loss_fn(logp, old_lp, mb.advantages, algo.clip_low, algo.clip_high, algo.clip_ratio_c or None, mask_BT=m)
    rc = None
    if algo.rollout_correction != "off":  # the trainer's old policy over the sampler's, per token (detached)
        rc = rollout_correction(old_lp, mb.sampler_logprobs, m, algo.rollout_correction, algo.rollout_correction_cap)
        loss_BT = loss_BT * rc[0]
    kl = kl_penalty(logp, mb.ref_logprobs, algo.kl_estimator) if mb.ref_logprobs is not None else torch.zeros_like(logp)
    if algo.kl_coef > 0 and algo.kl_in == "loss":
        loss_BT = loss_BT + algo.kl_coef * kl
    if algo.entropy_coef > 0:
        loss_BT = loss_BT - algo.entropy_coef * ent
    return agg(loss_BT, m, norm), loss_BT, st, kl, rc


@torch.no_grad()
def _measure(model, trajs, optim, pad_id: int, temperature: float, sums: dict[str, float], dist: Dist) -> float:
    """The sampler/trainer mismatch and entropy on a small sample of trajectories (a forward pass
    only) when no token was trained; returns the global count of tokens measured."""
    if not trajs:
        dummy_pass(model, pad_id)
        local = [0.0, 0.0, 0.0, 0.0]
    else:
        mb = collate(trajs, [0.0] * len(trajs), pad_id, device=device_of(model), pack=optim.pack)
        logp, ent = layout_logprobs(model, mb.layout, temperature, with_entropy=True, chunk=optim.logprob_chunk)
        diff, m = logp - mb.sampler_logprobs, mb.loss_mask
        local = [float((diff.abs() * m).sum()), float(((torch.exp(diff) - 1 - diff) * m).sum()),
                 float((ent * m).sum()), float(m.sum())]
    sums["mismatch_abs"], sums["mismatch_kl"], sums["entropy"], measured = dist.sum(local)
    return measured
