"""The GRPO family, GAE, dual-clip, aggregations, KL and entropy: values derived by hand."""

import math

import pytest
import torch

from tirl.advantage import ADVANTAGES, gae
from tirl.config import AlgoConfig, OptimConfig
from tirl.loss import AGGREGATIONS, Normaliser, kl_penalty, ppo_clip
from tirl.update.logprobs import token_logprobs

from test_advantage_loss import _grads, _trajs


def test_dr_grpo_by_hand():
    # mean of [1, -1, -1, -1] is -0.5; no std division
    assert torch.allclose(ADVANTAGES["dr_grpo"](torch.tensor([[1.0, -1, -1, -1]])), torch.tensor([[1.5, -0.5, -0.5, -0.5]]))


def test_rloo_by_hand():
    # r = [1, 0, 0, 1]: for a 1, the others average 1/3 -> 2/3; for a 0, the others average 2/3 -> -2/3
    out = ADVANTAGES["rloo"](torch.tensor([[1.0, 0, 0, 1]]))
    assert torch.allclose(out, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))


def test_reinforce_pp_by_hand():
    # group means removed: [[1, -1], [0, 0]]; over the batch mean 0, unbiased std sqrt(2/3)
    out = ADVANTAGES["reinforce_pp"](torch.tensor([[1.0, -1.0], [1.0, 1.0]]), eps=0.0)
    s = math.sqrt(2 / 3)
    assert torch.allclose(out, torch.tensor([[1 / s, -1 / s], [0.0, 0.0]]))


def test_gae_skips_inserted_tokens_by_hand():
    # policy tokens at 1, 2, 4 (3 is tool output); reward 1 on the last; V = .5, .6, (9 ignored), .8
    r = torch.tensor([[0, 0, 0, 0, 1.0]])
    v = torch.tensor([[0, 0.5, 0.6, 9.0, 0.8]])
    m = torch.tensor([[0, 1, 1, 0, 1.0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    # t=4: 1 - .8 = .2; t=2: 0 + .8 - .6 + .2 = .4; t=1: 0 + .6 - .5 + .4 = .5; returns all 1 (MC, gamma 1)
    assert torch.allclose(adv, torch.tensor([[0, 0.5, 0.4, 0, 0.2]]))
    assert torch.allclose(ret, torch.tensor([[0, 1.0, 1.0, 0, 1.0]]))
    # gamma .5: t=4 .2; t=2: .5*.8 - .6 = -.2, + .5*.2 = -.1; t=1: .5*.6 - .5 = -.2, + .5*(-.1) = -.25
    adv, _ = gae(r, v, m, gamma=0.5, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0, -0.25, -0.1, 0, 0.2]]))


def test_dual_clip_by_hand():
    logp, old = torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2)  # ratio e = 2.718
    # A = -1: PPO loss max(e, 1.2) = e; dual-clip with c = 2 caps it at 2
    loss, st = ppo_clip(logp, old, torch.tensor([[-1.0, 1.0]]), 0.2, 0.2, clip_ratio_c=2.0)
    assert loss[0, 0].item() == pytest.approx(2.0) and st["clip_dual"][0, 0] == 1
    # A = +1 is untouched: max(-e, -1.2) = -1.2
    assert loss[0, 1].item() == pytest.approx(-1.2) and st["clip_dual"][0, 1] == 0
    plain, _ = ppo_clip(logp, old, torch.tensor([[-1.0, 1.0]]), 0.2, 0.2)
    assert plain[0, 0].item() == pytest.approx(math.e)


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    norm = Normaliser(num_tokens=4, num_seqs=2, const_len=4)
    assert AGGREGATIONS["token-mean"](loss, mask, norm).item() == pytest.approx(14 / 4)
    assert AGGREGATIONS["seq-mean-token-mean"](loss, mask, norm).item() == pytest.approx((1.5 + 5.5) / 2)
    assert AGGREGATIONS["seq-mean-token-sum"](loss, mask, norm).item() == pytest.approx((3 + 11) / 2)
    assert AGGREGATIONS["seq-mean-token-sum-norm"](loss, mask, norm).item() == pytest.approx(14 / (2 * 4))


def test_kl_estimators_by_hand():
    logp, ref = torch.zeros(1), torch.log(torch.tensor([0.5]))
    # d = ref - logp = -ln 2; k1 = ln 2; k3 = e^d - d - 1 = 0.5 + ln 2 - 1
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_penalty(ref, ref, "k3").item() == 0.0


def test_entropy_matches_softmax(tiny):
    model, tok = tiny
    ids = torch.tensor([tok("print(1 + 2)")["input_ids"]])
    logp, ent = token_logprobs(model, ids, torch.ones_like(ids), 0.7, with_entropy=True)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[0, :-1].float() / 0.7, -1)
    assert torch.allclose(ent[0, 1:], -(p * p.log()).sum(-1), atol=1e-4)
    assert ent.requires_grad  # the entropy bonus backpropagates through it
    logp2, metric = token_logprobs(model, ids, torch.ones_like(ids), 0.7, with_entropy=True, entropy_grad=False)
    assert logp2.requires_grad and not metric.requires_grad  # a metric: no [B, T, V] graph kept alive
    assert torch.equal(metric, ent.detach()) and torch.equal(logp2, logp)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_grad_accumulation_invariance_every_aggregation(tiny_model_dir, agg):
    from tirl.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    trajs = _trajs(tok)
    adv = [1.0, -0.5, 0.3, -0.8, 0.0, 2.0, -1.0, 0.7]
    one = _grads(model, trajs, adv, micro=8, algo=AlgoConfig(aggregation=agg))
    eight = _grads(model, trajs, adv, micro=1, algo=AlgoConfig(aggregation=agg))
    for k in one:
        assert torch.allclose(one[k], eight[k], atol=1e-6, rtol=1e-4), (agg, k)


def test_epochs_and_minibatches_take_that_many_steps(tiny_model_dir):
    from tirl.models import load_model
    from tirl.update import policy_update

    model, tok = load_model(str(tiny_model_dir))
    trajs = _trajs(tok)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps = {"n": 0}
    orig = opt.step

    def count():
        steps["n"] += 1
        orig()

    opt.step = count
    stats = policy_update(model, opt, trajs, [1.0, -1.0] * 4, AlgoConfig(ppo_epochs=2, mini_batches=2), OptimConfig(micro_batch_size=2),
                          temperature=1.0, pad_id=0)
    assert steps["n"] == 4
    assert stats["tokens_trained"] > 0 and 0 <= stats["clip_frac_high"] <= 1


def test_ratio_against_recompute_starts_at_one(tiny_model_dir):
    from tirl.models import load_model
    from tirl.update import policy_update

    model, tok = load_model(str(tiny_model_dir))
    trajs = _trajs(tok)  # their "sampler" log-probs are a fake -1.0: far from the model's
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    kw = dict(temperature=1.0, pad_id=0)
    rec = policy_update(model, opt, trajs, [1.0, -1.0] * 4, AlgoConfig(ratio_against="recompute", mini_batches=2), OptimConfig(), **kw)
    smp = policy_update(model, opt, trajs, [1.0, -1.0] * 4, AlgoConfig(ratio_against="sampler", mini_batches=2), OptimConfig(), **kw)
    assert rec["clip_frac_low"] == rec["clip_frac_high"] == 0.0  # lr 0: ratio exactly 1
    assert smp["clip_frac_low"] + smp["clip_frac_high"] > 0  # the fake behaviour log-probs are off-policy
