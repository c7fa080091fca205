"""Advantages and losses against values derived by hand, plus the gradient properties."""

import math

import pytest
import torch

from tirl.advantage import grpo
from tirl.config import AlgoConfig, OptimConfig
from tirl.loss import Normaliser, ppo_clip, token_mean
from tirl.types import Problem, Trajectory
from tirl.update import policy_update


def test_grpo_by_hand():
    # group [1, -1, -1, -1]: mean -0.5; unbiased std = sqrt((1.5^2 + 3 * 0.5^2) / 3) = sqrt(1) = 1
    # -> advantages [1.5, -0.5, -0.5, -0.5] (eps 0)
    r = torch.tensor([[1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = grpo(r, eps=0.0)
    assert torch.allclose(adv[0], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.equal(grpo(r)[1], torch.zeros(4))  # all-correct group: no signal (eps > 0)
    # [2, 0]: mean 1, unbiased std sqrt(2) -> [1/sqrt2, -1/sqrt2]
    assert torch.allclose(grpo(torch.tensor([[2.0, 0.0]]), eps=0.0), torch.tensor([[1 / math.sqrt(2), -1 / math.sqrt(2)]]))
    assert torch.allclose(grpo(torch.tensor([[3.0], [-1.0]])), torch.tensor([[3.0], [-1.0]]) / (1 + 1e-6), rtol=1e-7)  # G = 1: baseline 0, std 1 (verl)


def test_ppo_clip_by_hand():
    # ratios e^0.5 = 1.6487, e^-0.5 = 0.6065, e^0.1 = 1.1052, 1; eps = 0.2
    logp = torch.tensor([[0.5, -0.5, 0.1, 0.0]])
    old = torch.zeros(1, 4)
    # A = +1: loss = max(-r, -clip(r)) -> [-1.2 (clipped), -0.6065, -1.1052, -1]
    loss, st = ppo_clip(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2, -math.exp(-0.5), -math.exp(0.1), -1.0]]), atol=1e-6)
    assert st["clip_high"].tolist() == [[1.0, 0.0, 0.0, 0.0]]
    # A = -1: loss = max(r, clip(r)) -> [1.6487, 0.8 (clipped), 1.1052, 1]
    loss, st = ppo_clip(logp, old, torch.tensor([-1.0]), 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[math.exp(0.5), 0.8, math.exp(0.1), 1.0]]), atol=1e-6)
    assert st["clip_low"].tolist() == [[0.0, 1.0, 0.0, 0.0]]
    # clip-higher: eps_high 0.28 lets the A>0 ratio rise to 1.28
    loss, _ = ppo_clip(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    assert loss[0, 0].item() == pytest.approx(-1.28)


def test_token_mean_uses_minibatch_normaliser():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    # masked sum = 1 + 2 + 5 + 6 = 14 over 4 tokens
    assert token_mean(loss, mask, Normaliser(4, 2)).item() == pytest.approx(3.5)
    # as one micro-batch of a mini-batch with 7 policy tokens: 14 / 7
    assert token_mean(loss, mask, Normaliser(7, 4)).item() == pytest.approx(2.0)


def test_gradient_is_on_policy_gradient_at_ratio_one():
    # d/dlogp of ppo_clip at ratio 1 is -A per token: token-mean over 3 tokens with A = 2 -> -2/3 each
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = ppo_clip(logp, logp.detach(), torch.tensor([2.0]))
    token_mean(loss, torch.ones(1, 3), Normaliser(3, 1)).backward()
    assert torch.allclose(logp.grad, torch.full((1, 3), -2 / 3))


def _trajs(tok, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = 6 + i % 5
        ids = torch.randint(3, len(tok), (L,), generator=g).tolist()
        mask = [0, 0, 0] + [1] * (L - 3)
        out.append(Trajectory(problem=Problem(str(i), "q", "a"), group=i // 4, token_ids=ids, mask=mask,
                              logprobs=[-1.0 if m else 0.0 for m in mask], prompt_len=3))
    return out


def _grads(model, trajs, adv, micro, algo=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: inspect gradients, keep weights
    grads = {}
    orig_step = opt.step

    def capture():
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        orig_step()

    opt.step = capture
    policy_update(model, opt, trajs, adv, algo or AlgoConfig(), OptimConfig(micro_batch_size=micro, grad_clip=1e9),
                  temperature=1.0, pad_id=0, const_len=16)
    return grads


def test_gradient_accumulation_invariance(tiny_model_dir):
    from tirl.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    trajs = _trajs(tok)
    adv = [1.0, -0.5, 0.3, -0.8, 0.0, 2.0, -1.0, 0.7]
    one = _grads(model, trajs, adv, micro=8)
    eight = _grads(model, trajs, adv, micro=1)
    assert one.keys() == eight.keys() and one
    for k in one:
        assert torch.allclose(one[k], eight[k], atol=1e-6, rtol=1e-4), k


def test_fully_masked_sequence_contributes_no_gradient(tiny_model_dir):
    from tirl.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    trajs = _trajs(tok, n=2)
    base = _grads(model, trajs[:1], [1.0], micro=2)
    masked = trajs[1]
    masked.mask = [0] * len(masked.mask)
    with_masked = _grads(model, [trajs[0], masked], [1.0, 5.0], micro=2)
    for k in base:
        assert torch.allclose(base[k], with_masked[k], atol=1e-7), k
    # and a batch with no policy tokens at all gives exactly zero gradient
    none = _grads(model, [masked], [5.0], micro=1)
    assert all(torch.count_nonzero(g) == 0 for g in none.values())
