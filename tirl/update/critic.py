"""PPO's critic (ReTool's RL stage): a value model on the policy's architecture.

``ValueModel`` = the transformer body of a copy of the policy + a scalar head initialised to 0
(so the first values are 0, and the critic starts from the same weights as the actor, as in
verl's ReTool recipe). ``values[:, t]`` estimates the return from the state in which token t was
chosen, i.e. it is read from the hidden state at t-1, aligned with ``token_logprobs``."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from tirl.dist import Dist
from tirl.loss import AGGREGATIONS, Normaliser, value_loss
from tirl.models import compute_context
from tirl.types import Trajectory
from tirl.update.logprobs import Layout, model_inputs, packed_layout, padded_layout
from tirl.update.step import SINGLE, _pad, device_of, dummy_pass, micro_batches, pad_tokens


class ValueModel(nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.body = copy.deepcopy(policy.base_model)
        self.body_prefix = policy.base_model_prefix  # the body's names in the policy: "model.layers.0..."
        self.head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.body.float()
        self.head.float().to(device_of(policy))
        self.tirl_compute_dtype = getattr(policy, "tirl_compute_dtype", None)  # the policy's mixed precision

    def initial(self, name: str, policy: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The starting value of parameter ``name``: the policy's tensor (``policy(name)``) for the
        body, zeros for the head (for a critic built empty, then filled: ``Dist.materialize``)."""
        if name.startswith("head."):
            return torch.zeros(getattr(self.head, name.removeprefix("head.")).shape)
        return policy(f"{self.body_prefix}.{name.removeprefix('body.')}")

    def forward(self, lay: Layout | torch.Tensor, attention_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T]`` values of the sequences of ``lay`` (padded or packed), column 0 and padding 0;
        or of right-padded ``input_ids [B, T]`` with their ``attention_mask``. (Through ``__call__``:
        under FSDP2 the root's parameters are gathered by its forward hook.)"""
        if isinstance(lay, torch.Tensor):
            lay = padded_layout(lay, attention_mask_BT)
        with compute_context(self):
            h = self.body(**model_inputs(self.body, lay)).last_hidden_state
        h = h.reshape(-1, h.shape[-1]).index_select(0, lay.src)
        v = self.head(h.to(self.head.weight.dtype)).float().squeeze(-1)  # (FSDP may cast the head)
        b, t = lay.shape
        return torch.zeros(b * t, device=v.device).index_put((lay.dst,), v).view(b, t)


def _batch(trajs: list[Trajectory], pad_id: int, device, pack: bool):
    """``(layout, loss_mask [B, T])`` of a micro-batch."""
    ids, attn, mask = pad_tokens([t.token_ids for t in trajs], [t.mask for t in trajs], pad_id, device)
    return (packed_layout([t.token_ids for t in trajs], device) if pack else padded_layout(ids, attn)), mask


@torch.no_grad()
def critic_values(critic: ValueModel, trajs: list[Trajectory], optim, pad_id: int,
                  dist: Dist = SINGLE) -> list[list[float]]:
    """Each trajectory's per-token values; micro-batches and packing as ``optim`` says."""
    critic.eval()
    out: list[list[float]] = [[] for _ in trajs]
    for idx in micro_batches(trajs, list(range(len(trajs))), optim, dist):
        if idx is None:
            dummy_pass(critic, pad_id, forward=critic)
            continue
        lay, _ = _batch([trajs[i] for i in idx], pad_id, device_of(critic), optim.pack)
        v = critic(lay)
        for j, i in enumerate(idx):
            out[i] = v[j, : len(trajs[i].token_ids)].tolist()
    return out


def critic_update(critic: ValueModel, optimizer, trajs: list[Trajectory], returns: list[list[float]],
                  old_values: list[list[float]], clip: float | None, optim, pad_id: int,
                  dist: Dist = SINGLE) -> dict[str, float]:
    """One optimizer step of the (clipped) value loss, token-mean over policy tokens (of every
    rank's trajectories: the normaliser and the statistics are global)."""
    n_tok, n_seq = dist.sum([float(sum(sum(t.mask) for t in trajs)), float(len(trajs))])
    norm = Normaliser(num_tokens=int(n_tok), num_seqs=int(n_seq))
    critic.train()
    optimizer.zero_grad(set_to_none=True)
    total = clipped = 0.0
    dev = device_of(critic)
    for idx in micro_batches(trajs, list(range(len(trajs))), optim, dist):
        if idx is None:
            dummy_pass(critic, pad_id, backward=True, forward=critic)
            continue
        lay, mask = _batch([trajs[i] for i in idx], pad_id, dev, optim.pack)
        width = mask.shape[1]
        ret = _pad([returns[i] for i in idx], width, torch.float, dev)
        old = _pad([old_values[i] for i in idx], width, torch.float, dev)
        loss_BT, frac = value_loss(critic(lay), old, ret, clip)
        loss = AGGREGATIONS["token-mean"](loss_BT, mask, norm)
        loss.backward()
        total += float(loss.detach())
        clipped += float((frac * mask).sum())
    total, clipped = dist.sum([total, clipped])
    gn = dist.clip_grad_norm(critic.parameters(), optim.grad_clip)
    optimizer.step()
    return {"critic/value_loss": total, "critic/clip_frac": clipped / max(norm.num_tokens, 1), "critic/grad_norm": gn}
