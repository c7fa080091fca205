"""Token-in-token-out rollout: exact masks, tool errors as output, call and token budgets."""

import pytest
import torch

from fakes import ScriptedFakeEngine
from tirl.prompt import render_prompt
from tirl.rollout import RolloutLimits, SamplingParams, StopCondition, rollout
from tirl.rollout.hf_engine import HFEngine
from tirl.types import Problem
from tirl.update import token_logprobs


def _setup(tok, scripts: list[list[str]]):
    items, table = [], {}
    for i, s in enumerate(scripts):
        prob = Problem(id=f"p{i}", problem=f"What is 6 * {i + 7}?", answer=str(6 * (i + 7)))
        prompt = render_prompt(prob, tok, "chat", "{problem}", "Use python.")
        items.append((prob, i, prompt))
        table[tuple(prompt.token_ids)] = s
    return items, ScriptedFakeEngine(tok, table)


def check_invariants(t, tok):
    T = len(t.token_ids)
    assert len(t.mask) == T == len(t.logprobs)
    assert t.segments[0].kind == "prompt" and t.segments[0].start == 0
    for a, b in zip(t.segments, t.segments[1:]):
        assert a.end == b.start
    assert t.segments[-1].end == T
    for s in t.segments:
        want = 1 if s.kind == "model" else 0
        assert t.mask[s.start:s.end] == [want] * (s.end - s.start), s
        assert tok.decode(t.token_ids[s.start:s.end]) == s.text
        if want == 0:
            assert t.logprobs[s.start:s.end] == [0.0] * (s.end - s.start)
    for c in t.tool_calls:
        assert t.mask[c.span[0]:c.span[1]] == [0] * (c.span[1] - c.span[0])
    assert tok.decode(t.token_ids) == "".join(s.text for s in t.segments)


MODES = pytest.mark.parametrize("mode", ["lockstep", "async"])


@MODES
def test_masks_exact_with_scripted_fake_engine(tiny, sandbox, mode):
    model, tok = tiny
    eos = tok.eos_token
    scripts = [
        ["Let me compute.\n```python\nprint(6 * 7)\n```\nTRAILING TEXT NEVER SAMPLED", f"So the answer is \\boxed{{42}}.{eos}"],
        ["```python\nx = 6 * 8\nprint(x)\n```\n```output\n999\n```", f"\\boxed{{48}}{eos}"],
        [f"I think it is \\boxed{{54}}.{eos}"],
    ]
    items, engine = _setup(tok, scripts)
    trajs, times = rollout(engine, tok, sandbox, items, SamplingParams(), RolloutLimits(max_tool_calls=1), mode=mode)
    for t, (_, _, prompt) in zip(trajs, items):
        check_invariants(t, tok)
        # the mask-1 tokens are exactly the ids the engine returned, in order
        assert [x for x, m in zip(t.token_ids, t.mask) if m] == engine.sampled[tuple(prompt.token_ids)]
        assert t.token_ids[: t.prompt_len] == prompt.token_ids and t.segments[0].text == prompt.text
        assert t.finish_reason == "eos"
    a, b, c = trajs
    assert "TRAILING" not in a.response_text
    assert [s.kind for s in a.segments] == ["prompt", "model", "tool", "model"]
    assert a.tool_calls[0].observation == "42" and a.segments[2].text == "\n```output\n42\n```\n"
    assert a.response_text.endswith(f"\\boxed{{42}}.{eos}")
    # the model stopped at the closing fence, before it could write its own (hallucinated) output
    assert b.tool_calls[0].observation == "48" and "999" not in b.response_text
    assert c.tool_calls == [] and [s.kind for s in c.segments] == ["prompt", "model"]
    assert times.tools_s > 0


@MODES
def test_sandbox_failures_become_tool_output(tiny, sandbox, mode):
    model, tok = tiny
    eos = tok.eos_token
    scripts = [[f"```python\n{code}\n```", f"done{eos}"] for code in ("1/0", "while True: pass", "x = 1", "import ctypes; ctypes.string_at(0)")]
    items, engine = _setup(tok, scripts)
    trajs, _ = rollout(engine, tok, sandbox, items, SamplingParams(), RolloutLimits(tool_timeout_s=1.0), mode=mode)
    obs = [t.tool_calls[0].observation for t in trajs]
    assert obs[0] == "ZeroDivisionError: division by zero"
    assert obs[1].startswith("TimeoutError")
    assert obs[2] == "(no output)"
    assert "SIGSEGV" in obs[3]
    assert [t.tool_calls[0].result.ok for t in trajs] == [False, False, True, False]
    for t in trajs:
        check_invariants(t, tok)
        assert t.finish_reason == "eos"  # every rollout went on after its failed tool call


@MODES
@pytest.mark.parametrize("calls", [0, 1, 2])
def test_at_most_c_tool_calls(tiny, sandbox, calls, mode):
    model, tok = tiny
    turn = "```python\nprint(1)\n```"
    items, engine = _setup(tok, [[turn, turn, turn, f"end{tok.eos_token}"]])
    (t,), _ = rollout(engine, tok, sandbox, items, SamplingParams(), RolloutLimits(max_tool_calls=calls, max_tokens_per_turn=20),
                      mode=mode)
    check_invariants(t, tok)
    assert len(t.tool_calls) == calls
    assert engine.calls[next(iter(engine.calls))] == calls + 1
    assert engine.stops_seen[-1] is None  # the last turn generates without the tool trigger


@MODES
def test_token_budgets(tiny, sandbox, mode):
    model, tok = tiny
    long = "```python\nprint('a' * 50)\n```"
    items, engine = _setup(tok, [[long, "x " * 200]])
    limits = RolloutLimits(max_tool_calls=1, max_tokens_per_turn=40, max_response_tokens=60)
    (t,), _ = rollout(engine, tok, sandbox, items, SamplingParams(), limits, mode=mode)
    check_invariants(t, tok)
    assert t.response_len <= 60 and t.finish_reason == "length"
    for s in t.segments:
        if s.kind == "model":
            assert s.end - s.start <= 40


def test_hf_engine_logprobs_match_trainer(tiny):
    """Left-padded batched sampling: recorded log-probs equal a fresh forward pass."""
    model, tok = tiny
    engine = HFEngine(model, tok, batch_size=4)
    prompts = [tok("What is 12 * 34?")["input_ids"], tok("def f(x):")["input_ids"], tok("print")["input_ids"]]
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7), SamplingParams(temperature=0.0)):
        torch.manual_seed(0)
        gens = engine.generate(prompts, [12, 7, 12], params)
        for p, g, budget in zip(prompts, gens, [12, 7, 12]):
            assert 0 < len(g.token_ids) <= budget and len(g.logprobs) == len(g.token_ids)
            ids = torch.tensor([p + g.token_ids])
            lp = token_logprobs(model, ids, torch.ones_like(ids), params.temperature or 1.0)[0, len(p):]
            assert torch.allclose(lp, torch.tensor(g.logprobs), atol=1e-4), params


def test_hf_engine_cuts_each_row_at_its_stop(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok)
    stop = StopCondition(find=lambda text: (text.index("1") + 1) if "1" in text else None)
    torch.manual_seed(1)
    gens = engine.generate([tok("x")["input_ids"]] * 8, [40] * 8, SamplingParams(temperature=1.0), stop)
    assert any(g.finish_reason == "tool" for g in gens)  # the stop condition was exercised
    for g in gens:
        text = tok.decode(g.token_ids)
        if g.finish_reason == "tool":
            assert "1" in text and "1" not in tok.decode(g.token_ids[:-1])
        else:
            assert "1" not in text


def test_rollout_with_hf_engine_keeps_invariants(tiny, sandbox):
    model, tok = tiny
    items, _ = _setup(tok, [[], [], []])
    torch.manual_seed(0)
    trajs, _ = rollout(HFEngine(model, tok), tok, sandbox, items * 2, SamplingParams(temperature=1.0),
                       RolloutLimits(max_tokens_per_turn=30, max_response_tokens=60))
    for t in trajs:
        check_invariants(t, tok)
        assert t.logprobs[t.prompt_len] < 0


def test_chat_tool_calls_render_exactly_like_the_template(tiny, sandbox):
    from tirl.rollout.protocol import chat_protocol

    model, tok = tiny
    eos = tok.eos_token
    proto = chat_protocol(tok)
    call = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(6 * 7)"}}\n</tool_call>'
    bad = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": print(1)}}\n</tool_call>'
    items, engine = _setup(tok, [[call + eos + " NEVER SAMPLED", f"So \\boxed{{42}}{eos}"], [bad + eos, f"sorry{eos}"]])
    (a, b), _ = rollout(engine, tok, sandbox, items, SamplingParams(), RolloutLimits(), proto)
    for t in (a, b):
        check_invariants(t, tok)
    assert a.tool_calls[0].observation == "42" and [s.kind for s in a.segments] == ["prompt", "model", "tool", "model"]
    assert a.segments[1].text.endswith(eos)  # the end of the tool-call turn is sampled (mask 1)
    msgs = [{"role": "system", "content": "Use python."}, {"role": "user", "content": a.problem.problem},
            {"role": "assistant", "content": call}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "So \\boxed{42}"}]
    assert tok.decode(a.token_ids) == tok.apply_chat_template(msgs, tokenize=False).rstrip("\n")
    assert "not valid JSON" in b.tool_calls[0].observation and not b.tool_calls[0].result.ok  # fed back, not crashed


def test_async_rollout_generates_while_others_wait_for_tools_timed_fake_engine_delay_fake_sandbox(tiny):
    """Trajectory 0's tool call takes 0.8 s; trajectory 1 runs three fast calls. Async: all of 1's
    turns happen while 0 waits. Lock-step: every turn waits for the slow call. Same trajectories."""
    from fakes import DelayFakeSandbox, TimedScriptedFakeEngine

    model, tok = tiny
    eos = tok.eos_token
    slow = ["```python\nprint(0)\n```", f"\\boxed{{0}}{eos}"]
    fast = ["```python\nprint(1)\n```", "```python\nprint(2)\n```", "```python\nprint(3)\n```", f"\\boxed{{3}}{eos}"]
    out = {}
    for mode in ("lockstep", "async"):
        log: list = []
        items, fake = _setup(tok, [slow, fast])
        engine = TimedScriptedFakeEngine(tok, fake.scripts, 0.15, log)
        sb = DelayFakeSandbox({0: 0.8}, log)
        trajs, times = rollout(engine, tok, sb, items, SamplingParams(), RolloutLimits(max_tool_calls=3), mode=mode)
        for t in trajs:
            check_invariants(t, tok)
        out[mode] = (trajs, times, log)
    (a_trajs, a_times, a_log), (l_trajs, l_times, _) = out["async"], out["lockstep"]
    assert [t.token_ids for t in a_trajs] == [t.token_ids for t in l_trajs]
    assert [len(t.tool_calls) for t in a_trajs] == [1, 3]
    slow_start = next(t for t, ev, n in a_log if ev == "tool_start" and n == 0)
    slow_end = next(t for t, ev, n in a_log if ev == "tool_end" and n == 0)
    fast_turns = [t for t, ev, row in a_log if ev == "gen_end" and row == tuple(items[1][2].token_ids)]
    assert len(fast_turns) == 4 and all(slow_start < t < slow_end for t in fast_turns[1:])
    wall = {m: out[m][1].generate_s + out[m][1].tools_s for m in out}  # ~1.1 s vs ~1.4 s: turns 2-4 hidden
    assert wall["async"] < wall["lockstep"] - 0.2


def test_async_and_lockstep_rollouts_agree_with_the_hf_engine_greedy(tiny, sandbox):
    model, tok = tiny
    items, _ = _setup(tok, [[], [], [], []])
    got = {}
    for mode in ("lockstep", "async"):
        got[mode], _ = rollout(HFEngine(model, tok), tok, sandbox, items, SamplingParams(temperature=0.0),
                               RolloutLimits(max_tool_calls=2, max_tokens_per_turn=30, max_response_tokens=80), mode=mode)
    for a, b in zip(got["lockstep"], got["async"]):
        check_invariants(b, tok)
        assert a.token_ids == b.token_ids and a.mask == b.mask
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_each_trajectory_gets_its_own_seed_on_engines_that_take_one_seed_recording_fake_engine(tiny):
    """With a rollout seed, an engine that takes per-request seeds (vLLM) gets one seed per
    trajectory — the same in lock-step and async, in every run, distinct between trajectories,
    different for another rollout seed — and an engine that does not (HF) gets none."""
    from fakes import DelayFakeSandbox, ScriptedFakeEngine

    model, tok = tiny
    eos = tok.eos_token
    rows = [["```python\nprint(1)\n```", f"\\boxed{{1}}{eos}"], [f"\\boxed{{2}}{eos}"], [f"\\boxed{{3}}{eos}"]]

    class SeedRecordingFakeEngine(ScriptedFakeEngine):
        per_request_seeds = True

        def __init__(self, *a):
            super().__init__(*a)
            self.seen: dict[tuple[int, ...], list[int]] = {}

        def generate(self, prompts, max_new_tokens, params, stop=None, seeds=None):
            for p, s in zip(prompts, seeds):
                self.seen.setdefault(self._row(p), []).append(s)
            return super().generate(prompts, max_new_tokens, params, stop)

        async def agenerate(self, prompt, max_new_tokens, params, stop=None, seed=None):
            self.seen.setdefault(self._row(prompt), []).append(seed)
            return super().generate([prompt], [max_new_tokens], params, stop)[0]

    def seeds(mode, seed):
        items, fake = _setup(tok, rows)
        engine = SeedRecordingFakeEngine(tok, fake.scripts)
        rollout(engine, tok, DelayFakeSandbox({}), items, SamplingParams(), RolloutLimits(max_tool_calls=2), mode=mode,
                seed=seed)
        return [engine.seen[tuple(it[2].token_ids)] for it in items]

    lock, lock2, asyn, other = seeds("lockstep", 7), seeds("lockstep", 7), seeds("async", 7), seeds("lockstep", 8)
    assert lock == lock2 == asyn and [len(s) for s in lock] == [2, 1, 1]
    assert all(len(set(s)) == 1 for s in lock)  # one seed per trajectory, every turn
    assert len({s[0] for s in lock}) == 3 and not {s[0] for s in lock} & {s[0] for s in other}

    items, fake = _setup(tok, rows)  # no per_request_seeds: generate is called as before, without seeds
    trajs, _ = rollout(fake, tok, DelayFakeSandbox({}), items, SamplingParams(), RolloutLimits(max_tool_calls=2), seed=7)
    assert len(trajs) == 3


def test_vllm_engine_forgets_tracebacks_that_modules_keep_fake_module():
    """A module that keeps an import error as a global (vLLM keeps ``_torchcodec_import_exc``) holds
    the frames of whoever imported it: the first vLLM engine of a process was never freed. After an
    engine starts, such exceptions keep their message, not their frames (a fake module here; the
    real-vLLM test checks vLLM's own modules)."""
    import gc
    import sys
    import types
    import weakref

    from tirl.rollout.vllm_engine import _drop_stored_tracebacks

    class Big:  # stands in for the engine (its weights, its KV cache)
        pass

    def importer(big):  # the frame that ran the import, holding the engine
        try:
            raise ImportError("No module named 'optional_dep'")
        except ImportError as exc:
            return exc

    big = Big()
    fake = types.ModuleType("tirl_test_fake_vllm_audio")
    fake._import_exc = importer(big)
    fake._chained = RuntimeError("outer")
    fake._chained.__cause__ = importer(big)
    sys.modules[fake.__name__] = fake
    try:
        ref = weakref.ref(big)
        del big
        gc.collect()
        assert ref() is not None  # the kept traceback holds the importer's frame
        _drop_stored_tracebacks()
        gc.collect()
        assert ref() is None
        assert str(fake._import_exc) == "No module named 'optional_dep'" and fake._import_exc.__traceback__ is None
        assert fake._chained.__cause__.__traceback__ is None
    finally:
        del sys.modules[fake.__name__]


def test_weights_for_an_out_of_process_vllm_are_written_in_files_of_bounded_size(tiny, tmp_path):
    """Gathered tensors (a sharded trainer's) go to /dev/shm in files of about ``shard_bytes``, so the
    writer never holds the whole model; every tensor, tied ones included, is in one of them."""
    from safetensors.torch import load_file

    from tirl.rollout.vllm_engine import _save_full_state

    model, _ = tiny
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # (as full_tensor() gives them: fresh)
    biggest = max(v.numel() * v.element_size() for v in state.values())
    _save_full_state(model, str(tmp_path), tensors=iter(state.items()), shard_bytes=biggest)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "config.json").exists()
    back = {}
    for f in files:
        part = load_file(f)
        assert sum(v.numel() * v.element_size() for v in part.values()) < 2 * biggest + 1
        back.update(part)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    one = tmp_path / "one"
    one.mkdir()
    _save_full_state(model, str(one))  # the model's own tensors (one process): one file, as before
    assert len(list(one.glob("*.safetensors"))) == 1
    half = tmp_path / "bf16"  # in the engine's dtype, cast as vLLM casts them on loading: the same values
    half.mkdir()
    _save_full_state(model, str(half), tensors=iter(state.items()), dtype=torch.bfloat16)
    back = {k: v for f in half.glob("*.safetensors") for k, v in load_file(f).items()}
    assert back.keys() == state.keys()
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], state[k].to(torch.bfloat16)) for k in state)


class _ThreadedFakeChannel:
    """A node's ranks as threads of one process, in place of :class:`tirl.dist.NodeChannel` (the real
    one, over gloo between torchrun's processes, is tested in test_dist.py)."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.shared = rank, shared
        self.size, self.leader = shared["size"], rank == 0

    def exchange(self, payload, serve):
        s = self.shared
        s["slots"][self.rank] = payload
        s["barrier"].wait()
        if self.leader:
            s["rounds"] += 1
            s["answers"] = serve(list(s["slots"]))
        s["barrier"].wait()
        answer = s["answers"][self.rank]
        s["barrier"].wait()  # nobody writes the next round's payload before everyone read this one
        return answer


def test_a_node_engine_serves_every_ranks_turns_in_lock_step_threaded_fake_channel(tiny):
    """``NodeEngine``: the leader's engine runs the turns of every rank of the node, batched (one
    generate per stop condition), and each rank gets its own rows back; ranks with fewer turns (or
    no trajectory at all) keep taking part until all are done. The trajectories are those of one
    rollout of the whole batch with the engine itself."""
    import threading

    from fakes import DelayFakeSandbox
    from tirl.rollout.node_engine import NodeEngine

    model, tok = tiny
    eos = tok.eos_token
    rows = [["```python\nprint(1)\n```", "```python\nprint(2)\n```", f"\\boxed{{3}}{eos}"], [f"\\boxed{{2}}{eos}"],
            [f"\\boxed{{3}}{eos}"], ["```python\nprint(4)\n```", f"\\boxed{{4}}{eos}"]]
    limits = RolloutLimits(max_tool_calls=2)
    items, whole = _setup(tok, rows)
    want, _ = rollout(whole, tok, DelayFakeSandbox({}), items, SamplingParams(), limits)

    items, fake = _setup(tok, rows)
    shares = [items[0:2], [], items[2:4]]  # three ranks: 3 turns, none, 2 turns
    shared = {"size": 3, "barrier": threading.Barrier(3), "slots": [None] * 3, "answers": None, "rounds": 0}
    got: dict[int, list] = {}

    def rank(r: int) -> None:
        engine = NodeEngine(fake if r == 0 else None, _ThreadedFakeChannel(r, shared), pad_id=0)
        assert engine.name == "NodeEngine(ScriptedFakeEngine)" and engine.weight_sync is None
        got[r], _ = rollout(engine, tok, DelayFakeSandbox({}), shares[r], SamplingParams(), limits)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(got) == [0, 1, 2]
    mine = got[0] + got[1] + got[2]
    assert [t.token_ids for t in mine] == [t.token_ids for t in want]
    assert [t.mask for t in mine] == [t.mask for t in want]
    # the leader batched the ranks' turns: one generate per turn of the longest rank (3), as the whole
    # batch's rollout does; rounds: the engine's description, 3 turns, the end
    assert len(fake.stops_seen) == len(whole.stops_seen) == 3 and shared["rounds"] == 5
