"""Rollout correction (TIS / MIS), GSPO, CISPO, groups of unequal size, and the five conventions
settled against verl's core_algos: every expected value written out by hand."""

import math
import tomllib
from pathlib import Path

import pytest
import torch

from tirl.advantage import ADVANTAGES
from tirl.config import AlgoConfig, OptimConfig, load_config
from tirl.loss import AGGREGATIONS, POLICY_LOSSES, Normaliser, kl_penalty, rollout_correction, value_loss

E = 1e-6


def close(t: torch.Tensor, want) -> None:
    assert torch.allclose(t.float(), torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=1e-7), t.tolist()


# --- 1. groups of one, groups of unequal size -------------------------------------------------

def test_a_group_of_one_has_baseline_zero_in_every_estimator():
    one = torch.tensor([[2.0]])
    assert ADVANTAGES["grpo"](one).item() == pytest.approx(2.0 / (1 + E), rel=1e-7)  # verl: (r - 0) / (1 + eps)
    assert ADVANTAGES["grpo"](one).item() != 2.0
    assert ADVANTAGES["dr_grpo"](one).item() == 2.0
    assert ADVANTAGES["rloo"](one).item() == 2.0
    assert ADVANTAGES["reinforce_pp"](one).item() == 2.0  # one sample: nothing to whiten over


def test_groups_of_unequal_size_each_use_their_own_size():
    groups = [[1.0, 0.0, 0.0], [1.0], [1.0, -1.0]]
    sd = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0]: sqrt(((2/3)^2 + 2 (1/3)^2) / 2)
    want = {
        "grpo": [[(2 / 3) / (sd + E), (-1 / 3) / (sd + E), (-1 / 3) / (sd + E)], [1 / (1 + E)], [1 / (math.sqrt(2) + E), -1 / (math.sqrt(2) + E)]],
        "dr_grpo": [[2 / 3, -1 / 3, -1 / 3], [1.0], [1.0, -1.0]],
        "rloo": [[1.0, -0.5, -0.5], [1.0], [2.0, -2.0]],  # 1 - 0; 0 - (1 + 0) / 2; 1 - (-1)
    }
    for name, w in want.items():
        got = ADVANTAGES[name](groups)
        assert [len(g) for g in got] == [3, 1, 2], name
        for g, wg in zip(got, w):
            assert g == pytest.approx(wg, abs=1e-6), name
    # reinforce++: centred [2/3, -1/3, -1/3, 1, 1, -1] (mean 1/6), whitened over all six samples
    flat = [2 / 3, -1 / 3, -1 / 3, 1.0, 1.0, -1.0]
    m = sum(flat) / 6
    s = math.sqrt(sum((x - m) ** 2 for x in flat) / 5)
    got = [x for g in ADVANTAGES["reinforce_pp"](groups) for x in g]
    assert got == pytest.approx([(x - m) / (s + E) for x in flat], abs=1e-6)
    # equal groups: the list form gives what the [P, G] tensor form gives
    eq = [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    for name in ADVANTAGES:
        assert torch.allclose(torch.tensor(ADVANTAGES[name](eq)), ADVANTAGES[name](torch.tensor(eq))), name


# --- 2. value clipping: V inside the interval is never "clipped" --------------------------------

def test_value_clipping_by_hand_and_no_false_clip_flags():
    v, old, ret = torch.tensor([[1.9, 2.0, 0.2]]), torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    loss, flag = value_loss(v, old, ret, clip=0.5)
    # 1.9 -> clamped 1.5: (1.5 - 2)^2 = 0.25 > (1.9 - 2)^2 = 0.01; 2.0 -> 1.5: 2.25 < 4; 0.2 inside [-0.5, 0.5]
    assert loss.tolist()[0] == pytest.approx([0.125, 2.0, 0.02])
    assert flag.tolist() == [[1.0, 0.0, 0.0]]
    g = torch.Generator().manual_seed(0)  # |V_old| << |V|, every V inside its interval: nothing clipped
    old = torch.rand(1, 4096, generator=g) * 1e-7
    v = old + (torch.rand(1, 4096, generator=g) - 0.5) * 0.9
    ret = torch.randn(1, 4096, generator=g)
    loss, flag = value_loss(v, old, ret, clip=0.5)
    assert flag.sum() == 0 and torch.equal(loss, 0.5 * (v - ret) ** 2)


# --- 3. k3 clamped as verl's low_var_kl ---------------------------------------------------------

def test_k3_is_clamped_like_verls_low_var_kl():
    ref = torch.tensor([1.0, 3.0, 25.0, -1.0])
    logp = torch.zeros(4, requires_grad=True)
    k3 = kl_penalty(logp, ref, "k3")
    # d = 1: e - 2; d = 3: e^3 - 4 = 16.09 -> 10; d = 25 -> d 20 -> 10; d = -1: e^-1
    assert k3.tolist() == pytest.approx([math.e - 2, 10.0, 10.0, math.exp(-1)], rel=1e-6)
    k3.sum().backward()
    # d/dlogp (e^d - d - 1) = -(e^d - 1) where unclamped; 0 where clamped
    assert logp.grad.tolist() == pytest.approx([-(math.e - 1), 0.0, 0.0, 1 - math.exp(-1)], rel=1e-6)


# --- 4. dual-clip default, recipes state theirs -------------------------------------------------

def test_dual_clip_defaults_to_verls_3_and_every_paper_recipe_states_its_value():
    assert AlgoConfig().clip_ratio_c == 3.0 and load_config(None).algo.clip_ratio_c == 3.0
    recipes = Path(__file__).resolve().parents[1] / "tirl" / "recipes"
    want = {"torl-1.5b": 0.0, "torl-7b": 0.0, "retool-32b": 3.0, "retool-dapo": 10.0}
    for name, c in want.items():
        text = tomllib.loads((recipes / f"{name}.toml").read_text())
        assert text["algo"]["clip_ratio_c"] == c, name  # written in the recipe, not inherited
        assert load_config(name).algo.clip_ratio_c == c
    with pytest.raises(Exception, match="clip_ratio_c"):
        load_config(None, ["algo.clip_ratio_c=0.5"])


def test_dual_clip_3_caps_a_negative_advantage_tokens_loss():
    logp, old = torch.tensor([[math.log(5.0), math.log(2.0)]]), torch.zeros(1, 2)
    loss, st = POLICY_LOSSES["ppo_clip"](logp, old, torch.tensor([-1.0]), 0.2, 0.2, 3.0)
    assert loss.tolist()[0] == pytest.approx([3.0, 2.0])  # ratio 5 capped at c = 3; ratio 2 below c
    assert st["clip_dual"].tolist() == [[1.0, 0.0]]


def test_ppo_ratio_is_clamped_like_verls_no_nan_from_a_masked_token_and_no_gradient_past_the_clamp():
    # token 0: masked, log-ratio 100 (exp overflows float32); token 1: ratio 1; token 2: log-ratio 29, A < 0
    logp = torch.tensor([[0.0, -1.0, -1.0]], requires_grad=True)
    old, mask = torch.tensor([[-100.0, -1.0, -30.0]]), torch.tensor([[0.0, 1.0, 1.0]])
    loss, _ = POLICY_LOSSES["ppo_clip"](logp, old, torch.tensor([-1.0]), 0.2, 0.2, None, mask_BT=mask)
    total = AGGREGATIONS["token-mean"](loss, mask, Normaliser(num_tokens=2, num_seqs=1))
    # verl: exp(clamp(d, -20, 20)): token 1 -> 1, token 2 -> e^20 (unclipped side, A = -1); (1 + e^20) / 2
    assert total.item() == pytest.approx((1 + math.exp(20)) / 2, rel=1e-6)
    total.backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.5, 0.0])  # past the clamp: no gradient (verl's too)


# --- 5. the Dr. GRPO normaliser, and verl's ------------------------------------------------------

def test_seq_mean_token_sum_norm_is_the_papers_and_token_sum_norm_is_verls():
    loss, mask = torch.tensor([[1.0, 2.0], [3.0, 7.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    norm = Normaliser(num_tokens=3, num_seqs=2, const_len=4)
    assert AGGREGATIONS["seq-mean-token-sum-norm"](loss, mask, norm).item() == pytest.approx(6 / (2 * 4))  # 1/G sum / L
    assert AGGREGATIONS["token-sum-norm"](loss, mask, norm).item() == pytest.approx(6 / 4)  # verl: sum / L


# --- GSPO and CISPO -----------------------------------------------------------------------------

def test_gspo_sequence_ratio_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.1, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is tool output: not in the mean
    s = math.exp((0.5 + 0.1) / 2)  # exp(mean log-ratio) = 1.34986
    for name in ("gspo", "gspo_token"):
        lp = logp.detach().clone().requires_grad_(True)
        loss, st = POLICY_LOSSES[name](lp, old, torch.tensor([-1.0]), 0.2, 0.2, mask_BT=mask)
        assert (loss * mask).tolist()[0] == pytest.approx([s, s, 0.0], rel=1e-6)  # A < 0: max(s, 1.2) = s
        assert st["clip_low"].sum() == 0 and st["ratio"][0, :2].tolist() == pytest.approx([s, s], rel=1e-6)
        (loss * mask).sum().backward()
        # gspo: d(2 s)/dlogp_t = 2 s / 2 = s; gspo_token: each token's own s_t, ds_t/dlogp_t = s
        assert lp.grad.tolist()[0] == pytest.approx([s, s, 0.0], rel=1e-6), name
    loss, st = POLICY_LOSSES["gspo"](logp, old, torch.tensor([1.0]), 0.2, 0.2, mask_BT=mask)
    assert (loss * mask).tolist()[0] == pytest.approx([-1.2, -1.2, 0.0])  # A > 0, s > 1.2: clipped
    assert st["clip_high"][0, :2].tolist() == [1.0, 1.0]
    # token-level advantages: gspo_token gives each token the gradient of its own advantage
    lp = logp.detach().clone().requires_grad_(True)
    adv = torch.tensor([[-1.0, -3.0, 0.0]])
    (POLICY_LOSSES["gspo_token"](lp, old, adv, 0.2, 0.2, mask_BT=mask)[0] * mask).sum().backward()
    assert lp.grad.tolist()[0] == pytest.approx([s, 3 * s, 0.0], rel=1e-6)


def test_cispo_by_hand():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.1]])  # ratios e^0.5 = 1.6487 (cut to 1.2) and e^0.1 = 1.10517
    loss, st = POLICY_LOSSES["cispo"](logp, old, torch.tensor([[2.0, 1.0]]), 0.2, 0.2)
    # -sg(w) A logp: -1.2 * 2 * -1 = 2.4; -1.10517 * 1 * -1 = 1.10517
    assert loss.tolist()[0] == pytest.approx([2.4, math.exp(0.1)], rel=1e-6)
    loss.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([-2.4, -math.exp(0.1)], rel=1e-6)  # -w A: the weight is detached
    assert st["clip_high"].tolist() == [[1.0, 0.0]]


# --- rollout correction -------------------------------------------------------------------------

def test_rollout_correction_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-1.5, -1.0, -7.0], [-1.5, -1.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # row 0: d = [0.5, -1.0]; sum -0.5, mean -0.25. row 1: d = [0.5, 0.5]; sum 1.0, mean 0.5
    w, cut = rollout_correction(old, sampler, mask, "token_tis", 1.5)
    close(w, [[1.5, math.exp(-1), 0], [1.5, 1.5, 0]])
    assert cut.tolist() == [[1, 0, 0], [1, 1, 0]]
    w, cut = rollout_correction(old, sampler, mask, "seq_tis", 1.5)
    close(w, [[math.exp(-0.5)] * 2 + [0], [1.5, 1.5, 0]])
    assert cut.tolist() == [[0, 0, 0], [1, 1, 0]]
    w, cut = rollout_correction(old, sampler, mask, "seq_mis", 3.0)  # rho = e^-0.5 and e = 2.718 <= 3: kept
    close(w, [[math.exp(-0.5)] * 2 + [0], [math.e, math.e, 0]])
    w, cut = rollout_correction(old, sampler, mask, "seq_mis", 2.0)  # e > 2: the sequence is masked
    assert w.tolist()[1] == [0.0, 0.0, 0.0] and cut.tolist()[1] == [1, 1, 0]
    w, cut = rollout_correction(old, sampler, mask, "geo_mis", 1.5)  # geo e^-0.25 = 0.78 in [0.67, 1.5]; e^0.5 = 1.65 out
    assert w.tolist() == [[1, 1, 0], [0, 0, 0]] and cut.tolist() == [[0, 0, 0], [1, 1, 0]]


def test_rollout_correction_config_is_checked():
    with pytest.raises(Exception, match="ratio_against"):
        load_config(None, ['algo.rollout_correction="token_tis"', 'algo.ratio_against="sampler"'])
    with pytest.raises(Exception):
        load_config(None, ['algo.rollout_correction="tis"'])


def test_a_bfloat16_samplers_gap_is_corrected_in_the_update(tiny_model_dir):
    """The trajectories' log-probs come from a bfloat16 copy of the policy (the sampler); the
    trainer is float32. With token TIS at a tight cap, the update reports the cut fraction and its
    loss is the per-token loss times the weights computed from the two sets of log-probs."""
    from test_advantage_loss import _trajs
    from tirl.models import load_model
    from tirl.update import policy_update
    from tirl.update.logprobs import token_logprobs
    from tirl.update.step import pad_tokens

    model, tok = load_model(str(tiny_model_dir))
    trajs = _trajs(tok)
    bf16 = load_model(str(tiny_model_dir))[0].to(torch.bfloat16)
    ids, attn, mask = pad_tokens([t.token_ids for t in trajs], [t.mask for t in trajs], 0, torch.device("cpu"))
    with torch.no_grad():
        sampler = token_logprobs(bf16, ids, attn, temperature=1.0).float()
        trainer = token_logprobs(model, ids, attn, temperature=1.0).float()
    for t, lp in zip(trajs, sampler):
        t.logprobs = [float(x) if m else 0.0 for x, m in zip(lp.tolist()[: len(t.mask)], t.mask)]
    m = mask.float()
    gap = ((trainer - sampler).abs() * m).sum() / m.sum()
    assert gap > 1e-4  # bf16 really samples from another distribution (~7e-4 on the tiny model)
    adv = [1.0, -1.0] * 4
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    kw = dict(temperature=1.0, pad_id=0)
    cap = 1.0 + float(gap)  # about half the tokens' ratios exceed it
    out = policy_update(model, opt, trajs, adv, AlgoConfig(rollout_correction="token_tis", rollout_correction_cap=cap),
                        OptimConfig(micro_batch_size=8), **kw)
    s_BT = torch.zeros_like(trainer)
    for i, t in enumerate(trajs):
        s_BT[i, : len(t.logprobs)] = torch.tensor(t.logprobs)
    w, cut = rollout_correction(trainer, s_BT, m, "token_tis", cap)
    a = torch.tensor(adv)[:, None]
    want_loss = float((-a * w * m).sum() / m.sum())  # on-policy: ratio 1, so the token loss is -A w
    assert 0 < out["rollout_corr_cut_frac"] < 1
    assert out["rollout_corr_cut_frac"] == pytest.approx(float(cut.sum() / m.sum()), abs=1e-6)
    assert out["rollout_corr_weight"] == pytest.approx(float((w * m).sum() / m.sum()), abs=1e-5)
    assert out["loss"] == pytest.approx(want_loss, abs=1e-5)
    plain = policy_update(model, opt, trajs, adv, AlgoConfig(), OptimConfig(micro_batch_size=8), **kw)
    assert plain["loss"] == pytest.approx(float((-a * m).sum() / m.sum()), abs=1e-5) and "rollout_corr_weight" not in plain


def test_reinforce_pp_whitens_over_every_rank_fake_total_for_two_ranks():
    """Two data-parallel parts of one batch: with ``total`` summing over both (a fake of
    ``Dist.sum`` that adds the other part's numbers), each part gets the whole batch's whitening."""
    a, b = [[1.0, 0.0], [1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [1.0]]
    whole = [x for g in ADVANTAGES["reinforce_pp"](a + b) for x in g]
    centred_b = [x - sum(g) / len(g) if len(g) > 1 else x for g in b for x in g]
    mean = (sum(x - sum(g) / len(g) for g in a for x in g) + sum(centred_b)) / 9
    calls = iter([[sum(centred_b), float(len(centred_b))], [sum((x - mean) ** 2 for x in centred_b)]])
    fake_total = lambda xs: [x + y for x, y in zip(xs, next(calls))]  # noqa: E731
    part = [x for g in ADVANTAGES["reinforce_pp"](a, total=fake_total) for x in g]
    assert part == pytest.approx(whole[:5], abs=1e-6)
