"""The policy update at long lengths (issue #20): the chunked LM head, packed sequences and
micro-batches by token budget compute what the plain padded full-logits path computes."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tirl.config import AlgoConfig, OptimConfig
from tirl.models import load_model
from tirl.types import Problem, TirlError, Trajectory
from tirl.update.logprobs import HeadLogprobs, head_logprobs, logprobs_of_sequences
from tirl.update.step import by_tokens, micro_batches, policy_update, sequence_logprobs

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _tool_trajs(vocab: int, lengths=(9, 23, 14, 31, 6, 17), seed: int = 0) -> list[Trajectory]:
    """Trajectories of mixed lengths with a prompt and a tool span (mask 0) inside the response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        mask = [0] * 3 + [1] * (n - 3)
        mask[n // 2 : n // 2 + 3] = [0] * 3  # an inserted interpreter output
        lp = [-float(torch.rand((), generator=g)) - 0.1 if m else 0.0 for m in mask]
        out.append(Trajectory(problem=Problem(str(i), "q", "a"), group=i // 2, token_ids=ids, mask=mask, logprobs=lp,
                              prompt_len=3))
    return out


def test_head_backward_matches_autograd_in_float64():
    """The hand-written backward (log-prob and entropy terms, temperature, bias) against torch's."""
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    f = lambda h, w, b: HeadLogprobs.apply(h, w, b, y, 0.7, 3, None, True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h, w, b))
    # only the log-prob used (entropy as a metric): the entropy's gradient is left out
    assert torch.autograd.gradcheck(lambda h, w, b: f(h, w, b)[0], (h, w, b))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_full_logits_values_and_gradients(tiny_model_dir, temperature):
    model, tok = load_model(str(tiny_model_dir))
    trajs = _tool_trajs(len(tok))
    ids = [t.token_ids for t in trajs]
    mask = torch.zeros(len(ids), max(map(len, ids)))
    for i, t in enumerate(trajs):
        mask[i, : len(t.mask)] = torch.tensor(t.mask, dtype=torch.float)
    out = {}
    for chunk in (0, 5, 64, 4096):
        model.zero_grad(set_to_none=True)
        logp, ent = logprobs_of_sequences(model, ids, 0, temperature, with_entropy=True, chunk=chunk)
        ((logp * mask).sum() - 0.3 * (ent * mask).sum()).backward()
        out[chunk] = (logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    ref = out[0]
    for chunk in (5, 64, 4096):
        logp, ent, grads = out[chunk]
        assert torch.allclose(logp, ref[0], atol=1e-5) and torch.allclose(ent, ref[1], atol=1e-5)
        for name, g in grads.items():
            assert torch.allclose(g, ref[2][name], atol=1e-5, rtol=1e-4), (chunk, name)
    assert torch.all(ref[0][:, 0] == 0) and torch.all(ref[0][0, len(ids[0]) :] == 0)  # no context, padding


def _assert_packed_equals_padded(model, ids, before_packed=lambda: None) -> None:
    """Log-probs, entropies and every gradient, packed vs right-padded (``before_packed`` runs
    between the two)."""
    out = {}
    for pack in (False, True):
        if pack:
            before_packed()
        model.zero_grad(set_to_none=True)
        logp, ent = logprobs_of_sequences(model, ids, 0, 0.7, with_entropy=True, pack=pack)
        (logp.sum() + ent.sum()).backward()
        out[pack] = logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-5)
    for name, g in out[True][2].items():
        assert torch.allclose(g, out[False][2][name], atol=1e-5, rtol=1e-4), name


def test_packed_equals_padded_values_and_gradients(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    _assert_packed_equals_padded(model, [t.token_ids for t in _tool_trajs(len(tok))])


@pytest.mark.parametrize("pack", [False, True])
def test_the_head_on_the_sampled_tokens_alone_gives_their_logprobs_and_gradients(tiny_model_dir, pack):
    """``mask_BT``: the LM head runs on the mask-1 tokens alone (``Layout.only``): their log-probs and
    entropies are those of the head on every token, everything else is 0, and a masked loss has
    the same gradients. A sequence with no sampled token is fine (nothing of it is predicted)."""
    model, tok = load_model(str(tiny_model_dir))
    trajs = _tool_trajs(len(tok))
    trajs[4].mask = [0] * len(trajs[4].mask)
    ids, masks = [t.token_ids for t in trajs], [t.mask for t in trajs]
    keep = torch.zeros(len(ids), max(map(len, ids)))
    for i, m in enumerate(masks):
        keep[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    out = {}
    for only in (False, True):
        model.zero_grad(set_to_none=True)
        logp, ent = logprobs_of_sequences(model, ids, 0, 0.7, with_entropy=True, pack=pack, chunk=5,
                                          mask_BT=keep if only else None)
        ((logp * keep).sum() + (ent * keep).sum()).backward()
        out[only] = logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.equal(out[True][0] * (1 - keep), torch.zeros_like(keep)) and not out[True][0][4].any()
    assert torch.allclose(out[True][0], out[False][0] * keep, atol=1e-6)
    assert torch.allclose(out[True][1], out[False][1] * keep, atol=1e-6)
    for name, g in out[True][2].items():
        assert torch.allclose(g, out[False][2][name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm"])
def test_the_update_is_the_same_with_the_head_on_every_token_fake_layout(tiny_model_dir, monkeypatch, aggregation):
    """``policy_update`` predicts the sampled tokens alone; with ``Layout.only`` replaced by the
    identity (the head on every token, the earlier behaviour) the weights after the update are the
    same, with a KL reference and the entropy bonus in the loss."""
    from tirl.update.logprobs import Layout

    model, tok = load_model(str(tiny_model_dir))
    trajs = _tool_trajs(len(tok))
    ref = [[-0.5] * len(t.token_ids) for t in trajs]
    adv = [1.0, -0.5, 0.0, 0.8, -1.0, 0.3]
    algo = AlgoConfig(aggregation=aggregation, entropy_coef=0.01, kl_coef=0.1, kl_in="loss")
    optim = OptimConfig(max_tokens_per_micro_batch=40, logprob_chunk=8, grad_clip=1e9)

    def run():
        m = copy.deepcopy(model)
        policy_update(m, torch.optim.SGD(m.parameters(), lr=1.0), trajs, adv, algo, optim, temperature=0.8, pad_id=0,
                      ref_logprobs=ref)
        return {n: p.detach() for n, p in m.named_parameters()}

    alone = run()
    monkeypatch.setattr(Layout, "only", lambda self, mask: self)
    every = run()
    for name, w in alone.items():
        assert torch.allclose(w, every[name], atol=1e-6, rtol=1e-5), name
    assert any(not torch.equal(w, model.state_dict()[n]) for n, w in alone.items())


def test_chunked_head_under_bfloat16_autocast_matches_full_logits(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), "float32", compute_dtype="bfloat16")
    ids = [t.token_ids for t in _tool_trajs(len(tok))]
    full = logprobs_of_sequences(model, ids, 0, chunk=0)
    chunked = logprobs_of_sequences(model, ids, 0, chunk=7, pack=True)
    assert torch.allclose(full, chunked, atol=2e-2)  # bf16 attention/matmul order, not a different computation
    assert not torch.equal(full, logprobs_of_sequences(load_model(str(tiny_model_dir))[0], ids, 0, chunk=0))


def _update(model, trajs, adv, optim: OptimConfig, algo: AlgoConfig) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    policy_update(model, opt, trajs, adv, algo, optim, temperature=0.8, pad_id=0, const_len=32)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("aggregation", AGGS)
def test_token_budget_and_packing_give_the_fixed_micro_batch_update(tiny_model_dir, aggregation):
    model, tok = load_model(str(tiny_model_dir))
    trajs = _tool_trajs(len(tok))
    adv = [1.0, -0.5, 0.0, 0.8, -1.0, 0.3]
    algo = AlgoConfig(aggregation=aggregation, ratio_against="sampler", entropy_coef=0.01)
    plain = _update(model, trajs, adv, OptimConfig(micro_batch_size=2, pack=False, logprob_chunk=0, grad_clip=1e9), algo)
    for optim in (OptimConfig(max_tokens_per_micro_batch=40, grad_clip=1e9),  # packed, chunked
                  OptimConfig(max_tokens_per_micro_batch=40, pack=False, grad_clip=1e9),
                  OptimConfig(max_tokens_per_micro_batch=10_000, logprob_chunk=8, grad_clip=1e9)):
        got = _update(model, trajs, adv, optim, algo)
        for name, w in got.items():
            assert torch.allclose(w, plain[name], atol=1e-6, rtol=1e-5), (optim, name)


def _predicted(h, w, b, y, loss_of, predict):
    """Gradients of ``loss_of(logp, ent)`` through the chunked head, with ``predict`` given or not,
    and how many blocks of logits the backward recomputed."""
    import tirl.update.logprobs as lp

    h, w, b = (x.detach().clone().requires_grad_() for x in (h, w, b))
    logp, ent = HeadLogprobs.apply(h, w, b, y, 0.7, 3, None, True, predict)
    real, calls = lp._head_logits, []
    lp._head_logits = lambda *a: calls.append(1) or real(*a)
    try:
        loss_of(logp, ent).backward()
    finally:
        lp._head_logits = real
    return (h.grad, w.grad, b.grad), len(calls)


def test_head_gradients_from_the_forward_equal_the_recomputed_ones():
    """With a prediction of the loss's per-token gradients the head computes its gradients in the
    forward and the backward recomputes no logits; a prediction that does not match the loss that
    arrives (here: off by a factor) is caught and the gradients recomputed, still exact."""
    torch.manual_seed(0)
    h, w, b = torch.randn(8, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    y = torch.randint(0, 11, (8,))
    c, u = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def loss_of(logp, ent):  # per token: a clipped ratio, a KL-like term, an entropy bonus
        r = torch.exp(logp - c)
        return (torch.maximum(-u * r, -u * r.clamp(0.8, 1.2)) + torch.exp(c - logp) - 0.1 * ent).sum() / 8

    def right(logp, ent):  # the head calls it inside its forward, where autograd is off
        with torch.enable_grad():
            x, e = logp.detach().requires_grad_(), ent.detach().requires_grad_()
            return torch.autograd.grad(loss_of(x, e), (x, e))

    def wrong(logp, ent):
        g = right(logp, ent)
        return g[0] * 1.5, g[1]

    ref, n_ref = _predicted(h, w, b, y, loss_of, None)
    assert n_ref == 3  # ceil(8 / 3) blocks recomputed
    for predict, recomputed in ((right, 0), (wrong, 3)):
        got, n = _predicted(h, w, b, y, loss_of, predict)
        assert n == recomputed
        for a, r in zip(got, ref):
            assert torch.allclose(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss,blocks_per_pass", [("ppo_clip", 1), ("cispo", 1), ("gspo_token", 2)])
def test_the_update_computes_the_head_gradients_in_the_forward_for_per_token_losses(tiny_model_dir, monkeypatch, loss,
                                                                                    blocks_per_pass):
    """policy_update hands the head its loss (KL to a reference, entropy bonus and a per-token
    rollout correction included): per-token losses cost one block of logits per pass, a
    sequence-level one (GSPO) two (the backward recomputes); the weights equal the plain
    full-logits update either way."""
    import tirl.update.logprobs as lp

    model, tok = load_model(str(tiny_model_dir))
    trajs = _tool_trajs(len(tok))
    adv = [1.0, -0.5, 0.2, 0.8, -1.0, 0.3]
    ref = [[v - 0.05 for v in t.logprobs] for t in trajs]
    algo = AlgoConfig(loss=loss, ratio_against="sampler", entropy_coef=0.01, kl_coef=0.1, kl_in="loss",
                      rollout_correction="token_tis")
    opt = lambda chunk: OptimConfig(max_tokens_per_micro_batch=10_000, logprob_chunk=chunk, grad_clip=1e9)  # noqa: E731

    def run(chunk):
        m = copy.deepcopy(model)
        m._tirl_packing_checked = True
        policy_update(m, torch.optim.SGD(m.parameters(), lr=1.0), trajs, adv, algo, opt(chunk), temperature=0.8,
                      pad_id=0, ref_logprobs=ref)
        return {n: p.detach() for n, p in m.named_parameters()}

    plain = run(0)
    real, calls = lp._head_logits, []
    monkeypatch.setattr(lp, "_head_logits", lambda *a: calls.append(1) or real(*a))
    got = run(16)
    tokens = sum(sum(t.mask) for t in trajs)  # one micro-batch: the head runs on the sampled tokens
    assert len(calls) == blocks_per_pass * -(-tokens // 16)
    for name, w in got.items():
        assert torch.allclose(w, plain[name], atol=1e-6, rtol=1e-5), name


def test_the_sft_step_computes_the_head_gradients_in_the_forward(tiny_model_dir, monkeypatch):
    """The SFT loss is per token: one block of logits per block of learnable tokens, and the
    weights after a step equal the full-logits step's."""
    import tirl.update.logprobs as lp
    from tirl.sft import SFTExample, sft_step

    model, tok = load_model(str(tiny_model_dir))
    model._tirl_packing_checked = True
    batch = [SFTExample(t.token_ids, t.mask) for t in _tool_trajs(len(tok))]

    def run(chunk):
        m = copy.deepcopy(model)
        sft_step(m, torch.optim.SGD(m.parameters(), lr=1.0), batch,
                 OptimConfig(max_tokens_per_micro_batch=10_000, logprob_chunk=chunk, grad_clip=1e9), 0)
        return {n: p.detach() for n, p in m.named_parameters()}

    plain = run(0)
    real, calls = lp._head_logits, []
    monkeypatch.setattr(lp, "_head_logits", lambda *a: calls.append(1) or real(*a))
    got = run(16)
    learnable = sum(sum(e.mask[1:]) for e in batch)
    assert len(calls) == -(-learnable // 16)
    for name, w in got.items():
        assert torch.allclose(w, plain[name], atol=1e-6, rtol=1e-5), name


def test_recomputed_and_reference_logprobs_are_the_same_packed(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    trajs = _tool_trajs(len(tok))
    a = sequence_logprobs(model, trajs, OptimConfig(pack=False, logprob_chunk=0), 0, 0.7)
    b = sequence_logprobs(model, trajs, OptimConfig(max_tokens_per_micro_batch=32, logprob_chunk=4), 0, 0.7)
    for x, y, t in zip(a, b, trajs):
        assert len(x) == len(y) == len(t.token_ids)
        assert x == pytest.approx(y, abs=1e-5)


def test_token_budget_micro_batches_fit_the_budget():
    trajs = _tool_trajs(50, lengths=(9, 23, 14, 31, 6, 17, 40))
    parts = micro_batches(trajs, list(range(7)), OptimConfig(max_tokens_per_micro_batch=32))
    assert sorted(i for p in parts for i in p) == list(range(7))
    for p in parts:
        assert len(p) == 1 or sum(len(trajs[i].token_ids) for i in p) <= 32
    assert [6] in parts  # 40 tokens: longer than the budget, alone


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100), max_size=40), st.integers(2, 150), st.booleans())
def test_by_tokens_places_each_sequence_once_within_budget(lengths, budget, pack):
    groups = by_tokens(lengths, budget, pack)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        cost = sum(lengths[i] for i in g) if pack else len(g) * max(lengths[i] for i in g)
        assert len(g) == 1 or cost <= budget


def test_packing_that_leaks_is_refused_fake_mask_builder(tiny_model_dir, monkeypatch):
    """With transformers' packed-sequence detection switched off and the sequences' bounds not
    passed (a stand-in for an architecture that ignores both) packed sequences attend to each
    other: the check names the fix."""
    import transformers.masking_utils as mu

    import tirl.update.logprobs as lp

    model, tok = load_model(str(tiny_model_dir))
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    monkeypatch.setattr(lp, "_takes_varlen", lambda model: False)
    with pytest.raises(TirlError, match="optim.pack=false"):
        logprobs_of_sequences(model, [[5, 6, 7], [8, 9]], 0, pack=True)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_sdpa_attends_within_each_sequence_without_the_mask(tiny_model_dir, monkeypatch, checkpointing):
    """sdpa runs each packed sequence's attention on its own from the bounds the forward passes:
    with transformers' block-diagonal mask switched off (a row-wide causal mask would leak across
    sequences) the packed values and gradients still equal the padded ones, also when gradient
    checkpointing recomputes the layers in the backward (the bounds must reach the recompute)."""
    import transformers.masking_utils as mu

    model, tok = load_model(str(tiny_model_dir))
    assert model.config._attn_implementation == "sdpa"
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    def mask_off():
        monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
        model._tirl_packing_checked = True  # the check's own forwards are not what this test is about

    _assert_packed_equals_padded(model, [t.token_ids for t in _tool_trajs(len(tok))], mask_off)


def test_sdpa_by_sequence_equals_the_block_diagonal_mask():
    """The per-sequence attention against transformers' sdpa with the block-diagonal causal mask:
    grouped-query heads, a one-token sequence, forward and gradients; without bounds (generation)
    it is transformers' function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tirl.update.logprobs import sdpa_by_sequence

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal = 2, True

    torch.manual_seed(0)
    lens = [5, 1, 9, 3]
    L = sum(lens)
    q = torch.randn(1, 4, L, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, L, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, L, 8, dtype=torch.float64, requires_grad=True)
    seq = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = (seq[:, None] == seq[None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
    bounds = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    outs = []
    for by_seq in (True, False):
        q.grad = k.grad = v.grad = None
        if by_seq:
            o, _ = sdpa_by_sequence(Attn(), q, k, v, None, scaling=0.3, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds)
        else:
            o, _ = sdpa_attention_forward(Attn(), q, k, v, mask[None, None], scaling=0.3)
        (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum().backward()
        outs.append((o.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-12)
    plain, _ = sdpa_by_sequence(Attn(), q, k, v, mask[None, None], scaling=0.3)
    assert torch.equal(plain, sdpa_attention_forward(Attn(), q, k, v, mask[None, None], scaling=0.3)[0])


def test_only_one_chunk_of_logits_is_alive(tiny_model_dir):
    """The largest allocation of the head's forward+backward grows with the chunk, not with the
    tokens: the full-logits path allocates [M, V] float32 tensors, the chunked one [chunk, V]."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 5000, bias=False)
    h = torch.randn(2000, 16, requires_grad=True)
    y = torch.randint(0, 5000, (2000,))
    peaks = {}
    for chunk in (0, 100):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            logp, ent = head_logprobs(h, head, y, 1.0, chunk, True, True)
            (logp.sum() + ent.sum()).backward()
        peaks[chunk] = max(e.self_cpu_memory_usage for e in prof.events())  # the largest single allocation
    full_logits = 2000 * 5000 * 4
    assert peaks[0] >= full_logits and peaks[100] < full_logits / 5, peaks


def test_a_step_that_trains_nothing_measures_on_a_small_sample(tiny_model_dir):
    """Every advantage 0: no token trains, and the mismatch and entropy come from one forward
    over the mini-batch's first ``optim.idle_sample_seqs`` trajectories (not a micro-batch)."""
    model, tok = load_model(str(tiny_model_dir))
    trajs = _tool_trajs(len(tok))
    seen: list[int] = []
    model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(int(i[0].numel())))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = policy_update(model, opt, trajs, [0.0] * len(trajs), AlgoConfig(), OptimConfig(idle_sample_seqs=2),
                          temperature=1.0, pad_id=0)
    assert stats["tokens_trained"] == 0 and stats["entropy"] > 0 and stats["logprob_mismatch"] > 0
    checks = 3  # check_packing: two sequences packed, then each alone
    assert seen[checks:] == [len(trajs[0].token_ids) + len(trajs[1].token_ids)], seen


_TRIM_PROBE = """
import os, torch
from tirl.models import return_freed_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
keep, drop = [], []
for i in range(4000):  # 64 KiB blocks: under glibc's mmap threshold, so on the heap
    (keep if i % 2 else drop).append(torch.ones(16384))
del drop  # holes between live blocks: glibc keeps them
before = rss()
return_freed_memory(torch.device("cpu"))
print(before - rss())
"""


def test_return_freed_memory_gives_the_heaps_holes_back_on_the_cpu():
    """Half of 4,000 heap blocks of 64 KiB freed between live ones (what tensors of many sizes
    leave): glibc keeps those ~125 MiB resident until ``return_freed_memory`` trims the heap.
    A fresh process, so that nothing else in the heap blurs the figure."""
    import subprocess
    import sys

    from conftest import REPO
    from tirl.models import _malloc_trim

    if _malloc_trim() is None:
        pytest.skip("the C library is not glibc: return_freed_memory is a no-op there")
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) > 80 * 2**20, out.stdout
