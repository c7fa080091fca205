"""Engines sample from the distribution they record: N draws at one position against the exact
distribution computed from the trainer's logits (see ``sampler_stats``). The recorded log-probs
alone cannot show this (a sampler that draws from the top 50 while recording the full softmax
logs a mismatch of 0); the draws can. The vLLM engine's counterpart is in ``test_vllm.py``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sampler_stats import binned_chi2, chi2_bound, check_draws, exact_probs
from tirl.rollout.engine import SamplingParams, sampling_logprobs
from tirl.rollout.hf_engine import HFEngine

N = 4000
SETTINGS = [SamplingParams(1.0), SamplingParams(0.7), SamplingParams(1.0, top_p=0.9), SamplingParams(0.7, top_k=20),
            SamplingParams(1.0, top_p=0.8, top_k=30)]


@pytest.fixture(scope="module")
def peaked(tiny):
    """The tiny model with its final norm scaled: a peaked next-token distribution (top token
    ~0.3) with a long tail (most of the mass outside the top 50), at the chat prompt below."""
    model, tok = tiny
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.norm.weight.mul_(5.0)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 700 * 31?"}], add_generation_prompt=True,
                                     tokenize=False)
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([ids])).logits[0, -1]  # the trainer's forward pass
    return m, tok, ids, logits


def _top50_mass(logits) -> float:
    p = np.sort(exact_probs(logits.numpy()))[::-1]
    return float(p[50:].sum())


def test_the_check_rejects_a_top50_sampler_and_accepts_a_correct_one_fake_samplers(peaked):
    """The statistic itself, on draws made with numpy: from the exact distribution it passes;
    from the same distribution cut to its top 50 (Hugging Face's default top_k) it fails."""
    *_, logits = peaked
    probs = exact_probs(logits.numpy())
    assert _top50_mass(logits) > 0.3
    rng = np.random.default_rng(0)
    check_draws(rng.choice(len(probs), size=N, p=probs), probs, "exact")
    top = np.argsort(-probs)[:50]
    cut = np.zeros_like(probs)
    cut[top] = probs[top] / probs[top].sum()
    chi2, df, tv = binned_chi2(rng.choice(len(probs), size=N, p=cut), probs)
    assert chi2 > 10 * chi2_bound(df) and tv > 0.3
    # a subtler bias: temperature 0.9 drawn where 1.0 is claimed
    warm = exact_probs(logits.numpy(), temperature=0.9)
    chi2, df, _ = binned_chi2(rng.choice(len(probs), size=N, p=warm), probs)
    assert chi2 > chi2_bound(df)


def test_sampling_logprobs_match_the_reference_distribution(peaked):
    *_, logits = peaked
    for params in [*SETTINGS, SamplingParams(0.0)]:
        ours = sampling_logprobs(logits[None], params)[0].exp().double().numpy()
        ref = exact_probs(logits.numpy(), params.temperature, params.top_k, params.top_p)
        if params.temperature == 0:
            ref = exact_probs(logits.numpy())  # greedy records the untempered distribution
        assert np.abs(ours - ref).max() < 1e-6, params
        assert ((ours > 0) == (ref > 0)).all(), params


@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: f"T{p.temperature}-p{p.top_p}-k{p.top_k}")
def test_hf_engine_draws_from_the_distribution_it_records(peaked, params):
    model, tok, ids, logits = peaked
    engine = HFEngine(model, tok, batch_size=1000)
    torch.manual_seed(0)
    gens = engine.generate([ids] * N, [1] * N, params)
    probs = exact_probs(logits.numpy(), params.temperature, params.top_k, params.top_p)
    draws = np.array([g.token_ids[0] for g in gens])
    check_draws(draws, probs, str(params))
    recorded = np.array([g.logprobs[0] for g in gens])
    assert np.abs(recorded - np.log(probs[draws])).max() < 1e-4  # and it records that distribution


def test_hf_engine_greedy_draws_the_argmax(peaked):
    model, tok, ids, logits = peaked
    gens = HFEngine(model, tok).generate([ids] * 8, [1] * 8, SamplingParams(0.0))
    assert {g.token_ids[0] for g in gens} == {int(logits.argmax())}
    assert gens[0].logprobs[0] == pytest.approx(float(torch.log_softmax(logits.double(), -1).max()), abs=1e-5)


def test_hf_engine_seeded_rows_do_not_depend_on_their_batch(tiny):
    """With per-row seeds a row's tokens are the same alone, in a batch of others, or after a
    different global seed."""
    model, tok = tiny
    prompts = [tok("What is 12 * 34?")["input_ids"], tok("def f(x):")["input_ids"], tok("print")["input_ids"]]
    params = SamplingParams(1.0, top_p=0.95)
    engine = HFEngine(model, tok, batch_size=8)
    torch.manual_seed(0)
    together = engine.generate(prompts, [10] * 3, params, seeds=[11, 22, 33])
    torch.manual_seed(1)
    alone = [engine.generate([p], [10], params, seeds=[s])[0] for p, s in zip(prompts, [11, 22, 33])]
    shuffled = engine.generate(prompts[::-1] + prompts, [10] * 6, params, seeds=[33, 22, 11, 1, 2, 3])[:3][::-1]
    for a, b, c in zip(together, alone, shuffled):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    other = engine.generate(prompts, [10] * 3, params, seeds=[12, 23, 34])
    assert any(a.token_ids != o.token_ids for a, o in zip(together, other))
