"""PPO with a critic: value loss and whitening by hand, the value model, warm-up."""

import copy
import json

import pytest
import torch

from tirl.config import OptimConfig, load_config
from tirl.loss import masked_whiten, value_loss
from tirl.train import Trainer
from tirl.update.critic import ValueModel, critic_update, critic_values

from test_advantage_loss import _trajs

OPT = OptimConfig(micro_batch_size=4)


def test_value_loss_by_hand():
    v, old, ret = torch.tensor([[1.0, 0.2]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    loss, frac = value_loss(v, old, ret, clip=0.5)
    # token 0: plain (1-2)^2 = 1; clipped V = 0 + 0.5 -> (0.5-2)^2 = 2.25; 0.5 * max = 1.125
    # token 1: plain 0.04; clipped V = 0.2 (inside the range) -> same; 0.5 * 0.04 = 0.02
    assert loss.tolist()[0] == pytest.approx([1.125, 0.02]) and frac.tolist() == [[1.0, 0.0]]
    assert value_loss(v, old, ret, clip=None)[0].tolist()[0] == pytest.approx([0.5, 0.02])


def test_masked_whiten_by_hand():
    x, m = torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])
    # masked values 1, 3: mean 2, unbiased std sqrt(2) -> -1/sqrt2, 1/sqrt2; unmasked -> 0
    assert masked_whiten(x, m, eps=0.0).tolist() == pytest.approx([-2 ** -0.5, 2 ** -0.5, 0.0])


def test_value_model_starts_at_zero_and_learns(tiny_model_dir):
    from tirl.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    critic = ValueModel(model)
    trajs = _trajs(tok, n=4)
    v0 = critic_values(critic, trajs, OPT, 0)
    assert all(x == 0.0 for row in v0 for x in row) and [len(r) for r in v0] == [len(t.token_ids) for t in trajs]
    returns = [[1.0 if m else 0.0 for m in t.mask] for t in trajs]
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    losses = [critic_update(critic, opt, trajs, returns, critic_values(critic, trajs, OPT, 0), None, OPT, 0)["critic/value_loss"]
              for _ in range(30)]
    assert losses[-1] < losses[0] / 4
    assert model.base_model is not critic.body  # the actor's weights are not shared


def test_ppo_with_critic_warmup_in_the_trainer(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(8)))
    cfg = load_config(None, [f"model.name={json.dumps(str(tiny_model_dir))}", f"data.source={json.dumps(str(data))}",
                             "algo.advantage=gae", "rollout.engine=hf", "algo.critic_warmup=1", "algo.critic_lr=1e-3", "rollout.prompts_per_step=2",
                             "rollout.group_size=2", "rollout.max_tokens_per_turn=12", "rollout.max_response_tokens=24"])
    t = Trainer(cfg)
    try:
        m1, _ = t.step()
        m2, _ = t.step()
    finally:
        t.sandbox.close()
        t.verifier.close()
    assert "update/critic/value_loss" in m1 and "update/tokens_trained" not in m1  # warm-up: critic only
    assert m2["update/tokens_trained"] > 0 and "update/critic/value_loss" in m2


@pytest.mark.parametrize("mask_off", [False, True])
def test_critic_values_and_gradients_packed_equal_padded(tiny_model_dir, monkeypatch, mask_off):
    """Packed == padded; ``mask_off``: with transformers' block-diagonal mask switched off, so the
    packed rows rely on the sequences' bounds alone (sdpa per sequence)."""
    import transformers.masking_utils as mu

    from tirl.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    critic = ValueModel(model)
    torch.nn.init.normal_(critic.head.weight, std=0.1)  # (zero-initialised values would hide a difference)
    trajs = _trajs(tok, n=6)
    returns = [[1.0 if m else 0.0 for m in t.mask] for t in trajs]
    got = {}
    for optim in (OptimConfig(micro_batch_size=2, pack=False), OptimConfig(max_tokens_per_micro_batch=20)):
        c = copy.deepcopy(critic)
        if optim.pack and mask_off:
            monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
        old = critic_values(c, trajs, optim, 0)
        critic_update(c, torch.optim.SGD(c.parameters(), lr=1.0), trajs, returns, old, 0.2, optim, 0)
        got[optim.pack] = old, [p.detach() for p in c.parameters()]
    for a, b in zip(got[False][0], got[True][0]):
        assert a == pytest.approx(b, abs=1e-5)
    for a, b in zip(got[False][1], got[True][1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
