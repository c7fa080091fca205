"""PPO's critic (ReTool's RL stage): a value model on the policy's architecture.

``ValueModel`` = the transformer body of a copy of the policy + a scalar head initialised to 0
(so the first values are 0, and the critic starts from the same weights as the actor, as in
verl's ReTool recipe). ``values[:, t]`` estimates the return from the state in which token t was
chosen, i.e. it is read from the hidden state at t-1, aligned with ``token_logprobs``."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tirl.dist import Dist
from tirl.loss import AGGREGATIONS, Normaliser, value_loss
from tirl.models import compute_context
from tirl.types import Trajectory
from tirl.update.step import SINGLE, _pad, chunks, device_of, dummy_pass, pad_tokens


class ValueModel(nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.body = copy.deepcopy(policy.base_model)
        self.head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.body.float()
        self.head.float().to(device_of(policy))
        self.tirl_compute_dtype = getattr(policy, "tirl_compute_dtype", None)  # the policy's mixed precision

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        with compute_context(self):
            h = self.body(input_ids=input_ids_BT, attention_mask=attention_mask_BT).last_hidden_state
        v = self.head(h[:, :-1].to(self.head.weight.dtype)).float().squeeze(-1)  # (FSDP may cast the head)
        return torch.nn.functional.pad(v, (1, 0), value=0.0)  # [B, T], column 0 = 0


def _batch(trajs: list[Trajectory], pad_id: int, device):
    return pad_tokens([t.token_ids for t in trajs], [t.mask for t in trajs], pad_id, device)


@torch.no_grad()
def critic_values(critic: ValueModel, trajs: list[Trajectory], size: int, pad_id: int,
                  dist: Dist = SINGLE) -> list[list[float]]:
    critic.eval()
    out: list[list[float]] = []
    for idx in chunks(list(range(len(trajs))), size, dist):
        if idx is None:
            dummy_pass(critic, pad_id, forward=critic)
            continue
        part = [trajs[i] for i in idx]
        ids, attn, _ = _batch(part, pad_id, device_of(critic))
        v = critic(ids, attn)
        out += [v[i, : len(t.token_ids)].tolist() for i, t in enumerate(part)]
    return out


def critic_update(critic: ValueModel, optimizer, trajs: list[Trajectory], returns: list[list[float]],
                  old_values: list[list[float]], clip: float | None, micro: int, grad_clip: float, pad_id: int,
                  dist: Dist = SINGLE) -> dict[str, float]:
    """One optimizer step of the (clipped) value loss, token-mean over policy tokens (of every
    rank's trajectories: the normaliser and the statistics are global)."""
    n_tok, n_seq = dist.sum([float(sum(sum(t.mask) for t in trajs)), float(len(trajs))])
    norm = Normaliser(num_tokens=int(n_tok), num_seqs=int(n_seq))
    critic.train()
    optimizer.zero_grad(set_to_none=True)
    total = clipped = 0.0
    dev = device_of(critic)
    for idx in chunks(list(range(len(trajs))), micro, dist):
        if idx is None:
            dummy_pass(critic, pad_id, backward=True, forward=critic)
            continue
        ids, attn, mask = _batch([trajs[i] for i in idx], pad_id, dev)
        width = ids.shape[1]
        ret = _pad([returns[i] for i in idx], width, torch.float, dev)
        old = _pad([old_values[i] for i in idx], width, torch.float, dev)
        loss_BT, frac = value_loss(critic(ids, attn), old, ret, clip)
        loss = AGGREGATIONS["token-mean"](loss_BT, mask, norm)
        loss.backward()
        total += float(loss.detach())
        clipped += float((frac * mask).sum())
    total, clipped = dist.sum([total, clipped])
    gn = dist.clip_grad_norm(critic.parameters(), grad_clip)
    optimizer.step()
    return {"critic/value_loss": total, "critic/clip_frac": clipped / max(norm.num_tokens, 1), "critic/grad_norm": gn}
